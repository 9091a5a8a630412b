#!/usr/bin/env python3
"""Reference values for every tensor op of diffuse-core/include/diffuse/tensor.h,
replayed by tests/core/test-ops.c.

Writes
  tests/fixtures/ops/ops.safetensors   inputs and expected outputs, keys "<case>.<name>"
  tests/fixtures/ops/cases.json        one record per case:
      {"name": case, "op": op,
       "inputs": {"x": {"view": [["permute", [0, 2, 1]], ["narrow", dim, start, len]]}, ...},
       "params": {...op parameters...},
       "outputs": ["out"]  (or out0..out{n-1} for chunk),
       "tol": t,           max|got - want| <= t * max(1, max|want|)
       "elementwise": true (element-wise ops: |got - want| <= t * max(1, |want|) for
                            every element, so huge entries do not loosen small ones)
       "exact": true       (cast: bit-exact compare, any NaN matches any NaN)
       "torch_f32_err": e  (informative: torch's own float32 result vs the reference,
                            on the same scale as tol)
       "torch_native_err": e (f16/bf16 inputs: torch computing in that dtype vs the
                            reference; the script asserts it fits tol)}

An input "<case>.<name>" is stored contiguous in its own dtype (F32, F16 or BF16);
the test builds the same strided view the reference used by applying the listed
view steps in order (diffuse_permute / diffuse_narrow), so non-contiguous inputs
reach the op exactly as torch saw them.  An absent optional input (bias, gamma,
mask) means NULL.

Expected values are computed by torch from the inputs upcast to float64 (the
exact result of the float32/float16 inputs) and stored as F32; the script checks
that torch's own float32 path meets each case's tolerance, so the tolerance leaves
room for a different summation order but not for a wrong formula.  Exceptions:
  - timestep_embedding follows diffusers' get_timestep_embedding in float32 (the
    oracle is diffusers, whose argument t*freq is a float32 product); its
    tolerance is two to four float32 ulps of the largest argument
    (2 * max|t * scale| * 2^-23: 2.4e-4 for t up to 999).
  - cast: expected values are torch's own .to(dtype), compared bit for bit.
  - pad2d, upsample_nearest, concat, chunk, permute, embedding: exact (tol 0).
  - sdpa_fully_masked_row: torch's SDPA gives 0 (not NaN) for a query whose keys
    are all masked; softmax_all_masked_row: torch.softmax gives NaN there.

Tolerance policy (relative to max(1, max|expected|)):
  float32 output 1e-5; float16 inputs 1e-3 (1 ulp of f16 is 2^-10 relative, the
  output rounding alone is half of that); bfloat16 inputs 8e-3 (one bf16 ulp
  is 2^-7 = 7.8e-3 relative; half-ulp output rounding plus a rounded
  intermediate, as torch itself does, must fit).

Run: python3 tests/reference/make_op_fixtures.py [outdir]
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "fixtures", "ops")

torch.manual_seed(0)
GEN = torch.Generator().manual_seed(1234)

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DT_NAME = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

tensors = {}
cases = []


def randn(*shape, scale=1.0, offset=0.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=GEN, dtype=torch.float64) * scale + offset).to(dtype)


def uniform(*shape, lo=-1.0, hi=1.0, dtype=torch.float32):
    return (torch.rand(*shape, generator=GEN, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


def apply_views(t, views):
    for v in views:
        if v[0] == "permute":
            t = t.permute(*v[1])
        elif v[0] == "narrow":
            t = t.narrow(v[1], v[2], v[3])
        else:
            raise ValueError(v)
    return t


def rel_err(got, want, elementwise=False):
    got = got.double()
    want = want.double()
    fin = torch.isfinite(want)
    if not fin.any():
        return 0.0
    if elementwise:
        return ((got[fin] - want[fin]).abs() / want[fin].abs().clamp(min=1.0)).max().item()
    scale = max(1.0, want[fin].abs().max().item())
    return (got[fin] - want[fin]).abs().max().item() / scale


ELEMENTWISE_OPS = {"activation", "geglu", "binary", "scale", "axpy"}


def add_case(name, op, inputs, params, fn, tol=None, outputs=None, ref_dtype=torch.float64,
             check_torch_f32=True):
    """inputs: dict name -> (base tensor, views) or base tensor.  fn(**viewed
    inputs, **params) -> tensor or list of tensors.  The reference runs fn on the
    viewed inputs upcast to ref_dtype."""
    assert name not in [c["name"] for c in cases], name
    spec = {}
    viewed = {}
    in_dtype = torch.float32
    for k, v in inputs.items():
        base, views = v if isinstance(v, tuple) else (v, [])
        base = base.contiguous()
        tensors[f"{name}.{k}"] = base
        spec[k] = {"view": views} if views else {}
        viewed[k] = apply_views(base, views)
        if base.dtype != torch.float32:
            in_dtype = base.dtype
    ref = fn(**{k: t.to(ref_dtype) for k, t in viewed.items()}, **params)
    ref = ref if isinstance(ref, (list, tuple)) else [ref]
    if outputs is None:
        outputs = ["out"] if len(ref) == 1 else [f"out{i}" for i in range(len(ref))]
    if tol is None:
        tol = TOL[in_dtype]
    # torch's own float32 computation from the same inputs
    t32 = fn(**{k: t.to(torch.float32) for k, t in viewed.items()}, **params)
    t32 = t32 if isinstance(t32, (list, tuple)) else [t32]
    ew = op in ELEMENTWISE_OPS
    err = max(rel_err(a, b, ew) for a, b in zip(t32, ref))
    if check_torch_f32:
        assert err <= tol / 2 or (in_dtype == torch.float32 and err <= tol * 0.75), \
            f"{name}: torch f32 error {err:.3g} does not fit tol {tol:.3g}"
    for o, r in zip(outputs, ref):
        tensors[f"{name}.{o}"] = r.to(torch.float32).contiguous()
    rec = {"name": name, "op": op, "inputs": spec, "params": params_json(params),
           "outputs": outputs, "tol": tol, "torch_f32_err": float(f"{err:.3g}")}
    if ew:
        rec["elementwise"] = True
    if in_dtype != torch.float32:
        # torch computing natively in the low precision dtype must fit the tolerance too
        nat = fn(**viewed, **params)
        nat = nat if isinstance(nat, (list, tuple)) else [nat]
        nerr = max(rel_err(a, b, ew) for a, b in zip(nat, ref))
        assert nerr <= tol, f"{name}: torch {in_dtype} error {nerr:.3g} does not fit tol {tol:.3g}"
        rec["torch_native_err"] = float(f"{nerr:.3g}")
    cases.append(rec)
    return rec


def params_json(p):
    out = {}
    for k, v in p.items():
        if isinstance(v, torch.dtype):
            v = DT_NAME[v]
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


# ---------------------------------------------------------------- linear

def f_linear(x, w, b=None):
    return F.linear(x, w, b)


def lin(name, xshape, n, bias=True, dtype=torch.float32, views=None, base_shape=None):
    k = xshape[-1]
    base = randn(*(base_shape or xshape), dtype=dtype)
    inp = {"x": (base, views or []), "w": randn(n, k, scale=1 / math.sqrt(k), dtype=dtype)}
    if bias:
        inp["b"] = randn(n, scale=0.5, dtype=dtype)
    add_case(name, "linear", inp, {}, f_linear)


lin("linear_2d_bias", [7, 13], 11)
lin("linear_2d_nobias", [5, 33], 17, bias=False)
lin("linear_3d_bias", [2, 9, 24], 40)
lin("linear_3d_nobias", [3, 4, 8], 5, bias=False)
lin("linear_1row", [1, 19], 3)
lin("linear_k320", [6, 320], 16)          # SD-like K, summation over a long dim
lin("linear_4d", [2, 3, 4, 10], 6)
lin("linear_permuted", None or [2, 9, 24], 12, views=[["permute", [0, 2, 1]]], base_shape=[2, 24, 9])
lin("linear_narrowed", [3, 10, 20], 8, views=[["narrow", 2, 3, 20]], base_shape=[3, 10, 30])
lin("linear_f16", [6, 32], 12, dtype=torch.float16)
lin("linear_f16_3d_nobias", [2, 5, 16], 7, bias=False, dtype=torch.float16)
lin("linear_bf16", [6, 32], 12, dtype=torch.bfloat16)

# ---------------------------------------------------------------- matmul


def f_matmul(a, b, trans_a, trans_b, alpha):
    if trans_a:
        a = a.transpose(-1, -2)
    if trans_b:
        b = b.transpose(-1, -2)
    return alpha * torch.matmul(a, b)


def mm(name, ashape, bshape, ta=False, tb=False, alpha=1.0, dtype=torch.float32, aviews=None, abase=None,
       bviews=None, bbase=None):
    a = randn(*(abase or ashape), dtype=dtype)
    b = randn(*(bbase or bshape), dtype=dtype)
    add_case(name, "matmul", {"a": (a, aviews or []), "b": (b, bviews or [])},
             {"trans_a": ta, "trans_b": tb, "alpha": alpha}, f_matmul)


mm("matmul_2d", [5, 7], [7, 9])
mm("matmul_batched", [3, 5, 7], [3, 7, 6])
mm("matmul_trans_a", [2, 7, 5], [2, 7, 4], ta=True)
mm("matmul_trans_b_alpha", [2, 3, 5, 8], [2, 3, 6, 8], tb=True, alpha=0.125)
mm("matmul_trans_ab", [2, 8, 5], [2, 6, 8], ta=True, tb=True, alpha=-1.5)
mm("matmul_bcast_b2d", [2, 3, 5, 7], [7, 4])
mm("matmul_bcast_batch", [2, 3, 5, 7], [3, 7, 4])
mm("matmul_bcast_ones", [1, 5, 7], [4, 7, 6])
mm("matmul_bcast_both", [2, 1, 3, 4], [1, 3, 4, 5], alpha=0.5)
mm("matmul_k257", [3, 257], [257, 5])
# q @ k^T with q, k taken as [B, L, H, D].permute(0, 2, 1, 3)
mm("matmul_permuted_qk", [2, 3, 5, 8], [2, 3, 6, 8], tb=True, alpha=0.35,
   aviews=[["permute", [0, 2, 1, 3]]], abase=[2, 5, 3, 8],
   bviews=[["permute", [0, 2, 1, 3]]], bbase=[2, 6, 3, 8])
mm("matmul_narrowed", [4, 6], [6, 3], aviews=[["narrow", 1, 2, 6]], abase=[4, 9])
mm("matmul_f16", [2, 5, 16], [2, 16, 6], dtype=torch.float16)
mm("matmul_bf16_tb", [3, 16], [5, 16], tb=True, dtype=torch.bfloat16)

# ---------------------------------------------------------------- conv2d


def f_conv2d(x, w, b=None, stride_h=1, stride_w=1, pad_h=0, pad_w=0):
    return F.conv2d(x, w, b, stride=(stride_h, stride_w), padding=(pad_h, pad_w))


def conv(name, xshape, cout, kh, kw=None, sh=1, sw=None, ph=0, pw=None, bias=True, dtype=torch.float32,
         views=None, base_shape=None):
    kw = kh if kw is None else kw
    sw = sh if sw is None else sw
    pw = ph if pw is None else pw
    cin = xshape[1]
    inp = {"x": (randn(*(base_shape or xshape), dtype=dtype), views or []),
           "w": randn(cout, cin, kh, kw, scale=1 / math.sqrt(cin * kh * kw), dtype=dtype)}
    if bias:
        inp["b"] = randn(cout, scale=0.3, dtype=dtype)
    add_case(name, "conv2d", inp, {"stride_h": sh, "stride_w": sw, "pad_h": ph, "pad_w": pw}, f_conv2d)


conv("conv_k3_s1_p1_bias", [2, 5, 9, 11], 7, 3, ph=1)
conv("conv_k3_s1_p0_nobias", [1, 4, 7, 6], 3, 3, bias=False)
conv("conv_k1_bias", [1, 6, 8, 7], 3, 1)
conv("conv_k1_nobias_odd", [2, 9, 5, 3], 11, 1, bias=False)
conv("conv_k3_s2_p0", [1, 3, 11, 10], 5, 3, sh=2, bias=False)
conv("conv_k3_s2_p1", [2, 4, 8, 8], 4, 3, sh=2, ph=1)      # Downsample2D
conv("conv_k3_s2_p1_odd", [1, 3, 9, 7], 6, 3, sh=2, ph=1)
conv("conv_k4_s2_p1", [1, 3, 8, 10], 2, 4, sh=2, ph=1)
conv("conv_k2_s2_p0", [1, 5, 6, 8], 4, 2, sh=2)
conv("conv_k5_p2", [1, 2, 7, 9], 3, 5, ph=2)
conv("conv_k3x1_mixed", [1, 3, 6, 7], 4, 3, kw=1, sh=1, sw=2, ph=1, pw=0)
conv("conv_cin33_cout17", [1, 33, 6, 6], 17, 3, ph=1)
conv("conv_k3_1x1_input", [2, 4, 1, 1], 3, 3, ph=1)
conv("conv_permuted_input", [1, 4, 6, 5], 3, 3, ph=1, views=[["permute", [0, 1, 3, 2]]], base_shape=[1, 4, 5, 6])
conv("conv_narrowed_input", [2, 3, 7, 6], 4, 3, ph=1, views=[["narrow", 1, 1, 3]], base_shape=[2, 5, 7, 6])
conv("conv_f16", [1, 8, 6, 6], 5, 3, ph=1, dtype=torch.float16)
conv("conv_bf16_k1", [1, 8, 5, 4], 6, 1, dtype=torch.bfloat16)

# ---------------------------------------------------------------- pad2d


def f_pad2d(x, left, right, top, bottom):
    return F.pad(x, (left, right, top, bottom))


def pad(name, xshape, l, r, t, b, dtype=torch.float32, views=None, base_shape=None):
    add_case(name, "pad2d", {"x": (randn(*(base_shape or xshape), dtype=dtype), views or [])},
             {"left": l, "right": r, "top": t, "bottom": b}, f_pad2d, tol=0.0)


pad("pad2d_asym", [2, 3, 4, 5], 1, 2, 0, 3)
pad("pad2d_downsample", [1, 4, 6, 6], 0, 1, 0, 1)   # diffusers Downsample2D padding=0
pad("pad2d_none", [1, 2, 3, 3], 0, 0, 0, 0)
pad("pad2d_permuted", [1, 3, 5, 4], 2, 1, 1, 2, views=[["permute", [0, 1, 3, 2]]], base_shape=[1, 3, 4, 5])
pad("pad2d_f16", [1, 2, 3, 5], 1, 1, 1, 1, dtype=torch.float16)

# ---------------------------------------------------------------- group_norm

ACTS = {"none": lambda x: x, "silu": F.silu, "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
        "relu": F.relu, "sigmoid": torch.sigmoid}


def f_group_norm(x, groups, eps, act, gamma=None, beta=None):
    return ACTS[act](F.group_norm(x, groups, gamma, beta, eps))


def gn(name, xshape, groups, eps=1e-5, act="none", affine=True, dtype=torch.float32, offset=0.0, scale=1.0,
       views=None, base_shape=None, tol=None):
    c = xshape[1]
    inp = {"x": (randn(*(base_shape or xshape), dtype=dtype, offset=offset, scale=scale), views or [])}
    if affine:
        inp["gamma"] = randn(c, scale=0.3, offset=1.0, dtype=dtype)
        inp["beta"] = randn(c, scale=0.3, dtype=dtype)
    add_case(name, "group_norm", inp, {"groups": groups, "eps": eps, "act": act}, f_group_norm, tol=tol)


gn("group_norm_g32", [2, 64, 5, 6], 32)
gn("group_norm_g32_silu", [2, 64, 4, 3], 32, act="silu")
gn("group_norm_g8_eps1e-6", [1, 16, 7, 5], 8, eps=1e-6)
gn("group_norm_g1", [2, 6, 4, 4], 1, act="silu")
gn("group_norm_g32_c32", [1, 32, 3, 3], 32, eps=1e-6)      # one channel per group
gn("group_norm_3d", [2, 32, 9], 8)                          # [N, C, L] (temporal)
gn("group_norm_5d", [1, 16, 2, 3, 4], 4, act="silu")       # [N, C, F, H, W] (AnimateDiff)
gn("group_norm_noaffine", [1, 8, 5, 5], 4, affine=False)
gn("group_norm_offset", [1, 16, 8, 8], 8, offset=10.0, scale=0.5)   # mean far from 0
gn("group_norm_eps_large", [1, 8, 2, 2], 2, eps=0.5, scale=0.1)    # eps visible
gn("group_norm_permuted", [1, 16, 5, 4], 8, act="silu", views=[["permute", [0, 1, 3, 2]]], base_shape=[1, 16, 4, 5])
gn("group_norm_f16", [1, 32, 6, 6], 8, dtype=torch.float16, act="silu")
gn("group_norm_bf16", [1, 32, 4, 4], 32, dtype=torch.bfloat16)

# ---------------------------------------------------------------- layer_norm


def f_layer_norm(x, eps, gamma=None, beta=None):
    return F.layer_norm(x, (x.shape[-1],), gamma, beta, eps)


def ln(name, xshape, eps=1e-5, affine=True, dtype=torch.float32, views=None, base_shape=None, offset=0.0):
    d = xshape[-1]
    inp = {"x": (randn(*(base_shape or xshape), dtype=dtype, offset=offset), views or [])}
    if affine:
        inp["gamma"] = randn(d, scale=0.3, offset=1.0, dtype=dtype)
        inp["beta"] = randn(d, scale=0.3, dtype=dtype)
    add_case(name, "layer_norm", inp, {"eps": eps}, f_layer_norm)


ln("layer_norm_3d", [3, 7, 33], 1e-5)
ln("layer_norm_2d_768", [2, 768], 1e-5)
ln("layer_norm_noaffine", [4, 20], 1e-6, affine=False)
ln("layer_norm_offset", [3, 64], 1e-5, offset=5.0)
ln("layer_norm_narrowed", [2, 5, 16], 1e-5, views=[["narrow", 2, 4, 16]], base_shape=[2, 5, 24])
ln("layer_norm_permuted", [2, 6, 10], 1e-5, views=[["permute", [0, 2, 1]]], base_shape=[2, 10, 6])
ln("layer_norm_f16", [4, 40], 1e-5, dtype=torch.float16)
ln("layer_norm_bf16", [4, 40], 1e-5, dtype=torch.bfloat16)

# ---------------------------------------------------------------- softmax


def f_softmax(x):
    return torch.softmax(x, dim=-1)


def sm(name, x, views=None):
    add_case(name, "softmax", {"x": (x, views or [])}, {}, f_softmax)


sm("softmax_2d", randn(4, 9, scale=3.0))
sm("softmax_4d", randn(2, 3, 5, 7, scale=2.0))
x = randn(5, 8, scale=2.0)
x[0, 3] = -math.inf
x[1, :7] = -math.inf                 # one finite entry left -> exactly 1
x[2, 0] = -math.inf
x[2, 7] = -math.inf
x[4, 1::2] = -math.inf
sm("softmax_neg_inf", x)
x = randn(3, 10, scale=1.0)
x[0] += 1e4                          # large common offset
x[1, 2] = 88.0                       # exp overflows f32 without max subtraction
x[1, 5] = 90.0
x[2] = torch.tensor([1e4, -1e4, 0.0, 50.0, 1e4, -3.0, 1e4 - 1.0, 20.0, 1e4 - 30.0, -1e30])
sm("softmax_large", x)
sm("softmax_long_row", randn(2, 1000, scale=4.0))
x = randn(3, 6)
x[1] = -math.inf                     # a row with no finite entry: torch.softmax gives NaN
sm("softmax_all_masked_row", x)
sm("softmax_one_col", randn(3, 1))
sm("softmax_permuted", randn(6, 4, 3), views=[["permute", [2, 0, 1]]])
sm("softmax_narrowed", randn(3, 12), views=[["narrow", 1, 2, 7]])
sm("softmax_f16", randn(4, 33, scale=3.0, dtype=torch.float16))
sm("softmax_bf16", randn(4, 33, scale=3.0, dtype=torch.bfloat16))

# ---------------------------------------------------------------- sdpa


def f_sdpa(q, k, v, causal, scale, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          scale=None if scale <= 0 else scale)


def sdpa(name, b, h, lq, lk, d, dv=None, causal=False, scale=0.0, mask_shape=None, dtype=torch.float32,
         layout_blhd=False, mask_neg_inf=False, mask_full_row=None):
    if layout_blhd:
        # [B, L, H, D] storage as produced by a linear projection, viewed as [B, H, L, D]
        qi = (randn(b, lq, h, d, dtype=dtype), [["permute", [0, 2, 1, 3]]])
        ki = (randn(b, lk, h, d, dtype=dtype), [["permute", [0, 2, 1, 3]]])
        vi = (randn(b, lk, h, d, dtype=dtype), [["permute", [0, 2, 1, 3]]])
    else:
        qi, ki, vi = randn(b, h, lq, d, dtype=dtype), randn(b, h, lk, d, dtype=dtype), randn(b, h, lk, d, dtype=dtype)
    inp = {"q": qi, "k": ki, "v": vi}
    if mask_shape is not None:
        m = randn(*mask_shape, scale=2.0)
        if mask_neg_inf:
            # padding-style mask: -inf on some keys, never a whole row
            flat = m.view(-1, mask_shape[-1])
            for i in range(flat.shape[0]):
                flat[i, (i % (mask_shape[-1] - 1)) + 1::3] = -math.inf
        if mask_full_row is not None:
            m[..., mask_full_row, :] = -math.inf
        inp["mask"] = m.to(dtype)
    add_case(name, "sdpa", inp, {"causal": causal, "scale": scale}, f_sdpa)


sdpa("sdpa_self_d40", 2, 2, 16, 16, 40)
sdpa("sdpa_cross_d64", 1, 3, 12, 7, 64)
sdpa("sdpa_cross_lk77_d40", 1, 2, 20, 77, 40)
sdpa("sdpa_odd_d17", 2, 1, 5, 9, 17)
sdpa("sdpa_d1_lq1", 1, 1, 1, 4, 1)
sdpa("sdpa_scale", 1, 2, 6, 8, 8, scale=0.3)
sdpa("sdpa_causal", 2, 2, 10, 10, 16, causal=True)
sdpa("sdpa_causal_d40", 1, 1, 7, 7, 40, causal=True)
sdpa("sdpa_mask_2d", 1, 2, 6, 9, 8, mask_shape=[6, 9])
sdpa("sdpa_mask_4d", 2, 3, 5, 7, 8, mask_shape=[2, 3, 5, 7])
sdpa("sdpa_mask_pad_inf", 2, 2, 4, 10, 8, mask_shape=[2, 1, 1, 10], mask_neg_inf=True)
sdpa("sdpa_mask_bcast_heads", 2, 3, 4, 6, 8, mask_shape=[1, 3, 4, 6])
# a query row whose keys are all masked: torch >= 2.5 SDPA (CPU math/flash) outputs 0 there, not NaN
sdpa("sdpa_fully_masked_row", 1, 2, 4, 5, 8, mask_shape=[4, 5], mask_full_row=1)
sdpa("sdpa_blhd_layout", 2, 4, 9, 9, 40, layout_blhd=True)
sdpa("sdpa_blhd_cross", 2, 2, 8, 5, 24, layout_blhd=True)
sdpa("sdpa_f16", 1, 2, 8, 11, 40, dtype=torch.float16)
sdpa("sdpa_bf16", 1, 2, 8, 11, 64, dtype=torch.bfloat16)
sdpa("sdpa_f16_mask", 1, 2, 5, 6, 16, dtype=torch.float16, mask_shape=[5, 6])

# ---------------------------------------------------------------- activations


def f_act(x, act):
    return ACTS[act](x)


def act_input(n=64, dtype=torch.float32):
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 3.0, -3.0, 6.0, -6.0, 10.0, -10.0,
                            20.0, -20.0, 50.0, -50.0, 100.0, -100.0, 1e-3, -1e-3, 1e-7, -1e-7,
                            88.0, -88.0, 89.0, -89.0, 1e4, -1e4], dtype=torch.float64)
    r = torch.cat([special, torch.rand(n, generator=GEN, dtype=torch.float64) * 16 - 8])
    return r.to(dtype)


for act in ["silu", "gelu", "gelu_tanh", "quick_gelu", "relu", "sigmoid"]:
    add_case(f"act_{act}", "activation", {"x": act_input().reshape(4, 23)}, {"act": act}, f_act)
    add_case(f"act_{act}_permuted", "activation", {"x": (randn(3, 5, 7, scale=4.0), [["permute", [2, 0, 1]]])},
             {"act": act}, f_act)
for act in ["silu", "gelu", "gelu_tanh", "quick_gelu"]:
    add_case(f"act_{act}_f16", "activation", {"x": act_input(36, torch.float16).reshape(4, 16)}, {"act": act}, f_act)
    add_case(f"act_{act}_bf16", "activation", {"x": act_input(36, torch.bfloat16).reshape(4, 16)}, {"act": act}, f_act)

# ---------------------------------------------------------------- geglu


def f_geglu(x):
    hidden, gate = x.chunk(2, dim=-1)
    return hidden * F.gelu(gate)


add_case("geglu_3d", "geglu", {"x": randn(2, 5, 24, scale=2.0)}, {}, f_geglu)
add_case("geglu_2d_odd_half", "geglu", {"x": randn(3, 2 * 13, scale=3.0)}, {}, f_geglu)
add_case("geglu_permuted", "geglu", {"x": (randn(2, 16, 5, scale=2.0), [["permute", [0, 2, 1]]])}, {}, f_geglu)
add_case("geglu_f16", "geglu", {"x": randn(4, 32, scale=2.0, dtype=torch.float16)}, {}, f_geglu)
add_case("geglu_bf16", "geglu", {"x": randn(4, 32, scale=2.0, dtype=torch.bfloat16)}, {}, f_geglu)

# ---------------------------------------------------------------- upsample / avg pool


def f_upsample(x, out_h, out_w, scale2):
    if scale2:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return F.interpolate(x, size=(out_h, out_w), mode="nearest")


def up(name, xshape, oh, ow, scale2=False, dtype=torch.float32, views=None, base_shape=None):
    add_case(name, "upsample_nearest", {"x": (randn(*(base_shape or xshape), dtype=dtype), views or [])},
             {"out_h": oh, "out_w": ow, "scale2": scale2}, f_upsample, tol=0.0)


up("upsample_x2", [2, 3, 4, 5], 8, 10, scale2=True)
up("upsample_x2_1x1", [1, 2, 1, 1], 2, 2, scale2=True)
up("upsample_size_7x9", [1, 2, 4, 5], 7, 9)
up("upsample_size_down", [1, 2, 6, 7], 3, 4)
up("upsample_size_odd", [1, 1, 3, 5], 10, 13)
up("upsample_size_x3", [1, 2, 2, 3], 6, 9)
up("upsample_x2_permuted", [1, 3, 5, 4], 10, 8, scale2=True, views=[["permute", [0, 1, 3, 2]]],
   base_shape=[1, 3, 4, 5])
up("upsample_x2_f16", [1, 2, 3, 3], 6, 6, scale2=True, dtype=torch.float16)


def f_avg_pool(x, k, stride):
    return F.avg_pool2d(x, k, stride)


def pool(name, xshape, k, s, dtype=torch.float32, views=None, base_shape=None):
    add_case(name, "avg_pool2d", {"x": (randn(*(base_shape or xshape), dtype=dtype), views or [])},
             {"k": k, "stride": s}, f_avg_pool)


pool("avg_pool_k2s2", [2, 3, 6, 8], 2, 2)
pool("avg_pool_k2s2_odd", [1, 2, 7, 5], 2, 2)
pool("avg_pool_k3s1", [1, 2, 5, 6], 3, 1)
pool("avg_pool_k3s2", [1, 3, 9, 7], 3, 2)
pool("avg_pool_permuted", [1, 2, 6, 4], 2, 2, views=[["permute", [0, 1, 3, 2]]], base_shape=[1, 2, 4, 6])
pool("avg_pool_f16", [1, 2, 4, 4], 2, 2, dtype=torch.float16)

# ---------------------------------------------------------------- binary, scale


BIN = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}


def f_binary(a, b, kind):
    return BIN[kind](a, b)


def binary(name, kind, ashape, bshape, dtype=torch.float32, aviews=None, abase=None, bviews=None, bbase=None):
    a = randn(*(abase or ashape), dtype=dtype)
    if kind == "div":
        b = (uniform(*(bbase or bshape), lo=0.5, hi=2.0) * torch.sign(randn(*(bbase or bshape)))).to(dtype)
    else:
        b = randn(*(bbase or bshape), dtype=dtype)
    add_case(name, "binary", {"a": (a, aviews or []), "b": (b, bviews or [])}, {"kind": kind}, f_binary)


for kind in ["add", "sub", "mul", "div"]:
    binary(f"{kind}_same", kind, [3, 4, 5], [3, 4, 5])
    binary(f"{kind}_bcast_channel", kind, [2, 3, 4, 5], [3, 1, 1])
    binary(f"{kind}_bcast_both", kind, [4, 1, 6], [1, 5, 6])
    binary(f"{kind}_bcast_scalar", kind, [2, 7], [1])
    binary(f"{kind}_bcast_lhs", kind, [5], [3, 2, 5])
    binary(f"{kind}_permuted", kind, [3, 4, 5], [4, 5], aviews=[["permute", [2, 0, 1]]], abase=[4, 5, 3])
binary("add_5d", "add", [2, 1, 3, 1, 4], [5, 1, 2, 1])
binary("mul_narrowed_both", "mul", [3, 4], [3, 4], aviews=[["narrow", 1, 1, 4]], abase=[3, 6],
       bviews=[["narrow", 0, 2, 3]], bbase=[5, 4])
binary("add_f16", "add", [3, 8], [3, 8], dtype=torch.float16)
binary("mul_bf16_bcast", "mul", [2, 3, 4], [3, 1], dtype=torch.bfloat16)
binary("div_f16", "div", [4, 5], [4, 5], dtype=torch.float16)


def f_scale(x, s, b):
    return x * s + b


add_case("scale_vae", "scale", {"x": randn(1, 4, 5, 6)}, {"s": 0.18215, "b": 0.0}, f_scale)
add_case("scale_affine", "scale", {"x": randn(3, 7)}, {"s": 2.0, "b": -1.0}, f_scale)
add_case("scale_permuted", "scale", {"x": (randn(3, 4, 5), [["permute", [1, 2, 0]]])}, {"s": -0.5, "b": 0.25},
         f_scale)
add_case("scale_f16", "scale", {"x": randn(2, 9, dtype=torch.float16)}, {"s": 1.0 / 0.18215, "b": 0.5}, f_scale)



def f_axpy(a, b, alpha):
    return a + alpha * b


# diffuse_axpy_inplace: the test copies a (contiguous) and adds alpha * b in place
add_case("axpy_same", "axpy", {"a": randn(3, 8), "b": randn(3, 8)}, {"alpha": 0.75}, f_axpy)
add_case("axpy_permuted_b", "axpy", {"a": randn(4, 5, 3), "b": (randn(3, 4, 5), [["permute", [1, 2, 0]]])},
         {"alpha": -2.5}, f_axpy)
add_case("axpy_f16", "axpy", {"a": randn(2, 7, dtype=torch.float16), "b": randn(2, 7, dtype=torch.float16)},
         {"alpha": 0.5}, f_axpy)

# ---------------------------------------------------------------- concat, chunk, permute


def f_concat(dim, n, **xs):
    return torch.cat([xs[f"x{i}"] for i in range(n)], dim=dim)


def cat(name, shapes, dim, dtype=torch.float32, views=None, bases=None):
    inp = {}
    for i, s in enumerate(shapes):
        vw = (views or {}).get(i)
        inp[f"x{i}"] = (randn(*((bases or {}).get(i) or s), dtype=dtype), vw or [])
    add_case(name, "concat", inp, {"dim": dim, "n": len(shapes)}, f_concat, tol=0.0)


cat("concat_dim0", [[2, 3, 4], [1, 3, 4], [3, 3, 4]], 0)
cat("concat_dim1", [[2, 1, 4], [2, 5, 4]], 1)
cat("concat_dim2", [[2, 3, 1], [2, 3, 6], [2, 3, 2]], 2)
cat("concat_4d_channels", [[2, 3, 4, 5], [2, 2, 4, 5]], 1, views={1: [["permute", [0, 1, 3, 2]]]},
    bases={1: [2, 2, 5, 4]})
cat("concat_4d_dim3", [[1, 2, 3, 2], [1, 2, 3, 5]], 3)
cat("concat_single", [[3, 4]], 0)
cat("concat_f16", [[2, 3], [2, 5]], 1, dtype=torch.float16)


def f_chunk(x, n, dim):
    return list(x.chunk(n, dim=dim))


def chunk(name, xshape, n, dim, dtype=torch.float32, views=None, base_shape=None):
    add_case(name, "chunk", {"x": (randn(*(base_shape or xshape), dtype=dtype), views or [])}, {"n": n, "dim": dim},
             f_chunk, tol=0.0)


chunk("chunk_2_dim1", [2, 6, 5], 2, 1)
chunk("chunk_3_last", [2, 3, 9], 3, 2)
chunk("chunk_2_dim0", [4, 3], 2, 0)
chunk("chunk_1", [2, 3], 1, 1)
chunk("chunk_permuted", [4, 3, 2], 2, 0, views=[["permute", [2, 1, 0]]], base_shape=[2, 3, 4])
chunk("chunk_bf16", [2, 8], 2, 1, dtype=torch.bfloat16)


def f_permute(x, perm):
    return x.permute(*perm).contiguous()


def perm(name, xshape, p, dtype=torch.float32, views=None, base_shape=None):
    add_case(name, "permute", {"x": (randn(*(base_shape or xshape), dtype=dtype), views or [])}, {"perm": p},
             f_permute, tol=0.0)


perm("permute_0231", [2, 3, 4, 5], [0, 2, 3, 1])
perm("permute_3102", [2, 3, 4, 5], [3, 1, 0, 2])
perm("permute_bhld", [2, 7, 3, 5], [0, 2, 1, 3])
perm("permute_2d", [5, 6], [1, 0])
perm("permute_5d", [2, 3, 2, 4, 3], [0, 2, 1, 4, 3])
perm("permute_identity", [3, 4], [0, 1])
perm("permute_of_view", [3, 6], [1, 0], views=[["narrow", 1, 1, 6]], base_shape=[3, 8])
perm("permute_f16", [2, 3, 4], [2, 0, 1], dtype=torch.float16)

# ---------------------------------------------------------------- cast


def add_cast(name, x, to, views=None):
    """x: the source tensor (its dtype is the source dtype); expected is torch's .to()."""
    base = x.contiguous().clone()
    viewed = apply_views(base, views or [])
    tensors[f"{name}.x"] = base
    tensors[f"{name}.out"] = viewed.to(to).contiguous()
    cases.append({"name": name, "op": "cast", "inputs": {"x": {"view": views} if views else {}},
                  "params": {"to": DT_NAME[to]}, "outputs": ["out"], "tol": 0.0, "exact": True,
                  "torch_f32_err": 0.0})


