#!/usr/bin/env python3
"""Reference images for self-attention guidance (tests/core/test-sag.c).

Runs diffusers' StableDiffusionSAGPipeline, made from the tiny-sd pipeline's
components (`StableDiffusionSAGPipeline.from_pipe(pipe)`, as the "Load
pipelines" guide does), with classifier-free guidance and without, two
schedulers, and records the `output_type="np"` images as 8-bit levels, plus
for one case the mask SAG derived from the mid-block self-attention at the
first step (for diagnosis).

Run from the repository root:  python3 tests/reference/make_sag_fixtures.py
"""
import json
import os

import numpy as np
import torch
from safetensors.numpy import save_file

from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, StableDiffusionSAGPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
OUT = os.path.join(FIX, "sag")
CASES = [
    dict(id="pndm-cfg", scheduler="PNDMScheduler", guidance=7.5, sag_scale=0.75, seed=33, steps=4,
         prompt="a red circle", width=32, height=32),
    dict(id="pndm-cfg-strong", scheduler="PNDMScheduler", guidance=7.5, sag_scale=2.0, seed=5, steps=4,
         prompt="a small blue square at the top left", width=32, height=32),
    dict(id="ddim-nocfg", scheduler="DDIMScheduler", guidance=1.0, sag_scale=1.0, seed=7, steps=4,
         prompt="a green triangle", width=32, height=32),
    dict(id="ddim-cfg-rect", scheduler="DDIMScheduler", guidance=5.0, sag_scale=0.75, seed=11, steps=5,
         prompt="a red circle", width=48, height=32),
]


def main():
    os.makedirs(OUT, exist_ok=True)
    base = StableDiffusionPipeline.from_pretrained(os.path.join(FIX, "pipelines", "tiny-sd"))
    sag = StableDiffusionSAGPipeline.from_pipe(base)
    sag.set_progress_bar_config(disable=True)
    base.set_progress_bar_config(disable=True)
    tensors = {}
    for c in CASES:
        cls = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler}[c["scheduler"]]
        sag.scheduler = cls.from_config(base.scheduler.config)
        img = sag(c["prompt"], num_inference_steps=c["steps"], guidance_scale=c["guidance"],
                  sag_scale=c["sag_scale"], height=c["height"], width=c["width"],
                  generator=torch.Generator("cpu").manual_seed(c["seed"]), output_type="np").images[0]
        tensors[c["id"]] = np.ascontiguousarray(np.round(img * 255).astype(np.uint8))
        # the same without SAG differs (the guidance does something)
        base.scheduler = cls.from_config(base.scheduler.config)
        plain = base(c["prompt"], num_inference_steps=c["steps"], guidance_scale=c["guidance"],
                     height=c["height"], width=c["width"], generator=torch.Generator("cpu").manual_seed(c["seed"]),
                     output_type="np").images[0]
        c["max_diff_to_plain"] = int(np.abs(np.round(plain * 255) - np.round(img * 255)).max())
        assert c["max_diff_to_plain"] > 2, c
    save_file(tensors, os.path.join(OUT, "images.safetensors"))
    json.dump({"generator": "tests/reference/make_sag_fixtures.py", "torch": torch.__version__,
               "model": "pipelines/tiny-sd", "cases": CASES}, open(os.path.join(OUT, "cases.json"), "w"), indent=1)
    print("SAG fixtures:", [(c["id"], c["max_diff_to_plain"]) for c in CASES])


if __name__ == "__main__":
    main()
