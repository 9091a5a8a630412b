/* gst-diffuse — CUDA backend: padding, nearest upsampling, average pooling,
 * timestep embedding, embedding lookup.  (Casts are dcu_copy in
 * elementwise.cu.)  Same formulas as the CPU backend. */
#include "common.cuh"

/* ---- pad2d: zero padding of the last two dims ---------------------------------- */

__global__ void
k_pad2d (char *o, int odt, TView x, int64_t Ho, int64_t Wo, int left, int top, int64_t n)
{
  const int nd = x.nd;
  const int64_t H = x.shape[nd - 2], W = x.shape[nd - 1];
  for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n; i += (int64_t) gridDim.x * blockDim.x) {
    int64_t ox = i % Wo, r = i / Wo;
    int64_t oy = r % Ho, plane = r / Ho;
    int64_t iy = oy - top, ix = ox - left;
    float v = 0.0f;
    if (iy >= 0 && iy < H && ix >= 0 && ix < W) {
      int64_t off = iy * x.stride[nd - 2] + ix * x.stride[nd - 1];
      for (int d = nd - 3; d >= 0; d--) {
        int64_t q = plane / x.shape[d];
        off += (plane - q * x.shape[d]) * x.stride[d];
        plane = q;
      }
      v = ldf (x.p, x.dt, off);
    }
    stf (o, odt, i, v);
  }
}

gboolean
dcu_pad2d (DiffuseTensor *out, DiffuseTensor *x, int left, int top, GError **error)
{
  CudaCtx *c = dcu_ctx_of (out);
  if (!dcu_enter (c, error))
    return FALSE;
  DCU_PROF (c, "pad2d");
  int64_t n = diffuse_tensor_numel (out);
  if (n == 0)
    return TRUE;
  int nd = out->ndim;
  TView v = tview (x);
  k_pad2d<<<dcu_blocks (c, n), 256, 0, c->stream>>> (dcu_ptr (out), out->dtype, v, out->shape[nd - 2],
                                                     out->shape[nd - 1], left, top, n);
  return dcu_check_launch (error, "pad2d");
}

/* ---- nearest upsampling (torch 'nearest': src = min(floor(dst * in/out), in-1), float scale) -- */

__global__ void
k_upsample (char *o, int odt, TView x, int64_t Ho, int64_t Wo, float sy, float sx, int64_t n)
{
  const int64_t C = x.shape[1], H = x.shape[2], W = x.shape[3];
  for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n; i += (int64_t) gridDim.x * blockDim.x) {
    int64_t ox = i % Wo, r = i / Wo;
    int64_t oy = r % Ho, plane = r / Ho;
    int64_t ch = plane % C, b = plane / C;
    int64_t iy = MIN ((int64_t) floorf ((float) oy * sy), H - 1);
    int64_t ix = MIN ((int64_t) floorf ((float) ox * sx), W - 1);
    stf (o, odt, i, ldf (x.p, x.dt, b * x.stride[0] + ch * x.stride[1] + iy * x.stride[2] + ix * x.stride[3]));
  }
}

gboolean
dcu_upsample_nearest (DiffuseTensor *out, DiffuseTensor *x, GError **error)
{
  CudaCtx *c = dcu_ctx_of (out);
  if (!dcu_enter (c, error))
    return FALSE;
  DCU_PROF (c, "upsample_nearest");
  int64_t n = diffuse_tensor_numel (out);
  if (n == 0)
    return TRUE;
  int64_t Ho = out->shape[2], Wo = out->shape[3];
  const float sy = (float) x->shape[2] / (float) Ho, sx = (float) x->shape[3] / (float) Wo;
  TView v = tview (x);
  k_upsample<<<dcu_blocks (c, n), 256, 0, c->stream>>> (dcu_ptr (out), out->dtype, v, Ho, Wo, sy, sx, n);
  return dcu_check_launch (error, "upsample_nearest");
}

/* ---- average pooling (no padding) -------------------------------------------------- */

__global__ void
k_avg_pool (char *o, int odt, TView x, int64_t Ho, int64_t Wo, int k, int stride, float inv, int64_t n)
{
  const int64_t C = x.shape[1];
  for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n; i += (int64_t) gridDim.x * blockDim.x) {
    int64_t ox = i % Wo, r = i / Wo;
    int64_t oy = r % Ho, plane = r / Ho;
    int64_t ch = plane % C, b = plane / C;
    int64_t base = b * x.stride[0] + ch * x.stride[1];
    float s = 0.0f;
    for (int ky = 0; ky < k; ky++)
      for (int kx = 0; kx < k; kx++)
        s += ldf (x.p, x.dt, base + (oy * stride + ky) * x.stride[2] + (ox * stride + kx) * x.stride[3]);
    stf (o, odt, i, s * inv);
  }
}