def f32_bits(u):
    return torch.tensor(u, dtype=torch.int64).to(torch.int32).view(torch.float32)


ties = []
# f16 rounding ties and edges: normal range, subnormals, overflow
for e in [-24, -20, -15, -14, -10, 0, 1, 10, 15]:
    base = 2.0 ** e
    ties += [base, base * (1 + 2 ** -11), base * (1 + 3 * 2 ** -11), base * (1 + 2 ** -11 + 2 ** -20),
             base * (1 + 2 ** -12), base * (1 - 2 ** -12), -base * (1 + 2 ** -11)]
ties += [0.0, -0.0, 1.0, -1.0, 65504.0, -65504.0, 65519.0, 65519.99, 65520.0, -65520.0, 1e5, -1e5, 3.4e38,
         math.inf, -math.inf, math.nan, -math.nan,
         2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -25, 2.0 ** -26, 2.0 ** -25 * 1.0001, 5 * 2.0 ** -26,
         (2 ** 10 - 1) * 2.0 ** -24, (2 ** 10 - 0.5) * 2.0 ** -24, (2 ** 10 - 0.25) * 2.0 ** -24,
         2.0 ** -14, 1e-8, -1e-8, 1e-10, 1e-30, 1e-40, 0.1, 0.2, 1 / 3, math.pi, 1e4 + 0.5]
