"""Evaluate the tiny motion adapter on the 100 held-out motion prompts (combinations of shape, colour,
size, direction and background never used in motion training).

Default: generates 16-frame clips with diffusers' AnimateDiffPipeline (CPU, float32, the image
bundle's scheduler and gst-diffuse.json defaults), analyses every frame (analyse.py) and reports:
- direction: the shape's centroid, averaged over the last 4 frames minus the first 4 frames where a
  shape is found, points the way the prompt says (the larger axis of the displacement, at least
  8 px; the training clips move 22 px);
- colour / shape: the majority over the frames matches the prompt.
--images DIR analyses existing frames instead (DIR/NNN_FF.png, NNN = prompt index in the order of
--write-prompts, FF = frame), e.g. made by the C pipeline or the diffuseanimate element.
"""
import argparse
import collections
import json
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from analyse import Analyser
from common import (CLIP_FRAMES, DIRECTIONS, add_clip_options, clip_options, model_defaults, motion_caption,
                    motion_split, report)

HERE = os.path.dirname(os.path.abspath(__file__))
MIN_TRAVEL = 8.0


def heldout():
    _, test = motion_split()
    return [(motion_caption(*c), c) for c in test]


def generate(model, adapter, prompts, frames, steps, guidance, bs=4, seed=0):
    from diffusers import AnimateDiffPipeline, MotionAdapter, StableDiffusionPipeline
    sd = StableDiffusionPipeline.from_pretrained(model, dtype=torch.float32)
    ad = MotionAdapter.from_pretrained(adapter, dtype=torch.float32)
    pipe = AnimateDiffPipeline.from_pipe(sd, motion_adapter=ad)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(prompts), bs):
        chunk = prompts[i:i + bs]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        r = pipe(chunk, num_frames=frames, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                 output_type="np")
        out.extend(list((np.asarray(r.frames) * 255).round().clip(0, 255).astype(np.uint8)))
    return out  # each (F, H, W, 3)


def direction_of(centroids):
    pts = [c for c in centroids if c is not None]
    if len(pts) < 8:
        return None, None
    a, b = np.mean(pts[:4], axis=0), np.mean(pts[-4:], axis=0)
    d = b - a
    if max(abs(d)) < MIN_TRAVEL:
        return "none", d.tolist()
    if abs(d[0]) >= abs(d[1]):
        return ("right" if d[0] > 0 else "left"), d.tolist()
    return ("down" if d[1] > 0 else "up"), d.tolist()


def contact_sheet(clips, prompts, results, path, n=16, per_row=8, scale=2):
    picks = sorted(set(np.linspace(0, len(clips) - 1, min(n, len(clips))).round().astype(int).tolist()))
    fw = 64 * scale
    cell_h = fw + 30
    sheet = Image.new("RGB", (per_row * (fw + 2) + 8, len(picks) * cell_h + 4), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for row, k in enumerate(picks):
        clip = clips[k]
        sel = np.linspace(0, len(clip) - 1, per_row).round().astype(int)
        y = row * cell_h + 4
        for j, f in enumerate(sel):
            sheet.paste(Image.fromarray(clip[f]).resize((fw, fw), Image.NEAREST), (4 + j * (fw + 2), y))
        ok = results[k]["direction"]
        found = results[k]["found"]["direction"]
        d.text((6, y + fw + 2), f"{prompts[k]}  ->  moved {found}", fill=(0, 110, 0) if ok else (170, 0, 0))
    sheet.save(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(HERE, "..", "tiny-sd"))
    ap.add_argument("--adapter", default=os.path.join(HERE, "..", "tiny-motion-adapter"))
    ap.add_argument("--frames", type=int, default=CLIP_FRAMES)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--every", type=int, default=1, help="take every k-th held-out prompt (quick checks)")
    ap.add_argument("--threads", type=int, default=1)
    add_clip_options(ap, "--ground-truth")
    ap.add_argument("--ground-truth", action="store_true",
                    help="analyse synthetic renders of the held-out clips (checks the analyser itself)")
    ap.add_argument("--images", help="analyse DIR/NNN_FF.png instead of generating")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--sheet", help="write a contact sheet PNG here")
    ap.add_argument("--write-prompts", help="write the held-out prompts (JSON list) and exit")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    items = heldout()[::a.every]
    prompts = [p for p, _ in items]
    if a.write_prompts:
        json.dump(prompts, open(a.write_prompts, "w"), indent=1)
        return
    steps, guidance, sched = model_defaults(a.model, a.steps, a.guidance)
    t0 = time.time()
    if a.ground_truth:
        import random
        from common import render_clip
        rng = random.Random(99)
        clips = [render_clip(*c, rng, frames=a.frames, **clip_options(a)) for _, c in items]
        source = "synthetic renders of the held-out clips (ground truth)"
    elif a.images:
        clips = []
        for i in range(len(prompts)):
            clips.append(np.stack([np.asarray(Image.open(os.path.join(a.images, f"{i:03d}_{f:02d}.png"))
                                              .convert("RGB").resize((64, 64))) for f in range(a.frames)]))
        source = f"frames in {a.images}"
    else:
        clips = generate(a.model, a.adapter, prompts, a.frames, steps, guidance)
        source = (f"diffusers AnimateDiffPipeline, {sched or 'bundle scheduler'}, {a.frames} frames, "
                  f"{steps} steps, guidance {guidance}")
    gen_s = time.time() - t0
    A = Analyser()
    res = []
    for clip, (_, c) in zip(clips, items):
        per = [A(f) for f in clip]
        direction, disp = direction_of([r["centroid"] for r in per])
        colours = collections.Counter(r["colour"] for r in per if r["colour"])
        shapes = collections.Counter(r["shape"] for r in per if r["shape"])
        found = {"direction": direction, "displacement": [round(v, 1) for v in disp] if disp else None,
                 "colour": colours.most_common(1)[0][0] if colours else None,
                 "shape": shapes.most_common(1)[0][0] if shapes else None,
                 "frames_with_shape": sum(r["centroid"] is not None for r in per)}
        rr = {"direction": direction == c[3], "colour": found["colour"] == c[1], "shape": found["shape"] == c[0],
              "found": found}
        rr["all"] = rr["direction"] and rr["colour"] and rr["shape"]
        res.append(rr)
    acc = {k: float(np.mean([r[k] for r in res])) for k in ("direction", "colour", "shape", "all")}
    for dname in DIRECTIONS:
        sel = [r for r, (_, c) in zip(res, items) if c[3] == dname]
        acc[f"direction_{dname}"] = float(np.mean([r["direction"] for r in sel])) if sel else None
    summary = {"source": source, "n": len(items), "accuracy": acc, "seconds": round(gen_s, 1)}
    report(summary, prompts, res, ("direction", "colour", "shape"), "per_clip", a.json)
    if a.sheet:
        contact_sheet(clips, prompts, res, a.sheet)


if __name__ == "__main__":
    main()
