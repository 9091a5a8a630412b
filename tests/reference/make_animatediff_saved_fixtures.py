#!/usr/bin/env python3
"""Reference outputs for AnimateDiff pipelines saved by diffusers (tests/core/test-animate.c).

AnimateDiffPipeline.save_pretrained() stores its unet as a UNetMotionModel (the 2-D
weights and the motion modules in one file, config with the *Motion block types and
the motion keys) next to the motion_adapter it was made from.
AnimateDiffPipeline.from_pretrained(folder) then runs the unet's own motion modules:
the motion_adapter/ folder is loaded but unused.

The pipeline is the tiny SD pipeline tests/fixtures/pipelines/tiny-sd with the tiny
adapter tests/fixtures/animatediff/b (no mid-block motion module, heads (1, 4) and
temporal depths (2, 1) per block, stored positional tables perturbed), scheduler
DDIM with the seed's linear-beta settings, fp32.  It is saved with
AnimateDiffPipeline.save_pretrained(safe_serialization=True) into a temporary folder,
then copied to tests/fixtures/animatediff/saved-pipeline/:
  model_index.json, scheduler/, unet/  as diffusers wrote them ("_name_or_path", a path
                                        on the machine that made them, dropped)
  vae, text_encoder, tokenizer          symbolic links to ../../pipelines/tiny-sd/<name>
  motion_adapter                        a symbolic link to ../b
                                        (each checked here to hold the very tensors /
                                        files diffusers wrote; keeps the fixture small)
Outputs (besides the folder):
  saved-frames.safetensors  AnimateDiffPipeline.from_pretrained(saved-pipeline) frames,
                            output_type="np", as 8-bit (round(x * 255)), one per case
  saved-cases.json          the cases, and the parameter count of the loaded unet

Sanity checks run here (no output): the folder's motion_adapter/ weights perturbed give
the same frames; the unet's motion modules perturbed give other frames.

Run from the repository root:  python3 tests/reference/make_animatediff_saved_fixtures.py
"""
import filecmp
import json
import os
import shutil
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import diffusers
from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, StableDiffusionPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
OUT = os.path.join(FIX, "animatediff")
SAVED = os.path.join(OUT, "saved-pipeline")
SD = os.path.join(FIX, "pipelines", "tiny-sd")
ADAPTER = os.path.join(OUT, "b")
LINKED = ("vae", "text_encoder", "tokenizer")

DDIM_LINEAR = dict(clip_sample=False, timestep_spacing="linspace", beta_schedule="linear", steps_offset=1)

# (id, frames, steps, guidance, seed, w, h, prompt, negative, chunk)
CASES = [
    ("saved-cfg", 8, 3, 7.5, 42, 32, 32, "a red ball bouncing", None, 16),
    ("saved-nocfg", 6, 2, 1.0, 7, 24, 32, "clouds moving", None, 4),
]


def to_u8(x):
    return np.ascontiguousarray(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8))


def run(pipe, case):
    (cid, nf, steps, g, seed, w, h, prompt, neg, chunk) = case
    out = pipe(prompt, negative_prompt=neg, num_frames=nf, num_inference_steps=steps, guidance_scale=g,
               width=w, height=h, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
               decode_chunk_size=chunk).frames
    return to_u8(out[0])


def same_tensors(a, b):
    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def strip_name_or_path(path):
    with open(path) as f:
        cfg = json.load(f)
    cfg.pop("_name_or_path", None)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def perturb(path, pred, gen):
    t = load_file(path)
    n = 0
    for k in t:
        if pred(k):
            t[k] = t[k] + torch.randn(t[k].shape, generator=gen) * 0.5
            n += 1
    assert n > 0
    save_file(t, path, metadata={"format": "pt"})


