/* gst-diffuse — CUDA backend: copies, casts and element-wise ops.
 * Grid-stride loops over the (contiguous) output; inputs read through their
 * strided views; f32 arithmetic, rounded on store. */
#include "common.cuh"

/* ---- copy / cast --------------------------------------------------------- */

__global__ void
k_copy (char *dst, TView d, TView s, int64_t n)
{
  for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n; i += (int64_t) gridDim.x * blockDim.x)
    stf (dst, d.dt, tv_off (d, i), tv_ld (s, i));
}

/* contiguous same-size 16-bit <-> 32-bit casts, the common case */
__global__ void
k_cast_contig (char *dst, int ddt, const char *src, int sdt, int64_t n)
{
  for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n; i += (int64_t) gridDim.x * blockDim.x)
    stf (dst, ddt, i, ldf (src, sdt, i));
}

gboolean
dcu_copy (DiffuseTensor *dst, DiffuseTensor *src, GError **error)
{
  CudaCtx *c = dcu_ctx_of (dst);
  if (!dcu_enter (c, error))
    return FALSE;
  DCU_PROF (c, "copy");
  int64_t n = diffuse_tensor_numel (dst);
  if (n == 0)
    return TRUE;
  gboolean dc = diffuse_tensor_is_contiguous (dst), sc = diffuse_tensor_is_contiguous (src);
  if (dc && sc && dst->dtype == src->dtype) {
    DCU_TRY (cudaMemcpyAsync (dcu_ptr (dst), dcu_ptr (src), diffuse_tensor_nbytes (dst), cudaMemcpyDeviceToDevice,
                              c->stream), "copy");
    return TRUE;
  }
  if (dc && sc) {
    k_cast_contig<<<dcu_blocks (c, n), 256, 0, c->stream>>> (dcu_ptr (dst), dst->dtype, dcu_ptr (src), src->dtype, n);
    return dcu_check_launch (error, "cast");
  }
  TView d = tview_flat (dst), s = tview_flat (src);
  k_copy<<<dcu_blocks (c, n), 256, 0, c->stream>>> (dcu_ptr (dst), d, s, n);
  return dcu_check_launch (error, "copy");
}

void
dcu_fill_zero (DiffuseTensor *out)
{
  CudaCtx *c = dcu_ctx_of (out);
  GError *err = NULL;
  if (!dcu_enter (c, &err)) {
    g_warning ("fill_zero: %s", err->message);
    g_error_free (err);
    return;
  }
  /* freshly allocated tensors only (contiguous) */
  cudaError_t e = cudaMemsetAsync (dcu_ptr (out), 0, diffuse_tensor_nbytes (out), c->stream);
  if (e != cudaSuccess)
    g_warning ("fill_zero on %s: %s", diffuse_device_name (c->dev), cudaGetErrorString (e));
}

/* ---- binary ------------------------------------------------------------- */

template <int OP>
__device__ __forceinline__ float
bin (float x, float y)
{
  if (OP == DIFFUSE_BINARY_ADD) return x + y;
  if (OP == DIFFUSE_BINARY_SUB) return x - y;
  if (OP == DIFFUSE_BINARY_MUL) return x * y;
  return x / y;
}

template <int OP>
__global__ void
k_binary (char *o, int odt, TView a, TView b, int64_t n)
{
  for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n; i += (int64_t) gridDim.x * blockDim.x)
    stf (o, odt, i, bin<OP> (tv_ld (a, i), tv_ld (b, i)));
}

/* both inputs contiguous with out's shape */
template <int OP>
__global__ void
k_binary_contig (char *o, int odt, const char *a, int adt, const char *b, int bdt, int64_t n)
{
  for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n; i += (int64_t) gridDim.x * blockDim.x)
    stf (o, odt, i, bin<OP> (ldf (a, adt, i), ldf (b, bdt, i)));
}

template <int OP>
static void
launch_binary (CudaCtx *c, DiffuseTensor *out, DiffuseTensor *a, DiffuseTensor *b, int64_t n)
{
  unsigned g = dcu_blocks (c, n);
  if (diffuse_tensor_is_contiguous (a) && diffuse_tensor_is_contiguous (b))
    k_binary_contig<OP><<<g, 256, 0, c->stream>>> (dcu_ptr (out), out->dtype, dcu_ptr (a), a->dtype, dcu_ptr (b),
                                                    b->dtype, n);
  else {
    TView va = tview_flat (a), vb = tview_flat (b);
    k_binary<OP><<<g, 256, 0, c->stream>>> (dcu_ptr (out), out->dtype, va, vb, n);
  }
}

gboolean
dcu_binary (DiffuseBinaryOp op, DiffuseTensor *out, DiffuseTensor *a, DiffuseTensor *b, GError **error)
{
  CudaCtx *c = dcu_ctx_of (out);
  if (!dcu_enter (c, error))
    return FALSE;
  DCU_PROF (c, "binary");
  int64_t n = diffuse_tensor_numel (out);
  if (n == 0)
    return TRUE;
  switch (op) {
    case DIFFUSE_BINARY_ADD: launch_binary<DIFFUSE_BINARY_ADD> (c, out, a, b, n); break;
    case DIFFUSE_BINARY_SUB: launch_binary<DIFFUSE_BINARY_SUB> (c, out, a, b, n); break;
    case DIFFUSE_BINARY_MUL: launch_binary<DIFFUSE_BINARY_MUL> (c, out, a, b, n); break;
    default: launch_binary<DIFFUSE_BINARY_DIV> (c, out, a, b, n); break;
  }
  return dcu_check_launch (error, "binary op");
}

