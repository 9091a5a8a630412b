/* gst-diffuse — the CPU backend: OpenBLAS sgemm for GEMM and convolution,
 * OpenMP for the element-wise and reduction loops.  Computation is in f32;
 * f16/bf16 tensors are converted on the way in and out. */
#include "tensor-private.h"
#include "cpu_simd.h"
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* OpenBLAS extension */
extern void openblas_set_num_threads (int num_threads);

static int cpu_threads;

/* Multiply-adds below which an op runs on the calling thread alone: entering a
 * parallel region costs a few microseconds, and far more when another process
 * holds the other cores (a helper thread waits for a time slice at every
 * barrier: the bundled 64x64 model took 30x longer with 2 threads than with
 * one on a 2-core machine running two other jobs). */
#define SMALL_WORK ((int64_t) 1 << 20)
/* Elements below which element-wise and normalisation loops stay serial. */
#define PAR_ELEMS ((int64_t) 1 << 18)
/* GEMMs below this many multiply-adds run with one OpenBLAS thread (OpenBLAS's
 * own cut-off, 2^18, is tuned for an idle machine). */
#define GEMM_SMALL ((int64_t) 1 << 23)

/* Around a BLAS call outside our parallel regions: small ones on this thread
 * alone.  Returns the thread count to restore (0: nothing changed). */
static inline int
blas_small_begin (int64_t macs)
{
#ifdef _OPENMP
  if (macs < GEMM_SMALL && !omp_in_parallel ()) {
    int n = omp_get_max_threads ();
    if (n > 1) {
      openblas_set_num_threads (1);
      return n;
    }
  }
#else
  (void) macs;
#endif
  return 0;
}

static inline void
blas_small_end (int n)
{
  if (n > 0)
    openblas_set_num_threads (n);
}

void
diffuse_cpu_set_threads (int n)
{
  cpu_threads = n;
#ifdef _OPENMP
  int eff = n > 0 ? n : omp_get_num_procs ();
  omp_set_num_threads (eff);
  openblas_set_num_threads (eff);
#else
  (void) n;
#endif
}

int
diffuse_cpu_get_threads (void)
{
#ifdef _OPENMP
  return cpu_threads > 0 ? cpu_threads : omp_get_max_threads ();
#else
  return 1;
#endif
}

static int
nthreads (void)
{
  return diffuse_cpu_get_threads ();
}

/* ---- memory -------------------------------------------------------------- */

static gpointer
cpu_alloc (DiffuseDevice *dev, size_t nbytes, GError **error)
{
  void *p = NULL;
  size_t n = (nbytes + 63) & ~(size_t) 63;
  if (posix_memalign (&p, 64, n) != 0 || !p) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_OUT_OF_MEMORY,
                 "Out of host memory allocating %" G_GSIZE_FORMAT " bytes", nbytes);
    return NULL;
  }
  return p;
}

static void
cpu_free (DiffuseDevice *dev, gpointer p)
{
  free (p);
}

static gboolean
cpu_upload (DiffuseDevice *dev, gpointer dst, const void *src, size_t n, GError **error)
{
  memcpy (dst, src, n);
  return TRUE;
}

static void
cpu_fill_zero (DiffuseTensor *out)
{
  memset (diffuse_tensor_data (out), 0, diffuse_tensor_nbytes (out));
}

/* ---- element access helpers -------------------------------------------- */

static inline float
ld (const void *base, DiffuseDType dt, int64_t i)
{
  switch (dt) {
    case DIFFUSE_DTYPE_F32: return ((const float *) base)[i];
    case DIFFUSE_DTYPE_F16: return diffuse_f16_to_f32 (((const uint16_t *) base)[i]);
    default: return diffuse_bf16_to_f32 (((const uint16_t *) base)[i]);
  }
}

static inline void
st (void *base, DiffuseDType dt, int64_t i, float v)
{
  switch (dt) {
    case DIFFUSE_DTYPE_F32: ((float *) base)[i] = v; break;
    case DIFFUSE_DTYPE_F16: ((uint16_t *) base)[i] = diffuse_f32_to_f16 (v); break;
    default: ((uint16_t *) base)[i] = diffuse_f32_to_bf16 (v); break;
  }
}

static inline char *
base_ptr (const DiffuseTensor *t)
{
  return (char *) t->storage->data + t->offset;
}

/* Offset (in elements) of the start of "row" r, where rows enumerate all
 * dims but the last in row-major order. */
static inline int64_t
row_off (const DiffuseTensor *t, int64_t r)
{
  int64_t off = 0;
  for (int d = t->ndim - 2; d >= 0; d--) {
    int64_t i = r % t->shape[d];
    r /= t->shape[d];
    off += i * t->stride[d];
  }
  return off;
}

static inline int64_t
n_rows (const DiffuseTensor *t)
{
  int64_t n = 1;
  for (int d = 0; d < t->ndim - 1; d++)
    n *= t->shape[d];
  return n;
}

static inline int64_t
last_dim (const DiffuseTensor *t)
{
  return t->ndim ? t->shape[t->ndim - 1] : 1;
}

static inline int64_t
last_stride (const DiffuseTensor *t)
{
  return t->ndim ? t->stride[t->ndim - 1] : 1;
}

/* A contiguous f32 version of t (a new ref of t when it already is one). */
static DiffuseTensor *
f32c (DiffuseTensor *t)
{
  if (t->dtype == DIFFUSE_DTYPE_F32 && diffuse_tensor_is_contiguous (t))
    return diffuse_tensor_ref (t);
  DiffuseTensor *c = diffuse_tensor_new (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, t->ndim, t->shape);
  if (!c)
    return NULL;
  int64_t rows = n_rows (t), cols = last_dim (t), ls = last_stride (t);
  const char *src = base_ptr (t);
  float *dst = diffuse_tensor_f32 (c);
#pragma omp parallel for if (rows * cols > PAR_ELEMS) schedule (static)
  for (int64_t r = 0; r < rows; r++) {
    int64_t o = row_off (t, r);
    float *d = dst + r * cols;
    if (ls == 1 && t->dtype == DIFFUSE_DTYPE_F32)
      memcpy (d, (const float *) src + o, cols * sizeof (float));
    else if (ls == 1)
      diffuse_convert_row (d, DIFFUSE_DTYPE_F32, src + o * 2, t->dtype, cols);
    else
      for (int64_t j = 0; j < cols; j++)
        d[j] = ld (src, t->dtype, o + j * ls);
  }
  return c;
}

/* Output buffer: the tensor itself when f32, else a scratch to convert at the end. */
static float *
out_begin (DiffuseTensor *out)
{
  if (out->dtype == DIFFUSE_DTYPE_F32)
    return (float *) base_ptr (out);
  return g_try_malloc (sizeof (float) * (size_t) diffuse_tensor_numel (out));
}

static void
out_end (DiffuseTensor *out, float *buf)
{
  if (out->dtype == DIFFUSE_DTYPE_F32)
    return;
  diffuse_convert_row (base_ptr (out), out->dtype, buf, DIFFUSE_DTYPE_F32, (size_t) diffuse_tensor_numel (out));
  g_free (buf);
}

static gboolean
oom (GError **error, const char *what)
{
  g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_OUT_OF_MEMORY, "Out of host memory in %s", what);
  return FALSE;
}

