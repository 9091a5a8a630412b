"""Evaluate tiny-sd on the 200 held-out prompts (attribute combinations never seen in training).

Default: generates with diffusers (CPU, float32, defaults from <model>/gst-diffuse.json), analyses
each image (analyse.py) and reports colour / shape / position accuracy.
--images DIR analyses existing images instead (DIR/000.png ... DIR/199.png, in the order of
--write-prompts), e.g. made by the C pipeline.
"""
import argparse
import json
import os
import textwrap
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from analyse import Analyser
from common import caption, model_defaults, report, split

HERE = os.path.dirname(os.path.abspath(__file__))


def heldout(train=False):
    tr, test = split()
    return [(caption(*c), c) for c in (tr if train else test)]


def generate(model, prompts, steps, guidance, scheduler=None, bs=20, seed=0):
    from diffusers import StableDiffusionPipeline
    import diffusers
    pipe = StableDiffusionPipeline.from_pretrained(model, dtype=torch.float32)
    if scheduler:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(prompts), bs):
        chunk = prompts[i:i + bs]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        r = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                 output_type="np")
        out.extend(list((r.images * 255).round().clip(0, 255).astype(np.uint8)))
    return out


def contact_sheet(images, prompts, results, path, n=30, cols=6, scale=2):
    cell_w, cell_h = 64 * scale + 16, 64 * scale + 52
    picks = sorted(set(np.linspace(0, len(images) - 1, min(n, len(images))).round().astype(int).tolist()))
    rows = (len(picks) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for slot, k in enumerate(picks):
        x, y = (slot % cols) * cell_w + 8, (slot // cols) * cell_h + 4
        sheet.paste(Image.fromarray(images[k]).resize((64 * scale, 64 * scale), Image.NEAREST), (x, y))
        ok = results[k]["all"]
        lines = textwrap.wrap(prompts[k], 26)[:3]
        for li, t in enumerate(lines):
            d.text((x - 4, y + 64 * scale + 2 + 12 * li), t, fill=(0, 110, 0) if ok else (170, 0, 0))
    sheet.save(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(HERE, "..", "tiny-sd"))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--scheduler", help="override the bundle's scheduler class")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--every", type=int, default=1, help="take every k-th held-out prompt (quick checks)")
    ap.add_argument("--images", help="analyse DIR/NNN.png instead of generating")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--sheet", help="write a contact sheet PNG here")
    ap.add_argument("--save-images", help="save the generated images into this folder")
    ap.add_argument("--train-prompts", action="store_true",
                    help="use training combinations instead of the held-out ones (to tell underfitting from poor generalisation)")
    ap.add_argument("--write-prompts", help="write the held-out prompts (JSON list) and exit")
    a = ap.parse_args()
    torch.set_num_threads(1)
    items = heldout(a.train_prompts)[::a.every][:a.n]
    prompts = [p for p, _ in items]
    if a.write_prompts:
        json.dump(prompts, open(a.write_prompts, "w"), indent=1)
        return
    steps, guidance, sched = model_defaults(a.model, a.steps, a.guidance)
    t0 = time.time()
    if a.images:
        images = [np.asarray(Image.open(os.path.join(a.images, f"{i:03d}.png")).convert("RGB").resize((64, 64)))
                  for i in range(len(prompts))]
        source = f"images in {a.images}"
    else:
        images = generate(a.model, prompts, steps, guidance, a.scheduler)
        source = f"diffusers, {a.scheduler or sched or 'bundle scheduler'}, {steps} steps, guidance {guidance}"
    gen_s = time.time() - t0
    if a.save_images:
        os.makedirs(a.save_images, exist_ok=True)
        for i, im in enumerate(images):
            Image.fromarray(im).save(os.path.join(a.save_images, f"{i:03d}.png"))
    A = Analyser()
    res = []
    for im, (_, c) in zip(images, items):
        r = A(im)
        rr = {"colour": r["colour"] == c[1], "shape": r["shape"] == c[0], "position": r["position"] == c[3],
              "found": r}
        rr["all"] = rr["colour"] and rr["shape"] and rr["position"]
        res.append(rr)
    acc = {k: float(np.mean([r[k] for r in res])) for k in ("colour", "shape", "position", "all")}
    # shape accuracy split by size (small shapes are the hard case)
    for size in ("small", "large"):
        sel = [r for r, (_, c) in zip(res, items) if c[2] == size]
        acc[f"shape_{size}"] = float(np.mean([r["shape"] for r in sel])) if sel else None
    summary = {"source": source, "n": len(items), "accuracy": acc, "seconds": round(gen_s, 1)}
    report(summary, prompts, res, ("colour", "shape", "position"), "per_image", a.json)
    if a.sheet:
        contact_sheet(images, prompts, res, a.sheet)


if __name__ == "__main__":
    main()
