#!/usr/bin/env python3
"""Reference files for diffuse-core's safetensors reader/writer (test-safetensors).

Writes under tests/fixtures/safetensors/:

  py_basic.safetensors   safetensors.torch.save_file, metadata {"format": "pt"}:
                         f32/f16/bf16 tensors (random and special values: +-0,
                         subnormals, +-inf, nan, rounding ties), a 0-d scalar, an
                         empty [0, 3] tensor, a 4-d tensor.
  py_misc.safetensors    F64/I64/U8/BOOL tensors and several metadata keys (the
                         metadata order varies between runs: Rust HashMap).
  py_basic.json          for every tensor of both files: dtype, shape, the raw
                         element bits, and the bits torch gives for
                         .float() / .half() / .bfloat16() of it (the oracle for
                         our load-time conversions); plus each file's metadata.
  py_unet/               a tiny UNet2DConditionModel in float16 written by
                         diffusers save_pretrained(max_shard_size=..., variant="fp16")
                         (3 shards + index + config.json).
  py_unet.json           the model's state_dict key order (what save_pretrained
                         iterates: our writer must be fed in that order to shard
                         identically), max_shard_size, variant, and per-tensor
                         shape / float64 sum / first element bits.
  shard_rule.json        huggingface_hub split_torch_state_dict_into_shards on a
                         synthetic state dict whose sizes exercise every branch
                         (a tensor over the limit gets its own shard, appended
                         before the shard being filled): the expected
                         tensor->file map and the exact index text diffusers
                         writes for it.

Run from anywhere:  python3 tests/reference/make_safetensors_fixtures.py
Then regenerate our writer's files and their Python check (ours/ depends on
py_unet/):
  DIFFUSE_FIXTURES=tests/fixtures DIFFUSE_ST_WRITE_OURS=tests/fixtures/safetensors/ours \
      <build>/tests/core/test-safetensors -p /safetensors/ours/write
  python3 tests/reference/check_st_roundtrip.py
"""
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from safetensors import safe_open

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "safetensors")

INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.float64: torch.int64}
MASK = {torch.float32: 0xFFFFFFFF, torch.float16: 0xFFFF, torch.bfloat16: 0xFFFF, torch.float64: (1 << 64) - 1}


def bits(t):
    t = t.contiguous().reshape(-1)
    if t.dtype in INT_VIEW:
        m = MASK[t.dtype]
        return [int(v) & m for v in t.view(INT_VIEW[t.dtype]).tolist()]
    if t.dtype == torch.bool:
        return [int(v) for v in t.tolist()]
    return [int(v) for v in t.tolist()]


ST_NAME = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.uint8: "U8", torch.bool: "BOOL"}


def describe(t):
    d = {"dtype": ST_NAME[t.dtype], "shape": list(t.shape), "bits": bits(t)}
    if t.is_floating_point():
        d["as_f32"] = bits(t.float())
        d["as_f16"] = bits(t.half())
        d["as_bf16"] = bits(t.bfloat16())
    return d


def u16(vals, dt):
    a = torch.tensor([v - 65536 if v >= 32768 else v for v in vals], dtype=torch.int16)
    return a.view(dt)


def basic_tensors():
    g = torch.Generator().manual_seed(1234)
    t = {}
    t["w.f32"] = torch.randn(3, 4, generator=g)
    t["w.f16"] = torch.randn(2, 3, generator=g).half()
    t["w.bf16"] = torch.randn(5, generator=g).bfloat16()
    t["x.4d"] = torch.randn(2, 1, 2, 3, generator=g)
    t["scalar"] = torch.tensor(1.5)
    t["empty"] = torch.zeros(0, 3)
    # f32 values chosen for the f32 -> f16/bf16 rounding paths
    t["f32.special"] = torch.tensor([
        0.0, -0.0, float("inf"), float("-inf"), float("nan"),
        1e-40,                 # f32 subnormal
        65504.0, 65520.0,      # f16 max / rounds to f16 inf
        1.00048828125,         # exact f16 tie: 1 + 2^-11 -> even (1.0)
        1.00146484375,         # 1 + 3*2^-11: tie -> up
        6.1e-5, 3e-8,          # f16 subnormal range / underflow
        1.00390625,            # bf16 tie: 1 + 2^-8 -> even (1.0)
        1.01171875,            # 1 + 3*2^-8: tie -> up
        3.0e38, -1.5e-39,
    ], dtype=torch.float32)
    t["f16.special"] = u16([0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x7BFF, 0x7C00, 0xFC00, 0x7E00, 0x3555,
                            0xBC00], torch.float16)
    t["bf16.special"] = u16([0x0000, 0x8000, 0x0001, 0x007F, 0x0080, 0x7F7F, 0x7F80, 0xFF80, 0x7FC0, 0x3FAB,
                             0xC2F7], torch.bfloat16)
    return t


