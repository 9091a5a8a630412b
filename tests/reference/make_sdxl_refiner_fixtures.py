#!/usr/bin/env python3
"""A tiny SDXL refiner and diffusers' images from it (tests/core/test-sdxl.c
"/sdxl/refiner"): tests/fixtures/pipelines/tiny-sdxl-refiner is
StableDiffusionXLImg2ImgPipeline.save_pretrained of tiny-sdxl's
text_encoder_2 / tokenizer_2 / VAE / scheduler with a UNet whose cross
attention takes text_encoder_2's features alone and whose time ids end with
an aesthetic score (5 ids: requires_aesthetics_score true, as
stabilityai/stable-diffusion-xl-refiner-1.0; force_zeros_for_empty_prompt
false); text_encoder / tokenizer are [null, null].  Images: img2img of
tiny-sdxl's 32x32 input at two strengths, default and custom aesthetic
scores.

Run from the repository root, after make_sdxl_fixtures.py:
  python3 tests/reference/make_sdxl_refiner_fixtures.py
"""
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file

from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
BASE = os.path.join(FIX, "pipelines", "tiny-sdxl")
MODEL = os.path.join(FIX, "pipelines", "tiny-sdxl-refiner")
OUT = os.path.join(FIX, "sdxl")
CASES = [dict(id="refiner-0.3", prompt="a red circle", guidance=5.0, steps=5, strength=0.3, seed=3),
         dict(id="refiner-0.6", prompt="a red circle", negative_prompt="dark", guidance=6.0, steps=5, strength=0.6,
              seed=4, aesthetic_score=7.5, negative_aesthetic_score=1.5)]


def main():
    if os.path.exists(MODEL):
        shutil.rmtree(MODEL)
    base = StableDiffusionXLPipeline.from_pretrained(BASE)
    torch.manual_seed(99)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=40, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=5 * 8 + 24).eval()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            p.copy_(torch.randn(p.shape) * 0.15 if p.ndim >= 2 else
                    torch.randn(p.shape) * 0.05 + (1.0 if name.endswith("weight") else 0.0))
    ref = StableDiffusionXLImg2ImgPipeline(vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2,
                                           tokenizer=None, tokenizer_2=base.tokenizer_2, unet=unet,
                                           scheduler=base.scheduler, requires_aesthetics_score=True,
                                           force_zeros_for_empty_prompt=False)
    ref.save_pretrained(MODEL)
    # the tokenizer files as tiny-sdxl has them (vocab.json + merges.txt)
    shutil.rmtree(os.path.join(MODEL, "tokenizer_2"))
    shutil.copytree(os.path.join(BASE, "tokenizer_2"), os.path.join(MODEL, "tokenizer_2"))
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder is None and pipe.config.requires_aesthetics_score
    images = load_file(os.path.join(OUT, "images.safetensors"))
    init = images["i2i-input"]
    for c in CASES:
        kw = dict(prompt=c["prompt"], image=Image.fromarray(init), strength=c["strength"],
                  guidance_scale=c["guidance"], num_inference_steps=c["steps"],
                  generator=torch.Generator("cpu").manual_seed(c["seed"]), output_type="np")
        for k in ("negative_prompt", "aesthetic_score", "negative_aesthetic_score"):
            if k in c:
                kw[k] = c[k]
        img = pipe(**kw).images[0]
        images[c["id"]] = np.ascontiguousarray(np.round(img * 255).astype(np.uint8))
    save_file(images, os.path.join(OUT, "images.safetensors"))
    cases = json.load(open(os.path.join(OUT, "cases.json")))
    cases["refiner"] = CASES
    json.dump(cases, open(os.path.join(OUT, "cases.json"), "w"), indent=1)
    print("SDXL refiner fixtures:", [c["id"] for c in CASES])


if __name__ == "__main__":
    main()
