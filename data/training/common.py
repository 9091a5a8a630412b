"""Shared definitions for the tiny-sd synthetic data set (shapes on coloured backgrounds).

Everything is deterministic: attribute lists, rendering and the held-out split.
"""
import itertools
import json
import os
import random
import shutil
import time

import numpy as np
from PIL import Image, ImageDraw

IMG = 64
SHAPES = ["circle", "square", "triangle"]
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (245, 215, 30),
    "purple": (140, 40, 190),
    "orange": (250, 140, 20),
}
BACKGROUNDS = {
    "white": (235, 235, 235),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "blue": (60, 90, 200),
    "green": (40, 140, 60),
    "yellow": (230, 210, 60),
}
SIZES = {"small": 14, "large": 26}  # nominal extent in pixels
POSITIONS = {
    "top left": (16, 16),
    "top right": (48, 16),
    "bottom left": (16, 48),
    "bottom right": (48, 48),
    "center": (32, 32),
}


def caption(shape, colour, size, pos, bg):
    where = "in the center" if pos == "center" else f"at the {pos}"
    return f"a {size} {colour} {shape} {where} on a {bg} background"


def all_combos():
    out = []
    for shape, colour, size, pos, bg in itertools.product(
            SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS):
        if colour == bg:
            continue
        out.append((shape, colour, size, pos, bg))
    return out


def split(n_heldout=200, seed=1234):
    """Return (train_combos, heldout_combos); held-out combos never appear in training."""
    combos = all_combos()
    rng = random.Random(seed)
    held = set(rng.sample(range(len(combos)), n_heldout))
    train = [c for i, c in enumerate(combos) if i not in held]
    test = [c for i, c in enumerate(combos) if i in held]
    return train, test


def render(shape, colour, size, pos, bg, rng, ss=4):
    """Render one 64x64 RGB image (uint8 HxWx3), anti-aliased by supersampling.

    rng (random.Random) adds small jitter to position and size."""
    cx, cy = POSITIONS[pos]
    cx += rng.uniform(-3, 3)
    cy += rng.uniform(-3, 3)
    s = SIZES[size] * rng.uniform(0.9, 1.1)
    return render_at(shape, colour, s, cx, cy, bg, ss)


# ---- clips for the motion adapter ------------------------------------------------------------

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
CLIP_FRAMES = 16
TRAVEL = 22.0  # pixels covered by the shape's centre over a clip (+-15%)
# Where the travel lies: the centre starts LEAD_IN x travel behind the middle and ends the rest of it
# beyond.  0.05 (the shipped adapter's clips, session 5): every clip starts at the very middle and
# moves toward the named side, so the word says where the shape ends up and every clip's first
# frames look alike whatever the direction.  The first adapter's clips (FIRST_ADAPTER_CLIPS below)
# were centred on the middle instead: a
# "leftward" clip was a "rightward" clip played backwards, and its direction followed the sampling
# noise, not the word (16%); see tiny-motion-adapter/README.md.
LEAD_IN = 0.05
CROSS = 4.0  # the other coordinate of the clip's centre is uniform in 32 +- CROSS
# The first adapter's clips (and what a latents.pt made before the clip options holds).
FIRST_ADAPTER_CLIPS = {"travel": 34.0, "lead_in": 0.5, "cross": 16.0}


def add_clip_options(ap, when):
    """--clip-travel/--clip-lead-in/--clip-cross (render_clip's travel, lead_in, cross; defaults: the
    shipped adapter's data); `when` says what they apply to.  clip_options(args) collects them."""
    ap.add_argument("--clip-travel", type=float, default=TRAVEL, help=f"{when}: render_clip's travel")
    ap.add_argument("--clip-lead-in", type=float, default=LEAD_IN, help=f"{when}: render_clip's lead_in")
    ap.add_argument("--clip-cross", type=float, default=CROSS, help=f"{when}: render_clip's cross")


def clip_options(args):
    return {"travel": args.clip_travel, "lead_in": args.clip_lead_in, "cross": args.clip_cross}


# The words the captions use for the directions.  Not "left"/"right": the image model reads those
# as positions (and their token embeddings are fixed by it); every token of these words is unused in
# the image captions, so the motion training can learn their embeddings (train_motion.py).
DIRECTION_WORDS = {"left": "leftward", "right": "rightward", "up": "upward", "down": "downward"}
# Starting embeddings for those words' tokens (train_motion.py --words-from-positions): the image
# model's own position words, so that the frozen image model already places a "moving leftward"
# shape left of the middle, where the clips (LEAD_IN) mostly have it; the filler tokens start as
# the caption's filler words.
WORD_TOKEN_INIT = {"lef": "left", "righ": "right", "upward</w>": "top", "downward</w>": "bottom",
                   "tw": "the", "ard</w>": "the", "moving</w>": "at"}


def motion_caption(shape, colour, size, direction, bg):
    return f"a {size} {colour} {shape} moving {DIRECTION_WORDS[direction]} on a {bg} background"


