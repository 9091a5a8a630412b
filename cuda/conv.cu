/* gst-diffuse — CUDA backend: 2-D convolution as im2col + tensor-core GEMM.
 *
 * 1x1 / stride 1 / no padding on a contiguous input is one strided-batched
 * GEMM on the input itself.  Otherwise the column matrix [K = Cin*kh*kw, P]
 * (P output positions) is built in a pool scratch buffer in the compute
 * dtype — all images at once when it fits in DCU_COL_BUDGET, else per image
 * in chunks of output positions — and multiplied by the weight [Cout, K].
 * Layout stays NCHW (the interface's); an implicit-GEMM / channels-last
 * kernel is the next step once measured (see docs/gpu-check.md). */
#include "common.cuh"
#include <string.h>

#define DCU_COL_BUDGET ((int64_t) 128 << 20)

struct ConvGeom {
  int64_t Cin, H, W, kh, kw, Ho, Wo, K, P;
  int sh, sw, ph, pw;
};

/* col[img][kk][pp] for images n0.., positions p0..p0+np */
__global__ void
k_im2col (char *col, int dt, TView x, ConvGeom g, int64_t n0, int64_t p0, int64_t np, int64_t total)
{
  const int64_t per_img = g.K * np;
  const int64_t khw = g.kh * g.kw;
  for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < total; i += (int64_t) gridDim.x * blockDim.x) {
    int64_t img = i / per_img, rem = i - img * per_img;
    int64_t kk = rem / np, pp = rem - kk * np;
    int64_t p = p0 + pp;
    int64_t oy = p / g.Wo, ox = p - oy * g.Wo;
    int64_t cin = kk / khw, r = kk - cin * khw;
    int64_t ky = r / g.kw, kx = r - ky * g.kw;
    int64_t iy = oy * g.sh - g.ph + ky, ix = ox * g.sw - g.pw + kx;
    float v = 0.0f;
    if (iy >= 0 && iy < g.H && ix >= 0 && ix < g.W)
      v = ldf (x.p, x.dt, (n0 + img) * x.stride[0] + cin * x.stride[1] + iy * x.stride[2] + ix * x.stride[3]);
    stf (col, dt, i, v);
  }
}

/* The same columns, for a contiguous input already in the compute dtype: one
 * block row per column row kk (its cin, ky, kx computed once), threads along
 * the output positions (coalesced stores, mostly coalesced loads), 32-bit
 * index math, the elements copied as raw 2- or 4-byte words (padding = 0 bits
 * = 0.0 in f32, f16 and bf16).  grid (ceil (np / 256), K, images).  Selected by
 * DIFFUSE_CUDA_IM2COL=rows until measured against k_im2col on a GPU. */
template <typename E>
__global__ void __launch_bounds__ (256)
k_im2col_rows (E *col, const E *x, int Cin, int H, int W, int kh, int kw, int Wo, int sh, int sw, int ph, int pw,
               int K, int64_t n0, int64_t p0, int np)
{
  const int pp = blockIdx.x * 256 + threadIdx.x;
  if (pp >= np)
    return;
  const int kk = blockIdx.y, img = blockIdx.z;
  const int khw = kh * kw, cin = kk / khw, r = kk - cin * khw, ky = r / kw, kx = r - ky * kw;
  const int64_t p = p0 + pp;
  const int oy = (int) (p / Wo), ox = (int) (p - (int64_t) oy * Wo);
  const int iy = oy * sh - ph + ky, ix = ox * sw - pw + kx;
  E v = 0;
  if (iy >= 0 && iy < H && ix >= 0 && ix < W)
    v = x[(((n0 + img) * Cin + cin) * (int64_t) H + iy) * W + ix];
  col[((int64_t) img * K + kk) * np + pp] = v;
}

static gboolean
im2col_rows_ok (const DiffuseTensor *x, int dt, const ConvGeom &g, int64_t nimg, int64_t np)
{
  const char *e = g_getenv ("DIFFUSE_CUDA_IM2COL");
  if (!e || strcmp (e, "rows") != 0)
    return FALSE;
  return (int) x->dtype == dt && diffuse_tensor_is_contiguous (x) && g.K <= 65535 && nimg <= 65535 &&
         np <= G_MAXINT - 256 && g.H <= G_MAXINT / MAX (g.W, (int64_t) 1) && g.Cin <= G_MAXINT;
}

