#!/usr/bin/env python3
"""A tiny Stable Diffusion XL pipeline and diffusers' images from it
(tests/core/test-sdxl.c).

tests/fixtures/pipelines/tiny-sdxl: StableDiffusionXLPipeline.save_pretrained
of random tiny components in SDXL's layout — text_encoder (CLIPTextModel)
and text_encoder_2 (CLIPTextModelWithProjection), tokenizer and tokenizer_2
(the second with pad_token "!", as stabilityai/stable-diffusion-xl-base-1.0),
a UNet2DConditionModel with addition_embed_type "text_time", linear
projections, two transformer layers in its second block, the tiny-sd VAE and
an EulerDiscreteScheduler; force_zeros_for_empty_prompt true.

tests/fixtures/sdxl/images.safetensors + cases.json: StableDiffusionXLPipeline
images (output_type="np", as 8-bit levels) for: CFG with no negative prompt
(zeroed negative embeddings), CFG with a negative prompt, no CFG, clip_skip,
a non-square size, the guide's HeunDiscreteScheduler swap,
StableDiffusionXLImg2ImgPipeline.from_pipe at two strengths, and one case
loaded with torch_dtype=torch.float16 (the VAE upcast for the decode).  No invisible
watermark (the imwatermark package is not installed; diffusers adds none then).

Run from the repository root:  python3 tests/reference/make_sdxl_fixtures.py
"""
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file

from diffusers import (AutoencoderKL, EulerDiscreteScheduler, HeunDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
SD = os.path.join(FIX, "pipelines", "tiny-sd")
MODEL = os.path.join(FIX, "pipelines", "tiny-sdxl")
OUT = os.path.join(FIX, "sdxl")
CASES = [
    dict(id="cfg-zero-neg", prompt="a red circle", guidance=5.0, steps=4, width=32, height=32, seed=3),
    dict(id="cfg-neg", prompt="a red circle", negative_prompt="blurry, dark", guidance=6.0, steps=4, width=32,
         height=32, seed=5),
    dict(id="nocfg", prompt="a blue square", guidance=1.0, steps=3, width=32, height=32, seed=7),
    dict(id="clipskip", prompt="a green triangle", negative_prompt="", guidance=4.0, steps=3, width=32, height=32,
         seed=9, clip_skip=1),
    dict(id="rect", prompt="a red circle", guidance=5.0, steps=3, width=48, height=32, seed=11),
    dict(id="heun", prompt="a red circle", guidance=5.0, steps=3, width=32, height=32, seed=13,
         scheduler="HeunDiscreteScheduler"),
]
I2I = [dict(id="i2i-0.5", prompt="a red circle", guidance=5.0, steps=4, strength=0.5, seed=17),
       dict(id="i2i-0.8", prompt="a blue square", negative_prompt="dark", guidance=6.0, steps=5, strength=0.8,
            seed=19)]


def spread(module, gen, scale=0.3):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if name.endswith("weight") else 0.0))


def make():
    if os.path.exists(MODEL):
        shutil.rmtree(MODEL)
    gen = torch.Generator().manual_seed(1234)
    te_cfg = json.load(open(os.path.join(SD, "text_encoder", "config.json")))
    keep = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "max_position_embeddings",
            "vocab_size", "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id")
    base = {k: te_cfg[k] for k in keep}
    te = CLIPTextModel(CLIPTextConfig(**base)).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**dict(base, hidden_size=40, intermediate_size=48,
                                                            num_hidden_layers=3, projection_dim=24))).eval()
    spread(te, gen, 0.2)
    spread(te2, gen, 0.2)
    tok = CLIPTokenizer.from_pretrained(os.path.join(SD, "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(os.path.join(SD, "tokenizer"), pad_token="!")
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=32 + 40, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 24).eval()
    spread(unet, gen, 0.15)
    vae = AutoencoderKL.from_pretrained(os.path.join(SD, "vae"))
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                   interpolation_type="linear", prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(MODEL)
    # the tokenizer files as the Hub's SDXL repos ship them (vocab.json,
    # merges.txt, special_tokens_map.json), not transformers 5's tokenizer.json
    for name, pad in (("tokenizer", None), ("tokenizer_2", "!")):
        d = os.path.join(MODEL, name)
        shutil.rmtree(d)
        shutil.copytree(os.path.join(SD, "tokenizer"), d)
        if pad:
            for f in ("special_tokens_map.json", "tokenizer_config.json"):
                j = json.load(open(os.path.join(d, f)))
                j["pad_token"] = pad
                json.dump(j, open(os.path.join(d, f), "w"), indent=2)


def main():
    make()
    os.makedirs(OUT, exist_ok=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer_2.pad_token_id != pipe.tokenizer.pad_token_id
    euler = pipe.scheduler
    out = {}
    for c in CASES:
        pipe.scheduler = (HeunDiscreteScheduler.from_config(euler.config) if c.get("scheduler") else euler)
        kw = dict(prompt=c["prompt"], guidance_scale=c["guidance"], num_inference_steps=c["steps"], width=c["width"],
                  height=c["height"], generator=torch.Generator("cpu").manual_seed(c["seed"]), output_type="np")
        if "negative_prompt" in c:
            kw["negative_prompt"] = c["negative_prompt"]
        if "clip_skip" in c:
            kw["clip_skip"] = c["clip_skip"]
        img = pipe(**kw).images[0]
        out[c["id"]] = np.ascontiguousarray(np.round(img * 255).astype(np.uint8))
    pipe.scheduler = euler
    i2i = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    i2i.set_progress_bar_config(disable=True)
    assert not i2i.config.requires_aesthetics_score
    init = out["rect"][:, 8:40]   # 32x32 of the rect image as the input
    out["i2i-input"] = np.ascontiguousarray(init)
    for c in I2I:
        kw = dict(prompt=c["prompt"], image=Image.fromarray(init), strength=c["strength"],
                  guidance_scale=c["guidance"], num_inference_steps=c["steps"],
                  generator=torch.Generator("cpu").manual_seed(c["seed"]), output_type="np")
        if "negative_prompt" in c:
            kw["negative_prompt"] = c["negative_prompt"]
        img = i2i(**kw).images[0]
        out[c["id"]] = np.ascontiguousarray(np.round(img * 255).astype(np.uint8))
    # float16 (torch_dtype=torch.float16): the noise drawn in float16, the
    # VAE upcast to float32 for the decode (force_upcast, needs_upcasting)
    p16 = StableDiffusionXLPipeline.from_pretrained(MODEL, torch_dtype=torch.float16)
    p16.set_progress_bar_config(disable=True)
    c = CASES[1]
    img = p16(prompt=c["prompt"], negative_prompt=c["negative_prompt"], guidance_scale=c["guidance"],
              num_inference_steps=c["steps"], width=c["width"], height=c["height"],
              generator=torch.Generator("cpu").manual_seed(c["seed"]), output_type="np").images[0]
    assert p16.vae.dtype == torch.float16   # cast back after the upcast decode
    out["f16-" + c["id"]] = np.ascontiguousarray(np.round(img * 255).astype(np.uint8))
    save_file(out, os.path.join(OUT, "images.safetensors"))
    json.dump({"generator": "tests/reference/make_sdxl_fixtures.py", "torch": torch.__version__,
               "model": "pipelines/tiny-sdxl", "cases": CASES, "img2img": I2I},
              open(os.path.join(OUT, "cases.json"), "w"), indent=1)
    print("SDXL fixtures:", list(out))


if __name__ == "__main__":
    main()