def misc_tensors():
    t = {}
    # torch converts f64 -> f16/bf16 through f32 (double rounding): the last
    # two values round differently from a direct conversion.
    t["d.f64"] = torch.tensor([0.1, -2.5, 1e-30, 1e300, 1.0000000596046448, 65519.99, float("nan"),
                               1 + 2**-11 + 2**-40, 1 + 2**-8 + 2**-30], dtype=torch.float64)
    t["i.i64"] = torch.tensor([1, -2, 2**40], dtype=torch.int64)
    t["u.u8"] = torch.tensor([0, 255], dtype=torch.uint8)
    t["b.bool"] = torch.tensor([True, False])
    return t


def tiny_unet():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    m = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2)
    # non-trivial values everywhere (zero-initialised conv_out etc.)
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.half()


UNET_MAX_SHARD = 40000


def main():
    os.makedirs(OUT, exist_ok=True)
    bt = basic_tensors()
    save_file(bt, os.path.join(OUT, "py_basic.safetensors"), metadata={"format": "pt"})
    mt = misc_tensors()
    misc_md = {"format": "pt", "author": "gst-diffuse tests", "note": "\u00fcn\u00efc\u00f6d\u00e9 \u2713 \"q\""}
    save_file(mt, os.path.join(OUT, "py_misc.safetensors"), metadata=misc_md)

    # what the files hold, read back through safetensors' own reader
    expect = {"files": {}}
    for fname in ("py_basic.safetensors", "py_misc.safetensors"):
        with safe_open(os.path.join(OUT, fname), framework="pt") as f:
            expect["files"][fname] = {
                "metadata": f.metadata(),
                "tensors": {k: describe(f.get_tensor(k)) for k in sorted(f.keys())},
            }
    with open(os.path.join(OUT, "py_basic.json"), "w") as fp:
        json.dump(expect, fp, indent=1, sort_keys=True)

    # a sharded fp16 UNet, as diffusers writes it
    udir = os.path.join(OUT, "py_unet")
    shutil.rmtree(udir, ignore_errors=True)
    m = tiny_unet()
    m.save_pretrained(udir, max_shard_size=UNET_MAX_SHARD, variant="fp16")
    sd = m.state_dict()
    checks = {}
    for k, v in sd.items():
        checks[k] = {"shape": list(v.shape), "sum": float(v.double().sum()), "first": bits(v.reshape(-1)[:4])}
    with open(os.path.join(OUT, "py_unet.json"), "w") as fp:
        json.dump({"order": list(sd.keys()), "max_shard_size": UNET_MAX_SHARD, "variant": "fp16",
                   "prefix": "diffusion_pytorch_model", "files": sorted(os.listdir(udir)),
                   "tensors": checks}, fp, indent=1)

    # huggingface_hub's shard assignment on synthetic sizes (f32 element counts)
    from huggingface_hub import split_torch_state_dict_into_shards
    sizes = [("a", 2), ("b", 20), ("c", 3), ("d", 5), ("e", 1), ("f", 30), ("g", 4), ("h", 0), ("i", 10),
             ("j", 6)]
    sd2 = {k: torch.zeros(n) for k, n in sizes}
    limit = 40  # bytes
    split = split_torch_state_dict_into_shards(
        sd2, max_shard_size=limit, filename_pattern="diffusion_pytorch_model.fp16{suffix}.safetensors")
    index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
    with open(os.path.join(OUT, "shard_rule.json"), "w") as fp:
        json.dump({"sizes": [[k, n] for k, n in sizes], "max_shard_size": limit,
                   "filename_to_tensors": split.filename_to_tensors,
                   # what diffusers' save_pretrained writes as the index
                   "index_text": json.dumps(index, indent=2, sort_keys=True) + "\n"}, fp, indent=1)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
