/* gst-diffuse — CUDA backend: group norm (+ fused activation), layer norm,
 * softmax.  Statistics in f32 whatever the storage dtype, as diffusers'
 * upcast.
 *
 * Group norm is two launches so a group is spread over many blocks: (1)
 * grid [N*G, S] computes Welford partials (count, mean, M2) of S chunks of
 * each group; (2) grid [N*G, S] merges the S partials of its group (every
 * thread, in the same order: deterministic) and writes its chunk
 * normalised, scaled, shifted and activated. */
#include "common.cuh"

#define NT 256

struct Welford {
  float n, mean, m2;
};

__device__ __forceinline__ Welford
wf_merge (Welford a, Welford b)
{
  if (b.n == 0.0f)
    return a;
  if (a.n == 0.0f)
    return b;
  Welford r;
  r.n = a.n + b.n;
  float delta = b.mean - a.mean;
  float fb = b.n / r.n;
  r.mean = a.mean + delta * fb;
  r.m2 = a.m2 + b.m2 + delta * delta * a.n * fb;
  return r;
}

/* Block-wide Welford merge; result valid in every thread. */
__device__ Welford
block_welford (Welford w)
{
  __shared__ Welford sh[NT / 32];
  for (int o = 16; o > 0; o >>= 1) {
    Welford t;
    t.n = __shfl_xor_sync (0xffffffffu, w.n, o);
    t.mean = __shfl_xor_sync (0xffffffffu, w.mean, o);
    t.m2 = __shfl_xor_sync (0xffffffffu, w.m2, o);
    w = wf_merge (w, t);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0)
    sh[warp] = w;
  __syncthreads ();
  Welford r = sh[0];
  for (int i = 1; i < (int) (blockDim.x >> 5); i++)
    r = wf_merge (r, sh[i]);
  __syncthreads ();   /* sh may be reused by the caller's next reduction */
  return r;
}

__device__ float
block_sum (float v)
{
  __shared__ float sh[NT / 32];
  for (int o = 16; o > 0; o >>= 1)
    v += __shfl_xor_sync (0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0)
    sh[warp] = v;
  __syncthreads ();
  float r = 0.0f;
  for (int i = 0; i < (int) (blockDim.x >> 5); i++)
    r += sh[i];
  __syncthreads ();
  return r;
}

