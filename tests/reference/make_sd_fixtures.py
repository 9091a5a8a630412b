#!/usr/bin/env python3
"""Reference images for the text2img / img2img pipelines (tests/core/test-sd.c).

Runs diffusers' StableDiffusionPipeline and StableDiffusionImg2ImgPipeline on
two tiny random configurations, every supported scheduler swapped in with
`Scheduler.from_config(pipe.scheduler.config)` as users do, and records the
`output_type="np"` images as 8-bit (round(x * 255)), which is what the C
test compares (max abs difference <= 1 level).

  A: tests/fixtures/pipelines/tiny-sd (SD1-style, PNDM config, epsilon)
  B: tests/fixtures/sd/tiny-sd2 (made here: SD2-style, linear projection,
     head dims as a list, upcast attention, gelu text encoder, pad "!",
     v_prediction, 2 layers per block)

Run from the repository root:  python3 tests/reference/make_sd_fixtures.py
"""
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file

import diffusers
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                       LCMScheduler, LMSDiscreteScheduler, PNDMScheduler, StableDiffusionImg2ImgPipeline,
                       StableDiffusionPipeline, UNet2DConditionModel, UniPCMultistepScheduler)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
OUT = os.path.join(FIX, "sd")

SCHEDULERS = {
    "PNDMScheduler": PNDMScheduler,
    "DDIMScheduler": DDIMScheduler,
    "DDPMScheduler": DDPMScheduler,
    "LMSDiscreteScheduler": LMSDiscreteScheduler,
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler,
    "HeunDiscreteScheduler": HeunDiscreteScheduler,
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
    "UniPCMultistepScheduler": UniPCMultistepScheduler,
    "LCMScheduler": LCMScheduler,
}


