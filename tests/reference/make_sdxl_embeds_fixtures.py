#!/usr/bin/env python3
"""Stable Diffusion XL with prompt_embeds / pooled_prompt_embeds given by the
caller (tests/core/test-sdxl.c "/sdxl/prompt-embeds"): diffusers'
encode_prompt of a prompt and a negative prompt on tiny-sdxl, then weighted
as prompt-weighting tools do (prompt_embeds x 1.2, pooled x 0.8), and the
image StableDiffusionXLPipeline makes from those four tensors; all saved in
tests/fixtures/sdxl/embeds.safetensors.

Run from the repository root, after make_sdxl_fixtures.py:
  python3 tests/reference/make_sdxl_embeds_fixtures.py
"""
import os

import numpy as np
import torch
from safetensors.torch import save_file

from diffusers import StableDiffusionXLPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
MODEL = os.path.join(FIX, "pipelines", "tiny-sdxl")


def main():
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    pe, ne, pp, npool = pipe.encode_prompt("a red circle", device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=True, negative_prompt="blurry, dark")
    pe, pp = pe * 1.2, pp * 0.8
    img = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pp, negative_pooled_prompt_embeds=npool,
               guidance_scale=6.0, num_inference_steps=3, width=32, height=32,
               generator=torch.Generator("cpu").manual_seed(4), output_type="np").images[0]
    u8 = torch.from_numpy(np.ascontiguousarray(np.round(img * 255).astype(np.uint8)))
    save_file({"prompt_embeds": pe.contiguous(), "negative_prompt_embeds": ne.contiguous(),
               "pooled_prompt_embeds": pp.contiguous(), "negative_pooled_prompt_embeds": npool.contiguous(),
               "image": u8}, os.path.join(FIX, "sdxl", "embeds.safetensors"),
              metadata={"generator": "tests/reference/make_sdxl_embeds_fixtures.py", "guidance": "6.0", "steps": "3",
                        "seed": "4", "size": "32x32"})
    print("SDXL embeds fixture:", tuple(pe.shape), tuple(pp.shape))


if __name__ == "__main__":
    main()
