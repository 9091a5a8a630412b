#!/usr/bin/env python3
"""diffusers' side of the SD 1.5 GPU benchmark (tests/bench/gpu/run.sh).

  sd15_diffusers.py make  OUTDIR TOKENIZER_DIR   full-size SD 1.5 with random weights, fp16, diffusers format
  sd15_diffusers.py bench MODEL_DIR --out IMG.ppm --json FILE [--steps 20 --size 512 --runs 5 --seed 0]
  sd15_diffusers.py psnr  A.ppm B.ppm             PSNR (dB) of two 8-bit images
  sd15_diffusers.py diag  MODEL_DIR --outdir D --dtype float16|float32
        diagnostic outputs to compare with sd-bench-gpu's (--out/--vae-out/--te-out):
        D/diffusers-<dtype>-s<N>.ppm (N = 1, 2 steps), -s1g1.ppm (1 step, guidance 1), D/diffusers-<dtype>-vae.ppm (decode of
        fixed_latents), D/diffusers-<dtype>-te.bin (text encoder last hidden state of TE_IDS, f32)
  sd15_diffusers.py compare D                      PSNR / max difference of every pair in D
  sd15_diffusers.py blocks MODEL_DIR               where diffusers' own float16 run parts from its float32 run:
        one CFG UNet call on the same inputs, per block (max |x|, infs, relative error), then the
        first PNDM step and the VAE decode of its result

bench measures what sd-bench-gpu.c measures, the same way (see its header):
load_to_first_step_s (from_pretrained + .to("cuda") + the first generate up
to the end of its first step), total_s (median of --runs after that warm-up),
unet_step_ms (median step interval with a synchronize per step), vae_decode_ms,
text_encode_ms (encode_prompt with CFG: prompt + negative), peak_bytes
(torch.cuda.max_memory_allocated over the timed runs), peak_reserved_bytes.
Eager fp16, attention through torch SDPA (diffusers' default AttnProcessor2_0).
"""
import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time

import numpy as np
import torch

PROMPT = "a photograph of an astronaut riding a horse"


def make(outdir, tokdir, tiny=False):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # --tiny: the same structure with small widths (a smoke test of this script on a CPU)
    ch = (32, 64, 64, 64) if tiny else (320, 640, 1280, 1280)
    vch = (32, 32, 64, 64) if tiny else (128, 256, 512, 512)
    hid, layers = (64, 2) if tiny else (768, 12)
    with torch.device(dev):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=ch,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=hid, attention_head_dim=8)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
            block_out_channels=vch,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        te = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=hid, intermediate_size=4 * hid, num_hidden_layers=layers,
            num_attention_heads=12 if not tiny else 4, max_position_embeddings=77, hidden_act="quick_gelu",
            projection_dim=hid,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=1))
    tok_tmp = os.path.join(outdir + ".tok")
    os.makedirs(tok_tmp, exist_ok=True)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(tokdir, f), tok_tmp)
    tokenizer = CLIPTokenizer.from_pretrained(tok_tmp)
    tokenizer.model_max_length = 77
    sched = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1,
                          set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16)
    pipe.to("cpu")
    pipe.save_pretrained(outdir, safe_serialization=True)
    # transformers 5 saves tokenizer.json only; our tokenizer reads vocab.json + merges.txt
    for f in ("vocab.json", "merges.txt"):
        if not os.path.exists(os.path.join(outdir, "tokenizer", f)):
            shutil.copy(os.path.join(tokdir, f), os.path.join(outdir, "tokenizer", f))
    shutil.rmtree(tok_tmp)
    n = sum(p.numel() for p in unet.parameters())
    print(f"made {outdir}: unet {n / 1e6:.1f} M params, fp16")


def write_ppm(path, img):
    h, w, _ = img.shape
    with open(path, "wb") as f:
        f.write(b"P6\n%d %d\n255\n" % (w, h))
        f.write(img.tobytes())


def read_ppm(path):
    with open(path, "rb") as f:
        data = f.read()
    parts = data.split(maxsplit=4)
    assert parts[0] == b"P6", path
    w, h = int(parts[1]), int(parts[2])
    return np.frombuffer(parts[4][: w * h * 3], dtype=np.uint8).reshape(h, w, 3)


