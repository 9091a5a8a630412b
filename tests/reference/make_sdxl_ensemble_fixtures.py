#!/usr/bin/env python3
"""SDXL's ensemble of experts (tests/core/test-sdxl.c "/sdxl/ensemble"):
tiny-sdxl with denoising_end=0.8 and output_type="latent", then
tiny-sdxl-refiner (StableDiffusionXLImg2ImgPipeline) with image=those
latents and denoising_start=0.8, as diffusers' SDXL guide does; the base's
latents and the refiner's image, Euler and Heun (a 2nd-order scheduler:
the +1 step rule), in tests/fixtures/sdxl/ensemble.safetensors.

Run from the repository root, after make_sdxl_fixtures.py and
make_sdxl_refiner_fixtures.py:  python3 tests/reference/make_sdxl_ensemble_fixtures.py
"""
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file

from diffusers import HeunDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
CASES = [dict(id="euler", scheduler=None, steps=10, seed=8), dict(id="heun", scheduler="HeunDiscreteScheduler",
                                                                     steps=6, seed=9)]
GEN = dict(prompt="a red circle", negative_prompt="dark", guidance_scale=5.0, width=32, height=32)
SPLIT = 0.8


def main():
    base = StableDiffusionXLPipeline.from_pretrained(os.path.join(FIX, "pipelines", "tiny-sdxl"))
    ref = StableDiffusionXLImg2ImgPipeline.from_pretrained(os.path.join(FIX, "pipelines", "tiny-sdxl-refiner"))
    for p in (base, ref):
        p.set_progress_bar_config(disable=True)
    euler_b, euler_r = base.scheduler, ref.scheduler
    out = {}
    for c in CASES:
        if c["scheduler"]:
            base.scheduler = HeunDiscreteScheduler.from_config(euler_b.config)
            ref.scheduler = HeunDiscreteScheduler.from_config(euler_r.config)
        else:
            base.scheduler, ref.scheduler = euler_b, euler_r
        lat = base(**GEN, num_inference_steps=c["steps"], denoising_end=SPLIT, output_type="latent",
                   generator=torch.Generator("cpu").manual_seed(c["seed"])).images
        img = ref(**GEN, num_inference_steps=c["steps"], denoising_start=SPLIT, image=lat,
                  generator=torch.Generator("cpu").manual_seed(c["seed"] + 100), output_type="np").images[0]
        out[c["id"] + ".latents"] = lat.contiguous()
        out[c["id"] + ".image"] = torch.from_numpy(np.ascontiguousarray(np.round(img * 255).astype(np.uint8)))
    save_file(out, os.path.join(FIX, "sdxl", "ensemble.safetensors"),
              metadata={"generator": "tests/reference/make_sdxl_ensemble_fixtures.py", "split": str(SPLIT),
                        "cases": json.dumps(CASES), "generate": json.dumps(GEN)})
    print("SDXL ensemble fixtures:", list(out))


if __name__ == "__main__":
    main()
