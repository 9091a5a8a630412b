"""A simple analyser for generated shape images: colour, shape and position of the foreground shape.

- background colour: median of the 2-pixel border ring;
- foreground mask: pixels far (RGB distance > 60) from the background colour, largest component;
- colour: median RGB of the eroded mask, nearest of the named shape colours;
- position: centroid of the mask, nearest of the 5 nominal centres;
- shape: nearest class mean (standardised) of two features, fill = area / bbox area and
  top = share of the area in the upper half of the bbox; the class means are computed
  ("trained") from synthetic renders of the training combinations.
"""
import random

import numpy as np
from scipy import ndimage

from common import COLOURS, POSITIONS, SHAPES, render, split

_CNAMES = list(COLOURS)
_CVALS = np.array([COLOURS[c] for c in _CNAMES], dtype=np.float32)
_PNAMES = list(POSITIONS)
_PVALS = np.array([POSITIONS[p] for p in _PNAMES], dtype=np.float32)


def mask_of(img):
    img = img.astype(np.float32)
    ring = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                           img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg = np.median(ring, axis=0)
    m = np.linalg.norm(img - bg, axis=2) > 60
    lab, n = ndimage.label(m)
    if n == 0:
        return None
    sizes = ndimage.sum(m, lab, range(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def features(m):
    ys, xs = np.nonzero(m)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    area = m.sum()
    fill = area / float((y1 - y0) * (x1 - x0))
    top = m[y0:(y0 + y1) // 2].sum() / float(area) if y1 - y0 > 1 else 0.5
    return np.array([fill, top], dtype=np.float32)


class Analyser:
    def __init__(self, n_per_class=200, seed=7):
        train, _ = split()
        rng = random.Random(seed)
        feats = {s: [] for s in SHAPES}
        combos = [c for c in train]
        rng.shuffle(combos)
        for c in combos:
            if len(feats[c[0]]) >= n_per_class:
                continue
            m = mask_of(render(*c, rng))
            if m is not None:
                feats[c[0]].append(features(m))
        allf = np.concatenate([np.stack(v) for v in feats.values()])
        self.mu, self.sd = allf.mean(0), allf.std(0) + 1e-6
        self.means = np.stack([((np.stack(feats[s]) - self.mu) / self.sd).mean(0) for s in SHAPES])

    def __call__(self, img):
        """img: HxWx3 uint8 -> dict(colour, shape, position, centroid [x, y] in pixels)
        (None values if no shape found)."""
        m = mask_of(img)
        if m is None or m.sum() < 8:
            return {"colour": None, "shape": None, "position": None, "centroid": None}
        core = ndimage.binary_erosion(m, iterations=1)
        if core.sum() < 4:
            core = m
        rgb = np.median(img[core].astype(np.float32), axis=0)
        colour = _CNAMES[int(np.argmin(np.linalg.norm(_CVALS - rgb, axis=1)))]
        ys, xs = np.nonzero(m)
        c = np.array([xs.mean() + 0.5, ys.mean() + 0.5], dtype=np.float32)
        position = _PNAMES[int(np.argmin(np.linalg.norm(_PVALS - c, axis=1)))]
        f = (features(m) - self.mu) / self.sd
        shape = SHAPES[int(np.argmin(np.linalg.norm(self.means - f, axis=1)))]
        return {"colour": colour, "shape": shape, "position": position,
                "centroid": [round(float(c[0]), 2), round(float(c[1]), 2)]}