def fixed_latents(h):
    """[1, 4, h, h]: the values sd-bench-gpu.c decodes (a multiplicative hash of the index)"""
    i = np.arange(4 * h * h, dtype=np.uint64)
    s = (i * np.uint64(2654435761)) % np.uint64(2 ** 32)
    return ((s.astype(np.float64) / 2 ** 32 - 0.5) * 4.0).astype(np.float32).reshape(1, 4, h, h)


TE_IDS = [49406, 320] + [49407] * 75   # sd-bench-gpu.c's text-encode ids


def diag(a):
    from diffusers import StableDiffusionPipeline

    dt = getattr(torch, a.dtype)
    pipe = StableDiffusionPipeline.from_pretrained(a.model, torch_dtype=dt, safety_checker=None,
                                                   requires_safety_checker=False).to(a.device)
    pipe.set_progress_bar_config(disable=True)
    os.makedirs(a.outdir, exist_ok=True)
    tag = os.path.join(a.outdir, "diffusers-" + a.dtype)
    for steps, cfg, name in ((1, 7.5, "s1"), (2, 7.5, "s2"), (1, 1.0, "s1g1")):
        g = torch.Generator("cpu").manual_seed(0)
        img = pipe(PROMPT, height=512, width=512, num_inference_steps=steps, guidance_scale=cfg, generator=g,
                   output_type="np").images[0]
        write_ppm(f"{tag}-{name}.ppm", (np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    with torch.no_grad():
        lat = torch.from_numpy(fixed_latents(64)).to(a.device, dt)
        x = pipe.vae.decode(lat, return_dict=False)[0].float()
        u8 = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy()
        write_ppm(f"{tag}-vae.ppm", np.ascontiguousarray(u8))
        h = pipe.text_encoder(torch.tensor([TE_IDS], device=a.device))[0].float().cpu().numpy()
        h.tofile(f"{tag}-te.bin")


def compare(d):
    rows = []
    for f in sorted(os.listdir(d)):
        if not f.startswith("diffusers-"):
            continue
        o = os.path.join(d, "ours-" + f[len("diffusers-"):])
        if not os.path.exists(o):
            continue
        p = os.path.join(d, f)
        if f.endswith(".ppm"):
            x, y = read_ppm(p).astype(np.float64), read_ppm(o).astype(np.float64)
            mse = float(np.mean((x - y) ** 2))
            v = float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)
            rows.append(f"{f[len('diffusers-'):]:28s} PSNR {v:7.2f} dB  max |diff| {np.abs(x - y).max():.0f} levels")
        else:
            x, y = np.fromfile(p, dtype=np.float32), np.fromfile(o, dtype=np.float32)
            if x.shape != y.shape:
                rows.append(f"{f}: sizes differ {x.shape} {y.shape}")
                continue
            rows.append(f"{f[len('diffusers-'):]:28s} max |diff| {np.abs(x - y).max():.4g}  max |want| "
                        f"{np.abs(x).max():.4g}  corr {np.corrcoef(x, y)[0, 1]:.6f}")
    # the same side in f16 against f32: how far f16 alone moves each side
    for side in ("diffusers", "ours"):
        for name in ("s1", "s1g1", "vae"):
            p, o = (os.path.join(d, f"{side}-{t}-{name}.ppm") for t in ("float16", "float32"))
            if os.path.exists(p) and os.path.exists(o):
                x, y = read_ppm(p).astype(np.float64), read_ppm(o).astype(np.float64)
                mse = float(np.mean((x - y) ** 2))
                v = float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)
                rows.append(f"{side} f16 vs f32 {name:12s} PSNR {v:7.2f} dB")
    print("\n".join(rows))