#define PREP(var, t, what)                                   \
  DiffuseTensor *var = f32c (t);                             \
  if (!var) return oom (error, what)

/* ---- copy ------------------------------------------------------------------ */

static gboolean
cpu_copy (DiffuseTensor *dst, DiffuseTensor *src, GError **error)
{
  int64_t rows = n_rows (dst), cols = last_dim (dst);
  int64_t ls = last_stride (src), ld_ = last_stride (dst);
  const char *s = base_ptr (src);
  char *d = base_ptr (dst);
  size_t es = diffuse_dtype_size (src->dtype), ed = diffuse_dtype_size (dst->dtype);
  if (dst->ndim == 0) {
    st (d, dst->dtype, 0, ld (s, src->dtype, 0));
    return TRUE;
  }
#pragma omp parallel for if (rows * cols > PAR_ELEMS) schedule (static)
  for (int64_t r = 0; r < rows; r++) {
    int64_t os = row_off (src, r), od = row_off (dst, r);
    if (ls == 1 && ld_ == 1)
      diffuse_convert_row (d + od * ed, dst->dtype, s + os * es, src->dtype, cols);
    else
      for (int64_t j = 0; j < cols; j++)
        st (d, dst->dtype, od + j * ld_, ld (s, src->dtype, os + j * ls));
  }
  return TRUE;
}

/* ---- element-wise ---------------------------------------------------------- */

static gboolean
cpu_binary (DiffuseBinaryOp op, DiffuseTensor *out, DiffuseTensor *a, DiffuseTensor *b, GError **error)
{
  int64_t rows = n_rows (out), cols = last_dim (out);
  int64_t sa = last_stride (a), sb = last_stride (b);
  const char *pa = base_ptr (a), *pb = base_ptr (b);
  float *o = out_begin (out);
  if (!o)
    return oom (error, "binary op");
  gboolean fast = a->dtype == DIFFUSE_DTYPE_F32 && b->dtype == DIFFUSE_DTYPE_F32;
  if (out->ndim == 0) {
    rows = 1;
    cols = 1;
  }
#pragma omp parallel for if (rows * cols > PAR_ELEMS) schedule (static)
  for (int64_t r = 0; r < rows; r++) {
    int64_t oa = out->ndim ? row_off (a, r) : 0, ob = out->ndim ? row_off (b, r) : 0;
    float *orow = o + r * cols;
    if (fast) {
      const float *ra = (const float *) pa + oa, *rb = (const float *) pb + ob;
      switch (op) {
        case DIFFUSE_BINARY_ADD:
          if (sa == 1 && sb == 1) for (int64_t j = 0; j < cols; j++) orow[j] = ra[j] + rb[j];
          else if (sa == 1 && sb == 0) { float v = rb[0]; for (int64_t j = 0; j < cols; j++) orow[j] = ra[j] + v; }
          else for (int64_t j = 0; j < cols; j++) orow[j] = ra[j * sa] + rb[j * sb];
          break;
        case DIFFUSE_BINARY_SUB:
          for (int64_t j = 0; j < cols; j++) orow[j] = ra[j * sa] - rb[j * sb];
          break;
        case DIFFUSE_BINARY_MUL:
          if (sa == 1 && sb == 1) for (int64_t j = 0; j < cols; j++) orow[j] = ra[j] * rb[j];
          else for (int64_t j = 0; j < cols; j++) orow[j] = ra[j * sa] * rb[j * sb];
          break;
        case DIFFUSE_BINARY_DIV:
          for (int64_t j = 0; j < cols; j++) orow[j] = ra[j * sa] / rb[j * sb];
          break;
      }
    } else {
      for (int64_t j = 0; j < cols; j++) {
        float x = ld (pa, a->dtype, oa + j * sa), y = ld (pb, b->dtype, ob + j * sb), v;
        switch (op) {
          case DIFFUSE_BINARY_ADD: v = x + y; break;
          case DIFFUSE_BINARY_SUB: v = x - y; break;
          case DIFFUSE_BINARY_MUL: v = x * y; break;
          default: v = x / y; break;
        }
        orow[j] = v;
      }
    }
  }
  out_end (out, o);
  return TRUE;
}

static gboolean
cpu_scale (DiffuseTensor *out, DiffuseTensor *x, float s, float b, GError **error)
{
  PREP (xc, x, "scale");
  float *o = out_begin (out);
  if (!o) {
    diffuse_tensor_unref (xc);
    return oom (error, "scale");
  }
  const float *p = diffuse_tensor_f32 (xc);
  int64_t n = diffuse_tensor_numel (x);
#pragma omp parallel for if (n > PAR_ELEMS) schedule (static)
  for (int64_t i = 0; i < n; i++)
    o[i] = p[i] * s + b;
  out_end (out, o);
  diffuse_tensor_unref (xc);
  return TRUE;
}

static gboolean
cpu_axpy (DiffuseTensor *a, float alpha, DiffuseTensor *b, GError **error)
{
  PREP (bc, b, "axpy");
  int64_t n = diffuse_tensor_numel (a);
  const float *pb = diffuse_tensor_f32 (bc);
  if (a->dtype == DIFFUSE_DTYPE_F32) {
    float *pa = (float *) base_ptr (a);
#pragma omp parallel for if (n > PAR_ELEMS) schedule (static)
    for (int64_t i = 0; i < n; i++)
      pa[i] += alpha * pb[i];
  } else {
    char *pa = base_ptr (a);
    for (int64_t i = 0; i < n; i++)
      st (pa, a->dtype, i, ld (pa, a->dtype, i) + alpha * pb[i]);
  }
  diffuse_tensor_unref (bc);
  return TRUE;
}

static inline float
act_apply (DiffuseActivation act, float x)
{
  switch (act) {
    case DIFFUSE_ACT_SILU: return x / (1.0f + expf (-x));
    case DIFFUSE_ACT_GELU: return 0.5f * x * (1.0f + erff (x * (float) M_SQRT1_2));
    case DIFFUSE_ACT_GELU_TANH: {
      const float k = 0.7978845608028654f; /* sqrt(2/pi) */
      return 0.5f * x * (1.0f + tanhf (k * (x + 0.044715f * x * x * x)));
    }
    case DIFFUSE_ACT_QUICK_GELU: return x / (1.0f + expf (-1.702f * x));
    case DIFFUSE_ACT_RELU: return x > 0.0f ? x : 0.0f;
    case DIFFUSE_ACT_SIGMOID: return 1.0f / (1.0f + expf (-x));
    default: return x;
  }
}

