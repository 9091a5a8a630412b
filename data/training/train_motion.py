"""Train the tiny MotionAdapter on clips of a shape moving left/right/up/down (AnimateDiff-style).

The image model (UNet2DConditionModel + CLIPTextModel of a tiny-sd folder) stays frozen; only the
motion modules learn, inside diffusers' UNetMotionModel.from_unet2d(unet, adapter), with the
image model's DDPM objective (epsilon, min-SNR(5), caption dropped 10%). The motion modules'
output projections start at zero, so training starts from the image model's per-frame behaviour.

The motion captions' words "moving", "leftward", "rightward", "upward", "downward" (common.
DIRECTION_WORDS) are made of tokens that never occur in the image captions, so the image model's
text encoder has never trained their embeddings; with --train-words these rows (and only these: a
gradient mask keeps every other row and weight bit-identical) learn with the adapter, so the
prompt's direction reaches the frozen UNet's cross-attention. Image prompts do not contain them, so
text-to-image output is unchanged; the trained text encoder is written next to the adapter
(<out>/text_encoder) for export_motion.py.

Data: <data>/latents.pt (made on first run: make_clips() renders the training combinations of
common.motion_split(), `--variants` clips each, and encodes every frame with the bundle's VAE).
Checkpoints (fp32) go to <out>/{adapter,adapter_ema,text_encoder,state.json,opt.pt}.
"""
import argparse
import json
import math
import os
import random
import time

import numpy as np
import torch
from diffusers import (AutoencoderKL, DDPMScheduler, MotionAdapter, UNet2DConditionModel,
                       UNetMotionModel)
from transformers import CLIPTextModel, CLIPTokenizer

from common import (CLIP_FRAMES, DIRECTIONS, caption, motion_caption, motion_combos, motion_split, render_clip,
                    split, step_done, add_clip_options, clip_options, FIRST_ADAPTER_CLIPS, WORD_TOKEN_INIT)

HERE = os.path.dirname(os.path.abspath(__file__))


def new_word_ids(tok):
    """Token ids of the motion captions that no image caption uses (their embeddings are free)."""
    train, test = split()
    image_ids = set()
    for c in train + test:
        image_ids.update(tok(caption(*c)).input_ids)
    motion_ids = set()
    for c in motion_combos():
        motion_ids.update(tok(motion_caption(*c)).input_ids)
    return sorted(motion_ids - image_ids)


def adapter_config(unet):
    c = unet.config
    return dict(block_out_channels=tuple(c.block_out_channels), motion_layers_per_block=c.layers_per_block,
                motion_transformer_layers_per_block=1, motion_mid_block_layers_per_block=1,
                motion_transformer_layers_per_mid_block=1, motion_num_attention_heads=4,
                motion_norm_num_groups=c.norm_num_groups, motion_max_seq_length=32, use_motion_mid_block=True)


