"""Train the tiny CLIPTextModel + UNet2DConditionModel jointly on VAE latents (epsilon prediction).

SD1.5 noise schedule (scaled_linear 0.00085..0.012, 1000 steps), min-SNR(5) loss weighting,
caption dropped to "" 10% of the time for classifier-free guidance, EMA of weights.
Inputs: <data>/images.npy + captions.json (make_dataset.py) and the trained VAE (train_vae.py).
Checkpoints (diffusers/transformers format, fp32) go to <out>/{unet,text_encoder,unet_ema,text_encoder_ema}.
"""
import argparse
import copy
import json
import math
import os
import time

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from common import step_done

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_DIR = os.path.join(HERE, "..", "..", "tests", "fixtures", "clip-tokenizer")
TEXT_DIM = 64


def make_text_encoder():
    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        hidden_act="quick_gelu", projection_dim=TEXT_DIM,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    return CLIPTextModel(cfg)


def make_unet():
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
    )


def noise_scheduler():
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, prediction_type="epsilon")


@torch.no_grad()
def encode_latents(vae, images, bs=64):
    means, stds = [], []
    for i in range(0, len(images), bs):
        x = torch.from_numpy(images[i:i + bs]).permute(0, 3, 1, 2).float() / 127.5 - 1
        d = vae.encode(x).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/tmp/tinysd/data")
    ap.add_argument("--vae", default="/tmp/tinysd/vae")
    ap.add_argument("--out", default="/tmp/tinysd/unet_ckpt")
    ap.add_argument("--minutes", type=float, default=45)
    ap.add_argument("--bs", type=int, default=64)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=10**9)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layout-frac", type=float, default=0.0,
                    help="share of each batch whose timestep is drawn from [300, 900) instead of [0, 1000): "
                         "the noise levels where the image's layout (the shape's position) is decided")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    os.makedirs(a.out, exist_ok=True)

    vae = AutoencoderKL.from_pretrained(a.vae).eval()
    images = np.load(os.path.join(a.data, "images.npy"))
    captions = json.load(open(os.path.join(a.data, "captions.json")))
    lat_cache = os.path.join(a.out, "latents.pt")
    if os.path.exists(lat_cache):
        mean, std = torch.load(lat_cache)
    else:
        t = time.time()
        mean, std = encode_latents(vae, images)
        torch.save((mean, std), lat_cache)
        print(f"encoded {len(images)} latents in {time.time()-t:.0f}s", flush=True)
    g = torch.Generator().manual_seed(a.seed)
    sample = mean + std * torch.randn(mean.shape, generator=g)
    scaling = float(1.0 / sample.std())
    print(f"latent shape {tuple(mean.shape[1:])} std={sample.std():.4f} mean={sample.mean():.4f} -> scaling_factor={scaling:.5f}", flush=True)
    with open(os.path.join(a.out, "scaling.json"), "w") as f:
        json.dump({"scaling_factor": scaling}, f)

    tok = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    uniq = sorted(set(captions)) + [""]
    cap_index = {c: i for i, c in enumerate(uniq)}
    ids_all = tok(uniq, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
    cap_ids = torch.tensor([cap_index[c] for c in captions])
    empty_id = cap_index[""]

    if a.resume and os.path.exists(os.path.join(a.out, "unet")):
        unet = UNet2DConditionModel.from_pretrained(os.path.join(a.out, "unet"))
        te = CLIPTextModel.from_pretrained(os.path.join(a.out, "text_encoder"))
        unet_ema = UNet2DConditionModel.from_pretrained(os.path.join(a.out, "unet_ema"))
        te_ema = CLIPTextModel.from_pretrained(os.path.join(a.out, "text_encoder_ema"))
        state = json.load(open(os.path.join(a.out, "state.json")))
    else:
        unet, te = make_unet(), make_text_encoder()
        unet_ema, te_ema = copy.deepcopy(unet), copy.deepcopy(te)
        state = {"step": 0, "seconds": 0.0}
    print("unet params", sum(p.numel() for p in unet.parameters()),
          "text params", sum(p.numel() for p in te.parameters()), flush=True)
    params = list(unet.parameters()) + list(te.parameters())
    ema_params = list(unet_ema.parameters()) + list(te_ema.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    opt_path = os.path.join(a.out, "opt.pt")
    if a.resume and os.path.exists(opt_path):
        opt.load_state_dict(torch.load(opt_path))
    sched = noise_scheduler()
    acp = sched.alphas_cumprod
    n = len(captions)

    def save():
        unet.save_pretrained(os.path.join(a.out, "unet"))
        te.save_pretrained(os.path.join(a.out, "text_encoder"))
        unet_ema.save_pretrained(os.path.join(a.out, "unet_ema"))
        te_ema.save_pretrained(os.path.join(a.out, "text_encoder_ema"))
        torch.save(opt.state_dict(), opt_path)
        with open(os.path.join(a.out, "state.json"), "w") as f:
            json.dump(state, f)

    t0 = time.time()
    base_seconds = state["seconds"]
    budget = a.minutes * 60
    step0 = state["step"]
    loss_ema = None
    warm = 100
    while state["step"] - step0 < a.max_steps:
        el = time.time() - t0
        if el > budget:
            break
        frac = min(1.0, el / budget)
        step = state["step"]
        lr = a.lr * min(1.0, (step + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for gp in opt.param_groups:
            gp["lr"] = lr
        idx = torch.from_numpy(rng.integers(0, n, a.bs))
        z0 = (mean[idx] + std[idx] * torch.randn(a.bs, *mean.shape[1:])) * scaling
        ci = cap_ids[idx].clone()
        drop = torch.rand(a.bs) < 0.1
        ci[drop] = empty_id
        ids = ids_all[ci]
        t = torch.randint(0, 1000, (a.bs,))
        n_layout = int(round(a.layout_frac * a.bs))
        if n_layout:
            t[:n_layout] = torch.randint(300, 900, (n_layout,))
        noise = torch.randn_like(z0)
        ab = acp[t].view(-1, 1, 1, 1)
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
        enc = te(ids)[0]
        pred = unet(zt, t, encoder_hidden_states=enc).sample
        snr = ab.view(-1) / (1 - ab.view(-1))
        w = torch.clamp(snr, max=5.0) / snr
        loss = (w * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_ema = step_done(state, list(zip(params, ema_params)), loss.item(), loss_ema, lr, t0, base_seconds)
        if state["step"] % 200 == 0:
            save()
    save()
    print(f"done step {state['step']} total train seconds {state['seconds']:.0f}", flush=True)


if __name__ == "__main__":
    main()