static gboolean
cpu_activation (DiffuseTensor *out, DiffuseTensor *x, DiffuseActivation act, GError **error)
{
  PREP (xc, x, "activation");
  float *o = out_begin (out);
  if (!o) {
    diffuse_tensor_unref (xc);
    return oom (error, "activation");
  }
  const float *p = diffuse_tensor_f32 (xc);
  int64_t n = diffuse_tensor_numel (x);
  if (act == DIFFUSE_ACT_SILU || act == DIFFUSE_ACT_QUICK_GELU || act == DIFFUSE_ACT_SIGMOID ||
      act == DIFFUSE_ACT_GELU) {
    const int64_t blk = 16384, nb = (n + blk - 1) / blk;
#pragma omp parallel for if (n > PAR_ELEMS) schedule (static)
    for (int64_t bi = 0; bi < nb; bi++) {
      const int64_t i0 = bi * blk, m = MIN (blk, n - i0);
      if (act == DIFFUSE_ACT_SIGMOID)
        dk_sigmoid (o + i0, p + i0, m);
      else if (act == DIFFUSE_ACT_GELU)
        dk_gelu (o + i0, p + i0, m);
      else
        dk_silu (o + i0, p + i0, m, act == DIFFUSE_ACT_SILU ? 1.0f : 1.702f);
    }
  } else {
#pragma omp parallel for if (n > PAR_ELEMS) schedule (static)
    for (int64_t i = 0; i < n; i++)
      o[i] = act_apply (act, p[i]);
  }
  out_end (out, o);
  diffuse_tensor_unref (xc);
  return TRUE;
}

static gboolean
cpu_geglu (DiffuseTensor *out, DiffuseTensor *x, GError **error)
{
  PREP (xc, x, "geglu");
  float *o = out_begin (out);
  if (!o) {
    diffuse_tensor_unref (xc);
    return oom (error, "geglu");
  }
  int64_t rows = n_rows (out), n = last_dim (out);
  const float *p = diffuse_tensor_f32 (xc);
#pragma omp parallel for if (rows * n > PAR_ELEMS) schedule (static)
  for (int64_t r = 0; r < rows; r++) {
    const float *h = p + r * 2 * n, *g = h + n;
    float *orow = o + r * n;
    dk_geglu (orow, h, g, n);
  }
  out_end (out, o);
  diffuse_tensor_unref (xc);
  return TRUE;
}

/* ---- GEMM ------------------------------------------------------------------ */

/* Describes a 2-D f32 matrix slice for cblas: row-major with ld, possibly
 * stored transposed. */
typedef struct {
  gboolean trans;   /* stored column-major (i.e. the row-major transpose) */
  int64_t ld;
} MatLayout;

static gboolean
mat_layout (const DiffuseTensor *t, MatLayout *l)
{
  int n = t->ndim;
  int64_t rows = t->shape[n - 2], cols = t->shape[n - 1];
  int64_t rs = t->stride[n - 2], cs = t->stride[n - 1];
  if (cs == 1 || cols == 1) {
    l->trans = FALSE;
    l->ld = MAX (rows == 1 ? cols : rs, MAX (cols, 1));
    if (rows > 1 && rs < cols)
      return FALSE;
    return TRUE;
  }
  if (rs == 1 || rows == 1) {
    l->trans = TRUE;
    l->ld = MAX (cs, MAX (rows, 1));
    if (cols > 1 && cs < rows)
      return FALSE;
    return TRUE;
  }
  return FALSE;
}

static gboolean
cpu_matmul (DiffuseTensor *out, DiffuseTensor *a, DiffuseTensor *b, gboolean trans_a, gboolean trans_b, float alpha,
            GError **error)
{
  /* f32 operands with GEMM-compatible slices; others are converted */
  DiffuseTensor *ac = NULL, *bc = NULL;
  MatLayout la, lb;
  if (a->dtype != DIFFUSE_DTYPE_F32 || !mat_layout (a, &la)) {
    ac = f32c (a);
    if (!ac)
      return oom (error, "matmul");
    /* keep the broadcast batch semantics: f32c made it dense */
    a = ac;
    mat_layout (a, &la);
  }
  if (b->dtype != DIFFUSE_DTYPE_F32 || !mat_layout (b, &lb)) {
    bc = f32c (b);
    if (!bc) {
      diffuse_tensor_clear (&ac);
      return oom (error, "matmul");
    }
    b = bc;
    mat_layout (b, &lb);
  }
  float *o = out_begin (out);
  if (!o) {
    diffuse_tensor_clear (&ac);
    diffuse_tensor_clear (&bc);
    return oom (error, "matmul");
  }
  int nd = out->ndim;
  int64_t M = out->shape[nd - 2], N = out->shape[nd - 1];
  int64_t K = trans_a ? a->shape[nd - 2] : a->shape[nd - 1];
  int64_t nbatch = 1;
  for (int d = 0; d < nd - 2; d++)
    nbatch *= out->shape[d];
  const float *pa = (const float *) base_ptr (a), *pb = (const float *) base_ptr (b);
  CBLAS_TRANSPOSE ta = (trans_a ^ la.trans) ? CblasTrans : CblasNoTrans;
  CBLAS_TRANSPOSE tb = (trans_b ^ lb.trans) ? CblasTrans : CblasNoTrans;
  gboolean par = nbatch >= nthreads () && nbatch > 1 && nbatch * M * N * K >= SMALL_WORK;
  const int rs = par ? 0 : blas_small_begin (M * N * K);
#pragma omp parallel for if (par) schedule (dynamic)
  for (int64_t bi = 0; bi < nbatch; bi++) {
    int64_t oa = 0, ob = 0, r = bi;
    for (int d = nd - 3; d >= 0; d--) {
      int64_t i = r % out->shape[d];
      r /= out->shape[d];
      oa += i * a->stride[d];
      ob += i * b->stride[d];
    }
    cblas_sgemm (CblasRowMajor, ta, tb, (int) M, (int) N, (int) K, alpha, pa + oa, (int) la.ld, pb + ob,
                 (int) lb.ld, 0.0f, o + bi * M * N, (int) N);
  }
  blas_small_end (rs);
  out_end (out, o);
  diffuse_tensor_clear (&ac);
  diffuse_tensor_clear (&bc);
  return TRUE;
}

static gboolean
cpu_linear (DiffuseTensor *out, DiffuseTensor *x, DiffuseTensor *w, DiffuseTensor *b, GError **error)
{
  PREP (xc, x, "linear");
  DiffuseTensor *wc = f32c (w);
  DiffuseTensor *bc = b ? f32c (b) : NULL;
  float *o = out_begin (out);
  if (!wc || (b && !bc) || !o) {
    diffuse_tensor_unref (xc);
    diffuse_tensor_clear (&wc);
    diffuse_tensor_clear (&bc);
    if (o && out->dtype != DIFFUSE_DTYPE_F32)
      g_free (o);
    return oom (error, "linear");
  }
  int64_t M = out->shape[0], N = out->shape[1], K = x->shape[1];
  const float *bias = bc ? diffuse_tensor_f32 (bc) : NULL;
  const float *px = diffuse_tensor_f32 (xc), *pw = diffuse_tensor_f32 (wc);
  const int nt = nthreads ();
  /* many rows: independent row bands, one single-threaded sgemm each (no
   * synchronisation inside OpenBLAS; a preempted thread delays only its
   * band); few rows: one sgemm with OpenBLAS's threads */
  const int64_t band = nt > 1 && M >= 512 * nt ? MAX (256, (M + 4 * nt - 1) / (4 * nt)) : MAX (M, 1);
  const int64_t nband = (M + band - 1) / band;
  const int rs = nband > 1 ? 0 : blas_small_begin (M * N * K);
#pragma omp parallel for if (nband > 1) schedule (dynamic)
  for (int64_t bi = 0; bi < nband; bi++) {
    const int64_t r0 = bi * band, m = MIN (band, M - r0);
    if (bias)   /* start from the bias so sgemm accumulates into it (beta = 1) */
      for (int64_t i = r0; i < r0 + m; i++)
        memcpy (o + i * N, bias, N * sizeof (float));
    if (m > 0 && N > 0)
      cblas_sgemm (CblasRowMajor, CblasNoTrans, CblasTrans, (int) m, (int) N, (int) K, 1.0f, px + r0 * K,
                   (int) MAX (K, 1), pw, (int) MAX (K, 1), bias ? 1.0f : 0.0f, o + r0 * N, (int) N);
  }
  blas_small_end (rs);
  out_end (out, o);
  diffuse_tensor_unref (xc);
  diffuse_tensor_unref (wc);
  diffuse_tensor_clear (&bc);
  return TRUE;
}

