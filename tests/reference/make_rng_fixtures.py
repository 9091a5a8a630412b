#!/usr/bin/env python3
"""Expected values for diffuse-core's torch-compatible generator (rng.h).

Writes tests/fixtures/rng/randn.safetensors (+ randn.json, an index of what
each tensor is).  Each tensor is what

    g = torch.Generator("cpu").manual_seed(seed); torch.randn(n, generator=g)

returns.  Tensors named "libm_*" are made in a child process with
ATEN_CPU_CAPABILITY=default (torch's portable Box-Muller, as on ARM); the rest
with the CPU's own capability (AVX2/AVX-512 on x86-64: the usual case).

Run from the repository root:  python3 tests/reference/make_rng_fixtures.py
"""
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import save_file, load_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "..", "fixtures", "rng")

SEEDS = [0, 1, 33, 2**32 + 5, 0xDEADBEEFCAFEBABE]
SHAPES = [(1,), (7,), (15,), (16,), (17,), (33,), (4, 8, 8), (2, 4, 64, 64)]
BIG = (2, 4, 64, 64)
STRIDE = 61


def draw(seed, shape, dtype=torch.float32):
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


def main_set():
    t = {}
    index = {}
    for seed in SEEDS:
        for shape in SHAPES:
            x = draw(seed, shape).flatten()
            name = f"seed{seed}_n{x.numel()}"
            if shape == BIG and seed != 0:
                # a strided sample plus the tail keep the file small
                t[name + "_stride"] = x[::STRIDE].contiguous()
                t[name + "_tail"] = x[-16:].contiguous()
                index[name + "_stride"] = {"seed": seed, "n": x.numel(), "stride": STRIDE}
                index[name + "_tail"] = {"seed": seed, "n": x.numel(), "tail": 16}
            else:
                t[name] = x.contiguous()
                index[name] = {"seed": seed, "n": x.numel()}
    # successive draws from one generator (the scalar path caches a normal)
    g = torch.Generator("cpu").manual_seed(42)
    seq = [7, 1, 512, 3, 16, 17, 1, 2, 40]
    for i, n in enumerate(seq):
        name = f"seq42_{i}_n{n}"
        t[name] = torch.randn(n, generator=g).contiguous()
        index[name] = {"seed": 42, "sequence": seq, "position": i, "n": n}
    # reduced-precision layouts (diffusers fp16 pipelines with a CPU generator)
    for dt, tag in ((torch.float16, "f16"), (torch.bfloat16, "bf16")):
        for n in (7, 16, 33, 261):
            name = f"{tag}_seed5_n{n}"
            t[name] = draw(5, (n,), dt).contiguous()
            index[name] = {"seed": 5, "n": n, "dtype": tag}
        # and a later f32 draw from the same generator, to check consumption
        g = torch.Generator("cpu").manual_seed(5)
        torch.randn(261, generator=g, dtype=dt)
        name = f"{tag}_seed5_after261_n20"
        t[name] = torch.randn(20, generator=g).contiguous()
        index[name] = {"seed": 5, "n": 20, "after": {"n": 261, "dtype": tag}}
    return t, index


def libm_set():
    t = {}
    index = {}
    for seed in (0, 1):
        for n in (16, 17, 33, 256, 4096):
            name = f"libm_seed{seed}_n{n}"
            t[name] = draw(seed, (n,)).contiguous()
            index[name] = {"seed": seed, "n": n, "math": "libm"}
    g = torch.Generator("cpu").manual_seed(7)
    for i, n in enumerate((5, 40, 3)):
        name = f"libm_seq7_{i}_n{n}"
        t[name] = torch.randn(n, generator=g).contiguous()
        index[name] = {"seed": 7, "n": n, "sequence": [5, 40, 3], "position": i, "math": "libm"}
    return t, index


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--libm-child":
        t, index = libm_set()
        save_file(t, sys.argv[2])
        with open(sys.argv[2] + ".json", "w") as f:
            json.dump({"index": index, "capability": torch.backends.cpu.get_cpu_capability()}, f)
        return
    os.makedirs(OUT_DIR, exist_ok=True)
    tensors, index = main_set()
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        sys.exit(f"run this on an x86-64 CPU with AVX2 (torch capability {cap})")
    tmp = os.path.join(OUT_DIR, ".libm.tmp.safetensors")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    subprocess.run([sys.executable, __file__, "--libm-child", tmp], check=True, env=env)
    with open(tmp + ".json") as f:
        child = json.load(f)
    assert child["capability"] == "DEFAULT", child["capability"]
    tensors.update(load_file(tmp))
    index.update(child["index"])
    os.remove(tmp)
    os.remove(tmp + ".json")
    meta = {"torch": torch.__version__, "capability": cap}
    save_file(tensors, os.path.join(OUT_DIR, "randn.safetensors"), metadata=meta)
    with open(os.path.join(OUT_DIR, "randn.json"), "w") as f:
        json.dump({"torch": torch.__version__, "capability": cap, "tensors": index}, f, indent=1, sort_keys=True)
    print(f"{len(tensors)} tensors, torch {torch.__version__} ({cap})")


if __name__ == "__main__":
    main()
