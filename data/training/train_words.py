"""Teach the frozen image model's features the direction words, before (re)training the motion adapter.

Why: AnimateDiff's motion modules see no text; the only way the prompt's direction reaches them is
through the spatial UNet's cross-attention, whose output feeds each motion module. With the
direction words' embeddings learnt only through the motion loss (train_motion.py --train-words),
the UNet's features for "moving leftward" and "moving rightward" stayed 3-7% apart (a colour change:
~100%), and the adapter could not follow the direction (16% on held-out prompts).

What: only the 7 token-embedding rows of the motion words (train_motion.new_word_ids: "moving",
"lef", "righ", "tw", "ard", "upward", "downward"; no image caption uses them, so text-to-image output
is unchanged) learn, with two losses on the frozen UNet (no motion modules):
  * direction: at every location of every motion module's input (the outputs of the cross-attention
    transformers at 8x8 and 4x4, group-normalised as the motion module does), a linear probe with
    unit-norm rows and a fixed scale must tell the 4 directions apart (cross-entropy). The four
    prompts of a batch element differ only in the direction word and share the noisy latent, so only
    the words can separate them; the probe's fixed scale means the loss falls only when the features
    themselves move apart, consistently across colours, shapes, backgrounds and timesteps.
  * denoising: the usual epsilon loss (min-SNR 5) of the motion prompts on the clips' frames
    (textual inversion's objective);
  * keep: ||eps - eps with the starting embeddings||^2 on the same inputs (--keep-weight 100). Without
    it the words win the separation by drawing the cross-attention away from the colour words: the
    image model's held-out motion prompts kept their colour in 52-75% of images instead of 100%; with
    it, 95% (40 prompts), at a left/right feature distance of 46-62% at 4x4 (was 3-5%).
Held-out motion combinations are never used (common.motion_split).

Output: <out>/text_encoder (fp32; rows changed only at the word ids) and <out>/words.json (losses,
per-level probe accuracy and left/right feature distance before and after).
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from common import DIRECTIONS, motion_caption, motion_split
from train_motion import new_word_ids

HERE = os.path.dirname(os.path.abspath(__file__))
DIRS = list(DIRECTIONS)


def feature_sites(unet):
    """The modules whose outputs are motion-module inputs and see the text (cross-attention)."""
    sites = []
    for bi, blk in enumerate(unet.down_blocks):
        for ai, at in enumerate(getattr(blk, "attentions", []) or []):
            sites.append((f"down{bi}.{ai}", at))
    for ai, at in enumerate(unet.mid_block.attentions):
        sites.append((f"mid.{ai}", at))
    for bi, blk in enumerate(unet.up_blocks):
        for ai, at in enumerate(getattr(blk, "attentions", []) or []):
            sites.append((f"up{bi}.{ai}", at))
    return sites


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(HERE, "..", "tiny-sd"))
    ap.add_argument("--data", default="/tmp/tinysd/motion", help="folder with train_motion.py's latents.pt")
    ap.add_argument("--out", default="/tmp/tinysd/words")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--bases", type=int, default=8, help="(shape, colour, size, background) per step, x 4 directions")
    ap.add_argument("--lr", type=float, default=6e-3)
    ap.add_argument("--probe-scale", type=float, default=4.0)
    ap.add_argument("--denoise-weight", type=float, default=10.0)
    ap.add_argument("--probe-weight", type=float, default=1.0,
                    help="weight of the direction probe's cross-entropy (0: textual inversion on the frames alone)")
    ap.add_argument("--keep-weight", type=float, default=100.0,
                    help="weight of ||eps - eps with the starting embeddings||^2 (keeps the frames' colour and shape)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    os.makedirs(a.out, exist_ok=True)

    d = torch.load(os.path.join(a.data, "latents.pt"))
    mean, std, scaling = d["mean"], d["std"], d["scaling"]
    train, _ = motion_split()
    variants = mean.shape[0] // len(train)
    train_set = set(train)
    # clips whose (shape, colour, size, bg) has all four directions in the training split
    usable = [i for i in range(mean.shape[0])
              if all((c[0], c[1], c[2], dd, c[4]) in train_set for c in [train[i // variants]] for dd in DIRS)]
    print(f"{len(usable)} of {mean.shape[0]} clips usable (all 4 directions of their base in training)", flush=True)

    tok = CLIPTokenizer.from_pretrained(os.path.join(a.model, "tokenizer"))
    te = CLIPTextModel.from_pretrained(os.path.join(a.model, "text_encoder"), dtype=torch.float32)
    te.requires_grad_(False)
    emb = te.get_input_embeddings().weight
    word_ids = new_word_ids(tok)
    emb.requires_grad_(True)
    row_mask = torch.zeros(emb.shape[0], 1)
    row_mask[word_ids] = 1.0
    emb.register_hook(lambda g: g * row_mask)
    emb_before = emb.detach().clone()
    te0 = CLIPTextModel.from_pretrained(os.path.join(a.model, "text_encoder"), dtype=torch.float32).eval()
    te0.requires_grad_(False)

    unet = UNet2DConditionModel.from_pretrained(os.path.join(a.model, "unet"), dtype=torch.float32)
    unet.requires_grad_(False)
    sites = feature_sites(unet)
    feats = {}
    for name, mod in sites:
        mod.register_forward_hook(lambda m, i, o, name=name: feats.__setitem__(name, o[0] if isinstance(o, tuple) else o.sample))
    chans = {name: mod.config.in_channels for name, mod in sites}
    probes = {name: torch.nn.Linear(c, len(DIRS)) for name, c in chans.items()}
    groups = unet.config.norm_num_groups
    acp = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        num_train_timesteps=1000).alphas_cumprod
    opt = torch.optim.Adam([{"params": [emb], "lr": a.lr},
                            {"params": [p for pr in probes.values() for p in pr.parameters()], "lr": 1e-2}])

    def batch(gen_rng, bases):
        idx = gen_rng.choice(usable, bases)
        fr = gen_rng.integers(0, mean.shape[1], bases)
        z0 = (mean[idx, fr].float() + std[idx, fr].float() * torch.randn(bases, *mean.shape[2:])) * scaling
        t = torch.from_numpy(gen_rng.integers(100, 1000, bases))
        noise = torch.randn_like(z0)
        ab = acp[t].view(-1, 1, 1, 1)
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
        caps = []
        for i in idx:
            s, c, z, _, bg = train[i // variants]
            caps += [motion_caption(s, c, z, dd, bg) for dd in DIRS]
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        rep = lambda x: x.repeat_interleave(len(DIRS), dim=0)
        return rep(zt), rep(t), rep(noise), rep(ab.view(-1)), ids

    def losses(zt, t, noise, ab, ids):
        keep = None
        if a.keep_weight > 0:
            with torch.no_grad():
                pred0 = unet(zt, t, encoder_hidden_states=te0(ids)[0]).sample
        enc = te(ids)[0]
        pred = unet(zt, t, encoder_hidden_states=enc).sample
        if a.keep_weight > 0:
            keep = ((pred - pred0) ** 2).mean()
        snr = ab / (1 - ab)
        w = torch.clamp(snr, max=5.0) / snr
        dn = (w * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        labels = torch.arange(len(DIRS)).repeat(zt.shape[0] // len(DIRS))
        ce, acc, sep = {}, {}, {}
        for name, _ in sites:
            h = F.group_norm(feats[name], groups)  # (4B, C, H, W), as the motion module's norm
            pr = probes[name]
            wn = pr.weight / pr.weight.norm(dim=1, keepdim=True)
            logits = a.probe_scale * torch.einsum("kc,nchw->nkhw", wn, h) + pr.bias.view(1, -1, 1, 1)
            lab = labels.view(-1, 1, 1).expand(-1, *h.shape[2:])
            ce[name] = F.cross_entropy(logits, lab)
            acc[name] = (logits.argmax(1) == lab).float().mean().item()
            hv = h.view(-1, len(DIRS), *h.shape[1:])  # (B, dirs, C, H, W): left, right, up, down
            sep[name] = ((hv[:, 0] - hv[:, 1]).norm() / hv[:, 0].norm()).item()
        return dn, ce, acc, sep, keep

    def measure(tag, n=8, bases=8):
        g = np.random.default_rng(12345)
        torch.manual_seed(12345)
        tot = {"denoise": 0.0, "ce": 0.0}
        accs, seps = {k: 0.0 for k, _ in sites}, {k: 0.0 for k, _ in sites}
        with torch.no_grad():
            for _ in range(n):
                dn, ce, acc, sep, _ = losses(*batch(g, bases))
                tot["denoise"] += dn.item() / n
                tot["ce"] += sum(v.item() for v in ce.values()) / len(ce) / n
                for k in accs:
                    accs[k] += acc[k] / n
                    seps[k] += sep[k] / n
        print(f"[{tag}] denoise {tot['denoise']:.4f} probe-ce {tot['ce']:.3f} acc "
              + " ".join(f"{k}:{v:.2f}" for k, v in accs.items()) + " | left-right "
              + " ".join(f"{k}:{v:.3f}" for k, v in seps.items()), flush=True)
        return {"denoise": tot["denoise"], "probe_ce": tot["ce"], "probe_acc": accs, "left_right": seps}

    # fit the probes alone first, so "before" reports what the current embeddings allow
    emb.requires_grad_(False)
    for _ in range(200):
        dn, ce, _, _, _ = losses(*batch(rng, a.bases))
        opt.zero_grad(set_to_none=True)
        sum(ce.values()).backward()
        opt.step()
    emb.requires_grad_(True)
    report = {"before": measure("before"), "args": vars(a)}
    t0 = time.time()
    for step in range(1, a.steps + 1):
        lr_f = 0.5 * (1 + np.cos(np.pi * step / a.steps))
        opt.param_groups[0]["lr"] = a.lr * (0.05 + 0.95 * lr_f)
        dn, ce, acc, sep, keep = losses(*batch(rng, a.bases))
        ce_mean = sum(ce.values()) / len(ce)
        loss = a.probe_weight * ce_mean + a.denoise_weight * dn
        if keep is not None:
            loss = loss + a.keep_weight * keep
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step} {time.time()-t0:.0f}s ce {ce_mean.item():.3f} denoise {dn.item():.4f} "
                  f"keep {keep.item() if keep is not None else 0:.4f} "
                  f"acc {np.mean(list(acc.values())):.2f} left-right {np.mean(list(sep.values())):.3f}", flush=True)
    report["after"] = measure("after")
    report["seconds"] = time.time() - t0
    changed = (emb.detach() != emb_before).any(dim=1).nonzero().flatten().tolist()
    assert set(changed) <= set(word_ids), changed
    report["rows_changed"] = changed
    te.save_pretrained(os.path.join(a.out, "text_encoder"))
    with open(os.path.join(a.out, "words.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"done in {report['seconds']:.0f}s; rows changed {changed}", flush=True)


if __name__ == "__main__":
    main()
