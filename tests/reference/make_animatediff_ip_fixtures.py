#!/usr/bin/env python3
"""Reference frames for IP-Adapter on AnimateDiff (tests/core/test-animate.c,
"/animate/ip-adapter"): the tiny AnimateDiff pipeline (tiny-sd +
animatediff/a, DDIM with the seed's linear overrides) with the tiny
IP-Adapter of tests/fixtures/ip-adapter loaded as the "Load pipelines" guide
does — pipe_animate.load_ip_adapter (dir, subfolder="models", weight_name=...)
and ip_adapter_image= — at two scales with classifier-free guidance and one
without.  The IP-Adapter's to_k_ip / to_v_ip pairs go to the UNetMotionModel's
cross-attention layers (not the motion modules) in attn_processors order;
the script checks that order is the 2-D UNet's (down, up, mid).  Last, the
guide's whole AnimateDiff example: the IP-Adapter together with a motion
LoRA (tests/fixtures/animatediff/lora, loaded with load_lora_weights and
set_adapters ("m", adapter_weights=0.75)).

Run from the repository root, after make_ip_adapter_fixtures.py and
make_animatediff_lora_fixtures.py; loading a LoRA needs peft (see
make_lora_fixtures.py):
  PYTHONPATH=/tmp/peftlib python3 tests/reference/make_animatediff_ip_fixtures.py
"""
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, StableDiffusionPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
OUT = os.path.join(FIX, "animatediff", "ip-adapter")
SD = os.path.join(FIX, "pipelines", "tiny-sd")
IP = os.path.join(FIX, "ip-adapter")
WEIGHT = "ip-adapter_tiny.safetensors"
DDIM_LINEAR = dict(clip_sample=False, timestep_spacing="linspace", beta_schedule="linear", steps_offset=1)
GEN = dict(prompt="a red ball bouncing", num_frames=6, num_inference_steps=3, width=32, height=32)
CASES = [
    dict(id="cfg-s0.6", scale=0.6, guidance=7.5, seed=33),
    dict(id="cfg-s1", scale=1.0, guidance=7.5, seed=5),
    dict(id="nocfg-s1", scale=1.0, guidance=1.0, seed=9),
]


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    sd = StableDiffusionPipeline.from_pretrained(SD)
    ad = MotionAdapter.from_pretrained(os.path.join(FIX, "animatediff", "a"))
    pipe = AnimateDiffPipeline.from_pipe(sd, motion_adapter=ad)
    pipe.scheduler = DDIMScheduler.from_config(sd.scheduler.config, **DDIM_LINEAR)
    pipe.set_progress_bar_config(disable=True)

    # the cross-attention layers of the motion model, in attn_processors order,
    # are the 2-D UNet's in its order
    two_d = [n for n in sd.unet.attn_processors if n.endswith("attn2.processor")]
    motion = [n for n in pipe.unet.attn_processors if n.endswith("attn2.processor") and "motion_modules" not in n]
    assert two_d == motion, (two_d, motion)

    img = np.asarray(Image.open(os.path.join(IP, "input.png")).convert("RGB"))
    base = {}
    for c in CASES:
        out = pipe(**GEN, guidance_scale=c["guidance"], generator=torch.Generator("cpu").manual_seed(c["seed"]),
                   output_type="np").frames[0]
        base[c["id"]] = np.round(out * 255).astype(np.uint8)
    pipe.load_ip_adapter(IP, subfolder="models", weight_name=WEIGHT)
    frames = {}
    for c in CASES:
        pipe.set_ip_adapter_scale(c["scale"])
        out = pipe(**GEN, guidance_scale=c["guidance"], ip_adapter_image=Image.fromarray(img),
                   generator=torch.Generator("cpu").manual_seed(c["seed"]), output_type="np").frames[0]
        u8 = np.ascontiguousarray(np.round(out * 255).astype(np.uint8))
        frames[c["id"]] = torch.from_numpy(u8)
        c["max_diff_to_plain"] = int(np.abs(u8.astype(int) - base[c["id"]].astype(int)).max())
        assert c["max_diff_to_plain"] > 3, c
    # the guide's example: IP-Adapter (scale 0.6) + motion LoRA at 0.75, CFG
    pipe.set_ip_adapter_scale(0.6)
    pipe.load_lora_weights(os.path.join(FIX, "animatediff", "lora"), adapter_name="m")
    pipe.set_adapters("m", adapter_weights=0.75)
    lora_case = dict(id="cfg-s0.6-lora0.75", scale=0.6, guidance=7.5, seed=33, lora="m", lora_weight=0.75)
    out = pipe(**GEN, guidance_scale=lora_case["guidance"], ip_adapter_image=Image.fromarray(img),
               generator=torch.Generator("cpu").manual_seed(lora_case["seed"]), output_type="np").frames[0]
    u8 = np.ascontiguousarray(np.round(out * 255).astype(np.uint8))
    frames[lora_case["id"]] = torch.from_numpy(u8)
    lora_case["max_diff_to_ip_only"] = int(np.abs(u8.astype(int) - frames["cfg-s0.6"].numpy().astype(int)).max())
    assert lora_case["max_diff_to_ip_only"] > 3, lora_case
    save_file(frames, os.path.join(OUT, "frames.safetensors"))
    json.dump({"generator": "tests/reference/make_animatediff_ip_fixtures.py", "torch": torch.__version__,
               "adapter": "animatediff/a", "ip_adapter": "ip-adapter (subfolder models)", "weight_name": WEIGHT,
               "scheduler": "DDIMScheduler", "scheduler_overrides": DDIM_LINEAR, "generate": GEN, "cases": CASES,
               "with_lora": lora_case},
              open(os.path.join(OUT, "case.json"), "w"), indent=1)
    print("AnimateDiff IP-Adapter fixtures:", [(c["id"], c["max_diff_to_plain"]) for c in CASES],
          "with the LoRA:", lora_case["max_diff_to_ip_only"])


if __name__ == "__main__":
    main()
