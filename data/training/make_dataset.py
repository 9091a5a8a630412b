"""Generate the synthetic training set for tiny-sd.

Writes <out>/images.npy (N,64,64,3 uint8), <out>/captions.json, <out>/split.json.
Held-out attribute combinations (200, used by evaluate.py) are excluded.
"""
import argparse
import json
import os
import random

import numpy as np

from common import all_combos, caption, render, split


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/tinysd/data")
    ap.add_argument("--variants", type=int, default=8, help="jittered renders per training combo")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    train, test = split()
    rng = random.Random(a.seed)
    imgs, caps = [], []
    for c in train:
        for _ in range(a.variants):
            imgs.append(render(*c, rng))
            caps.append(caption(*c))
    imgs = np.stack(imgs)
    np.save(os.path.join(a.out, "images.npy"), imgs)
    with open(os.path.join(a.out, "captions.json"), "w") as f:
        json.dump(caps, f)
    with open(os.path.join(a.out, "split.json"), "w") as f:
        json.dump({"train": train, "heldout": test, "n_all": len(all_combos())}, f)
    print(f"{len(train)} train combos x {a.variants} = {len(imgs)} images; {len(test)} held-out combos")


if __name__ == "__main__":
    main()