ties_t = torch.tensor(ties, dtype=torch.float64).to(torch.float32)
# bf16 ties and edges (as float32 bit patterns)
bf_bits = [0x3F808000, 0x3F818000, 0x3F808001, 0x3F80FFFF, 0x3F807FFF, 0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF,
           0xFF7FFFFF, 0x00000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x00800000, 0x80008000, 0x7F800000,
           0xFF800000, 0x7FC00000, 0x7F800001, 0xFFC00001, 0x00000000, 0x80000000]
bf_t = f32_bits(bf_bits)
rnd = randn(200, scale=3.0)
rnd_wide = (torch.rand(200, generator=GEN, dtype=torch.float64) * 80 - 40).exp2() * torch.sign(randn(200)).double()
f32_src = torch.cat([ties_t, bf_t, rnd, rnd_wide.to(torch.float32)])
add_cast("cast_f32_to_f16", f32_src, torch.float16)
add_cast("cast_f32_to_bf16", f32_src, torch.bfloat16)
add_cast("cast_f32_to_f16_permuted", randn(5, 7, scale=1000.0), torch.float16, views=[["permute", [1, 0]]])

# f16 sources: all subnormals, the edges, NaN/inf, and a sample of every exponent
h_bits = list(range(0, 0x400)) + [0x8001, 0x83FF, 0x8400, 0x7BFF, 0x7C00, 0xFC00, 0x7C01, 0x7E00, 0xFE00,
                                    0x7FFF, 0x3C00, 0x3C01, 0xBC00, 0x0400, 0x0401]
