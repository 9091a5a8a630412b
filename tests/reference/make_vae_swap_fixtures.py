#!/usr/bin/env python3
"""A VAE from another folder (tests/core/test-sd.c "/sd/vae-swap", the
elements' vae= property), as the guide's SDXL example does with
AutoencoderKL.from_pretrained ("madebyollin/sdxl-vae-fp16-fix"):
tests/fixtures/vae-swap/vae is an AutoencoderKL of tiny-sd's VAE architecture
with other random weights and force_upcast false, saved at the folder's root
(a component repo, no model_index.json); images.safetensors holds
StableDiffusionPipeline.from_pretrained (tiny-sd, vae=that VAE)'s image, and
the same with tiny-sd's own VAE (they must differ).

Run from the repository root:  python3 tests/reference/make_vae_swap_fixtures.py
"""
import json
import os
import shutil

import numpy as np
import torch
from safetensors.numpy import save_file

from diffusers import AutoencoderKL, StableDiffusionPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
SD = os.path.join(FIX, "pipelines", "tiny-sd")
OUT = os.path.join(FIX, "vae-swap")
CASE = dict(prompt="a red circle", guidance=7.5, steps=3, width=32, height=32, seed=21)


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    cfg = dict(AutoencoderKL.load_config(os.path.join(SD, "vae")))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["force_upcast"] = False
    torch.manual_seed(77)
    vae = AutoencoderKL(**cfg).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.ndim >= 2:
                p.mul_(1.3)
    vae.save_pretrained(os.path.join(OUT, "vae"))
    out = {}
    for key, v in (("own", None), ("swapped", AutoencoderKL.from_pretrained(os.path.join(OUT, "vae")))):
        pipe = StableDiffusionPipeline.from_pretrained(SD, **({"vae": v} if v is not None else {}))
        pipe.set_progress_bar_config(disable=True)
        img = pipe(CASE["prompt"], guidance_scale=CASE["guidance"], num_inference_steps=CASE["steps"],
                   width=CASE["width"], height=CASE["height"], generator=torch.Generator("cpu").manual_seed(CASE["seed"]),
                   output_type="np").images[0]
        out[key] = np.ascontiguousarray(np.round(img * 255).astype(np.uint8))
    d = int(np.abs(out["own"].astype(int) - out["swapped"].astype(int)).max())
    assert d > 5, d
    save_file(out, os.path.join(OUT, "images.safetensors"))
    json.dump({"generator": "tests/reference/make_vae_swap_fixtures.py", "torch": torch.__version__,
               "model": "pipelines/tiny-sd", "case": CASE, "max_diff_own_swapped": d},
              open(os.path.join(OUT, "case.json"), "w"), indent=1)
    print("VAE swap fixture: the other VAE moves the image", d, "levels")


if __name__ == "__main__":
    main()
