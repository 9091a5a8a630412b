#!/usr/bin/env python3
"""Reference images of fp16 pipelines (tests/core/test-sd-f16.c).

diffusers loaded with torch_dtype=torch.float16 draws every noise in float16
(randn_tensor (..., dtype=prompt_embeds.dtype) on the CPU generator), which is
another stream than float32's, and runs the models in float16.  These cases
record what diffusers makes on the CPU in float16 from
tests/fixtures/pipelines/tiny-sd, so the C pipeline loaded with dtype f16 can
be compared with it:

  A-f16-pndm     text2img, the checkpoint's PNDM, 4 steps, CFG 7.5
  A-f16-euler-a  text2img, EulerAncestral (f16 noise at every step)
  A-f16-i2i      img2img strength 0.8 with DDIM (the VAE posterior sample and
                 the add_noise noise are f16 draws too)

8-bit images (round(x * 255)) in images.safetensors, parameters in cases.json.
Run from the repository root:  python3 tests/reference/make_sd_f16_fixtures.py
"""
import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file

from diffusers import (DDIMScheduler, EulerAncestralDiscreteScheduler, PNDMScheduler, StableDiffusionImg2ImgPipeline,
                       StableDiffusionPipeline)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
OUT = os.path.join(FIX, "sd-f16")


def to_u8(images):
    return np.ascontiguousarray(np.round(np.clip(images.astype(np.float32), 0, 1) * 255).astype(np.uint8))


def main():
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    model = os.path.join(FIX, "pipelines", "tiny-sd")
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    src = Image.open(os.path.join(FIX, "sd", "init.png")).convert("RGB")
    tensors, cases = {}, []
    common = dict(model=os.path.relpath(model, FIX), width=32, height=32, guidance=7.5, prompt="a red circle")
    for cid, cls, task, steps, seed in (("A-f16-pndm", PNDMScheduler, "text2img", 4, 33),
                                         ("A-f16-euler-a", EulerAncestralDiscreteScheduler, "text2img", 4, 11),
                                         ("A-f16-i2i", DDIMScheduler, "img2img", 5, 7)):
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
        i2i.scheduler = pipe.scheduler
        g = torch.Generator("cpu").manual_seed(seed)
        if task == "text2img":
            img = pipe(common["prompt"], num_inference_steps=steps, guidance_scale=7.5, height=32, width=32,
                       generator=g, output_type="np").images
        else:
            img = i2i(common["prompt"], image=src, strength=0.8, num_inference_steps=steps, guidance_scale=7.5,
                      generator=g, output_type="np").images
        assert np.isfinite(img).all(), cid
        tensors[cid] = to_u8(img)
        cases.append(dict(common, id=cid, scheduler=cls.__name__, task=task, steps=steps, seed=seed,
                          strength=0.8 if task == "img2img" else None, shape=list(img.shape)))
    save_file(tensors, os.path.join(OUT, "images.safetensors"))
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(dict(torch=torch.__version__, diffusers=__import__("diffusers").__version__, dtype="float16",
                       cases=cases), f, indent=1)
    print(f"{len(cases)} cases -> {OUT}")


if __name__ == "__main__":
    main()