h_bits += torch.randint(0, 0x10000, (600,), generator=GEN).tolist()
h_src = torch.tensor(h_bits, dtype=torch.int32).to(torch.int16).view(torch.float16)
add_cast("cast_f16_to_f32", h_src, torch.float32)
add_cast("cast_f16_to_bf16", h_src, torch.bfloat16)
b_bits = list(range(0x0000, 0x0081)) + list(range(0x3380, 0x3400)) + list(range(0x3800, 0x3880)) + \
    [0x477F, 0x4780, 0x4781, 0x477E, 0xC780, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F7F, 0x3F80, 0x8001]
b_bits += torch.randint(0, 0x10000, (400,), generator=GEN).tolist()
b_src = torch.tensor(b_bits, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
add_cast("cast_bf16_to_f32", b_src, torch.float32)
add_cast("cast_bf16_to_f16", b_src, torch.float16)
add_cast("cast_f16_to_f32_narrowed", randn(4, 9, dtype=torch.float16), torch.float32, views=[["narrow", 1, 2, 5]])

# ---------------------------------------------------------------- timestep embedding (diffusers, float32)

from diffusers.models.embeddings import get_timestep_embedding  # noqa: E402


def temb(name, t, dim, flip, shift, scale=1.0, max_period=10000.0):
    t = torch.tensor(t, dtype=torch.float32)
    out = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale,
                                 max_period=max_period)
    # the exact value of the same formula, for information (diffusers casts to float32 itself)
    half = dim // 2
    freq = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - shift))
    arg = scale * t.double()[:, None] * freq[None, :]
    ref64 = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
    if flip:
        ref64 = torch.cat([ref64[:, half:], ref64[:, :half]], dim=-1)
    if dim % 2:
        ref64 = F.pad(ref64, (0, 1))
    # two to four float32 ulps of the largest sin/cos argument
    max_arg = max(1.0, float(t.abs().max()) * abs(scale))
    tol = max(1e-5, 2 * max_arg * 2.0 ** -23)
    tensors[f"{name}.t"] = t
    tensors[f"{name}.out"] = out.contiguous()
    err = rel_err(out, ref64)
    cases.append({"name": name, "op": "timestep_embedding", "inputs": {"t": {}},
                  "params": {"dim": dim, "flip_sin_to_cos": flip, "downscale_freq_shift": float(shift),
                             "scale": float(scale), "max_period": float(max_period)},
                  "outputs": ["out"], "tol": tol, "torch_f32_err": float(f"{err:.3g}")})


