#!/usr/bin/env python3
"""Slow check (not in CI): the full-size Stable Diffusion 1.5 UNet.

Builds diffusers' UNet2DConditionModel with the public SD 1.5 unet/config.json
values and random weights (torch.manual_seed(0), default init), writes it as a
component folder <out>/unet/{config.json, diffusion_pytorch_model.safetensors}
(float32, 3.4 GB), runs one float32 forward at 64x64 latents, batch 2 (two
timesteps, as classifier-free guidance does), and writes the inputs, the output
and the parameter count to <out>/io.safetensors.  With --c-binary it then runs
tests/bench/unet-sd15 on the same folder, which checks the parameter count and
the output (max abs error <= 1e-4 of the output's max abs) and prints its time
and peak memory next to torch's.

Run (a few minutes on 2 cores, ~8 GB of RAM, 3.5 GB of disk):
  python3 tests/reference/check_unet_sd15.py /tmp/unet-sd15 \
      --c-binary <builddir>/tests/bench/unet-sd15
"""
import argparse
import os
import resource
import subprocess
import sys
import time

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def maxrss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="/tmp/unet-sd15")
    ap.add_argument("--c-binary", help="tests/bench/unet-sd15 from a build folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="keep an existing model/io in <out>")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    unet_dir = os.path.join(a.out, "unet")
    io_path = os.path.join(a.out, "io.safetensors")
    if not (a.reuse and os.path.exists(io_path)):
        os.makedirs(unet_dir, exist_ok=True)
        torch.manual_seed(0)
        model = UNet2DConditionModel(**SD15_UNET).eval()
        n = sum(p.numel() for p in model.parameters())
        print("diffusers parameters: %d" % n)
        model.save_config(unet_dir)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(unet_dir, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        g = torch.Generator().manual_seed(1)
        sample = torch.randn(2, 4, 64, 64, generator=g)
        timestep = torch.tensor([999.0, 500.0])
        ehs = torch.randn(2, 77, 768, generator=g)
        rss0 = maxrss_mb()
        t0 = time.time()
        with torch.no_grad():
            out = model(sample, timestep, ehs).sample
        dt = time.time() - t0
        print("torch forward [2, 4, 64, 64] f32, %d threads: %.2f s; process peak RSS %.0f MiB "
              "(%.0f MiB before the forward)" % (a.threads, dt, maxrss_mb(), rss0))
        save_file({"sample": sample, "timestep": timestep, "encoder_hidden_states": ehs, "output": out,
                   "n_params": torch.tensor([n], dtype=torch.int64)}, io_path)
        del model
    if a.c_binary:
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        r = subprocess.run([a.c_binary, unet_dir, io_path], env=env)
        sys.exit(r.returncode)


if __name__ == "__main__":
    main()