def blocks(a):
    from diffusers import StableDiffusionPipeline

    DEV = os.environ.get("SD15_DEVICE", "cuda")   # cpu: a smoke test on a --tiny model
    pipes = {}
    for dt in (torch.float32, torch.float16):
        p = StableDiffusionPipeline.from_pretrained(a.model, torch_dtype=dt, safety_checker=None,
                                                    requires_safety_checker=False).to(DEV)
        p.set_progress_bar_config(disable=True)
        pipes[dt] = p
    p32 = pipes[torch.float32]
    with torch.no_grad():
        cond, uncond = p32.encode_prompt(PROMPT, torch.device(DEV), 1, True, None)
        emb = torch.cat([uncond, cond])
        lat = torch.randn(1, 4, 64, 64, generator=torch.Generator("cpu").manual_seed(0)).to(DEV)
        x = torch.cat([lat, lat])
        p32.scheduler.set_timesteps(20)
        t = p32.scheduler.timesteps[0]
        outs = {}
        for dt, p in pipes.items():
            rec = []
            hooks = []
            mods = [("conv_in", p.unet.conv_in), ("time_embedding", p.unet.time_embedding)]
            mods += [(f"down_blocks.{i}", m) for i, m in enumerate(p.unet.down_blocks)]
            mods += [("mid_block", p.unet.mid_block)]
            mods += [(f"up_blocks.{i}", m) for i, m in enumerate(p.unet.up_blocks)]
            mods += [("conv_norm_out", p.unet.conv_norm_out), ("conv_out", p.unet.conv_out)]
            for name, m in mods:
                hooks.append(m.register_forward_hook(
                    lambda mod, inp, out, name=name: rec.append((name, (out[0] if isinstance(out, tuple) else out).float()))))
            eps = p.unet(x.to(dt), t, encoder_hidden_states=emb.to(dt)).sample.float()
            for h in hooks:
                h.remove()
            outs[dt] = (rec, eps)
        r32, e32 = outs[torch.float32]
        r16, e16 = outs[torch.float16]
        print(f"{'module':16s} {'max|f32|':>10s} {'max|f16|':>10s} {'inf16':>7s} {'rel err':>9s}")
        for (n, a32), (_, a16) in zip(r32, r16):
            fin = torch.isfinite(a16)
            err = ((a16 - a32).abs()[fin].max() / a32.abs().max().clamp_min(1e-30)).item() if fin.any() else float("nan")
            print(f"{n:16s} {a32.abs().max().item():10.4g} {a16.abs().max().item():10.4g} "
                  f"{(~fin).sum().item():7d} {err:9.3g}")
        for name, e in (("eps f32", e32), ("eps f16", e16)):
            u, c = e.chunk(2)
            g = u + 7.5 * (c - u)
            print(f"{name}: max|eps| {e.abs().max().item():.4g}  max|cond-uncond| {(c - u).abs().max().item():.4g}  "
                  f"max|guided| {g.abs().max().item():.4g}")
        # the first PNDM step and the decode, each side in its own dtype
        imgs = {}
        for dt, (_, e) in outs.items():
            p = pipes[dt]
            p.scheduler.set_timesteps(20)
            u, c = e.to(dt).chunk(2)
            g = u + 7.5 * (c - u)
            nxt = p.scheduler.step(g, t, lat.to(dt)).prev_sample
            dec = p.vae.decode(nxt / p.vae.config.scaling_factor).sample.float()
            print(f"{str(dt):14s} step 1: max|latents| {nxt.float().abs().max().item():.4g} "
                  f"infs {(~torch.isfinite(nxt)).sum().item()}; decode max|x| {dec.abs().max().item():.4g} "
                  f"infs {(~torch.isfinite(dec)).sum().item()}")
            imgs[dt] = dec
        d = (imgs[torch.float16] - imgs[torch.float32]).abs()
        print(f"decoded f16 vs f32: max diff {d.max().item():.4g} (of range 2), mean {d.mean().item():.4g}")


