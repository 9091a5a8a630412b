"""Where the image model alone puts the shape for a motion prompt.

Single images (diffusers StableDiffusionPipeline of --model, its gst-diffuse.json steps / guidance) for
the first --n held-out motion prompts: how often the shape keeps the prompt's colour and lies on the
side of the middle the direction word names (centroid > 2 px past the middle along the direction).
A quick check of the direction words' embeddings before any motion training (session 4: shipped rows
25%, train_motion.py --words-from-positions rows 90%).

    python3 word_placement.py --model M
"""
import argparse
import os

import numpy as np
import torch

from analyse import Analyser
from common import DIRECTIONS, model_defaults
from evaluate_motion import heldout

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(HERE, "..", "tiny-sd"))
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(a.model, dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    A = Analyser()
    steps, guidance, _ = model_defaults(a.model)
    items = heldout()[:a.n]
    colour = side = 0
    for i, (p, c) in enumerate(items):
        img = pipe(p, num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(i),
                   output_type="np").images[0]
        r = A((img * 255).round().astype(np.uint8))
        colour += r["colour"] == c[1]
        if r["centroid"] is not None:
            dx, dy = DIRECTIONS[c[3]]
            side += (r["centroid"][0] - 32) * dx + (r["centroid"][1] - 32) * dy > 2
    print(f"{a.model}: {len(items)} images, colour {colour / len(items):.0%}, on the named side {side / len(items):.0%}")


if __name__ == "__main__":
    main()