gboolean
dcu_avg_pool2d (DiffuseTensor *out, DiffuseTensor *x, int k, int stride, GError **error)
{
  CudaCtx *c = dcu_ctx_of (out);
  if (!dcu_enter (c, error))
    return FALSE;
  DCU_PROF (c, "avg_pool2d");
  int64_t n = diffuse_tensor_numel (out);
  if (n == 0)
    return TRUE;
  TView v = tview (x);
  k_avg_pool<<<dcu_blocks (c, n), 256, 0, c->stream>>> (dcu_ptr (out), out->dtype, v, out->shape[2], out->shape[3], k,
                                                        stride, 1.0f / (float) (k * k), n);
  return dcu_check_launch (error, "avg_pool2d");
}

/* ---- timestep embedding (diffusers get_timestep_embedding, f32 out) ---------------- */

__global__ void
k_timestep (float *o, TView t, int64_t N, int64_t dim, int flip, float shift, float scale, float neg_log)
{
  const int64_t half = dim / 2;
  for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < N * dim;
       i += (int64_t) gridDim.x * blockDim.x) {
    int64_t n = i / dim, j = i - n * dim;
    float v;
    if (j >= 2 * half) {
      v = 0.0f;   /* odd dim: zero pad */
    } else {
      bool second = j >= half;
      int64_t f = second ? j - half : j;
      float e = neg_log * (float) f;
      e = e / ((float) half - shift);
      float a = tv_ld (t, n) * expf (e);
      a = scale * a;
      /* first half sin, second cos; flipped: cos first */
      bool use_cos = flip ? !second : second;
      v = use_cos ? cosf (a) : sinf (a);
    }
    o[i] = v;
  }
}

gboolean
dcu_timestep_embedding (DiffuseTensor *out, DiffuseTensor *t, gboolean flip, float shift, float scale,
                        float max_period, GError **error)
{
  CudaCtx *c = dcu_ctx_of (out);
  if (!dcu_enter (c, error))
    return FALSE;
  DCU_PROF (c, "timestep_embedding");
  const int64_t N = out->shape[0], dim = out->shape[1];
  if (N * dim == 0)
    return TRUE;
  const float neg_log = (float) -log ((double) max_period);
  TView v = tview (t);
  k_timestep<<<dcu_blocks (c, N * dim), 256, 0, c->stream>>> ((float *) dcu_ptr (out), v, N, dim, flip ? 1 : 0, shift,
                                                              scale, neg_log);
  return dcu_check_launch (error, "timestep_embedding");
}

/* ---- embedding rows ---------------------------------------------------------------- */

__global__ void
k_embedding (char *o, int odt, const char *tab, int tdt, int64_t s0, int64_t s1, const int32_t *ids, int64_t D,
             int64_t n)
{
  for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n * D; i += (int64_t) gridDim.x * blockDim.x) {
    int64_t r = i / D, j = i - r * D;
    stf (o, odt, i, ldf (tab, tdt, (int64_t) ids[r] * s0 + j * s1));
  }
}

gboolean
dcu_embedding (DiffuseTensor *out, DiffuseTensor *table, const int32_t *ids, int64_t n, GError **error)
{
  CudaCtx *c = dcu_ctx_of (out);
  if (!dcu_enter (c, error))
    return FALSE;
  DCU_PROF (c, "embedding");
  const int64_t D = table->shape[1];
  if (n * D == 0)
    return TRUE;
  if (c->capturing) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                 "embedding: host token ids cannot be uploaded inside a CUDA graph capture");
    return FALSE;
  }
  int32_t *dids = (int32_t *) dcu_scratch (c, sizeof (int32_t) * (size_t) n, error);
  if (!dids)
    return FALSE;
  if (!dcu_upload (c, dids, ids, sizeof (int32_t) * (size_t) n, error)) {
    dcu_scratch_free (c, dids);
    return FALSE;
  }
  k_embedding<<<dcu_blocks (c, n * D), 256, 0, c->stream>>> (dcu_ptr (out), out->dtype, dcu_ptr (table), table->dtype,
                                                             table->stride[0], table->stride[1], dids, D, n);
  gboolean ok = dcu_check_launch (error, "embedding");
  dcu_scratch_free (c, dids);
  return ok;
}
