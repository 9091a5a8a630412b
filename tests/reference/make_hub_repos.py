#!/usr/bin/env python3
"""Writes the repos that the test Hub (tests/core/hubserver.c) serves:
tests/fixtures/hub/repos.json and tests/fixtures/hub/repos/<folders>.

A diffusers-shaped pipeline repo (model_index.json + component folders, with
fp32 / fp16-variant safetensors, a pickle .bin, a safety checker) in three
revisions (main, tag v1.0, refs/pr/1), and a one-file repo served as gated and
as private.  Weights are tiny random tensors (not a working model): the hub
tests only move bytes.  Deterministic (fixed seed), so rerunning it leaves the
committed files unchanged.

    python3 tests/reference/make_hub_repos.py
"""
import json
import os
import shutil

import numpy as np
from safetensors.numpy import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "hub")
REPOS = os.path.join(ROOT, "repos")
rng = np.random.default_rng(1234)


def write(base, rel, data):
    path = os.path.join(base, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(path, mode) as f:
        f.write(data)


def st(base, rel, names, dtype=np.float32):
    path = os.path.join(base, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tensors = {n: rng.standard_normal(s).astype(dtype) for n, s in names.items()}
    save_file(tensors, path, metadata={"format": "pt"})


def js(obj):
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.30.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "requires_safety_checker": True,
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def pipeline(base, variant="main"):
    mi = dict(MODEL_INDEX)
    if variant == "v1.0":
        mi["_diffusers_version"] = "0.20.0"
    # a comment-only .gitattributes: real repos have one, and this one must not act on our own git tree
    write(base, ".gitattributes", "# (LFS attributes of a Hub repo would go here)\n")
    write(base, "README.md", f"---\nlibrary_name: diffusers\n---\n# tiny test pipeline ({variant})\n")
    write(base, "model_index.json", js(mi))
    write(base, "scheduler/scheduler_config.json",
          js({"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "num_train_timesteps": 1000, "skip_prk_steps": True}))
    write(base, "tokenizer/vocab.json", js({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "cat</w>": 3}))
    write(base, "tokenizer/merges.txt", "#version: 0.2\nc a\nca t</w>\n")
    write(base, "tokenizer/tokenizer_config.json", js({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}))
    write(base, "tokenizer/special_tokens_map.json", js({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}))
    write(base, "feature_extractor/preprocessor_config.json", js({"crop_size": 32, "image_processor_type": "CLIPImageProcessor"}))
    for comp, fname in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                        ("text_encoder", "model"), ("safety_checker", "model")):
        write(base, f"{comp}/config.json", js({"_class_name": comp, "hidden": 4}))
        st(base, f"{comp}/{fname}.safetensors", {f"{comp}.weight": (4, 4), f"{comp}.bias": (4,)})
        if comp != "safety_checker":
            st(base, f"{comp}/{fname}.fp16.safetensors", {f"{comp}.weight": (4, 4), f"{comp}.bias": (4,)}, np.float16)
    # a pickle checkpoint next to the safetensors (not to be fetched when safetensors exist)
    write(base, "unet/diffusion_pytorch_model.bin", b"PK\x03\x04 not a real pickle, only bytes for the file filter\n")
    if variant == "pr":
        write(base, "unet/extra.txt", "added in the pull request\n")


def main():
    if os.path.isdir(REPOS):
        shutil.rmtree(REPOS)
    pipeline(os.path.join(REPOS, "tiny-pipe", "main"))
    pipeline(os.path.join(REPOS, "tiny-pipe", "v1.0"), "v1.0")
    pipeline(os.path.join(REPOS, "tiny-pipe", "pr1"), "pr")
    # the older tag shares the unet weights of main (one blob for both)
    for rel in ("unet/diffusion_pytorch_model.safetensors",):
        shutil.copyfile(os.path.join(REPOS, "tiny-pipe", "main", rel), os.path.join(REPOS, "tiny-pipe", "v1.0", rel))
        shutil.copyfile(os.path.join(REPOS, "tiny-pipe", "main", rel), os.path.join(REPOS, "tiny-pipe", "pr1", rel))
    small = os.path.join(REPOS, "small")
    write(small, "config.json", js({"hidden": 2}))
    st(small, "model.safetensors", {"w": (2, 2)})
    manifest = {
        "token": "hf_diffuse_test_token",
        "repos": [
            {"id": "diffuse-test/tiny-pipe", "access": "public",
             "revisions": {"main": "repos/tiny-pipe/main", "v1.0": "repos/tiny-pipe/v1.0",
                           "refs/pr/1": "repos/tiny-pipe/pr1"}},
            {"id": "diffuse-test/gated", "access": "gated", "revisions": {"main": "repos/small"}},
            {"id": "diffuse-test/gated-denied", "access": "gated-denied", "revisions": {"main": "repos/small"}},
            {"id": "diffuse-test/private", "access": "private", "revisions": {"main": "repos/small"}},
            {"id": "single-name-repo", "access": "public", "revisions": {"main": "repos/small"}},
        ],
    }
    with open(os.path.join(ROOT, "repos.json"), "w") as f:
        f.write(js(manifest))


if __name__ == "__main__":
    main()