__device__ float
block_max (float v)
{
  __shared__ float sh[NT / 32];
  for (int o = 16; o > 0; o >>= 1)
    v = fmaxf (v, __shfl_xor_sync (0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0)
    sh[warp] = v;
  __syncthreads ();
  float r = -INFINITY;
  for (int i = 0; i < (int) (blockDim.x >> 5); i++)
    r = fmaxf (r, sh[i]);
  __syncthreads ();
  return r;
}

/* ---- group norm ------------------------------------------------------------ */

/* x contiguous; group gi (= n * G + g) spans E = cpg * S elements from gi * E */
__global__ void __launch_bounds__ (NT)
k_gn_stats (const char *x, int dt, int64_t E, int64_t chunk, Welford *part)
{
  const int64_t gi = blockIdx.x, s = blockIdx.y;
  const int64_t b0 = s * chunk, b1 = MIN (E, b0 + chunk);
  const int64_t base = gi * E;
  Welford w = { 0.0f, 0.0f, 0.0f };
  for (int64_t i = b0 + threadIdx.x; i < b1; i += blockDim.x) {
    float v = ldf (x, dt, base + i);
    w.n += 1.0f;
    float d = v - w.mean;
    w.mean += d / w.n;
    w.m2 += d * (v - w.mean);
  }
  w = block_welford (w);
  if (threadIdx.x == 0)
    part[gi * gridDim.y + s] = w;
}

__global__ void __launch_bounds__ (NT)
k_gn_apply (char *o, const char *x, int dt, int64_t E, int64_t chunk, int nsplit, const Welford *part, int64_t S,
            int64_t cpg, int G, const char *gamma, int gdt, int64_t gs, const char *beta, int bdt, int64_t bs,
            float eps, int act)
{
  const int64_t gi = blockIdx.x, s = blockIdx.y;
  Welford w = part[gi * nsplit];
  for (int i = 1; i < nsplit; i++)
    w = wf_merge (w, part[gi * nsplit + i]);
  const float mean = w.mean;
  const float var = w.n > 0.0f ? w.m2 / w.n : 0.0f;   /* biased, as torch */
  const float rstd = rsqrtf (var + eps);
  const int64_t g = gi % G;
  const int64_t b0 = s * chunk, b1 = MIN (E, b0 + chunk);
  const int64_t base = gi * E;
  for (int64_t i = b0 + threadIdx.x; i < b1; i += blockDim.x) {
    int64_t ch = g * cpg + i / S;
    float sc = rstd * (gamma ? ldf (gamma, gdt, ch * gs) : 1.0f);
    float sf = (beta ? ldf (beta, bdt, ch * bs) : 0.0f) - mean * sc;
    float v = ldf (x, dt, base + i) * sc + sf;
    stf (o, dt, base + i, dcu_act (act, v));
  }
}

/* a 1-D-addressable parameter: its element stride, or a contiguous copy */
static DiffuseTensor *
param_1d (DiffuseTensor *p, int64_t *stride, GError **error)
{
  if (!p) {
    *stride = 0;
    return NULL;
  }
  if (p->ndim == 1) {
    *stride = p->stride[0];
    return diffuse_tensor_ref (p);
  }
  *stride = 1;
  return dcu_contig (p, -1, error);
}

gboolean
dcu_group_norm (DiffuseTensor *out, DiffuseTensor *x, int groups, DiffuseTensor *gamma, DiffuseTensor *beta, float eps,
                DiffuseActivation act, GError **error)
{
  CudaCtx *c = dcu_ctx_of (out);
  if (!dcu_enter (c, error))
    return FALSE;
  DCU_PROF (c, "group_norm");
  const int64_t N = x->shape[0], C = x->shape[1];
  int64_t S = 1;
  for (int d = 2; d < x->ndim; d++)
    S *= x->shape[d];
  const int64_t cpg = C / groups, E = cpg * S;
  if (N * C * S == 0)
    return TRUE;
  gboolean ok = FALSE;
  Welford *part = NULL;
  int64_t gs = 0, bs = 0;
  DiffuseTensor *xc = NULL, *gc = NULL, *bc = NULL;
  /* x may be in another dtype than out only if the generic layer changes; it allocates out in x's dtype */
  xc = dcu_contig (x, out->dtype, error);
  if (!xc)
    goto done;
  if (gamma && !(gc = param_1d (gamma, &gs, error)))
    goto done;
  if (beta && !(bc = param_1d (beta, &bs, error)))
    goto done;
  {
    int64_t nsplit = MIN ((int64_t) 64, MAX ((int64_t) 1, (E + 8191) / 8192));
    int64_t chunk = (E + nsplit - 1) / nsplit;
    int64_t ngroups = N * groups;
    if (ngroups > 2147483647 || nsplit > 65535) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "group_norm: too many groups");
      goto done;
    }
    part = (Welford *) dcu_scratch (c, sizeof (Welford) * (size_t) (ngroups * nsplit), error);
    if (!part)
      goto done;
    dim3 grid ((unsigned) ngroups, (unsigned) nsplit);
    k_gn_stats<<<grid, NT, 0, c->stream>>> (dcu_ptr (xc), xc->dtype, E, chunk, part);
    if (!dcu_check_launch (error, "group_norm"))
      goto done;
    k_gn_apply<<<grid, NT, 0, c->stream>>> (dcu_ptr (out), dcu_ptr (xc), out->dtype, E, chunk, (int) nsplit, part, S,
                                            cpg, groups, gc ? dcu_ptr (gc) : NULL, gc ? gc->dtype : 0, gs,
                                            bc ? dcu_ptr (bc) : NULL, bc ? bc->dtype : 0, bs, eps, (int) act);
    ok = dcu_check_launch (error, "group_norm");
  }
done:
  dcu_scratch_free (c, part);
  diffuse_tensor_clear (&xc);
  diffuse_tensor_clear (&gc);
  diffuse_tensor_clear (&bc);
  return ok;
}

/* ---- layer norm --------------------------------------------------------------- */