def motion_combos():
    out = []
    for shape, colour, size, direction, bg in itertools.product(
            SHAPES, COLOURS, SIZES, DIRECTIONS, BACKGROUNDS):
        if colour == bg:
            continue
        out.append((shape, colour, size, direction, bg))
    return out


def motion_split(n_heldout=100, seed=4321):
    """(train, heldout) motion combos; held-out combos never appear in motion training."""
    combos = motion_combos()
    rng = random.Random(seed)
    held = set(rng.sample(range(len(combos)), n_heldout))
    return ([c for i, c in enumerate(combos) if i not in held],
            [c for i, c in enumerate(combos) if i in held])


def render_clip(shape, colour, size, direction, bg, rng, frames=CLIP_FRAMES, travel=TRAVEL, lead_in=LEAD_IN,
                cross=CROSS):
    """Render a clip (frames x 64 x 64 x 3 uint8) of the shape moving at constant speed.

    The centre travels `travel` px (+-15%) along `direction`, from `lead_in` of it behind the
    middle (+-3 px) toward the named side; the other coordinate is uniform in 32 +- `cross`; size
    jitter as render()."""
    dx, dy = DIRECTIONS[direction]
    travel = travel * rng.uniform(0.85, 1.15)
    mid = 32 + rng.uniform(-3, 3)
    cross = rng.uniform(32 - cross, 32 + cross)
    s = rng.uniform(0.9, 1.1)
    out = []
    for f in range(frames):
        along = mid + (f / (frames - 1) - lead_in) * travel
        if dx:
            cx, cy = (along if dx > 0 else 64 - along), cross
        else:
            cx, cy = cross, (along if dy > 0 else 64 - along)
        out.append(render_at(shape, colour, SIZES[size] * s, cx, cy, bg))
    return np.stack(out)


def render_at(shape, colour, extent, cx, cy, bg, ss=4):
    """Render one 64x64 frame with the shape's centre at (cx, cy) and the given extent."""
    W = IMG * ss
    im = Image.new("RGB", (W, W), BACKGROUNDS[bg])
    d = ImageDraw.Draw(im)
    h = extent / 2
    col = COLOURS[colour]
    if shape == "circle":
        d.ellipse([(cx - h) * ss, (cy - h) * ss, (cx + h) * ss, (cy + h) * ss], fill=col)
    elif shape == "square":
        h2 = h * 0.9
        d.rectangle([(cx - h2) * ss, (cy - h2) * ss, (cx + h2) * ss, (cy + h2) * ss], fill=col)
    else:
        d.polygon([(cx * ss, (cy - h) * ss), ((cx - h) * ss, (cy + h) * ss), ((cx + h) * ss, (cy + h) * ss)],
                  fill=col)
    im = im.resize((IMG, IMG), Image.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


# ---- small helpers the training, export and evaluation scripts share --------------------------

def clear_out_dir(out, keep=("README.md", "samples.png", "evaluation.json")):
    """Empty an export folder before save_pretrained, keeping its hand-written README and the
    evaluation outputs (a file left from an older export would otherwise be loaded with the new one)."""
    if os.path.isdir(out):
        for name in os.listdir(out):
            if name not in keep:
                p = os.path.join(out, name)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def step_done(state, pairs, loss, loss_ema, lr, t0, base_seconds):
    """After an optimiser step: count it, move the EMA copies (pairs of (live, ema) tensors, decay
    warming up to 0.995), time it and log every 20 steps.  Returns the new smoothed loss."""
    import torch  # only the training scripts need it; common.py stays torch-free to import
    state["step"] += 1
    d = min(0.995, (1 + state["step"]) / (10 + state["step"]))
    with torch.no_grad():
        for p, pe in pairs:
            pe.mul_(d).add_(p.detach(), alpha=1 - d)
    state["seconds"] = base_seconds + time.time() - t0
    loss_ema = loss if loss_ema is None else 0.98 * loss_ema + 0.02 * loss
    if state["step"] % 20 == 0:
        print(f"step {state['step']} t={state['seconds']:.0f}s lr={lr:.2e} loss={loss:.4f} ema={loss_ema:.4f}",
              flush=True)
    return loss_ema


def model_defaults(model, steps=None, guidance=None):
    """(steps, guidance, scheduler): the given steps/guidance, else <model>/gst-diffuse.json's (what
    the elements use when the properties are not set), else 20 and 5; its scheduler name or None."""
    path = os.path.join(model, "gst-diffuse.json")
    cfg = json.load(open(path)) if os.path.exists(path) else {}
    return (steps or cfg.get("num_inference_steps", 20),
            guidance if guidance is not None else cfg.get("guidance_scale", 5.0), cfg.get("scheduler"))


def report(summary, prompts, results, keys, per_name, json_path):
    """Print an evaluation's summary; with json_path also write it with the per-prompt verdicts
    (`keys`) and what the analyser found, as a list named `per_name`."""
    print(json.dumps(summary, indent=1))
    if json_path:
        per = [{"prompt": p, **{k: r[k] for k in keys}, "found": r["found"]} for p, r in zip(prompts, results)]
        with open(json_path, "w") as f:
            json.dump(dict(summary, **{per_name: per}), f, indent=1)
