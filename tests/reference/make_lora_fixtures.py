#!/usr/bin/env python3
"""Reference images for LoRA adapters (tests/core/test-lora.c).

Makes two LoRA adapters for the tiny-sd UNet with peft, saved as diffusers
saves them (StableDiffusionPipeline.save_lora_weights: peft key names
"unet.<module>.lora_A.weight" / "lora_B.weight", the LoraConfig in the
"lora_adapter_metadata" header entry), and records diffusers' images after
pipe.load_lora_weights / set_adapters / unload_lora_weights:

  a: r 4, lora_alpha 8 on to_q, to_k, to_v, to_out.0 and proj_in (a 1x1 conv)
  b: r 2, lora_alpha 3 on ff.net.0.proj, ff.net.2 and the resnets' conv1 (3x3
     convs), alpha_pattern {"conv1": 1.0} (those modules scale by 1 / 2)

peft is needed (not a project dependency; transformers 5 wants peft >= 0.22
for text encoders, so the adapters are UNet-only):
  pip install --no-deps --target /tmp/peftlib peft==0.21.2
  PYTHONPATH=/tmp/peftlib python3 tests/reference/make_lora_fixtures.py
"""
import json
import os
import shutil

import numpy as np
import torch
from safetensors.numpy import save_file

from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
OUT = os.path.join(FIX, "lora")
MODEL = os.path.join(FIX, "pipelines", "tiny-sd")
GEN = dict(prompt="a red circle", num_inference_steps=3, height=32, width=32, guidance_scale=7.5)
SEED = 21


def make_adapter(name, cfg, seed):
    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(cfg, adapter_name=name)
    with torch.no_grad():   # init_lora_weights=False already random; make the effect clearly visible
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.mul_(3.0)
    sd = get_peft_model_state_dict(pipe.unet, adapter_name=name)
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(d, unet_lora_layers=sd,
                                              unet_lora_adapter_metadata=pipe.unet.peft_config[name].to_dict())
    return d


def image(pipe):
    img = pipe(**GEN, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images[0]
    return np.ascontiguousarray(np.round(img * 255).astype(np.uint8))


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    da = make_adapter("a", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                      target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"]), 1)
    db = make_adapter("b", LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, alpha_pattern={"conv1": 1.0},
                                      target_modules=["ff.net.0.proj", "ff.net.2", "conv1"]), 2)
    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    imgs, cases = {}, []
    imgs["base"] = image(pipe)
    pipe.load_lora_weights(da, adapter_name="a")
    imgs["a"] = image(pipe)
    cases.append(dict(id="a", step="load a", active=pipe.get_active_adapters()))
    # the per-call scale: pipe (..., cross_attention_kwargs={"scale": 0.5}) scales every active adapter
    img = pipe(**GEN, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
               cross_attention_kwargs={"scale": 0.5}).images[0]
    imgs["a-scale0.5"] = np.ascontiguousarray(np.round(img * 255).astype(np.uint8))
    cases.append(dict(id="a-scale0.5", step="a with cross_attention_kwargs={'scale': 0.5}", active=["a"]))
    pipe.load_lora_weights(db, adapter_name="b")
    imgs["b"] = image(pipe)
    cases.append(dict(id="b", step="load b (only b active)", active=pipe.get_active_adapters()))
    pipe.set_adapters(["a", "b"], adapter_weights=[0.6, 1.5])
    imgs["ab"] = image(pipe)
    cases.append(dict(id="ab", step="set_adapters([a, b], [0.6, 1.5])", active=pipe.get_active_adapters()))
    pipe.unload_lora_weights()
    imgs["unloaded"] = image(pipe)
    assert np.array_equal(imgs["unloaded"], imgs["base"])
    for k in ("a", "b", "ab"):
        d = int(np.abs(imgs[k].astype(int) - imgs["base"].astype(int)).max())
        assert d > 5, (k, d)
        cases[[c["id"] for c in cases].index(k)]["max_diff_to_base"] = d
    # t: a text-encoder adapter.  transformers 5 wants peft >= 0.22 to load one, which this
    # machine cannot install, so the file is written by hand in the same format (peft names +
    # "lora_adapter_metadata") and the expected image comes from the text encoder with
    # W + lora_alpha / r * B A put in its weights: what peft's LoRA layer computes.
    torch.manual_seed(3)
    te_mods = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.v_proj",
               "text_model.encoder.layers.1.mlp.fc1"]
    tensors, r, alpha = {}, 2, 4.0
    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    # (the names real files carry, from transformers 4's CLIPTextModel; transformers 5's modules
    # drop "text_model.", and the tiny model's file has none either: both must be read)
    named = dict(pipe.text_encoder.named_modules())
    with torch.no_grad():
        for m in te_mods:
            lin = named[m] if m in named else named[m[len("text_model."):]]
            A = torch.randn(r, lin.in_features) * 0.5
            B = torch.randn(lin.out_features, r) * 0.5
            tensors[f"text_encoder.{m}.lora_A.weight"] = A.numpy()
            tensors[f"text_encoder.{m}.lora_B.weight"] = B.numpy()
            lin.weight += (alpha / r) * (B @ A)
    dt = os.path.join(OUT, "t")
    os.makedirs(dt)
    meta = {"text_encoder.r": r, "text_encoder.lora_alpha": alpha, "text_encoder.use_rslora": False,
            "text_encoder.rank_pattern": {}, "text_encoder.alpha_pattern": {}}
    save_file(tensors, os.path.join(dt, "pytorch_lora_weights.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    imgs["t"] = image(pipe)
    d = int(np.abs(imgs["t"].astype(int) - imgs["base"].astype(int)).max())
    assert d > 5, d
    cases.append(dict(id="t", step="text-encoder adapter t (written by hand, W + alpha/r B A)", active=["t"],
                      max_diff_to_base=d))
    # the same adapters in kohya-ss' format (the names most community files carry):
    # "lora_unet_<module with _>.lora_down.weight" / "lora_up.weight" / ".alpha"
    from safetensors.numpy import load_file
    def to_kohya(src, dst, prefix, alphas):
        t = load_file(os.path.join(src, "pytorch_lora_weights.safetensors"))
        out = {}
        for k, v in t.items():
            comp, rest = k.split(".", 1)
            module, kind = rest.rsplit(".lora_", 1)
            flat = prefix[comp] + module.replace(".", "_")
            out[f"{flat}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = v
            out[f"{flat}.alpha"] = np.array(alphas(module), dtype=np.float32)
        save_file(out, dst)
    pre = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    to_kohya(da, os.path.join(OUT, "a-kohya.safetensors"), pre, lambda m: 8.0)
    to_kohya(dt, os.path.join(OUT, "t-kohya.safetensors"), pre, lambda m: 4.0)
    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(os.path.join(OUT, "a-kohya.safetensors"), adapter_name="k")
    imgs["a-kohya"] = image(pipe)   # diffusers' own conversion of the kohya names
    d = int(np.abs(imgs["a-kohya"].astype(int) - imgs["a"].astype(int)).max())
    assert d <= 1, d
    cases.append(dict(id="a-kohya", step="a in kohya-ss format (diffusers converts it)", active=["k"],
                      max_diff_to_a=d))
    save_file(imgs, os.path.join(OUT, "images.safetensors"))
    json.dump({"generator": "tests/reference/make_lora_fixtures.py", "torch": torch.__version__,
               "model": "pipelines/tiny-sd", "seed": SEED, "generate": GEN, "cases": cases},
              open(os.path.join(OUT, "cases.json"), "w"), indent=1)
    print("LoRA fixtures:", cases)


if __name__ == "__main__":
    main()
