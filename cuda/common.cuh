/* gst-diffuse — CUDA backend: shared declarations for every .cu file.
 *
 * One CudaCtx per opened device ("cuda:N"): one stream (every op of the
 * device is queued on it, so the stream order is the only ordering any
 * buffer needs), one cuBLAS handle bound to it with a fixed workspace (so
 * GEMMs can be captured in a CUDA graph), the caching pool of memory.cu and
 * the pinned staging buffers used by uploads.
 *
 * Kernels read inputs through TView (pointer, dtype, shape, strides in
 * elements) so strided and broadcast (stride 0) inputs need no copy; outputs
 * are contiguous, as the backend interface promises.  f16/bf16 values are
 * widened to f32 on load and rounded to nearest even on store: every kernel
 * computes in f32. */
#pragma once

#include <glib.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include <stdint.h>

extern "C" {
#include "tensor-private.h"
#include "diffuse-cuda.h"
}

#define DCU_MAX_DIMS DIFFUSE_MAX_DIMS

/* ---- device context -------------------------------------------------- */

struct CudaPool;

struct CudaCtx {
  int index;
  DiffuseDevice *dev;
  cudaStream_t stream;
  cublasHandle_t blas;
  GMutex blas_lock;            /* one host thread at a time in the handle */
  void *blas_ws;               /* cuBLAS workspace (fixed: graph capture) */
  size_t blas_ws_size;
  int sm_count;
  size_t smem_optin;           /* max dynamic shared memory per block */
  char name[256];
  CudaPool *pool;
  /* pinned staging for uploads (two buffers, double-buffered) */
  GMutex stage_lock;
  void *stage[2];
  cudaEvent_t stage_ev[2];
  size_t stage_size;
  int stage_next;
  gboolean stage_failed;       /* no pinned memory: plain synchronous copies */
  /* graph capture */
  gboolean capturing;
  guint capture_id;            /* private pool id of the graph being captured */
};

static inline CudaCtx *
dcu_ctx (DiffuseDevice *dev)
{
  return (CudaCtx *) diffuse_device_backend_data (dev);
}

static inline CudaCtx *
dcu_ctx_of (const DiffuseTensor *t)
{
  return dcu_ctx (t->storage->dev);
}

static inline char *
dcu_ptr (const DiffuseTensor *t)
{
  return (char *) t->storage->data + t->offset;
}

/* ---- errors ------------------------------------------------------------ */

/* Sets *error from a CUDA status (OUT_OF_MEMORY for cudaErrorMemoryAllocation,
 * DEVICE otherwise) and returns FALSE. */
gboolean dcu_fail (GError **error, cudaError_t e, const char *what);
gboolean dcu_fail_blas (GError **error, cublasStatus_t s, const char *what);
/* After a kernel launch: a launch error becomes a GError. */
gboolean dcu_check_launch (GError **error, const char *what);
/* cudaSetDevice for the calling thread (cheap when already current). */
gboolean dcu_enter (CudaCtx *c, GError **error);

#define DCU_TRY(call, what)                         \
  G_STMT_START {                                    \
    cudaError_t e_ = (call);                        \
    if (e_ != cudaSuccess)                          \
      return dcu_fail (error, e_, (what));          \
  } G_STMT_END

/* ---- per-op profile (DIFFUSE_CUDA_PROFILE=1, memory.cu) ------------------
 * Each op synchronises the stream before and after itself and adds the
 * wall time to a table by op name, printed to stderr at exit: a breakdown
 * of where a UNet step goes (slower than a normal run: no overlap of host
 * and device).  An op called inside another (a cast inside conv2d) counts
 * in the outer one.  Off while a graph is being captured. */
extern int dcu_profile_on;
void dcu_profile_add (const char *op, double ms);

extern __thread int dcu_profile_depth;   /* only the outermost op of a nest is counted */

struct DcuProf {
  CudaCtx *c;
  const char *op;
  gint64 t0;
  DcuProf (CudaCtx *ctx, const char *name) : c (ctx), op (name), t0 (0)
  {
    if (dcu_profile_depth++ == 0 && dcu_profile_on && !c->capturing) {
      cudaStreamSynchronize (c->stream);
      t0 = g_get_monotonic_time ();
    }
  }
  ~DcuProf ()
  {
    if (--dcu_profile_depth == 0 && t0) {
      cudaStreamSynchronize (c->stream);
      dcu_profile_add (op, (g_get_monotonic_time () - t0) / 1000.0);
    }
  }
};
#define DCU_PROF(c, name) DcuProf dcu_prof_ (c, name)

/* ---- memory (memory.cu) ------------------------------------------------ */

