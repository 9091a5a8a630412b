#!/usr/bin/env python3
"""Reference images for self-attention guidance with an IP-Adapter
(tests/core/test-sag.c, "/sag/ip-adapter"), the guide's from_pipe example:
the IP-Adapter loaded on the Stable Diffusion pipeline (the tiny one of
tests/fixtures/ip-adapter), then StableDiffusionSAGPipeline.from_pipe (pipe)
called with ip_adapter_image=, without classifier-free guidance
(guidance_scale 1.0, sag_scale 0.75, as the guide: the degraded pass gets the
image's embeddings) and with it (the degraded pass gets the unconditional
ones).

With CFG, diffusers 0.42's (deprecated) StableDiffusionSAGPipeline passes
only the positive image embeddings to the batched [uncond, cond] UNet call;
IPAdapterAttnProcessor2_0 then views the image's 4 tokens as 2 per batch
entry (ip_key.view (batch_size, -1, heads, head_dim)).  Every other diffusers
pipeline passes [negative (zeros), positive].  The "cfg" reference is made
with that one thing corrected (the UNet call given [zeros, positive]); how
far the uncorrected image is from it is recorded as
"max_diff_uncorrected".

Run from the repository root, after make_ip_adapter_fixtures.py:
  python3 tests/reference/make_sag_ip_fixtures.py
"""
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file

from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionSAGPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
OUT = os.path.join(FIX, "sag", "ip-adapter")
IP = os.path.join(FIX, "ip-adapter")
WEIGHT = "ip-adapter_tiny.safetensors"
CASES = [
    dict(id="nocfg", guidance=1.0, sag_scale=0.75, ip_scale=0.6, seed=33),
    dict(id="cfg", guidance=7.5, sag_scale=1.0, ip_scale=1.0, seed=5),
]
GEN = dict(prompt="bear eats pizza", negative_prompt="dark, low quality", num_inference_steps=4, width=32,
           height=32)


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(FIX, "pipelines", "tiny-sd"))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(IP, subfolder="models", weight_name=WEIGHT)
    sag = StableDiffusionSAGPipeline.from_pipe(pipe)
    sag.set_progress_bar_config(disable=True)
    img = Image.open(os.path.join(IP, "input.png")).convert("RGB")
    unet_forward = sag.unet.forward

    def corrected(sample, t, *args, added_cond_kwargs=None, **kw):
        if added_cond_kwargs and "image_embeds" in added_cond_kwargs:
            ie = added_cond_kwargs["image_embeds"]
            if ie[0].shape[0] * 2 == sample.shape[0]:
                added_cond_kwargs = dict(added_cond_kwargs,
                                         image_embeds=[torch.cat([torch.zeros_like(x), x]) for x in ie])
        return unet_forward(sample, t, *args, added_cond_kwargs=added_cond_kwargs, **kw)

    out = {}
    for c in CASES:
        pipe.set_ip_adapter_scale(c["ip_scale"])
        run = lambda: sag(**GEN, guidance_scale=c["guidance"], sag_scale=c["sag_scale"], ip_adapter_image=img,
                          generator=torch.Generator("cpu").manual_seed(c["seed"]), output_type="np").images[0]
        raw = run()
        sag.unet.forward = corrected
        a = run()
        sag.unet.forward = unet_forward
        c["max_diff_uncorrected"] = int(np.abs(np.round(a * 255) - np.round(raw * 255)).max())
        assert c["guidance"] > 1.0 or c["max_diff_uncorrected"] == 0, c
        b = pipe(**GEN, guidance_scale=c["guidance"], ip_adapter_image=img,
                 generator=torch.Generator("cpu").manual_seed(c["seed"]), output_type="np").images[0]
        out[c["id"]] = np.ascontiguousarray(np.round(a * 255).astype(np.uint8))
        c["max_diff_to_no_sag"] = int(np.abs(np.round(a * 255) - np.round(b * 255)).max())
        assert c["max_diff_to_no_sag"] > 2, c
    save_file(out, os.path.join(OUT, "images.safetensors"))
    json.dump({"generator": "tests/reference/make_sag_ip_fixtures.py", "torch": torch.__version__,
               "model": "pipelines/tiny-sd", "scheduler": "DDIMScheduler", "weight_name": WEIGHT, "generate": GEN,
               "cases": CASES}, open(os.path.join(OUT, "cases.json"), "w"), indent=1)
    print("SAG + IP-Adapter fixtures:", [(c["id"], c["max_diff_to_no_sag"], c["max_diff_uncorrected"]) for c in CASES])


if __name__ == "__main__":
    main()