@torch.no_grad()
def make_clips(model, out, variants, seed, clip, bs=64):
    train, _ = motion_split()
    rng = random.Random(seed)
    vae = AutoencoderKL.from_pretrained(os.path.join(model, "vae"), dtype=torch.float32).eval()
    means, stds, caps = [], [], []
    t0 = time.time()
    clips = [(c, v) for c in train for v in range(variants)]
    frames = []
    for c, _ in clips:
        frames.append(render_clip(*c, rng, **clip))
        caps.append(motion_caption(*c))
    frames = np.concatenate(frames)  # (N*F, 64, 64, 3)
    print(f"rendered {len(clips)} clips ({len(frames)} frames) in {time.time()-t0:.0f}s", flush=True)
    t0 = time.time()
    for i in range(0, len(frames), bs):
        x = torch.from_numpy(frames[i:i + bs]).permute(0, 3, 1, 2).float() / 127.5 - 1
        d = vae.encode(x).latent_dist
        means.append(d.mean.half())
        stds.append(d.std.half())
    n, f = len(clips), CLIP_FRAMES
    mean = torch.cat(means).view(n, f, *means[0].shape[1:])
    std = torch.cat(stds).view(n, f, *stds[0].shape[1:])
    print(f"encoded in {time.time()-t0:.0f}s; latents {tuple(mean.shape)}", flush=True)
    torch.save({"mean": mean, "std": std, "captions": caps, "scaling": vae.config.scaling_factor,
                "clip": clip},
               os.path.join(out, "latents.pt"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(HERE, "..", "tiny-sd"), help="frozen image model folder")
    ap.add_argument("--data", default="/tmp/tinysd/motion")
    ap.add_argument("--out", default="/tmp/tinysd/motion_ckpt")
    ap.add_argument("--variants", type=int, default=3)
    add_clip_options(ap, "new data (existing --data must have been made with the same)")
    ap.add_argument("--word-lr-scale", type=float, default=1.0,
                    help="learning rate of the word embeddings relative to the motion modules'")
    ap.add_argument("--recaption", action="store_true",
                    help="rebuild the captions of <data>/latents.pt with the current common.motion_caption")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--bs", type=int, default=4, help="clips per step (x 16 frames)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-words", action="store_true",
                    help="also learn the embeddings of the motion captions' tokens that image captions never use")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--layout-frac", type=float, default=0.0,
                    help="share of each batch with its timestep drawn from [300, 900) (where the clip's layout, "
                         "i.e. where the shape is in each frame, is decided) instead of [0, 1000)")
    ap.add_argument("--x0-weight-max", type=float, default=1.0,
                    help="weight each sample's epsilon loss by clamp(1/SNR, 1, this): the x0-space error at high "
                         "noise, where the clip's layout and so the direction of motion is decided (an epsilon "
                         "loss hardly sees it there: at t=900 a wrong direction changed it by <1%%)")
    ap.add_argument("--contrast", type=float, default=0.0,
                    help="weight of a ranking term: each clip's loss with another direction's caption (a training "
                         "caption) must exceed its loss with its own by 10%%, so the motion modules must use the "
                         "direction (without it the loss was the same for either word)")
    ap.add_argument("--contrast-tmin", type=int, default=0,
                    help="apply the ranking term only to samples with t >= this (below it the layout, and so the "
                         "direction, is already fixed by the noisy input; ranking there can only alter content)")
    ap.add_argument("--contrast-margin-max", type=float, default=1.1,
                    help="the ranking margin rises linearly from 1.1 at --contrast-tmin to this at t=999 (at high "
                         "noise the direction should change the prediction most)")
    ap.add_argument("--layout-tmax", type=int, default=900, help="upper end of the --layout-frac timesteps")
    ap.add_argument("--word-rows", help="a word_rows.safetensors (word_ids, rows) to put into the text encoder's "
                    "direction-word embeddings, e.g. checkpoints/motion-contrast/word_rows.safetensors")
    ap.add_argument("--words-from-positions", action="store_true",
                    help="start the direction words' rows as the image model's position words (common.WORD_TOKEN_INIT)")
    ap.add_argument("--text-encoder", help="the text encoder to use (e.g. train_words.py's <out>/text_encoder, whose "
                    "direction-word rows were learnt first); default: the image model's")
    ap.add_argument("--init", help="start from this adapter (and <init>/../text_encoder) e.g. to adapt to a newer image model")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    os.makedirs(a.data, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    if not os.path.exists(os.path.join(a.data, "latents.pt")):
        make_clips(a.model, a.data, a.variants, a.seed, clip_options(a))
    d = torch.load(os.path.join(a.data, "latents.pt"))
    made = d.get("clip", FIRST_ADAPTER_CLIPS)  # files made before the options
    asked = clip_options(a)
    if any(abs(float(made[k]) - float(asked[k])) > 1e-9 for k in asked):
        raise SystemExit(f"{a.data}/latents.pt holds clips made with {made}, not the asked-for {asked}: "
                         "pass the matching --clip-* options or another --data folder")
    print(f"clips of {a.data}: {made}", flush=True)
    mean, std, captions, scaling = d["mean"], d["std"], d["captions"], d["scaling"]
    if a.recaption:  # same clips, in make_clips' order; only the caption wording changes
        train, _ = motion_split()
        captions = [motion_caption(*c) for c in train for _ in range(len(captions) // len(train))]
        assert len(captions) == len(d["captions"])
    n = len(captions)

    tok = CLIPTokenizer.from_pretrained(os.path.join(a.model, "tokenizer"))
    uniq = sorted(set(captions)) + [""]
    cap_index = {c: i for i, c in enumerate(uniq)}
    ids_all = tok(uniq, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
    cap_ids = torch.tensor([cap_index[c] for c in captions])
    empty_id = cap_index[""]
    # per clip: the captions of its combination with another direction that is also in training
    wrong_ids = [[] for _ in range(n)]
    if a.contrast > 0:
        assert a.recaption, "--contrast needs --recaption (the clips' combinations)"
        train_set = set(train)
        per = n // len(train)
        for i in range(n):
            sh, co, si, dd, bg = train[i // per]
            wrong_ids[i] = [cap_index[motion_caption(sh, co, si, o, bg)] for o in DIRECTIONS
                            if o != dd and (sh, co, si, o, bg) in train_set]
    word_ids = new_word_ids(tok)
    words = tok.convert_ids_to_tokens(word_ids)

    unet2d = UNet2DConditionModel.from_pretrained(os.path.join(a.model, "unet"), dtype=torch.float32)
    te_dir = a.text_encoder or os.path.join(a.model, "text_encoder")
    if a.resume and os.path.exists(os.path.join(a.out, "text_encoder")):
        te_dir = os.path.join(a.out, "text_encoder")
    te = CLIPTextModel.from_pretrained(te_dir, dtype=torch.float32)
    te.requires_grad_(False)
    emb = te.get_input_embeddings().weight
    init_te = os.path.join(a.init, "..", "text_encoder") if a.init else None
    if init_te and not a.resume and not a.text_encoder and os.path.exists(init_te):
        # the image model's text encoder, with the direction words' rows learnt in the earlier run
        old = CLIPTextModel.from_pretrained(init_te, dtype=torch.float32).get_input_embeddings().weight
        with torch.no_grad():
            emb[word_ids] = old[word_ids]
    if a.words_from_positions:
        with torch.no_grad():
            for wid, name in zip(word_ids, words):
                src = tok(WORD_TOKEN_INIT[name].replace("</w>", "")).input_ids[1:-1]
                assert len(src) == 1, (name, src)
                emb[wid] = emb[src[0]]
        print("direction words start as " + ", ".join(f"{n}={WORD_TOKEN_INIT[n]}" for n in words), flush=True)
    if a.word_rows:
        from safetensors.torch import load_file
        wr = load_file(a.word_rows)
        assert wr["word_ids"].tolist() == word_ids, (wr["word_ids"].tolist(), word_ids)
        with torch.no_grad():
            emb[word_ids] = wr["rows"].to(emb.dtype)
    if a.train_words:
        emb.requires_grad_(True)
        row_mask = torch.zeros(emb.shape[0], 1)
        row_mask[word_ids] = 1.0
        emb.register_hook(lambda g: g * row_mask)
    state = {"step": 0, "seconds": 0.0}
    if a.resume and os.path.exists(os.path.join(a.out, "adapter")):
        adapter = MotionAdapter.from_pretrained(os.path.join(a.out, "adapter"))
        adapter_ema = MotionAdapter.from_pretrained(os.path.join(a.out, "adapter_ema"))
        state = json.load(open(os.path.join(a.out, "state.json")))
    elif a.init:
        adapter = MotionAdapter.from_pretrained(a.init)
        adapter_ema = MotionAdapter.from_pretrained(a.init)
    else:
        adapter = MotionAdapter(**adapter_config(unet2d))
        for name, p in adapter.named_parameters():
            if ".proj_out." in name:
                torch.nn.init.zeros_(p)
        adapter_ema = MotionAdapter(**adapter_config(unet2d))
        adapter_ema.load_state_dict(adapter.state_dict())
    model = UNetMotionModel.from_unet2d(unet2d, adapter)
    model.freeze_unet2d_params()
    # train the model's own motion modules; adapter_ema tracks them by name
    mm = {k: p for k, p in model.named_parameters() if p.requires_grad}
    ema = dict(adapter_ema.named_parameters())
    pairs = [(mm[k], ema[k]) for k in ema]  # same names in UNetMotionModel and MotionAdapter
    assert len(pairs) == len(mm), (len(pairs), len(mm))
    params = list(mm.values())
    print(f"{n} clips; motion params {sum(p.numel() for p in params)}; frozen unet {sum(p.numel() for p in unet2d.parameters())}"
          f"; words {dict(zip(words, word_ids)) if a.train_words else 'frozen'}", flush=True)
    groups = [{"params": params}]
    if a.train_words:
        groups.append({"params": [emb], "lr_scale": a.word_lr_scale})
    opt = torch.optim.AdamW(groups, lr=a.lr, weight_decay=0.0)
    opt_path = os.path.join(a.out, "opt.pt")
    if a.resume and os.path.exists(opt_path):
        opt.load_state_dict(torch.load(opt_path))
        for gp, g0 in zip(opt.param_groups, groups):  # the new run's settings, the saved moments
            gp["lr_scale"] = g0.get("lr_scale", 1.0)
    acp = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        num_train_timesteps=1000).alphas_cumprod
    emb_before = emb.detach().clone()

    def save():
        for name, p in mm.items():  # write the live weights into `adapter`, then save it
            dict(adapter.named_parameters())[name].data.copy_(p.data)
        adapter.save_pretrained(os.path.join(a.out, "adapter"))
        adapter_ema.save_pretrained(os.path.join(a.out, "adapter_ema"))
        te.save_pretrained(os.path.join(a.out, "text_encoder"))
        torch.save(opt.state_dict(), opt_path)
        with open(os.path.join(a.out, "state.json"), "w") as f:
            json.dump(state, f)

    model.train()
    t0, base = time.time(), state["seconds"]
    budget = a.minutes * 60
    loss_ema = None
    F_ = CLIP_FRAMES
    while True:
        el = time.time() - t0
        if el > budget:
            break
        frac = min(1.0, el / budget)
        lr = a.lr * min(1.0, (state["step"] + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for gp in opt.param_groups:
            gp["lr"] = lr * gp.get("lr_scale", 1.0)
        idx = torch.from_numpy(rng.integers(0, n, a.bs))
        m, s = mean[idx].float(), std[idx].float()  # (B, F, C, H, W)
        z0 = (m + s * torch.randn_like(m)) * scaling
        z0 = z0.permute(0, 2, 1, 3, 4)  # (B, C, F, H, W)
        ci = cap_ids[idx].clone()
        ci[torch.rand(a.bs) < 0.1] = empty_id
        with torch.set_grad_enabled(a.train_words):
            enc = te(ids_all[ci])[0]
        t = torch.randint(0, 1000, (a.bs,))
        n_layout = int(round(a.layout_frac * a.bs))
        if n_layout:
            t[:n_layout] = torch.randint(300, a.layout_tmax, (n_layout,))
        noise = torch.randn_like(z0)
        ab = acp[t].view(-1, 1, 1, 1, 1)
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
        snr = ab.view(-1) / (1 - ab.view(-1))
        w = torch.clamp(snr, max=5.0) / snr * torch.clamp(1.0 / snr, min=1.0, max=a.x0_weight_max)
        if a.contrast > 0:
            wi = torch.tensor([int(rng.choice(wrong_ids[k])) if wrong_ids[k] and ci[j] != empty_id
                               and t[j] >= a.contrast_tmin else -1 for j, k in enumerate(idx.tolist())])
            sel = (wi >= 0).nonzero().flatten()  # the samples that also run with a wrong caption
        else:
            sel = torch.zeros(0, dtype=torch.long)
        k = len(sel)
        with torch.no_grad():
            enc_w = te(ids_all[wi[sel]])[0] if k else enc[:0]
        # like AnimateDiffPipeline: the prompt embedding repeated for every frame
        pred = model(torch.cat([zt, zt[sel]]), torch.cat([t, t[sel]]),
                     encoder_hidden_states=torch.cat([enc, enc_w]).repeat_interleave(F_, dim=0)).sample
        err = ((pred - torch.cat([noise, noise[sel]])) ** 2).mean(dim=(1, 2, 3, 4))
        l_r = err[:a.bs]
        loss = (w * l_r).mean()
        if k:
            frac_t = (t[sel] - a.contrast_tmin).float() / max(1, 999 - a.contrast_tmin)
            margin = 1.1 + (a.contrast_margin_max - 1.1) * frac_t
            rank = torch.relu(margin * l_r[sel] - err[a.bs:]) / l_r[sel].detach()
            loss = loss + a.contrast * rank.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_ema = step_done(state, pairs, loss.item(), loss_ema, lr, t0, base)
        if state["step"] % 200 == 0:
            save()
    if a.train_words:
        changed = (emb.detach() != emb_before).any(dim=1).nonzero().flatten().tolist()
        assert set(changed) <= set(word_ids), changed
        print("embedding rows changed:", changed, flush=True)
    save()
    print(f"done step {state['step']} total train seconds {state['seconds']:.0f}", flush=True)


if __name__ == "__main__":
    main()