static gboolean
launch_im2col (CudaCtx *c, void *col, int dt, DiffuseTensor *x, const ConvGeom &g, int64_t n0, int64_t nimg,
               int64_t p0, int64_t np, GError **error)
{
  if (im2col_rows_ok (x, dt, g, nimg, np)) {
    dim3 grid ((unsigned) ((np + 255) / 256), (unsigned) g.K, (unsigned) nimg);
    if (diffuse_dtype_size ((DiffuseDType) dt) == 2)
      k_im2col_rows<uint16_t><<<grid, 256, 0, c->stream>>> ((uint16_t *) col, (const uint16_t *) dcu_ptr (x),
                                                             (int) g.Cin, (int) g.H, (int) g.W, (int) g.kh, (int) g.kw,
                                                             (int) g.Wo, g.sh, g.sw, g.ph, g.pw, (int) g.K, n0, p0,
                                                             (int) np);
    else
      k_im2col_rows<uint32_t><<<grid, 256, 0, c->stream>>> ((uint32_t *) col, (const uint32_t *) dcu_ptr (x),
                                                             (int) g.Cin, (int) g.H, (int) g.W, (int) g.kh, (int) g.kw,
                                                             (int) g.Wo, g.sh, g.sw, g.ph, g.pw, (int) g.K, n0, p0,
                                                             (int) np);
    return dcu_check_launch (error, "im2col");
  }
  int64_t total = g.K * np * nimg;
  k_im2col<<<dcu_blocks (c, total), 256, 0, c->stream>>> ((char *) col, dt, tview (x), g, n0, p0, np, total);
  return dcu_check_launch (error, "im2col");
}

gboolean
dcu_conv2d (DiffuseTensor *out, DiffuseTensor *x, DiffuseTensor *w, DiffuseTensor *b, int sh, int sw, int ph, int pw,
            GError **error)
{
  CudaCtx *c = dcu_ctx_of (out);
  if (!dcu_enter (c, error))
    return FALSE;
  DCU_PROF (c, "conv2d");
  const int dt = out->dtype;
  const size_t es = diffuse_dtype_size ((DiffuseDType) dt);
  ConvGeom g;
  const int64_t N = x->shape[0], Cout = w->shape[0];
  g.Cin = x->shape[1];
  g.H = x->shape[2];
  g.W = x->shape[3];
  g.kh = w->shape[2];
  g.kw = w->shape[3];
  g.Ho = out->shape[2];
  g.Wo = out->shape[3];
  g.K = g.Cin * g.kh * g.kw;
  g.P = g.Ho * g.Wo;
  g.sh = sh;
  g.sw = sw;
  g.ph = ph;
  g.pw = pw;
  if (diffuse_tensor_numel (out) == 0)
    return TRUE;

  gboolean ok = FALSE;
  void *col = NULL;
  DiffuseTensor *wc = dcu_contig (w, dt, error);   /* [Cout, K] row-major */
  if (!wc)
    return FALSE;
  const gboolean pointwise = g.kh == 1 && g.kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0;
  if (pointwise && x->dtype == dt && diffuse_tensor_is_contiguous (x)) {
    /* out[n] (Cout x P) = W (Cout x Cin) x[n] (Cin x P) */
    ok = dcu_gemm (c, dt, FALSE, FALSE, g.P, Cout, g.Cin, 1.0f, dcu_ptr (x), g.P, g.Cin * g.P, dcu_ptr (wc), g.Cin, 0,
                   0.0f, dcu_ptr (out), g.P, Cout * g.P, N, error);
  } else {
    const int64_t per_img = g.K * g.P * (int64_t) es;
    if (per_img * N <= DCU_COL_BUDGET) {
      col = dcu_scratch (c, (size_t) (per_img * N), error);
      if (!col)
        goto done;
      if (!launch_im2col (c, col, dt, x, g, 0, N, 0, g.P, error))
        goto done;
      ok = dcu_gemm (c, dt, FALSE, FALSE, g.P, Cout, g.K, 1.0f, col, g.P, g.K * g.P, dcu_ptr (wc), g.K, 0, 0.0f,
                     dcu_ptr (out), g.P, Cout * g.P, N, error);
    } else {
      int64_t np = MAX ((int64_t) 1, MIN (g.P, DCU_COL_BUDGET / (g.K * (int64_t) es)));
      col = dcu_scratch (c, (size_t) (g.K * np * (int64_t) es), error);
      if (!col)
        goto done;
      ok = TRUE;
      for (int64_t n = 0; n < N && ok; n++)
        for (int64_t p0 = 0; p0 < g.P && ok; p0 += np) {
          int64_t cnt = MIN (np, g.P - p0);
          ok = launch_im2col (c, col, dt, x, g, n, 1, p0, cnt, error);
          if (ok)
            ok = dcu_gemm (c, dt, FALSE, FALSE, cnt, Cout, g.K, 1.0f, col, cnt, 0, dcu_ptr (wc), g.K, 0, 0.0f,
                           dcu_ptr (out) + (n * Cout * g.P + p0) * (int64_t) es, g.P, 0, 1, error);
        }
    }
  }
  if (ok && b)
    ok = dcu_add_bias (c, out, b, Cout, g.P, error);
done:
  dcu_scratch_free (c, col);
  diffuse_tensor_unref (wc);
  return ok;
}