temb("temb_sd15", [0.0, 1.0, 500.0, 999.0, 981.0, 37.5], 320, True, 0)
temb("temb_flip_false_shift1", [0.0, 3.0, 250.0, 999.0], 64, False, 1)
temb("temb_odd_dim", [1.0, 10.0, 100.0], 33, True, 1)
temb("temb_scale_period", [0.0, 0.5, 7.0, 900.0], 16, False, 0, scale=2.0, max_period=1000.0)
temb("temb_fractional_small", [0.0, 0.001, 0.25, 0.999], 256, True, 0)

# ---------------------------------------------------------------- embedding


def emb(name, v, d, ids, dtype=torch.float32):
    table = randn(v, d, dtype=dtype)
    tensors[f"{name}.table"] = table
    tensors[f"{name}.out"] = table[torch.tensor(ids)].to(torch.float32).contiguous()
    cases.append({"name": name, "op": "embedding", "inputs": {"table": {}}, "params": {"ids": ids},
                  "outputs": ["out"], "tol": 0.0, "torch_f32_err": 0.0})


emb("embedding_f32", 50, 16, [3, 0, 49, 3, 7])
emb("embedding_one", 4, 5, [2])
emb("embedding_f16", 20, 8, [19, 0, 5, 5], dtype=torch.float16)
emb("embedding_bf16", 9, 6, [8, 1], dtype=torch.bfloat16)

