#!/usr/bin/env python3
"""Reference images for an IP-Adapter on Stable Diffusion XL
(tests/core/test-sdxl.c "/sdxl/ip-adapter"): a tiny IP-Adapter for
tests/fixtures/pipelines/tiny-sdxl in h94/IP-Adapter's sdxl_models layout
(image_encoder/ + ip-adapter_tiny_sdxl.safetensors: "image_proj.proj/norm",
one to_k_ip / to_v_ip pair per cross-attention layer in attn_processors
order), loaded with pipe.load_ip_adapter (dir, subfolder="sdxl_models", ...)
and run with ip_adapter_image= at two scales.

Run from the repository root, after make_sdxl_fixtures.py and
make_ip_adapter_fixtures.py:  python3 tests/reference/make_sdxl_ip_fixtures.py
"""
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file as save_np
from safetensors.torch import save_file

from diffusers import StableDiffusionXLPipeline
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
MODEL = os.path.join(FIX, "pipelines", "tiny-sdxl")
OUT = os.path.join(FIX, "sdxl", "ip-adapter")
WEIGHT = "ip-adapter_tiny_sdxl.safetensors"
GEN = dict(prompt="bear eats pizza", num_inference_steps=3, height=32, width=32)
CASES = [dict(id="cfg-s0.6", scale=0.6, guidance=5.0, seed=33), dict(id="nocfg-s1", scale=1.0, guidance=1.0, seed=9)]


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(os.path.join(OUT, "sdxl_models"))
    torch.manual_seed(12)
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=20, hidden_act="gelu")).eval()
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3)
            elif "bias" in name or "embedding" in name:
                p.normal_(0.0, 0.02)
    enc.save_pretrained(os.path.join(OUT, "sdxl_models", "image_encoder"))
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    cross = pipe.unet.config.cross_attention_dim
    sd = {"image_proj.proj.weight": torch.randn(4 * cross, 20) * 0.3,
          "image_proj.proj.bias": torch.randn(4 * cross) * 0.1,
          "image_proj.norm.weight": 1.0 + 0.1 * torch.randn(cross),
          "image_proj.norm.bias": 0.1 * torch.randn(cross)}
    key_id = 1
    for name in pipe.unet.attn_processors:
        if not name.endswith("attn2.processor"):
            continue
        inner = pipe.unet.get_submodule(name[:-len(".processor")]).to_k.out_features
        sd[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn(inner, cross) * 0.5
        sd[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn(inner, cross) * 0.5
        key_id += 2
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(OUT, "sdxl_models", WEIGHT))
    img = Image.open(os.path.join(FIX, "ip-adapter", "input.png")).convert("RGB")
    base = {c["id"]: pipe(**GEN, guidance_scale=c["guidance"], generator=torch.Generator("cpu").manual_seed(c["seed"]),
                          output_type="np").images[0] for c in CASES}
    pipe.load_ip_adapter(OUT, subfolder="sdxl_models", weight_name=WEIGHT)
    out = {}
    for c in CASES:
        pipe.set_ip_adapter_scale(c["scale"])
        a = pipe(**GEN, guidance_scale=c["guidance"], ip_adapter_image=img,
                 generator=torch.Generator("cpu").manual_seed(c["seed"]), output_type="np").images[0]
        out[c["id"]] = np.ascontiguousarray(np.round(a * 255).astype(np.uint8))
        c["max_diff_to_plain"] = int(np.abs(np.round(a * 255) - np.round(base[c["id"]] * 255)).max())
        assert c["max_diff_to_plain"] > 3, c
    save_np(out, os.path.join(OUT, "images.safetensors"))
    json.dump({"generator": "tests/reference/make_sdxl_ip_fixtures.py", "torch": torch.__version__,
               "model": "pipelines/tiny-sdxl", "weight_name": WEIGHT, "generate": GEN, "cases": CASES},
              open(os.path.join(OUT, "cases.json"), "w"), indent=1)
    print("SDXL IP-Adapter fixtures:", [(c["id"], c["max_diff_to_plain"]) for c in CASES])


if __name__ == "__main__":
    main()
