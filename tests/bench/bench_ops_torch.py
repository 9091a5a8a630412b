#!/usr/bin/env python3
"""torch CPU timings of the same ops and shapes as tests/bench/bench-ops.c
(SD1.5 UNet shapes: 512x512 image, 64x64 latent, batch 2 for CFG).

  bench_ops_torch.py [--threads N] [--reps N] [--filter SUBSTRING] [--only NAME]

Prints the same tab-separated lines as bench-ops:
  name  median_ms  min_ms  gflops(median)  shape
Each op runs once as a warm-up, then --reps times; float32, inference mode.
"""
import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def conv3(b, c, h, w, cout):
    x = torch.randn(b, c, h, w)
    wt = torch.randn(cout, c, 3, 3) / (c * 9) ** 0.5
    bias = torch.randn(cout) * 0.1
    return (lambda: F.conv2d(x, wt, bias, stride=1, padding=1)), 2.0 * b * cout * c * 9 * h * w * 1e-9


def linear(m, k, n):
    x = torch.randn(m // 4096, 4096, k)
    wt = torch.randn(n, k) / k ** 0.5
    bias = torch.randn(n) * 0.1
    return (lambda: F.linear(x, wt, bias)), 2.0 * m * k * n * 1e-9


def attn(b, h, lq, lk, d):
    q = torch.randn(b, h, lq, d)
    k = torch.randn(b, h, lk, d)
    v = torch.randn(b, h, lk, d)
    return (lambda: F.scaled_dot_product_attention(q, k, v)), 4.0 * b * h * lq * lk * d * 1e-9


def group_norm(b, c, h, w, silu=False):
    x = torch.randn(b, c, h, w)
    g = torch.randn(c)
    be = torch.randn(c) * 0.1
    if silu:
        return (lambda: F.silu(F.group_norm(x, 32, g, be, 1e-5))), 0.0
    return (lambda: F.group_norm(x, 32, g, be, 1e-5)), 0.0


# same names, order and shapes as bench-ops.c
BENCHES = [
    ("conv3x3_320_64x64_b2", "x[2,320,64,64] w[320,320,3,3]", lambda: conv3(2, 320, 64, 64, 320)),
    ("conv3x3_640_32x32_b2", "x[2,640,32,32] w[640,640,3,3]", lambda: conv3(2, 640, 32, 32, 640)),
    ("conv3x3_1280_16x16_b2", "x[2,1280,16,16] w[1280,1280,3,3]", lambda: conv3(2, 1280, 16, 16, 1280)),
    ("conv3x3_1280_8x8_b2", "x[2,1280,8,8] w[1280,1280,3,3]", lambda: conv3(2, 1280, 8, 8, 1280)),
    ("linear_8192x320_to_320", "x[2,4096,320] w[320,320]", lambda: linear(2 * 4096, 320, 320)),
    ("linear_8192x320_to_2560", "x[2,4096,320] w[2560,320] (GEGLU proj)", lambda: linear(2 * 4096, 320, 2560)),
    ("linear_8192x1280_to_320", "x[2,4096,1280] w[320,1280] (ff out)", lambda: linear(2 * 4096, 1280, 320)),
    ("attn_self_2x8x4096x4096_d40", "q,k,v[2,8,4096,40]", lambda: attn(2, 8, 4096, 4096, 40)),
    ("attn_cross_2x8x4096x77_d40", "q[2,8,4096,40] k,v[2,8,77,40]", lambda: attn(2, 8, 4096, 77, 40)),
    ("attn_self_2x8x1024x1024_d80", "q,k,v[2,8,1024,80]", lambda: attn(2, 8, 1024, 1024, 80)),
    ("group_norm32_320x64x64_b2", "x[2,320,64,64]", lambda: group_norm(2, 320, 64, 64)),
    ("group_norm32_silu_320x64x64_b2", "x[2,320,64,64] + silu", lambda: group_norm(2, 320, 64, 64, True)),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--filter", default=None)
    ap.add_argument("--only", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"# torch {torch.__version__} CPU, threads={torch.get_num_threads()}, median of {a.reps} after 1 warm-up")
    print("# name\tmedian_ms\tmin_ms\tgflops\tshape")
    with torch.inference_mode():
        for name, shape, make in BENCHES:
            if (a.filter and a.filter not in name) or (a.only and a.only != name):
                continue
            fn, gflop = make()
            fn()
            ms = []
            for _ in range(max(1, a.reps)):
                t0 = time.perf_counter()
                out = fn()
                ms.append((time.perf_counter() - t0) * 1e3)
                del out
            med = statistics.median(ms)
            print(f"{name}\t{med:.3f}\t{min(ms):.3f}\t{gflop / (med * 1e-3) if gflop else 0.0:.1f}\t{shape}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
