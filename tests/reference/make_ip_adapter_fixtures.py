#!/usr/bin/env python3
"""Reference images for IP-Adapter (tests/core/test-ip-adapter.c).

Makes a tiny IP-Adapter in h94/IP-Adapter's layout — models/image_encoder
(a CLIPVisionModelWithProjection) and models/ip-adapter_tiny.safetensors
("image_proj.proj.*", "image_proj.norm.*", "ip_adapter.<1,3,5..>.to_k_ip /
to_v_ip.weight", one pair per cross-attention layer in diffusers'
attn_processors order) — for the tiny-sd pipeline, and records diffusers'
images after pipe.load_ip_adapter (dir, subfolder="models", weight_name=...)
with an ip_adapter_image, at two set_ip_adapter_scale values, with and
without classifier-free guidance.

Run from the repository root:  python3 tests/reference/make_ip_adapter_fixtures.py
"""
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from diffusers import StableDiffusionPipeline
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
OUT = os.path.join(FIX, "ip-adapter")
MODEL = os.path.join(FIX, "pipelines", "tiny-sd")
WEIGHT = "ip-adapter_tiny.safetensors"
CASES = [
    dict(id="cfg-s1", scale=1.0, guidance=7.5, seed=5),
    dict(id="cfg-s0.5", scale=0.5, guidance=7.5, seed=5),
    dict(id="nocfg-s1", scale=1.0, guidance=1.0, seed=9),
]
GEN = dict(prompt="a red circle", num_inference_steps=3, height=32, width=32)


def save_image_encoder(path, projection_dim, hidden_act):
    """A tiny CLIPVisionModelWithProjection with visible random weights (the
    global torch generator; seed it first)."""
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=projection_dim, hidden_act=hidden_act)).eval()
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3)
            elif "bias" in name or "embedding" in name:
                p.normal_(0.0, 0.02)
    enc.save_pretrained(path)


def save_ip_weights(path, unet, projection_dim):
    """The original IP-Adapter's tensors for unet: image_proj (proj + norm into
    4 tokens) and one to_k_ip / to_v_ip pair per cross-attention layer, keyed
    1, 3, 5, ... in attn_processors order (the global torch generator)."""
    cross = unet.config.cross_attention_dim
    sd = {"image_proj.proj.weight": torch.randn(4 * cross, projection_dim) * 0.3,
          "image_proj.proj.bias": torch.randn(4 * cross) * 0.1,
          "image_proj.norm.weight": 1.0 + 0.1 * torch.randn(cross),
          "image_proj.norm.bias": 0.1 * torch.randn(cross)}
    key_id = 1
    for name in unet.attn_processors:
        if not name.endswith("attn2.processor"):
            continue
        inner = unet.get_submodule(name[:-len(".processor")]).to_k.out_features
        sd[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn(inner, cross) * 0.5
        sd[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn(inner, cross) * 0.5
        key_id += 2
    save_file({k: v.contiguous() for k, v in sd.items()}, path)


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(os.path.join(OUT, "models"))
    torch.manual_seed(11)
    save_image_encoder(os.path.join(OUT, "models", "image_encoder"), 24, "quick_gelu")

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    save_ip_weights(os.path.join(OUT, "models", WEIGHT), pipe.unet, 24)

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:40, 0:48]
    img = np.clip(np.stack([xx * 5, yy * 6, (xx + yy) * 3], -1) + rng.integers(-30, 31, (40, 48, 3)), 0, 255)
    img = img.astype(np.uint8)
    images = {"input": torch.from_numpy(img)}
    Image.fromarray(img).save(os.path.join(OUT, "input.png"))   # the same image as a file (the elements' test)

    base = {}
    for c in CASES:
        base[c["id"]] = pipe(**GEN, guidance_scale=c["guidance"],
                             generator=torch.Generator("cpu").manual_seed(c["seed"]), output_type="np").images[0]
    pipe.load_ip_adapter(OUT, subfolder="models", weight_name=WEIGHT)
    for c in CASES:
        pipe.set_ip_adapter_scale(c["scale"])
        out = pipe(**GEN, guidance_scale=c["guidance"], ip_adapter_image=Image.fromarray(img),
                   generator=torch.Generator("cpu").manual_seed(c["seed"]), output_type="np").images[0]
        u8 = np.ascontiguousarray(np.round(out * 255).astype(np.uint8))
        images[c["id"]] = torch.from_numpy(u8)
        c["max_diff_to_plain"] = int(np.abs(u8.astype(int) - np.round(base[c["id"]] * 255).astype(int)).max())
        assert c["max_diff_to_plain"] > 3, c
    save_file(images, os.path.join(OUT, "images.safetensors"))
    json.dump({"generator": "tests/reference/make_ip_adapter_fixtures.py", "torch": torch.__version__,
               "model": "pipelines/tiny-sd", "weight_name": WEIGHT, "generate": GEN, "cases": CASES},
              open(os.path.join(OUT, "cases.json"), "w"), indent=1)
    print("IP-Adapter fixtures:", [(c["id"], c["max_diff_to_plain"]) for c in CASES])


if __name__ == "__main__":
    main()
