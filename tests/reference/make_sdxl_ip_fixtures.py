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
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file

from diffusers import StableDiffusionXLPipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_ip_adapter_fixtures import save_image_encoder, save_ip_weights  # noqa: E402

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
    save_image_encoder(os.path.join(OUT, "sdxl_models", "image_encoder"), 20, "gelu")
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    save_ip_weights(os.path.join(OUT, "sdxl_models", WEIGHT), pipe.unet, 20)
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
    save_file(out, os.path.join(OUT, "images.safetensors"))
    json.dump({"generator": "tests/reference/make_sdxl_ip_fixtures.py", "torch": torch.__version__,
               "model": "pipelines/tiny-sdxl", "weight_name": WEIGHT, "generate": GEN, "cases": CASES},
              open(os.path.join(OUT, "cases.json"), "w"), indent=1)
    print("SDXL IP-Adapter fixtures:", [(c["id"], c["max_diff_to_plain"]) for c in CASES])


if __name__ == "__main__":
    main()
