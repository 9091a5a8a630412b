#!/usr/bin/env python3
"""torch side of tests/bench/bench-sd15-cpu.sh: times one full-size SD 1.5
component forward on the CPU (float32) and prints one TSV line

    <what>\t<median ms>\t<min ms>\t<weights MiB>\t<forward peak MiB above weights>\t<process VmHWM MiB>

  bench_sd15_torch.py make <dir>                 write random-weight SD 1.5 vae/ and
                                                 text_encoder/ component folders to <dir>
  bench_sd15_torch.py unet <dir> [--threads N] [--reps N]   <dir>/unet + <dir>/io.safetensors
                                                 (tests/reference/check_unet_sd15.py writes them)
  bench_sd15_torch.py vae <dir> ...              decode of latents [1, 4, 64, 64] -> [1, 3, 512, 512]
  bench_sd15_torch.py clip <dir> ...             text encoder, input_ids [2, 77]

Memory: "weights" is the process RSS growth while loading the model (the
parameters, float32); "forward peak" is the growth of the RSS high-water mark
(VmHWM, reset through /proc/self/clear_refs after loading) above the RSS
after loading, over the warm-up and timed forwards: the activations, scratch
and allocator caches of a forward.
The C side (bench-sd15) reports the same two quantities from its allocator.
"""
import argparse
import os
import statistics
import sys
import time

import torch


def status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


SD15_VAE = dict(in_channels=3, out_channels=3,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu",
                latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)


def make(d):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD15_VAE).eval()
    os.makedirs(os.path.join(d, "vae"), exist_ok=True)
    vae.save_config(os.path.join(d, "vae"))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()},
              os.path.join(d, "vae", "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    te = CLIPTextModel(cfg).eval()
    te.save_pretrained(os.path.join(d, "text_encoder"), safe_serialization=True)
    print("wrote %s/vae and %s/text_encoder" % (d, d))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["make", "unet", "vae", "clip"])
    ap.add_argument("dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    if a.what == "make":
        make(a.dir)
        return
    torch.set_num_threads(a.threads)
    rss0 = status_mb("VmRSS")
    with torch.no_grad():
        if a.what == "unet":
            from diffusers import UNet2DConditionModel
            from safetensors.torch import load_file
            model = UNet2DConditionModel.from_pretrained(os.path.join(a.dir, "unet")).eval()
            io = load_file(os.path.join(a.dir, "io.safetensors"))
            args = (io["sample"], io["timestep"], io["encoder_hidden_states"])
            fn = lambda: model(*args).sample
        elif a.what == "vae":
            from diffusers import AutoencoderKL
            model = AutoencoderKL.from_pretrained(os.path.join(a.dir, "vae")).eval()
            z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1))
            fn = lambda: model.decode(z).sample
        else:
            from transformers import CLIPTextModel
            model = CLIPTextModel.from_pretrained(os.path.join(a.dir, "text_encoder")).eval()
            ids = torch.randint(3, 49406, (2, 77), generator=torch.Generator().manual_seed(1))
            ids[:, 0] = 49406
            ids[:, 40:] = 49407
            fn = lambda: model(ids).last_hidden_state
        weights_mb = status_mb("VmRSS") - rss0
        base = status_mb("VmRSS")
        hwm_ok = reset_hwm()
        fn()   # warm-up (not timed; its memory counts in the peak)
        times = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1000.0)
            del out
        peak = (status_mb("VmHWM") - base) if hwm_ok else float("nan")
    print("%s\t%.1f\t%.1f\t%.0f\t%.0f\t%.0f" % (a.what, statistics.median(times), min(times), weights_mb, peak,
                                             status_mb("VmHWM")))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