gboolean dcu_pool_init (CudaCtx *c, GError **error);
void dcu_pool_destroy (CudaCtx *c);
void *dcu_pool_alloc (CudaCtx *c, size_t nbytes, GError **error);
void dcu_pool_free (CudaCtx *c, void *p);

/* host -> device through the pinned staging buffers (backend.cu): returns
 * once src may be reused; the copy itself is queued on the stream. */
gboolean dcu_upload (CudaCtx *c, void *dst, const void *src, size_t nbytes, GError **error);

/* A scratch buffer from the pool, freed (returned to the pool) with dcu_scratch_free.
 * Stream order makes reuse by the next op safe. */
static inline void *
dcu_scratch (CudaCtx *c, size_t nbytes, GError **error)
{
  return dcu_pool_alloc (c, nbytes ? nbytes : 1, error);
}

static inline void
dcu_scratch_free (CudaCtx *c, void *p)
{
  if (p)
    dcu_pool_free (c, p);
}

/* A device tensor made contiguous (and cast to dt when dt >= 0): a new ref of
 * t when it already is; NULL + *error on failure. */
DiffuseTensor *dcu_contig (DiffuseTensor *t, int dt, GError **error);

/* ---- strided views --------------------------------------------------- */

struct TView {
  const char *p;
  int dt;
  int nd;
  int64_t shape[DCU_MAX_DIMS];
  int64_t stride[DCU_MAX_DIMS];
};

static inline TView
tview (const DiffuseTensor *t)
{
  TView v;
  v.p = dcu_ptr (t);
  v.dt = (int) t->dtype;
  v.nd = t->ndim;
  for (int i = 0; i < DCU_MAX_DIMS; i++) {
    v.shape[i] = i < t->ndim ? t->shape[i] : 1;
    v.stride[i] = i < t->ndim ? t->stride[i] : 0;
  }
  return v;
}

/* For element-wise kernels (row-major index -> element): a contiguous
 * tensor as one flat dim, so the offset costs one division, not ndim. */
static inline TView
tview_flat (const DiffuseTensor *t)
{
  TView v = tview (t);
  if (t->ndim > 1 && diffuse_tensor_is_contiguous (t)) {
    v.nd = 1;
    v.shape[0] = diffuse_tensor_numel (t);
    v.stride[0] = 1;
  }
  return v;
}

/* Element offset of row-major linear index i. */
__device__ __forceinline__ int64_t
tv_off (const TView &v, int64_t i)
{
  int64_t off = 0;
  for (int d = v.nd - 1; d >= 0; d--) {
    int64_t s = v.shape[d];
    int64_t q = i / s;
    off += (i - q * s) * v.stride[d];
    i = q;
  }
  return off;
}

__device__ __forceinline__ float
ldf (const char *p, int dt, int64_t i)
{
  if (dt == DIFFUSE_DTYPE_F32)
    return ((const float *) p)[i];
  if (dt == DIFFUSE_DTYPE_F16)
    return __half2float (((const __half *) p)[i]);
  return __bfloat162float (((const __nv_bfloat16 *) p)[i]);
}

__device__ __forceinline__ void
stf (char *p, int dt, int64_t i, float v)
{
  if (dt == DIFFUSE_DTYPE_F32)
    ((float *) p)[i] = v;
  else if (dt == DIFFUSE_DTYPE_F16)
    ((__half *) p)[i] = __float2half_rn (v);
  else
    ((__nv_bfloat16 *) p)[i] = __float2bfloat16_rn (v);
}

__device__ __forceinline__ float
tv_ld (const TView &v, int64_t i)
{
  return ldf (v.p, v.dt, tv_off (v, i));
}

/* f32 -> a 16-bit tensor-core type, rounded to nearest even */
template <typename T>
__host__ __device__ __forceinline__ T from_f (float v);
template <>
__host__ __device__ __forceinline__ __half
from_f<__half> (float v)
{
  return __float2half_rn (v);
}
template <>
__host__ __device__ __forceinline__ __nv_bfloat16
from_f<__nv_bfloat16> (float v)
{
  return __float2bfloat16_rn (v);
}

/* Grid size for a grid-stride loop over n items with 256-thread blocks. */
static inline unsigned
dcu_blocks (const CudaCtx *c, int64_t n, int threads = 256)
{
  int64_t b = (n + threads - 1) / threads;
  int64_t cap = (int64_t) MAX (c->sm_count, 1) * 32;
  if (b > cap)
    b = cap;
  return (unsigned) MAX (b, (int64_t) 1);
}

/* ---- ops, one family per file ---------------------------------------- */

