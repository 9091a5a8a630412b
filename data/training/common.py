"""Shared definitions for the tiny-sd synthetic data set (shapes on coloured backgrounds).

Everything is deterministic: attribute lists, rendering and the held-out split.
"""
import itertools
import random

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
    W = IMG * ss
    im = Image.new("RGB", (W, W), BACKGROUNDS[bg])
    d = ImageDraw.Draw(im)
    cx, cy = POSITIONS[pos]
    cx += rng.uniform(-3, 3)
    cy += rng.uniform(-3, 3)
    s = SIZES[size] * rng.uniform(0.9, 1.1)
    h = s / 2
    col = COLOURS[colour]
    if shape == "circle":
        box = [(cx - h) * ss, (cy - h) * ss, (cx + h) * ss, (cy + h) * ss]
        d.ellipse(box, fill=col)
    elif shape == "square":
        h2 = h * 0.9  # same visual area class as the circle
        box = [(cx - h2) * ss, (cy - h2) * ss, (cx + h2) * ss, (cy + h2) * ss]
        d.rectangle(box, fill=col)
    else:  # upward isosceles triangle
        pts = [(cx * ss, (cy - h) * ss), ((cx - h) * ss, (cy + h) * ss),
               ((cx + h) * ss, (cy + h) * ss)]
        d.polygon(pts, fill=col)
    im = im.resize((IMG, IMG), Image.LANCZOS)
    return np.asarray(im, dtype=np.uint8)
