#!/usr/bin/env python3
"""PyTorch checkpoints (torch.save files) for tests/core/test-pickle.c and the
.bin paths of the loader, IP-Adapter and LoRA tests.

Each good checkpoint X.bin comes with X.safetensors: what
torch.load(X.bin, weights_only=True) returns, nested dicts flattened with "."
(as diffusers names the IP-Adapter's tensors), written by safetensors. The C
reader must give exactly those tensors.

Written under tests/fixtures/pickle/:
    tensors.bin      OrderedDict: f32, f16, bf16, f64, int64, int32, uint8, bool, a 0-dim
                     scalar, an empty tensor, an nn.Parameter (_rebuild_parameter)
    views.bin        tensors that are views into ONE shared storage at offsets
                     (base[3:7], base[8:20].view(3, 4), base itself)
    statedict.bin    an nn.Module's state_dict() (OrderedDict + BUILD of its _metadata)
    nested.bin       {"image_proj": {...}, "ip_adapter": {"1.to_k_ip.weight": ...}}, the
                     layout of h94/IP-Adapter's ip-adapter_sd15.bin
  refused:
    forbidden.bin    a data.pkl made BY HAND with pickle opcodes that names os.system
                     (never executed: torch.load(weights_only=True) refuses it too)
    dag.bin          (by hand) 40 nested dicts, each holding the previous one twice:
                     torch loads it, but flattened it names 2^40 paths
  valid for torch but not read by gst-diffuse (clear errors):
    noncontig.bin    a transposed tensor (stride (1, 3)): torch keeps the strides
    legacy.bin       the pre-1.6 format (_use_new_zipfile_serialization=False)
    compressed.bin   tensors.bin re-zipped with deflate
    bigendian.bin    tensors.bin with byteorder "big" (torch would byte-swap)
  corrupt (torch.load refuses each too):
    truncated.bin    the first half of tensors.bin
    badpickle.bin    tensors.bin with data.pkl cut short inside the archive
    shortstorage.bin tensors.bin with one storage record shorter than its numel says
  pipelines and adapters:
    tiny-sd-bin/     pipelines/tiny-sd as .bin weights: unet sharded by diffusers'
                     save_pretrained(safe_serialization=False, max_shard_size=...)
                     (diffusion_pytorch_model-0000k-of-0000n.bin + .bin.index.json),
                     text_encoder/pytorch_model.bin (torch.save of the state dict, what
                     transformers < 5 writes), vae -> pipelines/tiny-sd-binonly/vae,
                     scheduler and tokenizer -> pipelines/tiny-sd
    tiny-sd-forbidden/  pipelines/tiny-sd with vae/diffusion_pytorch_model.bin -> forbidden.bin
                     (and no vae safetensors): a load error naming os.system
    images.safetensors  diffusers' image from tiny-sd-bin loaded with use_safetensors=False
                     ("bin") and from tiny-sd's safetensors ("safetensors"): identical
    ip-adapter/models/ip-adapter_tiny.bin  ip-adapter/models/ip-adapter_tiny.safetensors
                     as h94's .bin layout; image_encoder/ with ip-adapter's config.json and
                     its weights only as pytorch_model.bin
    lora/pytorch_lora_weights.bin  lora/a's adapter as diffusers' save_lora_weights
                     (safe_serialization=False) writes it (torch.save of the state dict,
                     no LoraConfig metadata); images.safetensors "lora-bin": diffusers'
                     image after pipe.load_lora_weights (that folder)

Run from the repository root (after make_pipeline_fixtures.py, make_ip_adapter_fixtures.py
and make_lora_fixtures.py), with peft for load_lora_weights (see make_lora_fixtures.py):
  PYTHONPATH=/tmp/peftlib python3 tests/reference/make_pickle_fixtures.py
"""
import collections
import io
import json
import os
import shutil
import zipfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
OUT = os.path.join(FIX, "pickle")
GEN = dict(prompt="a red circle", num_inference_steps=3, height=32, width=32, guidance_scale=7.5)
SEED = 21


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, name))
        elif isinstance(v, torch.Tensor):
            out[name] = v
    return out


def save_pair(name, obj, **kw):
    path = os.path.join(OUT, name + ".bin")
    torch.save(obj, path, **kw)
    back = torch.load(path, weights_only=True)
    flat = {k: v.detach().clone().contiguous() for k, v in flatten(back).items()}
    save_file(flat, os.path.join(OUT, name + ".safetensors"))


def expect_refused(name):
    try:
        torch.load(os.path.join(OUT, name), weights_only=True)
    except Exception as e:  # noqa: BLE001 - any refusal is what we want
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    raise SystemExit(f"torch.load(weights_only=True) accepted {name}")


