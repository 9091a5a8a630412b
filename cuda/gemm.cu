/* gst-diffuse — CUDA backend: matmul and linear through cuBLAS.
 *
 * f16/bf16 operands run on the tensor cores with f32 accumulation
 * (CUBLAS_COMPUTE_32F, as torch); f32 runs in true f32 unless
 * DIFFUSE_CUDA_TF32=1 (set at device open) allows TF32.  Row-major
 * C[M, N] = A[M, K] B[K, N] is computed as the column-major C^T = B^T A^T. */
#include "common.cuh"

static cudaDataType_t
cu_type (int dt)
{
  switch (dt) {
    case DIFFUSE_DTYPE_F16: return CUDA_R_16F;
    case DIFFUSE_DTYPE_BF16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

gboolean
dcu_gemm (CudaCtx *c, int dt, gboolean ta, gboolean tb, int64_t m, int64_t n, int64_t k, float alpha, const void *A,
          int64_t lda, int64_t sA, const void *B, int64_t ldb, int64_t sB, float beta, void *C, int64_t ldc,
          int64_t sC, int64_t batch, GError **error)
{
  return dcu_gemm_ex (c, dt, dt, ta, tb, m, n, k, alpha, A, lda, sA, B, ldb, sB, beta, C, ldc, sC, batch, error);
}

/* dcu_gemm with C in its own dtype (e.g. f16 operands, f32 result) */
gboolean
dcu_gemm_ex (CudaCtx *c, int dt, int dtc, gboolean ta, gboolean tb, int64_t m, int64_t n, int64_t k, float alpha,
             const void *A, int64_t lda, int64_t sA, const void *B, int64_t ldb, int64_t sB, float beta, void *C,
             int64_t ldc, int64_t sC, int64_t batch, GError **error)
{
  if (m <= 0 || n <= 0 || batch <= 0)
    return TRUE;
  if (m > G_MAXINT || n > G_MAXINT || k > G_MAXINT || lda > G_MAXINT || ldb > G_MAXINT || ldc > G_MAXINT) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "GEMM dimension over 2^31 (%" G_GINT64_FORMAT
                 " x %" G_GINT64_FORMAT " x %" G_GINT64_FORMAT ")", m, n, k);
    return FALSE;
  }
  if (k == 0) {
    /* nothing to accumulate: C = beta * C (beta is 0 or 1 here) */
    if (beta == 0.0f) {
      size_t es = diffuse_dtype_size ((DiffuseDType) dtc);
      for (int64_t b = 0; b < batch; b++)
        for (int64_t j = 0; j < n; j++)
          DCU_TRY (cudaMemsetAsync ((char *) C + (b * sC + j * ldc) * es, 0, m * es, c->stream), "gemm k=0");
    }
    return TRUE;
  }
  cudaDataType_t t = cu_type (dt), tc = cu_type (dtc);
  cublasOperation_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  cublasStatus_t s;
  lda = MAX (lda, 1);
  ldb = MAX (ldb, 1);
  g_mutex_lock (&c->blas_lock);
  if (batch == 1)
    s = cublasGemmEx (c->blas, opa, opb, (int) m, (int) n, (int) k, &alpha, A, t, (int) lda, B, t, (int) ldb, &beta, C,
                      tc, (int) ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  else if (batch <= G_MAXINT)
    s = cublasGemmStridedBatchedEx (c->blas, opa, opb, (int) m, (int) n, (int) k, &alpha, A, t, (int) lda, sA, B, t,
                                    (int) ldb, sB, &beta, C, tc, (int) ldc, sC, (int) batch, CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT);
  else
    s = CUBLAS_STATUS_INVALID_VALUE;   /* batch over 2^31 */
  g_mutex_unlock (&c->blas_lock);
  if (s != CUBLAS_STATUS_SUCCESS)
    return dcu_fail_blas (error, s, "cublasGemmEx");
  return TRUE;
}

/* The CPU backend's mat_layout: a 2-D slice with unit stride along one dim. */
typedef struct {
  gboolean colmajor;
  int64_t ld;
} Layout;

static gboolean
layout_of (const DiffuseTensor *t, Layout *l)
{
  int n = t->ndim;
  int64_t rows = t->shape[n - 2], cols = t->shape[n - 1];
  int64_t rs = t->stride[n - 2], cs = t->stride[n - 1];
  if (cs == 1 || cols == 1) {
    l->colmajor = FALSE;
    l->ld = MAX (rows == 1 ? cols : rs, MAX (cols, (int64_t) 1));
    return !(rows > 1 && rs < cols);
  }
  if (rs == 1 || rows == 1) {
    l->colmajor = TRUE;
    l->ld = MAX (cs, MAX (rows, (int64_t) 1));
    return !(cols > 1 && cs < rows);
  }
  return FALSE;
}

/* One stride for all nb batch dims of t (in out's batch shape), if they
 * flatten: stride[d] == s * prod(shape[d+1..nb-1]) for every d with shape > 1. */
static gboolean
batch_stride (const DiffuseTensor *t, const int64_t *bshape, int nb, int64_t *s)
{
  int64_t inner = 1;
  int64_t cand = -1;
  for (int d = nb - 1; d >= 0; d--) {
    if (bshape[d] != 1) {
      int64_t sd = t->stride[d];
      int64_t need = cand < 0 ? -1 : cand * inner;
      if (cand < 0) {
        if (sd % inner != 0)
          return FALSE;
        cand = sd / inner;
      } else if (sd != need)
        return FALSE;
    }
    inner *= bshape[d];
  }
  *s = cand < 0 ? 0 : cand;
  return TRUE;
}

gboolean
dcu_matmul (DiffuseTensor *out, DiffuseTensor *a, DiffuseTensor *b, gboolean trans_a, gboolean trans_b, float alpha,
            GError **error)
{
  CudaCtx *c = dcu_ctx_of (out);
  if (!dcu_enter (c, error))
    return FALSE;
  DCU_PROF (c, "matmul");
  int nd = out->ndim, nb = nd - 2;
  int64_t M = out->shape[nd - 2], N = out->shape[nd - 1];
  int64_t K = trans_a ? a->shape[nd - 2] : a->shape[nd - 1];
  DiffuseTensor *ac = NULL, *bc = NULL;
  gboolean ok = FALSE;
  Layout la, lb;
  int64_t sa = 0, sb = 0;
  /* operands in out's dtype with GEMM-compatible, flattenable layouts; else dense copies */
  if (a->dtype != out->dtype || !layout_of (a, &la) || !batch_stride (a, out->shape, nb, &sa)) {
    ac = dcu_contig (a, out->dtype, error);
    if (!ac)
      goto done;
    a = ac;
    layout_of (a, &la);
    batch_stride (a, out->shape, nb, &sa);
  }
  if (b->dtype != out->dtype || !layout_of (b, &lb) || !batch_stride (b, out->shape, nb, &sb)) {
    bc = dcu_contig (b, out->dtype, error);
    if (!bc)
      goto done;
    b = bc;
    layout_of (b, &lb);
    batch_stride (b, out->shape, nb, &sb);
  }
  {
    int64_t nbatch = 1;
    for (int d = 0; d < nb; d++)
      nbatch *= out->shape[d];
    /* C^T[N, M] = op(b)^T op(a)^T in column-major terms */
    gboolean opb = trans_b ^ lb.colmajor, opa = trans_a ^ la.colmajor;
    ok = dcu_gemm (c, out->dtype, opb, opa, N, M, K, alpha, dcu_ptr (b), lb.ld, sb, dcu_ptr (a), la.ld, sa, 0.0f,
                   dcu_ptr (out), MAX (N, (int64_t) 1), M * N, nbatch, error);
  }
done:
  diffuse_tensor_clear (&ac);
  diffuse_tensor_clear (&bc);
  return ok;
}

gboolean
dcu_linear (DiffuseTensor *out, DiffuseTensor *x, DiffuseTensor *w, DiffuseTensor *b, GError **error)
{
  CudaCtx *c = dcu_ctx_of (out);
  if (!dcu_enter (c, error))
    return FALSE;
  DCU_PROF (c, "linear");
  int64_t M = out->shape[0], N = out->shape[1], K = x->shape[1];
  DiffuseTensor *xc = NULL, *wc = NULL;
  gboolean ok = FALSE;
  /* x is contiguous [M, K]; w [N, K] needs unit stride along K */
  if (x->dtype != out->dtype) {
    xc = dcu_contig (x, out->dtype, error);
    if (!xc)
      goto done;
    x = xc;
  }
  if (w->dtype != out->dtype || !(w->stride[1] == 1 || K == 1) || (N > 1 && w->stride[0] < K)) {
    wc = dcu_contig (w, out->dtype, error);
    if (!wc)
      goto done;
    w = wc;
  }
  {
    int64_t ldw = N > 1 ? w->stride[0] : K;
    /* out^T[N, M] = w[N, K] x^T: A = w (col-major K x N, transposed), B = x (col-major K x M) */
    ok = dcu_gemm (c, out->dtype, TRUE, FALSE, N, M, K, 1.0f, dcu_ptr (w), MAX (ldw, K), 0, dcu_ptr (x),
                   MAX (K, (int64_t) 1), 0, 0.0f, dcu_ptr (out), MAX (N, (int64_t) 1), 0, 1, error);
  }
  if (ok && b)
    ok = dcu_add_bias (c, out, b, N, 1, error);
done:
  diffuse_tensor_clear (&xc);
  diffuse_tensor_clear (&wc);
  return ok;
}