def bench(a):
    from diffusers import StableDiffusionPipeline

    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    first = {}

    def cb_first(pipe, i, t, kw):
        if "t" not in first:
            sync()
            first["t"] = time.perf_counter()
        return kw

    steps_t = []

    def cb_steps(pipe, i, t, kw):
        sync()
        steps_t.append(time.perf_counter())
        return kw

    def run(cb=None):
        # the initial latents drawn in float32 and cast, passed explicitly: torch.randn(dtype=float16) on the
        # CPU is not the same stream in every torch release (on the GPU image's torch 2.11 it differs from
        # float32's, so diffusers' own fp16 image parted from its fp32 one at 13 dB; on torch 2.15 the two
        # agree), while sd-bench-gpu draws as torch 2.15 does; with explicit latents both sides start alike
        g = torch.Generator("cpu").manual_seed(a.seed)
        lat = torch.randn(1, 4, a.size // 8, a.size // 8, generator=g, dtype=torch.float32)
        lat = lat.to(a.device, getattr(torch, a.dtype))
        out = pipe(PROMPT, height=a.size, width=a.size, num_inference_steps=a.steps, guidance_scale=a.guidance,
                   generator=g, latents=lat, output_type="np", callback_on_step_end=cb)
        sync()
        return out.images[0]

    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(a.model, torch_dtype=getattr(torch, a.dtype), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.to(a.device)
    pipe.set_progress_bar_config(disable=True)
    run(cb_first)
    load_first = first["t"] - t0

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    totals = []
    for r in range(a.runs):
        s = time.perf_counter()
        img = run()
        totals.append(time.perf_counter() - s)
        if r == 0:
            u8 = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
            write_ppm(a.out, u8)
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    peak_res = torch.cuda.max_memory_reserved() if cuda else 0

    steps_t.append(time.perf_counter())
    run(cb_steps)
    iv = [(steps_t[i + 1] - steps_t[i]) * 1e3 for i in range(1, len(steps_t) - 1)]
    unet_step = statistics.median(iv)

    h = a.size // 8
    lat = (torch.rand(1, 4, h, h, generator=torch.Generator("cpu").manual_seed(1)) - 0.5) * 4.0
    lat = lat.to(a.device, pipe.vae.dtype)
    ts = []
    with torch.no_grad():
        for r in range(6):
            s = time.perf_counter()
            pipe.vae.decode(lat, return_dict=False)
            sync()
            ts.append((time.perf_counter() - s) * 1e3)
    vae_ms = statistics.median(ts[1:])
    ts = []
    with torch.no_grad():
        for r in range(6):
            s = time.perf_counter()
            pipe.encode_prompt(PROMPT, torch.device(a.device), 1, True, None)
            sync()
            ts.append((time.perf_counter() - s) * 1e3)
    te_ms = statistics.median(ts[1:])

    res = dict(side="diffusers", card=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
               diffusers=__import__("diffusers").__version__, dtype=a.dtype, size=a.size, steps=a.steps,
               guidance=a.guidance, runs=a.runs, load_to_first_step_s=round(load_first, 4),
               total_s=round(statistics.median(totals), 4), total_min_s=round(min(totals), 4),
               unet_step_ms=round(unet_step, 3), vae_decode_ms=round(vae_ms, 3), text_encode_ms=round(te_ms, 3),
               peak_bytes=peak, peak_reserved_bytes=peak_res,
               attn_processor=type(pipe.unet.attn_processors[next(iter(pipe.unet.attn_processors))]).__name__)
    line = json.dumps(res)
    print(line)
    with open(a.json, "w") as f:
        f.write(line + "\n")


def psnr(pa, pb):
    x = read_ppm(pa).astype(np.float64)
    y = read_ppm(pb).astype(np.float64)
    mse = float(np.mean((x - y) ** 2))
    v = float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)
    print(json.dumps(dict(psnr_db=v, mse=mse, a=pa, b=pb, mean_a=float(x.mean()), mean_b=float(y.mean()))))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("outdir")
    m.add_argument("tokdir")
    m.add_argument("--tiny", action="store_true")
    b = sub.add_parser("bench")
    b.add_argument("model")
    b.add_argument("--out", required=True)
    b.add_argument("--json", required=True)
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--size", type=int, default=512)
    b.add_argument("--runs", type=int, default=5)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--guidance", type=float, default=7.5)
    b.add_argument("--device", default="cuda")
    b.add_argument("--dtype", default="float16", help="float32 for CPU smoke tests")
    p = sub.add_parser("psnr")
    p.add_argument("a")
    p.add_argument("b")
    g = sub.add_parser("diag")
    g.add_argument("model")
    g.add_argument("--outdir", required=True)
    g.add_argument("--dtype", default="float16")
    g.add_argument("--device", default="cuda")
    k = sub.add_parser("blocks")
    k.add_argument("model")
    c = sub.add_parser("compare")
    c.add_argument("dir")
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.outdir, a.tokdir, a.tiny)
    elif a.cmd == "bench":
        bench(a)
    elif a.cmd == "diag":
        diag(a)
    elif a.cmd == "blocks":
        blocks(a)
    elif a.cmd == "compare":
        compare(a.dir)
    else:
        psnr(a.a, a.b)


if __name__ == "__main__":
    sys.exit(main())
