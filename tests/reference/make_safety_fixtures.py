#!/usr/bin/env python3
"""Reference values for the safety checker (tests/core/test-safety.c).

Makes a tiny StableDiffusionSafetyChecker (a CLIPVisionModel of 2 layers on
32x32 inputs, projection 16) and its CLIPImageProcessor (shortest edge 32,
crop 32), saved as diffusers saves them, under
tests/fixtures/safety/{safety_checker,feature_extractor}, and records:

  * processor: uint8 images of several sizes (down- and upscaled, square and
    not) and the pixel_values transformers' CLIPImageProcessor makes of them;
  * checker: for those pixel_values, the pooled output, image_embeds, the
    cosine distances to the concept and special-care embeddings and
    has_nsfw_concept, as StableDiffusionSafetyChecker.forward computes them;
  * pipeline: the tiny-sd pipeline (tests/fixtures/pipelines/tiny-sd) with
    this checker, three prompts at 64x64: diffusers' images (a flagged one
    black) and has_nsfw_concept.

The concept thresholds are chosen here from the distances of the pipeline's
own images so that the first prompt's image is flagged and the others are
not (one of them passing only after the special-care adjustment of +0.01 was
considered), every decision at least 0.02 from its threshold.

Run from the repository root:  python3 tests/reference/make_safety_fixtures.py
"""
import json
import os
import shutil
import tempfile

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file

from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
from transformers import CLIPConfig, CLIPImageProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
OUT = os.path.join(FIX, "safety")
TINY_SD = os.path.join(FIX, "pipelines", "tiny-sd")
PROMPTS = ["a red circle", "a small blue square at the top left", "a green triangle on a white background"]
SIZE = 64


def make_checker():
    torch.manual_seed(2024)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, num_channels=3, hidden_act="quick_gelu",
                           layer_norm_eps=1e-5),
        projection_dim=16)
    sc = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        # transformers' own init gives every image nearly the same embedding (cosine 0.999): wider
        # weights, small biases and embeddings, so that images differ (cosines 0.5 .. 1)
        for name, p in sc.vision_model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3)
            elif "bias" in name or "embedding" in name:
                p.normal_(0.0, 0.02)
        sc.visual_projection.weight.normal_(0.0, 0.3)
        sc.concept_embeds.normal_()
        sc.special_care_embeds.normal_()
        sc.concept_embeds_weights.fill_(2.0)          # cosine <= 1: never flagged, until chosen below
        sc.special_care_embeds_weights.fill_(2.0)
    return sc


def save_checker(sc, path):
    """save_pretrained, with the tensor names real checkpoints carry (transformers 4:
    "vision_model.vision_model.embeddings...", which transformers 5 still loads)."""
    sc.save_pretrained(path)
    f = os.path.join(path, "model.safetensors")
    from safetensors.numpy import load_file
    t = load_file(f)
    t = {("vision_model." + k if k.startswith("vision_model.") else k): v for k, v in t.items()}
    save_file(t, f, metadata={"format": "pt"})
    back = StableDiffusionSafetyChecker.from_pretrained(path)
    for (k, a), (_, b) in zip(sorted(sc.state_dict().items()), sorted(back.state_dict().items())):
        assert torch.equal(a, b), k


def processor():
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def test_images():
    rng = np.random.default_rng(5)
    imgs = []
    for (h, w) in [(64, 64), (48, 80), (20, 24), (37, 61), (32, 32), (90, 40)]:
        yy, xx = np.mgrid[0:h, 0:w]
        smooth = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 7) % 256], -1)
        noise = rng.integers(-40, 41, (h, w, 3))
        imgs.append(np.clip(smooth + noise, 0, 255).astype(np.uint8))
    return imgs


def scores(sc, pixel_values):
    with torch.no_grad():
        pooled = sc.vision_model(pixel_values)[1]
        embeds = sc.visual_projection(pooled)
        special = cosine_distance(embeds, sc.special_care_embeds).numpy()
        concept = cosine_distance(embeds, sc.concept_embeds).numpy()
    return pooled.numpy(), embeds.numpy(), special, concept