/* elementwise.cu */
gboolean dcu_copy (DiffuseTensor *dst, DiffuseTensor *src, GError **error);
void dcu_fill_zero (DiffuseTensor *out);
gboolean dcu_binary (DiffuseBinaryOp op, DiffuseTensor *out, DiffuseTensor *a, DiffuseTensor *b, GError **error);
gboolean dcu_scale (DiffuseTensor *out, DiffuseTensor *x, float s, float b, GError **error);
gboolean dcu_axpy (DiffuseTensor *a, float alpha, DiffuseTensor *b, GError **error);
gboolean dcu_activation (DiffuseTensor *out, DiffuseTensor *x, DiffuseActivation act, GError **error);
gboolean dcu_geglu (DiffuseTensor *out, DiffuseTensor *x, GError **error);
/* out[n, c, ...] += bias[c] (contiguous out, any-dtype bias view), c = (i / inner) % C */
gboolean dcu_add_bias (CudaCtx *c, DiffuseTensor *out, DiffuseTensor *bias, int64_t C, int64_t inner, GError **error);

/* gemm.cu */
gboolean dcu_matmul (DiffuseTensor *out, DiffuseTensor *a, DiffuseTensor *b, gboolean trans_a, gboolean trans_b,
                     float alpha, GError **error);
gboolean dcu_linear (DiffuseTensor *out, DiffuseTensor *x, DiffuseTensor *w, DiffuseTensor *b, GError **error);
/* Column-major GEMM on one dtype with f32 accumulation:
 * C = alpha * op(A) op(B) + beta * C, strided-batched (batch = 1: plain). */
gboolean dcu_gemm (CudaCtx *c, int dt, gboolean ta, gboolean tb, int64_t m, int64_t n, int64_t k, float alpha,
                   const void *A, int64_t lda, int64_t sA, const void *B, int64_t ldb, int64_t sB, float beta,
                   void *C, int64_t ldc, int64_t sC, int64_t batch, GError **error);
gboolean dcu_gemm_ex (CudaCtx *c, int dt, int dtc, gboolean ta, gboolean tb, int64_t m, int64_t n, int64_t k,
                      float alpha, const void *A, int64_t lda, int64_t sA, const void *B, int64_t ldb, int64_t sB,
                      float beta, void *C, int64_t ldc, int64_t sC, int64_t batch, GError **error);

/* conv.cu */
gboolean dcu_conv2d (DiffuseTensor *out, DiffuseTensor *x, DiffuseTensor *w, DiffuseTensor *b, int sh, int sw,
                     int ph, int pw, GError **error);

/* norm.cu */
gboolean dcu_group_norm (DiffuseTensor *out, DiffuseTensor *x, int groups, DiffuseTensor *gamma, DiffuseTensor *beta,
                         float eps, DiffuseActivation act, GError **error);
gboolean dcu_layer_norm (DiffuseTensor *out, DiffuseTensor *x, DiffuseTensor *gamma, DiffuseTensor *beta, float eps,
                         GError **error);
gboolean dcu_softmax (DiffuseTensor *out, DiffuseTensor *x, GError **error);

/* attention.cu */
gboolean dcu_sdpa (DiffuseTensor *out, DiffuseTensor *q, DiffuseTensor *k, DiffuseTensor *v, DiffuseTensor *mask,
                   gboolean causal, float scale, GError **error);

/* misc.cu */
gboolean dcu_pad2d (DiffuseTensor *out, DiffuseTensor *x, int left, int top, GError **error);
gboolean dcu_upsample_nearest (DiffuseTensor *out, DiffuseTensor *x, GError **error);
gboolean dcu_avg_pool2d (DiffuseTensor *out, DiffuseTensor *x, int k, int stride, GError **error);
gboolean dcu_timestep_embedding (DiffuseTensor *out, DiffuseTensor *t, gboolean flip, float shift, float scale,
                                 float max_period, GError **error);
gboolean dcu_embedding (DiffuseTensor *out, DiffuseTensor *table, const int32_t *ids, int64_t n, GError **error);

/* activation shared by elementwise.cu and norm.cu (the CPU backend's formulas) */
__device__ __forceinline__ float
dcu_act (int act, float x)
{
  switch (act) {
    case DIFFUSE_ACT_SILU: return x / (1.0f + expf (-x));
    case DIFFUSE_ACT_GELU: return 0.5f * x * (1.0f + erff (x * 0.70710678118654752f));
    case DIFFUSE_ACT_GELU_TANH: {
      const float k = 0.7978845608028654f;
      return 0.5f * x * (1.0f + tanhf (k * (x + 0.044715f * x * x * x)));
    }
    case DIFFUSE_ACT_QUICK_GELU: return x / (1.0f + expf (-1.702f * x));
    case DIFFUSE_ACT_RELU: return x > 0.0f ? x : 0.0f;
    case DIFFUSE_ACT_SIGMOID: return 1.0f / (1.0f + expf (-x));
    default: return x;
  }
}
