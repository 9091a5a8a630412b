#!/usr/bin/env python3
"""Reference images for LoRA on Stable Diffusion XL (tests/core/test-sdxl.c
"/sdxl/lora"), on tests/fixtures/pipelines/tiny-sdxl:

  u: a UNet adapter made with peft (r 4, lora_alpha 8 on the attentions'
     to_q/to_k/to_v/to_out.0, proj_in/proj_out (linear in SDXL), ff.net.0.proj
     and the resnets' conv1), saved by StableDiffusionXLPipeline.save_lora_weights;
     diffusers' images after load_lora_weights, and set_adapters (u, 0.7)
  t: adapters on both text encoders (peft names "text_encoder." and
     "text_encoder_2.", lora_adapter_metadata), written by hand — transformers 5
     wants peft >= 0.22 to load text-encoder adapters, which this machine
     cannot install — with the expected image from the encoders with
     W + lora_alpha / r * B A put in their weights (what peft's layers compute);
     also as kohya-ss' lora_te1_ / lora_te2_ names (t-kohya.safetensors)

  pip install --no-deps --target /tmp/peftlib peft==0.21.2
  PYTHONPATH=/tmp/peftlib python3 tests/reference/make_sdxl_lora_fixtures.py
"""
import json
import os
import shutil

import numpy as np
import torch
from safetensors.numpy import save_file

from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
MODEL = os.path.join(FIX, "pipelines", "tiny-sdxl")
OUT = os.path.join(FIX, "sdxl", "lora")
GEN = dict(prompt="a red circle", negative_prompt="dark", num_inference_steps=3, height=32, width=32,
           guidance_scale=5.0)
SEED = 23


def image(pipe):
    img = pipe(**GEN, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images[0]
    return np.ascontiguousarray(np.round(img * 255).astype(np.uint8))


def pipeline():
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    imgs, cases = {}, []
    # u: the UNet, through peft and diffusers' own loading
    pipe = pipeline()
    torch.manual_seed(5)
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                                     "conv1"])
    pipe.unet.add_adapter(cfg, adapter_name="u")
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.mul_(3.0)
    sd = get_peft_model_state_dict(pipe.unet, adapter_name="u")
    du = os.path.join(OUT, "u")
    os.makedirs(du)
    StableDiffusionXLPipeline.save_lora_weights(du, unet_lora_layers=sd,
                                                unet_lora_adapter_metadata=pipe.unet.peft_config["u"].to_dict())
    pipe = pipeline()
    imgs["base"] = image(pipe)
    pipe.load_lora_weights(du, adapter_name="u")
    imgs["u"] = image(pipe)
    pipe.set_adapters(["u"], adapter_weights=[0.7])
    imgs["u0.7"] = image(pipe)
    for k in ("u", "u0.7"):
        d = int(np.abs(imgs[k].astype(int) - imgs["base"].astype(int)).max())
        assert d > 5, (k, d)
        cases.append(dict(id=k, max_diff_to_base=d))

    # t: both text encoders, by hand
    pipe = pipeline()
    torch.manual_seed(6)
    tensors, kohya, r, alpha = {}, {}, 2, 4.0
    plan = [("text_encoder", "lora_te1_", pipe.text_encoder,
             ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"]),
            ("text_encoder_2", "lora_te2_", pipe.text_encoder_2,
             ["text_model.encoder.layers.0.self_attn.v_proj", "text_model.encoder.layers.2.self_attn.out_proj",
              "text_model.encoder.layers.1.mlp.fc2"])]
    meta = {}
    with torch.no_grad():
        for comp, kpre, enc, mods in plan:
            named = dict(enc.named_modules())
            for m in mods:
                lin = named[m] if m in named else named[m[len("text_model."):]]
                A = torch.randn(r, lin.in_features) * 0.5
                B = torch.randn(lin.out_features, r) * 0.5
                tensors[f"{comp}.{m}.lora_A.weight"] = A.numpy()
                tensors[f"{comp}.{m}.lora_B.weight"] = B.numpy()
                flat = kpre + m.replace(".", "_")
                kohya[f"{flat}.lora_down.weight"] = A.numpy()
                kohya[f"{flat}.lora_up.weight"] = B.numpy()
                kohya[f"{flat}.alpha"] = np.array(alpha, dtype=np.float32)
                lin.weight += (alpha / r) * (B @ A)
            meta.update({f"{comp}.r": r, f"{comp}.lora_alpha": alpha, f"{comp}.use_rslora": False,
                         f"{comp}.rank_pattern": {}, f"{comp}.alpha_pattern": {}})
    dt = os.path.join(OUT, "t")
    os.makedirs(dt)
    save_file(tensors, os.path.join(dt, "pytorch_lora_weights.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    save_file(kohya, os.path.join(OUT, "t-kohya.safetensors"))
    imgs["t"] = image(pipe)
    d = int(np.abs(imgs["t"].astype(int) - imgs["base"].astype(int)).max())
    assert d > 5, d
    cases.append(dict(id="t", max_diff_to_base=d))
    save_file(imgs, os.path.join(OUT, "images.safetensors"))
    json.dump({"generator": "tests/reference/make_sdxl_lora_fixtures.py", "torch": torch.__version__,
               "model": "pipelines/tiny-sdxl", "generate": GEN, "seed": SEED, "cases": cases},
              open(os.path.join(OUT, "cases.json"), "w"), indent=1)
    print("SDXL LoRA fixtures:", cases)


if __name__ == "__main__":
    main()
