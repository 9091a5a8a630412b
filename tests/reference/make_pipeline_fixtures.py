#!/usr/bin/env python3
"""Build the tiny diffusers pipeline folders that the local pipeline-folder loader
(diffuse-core/pipelines/loader.c) is tested on.

Everything is written with diffusers' / transformers' own save_pretrained so that
file names, index files and config.json contents are exactly what those libraries
produce; only the deliberately odd layouts (legacy sharded variant names, broken
model_index.json files) are made by hand.

Weight VALUES differ per file set, so a loader that picks the wrong file is caught
by the checksums that check_pipeline_loading.py records:
    default files          W                     (float32)
    fp16 variant files     (W - 0.01) as float16
    non_ema variant (unet) W + 0.01              (float32, sharded, current naming)
    tiny-sd-sharded's default (non-variant) shards of unet and text_encoder: W + 0.02
W is a seeded random init of each model.

Folders written under tests/fixtures/pipelines/ (others symlink the shared parts):
    tiny-sd/                    full pipeline; unet: default, fp16, non_ema (sharded);
                                vae/text_encoder: default + fp16;
                                safety_checker/feature_extractor [null, null],
                                requires_safety_checker false
    tiny-sd-sharded/            unet + text_encoder sharded in default (W + 0.02) and fp16
                                (current naming)
    tiny-sd-legacy-variant/     unet fp16 sharded in the deprecated naming (shards are symlinks
                                to tiny-sd-sharded's fp16 shards)
                                (diffusion_pytorch_model-00001-of-00002.fp16.safetensors,
                                 diffusion_pytorch_model.safetensors.fp16.index.json)
    tiny-sd-binonly/            vae only as diffusion_pytorch_model.bin (torch pickle)
    tiny-sd-single-and-sharded/ unet and text_encoder hold BOTH a single file (W, from tiny-sd)
                                and a sharded index (W + 0.02, from tiny-sd-sharded), all symlinks:
                                shows which one each library prefers
    tiny-sd-*  (JSON-only)      broken or unusual model_index.json next to symlinked components

Run from the repository root:  python3 tests/reference/make_pipeline_fixtures.py
The folder is deleted and rebuilt each time (deterministic apart from the
`_diffusers_version` / `transformers_version` strings).
"""
import copy
import gzip
import json
import os
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.normpath(os.path.join(HERE, "..", "fixtures", "pipelines"))

FP16_OFFSET = -0.01
NON_EMA_OFFSET = 0.01
ALT_OFFSET = 0.02

N_MERGES = 300  # tiny tokenizer: 256 bytes + 256 '</w>' forms + 300 merges + 2 specials = 814


def bytes_to_unicode():
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_merges(n):
    """The first n merges of OpenAI CLIP's BPE, from the copy open_clip ships (if
    installed); otherwise a small hand-made list. Either way the vocab layout is
    CLIP's: bytes, bytes+'</w>', merges in rank order, then the two specials."""
    try:
        import open_clip.tokenizer as oct
        lines = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in lines[1:1 + n]]
        assert all(len(m) == 2 for m in merges)
        return merges
    except ImportError:
        base = ["t h", "i n", "a n", "r e", "o n", "th e</w>", "e r", "a t</w>", "c at</w>", "o f</w>",
                "p h", "o t", "ph ot", "phot o</w>", "a</w> ", "h or", "hor s", "hors e</w>"]
        return [tuple(m.split()) for m in base if len(m.split()) == 2]


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_tokenizer(folder):
    os.makedirs(folder, exist_ok=True)
    merges = clip_merges(N_MERGES)
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    encoder = {}
    for tok in vocab:  # a merge result can repeat a base token; keep the first id as CLIP does
        encoder.setdefault(tok, len(encoder))
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(encoder, sort_keys=True, ensure_ascii=False) + "\n")
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")

    def added(content):
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    write_json(os.path.join(folder, "special_tokens_map.json"), {
        "bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"),
        "pad_token": "<|endoftext|>", "unk_token": added("<|endoftext|>")})

    def typed(content):
        d = {"__type": "AddedToken"}
        d.update(added(content))
        return d

    write_json(os.path.join(folder, "tokenizer_config.json"), {
        "add_prefix_space": False, "bos_token": typed("<|startoftext|>"), "do_lower_case": True,
        "eos_token": typed("<|endoftext|>"), "errors": "replace", "model_max_length": 77,
        "name_or_path": "tiny-clip-tokenizer", "pad_token": "<|endoftext|>",
        "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
        "unk_token": typed("<|endoftext|>")})
    return len(encoder)


# Stable Diffusion 1.5's scheduler/scheduler_config.json, as shipped (old file: it lacks the
# keys newer PNDMScheduler versions added, which then take their defaults).
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def model_index(version, **changes):
    mi = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": version,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    for k, v in changes.items():
        if v is DELETE:
            mi.pop(k, None)
        else:
            mi[k] = v
    return mi


DELETE = object()