def pipeline_dir(tmp, sc_dir, fe_dir):
    d = os.path.join(tmp, "tiny-sd-safety")
    os.makedirs(d)
    for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        os.symlink(os.path.join(TINY_SD, c), os.path.join(d, c))
    os.symlink(sc_dir, os.path.join(d, "safety_checker"))
    os.symlink(fe_dir, os.path.join(d, "feature_extractor"))
    index = json.load(open(os.path.join(TINY_SD, "model_index.json")))
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index["requires_safety_checker"] = True
    json.dump(index, open(os.path.join(d, "model_index.json"), "w"), indent=2)
    return d


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    sc = make_checker()
    fe = processor()
    sc_dir, fe_dir = os.path.join(OUT, "safety_checker"), os.path.join(OUT, "feature_extractor")
    tensors = {}

    # 1. the pipeline's images without a decision (thresholds 2.0): their distances choose the thresholds
    with tempfile.TemporaryDirectory() as tmp:
        save_checker(sc, sc_dir)
        fe.save_pretrained(fe_dir)
        pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir(tmp, sc_dir, fe_dir))
        pipe.set_progress_bar_config(disable=True)

        def run():
            out = []
            for i, p in enumerate(PROMPTS):
                r = pipe(p, num_inference_steps=4, guidance_scale=7.5, height=SIZE, width=SIZE,
                         generator=torch.Generator("cpu").manual_seed(100 + i), output_type="np")
                out.append((r.images[0], r.nsfw_content_detected[0]))
            return out

        first = run()
        assert not any(f for _, f in first)
        # (output_type="np" images are transposed views: made C-contiguous before they are stored)
        u8 = [np.ascontiguousarray(np.round(img * 255).astype(np.uint8)) for img, _ in first]
        pv = fe([Image.fromarray(a) for a in u8], return_tensors="pt").pixel_values
        _, _, special, concept = scores(sc, pv)
        # concept c flags image 0 only, with margins; special-care concept s lifts image 1 (adjustment
        # +0.01) without flagging it
        best = None
        for c in range(concept.shape[1]):
            d = concept[:, c]
            gap = d[0] - max(d[1], d[2])
            if best is None or gap > best[0]:
                best = (gap, c)
        gap, c = best
        assert gap > 0.08, f"no concept separates the images (best gap {gap:.3f}); change the seed"
        # threshold between image 0 and the others (the others may get +0.01 from special care)
        t_c = float((concept[0, c] + max(concept[1, c], concept[2, c]) + 0.01) / 2)
        # special-care concept: the one image 1 is closest to, threshold under image 1 only
        s = int(np.argmax(special[1] - np.maximum(special[0], special[2])))
        t_s = float((special[1, s] + max(special[0, s], special[2, s])) / 2)
        assert special[1, s] - max(special[0, s], special[2, s]) > 0.04, "no special concept separates image 1"
        with torch.no_grad():
            sc.concept_embeds_weights[c] = t_c
            sc.special_care_embeds_weights[s] = t_s
        save_checker(sc, sc_dir)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir(tmp, sc_dir, fe_dir))
        pipe.set_progress_bar_config(disable=True)
        second = []
        for i, p in enumerate(PROMPTS):
            r = pipe(p, num_inference_steps=4, guidance_scale=7.5, height=SIZE, width=SIZE,
                     generator=torch.Generator("cpu").manual_seed(100 + i), output_type="np")
            second.append((r.images[0], r.nsfw_content_detected[0]))
    flags = [bool(f) for _, f in second]
    assert flags == [True, False, False], flags
    # margins of every decision (diffusers rounds the score to 3 decimals, then > 0)
    adj = [0.01 if (special[i] - sc.special_care_embeds_weights.numpy() > 0).any() else 0.0 for i in range(3)]
    margins = [float(np.abs(concept[i] - sc.concept_embeds_weights.numpy() + adj[i]).min()) for i in range(3)]
    assert min(margins) >= 0.02, margins
    for i, (img, f) in enumerate(second):
        tensors[f"pipeline.{i}.image"] = np.ascontiguousarray(np.round(img * 255).astype(np.float16))   # levels, HWC
        tensors[f"pipeline.{i}.nsfw"] = np.array([float(f)], np.float32)
    # the unflagged images equal the first run's
    for i in (1, 2):
        assert np.array_equal(np.round(second[i][0] * 255), np.round(first[i][0] * 255))
    assert np.all(second[0][0] == 0.0)

    # 2. the processor on assorted images
    imgs = test_images() + u8[:1]
    meta_imgs = []
    for i, a in enumerate(imgs):
        pv = fe(Image.fromarray(a), return_tensors="pt").pixel_values
        tensors[f"processor.{i}.image"] = a.astype(np.float16)
        tensors[f"processor.{i}.pixel_values"] = pv.numpy()[0]
        meta_imgs.append(list(a.shape))

    # 3. the checker on the pipeline images' pixel_values and two others
    pv = fe([Image.fromarray(a) for a in u8 + imgs[:2]], return_tensors="pt").pixel_values
    pooled, embeds, special, concept = scores(sc, pv)
    _, nsfw = sc(clip_input=pv, images=[np.zeros((2, 2, 3)) for _ in range(pv.shape[0])])
    tensors["checker.pixel_values"] = pv.numpy()
    tensors["checker.pooled"] = pooled
    tensors["checker.image_embeds"] = embeds
    tensors["checker.special_cos_dist"] = special
    tensors["checker.cos_dist"] = concept
    tensors["checker.nsfw"] = np.array(nsfw, np.float32)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(tensors, os.path.join(OUT, "expected.safetensors"))
    meta = dict(generator="tests/reference/make_safety_fixtures.py", torch=torch.__version__,
                prompts=PROMPTS, seeds=[100, 101, 102], steps=4, guidance=7.5, size=SIZE,
                scheduler="PNDMScheduler", concept_index=c, concept_threshold=t_c, special_index=s,
                special_threshold=t_s, processor_images=meta_imgs, checker_nsfw=[bool(x) for x in nsfw],
                pipeline_nsfw=flags, margins=margins)
    json.dump(meta, open(os.path.join(OUT, "cases.json"), "w"), indent=1)
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(OUT) for f in fs)
    print(f"safety fixtures: {len(tensors)} tensors, nsfw {flags}, checker {meta['checker_nsfw']}, "
          f"margins {[round(m, 3) for m in margins]}, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