# ---------------------------------------------------------------- conv2d, larger
# Shapes for the CUDA implicit-GEMM convolution (f16/bf16, Cin % 8 == 0): more
# than one 128-wide tile in cout and in output positions, K = 9 * Cin not a
# multiple of its 32-step, stride 2.  Added last so the cases above keep their
# values.
conv("conv_tiles_f16", [1, 8, 8, 17], 130, 3, ph=1, dtype=torch.float16)
conv("conv_deep_k_bf16", [2, 48, 5, 6], 24, 3, ph=1, dtype=torch.bfloat16)
conv("conv_s2_f16", [2, 16, 11, 9], 20, 3, sh=2, ph=1, dtype=torch.float16)

# ---------------------------------------------------------------- sdpa, larger
# Shapes for the CUDA flash-attention kernel (f16/bf16, D % 8 == 0, no mask):
# more than one 64-row query block and 64-key tile, a last tile only partly
# filled (Lk 130, 70), Lk exactly one tile, head dims 40 / 80 / 160 padded to
# the kernel's 48 / 80 / 160, and the [B, L, H, D] layout of SD's projections.
sdpa("sdpa_tiles_d40_f16", 1, 2, 66, 130, 40, dtype=torch.float16, layout_blhd=True)
sdpa("sdpa_tiles_d80_bf16", 1, 1, 65, 64, 80, dtype=torch.bfloat16)
sdpa("sdpa_tiles_d160_f16", 1, 1, 20, 70, 160, dtype=torch.float16)

# ---------------------------------------------------------------- write

os.makedirs(OUT, exist_ok=True)
save_file(tensors, os.path.join(OUT, "ops.safetensors"), metadata={"format": "pt"})
with open(os.path.join(OUT, "cases.json"), "w") as f:
    json.dump({"generator": "tests/reference/make_op_fixtures.py", "torch": torch.__version__, "cases": cases},
              f, indent=1)
size = os.path.getsize(os.path.join(OUT, "ops.safetensors")) + os.path.getsize(os.path.join(OUT, "cases.json"))
print(f"{len(cases)} cases, {len(tensors)} tensors, {size / 1024:.0f} KiB in {OUT}")
assert size < 1536 * 1024