def rewrite(src, dst, change=None, compression=zipfile.ZIP_STORED):
    """Copy a torch.save archive entry by entry, change(name, bytes) -> bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=compression) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if change:
                data = change(info.filename, data)
            zout.writestr(info.filename, data)


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    torch.manual_seed(3)
    refusals = {}

    # ---- good files -------------------------------------------------------
    t = collections.OrderedDict()
    t["f32"] = torch.randn(3, 5)
    t["f16"] = torch.randn(2, 3, 4).half()
    t["bf16"] = torch.randn(7).bfloat16()
    t["f64"] = torch.randn(2, 2, dtype=torch.float64)
    t["i64"] = torch.tensor([1, -2, 3 << 40, -(1 << 62)], dtype=torch.int64)
    t["i32"] = torch.tensor([[7, -8], [9, 2**31 - 1]], dtype=torch.int32)
    t["u8"] = torch.arange(250, 256, dtype=torch.uint8)
    t["bool"] = torch.tensor([True, False, True])
    t["scalar"] = torch.tensor(2.5)
    t["empty"] = torch.zeros(0, 4)
    t["param"] = torch.nn.Parameter(torch.randn(4, 1, 1, 2))
    t["conv.weight"] = torch.randn(4, 3, 3, 3)
    save_pair("tensors", t)

    base = torch.randn(20)
    save_pair("views", {"a": base[3:7], "b": base[8:20].view(3, 4), "base": base, "c": base[19:]})

    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Conv2d(2, 3, 1),
                            torch.nn.BatchNorm1d(2))
    sd = m.state_dict()
    assert hasattr(sd, "_metadata")
    save_pair("statedict", sd)

    ip = load_file(os.path.join(FIX, "ip-adapter", "models", "ip-adapter_tiny.safetensors"))
    nested = {"image_proj": {k[len("image_proj."):]: v for k, v in ip.items() if k.startswith("image_proj.")},
              "ip_adapter": {k[len("ip_adapter."):]: v for k, v in ip.items() if k.startswith("ip_adapter.")}}
    save_pair("nested", nested)

    # ---- refused ---------------------------------------------------------
    # a pickle that would call os.system("echo pwned") if it were executed;
    # made from opcodes, never loaded without weights_only
    pkl = (b"\x80\x02}q\x00(X\x01\x00\x00\x00wq\x01cos\nsystem\nq\x02X\x0a\x00\x00\x00echo pwnedq\x03"
           b"\x85q\x04Rq\x05u.")
    with zipfile.ZipFile(os.path.join(OUT, "forbidden.bin"), "w") as z:
        z.writestr("forbidden/data.pkl", pkl)
        z.writestr("forbidden/byteorder", "little")
        z.writestr("forbidden/version", "3\n")
    refusals["forbidden.bin"] = expect_refused("forbidden.bin")

    # 40 dicts, each holding the previous one twice: 2^40 paths once flattened
    pkl = b"\x80\x02}q\x00"
    for i in range(1, 41):
        pkl += b"}(X\x01\x00\x00\x00ah" + bytes([i - 1]) + b"X\x01\x00\x00\x00bh" + bytes([i - 1])
        pkl += b"uq" + bytes([i])
    pkl += b"."
    with zipfile.ZipFile(os.path.join(OUT, "dag.bin"), "w") as z:
        z.writestr("dag/data.pkl", pkl)
        z.writestr("dag/byteorder", "little")
        z.writestr("dag/version", "3\n")
    dag = torch.load(os.path.join(OUT, "dag.bin"), weights_only=True)
    assert dag["a"] is dag["b"]

    torch.save({"t": torch.arange(6.0).view(2, 3).t()}, os.path.join(OUT, "noncontig.bin"))
    assert torch.load(os.path.join(OUT, "noncontig.bin"), weights_only=True)["t"].stride() == (1, 3)
    torch.save({"t": torch.ones(2)}, os.path.join(OUT, "legacy.bin"), _use_new_zipfile_serialization=False)
    src = os.path.join(OUT, "tensors.bin")
    rewrite(src, os.path.join(OUT, "compressed.bin"), compression=zipfile.ZIP_DEFLATED)
    rewrite(src, os.path.join(OUT, "bigendian.bin"),
            lambda n, d: b"big" if n.endswith("/byteorder") else d)

    # ---- corrupt -----------------------------------------------------------
    raw = open(src, "rb").read()
    open(os.path.join(OUT, "truncated.bin"), "wb").write(raw[: len(raw) // 2])
    refusals["truncated.bin"] = expect_refused("truncated.bin")
    rewrite(src, os.path.join(OUT, "badpickle.bin"), lambda n, d: d[: len(d) // 2] if n.endswith("data.pkl") else d)
    refusals["badpickle.bin"] = expect_refused("badpickle.bin")
    rewrite(src, os.path.join(OUT, "shortstorage.bin"), lambda n, d: d[:-4] if n.endswith("/data/0") else d)
    refusals["shortstorage.bin"] = expect_refused("shortstorage.bin")

    # ---- pipeline, IP-Adapter, LoRA -----------------------------------------
    from diffusers import StableDiffusionPipeline

    tiny = os.path.join(FIX, "pipelines", "tiny-sd")
    pdir = os.path.join(OUT, "tiny-sd-bin")
    pipe = StableDiffusionPipeline.from_pretrained(tiny)
    pipe.unet.save_pretrained(os.path.join(pdir, "unet"), safe_serialization=False, max_shard_size="100KB")
    os.makedirs(os.path.join(pdir, "text_encoder"))
    pipe.text_encoder.config.to_json_file(os.path.join(pdir, "text_encoder", "config.json"))
    torch.save(pipe.text_encoder.state_dict(), os.path.join(pdir, "text_encoder", "pytorch_model.bin"))
    shutil.copy(os.path.join(tiny, "model_index.json"), pdir)
    os.symlink("../../pipelines/tiny-sd-binonly/vae", os.path.join(pdir, "vae"))
    for c in ("scheduler", "tokenizer"):
        os.symlink(f"../../pipelines/tiny-sd/{c}", os.path.join(pdir, c))
    assert not any(f.endswith(".safetensors") for _, _, fs in os.walk(pdir, followlinks=True) for f in fs)
    fdir = os.path.join(OUT, "tiny-sd-forbidden")
    os.makedirs(os.path.join(fdir, "vae"))
    shutil.copy(os.path.join(tiny, "model_index.json"), fdir)
    for c in ("scheduler", "tokenizer", "text_encoder", "unet"):
        os.symlink(f"../../pipelines/tiny-sd/{c}", os.path.join(fdir, c))
    os.symlink("../../../pipelines/tiny-sd/vae/config.json", os.path.join(fdir, "vae", "config.json"))
    os.symlink("../../forbidden.bin", os.path.join(fdir, "vae", "diffusion_pytorch_model.bin"))

    images = {}
    for key, folder, us in (("bin", pdir, False), ("safetensors", tiny, None)):
        p = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=us)
        img = p(**GEN, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images[0]
        images[key] = torch.from_numpy(np.ascontiguousarray(np.round(img * 255).astype(np.uint8)))
    assert torch.equal(images["bin"], images["safetensors"])

    os.makedirs(os.path.join(OUT, "ip-adapter", "models"))
    torch.save(nested, os.path.join(OUT, "ip-adapter", "models", "ip-adapter_tiny.bin"))
    # the image encoder only as pytorch_model.bin (transformers' fallback)
    enc_dir = os.path.join(OUT, "ip-adapter", "models", "image_encoder")
    os.makedirs(enc_dir)
    shutil.copy(os.path.join(FIX, "ip-adapter", "models", "image_encoder", "config.json"), enc_dir)
    torch.save(load_file(os.path.join(FIX, "ip-adapter", "models", "image_encoder", "model.safetensors")),
               os.path.join(enc_dir, "pytorch_model.bin"))
    back = torch.load(os.path.join(OUT, "ip-adapter", "models", "ip-adapter_tiny.bin"), weights_only=True)
    assert all(torch.equal(v, ip[k]) for k, v in flatten(back).items()) and len(flatten(back)) == len(ip)

    os.makedirs(os.path.join(OUT, "lora"))
    lora = load_file(os.path.join(FIX, "lora", "a", "pytorch_lora_weights.safetensors"))
    torch.save(lora, os.path.join(OUT, "lora", "pytorch_lora_weights.bin"))
    # a .bin has no header for the LoraConfig: diffusers takes lora_alpha = r
    # (scale 1, where lora/a's metadata says alpha 8 / r 4)
    p = StableDiffusionPipeline.from_pretrained(tiny)
    p.load_lora_weights(os.path.join(OUT, "lora"))
    img = p(**GEN, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images[0]
    images["lora-bin"] = torch.from_numpy(np.ascontiguousarray(np.round(img * 255).astype(np.uint8)))
    assert not torch.equal(images["lora-bin"], images["safetensors"])
    save_file(images, os.path.join(OUT, "images.safetensors"))

    with open(os.path.join(OUT, "refusals.json"), "w") as f:
        json.dump({"generator": "tests/reference/make_pickle_fixtures.py", "torch": torch.__version__,
                   "generate": dict(GEN, seed=SEED), "torch_refuses": refusals}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