def make_sd2(path):
    torch.manual_seed(1234)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True,
        norm_num_groups=4)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
        latent_channels=4, norm_num_groups=4, sample_size=16)
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1))
    # random init of small models is close to zero-output for some layers; spread the weights a bit
    with torch.no_grad():
        for m in (unet, vae, te):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    tok_src = os.path.join(FIX, "pipelines", "tiny-sd", "tokenizer")
    tok = CLIPTokenizer.from_pretrained(tok_src, pad_token="!")
    sched = PNDMScheduler.from_config(PNDMScheduler.load_config(os.path.join(FIX, "pipelines", "tiny-sd", "scheduler")),
                                      prediction_type="v_prediction")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if os.path.exists(path):
        shutil.rmtree(path)
    pipe.save_pretrained(path, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; ship the SD-style files (vocab.json, merges.txt and
    # configs naming pad "!" as SD 2.x does) so both diffusers and the C tokenizer read the same thing
    tdir = os.path.join(path, "tokenizer")
    shutil.rmtree(tdir)
    shutil.copytree(tok_src, tdir)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        with open(os.path.join(tdir, name)) as f:
            cfg = json.load(f)
        cfg["pad_token"] = "!"
        with open(os.path.join(tdir, name), "w") as f:
            json.dump(cfg, f, indent=2)


def to_u8(images):
    return np.ascontiguousarray(np.round(np.clip(images, 0, 1) * 255).astype(np.uint8))


def init_image(w, h):
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255 // max(w - 1, 1))
    g = (y * 255 // max(h - 1, 1))
    b = ((x + y) * 7) % 256
    return Image.fromarray(np.stack([r, g, b], -1).astype(np.uint8))


def main():
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    make_sd2(os.path.join(OUT, "tiny-sd2"))
    configs = {
        "A": os.path.join(FIX, "pipelines", "tiny-sd"),
        "B": os.path.join(OUT, "tiny-sd2"),
    }
    tensors, cases = {}, []

    def record(cid, images, meta):
        tensors[cid] = to_u8(images)
        meta = dict(meta)
        meta["id"] = cid
        meta["shape"] = list(images.shape)
        cases.append(meta)

    src = init_image(32, 32)
    src.save(os.path.join(OUT, "init.png"))
    tensors["init_image"] = np.ascontiguousarray(np.asarray(src))
    for cname, path in configs.items():
        rel = os.path.relpath(path, FIX)
        base = StableDiffusionPipeline.from_pretrained(path)
        base.set_progress_bar_config(disable=True)
        i2i_base = StableDiffusionImg2ImgPipeline(**base.components)
        i2i_base.set_progress_bar_config(disable=True)
        for sname, cls in SCHEDULERS.items():
            steps = 4 if sname != "LCMScheduler" else 3
            base.scheduler = cls.from_config(base.scheduler.config)
            i2i_base.scheduler = cls.from_config(base.scheduler.config)
            meta = dict(model=rel, scheduler=sname, steps=steps, seed=33, width=32, height=32, prompt="a red circle",
                        negative_prompt=None, guidance=7.5, num_images=1, clip_skip=0, guidance_rescale=0.0,
                        task="text2img")
            img = base(meta["prompt"], num_inference_steps=steps, guidance_scale=7.5, height=32, width=32,
                       generator=torch.Generator("cpu").manual_seed(33), output_type="np").images
            record(f"{cname}-{sname}-t2i", img, meta)
            for strength in (0.3, 0.8):
                m2 = dict(meta, task="img2img", strength=strength, seed=7, steps=5)
                img = i2i_base(meta["prompt"], image=src, strength=strength, num_inference_steps=5,
                               guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(7),
                               output_type="np").images
                record(f"{cname}-{sname}-i2i-{strength}", img, m2)
        # options, with the checkpoint's own scheduler
        base.scheduler = PNDMScheduler.from_config(base.scheduler.config) if cname == "A" else \
            PNDMScheduler.from_config(base.scheduler.config)
        variants = [
            ("nocfg", dict(guidance=1.0)),
            ("neg2img", dict(negative_prompt="blurry, green", num_images=2)),
            ("clipskip", dict(clip_skip=1)),
            ("rescale", dict(guidance_rescale=0.7, width=24, height=40)),
            ("karras", dict(scheduler="DPMSolverMultistepScheduler", karras=True)),
        ]
        for vname, over in variants:
            meta = dict(model=rel, scheduler=over.get("scheduler", "PNDMScheduler"), steps=4, seed=123, width=32,
                        height=32, prompt="a small blue square at the top left", negative_prompt=None,
                        guidance=7.5, num_images=1, clip_skip=0, guidance_rescale=0.0, task="text2img")
            meta.update({k: v for k, v in over.items() if k != "karras"})
            pipe = base
            if over.get("karras"):
                pipe.scheduler = DPMSolverMultistepScheduler.from_config(base.scheduler.config, use_karras_sigmas=True)
                meta["scheduler_options"] = {"use_karras_sigmas": True}
            kwargs = dict(num_inference_steps=meta["steps"], guidance_scale=meta["guidance"], height=meta["height"],
                          width=meta["width"], generator=torch.Generator("cpu").manual_seed(meta["seed"]),
                          num_images_per_prompt=meta["num_images"], guidance_rescale=meta["guidance_rescale"],
                          output_type="np")
            if meta["negative_prompt"]:
                kwargs["negative_prompt"] = meta["negative_prompt"]
            prompt = meta["prompt"]
            if meta["clip_skip"]:
                # diffusers 0.42's encode_prompt reaches text_encoder.text_model, which transformers 5 no
                # longer has; compute what it means (final_layer_norm of hidden_states[-(clip_skip + 1)])
                # and pass it as prompt_embeds, as a user would.
                ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt").input_ids
                with torch.no_grad():
                    hs = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
                    kwargs["prompt_embeds"] = pipe.text_encoder.final_layer_norm(hs[-(meta["clip_skip"] + 1)])
                prompt = None
            img = pipe(prompt, **kwargs).images
            record(f"{cname}-{vname}", img, meta)
            base.scheduler = PNDMScheduler.from_config(base.scheduler.config)

    # a scheduler loaded from another repo's scheduler/ subfolder (the seed's HeunDiscreteScheduler.from_pretrained(
    # repo, subfolder="scheduler") example), as the checkpoint's class and swapped for Euler
    a = StableDiffusionPipeline.from_pretrained(configs["A"])
    a.set_progress_bar_config(disable=True)
    for sid, cls in (("sched-from-B", PNDMScheduler), ("euler-from-B", EulerDiscreteScheduler)):
        a.scheduler = cls.from_pretrained(configs["B"], subfolder="scheduler")
        meta = dict(model=os.path.relpath(configs["A"], FIX), scheduler=cls.__name__, steps=4, seed=5, width=32,
                    height=32, prompt="a green triangle", negative_prompt=None, guidance=7.5, num_images=1,
                    clip_skip=0, guidance_rescale=0.0, task="text2img",
                    scheduler_from=os.path.relpath(configs["B"], FIX))
        img = a(meta["prompt"], num_inference_steps=4, guidance_scale=7.5, height=32, width=32,
                generator=torch.Generator("cpu").manual_seed(5), output_type="np").images
        record(f"A-{sid}", img, meta)

    save_file(tensors, os.path.join(OUT, "images.safetensors"))
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({"diffusers": diffusers.__version__, "torch": torch.__version__, "cases": cases}, f, indent=1)
    print(f"{len(cases)} cases")


if __name__ == "__main__":
    main()
