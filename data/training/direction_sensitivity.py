"""How much a motion adapter's prediction depends on the prompt's direction word.

For training clips, at fixed timesteps, the epsilon loss of UNetMotionModel(image model, adapter) with
the clip's own caption and with the caption of the opposite direction, on the same noisy input. A
model that follows the direction has a clearly higher loss with the opposite word (ratio > 1); a
ratio of 1.000 means the direction word changes nothing in what the model predicts, whatever its
image features look like. (Session 3: the shipped adapter and every run without --contrast: 0.98-1.00;
with --contrast: 1.01-1.03.)

    python3 direction_sensitivity.py --model ../tiny-sd --adapter ../tiny-motion-adapter
"""
import argparse
import os

import numpy as np
import torch
from diffusers import DDPMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from transformers import CLIPTextModel, CLIPTokenizer

from common import motion_caption, motion_split

HERE = os.path.dirname(os.path.abspath(__file__))
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(HERE, "..", "tiny-sd"))
    ap.add_argument("--adapter", default=os.path.join(HERE, "..", "tiny-motion-adapter"))
    ap.add_argument("--data", default="/tmp/tinysd/motion", help="train_motion.py's latents.pt folder")
    ap.add_argument("--clips", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d = torch.load(os.path.join(a.data, "latents.pt"))
    train, _ = motion_split()
    per = d["mean"].shape[0] // len(train)
    tok = CLIPTokenizer.from_pretrained(os.path.join(a.model, "tokenizer"))
    te = CLIPTextModel.from_pretrained(os.path.join(a.model, "text_encoder"), dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(a.model, "unet"), dtype=torch.float32)
    model = UNetMotionModel.from_unet2d(unet, MotionAdapter.from_pretrained(a.adapter)).eval()
    acp = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        num_train_timesteps=1000).alphas_cumprod
    g = torch.Generator().manual_seed(0)
    idx = np.random.default_rng(0).choice(d["mean"].shape[0], a.clips, replace=False)
    with torch.no_grad():
        for t in (300, 600, 900):
            own, opp = [], []
            for i in idx:
                sh, co, si, dd, bg = train[i // per]
                m, s = d["mean"][i].float(), d["std"][i].float()
                z0 = ((m + s * torch.randn(m.shape, generator=g)) * d["scaling"]).permute(1, 0, 2, 3)[None]
                noise = torch.randn(z0.shape, generator=g)
                zt = acp[t].sqrt() * z0 + (1 - acp[t]).sqrt() * noise
                caps = [motion_caption(sh, co, si, dd, bg), motion_caption(sh, co, si, OPPOSITE[dd], bg)]
                enc = te(tok(caps, padding="max_length", max_length=tok.model_max_length,
                             return_tensors="pt").input_ids)[0]
                frames = z0.shape[2]
                pred = model(zt.repeat(2, 1, 1, 1, 1), torch.tensor([t, t]),
                             encoder_hidden_states=enc.repeat_interleave(frames, 0)).sample
                err = ((pred - noise) ** 2).mean(dim=(1, 2, 3, 4))
                own.append(err[0].item())
                opp.append(err[1].item())
            print(f"t={t}: own word {np.mean(own):.4f}  opposite word {np.mean(opp):.4f}  "
                  f"ratio {np.mean(opp) / np.mean(own):.3f}", flush=True)


if __name__ == "__main__":
    main()