/* ---- convolution ----------------------------------------------------------- */

/* im2col of output rows [r0, r0 + nr) of one image into col [K, nr * Wo] (row stride ldcol) */
static void
im2col_rows (float *col, int64_t ldcol, const float *xn, int64_t Cin, int64_t H, int64_t W, int64_t kh, int64_t kw,
             int sh, int sw, int ph, int pw, int64_t Wo, int64_t r0, int64_t nr)
{
  const int64_t cols = ldcol;
  for (int64_t c = 0; c < Cin; c++)
    for (int64_t ky = 0; ky < kh; ky++)
      for (int64_t kx = 0; kx < kw; kx++) {
        float *dst = col + ((c * kh + ky) * kw + kx) * cols;
        for (int64_t oy = 0; oy < nr; oy++) {
          int64_t iy = (r0 + oy) * sh - ph + ky;
          float *d = dst + oy * Wo;
          if (iy < 0 || iy >= H) {
            memset (d, 0, Wo * sizeof (float));
            continue;
          }
          const float *srow = xn + (c * H + iy) * W;
          if (sw == 1) {
            int64_t ox0 = MIN (Wo, MAX (0, pw - kx)), ox1 = MIN (Wo, W + pw - kx);
            for (int64_t ox = 0; ox < ox0; ox++) d[ox] = 0.0f;
            if (ox1 > ox0)
              memcpy (d + ox0, srow + ox0 - pw + kx, (ox1 - ox0) * sizeof (float));
            for (int64_t ox = MAX (ox1, ox0); ox < Wo; ox++) d[ox] = 0.0f;
          } else {
            for (int64_t ox = 0; ox < Wo; ox++) {
              int64_t ix = ox * sw - pw + kx;
              d[ox] = (ix >= 0 && ix < W) ? srow[ix] : 0.0f;
            }
          }
        }
      }
}

/* 3x3, stride 1, padding 1 convolution by Winograd's F(2x2, 3x3): each 2x2
 * block of outputs from a 4x4 input tile with 16 products per input/output
 * channel pair instead of 36 (2.25 times fewer flops).  U = G g G^T is
 * computed once per call ([16][Cout][Cin]); the tiles (all images, row-major)
 * are cut into independent tasks, each transforming its tiles' inputs
 * (V = B^T d B, [16][Cin][tiles]), running 16 single-threaded sgemms
 * M[k] = U[k] V[k] and transforming back (Y = A^T M A) into the output.  The
 * transforms only add, subtract and halve, so the rounding stays close to
 * the direct product's. */
static gboolean
conv3x3_winograd (float *o, const float *px, const float *pwt, const float *bias, int64_t N, int64_t Cin,
                  int64_t H, int64_t W, int64_t Cout, int nt)
{
  const int64_t th = (H + 1) / 2, tw = (W + 1) / 2, tpi = th * tw, ntiles = N * tpi;
  if (ntiles == 0 || Cout == 0)
    return TRUE;
  /* tiles per task: V and M of one task within ~16 MiB */
  int64_t per = MAX (16, (4 * 1024 * 1024) / (16 * (Cin + Cout)));
  int64_t ntask = (ntiles + per - 1) / per;
  if (ntask < 4 * nt && ntiles >= 4 * nt * 64)
    ntask = 4 * nt;
  else if (ntask < nt && ntiles >= nt * 32)
    ntask = nt;
  per = (ntiles + ntask - 1) / ntask;
  ntask = (ntiles + per - 1) / per;
  /* small convolutions on one thread: a parallel region costs more than it
   * saves there, and on a busy machine a preempted helper stalls the op */
  const int nthr = 16 * ntiles * Cin * Cout < SMALL_WORK ? 1 : (int) MIN ((int64_t) nt, ntask);
  float *U = g_try_malloc (sizeof (float) * (size_t) (16 * Cout * Cin));
  float *scratch = g_try_malloc (sizeof (float) * (size_t) (16 * (Cin + Cout) * per) * nthr);
  if (!U || !scratch) {
    g_free (U);
    g_free (scratch);
    return FALSE;
  }
#pragma omp parallel for if (Cout * Cin > PAR_ELEMS) schedule (static)
  for (int64_t co = 0; co < Cout; co++)
    for (int64_t ci = 0; ci < Cin; ci++) {
      const float *g = pwt + (co * Cin + ci) * 9;
      float t[4][3], u[4][4];
      for (int c = 0; c < 3; c++) {
        t[0][c] = g[c];
        t[1][c] = 0.5f * (g[c] + g[3 + c] + g[6 + c]);
        t[2][c] = 0.5f * (g[c] - g[3 + c] + g[6 + c]);
        t[3][c] = g[6 + c];
      }
      for (int r = 0; r < 4; r++) {
        u[r][0] = t[r][0];
        u[r][1] = 0.5f * (t[r][0] + t[r][1] + t[r][2]);
        u[r][2] = 0.5f * (t[r][0] - t[r][1] + t[r][2]);
        u[r][3] = t[r][2];
      }
      for (int k = 0; k < 16; k++)
        U[(k * Cout + co) * Cin + ci] = u[k / 4][k % 4];
    }
#pragma omp parallel for schedule (dynamic) num_threads (nthr)
  for (int64_t task = 0; task < ntask; task++) {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num ();
#endif
    const int64_t t0 = task * per, m = MIN (per, ntiles - t0);
    float *V = scratch + (size_t) tid * 16 * (Cin + Cout) * per;
    float *M = V + 16 * Cin * per;
    /* input transform */
    for (int64_t ci = 0; ci < Cin; ci++)
      for (int64_t j = 0; j < m; j++) {
        const int64_t t = t0 + j, n = t / tpi, ty = (t % tpi) / tw, tx = t % tw;
        const float *xc = px + (n * Cin + ci) * H * W;
        float d[4][4];
        const int64_t y0 = 2 * ty - 1, x0 = 2 * tx - 1;
        if (y0 >= 0 && x0 >= 0 && y0 + 4 <= H && x0 + 4 <= W) {
          for (int r = 0; r < 4; r++)
            for (int c = 0; c < 4; c++)
              d[r][c] = xc[(y0 + r) * W + x0 + c];
        } else {
          for (int r = 0; r < 4; r++)
            for (int c = 0; c < 4; c++) {
              const int64_t iy = y0 + r, ix = x0 + c;
              d[r][c] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? xc[iy * W + ix] : 0.0f;
            }
        }
        float tt[4][4];
        for (int c = 0; c < 4; c++) {
          tt[0][c] = d[0][c] - d[2][c];
          tt[1][c] = d[1][c] + d[2][c];
          tt[2][c] = d[2][c] - d[1][c];
          tt[3][c] = d[1][c] - d[3][c];
        }
        float *vb = V + ci * per + j;
        const int64_t ks = Cin * per;
        for (int r = 0; r < 4; r++) {
          vb[(r * 4 + 0) * ks] = tt[r][0] - tt[r][2];
          vb[(r * 4 + 1) * ks] = tt[r][1] + tt[r][2];
          vb[(r * 4 + 2) * ks] = tt[r][2] - tt[r][1];
          vb[(r * 4 + 3) * ks] = tt[r][1] - tt[r][3];
        }
      }
    for (int k = 0; k < 16; k++)
      cblas_sgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, (int) Cout, (int) m, (int) Cin, 1.0f,
                   U + (size_t) k * Cout * Cin, (int) Cin, V + (size_t) k * Cin * per, (int) per, 0.0f,
                   M + (size_t) k * Cout * per, (int) per);
    /* output transform */
    const int64_t ks = Cout * per;
    for (int64_t co = 0; co < Cout; co++) {
      const float bv = bias ? bias[co] : 0.0f;
      for (int64_t j = 0; j < m; j++) {
        const int64_t t = t0 + j, n = t / tpi, ty = (t % tpi) / tw, tx = t % tw;
        const float *mb = M + co * per + j;
        float mm[16];
        for (int k = 0; k < 16; k++)
          mm[k] = mb[k * ks];
        float sr[2][4];
        for (int c = 0; c < 4; c++) {
          sr[0][c] = mm[c] + mm[4 + c] + mm[8 + c];
          sr[1][c] = mm[4 + c] - mm[8 + c] - mm[12 + c];
        }
        float *oc = o + (n * Cout + co) * H * W;
        const int64_t oy = 2 * ty, ox = 2 * tx;
        for (int r = 0; r < 2; r++) {
          if (oy + r >= H)
            break;
          float y0 = sr[r][0] + sr[r][1] + sr[r][2] + bv;
          float y1 = sr[r][1] - sr[r][2] - sr[r][3] + bv;
          oc[(oy + r) * W + ox] = y0;
          if (ox + 1 < W)
            oc[(oy + r) * W + ox + 1] = y1;
        }
      }
    }
  }
  g_free (U);
  g_free (scratch);
  return TRUE;
}

