"""Train the tiny AutoencoderKL (64x64 RGB -> 16x16x4 latents) on the synthetic images.

Loss: L1 + MSE reconstruction + small KL. Checkpoints to <out>/vae (diffusers format, fp32).
"""
import argparse
import math
import os
import time

import numpy as np
import torch
from diffusers import AutoencoderKL


def make_vae():
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/tmp/tinysd/data")
    ap.add_argument("--out", default="/tmp/tinysd/vae")
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kl", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=10**9)
    ap.add_argument("--init", help="continue from this VAE folder")
    ap.add_argument("--decoder-only", action="store_true",
                    help="freeze encoder + quant_conv (latent space unchanged) and tune the decoder")
    ap.add_argument("--fg-weight", type=float, default=20.0,
                    help="extra loss weight on foreground (shape) pixels")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    x_all = torch.from_numpy(np.load(os.path.join(a.data, "images.npy"))).permute(0, 3, 1, 2)
    n = x_all.shape[0]
    # foreground mask: pixels far from the image's border (background) colour
    xf = x_all.float()
    ring = torch.cat([xf[:, :, :2].flatten(2), xf[:, :, -2:].flatten(2)], 2)
    bg = ring.median(dim=2).values[:, :, None, None]
    fg_all = ((xf - bg).norm(dim=1, keepdim=True) > 40).float()
    del xf
    vae = AutoencoderKL.from_pretrained(a.init) if a.init else make_vae()
    print("vae params", sum(p.numel() for p in vae.parameters()), flush=True)
    if a.decoder_only:
        for m in (vae.encoder, vae.quant_conv):
            m.requires_grad_(False)
    train_params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(train_params, lr=a.lr, weight_decay=0.0)
    t0 = time.time()
    budget = a.minutes * 60
    step = 0
    ema = None
    while step < a.max_steps:
        el = time.time() - t0
        if el > budget:
            break
        # cosine decay of lr over the time budget
        lr = a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, el / budget))))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.from_numpy(rng.integers(0, n, a.bs))
        x = x_all[idx].float() / 127.5 - 1
        if a.decoder_only:
            with torch.no_grad():
                post = vae.encode(x).latent_dist
        else:
            post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        w = 1 + a.fg_weight * fg_all[idx]
        w = w / w.mean()
        l1 = ((rec - x).abs() * w).mean()
        mse = ((rec - x) ** 2 * w).mean()
        kl = post.kl().mean()
        loss = l1 + mse + (0.0 if a.decoder_only else a.kl * kl)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(train_params, 1.0)
        opt.step()
        step += 1
        ema = mse.item() if ema is None else 0.98 * ema + 0.02 * mse.item()
        if step % 25 == 0:
            print(f"step {step} t={time.time()-t0:.0f}s lr={lr:.2e} l1={l1.item():.4f} mse_ema={ema:.5f} kl={kl.item():.1f}", flush=True)
        if step % 300 == 0:
            vae.save_pretrained(a.out)
    vae.save_pretrained(a.out)
    print(f"done {step} steps in {time.time()-t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