/* ---- unary ---------------------------------------------------------------- */

__global__ void
k_scale (char *o, int odt, TView x, float s, float b, int64_t n)
{
  for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n; i += (int64_t) gridDim.x * blockDim.x)
    stf (o, odt, i, tv_ld (x, i) * s + b);
}

gboolean
dcu_scale (DiffuseTensor *out, DiffuseTensor *x, float s, float b, GError **error)
{
  CudaCtx *c = dcu_ctx_of (out);
  if (!dcu_enter (c, error))
    return FALSE;
  DCU_PROF (c, "scale");
  int64_t n = diffuse_tensor_numel (out);
  if (n == 0)
    return TRUE;
  TView v = tview_flat (x);
  k_scale<<<dcu_blocks (c, n), 256, 0, c->stream>>> (dcu_ptr (out), out->dtype, v, s, b, n);
  return dcu_check_launch (error, "scale");
}

__global__ void
k_axpy (char *a, int adt, float alpha, TView b, int64_t n)
{
  for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n; i += (int64_t) gridDim.x * blockDim.x)
    stf (a, adt, i, ldf (a, adt, i) + alpha * tv_ld (b, i));
}

gboolean
dcu_axpy (DiffuseTensor *a, float alpha, DiffuseTensor *b, GError **error)
{
  CudaCtx *c = dcu_ctx_of (a);
  if (!dcu_enter (c, error))
    return FALSE;
  DCU_PROF (c, "axpy");
  int64_t n = diffuse_tensor_numel (a);
  if (n == 0)
    return TRUE;
  TView v = tview_flat (b);
  k_axpy<<<dcu_blocks (c, n), 256, 0, c->stream>>> (dcu_ptr (a), a->dtype, alpha, v, n);
  return dcu_check_launch (error, "axpy");
}

__global__ void
k_activation (char *o, int odt, TView x, int act, int64_t n)
{
  for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n; i += (int64_t) gridDim.x * blockDim.x)
    stf (o, odt, i, dcu_act (act, tv_ld (x, i)));
}

gboolean
dcu_activation (DiffuseTensor *out, DiffuseTensor *x, DiffuseActivation act, GError **error)
{
  CudaCtx *c = dcu_ctx_of (out);
  if (!dcu_enter (c, error))
    return FALSE;
  DCU_PROF (c, "activation");
  int64_t n = diffuse_tensor_numel (out);
  if (n == 0)
    return TRUE;
  TView v = tview_flat (x);
  k_activation<<<dcu_blocks (c, n), 256, 0, c->stream>>> (dcu_ptr (out), out->dtype, v, (int) act, n);
  return dcu_check_launch (error, "activation");
}

/* GEGLU: out[r, j] = x[r, j] * gelu(x[r, j + half]); x's rows addressed
 * through its view (all dims but the last), columns by its last stride. */
__global__ void
k_geglu (char *o, int odt, TView x, int64_t half, int64_t n)
{
  const int nd = x.nd;
  const int64_t ls = x.stride[nd - 1];
  for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n; i += (int64_t) gridDim.x * blockDim.x) {
    int64_t r = i / half, j = i - r * half;
    int64_t off = 0;
    for (int d = nd - 2; d >= 0; d--) {
      int64_t q = r / x.shape[d];
      off += (r - q * x.shape[d]) * x.stride[d];
      r = q;
    }
    float h = ldf (x.p, x.dt, off + j * ls);
    float g = ldf (x.p, x.dt, off + (j + half) * ls);
    stf (o, odt, i, h * dcu_act (DIFFUSE_ACT_GELU, g));
  }
}

gboolean
dcu_geglu (DiffuseTensor *out, DiffuseTensor *x, GError **error)
{
  CudaCtx *c = dcu_ctx_of (out);
  if (!dcu_enter (c, error))
    return FALSE;
  DCU_PROF (c, "geglu");
  int64_t n = diffuse_tensor_numel (out);
  if (n == 0)
    return TRUE;
  int64_t half = out->shape[out->ndim - 1];
  TView v = tview (x);
  k_geglu<<<dcu_blocks (c, n), 256, 0, c->stream>>> (dcu_ptr (out), out->dtype, v, half, n);
  return dcu_check_launch (error, "geglu");
}

/* ---- bias (GEMM/conv epilogue) ------------------------------------------- */

__global__ void
k_add_bias (char *o, int odt, const char *b, int bdt, int64_t bstride, int64_t C, int64_t inner, int64_t n)
{
  for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n; i += (int64_t) gridDim.x * blockDim.x) {
    int64_t ch = (i / inner) % C;
    stf (o, odt, i, ldf (o, odt, i) + ldf (b, bdt, ch * bstride));
  }
}

gboolean
dcu_add_bias (CudaCtx *c, DiffuseTensor *out, DiffuseTensor *bias, int64_t C, int64_t inner, GError **error)
{
  int64_t n = diffuse_tensor_numel (out);
  if (n == 0)
    return TRUE;
  /* bias has numel C; a 1-D view (the interface's [N]) uses its stride */
  int64_t bs = bias->ndim >= 1 ? bias->stride[bias->ndim - 1] : 1;
  if (bias->ndim > 1 && !diffuse_tensor_is_contiguous (bias)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "bias must be 1-D or contiguous");
    return FALSE;
  }
  if (bias->ndim > 1)
    bs = 1;
  k_add_bias<<<dcu_blocks (c, n), 256, 0, c->stream>>> (dcu_ptr (out), out->dtype, dcu_ptr (bias), bias->dtype, bs,
                                                         C, inner, n);
  return dcu_check_launch (error, "bias");
}