def main():
    torch.set_num_threads(2)
    sd = StableDiffusionPipeline.from_pretrained(SD)
    adapter = MotionAdapter.from_pretrained(ADAPTER)
    pipe = AnimateDiffPipeline.from_pipe(sd, motion_adapter=adapter)
    pipe.scheduler = DDIMScheduler.from_config(sd.scheduler.config, **DDIM_LINEAR)

    tmp = tempfile.mkdtemp()
    try:
        folder = os.path.join(tmp, "saved")
        pipe.save_pretrained(folder, safe_serialization=True)
        # the components taken from tiny-sd unchanged: link them instead of copying
        for name in LINKED:
            src = os.path.join(SD, name)
            for f in os.listdir(os.path.join(folder, name)):
                mine, theirs = os.path.join(folder, name, f), os.path.join(src, f)
                if name == "tokenizer" and f not in ("vocab.json", "merges.txt"):
                    continue   # tokenizer.json etc. are derived from the vocabulary and merges
                assert os.path.exists(theirs), theirs
                if f.endswith(".safetensors"):
                    assert same_tensors(mine, theirs), mine
                elif f.endswith(".json") and f != "special_tokens_map.json" and f != "tokenizer_config.json":
                    a, b = json.load(open(mine)), json.load(open(theirs))
                    for k in ("_name_or_path", "dtype", "torch_dtype", "transformers_version"):
                        a.pop(k, None)   # bookkeeping renamed between transformers versions
                        b.pop(k, None)
                    assert a == b, mine
                elif f in ("vocab.json", "merges.txt"):
                    assert filecmp.cmp(mine, theirs, shallow=False), mine
        if os.path.exists(SAVED):
            shutil.rmtree(SAVED)
        os.makedirs(SAVED)
        # "_name_or_path" (where the components came from: a path on this machine) is dropped
        strip_name_or_path(os.path.join(folder, "model_index.json"))
        strip_name_or_path(os.path.join(folder, "motion_adapter", "config.json"))
        shutil.copy(os.path.join(folder, "model_index.json"), SAVED)
        for name in ("scheduler", "unet"):
            shutil.copytree(os.path.join(folder, name), os.path.join(SAVED, name))
        for name in LINKED:
            os.symlink(os.path.join("..", "..", "pipelines", "tiny-sd", name), os.path.join(SAVED, name))
        # motion_adapter/ is adapter b as it was loaded: link it too
        assert same_tensors(os.path.join(folder, "motion_adapter", "diffusion_pytorch_model.safetensors"),
                            os.path.join(ADAPTER, "diffusion_pytorch_model.safetensors"))
        assert json.load(open(os.path.join(folder, "motion_adapter", "config.json"))) == \
            json.load(open(os.path.join(ADAPTER, "config.json")))
        os.symlink(os.path.join("..", "b"), os.path.join(SAVED, "motion_adapter"))
    finally:
        shutil.rmtree(tmp)

    loaded = AnimateDiffPipeline.from_pretrained(SAVED)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.unet).__name__ == "UNetMotionModel"
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    frames, cases = {}, []
    for case in CASES:
        (cid, nf, steps, g, seed, w, h, prompt, neg, chunk) = case
        frames[cid] = torch.from_numpy(run(loaded, case))   # [F, H, W, 3]
        cases.append(dict(id=cid, num_frames=nf, steps=steps, guidance=g, seed=seed, width=w, height=h,
                          prompt=prompt, negative_prompt=neg, decode_chunk_size=chunk))
        print(cid, tuple(frames[cid].shape))
    save_file(frames, os.path.join(OUT, "saved-frames.safetensors"))
    unet_params = sum(p.numel() for p in loaded.unet.parameters())
    with open(os.path.join(OUT, "saved-cases.json"), "w") as f:
        json.dump({"diffusers": diffusers.__version__, "torch": torch.__version__, "folder": "saved-pipeline",
                   "unet_params": unet_params, "cases": cases}, f, indent=1)

    # sanity: the motion_adapter/ weights do not matter, the unet's motion modules do
    gen = torch.Generator().manual_seed(3)
    tmp = tempfile.mkdtemp()
    try:
        copy = os.path.join(tmp, "copy")
        shutil.copytree(SAVED, copy, symlinks=False)
        perturb(os.path.join(copy, "motion_adapter", "diffusion_pytorch_model.safetensors"), lambda k: True, gen)
        p2 = AnimateDiffPipeline.from_pretrained(copy)
        p2.set_progress_bar_config(disable=True)
        assert np.array_equal(run(p2, CASES[0]), frames[CASES[0][0]].numpy())
        perturb(os.path.join(copy, "unet", "diffusion_pytorch_model.safetensors"),
                lambda k: ".motion_modules." in k and k.endswith("proj_out.weight"), gen)
        p3 = AnimateDiffPipeline.from_pretrained(copy)
        p3.set_progress_bar_config(disable=True)
        d = np.abs(run(p3, CASES[0]).astype(int) - frames[CASES[0][0]].numpy().astype(int)).max()
        print("unet motion modules perturbed: max diff", d, "levels")
        assert d > 1
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
