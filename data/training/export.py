"""Assemble the trained parts into a diffusers StableDiffusionPipeline folder (fp16 safetensors).

Copies the real CLIP tokenizer files, sets the VAE scaling_factor measured by train_unet.py,
writes the sampling scheduler (SD1.5 betas) and gst-diffuse generation defaults.
"""
import argparse
import json
import os
import shutil

import torch
from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextModel, CLIPTokenizer

from common import clear_out_dir

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_DIR = os.path.join(HERE, "..", "..", "tests", "fixtures", "clip-tokenizer")
TOKENIZER_FILES = ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]

# Defaults for generation with this bundle (read by evaluate.py; meant for the C elements too).
DEFAULTS = {"num_inference_steps": 20, "guidance_scale": 5.0, "height": 64, "width": 64,
            "scheduler": "DPMSolverMultistepScheduler"}

def make_scheduler():
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", solver_order=2, algorithm_type="dpmsolver++",
        solver_type="midpoint", lower_order_final=True, steps_offset=1, timestep_spacing="leading")


def build(ckpt, vae_dir, ema=True):
    vae = AutoencoderKL.from_pretrained(vae_dir)
    scaling = json.load(open(os.path.join(ckpt, "scaling.json")))["scaling_factor"]
    vae.register_to_config(scaling_factor=scaling)
    sfx = "_ema" if ema else ""
    unet = UNet2DConditionModel.from_pretrained(os.path.join(ckpt, "unet" + sfx))
    te = CLIPTextModel.from_pretrained(os.path.join(ckpt, "text_encoder" + sfx))
    tok = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=make_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/tinysd/unet_ckpt")
    ap.add_argument("--vae", default="/tmp/tinysd/vae")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "tiny-sd"))
    ap.add_argument("--no-ema", action="store_true")
    ap.add_argument("--steps", type=int, default=DEFAULTS["num_inference_steps"])
    ap.add_argument("--guidance", type=float, default=DEFAULTS["guidance_scale"])
    a = ap.parse_args()
    pipe = build(a.ckpt, a.vae, ema=not a.no_ema)
    pipe.to(torch.float16)
    clear_out_dir(a.out)
    pipe.save_pretrained(a.out, safe_serialization=True)
    # the real CLIP tokenizer files, byte for byte
    # (only those: drop the generated tokenizer.json, 3.6 MB, which is derived from them)
    tdir = os.path.join(a.out, "tokenizer")
    for f in os.listdir(tdir):
        os.remove(os.path.join(tdir, f))
    for f in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(TOKENIZER_DIR, f), os.path.join(tdir, f))
    for sub in ("vae", "unet", "text_encoder", "scheduler"):
        for cfg_name in ("config.json", "scheduler_config.json"):
            cp = os.path.join(a.out, sub, cfg_name)
            if os.path.exists(cp):
                cfg = json.load(open(cp))
                if cfg.pop("_name_or_path", None) is not None:
                    with open(cp, "w") as f:
                        json.dump(cfg, f, indent=2, sort_keys=True)
                        f.write("\n")
    defaults = dict(DEFAULTS, num_inference_steps=a.steps, guidance_scale=a.guidance)
    with open(os.path.join(a.out, "gst-diffuse.json"), "w") as f:
        json.dump(defaults, f, indent=2)
        f.write("\n")
    total = 0
    for root, _, files in os.walk(a.out):
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
            total += os.path.getsize(os.path.join(root, f))
    print(f"exported to {os.path.abspath(a.out)}: {total/1e6:.2f} MB")


if __name__ == "__main__":
    main()