/* Convolution as GEMM: out[n] [Cout, P] = W [Cout, K] * col [K, P] (+ bias).
 * The work is cut into independent tasks (an image and a band of output rows,
 * or of output pixels for 1x1 convolutions), each run by one thread with a
 * single-threaded sgemm on its own im2col buffer: no barrier between the
 * im2col and the GEMM, no synchronisation inside OpenBLAS, and a thread that
 * the OS preempts delays only its own task (dynamic schedule). */
static gboolean
cpu_conv2d (DiffuseTensor *out, DiffuseTensor *x, DiffuseTensor *w, DiffuseTensor *b, int sh, int sw, int ph,
            int pw, GError **error)
{
  PREP (xc, x, "conv2d");
  DiffuseTensor *wc = f32c (w);
  DiffuseTensor *bc = b ? f32c (b) : NULL;
  float *o = out_begin (out);
  float *col = NULL;
  gboolean ok = FALSE;
  int rs = 0;
  if (!wc || (b && !bc) || !o)
    goto done;

  const int64_t N = x->shape[0], Cin = x->shape[1], H = x->shape[2], W = x->shape[3];
  const int64_t Cout = w->shape[0], kh = w->shape[2], kw = w->shape[3];
  const int64_t Ho = out->shape[2], Wo = out->shape[3];
  const int64_t K = Cin * kh * kw, P = Ho * Wo;
  const float *px = diffuse_tensor_f32 (xc), *pwt = diffuse_tensor_f32 (wc);
  const float *bias = bc ? diffuse_tensor_f32 (bc) : NULL;
  const gboolean pointwise = kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0;
  const int nt = nthreads ();
  rs = blas_small_begin (N * Cout * P * K);
  static int wino_env = -1;
  if (wino_env < 0)
    wino_env = g_getenv ("DIFFUSE_CPU_WINOGRAD") ? atoi (g_getenv ("DIFFUSE_CPU_WINOGRAD")) : 1;
  /* Winograd where the tiles are many enough to amortise transforming and
   * packing U (small images with many channels: the im2col path).
   * DIFFUSE_CPU_WINOGRAD=0 disables it, =2 uses it for every 3x3/s1/p1
   * convolution (for the op tests). */
  if (wino_env && kh == 3 && kw == 3 && sh == 1 && sw == 1 && ph == 1 && pw == 1 &&
      ((Cin >= 32 && Cout >= 32 && N * ((H + 1) / 2) * ((W + 1) / 2) >= 512) || wino_env == 2)) {
    ok = conv3x3_winograd (o, px, pwt, bias, N, Cin, H, W, Cout, nt);
    goto done;
  }
  const int64_t flops = 2 * N * Cout * P * K;

  /* the unit of work: a band of `unit` output rows (or pixels when pointwise) */
  const int64_t len = pointwise ? P : Ho;
  int64_t per_task = len;
  if (!pointwise) {
    /* im2col buffer of at most ~8 MiB per thread */
    const int64_t budget = 2 * 1024 * 1024;
    per_task = MAX (1, MIN (Ho, budget / MAX (1, K * Wo)));
  }
  /* enough tasks to keep every thread busy (several per thread when large) */
  int64_t want = flops > 50000000 ? 4 * nt : flops > 2000000 ? nt : 1;
  int64_t per_img = (len + per_task - 1) / per_task;
  if (N * per_img < want)
    per_img = MIN (len, (want + N - 1) / N);
  per_task = (len + per_img - 1) / per_img;
  if (pointwise && per_task < len)
    per_task = MIN (len, (per_task + 15) & ~(int64_t) 15);
  per_img = (len + per_task - 1) / per_task;
  const int64_t ntask = N * per_img;
  const int nthr = (int) MIN ((int64_t) nt, ntask);

  /* per-thread tasks need GEMMs wide enough to amortise packing W (Cout x K)
   * in each; small images with many channels are done as one threaded GEMM
   * over the columns of all images instead */
  const gboolean batched = ntask > 1 && (pointwise ? per_task : per_task * Wo) < 256;
  if (batched) {
    const int64_t NP = N * P;
    col = g_try_malloc (sizeof (float) * (size_t) (K * NP));
    float *tmp = N > 1 ? g_try_malloc (sizeof (float) * (size_t) (Cout * NP)) : NULL;
    if (!col || (N > 1 && !tmp)) {
      g_free (tmp);
      goto done;
    }
    if (pointwise) {
#pragma omp parallel for collapse (2) if (K * NP > PAR_ELEMS) schedule (static)
      for (int64_t n = 0; n < N; n++)
        for (int64_t c = 0; c < Cin; c++)
          memcpy (col + c * NP + n * P, px + (n * Cin + c) * P, P * sizeof (float));
    } else {
      const int64_t ncb = MIN (Cin, 4 * nt);
#pragma omp parallel for collapse (2) if (N * K * P > PAR_ELEMS) schedule (dynamic)
      for (int64_t n = 0; n < N; n++)
        for (int64_t cb = 0; cb < ncb; cb++) {
          const int64_t c0 = cb * Cin / ncb, c1 = (cb + 1) * Cin / ncb;
          im2col_rows (col + c0 * kh * kw * NP + n * P, NP, px + (n * Cin + c0) * H * W, c1 - c0, H, W, kh, kw, sh,
                       sw, ph, pw, Wo, 0, Ho);
        }
    }
    float *dst = N > 1 ? tmp : o;
    if (bias && N == 1)
      for (int64_t c = 0; c < Cout; c++)
        for (int64_t i = 0; i < P; i++)
          dst[c * P + i] = bias[c];
    cblas_sgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, (int) Cout, (int) NP, (int) K, 1.0f, pwt, (int) K, col,
                 (int) NP, (bias && N == 1) ? 1.0f : 0.0f, dst, (int) NP);
    if (N > 1) {
#pragma omp parallel for collapse (2) if (Cout * NP > PAR_ELEMS) schedule (static)
      for (int64_t n = 0; n < N; n++)
        for (int64_t c = 0; c < Cout; c++) {
          const float *sr = tmp + c * NP + n * P;
          float *dr = o + (n * Cout + c) * P;
          const float bv = bias ? bias[c] : 0.0f;
          for (int64_t i = 0; i < P; i++)
            dr[i] = sr[i] + bv;
        }
      g_free (tmp);
    }
    ok = TRUE;
    goto done;
  }

  if (!pointwise) {
    col = g_try_malloc (sizeof (float) * (size_t) (K * per_task * Wo) * nthr);
    if (!col)
      goto done;
  }

  if (nthr <= 1 && ntask == 1) {
    /* one task: let OpenBLAS use its threads */
    float *on = o;
    const int64_t cols = P;
    if (bias)
      for (int64_t c = 0; c < Cout; c++)
        for (int64_t i = 0; i < P; i++)
          on[c * P + i] = bias[c];
    const float *bm = px;
    if (!pointwise) {
      im2col_rows (col, P, px, Cin, H, W, kh, kw, sh, sw, ph, pw, Wo, 0, Ho);
      bm = col;
    }
    cblas_sgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, (int) Cout, (int) cols, (int) K, 1.0f, pwt, (int) K, bm,
                 (int) cols, bias ? 1.0f : 0.0f, on, (int) P);
  } else {
#pragma omp parallel for schedule (dynamic) num_threads (nthr)
    for (int64_t task = 0; task < ntask; task++) {
      int tid = 0;
#ifdef _OPENMP
      tid = omp_get_thread_num ();
#endif
      const int64_t n = task / per_img, u0 = (task % per_img) * per_task, nu = MIN (per_task, len - u0);
      const float *xn = px + n * Cin * H * W;
      /* output columns [c0, c0 + cols) of image n */
      const int64_t c0 = pointwise ? u0 : u0 * Wo, cols = pointwise ? nu : nu * Wo;
      float *on = o + n * Cout * P + c0;
      if (bias)
        for (int64_t c = 0; c < Cout; c++)
          for (int64_t i = 0; i < cols; i++)
            on[c * P + i] = bias[c];
      const float *bm;
      int64_t ldb;
      if (pointwise) {
        bm = xn + c0;
        ldb = P;
      } else {
        float *cl = col + (size_t) tid * K * per_task * Wo;
        im2col_rows (cl, cols, xn, Cin, H, W, kh, kw, sh, sw, ph, pw, Wo, u0, nu);
        bm = cl;
        ldb = cols;
      }
      cblas_sgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, (int) Cout, (int) cols, (int) K, 1.0f, pwt, (int) K,
                   bm, (int) ldb, bias ? 1.0f : 0.0f, on, (int) P);
    }
  }
  ok = TRUE;

