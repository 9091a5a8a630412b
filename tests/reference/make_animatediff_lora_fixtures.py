#!/usr/bin/env python3
"""Reference frames for LoRA on AnimateDiff (tests/core/test-animate.c,
"/animate/lora"): a LoRA adapter on the tiny AnimateDiff pipeline's
UNetMotionModel (to_q / to_v of the spatial and of the motion-module
attentions), saved as diffusers saves it (AnimateDiffPipeline.save_lora_weights:
"unet.down_blocks.0.attentions.0...", "unet.down_blocks.0.motion_modules.0...")
and loaded with pipe_animate.load_lora_weights, as the "Load pipelines"
guide does with a motion LoRA.

peft is needed (see make_lora_fixtures.py):
  PYTHONPATH=/tmp/peftlib python3 tests/reference/make_animatediff_lora_fixtures.py
"""
import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import save_file

from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
OUT = os.path.join(FIX, "animatediff", "lora")
SD = os.path.join(FIX, "pipelines", "tiny-sd")
DDIM_LINEAR = dict(clip_sample=False, timestep_spacing="linspace", beta_schedule="linear", steps_offset=1)
GEN = dict(prompt="a red ball bouncing", num_frames=8, num_inference_steps=4, guidance_scale=7.5, width=32,
           height=32)
SEED = 42


def pipeline():
    sd = StableDiffusionPipeline.from_pretrained(SD)
    ad = MotionAdapter.from_pretrained(os.path.join(FIX, "animatediff", "a"))
    pipe = AnimateDiffPipeline.from_pipe(sd, motion_adapter=ad)
    pipe.scheduler = DDIMScheduler.from_config(sd.scheduler.config, **DDIM_LINEAR)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def frames(pipe):
    out = pipe(**GEN, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").frames[0]
    return torch.from_numpy(np.ascontiguousarray(np.round(out * 255).astype(np.uint8)))


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    pipe = pipeline()
    torch.manual_seed(4)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_v"]),
                          adapter_name="m")
    sd = get_peft_model_state_dict(pipe.unet, adapter_name="m")
    assert any("motion_modules" in k for k in sd) and any("attentions" in k for k in sd)
    AnimateDiffPipeline.save_lora_weights(OUT, unet_lora_layers=sd,
                                          unet_lora_adapter_metadata=pipe.unet.peft_config["m"].to_dict())
    pipe = pipeline()
    base = frames(pipe)
    pipe.load_lora_weights(OUT, adapter_name="m")
    lora = frames(pipe)
    d = int((lora.int() - base.int()).abs().max())
    assert d > 5, d
    save_file({"base": base, "lora": lora}, os.path.join(OUT, "frames.safetensors"))
    json.dump({"generator": "tests/reference/make_animatediff_lora_fixtures.py", "torch": torch.__version__,
               "adapter": "animatediff/a", "scheduler": "DDIMScheduler", "scheduler_overrides": DDIM_LINEAR,
               "generate": GEN, "seed": SEED, "max_diff_to_base": d},
              open(os.path.join(OUT, "case.json"), "w"), indent=1)
    print("AnimateDiff LoRA fixture: LoRA moves the frames", d, "levels")


if __name__ == "__main__":
    main()
