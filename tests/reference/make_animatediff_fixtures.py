#!/usr/bin/env python3
"""Reference outputs for the AnimateDiff core (tests/core/test-animate.c).

Tiny MotionAdapters on the tiny SD pipeline tests/fixtures/pipelines/tiny-sd
(UNet block_out_channels (8, 16), layers_per_block 1, norm groups 4):

  a: v1.5-2 style: 2 heads, mid-block motion module, max_seq_length 16,
     motion_norm_num_groups 4, standard positional tables
  b: v1.4 style: no mid-block motion module, heads per block (1, 4),
     transformer layers per block (2, 1), max_seq_length 8,
     motion_norm_num_groups 2 (diffusers' UNetMotionModel uses the UNet's
     norm_num_groups for its motion modules, so 4 is what runs), and its
     positional tables perturbed (the stored `pe` buffers are what diffusers
     uses, so the C code must read them, not recompute them)
  c: PIA style: conv_in_channels 9 (UNetMotionModel forward only)

Each adapter is saved with MotionAdapter.save_pretrained (safetensors) under
tests/fixtures/animatediff/<cfg>/.  Outputs:
  forward.safetensors  UNetMotionModel.from_unet2d(unet, adapter) forward:
                       inputs and f32 output per adapter
  frames.safetensors   AnimateDiffPipeline.from_pipe(sd, motion_adapter=...)
                       frames, output_type="np", as 8-bit (round(x * 255))
  cases.json           the parameters of each pipeline run
  params.json          parameter counts of the adapters (and of the full-size
                       v1-5-2 configuration, built here on the meta device)
  v1-5-2-state.json    that configuration's state-dict names and shapes

Run from the repository root:  python3 tests/reference/make_animatediff_fixtures.py
"""
import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
from diffusers import (AnimateDiffPipeline, DDIMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, MotionAdapter,
                       StableDiffusionPipeline, UNetMotionModel)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
OUT = os.path.join(FIX, "animatediff")
SD = os.path.join(FIX, "pipelines", "tiny-sd")

ADAPTERS = {
    "a": dict(block_out_channels=(8, 16), motion_layers_per_block=1, motion_transformer_layers_per_block=1,
              motion_num_attention_heads=2, motion_norm_num_groups=4, motion_max_seq_length=16,
              use_motion_mid_block=True, motion_mid_block_layers_per_block=1,
              motion_transformer_layers_per_mid_block=1),
    "b": dict(block_out_channels=(8, 16), motion_layers_per_block=1, motion_transformer_layers_per_block=(2, 1),
              motion_num_attention_heads=(1, 4), motion_norm_num_groups=2, motion_max_seq_length=8,
              use_motion_mid_block=False),
    "c": dict(block_out_channels=(8, 16), motion_layers_per_block=1, motion_num_attention_heads=2,
              motion_norm_num_groups=4, motion_max_seq_length=8, use_motion_mid_block=True,
              motion_transformer_layers_per_mid_block=2, conv_in_channels=9),
}

# the seed's example: DDIMScheduler.from_pretrained(..., subfolder="scheduler", **DDIM_LINEAR)
DDIM_LINEAR = dict(clip_sample=False, timestep_spacing="linspace", beta_schedule="linear", steps_offset=1)

SCHEDULERS = {
    "DDIMScheduler": DDIMScheduler,
    "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler,
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
}

# (id, adapter, scheduler, scheduler overrides, frames, steps, guidance, seed, w, h, prompt, negative, chunk)
CASES = [
    ("a-ddim", "a", "DDIMScheduler", DDIM_LINEAR, 8, 4, 7.5, 42, 32, 32, "a red ball bouncing", None, 16),
    ("a-euler-a", "a", "EulerAncestralDiscreteScheduler", {}, 6, 3, 7.5, 5, 32, 32, "waves", None, 4),
    ("a-dpm", "a", "DPMSolverMultistepScheduler", dict(beta_schedule="linear"), 5, 4, 6.0, 9, 32, 32,
     "a cat walking", "blurry", 2),
    ("a-default-frames", "a", "DDIMScheduler", DDIM_LINEAR, 16, 3, 7.5, 1, 40, 24, "fireworks at night",
     "low quality", 5),
    ("b-ddim", "b", "DDIMScheduler", DDIM_LINEAR, 8, 4, 7.5, 42, 32, 32, "a red ball bouncing", None, 3),
    ("b-euler", "b", "EulerDiscreteScheduler", {}, 4, 3, 7.5, 77, 32, 32, "clouds moving", None, 16),
    ("b-dpm-nocfg", "b", "DPMSolverMultistepScheduler", {}, 7, 3, 1.0, 3, 32, 32, "a tree in the wind", None, 16),
]