done:
  blas_small_end (rs);
  g_free (col);
  if (o)
    out_end (out, o);
  diffuse_tensor_unref (xc);
  diffuse_tensor_clear (&wc);
  diffuse_tensor_clear (&bc);
  if (!ok)
    return oom (error, "conv2d");
  return TRUE;
}

static gboolean
cpu_pad2d (DiffuseTensor *out, DiffuseTensor *x, int left, int top, GError **error)
{
  PREP (xc, x, "pad2d");
  float *o = out_begin (out);
  if (!o) {
    diffuse_tensor_unref (xc);
    return oom (error, "pad2d");
  }
  int nd = x->ndim;
  int64_t H = x->shape[nd - 2], W = x->shape[nd - 1];
  int64_t Ho = out->shape[nd - 2], Wo = out->shape[nd - 1];
  int64_t planes = diffuse_tensor_numel (x) / MAX (1, H * W);
  const float *p = diffuse_tensor_f32 (xc);
#pragma omp parallel for if (planes * Ho * Wo > PAR_ELEMS) schedule (static)
  for (int64_t pl = 0; pl < planes; pl++) {
    float *op = o + pl * Ho * Wo;
    memset (op, 0, Ho * Wo * sizeof (float));
    for (int64_t y = 0; y < H; y++)
      memcpy (op + (y + top) * Wo + left, p + (pl * H + y) * W, W * sizeof (float));
  }
  out_end (out, o);
  diffuse_tensor_unref (xc);
  return TRUE;
}

static gboolean
cpu_upsample_nearest (DiffuseTensor *out, DiffuseTensor *x, GError **error)
{
  PREP (xc, x, "upsample");
  float *o = out_begin (out);
  if (!o) {
    diffuse_tensor_unref (xc);
    return oom (error, "upsample");
  }
  int64_t H = x->shape[2], W = x->shape[3], Ho = out->shape[2], Wo = out->shape[3];
  int64_t planes = x->shape[0] * x->shape[1];
  const float *p = diffuse_tensor_f32 (xc);
  /* torch's nearest: src = min(floor(dst * in / out), in - 1), scale in float */
  const float sy = (float) H / (float) Ho, sx = (float) W / (float) Wo;
  int64_t *xmap = g_new (int64_t, Wo);
  for (int64_t ox = 0; ox < Wo; ox++)
    xmap[ox] = MIN ((int64_t) floorf ((float) ox * sx), W - 1);
#pragma omp parallel for if (planes * Ho * Wo > PAR_ELEMS) schedule (static)
  for (int64_t pl = 0; pl < planes; pl++)
    for (int64_t oy = 0; oy < Ho; oy++) {
      int64_t iy = MIN ((int64_t) floorf ((float) oy * sy), H - 1);
      const float *srow = p + (pl * H + iy) * W;
      float *d = o + (pl * Ho + oy) * Wo;
      for (int64_t ox = 0; ox < Wo; ox++)
        d[ox] = srow[xmap[ox]];
    }
  g_free (xmap);
  out_end (out, o);
  diffuse_tensor_unref (xc);
  return TRUE;
}