def build_models(vocab_len):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2)
    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))
    torch.manual_seed(2)
    assert vocab_len <= 1000
    # token ids as SD 1.5's text_encoder/config.json has them (eos_token_id 2 = the legacy
    # "argmax of input_ids" pooling that SD 1.x checkpoints rely on)
    te = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=1000, max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
        bos_token_id=0, eos_token_id=2, pad_token_id=1))
    # make every parameter (norm weights/biases too) random so any offset or mix-up shows
    for m in (unet, vae, te):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        m.eval()
    return unet, vae, te


def shifted(model, offset, dtype=None):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(offset)
    if dtype is not None:
        m = m.to(dtype)
    return m


def save_diffusers(model, folder, **kw):
    model.save_pretrained(folder, safe_serialization=kw.pop("safe", True), **kw)


def save_transformers(model, folder, **kw):
    model.save_pretrained(folder, **kw)


def set_config_dtype(folder, key, value):
    """transformers v5 writes the dtype of the LAST save into config.json as "dtype"; with
    dtype=None diffusers asks transformers for dtype "auto", which reads that key (or the old
    "torch_dtype" key), else the checkpoint's own dtype. Set it deliberately."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    if key is not None:
        cfg[key] = value
    write_json(path, cfg)


def symlink(target_rel, link_path):
    os.symlink(target_rel, link_path)


def legacy_sharded_links(src_folder, dst_folder, variant, src_rel):
    """Lay out, in dst_folder, the deprecated names for the current-format sharded variant
    that save_pretrained wrote in src_folder (the shards are symlinks to those files):
      NAME.VAR-00001-of-0000N.safetensors -> NAME-00001-of-0000N.VAR.safetensors
      NAME.safetensors.index.VAR.json     -> NAME.safetensors.VAR.index.json"""
    with open(os.path.join(src_folder, f"diffusion_pytorch_model.safetensors.index.{variant}.json")) as f:
        index = json.load(f)
    renames = {}
    for name in sorted(set(index["weight_map"].values())):
        stem, rest = name.split(f".{variant}-", 1)          # diffusion_pytorch_model, 00001-of-00002.safetensors
        shard, ext = rest.split(".", 1)
        renames[name] = f"{stem}-{shard}.{variant}.{ext}"
    for old, new in renames.items():
        symlink(os.path.join(src_rel, old), os.path.join(dst_folder, new))
    index["weight_map"] = {k: renames[v] for k, v in index["weight_map"].items()}
    with open(os.path.join(dst_folder, f"diffusion_pytorch_model.safetensors.{variant}.index.json"), "w") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


def main():
    import diffusers
    import transformers

    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    version = diffusers.__version__

    vocab_len = write_tokenizer(os.path.join(OUT, "tiny-sd", "tokenizer"))
    unet, vae, te = build_models(vocab_len)

    # ---------------------------------------------------------------- tiny-sd
    root = os.path.join(OUT, "tiny-sd")
    write_json(os.path.join(root, "model_index.json"), model_index(version))
    os.makedirs(os.path.join(root, "scheduler"))
    write_json(os.path.join(root, "scheduler", "scheduler_config.json"), SD15_SCHEDULER)

    d = os.path.join(root, "unet")
    save_diffusers(unet, d)
    save_diffusers(shifted(unet, FP16_OFFSET, torch.float16), d, variant="fp16")
    save_diffusers(shifted(unet, NON_EMA_OFFSET), d, variant="non_ema", max_shard_size="90KB")
    d = os.path.join(root, "vae")
    save_diffusers(vae, d)
    save_diffusers(shifted(vae, FP16_OFFSET, torch.float16), d, variant="fp16")
    d = os.path.join(root, "text_encoder")
    save_transformers(te, d)
    save_transformers(shifted(te, FP16_OFFSET, torch.float16), d, variant="fp16")
    set_config_dtype(d, "torch_dtype", "float32")  # as SD 1.5's text_encoder/config.json has it

    def link_components(dst, names):
        for n in names:
            symlink(os.path.join("..", "tiny-sd", n), os.path.join(dst, n))

    # ---------------------------------------------------------------- tiny-sd-sharded
    root = os.path.join(OUT, "tiny-sd-sharded")
    os.makedirs(root)
    write_json(os.path.join(root, "model_index.json"), model_index(version))
    link_components(root, ["scheduler", "tokenizer", "vae"])
    d = os.path.join(root, "unet")
    save_diffusers(shifted(unet, ALT_OFFSET), d, max_shard_size="90KB")
    save_diffusers(shifted(unet, FP16_OFFSET, torch.float16), d, variant="fp16", max_shard_size="45KB")
    d = os.path.join(root, "text_encoder")
    save_transformers(shifted(te, ALT_OFFSET), d, max_shard_size="90KB")
    save_transformers(shifted(te, FP16_OFFSET, torch.float16), d, variant="fp16", max_shard_size="45KB")
    set_config_dtype(d, None, None)  # no dtype in config: "auto" takes the checkpoint's dtype

    # ---------------------------------------------------------------- tiny-sd-legacy-variant
    root = os.path.join(OUT, "tiny-sd-legacy-variant")
    os.makedirs(root)
    write_json(os.path.join(root, "model_index.json"), model_index(version))
    link_components(root, ["scheduler", "tokenizer", "vae", "text_encoder"])
    d = os.path.join(root, "unet")
    os.makedirs(d)
    shutil.copy(os.path.join(OUT, "tiny-sd", "unet", "config.json"), d)
    symlink(os.path.join("..", "..", "tiny-sd", "unet", "diffusion_pytorch_model.safetensors"),
            os.path.join(d, "diffusion_pytorch_model.safetensors"))
    legacy_sharded_links(os.path.join(OUT, "tiny-sd-sharded", "unet"), d, "fp16",
                         os.path.join("..", "..", "tiny-sd-sharded", "unet"))

    # ---------------------------------------------------------------- tiny-sd-binonly
    root = os.path.join(OUT, "tiny-sd-binonly")
    os.makedirs(root)
    write_json(os.path.join(root, "model_index.json"), model_index(version))
    link_components(root, ["scheduler", "tokenizer", "unet", "text_encoder"])
    save_diffusers(vae, os.path.join(root, "vae"), safe=False)

    # ---------------------------------------------------------------- tiny-sd-single-and-sharded
    # single file = tiny-sd's (W), sharded index + shards = tiny-sd-sharded's (W + 0.02); all symlinks
    root = os.path.join(OUT, "tiny-sd-single-and-sharded")
    os.makedirs(root)
    write_json(os.path.join(root, "model_index.json"), model_index(version))
    link_components(root, ["scheduler", "tokenizer", "vae"])
    for comp, single, index in (("unet", "diffusion_pytorch_model.safetensors",
                                 "diffusion_pytorch_model.safetensors.index.json"),
                                ("text_encoder", "model.safetensors", "model.safetensors.index.json")):
        d = os.path.join(root, comp)
        os.makedirs(d)
        shutil.copy(os.path.join(OUT, "tiny-sd", comp, "config.json"), d)
        symlink(os.path.join("..", "..", "tiny-sd", comp, single), os.path.join(d, single))
        src = os.path.join(OUT, "tiny-sd-sharded", comp)
        with open(os.path.join(src, index)) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        for name in [index] + shards:
            symlink(os.path.join("..", "..", "tiny-sd-sharded", comp, name), os.path.join(d, name))

    # ---------------------------------------------------------------- JSON-only variants
    all_parts = ["scheduler", "tokenizer", "unet", "vae", "text_encoder"]

    def json_only(name, mi, parts=all_parts):
        r = os.path.join(OUT, name)
        os.makedirs(r)
        if mi is not None:
            write_json(os.path.join(r, "model_index.json"), mi)
        link_components(r, parts)

    json_only("tiny-sd-missing-folder", model_index(version), [p for p in all_parts if p != "vae"])
    json_only("tiny-sd-unknown-class", model_index(version, vae=["diffusers", "AutoencoderFooBar"]))
    json_only("tiny-sd-unknown-library", model_index(version, vae=["foolib", "AutoencoderKL"]))
    json_only("tiny-sd-null-unet", model_index(version, unet=[None, None]))
    json_only("tiny-sd-missing-unet-key", model_index(version, unet=DELETE))
    json_only("tiny-sd-unknown-pipeline-class", model_index(version, _class_name="NoSuchPipeline"))
    json_only("tiny-sd-img2img-class", model_index(version, _class_name="StableDiffusionImg2ImgPipeline"))
    json_only("tiny-sd-extra-keys", model_index(
        version, _name_or_path="someone/some-model", _private_note="ignored", image_encoder=[None, None],
        foo_component=["diffusers", "UNet2DConditionModel"], foo_number=3))
    json_only("tiny-sd-requires-safety-checker", model_index(version, requires_safety_checker=DELETE))
    json_only("tiny-sd-no-model-index", None, ["unet"])
    # model_index.json names a scheduler class other than scheduler_config.json's _class_name
    json_only("tiny-sd-scheduler-class-mismatch", model_index(version, scheduler=["diffusers", "EulerDiscreteScheduler"]))
    # an old scheduler config (steps_offset 0, clip_sample true): the SD pipelines rewrite both
    json_only("tiny-sd-old-scheduler-config", model_index(version), ["tokenizer", "unet", "vae", "text_encoder"])
    os.makedirs(os.path.join(OUT, "tiny-sd-old-scheduler-config", "scheduler"))
    old = dict(SD15_SCHEDULER, steps_offset=0, clip_sample=True)
    write_json(os.path.join(OUT, "tiny-sd-old-scheduler-config", "scheduler", "scheduler_config.json"), old)

    total = 0
    for dp, dn, fn in os.walk(OUT):
        for f in fn:
            p = os.path.join(dp, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    print(f"wrote {OUT}: {total} bytes in regular files "
          f"(diffusers {version}, transformers {transformers.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    sys.exit(main())