def spread(module, scale, gen):
    # random init of tiny models leaves many outputs near zero; spread the weights so that
    # the temporal attention really mixes frames
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def make_adapter(name, cfg):
    gen = torch.Generator().manual_seed(100 + ord(name))
    torch.manual_seed(200 + ord(name))
    ad = MotionAdapter(**cfg)
    spread(ad, 0.15, gen)
    if name == "b":
        with torch.no_grad():
            for k, b in ad.named_buffers():
                if k.endswith("pos_embed.pe"):
                    b.add_(torch.randn(b.shape, generator=gen) * 0.1)
    path = os.path.join(OUT, name)
    if os.path.exists(path):
        shutil.rmtree(path)
    ad.save_pretrained(path, safe_serialization=True)
    return MotionAdapter.from_pretrained(path)


def to_u8(x):
    return np.ascontiguousarray(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8))


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def main():
    torch.set_num_threads(2)
    os.makedirs(OUT, exist_ok=True)
    sd = StableDiffusionPipeline.from_pretrained(SD)
    sd.set_progress_bar_config(disable=True)
    adapters = {k: make_adapter(k, v) for k, v in ADAPTERS.items()}
    params = {"adapters": {}}

    # 1. UNetMotionModel forward, f32
    fwd = {}
    for name, ad in adapters.items():
        model = UNetMotionModel.from_unet2d(sd.unet, ad).eval()
        params["adapters"][name] = dict(adapter=n_params(ad), unet_motion=n_params(model),
                                        unet=n_params(sd.unet))
        gen = torch.Generator().manual_seed(7 + ord(name))
        cin = model.config.in_channels
        for tag, (B, F, H, W, t) in {"": (2, 5, 8, 8, 421), "odd": (1, 3, 6, 10, 37)}.items():
            if name == "c" and tag:
                continue
            x = torch.randn((B, cin, F, H, W), generator=gen)
            ehs = torch.randn((B * F, 7, 32), generator=gen)
            with torch.no_grad():
                y = model(x, torch.tensor(t), encoder_hidden_states=ehs).sample
            key = name + (("-" + tag) if tag else "")
            fwd[key + ".sample"] = x.contiguous()
            fwd[key + ".encoder_hidden_states"] = ehs.contiguous()
            fwd[key + ".timestep"] = torch.tensor([float(t)])
            fwd[key + ".out"] = y.contiguous()
    save_file(fwd, os.path.join(OUT, "forward.safetensors"))

    # 2. the pipeline: from_pipe of the SD pipeline, scheduler swapped as users do
    frames, cases = {}, []
    for (cid, aname, sname, over, nf, steps, g, seed, w, h, prompt, neg, chunk) in CASES:
        pipe = AnimateDiffPipeline.from_pipe(sd, motion_adapter=adapters[aname])
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = SCHEDULERS[sname].from_config(sd.scheduler.config, **over)
        out = pipe(prompt, negative_prompt=neg, num_frames=nf, num_inference_steps=steps, guidance_scale=g,
                   width=w, height=h, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                   decode_chunk_size=chunk).frames
        frames[cid] = torch.from_numpy(to_u8(out[0]))   # [F, H, W, 3]
        cases.append(dict(id=cid, adapter=aname, scheduler=sname, scheduler_overrides=over, num_frames=nf,
                          steps=steps, guidance=g, seed=seed, width=w, height=h, prompt=prompt,
                          negative_prompt=neg, decode_chunk_size=chunk))
        print(cid, out.shape)
    save_file(frames, os.path.join(OUT, "frames.safetensors"))
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({"diffusers": diffusers.__version__, "torch": torch.__version__, "cases": cases}, f, indent=1)

    # 3. parameter count of the full-size v1-5-2 adapter (config of guoyww/animatediff-motion-adapter-v1-5-2)
    full = dict(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
                motion_mid_block_layers_per_block=1, motion_norm_num_groups=32, motion_num_attention_heads=8,
                motion_max_seq_length=32, use_motion_mid_block=True)
    with torch.device("meta"):
        big = MotionAdapter(**full)
    params["v1-5-2"] = dict(config=full, adapter=n_params(big),
                            buffers=sum(b.numel() for b in big.buffers()))
    with open(os.path.join(OUT, "params.json"), "w") as f:
        json.dump(params, f, indent=1)
    # its state-dict names and shapes, so the C test can lay out a (sparse) weight file
    # with diffusers' keys and check the loader reads every one of them
    with open(os.path.join(OUT, "v1-5-2-state.json"), "w") as f:
        json.dump(dict(config=dict(full, _class_name="MotionAdapter"),
                       tensors=[[k, list(v.shape)] for k, v in big.state_dict().items()]), f, separators=(",", ":"))
    print(json.dumps(params))


if __name__ == "__main__":
    main()