static gboolean
cpu_avg_pool2d (DiffuseTensor *out, DiffuseTensor *x, int k, int stride, GError **error)
{
  PREP (xc, x, "avg_pool2d");
  float *o = out_begin (out);
  if (!o) {
    diffuse_tensor_unref (xc);
    return oom (error, "avg_pool2d");
  }
  int64_t H = x->shape[2], W = x->shape[3], Ho = out->shape[2], Wo = out->shape[3];
  int64_t planes = x->shape[0] * x->shape[1];
  const float *p = diffuse_tensor_f32 (xc);
  const float inv = 1.0f / (float) (k * k);
#pragma omp parallel for if (planes * Ho * Wo > PAR_ELEMS) schedule (static)
  for (int64_t pl = 0; pl < planes; pl++)
    for (int64_t oy = 0; oy < Ho; oy++)
      for (int64_t ox = 0; ox < Wo; ox++) {
        float s = 0.0f;
        for (int ky = 0; ky < k; ky++)
          for (int kx = 0; kx < k; kx++)
            s += p[(pl * H + oy * stride + ky) * W + ox * stride + kx];
        o[(pl * Ho + oy) * Wo + ox] = s * inv;
      }
  out_end (out, o);
  diffuse_tensor_unref (xc);
  return TRUE;
}

/* ---- normalisation ----------------------------------------------------------- */

static gboolean
cpu_group_norm (DiffuseTensor *out, DiffuseTensor *x, int groups, DiffuseTensor *gamma, DiffuseTensor *beta,
                float eps, DiffuseActivation act, GError **error)
{
  PREP (xc, x, "group_norm");
  DiffuseTensor *gc = gamma ? f32c (gamma) : NULL, *bc = beta ? f32c (beta) : NULL;
  float *o = out_begin (out);
  if ((gamma && !gc) || (beta && !bc) || !o) {
    diffuse_tensor_unref (xc);
    diffuse_tensor_clear (&gc);
    diffuse_tensor_clear (&bc);
    return oom (error, "group_norm");
  }
  const int64_t N = x->shape[0], C = x->shape[1];
  int64_t S = 1;
  for (int d = 2; d < x->ndim; d++)
    S *= x->shape[d];
  const int64_t cpg = C / groups;
  const float *p = diffuse_tensor_f32 (xc);
  const float *g = gc ? diffuse_tensor_f32 (gc) : NULL, *bb = bc ? diffuse_tensor_f32 (bc) : NULL;
#pragma omp parallel for collapse (2) if (N * C * S > PAR_ELEMS) schedule (dynamic)
  for (int64_t n = 0; n < N; n++)
    for (int64_t gi = 0; gi < groups; gi++) {
      const float *src = p + (n * C + gi * cpg) * S;
      const int64_t cnt = cpg * S;
      const double mean = dk_sum (src, cnt) / (double) cnt;
      const double var = dk_sqdev (src, cnt, (float) mean) / (double) cnt;
      const float rstd = (float) (1.0 / sqrt (var + eps));
      const float fmean = (float) mean;
      for (int64_t c = 0; c < cpg; c++) {
        const int64_t ch = gi * cpg + c;
        const float scale = rstd * (g ? g[ch] : 1.0f);
        const float shift = (bb ? bb[ch] : 0.0f) - fmean * scale;
        const float *s = src + c * S;
        float *d = o + (n * C + ch) * S;
        if (act == DIFFUSE_ACT_NONE || act == DIFFUSE_ACT_SILU)
          dk_affine (d, s, S, scale, shift, act == DIFFUSE_ACT_SILU);
        else
          for (int64_t i = 0; i < S; i++) d[i] = act_apply (act, s[i] * scale + shift);
      }
    }
  out_end (out, o);
  diffuse_tensor_unref (xc);
  diffuse_tensor_clear (&gc);
  diffuse_tensor_clear (&bc);
  return TRUE;
}

static gboolean
cpu_layer_norm (DiffuseTensor *out, DiffuseTensor *x, DiffuseTensor *gamma, DiffuseTensor *beta, float eps,
                GError **error)
{
  PREP (xc, x, "layer_norm");
  DiffuseTensor *gc = gamma ? f32c (gamma) : NULL, *bc = beta ? f32c (beta) : NULL;
  float *o = out_begin (out);
  if ((gamma && !gc) || (beta && !bc) || !o) {
    diffuse_tensor_unref (xc);
    diffuse_tensor_clear (&gc);
    diffuse_tensor_clear (&bc);
    return oom (error, "layer_norm");
  }
  int64_t rows = n_rows (x), D = last_dim (x);
  const float *p = diffuse_tensor_f32 (xc);
  const float *g = gc ? diffuse_tensor_f32 (gc) : NULL, *bb = bc ? diffuse_tensor_f32 (bc) : NULL;
#pragma omp parallel for if (rows * D > PAR_ELEMS) schedule (static)
  for (int64_t r = 0; r < rows; r++) {
    const float *s = p + r * D;
    float *d = o + r * D;
    double sum = 0.0;
    for (int64_t i = 0; i < D; i++)
      sum += s[i];
    double mean = sum / (double) D, var = 0.0;
    for (int64_t i = 0; i < D; i++) {
      double t = s[i] - mean;
      var += t * t;
    }
    var /= (double) D;
    float rstd = (float) (1.0 / sqrt (var + eps)), fm = (float) mean;
    for (int64_t i = 0; i < D; i++)
      d[i] = (s[i] - fm) * rstd * (g ? g[i] : 1.0f) + (bb ? bb[i] : 0.0f);
  }
  out_end (out, o);
  diffuse_tensor_unref (xc);
  diffuse_tensor_clear (&gc);
  diffuse_tensor_clear (&bc);
  return TRUE;
}

static void
softmax_row (float *r, int64_t n)
{
  float m = dk_max (r, n);
  if (m == -INFINITY) {
    /* all masked: torch gives NaN */
    for (int64_t i = 0; i < n; i++)
      r[i] = NAN;
    return;
  }
  float s = dk_exp_sub_sum (r, n, m);
  dk_scale (r, n, 1.0f / s);
}

static gboolean
cpu_softmax (DiffuseTensor *out, DiffuseTensor *x, GError **error)
{
  PREP (xc, x, "softmax");
  float *o = out_begin (out);
  if (!o) {
    diffuse_tensor_unref (xc);
    return oom (error, "softmax");
  }
  int64_t rows = n_rows (x), D = last_dim (x);
  memcpy (o, diffuse_tensor_f32 (xc), sizeof (float) * rows * D);
#pragma omp parallel for if (rows * D > PAR_ELEMS) schedule (static)
  for (int64_t r = 0; r < rows; r++)
    softmax_row (o + r * D, D);
  out_end (out, o);
  diffuse_tensor_unref (xc);
  return TRUE;
}

/* ---- attention ---------------------------------------------------------------- */

/* A [B, H, L, D] operand usable in place by sgemm when its rows have unit
 * stride; else an f32 contiguous copy. */
static DiffuseTensor *
attn_operand (DiffuseTensor *t)
{
  if (t->dtype == DIFFUSE_DTYPE_F32 && (t->stride[3] == 1 || t->shape[3] == 1) && t->stride[2] >= t->shape[3])
    return diffuse_tensor_ref (t);
  return f32c (t);
}