__global__ void __launch_bounds__ (NT)
k_layer_norm (char *o, const char *x, int dt, int64_t D, const char *gamma, int gdt, int64_t gs, const char *beta,
              int bdt, int64_t bs, float eps)
{
  const int64_t base = (int64_t) blockIdx.x * D;
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
    s += ldf (x, dt, base + i);
  const float mean = block_sum (s) / (float) D;
  float v = 0.0f;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    float d = ldf (x, dt, base + i) - mean;
    v += d * d;
  }
  const float rstd = rsqrtf (block_sum (v) / (float) D + eps);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    float y = (ldf (x, dt, base + i) - mean) * rstd;
    if (gamma)
      y *= ldf (gamma, gdt, i * gs);
    if (beta)
      y += ldf (beta, bdt, i * bs);
    stf (o, dt, base + i, y);
  }
}

gboolean
dcu_layer_norm (DiffuseTensor *out, DiffuseTensor *x, DiffuseTensor *gamma, DiffuseTensor *beta, float eps,
                GError **error)
{
  CudaCtx *c = dcu_ctx_of (out);
  if (!dcu_enter (c, error))
    return FALSE;
  DCU_PROF (c, "layer_norm");
  const int64_t D = x->ndim ? x->shape[x->ndim - 1] : 1;
  const int64_t rows = D ? diffuse_tensor_numel (x) / D : 0;
  if (rows == 0 || D == 0)
    return TRUE;
  gboolean ok = FALSE;
  int64_t gs = 0, bs = 0;
  DiffuseTensor *xc = NULL, *gc = NULL, *bc = NULL;
  xc = dcu_contig (x, out->dtype, error);
  if (!xc)
    goto done;
  if (gamma && !(gc = param_1d (gamma, &gs, error)))
    goto done;
  if (beta && !(bc = param_1d (beta, &bs, error)))
    goto done;
  if (rows > 2147483647) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "layer_norm: too many rows");
    goto done;
  }
  k_layer_norm<<<(unsigned) rows, NT, 0, c->stream>>> (dcu_ptr (out), dcu_ptr (xc), out->dtype, D,
                                                       gc ? dcu_ptr (gc) : NULL, gc ? gc->dtype : 0, gs,
                                                       bc ? dcu_ptr (bc) : NULL, bc ? bc->dtype : 0, bs, eps);
  ok = dcu_check_launch (error, "layer_norm");
done:
  diffuse_tensor_clear (&xc);
  diffuse_tensor_clear (&gc);
  diffuse_tensor_clear (&bc);
  return ok;
}

/* ---- softmax ---------------------------------------------------------------------- */

__global__ void __launch_bounds__ (NT)
k_softmax (char *o, const char *x, int dt, int64_t D)
{
  const int64_t base = (int64_t) blockIdx.x * D;
  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
    m = fmaxf (m, ldf (x, dt, base + i));
  m = block_max (m);
  if (m == -INFINITY) {
    /* every element -inf: NaN, as torch */
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
      stf (o, dt, base + i, __int_as_float (0x7fc00000));
    return;
  }
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
    s += expf (ldf (x, dt, base + i) - m);
  const float inv = 1.0f / block_sum (s);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
    stf (o, dt, base + i, expf (ldf (x, dt, base + i) - m) * inv);
}

gboolean
dcu_softmax (DiffuseTensor *out, DiffuseTensor *x, GError **error)
{
  CudaCtx *c = dcu_ctx_of (out);
  if (!dcu_enter (c, error))
    return FALSE;
  DCU_PROF (c, "softmax");
  const int64_t D = x->ndim ? x->shape[x->ndim - 1] : 1;
  const int64_t rows = D ? diffuse_tensor_numel (x) / D : 0;
  if (rows == 0 || D == 0)
    return TRUE;
  if (rows > 2147483647) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "softmax: too many rows");
    return FALSE;
  }
  DiffuseTensor *xc = dcu_contig (x, out->dtype, error);
  if (!xc)
    return FALSE;
  k_softmax<<<(unsigned) rows, NT, 0, c->stream>>> (dcu_ptr (out), dcu_ptr (xc), out->dtype, D);
  diffuse_tensor_unref (xc);
  return dcu_check_launch (error, "softmax");
}
