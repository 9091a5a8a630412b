#!/usr/bin/env python3
"""Loads the files OUR C writer produced with Python safetensors and diffusers.

Input: tests/fixtures/safetensors/ours/ (made by
    DIFFUSE_ST_WRITE_OURS=tests/fixtures/safetensors/ours \
        <build>/tests/core/test-safetensors -p /safetensors/ours/write
 from the repository root, with DIFFUSE_FIXTURES=tests/fixtures)

Output: tests/fixtures/safetensors/ours/roundtrip_result.json with what Python
read (dtype, shape, element bits of every tensor of basic.safetensors; the
metadata of meta.safetensors) and the results of these checks:
  - basic.safetensors is byte-identical to safetensors.torch.save() of the
    same tensors with metadata {"format": "pt"};
  - unet/ loads with UNet2DConditionModel.from_pretrained(variant="fp16"),
    its state dict equals the reference model's (py_unet/), and its files
    (shards, index, config.json) are byte-identical to save_pretrained's.
test-safetensors asserts these values (CI cannot run Python), and that our
writer still produces byte-identical files to ours/.

Run:  python3 tests/reference/check_st_roundtrip.py
"""
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "fixtures", "safetensors")
OURS = os.path.join(FIX, "ours")

INT_VIEW = {torch.float32: (torch.int32, 0xFFFFFFFF), torch.float16: (torch.int16, 0xFFFF),
            torch.bfloat16: (torch.int16, 0xFFFF)}
ST_NAME = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def bits(t):
    iv, m = INT_VIEW[t.dtype]
    return [int(v) & m for v in t.contiguous().reshape(-1).view(iv).tolist()]


def main():
    res = {}
    path = os.path.join(OURS, "basic.safetensors")
    tensors = {}
    with safe_open(path, framework="pt") as f:
        res["basic_metadata"] = f.metadata()
        res["basic"] = {}
        for k in sorted(f.keys()):
            t = f.get_tensor(k)
            tensors[k] = t
            res["basic"][k] = {"dtype": ST_NAME[t.dtype], "shape": list(t.shape), "bits": bits(t)}
    with open(path, "rb") as fp:
        ours = fp.read()
    res["basic_byte_identical_to_save_file"] = ours == save(tensors, metadata={"format": "pt"})

    with safe_open(os.path.join(OURS, "meta.safetensors"), framework="pt") as f:
        res["meta_metadata"] = f.metadata()
        res["meta_keys"] = sorted(f.keys())

    from diffusers import UNet2DConditionModel
    udir = os.path.join(OURS, "unet")
    ok = False
    equal = False
    try:
        m = UNet2DConditionModel.from_pretrained(udir, variant="fp16", torch_dtype=torch.float16)
        ok = True
        ref = UNet2DConditionModel.from_pretrained(os.path.join(FIX, "py_unet"), variant="fp16",
                                                   torch_dtype=torch.float16)
        a, b = m.state_dict(), ref.state_dict()
        equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        res["unet_n_tensors"] = len(a)
        # and the raw shard contents, read without diffusers
        raw = {}
        for fn in sorted(os.listdir(udir)):
            if fn.endswith(".safetensors"):
                raw.update(load_file(os.path.join(udir, fn)))
        equal = equal and raw.keys() == a.keys() and all(torch.equal(raw[k], a[k]) for k in a)
    except Exception as e:  # recorded, and the C test fails on it
        res["unet_error"] = repr(e)
    res["unet_loaded_by_from_pretrained"] = ok
    res["unet_state_dict_equal_to_reference"] = equal

    same = True
    ref_files = sorted(os.listdir(os.path.join(FIX, "py_unet")))
    res["unet_files"] = sorted(os.listdir(udir))
    same = res["unet_files"] == ref_files
    for fn in ref_files:
        if fn == "config.json":
            continue
        with open(os.path.join(udir, fn), "rb") as x, open(os.path.join(FIX, "py_unet", fn), "rb") as y:
            same = same and x.read() == y.read()
    res["unet_files_identical_to_save_pretrained"] = same
    with open(os.path.join(udir, "config.json"), "rb") as x, \
            open(os.path.join(FIX, "py_unet", "config.json"), "rb") as y:
        res["config_identical_to_save_pretrained"] = x.read() == y.read()

    with open(os.path.join(OURS, "roundtrip_result.json"), "w") as fp:
        json.dump(res, fp, indent=1, sort_keys=True)
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, (dict, list))}, indent=1))


if __name__ == "__main__":
    main()