static gboolean
cpu_sdpa (DiffuseTensor *out, DiffuseTensor *q, DiffuseTensor *k, DiffuseTensor *v, DiffuseTensor *mask,
          gboolean causal, float scale, GError **error)
{
  DiffuseTensor *qc = attn_operand (q), *kc = attn_operand (k), *vc = attn_operand (v);
  float *o = out_begin (out);
  const int64_t B = q->shape[0], Hh = q->shape[1], Lq = q->shape[2], Lk = k->shape[2];
  const int64_t D = q->shape[3], Dv = v->shape[3];
  /* 256 query rows per task: smaller tiles (the score block in L2) made
   * OpenBLAS's per-call packing of K and V dominate (measured slower) */
  const int64_t chunk = MIN (Lq, 256);
  const int64_t nchunks = (Lq + chunk - 1) / chunk;
  const int nt = B * Hh * Lq * Lk * (D + Dv) < SMALL_WORK ? 1 : nthreads ();
  const int rs = nt == 1 ? blas_small_begin (B * Hh * Lq * Lk * (D + Dv)) : 0;
  float *scratch = g_try_malloc (sizeof (float) * (size_t) (chunk * Lk) * nt);
  float *rinv = g_try_malloc (sizeof (float) * (size_t) chunk * nt);
  gboolean ok = qc && kc && vc && o && scratch && rinv;
  if (ok) {
    const float *pq = (const float *) base_ptr (qc), *pk = (const float *) base_ptr (kc);
    const float *pv = (const float *) base_ptr (vc);
    const char *pm = mask ? base_ptr (mask) : NULL;
    const int64_t ntask = B * Hh * nchunks;
#pragma omp parallel for schedule (dynamic) num_threads (nt)
    for (int64_t task = 0; task < ntask; task++) {
      int tid = 0;
#ifdef _OPENMP
      tid = omp_get_thread_num ();
#endif
      float *S = scratch + (size_t) tid * chunk * Lk;
      const int64_t c = task % nchunks, bh = task / nchunks, b = bh / Hh, h = bh % Hh;
      const int64_t r0 = c * chunk, m = MIN (chunk, Lq - r0);
      const float *qp = pq + b * qc->stride[0] + h * qc->stride[1] + r0 * qc->stride[2];
      const float *kp = pk + b * kc->stride[0] + h * kc->stride[1];
      const float *vp = pv + b * vc->stride[0] + h * vc->stride[1];
      cblas_sgemm (CblasRowMajor, CblasNoTrans, CblasTrans, (int) m, (int) Lk, (int) D, scale, qp,
                   (int) MAX (qc->stride[2], 1), kp, (int) MAX (kc->stride[2], 1), 0.0f, S, (int) Lk);
      /* softmax without the division: the output rows are scaled by
       * 1 / sum afterwards (Dv values per row instead of Lk) */
      float *inv = rinv + (size_t) tid * chunk;
      for (int64_t i = 0; i < m; i++) {
        float *row = S + i * Lk;
        if (pm) {
          int64_t mo = b * mask->stride[0] + h * mask->stride[1] + (r0 + i) * mask->stride[2];
          if (mask->dtype == DIFFUSE_DTYPE_F32 && mask->stride[3] == 1) {
            const float *mr = (const float *) pm + mo;
            for (int64_t j = 0; j < Lk; j++)
              row[j] += mr[j];
          } else
            for (int64_t j = 0; j < Lk; j++)
              row[j] += ld (pm, mask->dtype, mo + j * mask->stride[3]);
        }
        int64_t n = Lk;
        if (causal) {
          n = MIN (Lk, r0 + i + 1);
          memset (row + n, 0, (Lk - n) * sizeof (float));
        }
        float mx = dk_max (row, n);
        if (mx == -INFINITY) {
          /* a fully masked row attends to nothing: torch's SDPA gives zeros */
          memset (row, 0, Lk * sizeof (float));
          inv[i] = 0.0f;
        } else
          inv[i] = 1.0f / dk_exp_sub_sum (row, n, mx);
      }
      float *op = o + ((b * Hh + h) * Lq + r0) * Dv;
      cblas_sgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, (int) m, (int) Dv, (int) Lk, 1.0f, S, (int) Lk, vp,
                   (int) MAX (vc->stride[2], 1), 0.0f, op, (int) Dv);
      for (int64_t i = 0; i < m; i++)
        dk_scale (op + i * Dv, Dv, inv[i]);
    }
  }
  blas_small_end (rs);
  g_free (rinv);
  g_free (scratch);
  if (o)
    out_end (out, o);
  diffuse_tensor_clear (&qc);
  diffuse_tensor_clear (&kc);
  diffuse_tensor_clear (&vc);
  if (!ok)
    return oom (error, "attention");
  return TRUE;
}

/* ---- misc ------------------------------------------------------------------------ */

static gboolean
cpu_timestep_embedding (DiffuseTensor *out, DiffuseTensor *t, gboolean flip, float shift, float scale,
                        float max_period, GError **error)
{
  PREP (tc, t, "timestep_embedding");
  const int64_t N = out->shape[0], dim = out->shape[1], half = dim / 2;
  const float *pt = diffuse_tensor_f32 (tc);
  float *o = (float *) base_ptr (out);
  /* the same float32 steps as diffusers' get_timestep_embedding */
  const float neg_log = (float) -log ((double) max_period);
  float *freq = g_new (float, MAX (half, 1));
  for (int64_t i = 0; i < half; i++) {
    float e = neg_log * (float) i;
    e = e / ((float) half - shift);
    freq[i] = expf (e);
  }
  for (int64_t n = 0; n < N; n++) {
    float *row = o + n * dim;
    for (int64_t i = 0; i < half; i++) {
      float a = pt[n] * freq[i];
      a = scale * a;
      float s = sinf (a), c = cosf (a);
      row[flip ? half + i : i] = s;
      row[flip ? i : half + i] = c;
    }
    if (dim % 2)
      row[dim - 1] = 0.0f;
  }
  g_free (freq);
  diffuse_tensor_unref (tc);
  return TRUE;
}

static gboolean
cpu_embedding (DiffuseTensor *out, DiffuseTensor *table, const int32_t *ids, int64_t n, GError **error)
{
  const int64_t D = table->shape[1];
  const char *src = base_ptr (table);
  char *dst = base_ptr (out);
  size_t es = diffuse_dtype_size (table->dtype);
  for (int64_t i = 0; i < n; i++) {
    int64_t off = ids[i] * table->stride[0];
    if (table->stride[1] == 1)
      memcpy (dst + i * D * es, src + off * es, D * es);
    else
      for (int64_t j = 0; j < D; j++)
        st (dst, out->dtype, i * D + j, ld (src, table->dtype, off + j * table->stride[1]));
  }
  return TRUE;
}

static const DiffuseBackendOps cpu_ops = {
  .name = "cpu",
  .alloc = cpu_alloc,
  .free = cpu_free,
  .copy = cpu_copy,
  .upload = cpu_upload,
  .download = cpu_upload,
  .fill_zero = cpu_fill_zero,
  .binary = cpu_binary,
  .scale = cpu_scale,
  .axpy = cpu_axpy,
  .activation = cpu_activation,
  .geglu = cpu_geglu,
  .matmul = cpu_matmul,
  .linear = cpu_linear,
  .conv2d = cpu_conv2d,
  .pad2d = cpu_pad2d,
  .upsample_nearest = cpu_upsample_nearest,
  .avg_pool2d = cpu_avg_pool2d,
  .group_norm = cpu_group_norm,
  .layer_norm = cpu_layer_norm,
  .softmax = cpu_softmax,
  .sdpa = cpu_sdpa,
  .timestep_embedding = cpu_timestep_embedding,
  .embedding = cpu_embedding,
};

const DiffuseBackendOps *
_diffuse_cpu_backend_ops (void)
{
  return &cpu_ops;
}
