/* gst-diffuse — CUDA backend: 2-D convolution as im2col + tensor-core GEMM.
 *
 * 1x1 / stride 1 / no padding on a contiguous input is one strided-batched
 * GEMM on the input itself.  Otherwise the column matrix [K = Cin*kh*kw, P]
 * (P output positions) is built in a pool scratch buffer in the compute
 * dtype — all images at once when it fits in DCU_COL_BUDGET, else per image
 * in chunks of output positions — and multiplied by the weight [Cout, K].
 * Layout stays NCHW (the interface's).
 *
 * For f16/bf16 with Cin a multiple of 8 there is also an implicit GEMM
 * (k_conv_igemm, below): no column matrix at all — the input is transposed
 * once to channels-last, the weight reordered to [Cout][kh][kw][Cin], and
 * the tensor-core kernel gathers its B tiles straight from the input, bias
 * added in its epilogue, output written NCHW.  By default (auto) it takes
 * the convolutions whose grid fills the GPU (the VAE's and the UNet's 64x64
 * level), im2col + cuBLAS the rest: the fastest mix measured on an H200
 * (docs/benchmarks.md: VAE decode 74.7 -> 25.3 ms).  DIFFUSE_CUDA_CONV=implicit
 * uses it wherever it applies (split-K on small grids), =im2col nowhere. */
#include "common.cuh"
#include <mma.h>
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
 * = 0.0 in f32, f16 and bf16).  grid (ceil (np / 256), K, images).  The
 * default (measured on an H200: VAE decode 74.7 -> 56.8 ms, UNet step
 * 36.1 -> 33.8 ms against k_im2col); DIFFUSE_CUDA_IM2COL=elements selects
 * k_im2col, which also takes strided inputs and other dtypes. */
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
  if (e && strcmp (e, "elements") == 0)
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

/* ---- implicit GEMM (f16/bf16, tensor cores, f32 accumulation) -------------
 *
 * GEMM view: Y[m = cout][n = (img, oy, ox)] = sum_k W[m][k] X[k][n] with
 * k = (ky, kx, ci) — ci fastest, so with Cin % 8 == 0 every 8 consecutive k
 * are one 16-byte vector of the channels-last input at one pixel (or 8 zeros
 * of padding).  A block of 8 warps computes a 128 x 128 tile of Y, walking K
 * in steps of 32: the next step's A (weights) and B (gathered input) vectors
 * are loaded into registers while the tensor cores work on the current
 * step's shared-memory copy.  Warps are 2 (m) x 4 (n), each 64 x 32 = 4 x 2
 * WMMA 16x16x16 accumulators.  Shared rows are IG_LD = 40 elements (80 B):
 * 16-byte aligned vector stores, fragment pointers at multiples of 32 B. */
#define IG_BM 128
#define IG_BN 128
#define IG_BK 32
#define IG_LD (IG_BK + 8)

template <typename T>
struct IgArgs {
  const T *x;        /* [N][H][W][Cin] */
  const T *w;        /* [M][K], K = kh * kw * Cin, (ky, kx, ci) order */
  const float *bias; /* [M] or NULL */
  T *y;              /* [N][M][Ho][Wo] */
  int M, K, Cin, H, W, kw, Wo, sh, sw, ph, pw;
  int P;             /* Ho * Wo */
  int NP;            /* N * P: the GEMM's n */
  float *ws;         /* split-K: NULL, or f32 partial sums [splits][M][NP] (blockIdx.z = split) */
  int ksteps;        /* split-K: K steps per split */
};

/* Split-K for grids smaller than the GPU: `want` splits of the nk K steps,
 * evened out so that every split has at least one step; returns the number
 * of splits, *ksteps the steps of each (the last may have fewer). */
__host__ __device__ __forceinline__ int
ig_split (int nk, int want, int *ksteps)
{
  want = want < 1 ? 1 : (want > nk ? nk : want);
  *ksteps = (nk + want - 1) / want;
  return (nk + *ksteps - 1) / *ksteps;
}

/* The kernel's index math lives in __host__ __device__ pieces so that
 * _diffuse_cuda_conv_igemm_emulate (below) runs the same loads, staging and
 * epilogue on the host, and test-ops checks them against torch without a GPU. */
#ifdef __CUDA_ARCH__
#define IG_LDG(p) __ldg (p)
#else
#define IG_LDG(p) (*(p))
#endif

/* One thread's load slots: rows r0 and r0 + 64 of both tiles (A: output
 * channels m0 + r; B: output positions n0 + r), the k quarter kq. */
template <typename T>
struct IgSlots {
  int kq, r0;
  bool aval[2], pval[2];
  int iy0[2], ix0[2];
  int64_t pbase[2];

  __host__ __device__ void
  init (const IgArgs<T> &a, int tid, int m0, int n0)
  {
    kq = (tid & 3) * 8;
    r0 = tid >> 2;
    for (int s = 0; s < 2; s++) {
      aval[s] = m0 + r0 + 64 * s < a.M;
      const int p = n0 + r0 + 64 * s;
      pval[s] = p < a.NP;
      const int pc = pval[s] ? p : 0;
      const int img = pc / a.P, pix = pc - img * a.P;
      const int oy = pix / a.Wo, ox = pix - oy * a.Wo;
      iy0[s] = oy * a.sh - a.ph;
      ix0[s] = ox * a.sw - a.pw;
      pbase[s] = (int64_t) img * a.H * a.W;
    }
  }

  /* the 8-element vectors of the K step starting at k0 (zeros outside) */
  __host__ __device__ void
  load (const IgArgs<T> &a, int m0, int k0, uint4 ra[2], uint4 rb[2]) const
  {
    const int k = k0 + kq;
    const bool kin = k < a.K;
    int ky = 0, kx = 0, ci = 0;
    if (kin) {
      const int r = k / a.Cin;
      ci = k - r * a.Cin;
      ky = r / a.kw;
      kx = r - ky * a.kw;
    }
    for (int s = 0; s < 2; s++) {
      ra[s] = make_uint4 (0u, 0u, 0u, 0u);
      if (aval[s] && kin)
        ra[s] = IG_LDG ((const uint4 *) (a.w + (int64_t) (m0 + r0 + 64 * s) * a.K + k));
      rb[s] = make_uint4 (0u, 0u, 0u, 0u);
      const int iy = iy0[s] + ky, ix = ix0[s] + kx;
      if (pval[s] && kin && iy >= 0 && iy < a.H && ix >= 0 && ix < a.W)
        rb[s] = IG_LDG ((const uint4 *) (a.x + ((pbase[s] + (int64_t) iy * a.W + ix) * a.Cin + ci)));
    }
  }

  /* into the shared tiles As [m][IG_LD], Bs [n][IG_LD] */
  __host__ __device__ void
  stage (T *As, T *Bs, const uint4 ra[2], const uint4 rb[2]) const
  {
    for (int s = 0; s < 2; s++) {
      *(uint4 *) (As + (r0 + 64 * s) * IG_LD + kq) = ra[s];
      *(uint4 *) (Bs + (r0 + 64 * s) * IG_LD + kq) = rb[s];
    }
  }
};

/* Epilogue of one 16x16 accumulator tile cs (row-major f32) whose first
 * element is (m = mb, n = nb): lane l writes row l / 2, 8 consecutive output
 * positions, bias added, NCHW. */
template <typename T>
__host__ __device__ __forceinline__ void
ig_epilogue_lane (const IgArgs<T> &a, const float *cs, int lane, int mb, int nb)
{
  const int rr = lane >> 1, cc0 = (lane & 1) * 8;
  const int m = mb + rr;
  if (m >= a.M)
    return;
  const float bv = a.bias ? a.bias[m] : 0.0f;
  for (int c = 0; c < 8; c++) {
    const int p = nb + cc0 + c;
    if (p >= a.NP)
      break;
    const int img = p / a.P, pix = p - img * a.P;
    a.y[((int64_t) img * a.M + m) * a.P + pix] = from_f<T> (cs[rr * 16 + cc0 + c] + bv);
  }
}

/* Split-K: the partial sums of a 16x16 tile (same lane layout, no bias) */
template <typename T>
__host__ __device__ __forceinline__ void
ig_partial_lane (const IgArgs<T> &a, const float *cs, int lane, int mb, int nb, int z)
{
  const int rr = lane >> 1, cc0 = (lane & 1) * 8;
  const int m = mb + rr;
  if (m >= a.M)
    return;
  float *dst = a.ws + ((int64_t) z * a.M + m) * a.NP;
  for (int c = 0; c < 8; c++) {
    const int p = nb + cc0 + c;
    if (p >= a.NP)
      break;
    dst[p] = cs[rr * 16 + cc0 + c];
  }
}

/* Split-K: output element i = m * NP + p, the splits summed, bias added, NCHW */
template <typename T>
__host__ __device__ __forceinline__ void
ig_reduce_one (const IgArgs<T> &a, int splits, int64_t i)
{
  const int64_t MN = (int64_t) a.M * a.NP;
  float v = 0.0f;
  for (int z = 0; z < splits; z++)
    v += a.ws[z * MN + i];
  const int m = (int) (i / a.NP), p = (int) (i - (int64_t) m * a.NP);
  if (a.bias)
    v += a.bias[m];
  const int img = p / a.P, pix = p - img * a.P;
  a.y[((int64_t) img * a.M + m) * a.P + pix] = from_f<T> (v);
}

/* wt[i] of the [Cout][kh*kw][Cin] weight comes from w[this] of [Cout][Cin][kh*kw] */
__host__ __device__ __forceinline__ int64_t
ig_khwc_src (int64_t i, int Cin, int khw)
{
  const int64_t K = (int64_t) Cin * khw;
  const int64_t co = i / K;
  const int rem = (int) (i - co * K), r = rem / Cin, ci = rem - r * Cin;
  return (co * Cin + ci) * khw + r;
}

template <typename T>
__global__ void __launch_bounds__ (256, 2)   /* <= 128 registers: two blocks per SM */
k_conv_igemm (IgArgs<T> a)
{
  using namespace nvcuda;
  __shared__ __align__ (128) T As[IG_BM * IG_LD];   /* [m][k] */
  __shared__ __align__ (128) T Bs[IG_BN * IG_LD];   /* [n][k] */
  __shared__ __align__ (128) float Cs[8 * 256];     /* one 16x16 f32 tile per warp (epilogue) */

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int m0 = blockIdx.y * IG_BM, n0 = blockIdx.x * IG_BN;
  IgSlots<T> sl;
  sl.init (a, tid, m0, n0);
  uint4 ra[2], rb[2];

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < 2; j++)
      wmma::fill_fragment (acc[i][j], 0.0f);
  const int wm = warp >> 2, wn = warp & 3;   /* this warp: rows wm*64.., columns wn*32.. */
  const int nk_all = (a.K + IG_BK - 1) / IG_BK;
  const int kt0 = a.ws ? (int) blockIdx.z * a.ksteps : 0;
  const int nk = a.ws ? min (nk_all, kt0 + a.ksteps) : nk_all;

  sl.load (a, m0, kt0 * IG_BK, ra, rb);
  for (int kt = kt0; kt < nk; kt++) {
    __syncthreads ();   /* the previous step's tiles are consumed */
    sl.stage (As, Bs, ra, rb);
    __syncthreads ();
    if (kt + 1 < nk)
      sl.load (a, m0, (kt + 1) * IG_BK, ra, rb);   /* in flight while the tensor cores work */
#pragma unroll
    for (int kk = 0; kk < IG_BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 4; i++)
        wmma::load_matrix_sync (fa[i], As + (wm * 64 + i * 16) * IG_LD + kk, IG_LD);
#pragma unroll
      for (int j = 0; j < 2; j++)
        wmma::load_matrix_sync (fb[j], Bs + (wn * 32 + j * 16) * IG_LD + kk, IG_LD);
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 2; j++)
          wmma::mma_sync (acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  /* epilogue: each accumulator through this warp's shared 16x16 tile */
  float *cs = Cs + warp * 256;
#pragma unroll   /* constant indices: acc stays in registers */
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < 2; j++) {
      wmma::store_matrix_sync (cs, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp ();
      if (a.ws)
        ig_partial_lane (a, cs, lane, m0 + wm * 64 + i * 16, n0 + wn * 32 + j * 16, (int) blockIdx.z);
      else
        ig_epilogue_lane (a, cs, lane, m0 + wm * 64 + i * 16, n0 + wn * 32 + j * 16);
      __syncwarp ();
    }
}

template <typename T>
__global__ void
k_igemm_reduce (IgArgs<T> a, int splits, int64_t total)
{
  for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < total; i += (int64_t) gridDim.x * blockDim.x)
    ig_reduce_one (a, splits, i);
}

/* x [N][C][H][W] (any strides, 16-bit elements) -> xt [N][H][W][C], through
 * 32 x 33 shared tiles: both the reads (along H*W) and the writes (along C)
 * coalesced when x is contiguous.  grid (ceil (HW / 32), ceil (C / 32), N),
 * block (32, 8). */
__global__ void
k_nchw_to_nhwc (uint16_t *xt, const uint16_t *x, int64_t s0, int64_t s1, int64_t s2, int64_t s3, int C, int W,
                int HW)
{
  __shared__ uint16_t tile[32][33];
  const int n = blockIdx.z, p0 = blockIdx.x * 32, c0 = blockIdx.y * 32;
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int j = ty; j < 32; j += 8) {
    const int c = c0 + j, p = p0 + tx;
    if (c < C && p < HW) {
      const int yy = p / W, xx = p - yy * W;
      tile[j][tx] = x[n * s0 + c * s1 + yy * s2 + xx * s3];
    }
  }
  __syncthreads ();
  for (int j = ty; j < 32; j += 8) {
    const int p = p0 + j, c = c0 + tx;
    if (p < HW && c < C)
      xt[((int64_t) n * HW + p) * C + c] = tile[tx][j];
  }
}

/* w [Cout][Cin][kh*kw] -> wt [Cout][kh*kw][Cin] (16-bit elements) */
__global__ void
k_weight_khwc (uint16_t *wt, const uint16_t *w, int64_t total, int Cin, int khw)
{
  for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < total; i += (int64_t) gridDim.x * blockDim.x)
    wt[i] = w[ig_khwc_src (i, Cin, khw)];
}

/* DIFFUSE_CUDA_CONV: which convolutions take the implicit GEMM.  implicit:
 * every one it can compute (grids smaller than the GPU split K, see
 * igemm_splits); auto (the default: unset or any other value): those whose
 * grid covers every SM at least once (smaller ones — the UNet's 8x8 .. 32x32
 * levels — keep im2col + cuBLAS); im2col: none. */
typedef enum { IG_OFF, IG_IMPLICIT, IG_AUTO } IgMode;

static IgMode
igemm_mode (void)
{
  const char *e = g_getenv ("DIFFUSE_CUDA_CONV");
  return !e ? IG_AUTO : strcmp (e, "implicit") == 0 ? IG_IMPLICIT : strcmp (e, "im2col") == 0 ? IG_OFF : IG_AUTO;
}

/* blocks of the implicit GEMM's grid without a split */
static int64_t
ig_blocks (int64_t NP, int64_t M)
{
  return ((NP + IG_BN - 1) / IG_BN) * ((M + IG_BM - 1) / IG_BM);
}

static gboolean
igemm_ok (CudaCtx *c, IgMode mode, int dt, const ConvGeom &g, int64_t N, int64_t Cout)
{
  if (mode == IG_OFF || (dt != DIFFUSE_DTYPE_F16 && dt != DIFFUSE_DTYPE_BF16) || g.Cin % 8 != 0)
    return FALSE;
  const int64_t NP = N * g.P;
  if (g.K > G_MAXINT || NP > G_MAXINT - IG_BN || g.H * g.W > G_MAXINT || Cout > (int64_t) 65535 * IG_BM ||
      N > 65535)
    return FALSE;
  return mode != IG_AUTO || ig_blocks (NP, Cout) >= c->sm_count;
}

/* Splits of K under IG_IMPLICIT when the grid has fewer blocks than two per
 * SM: enough to reach two per SM, each split >= 4 K steps, at most 64.
 * 1: no split. */
static int
igemm_splits (CudaCtx *c, IgMode mode, int64_t NP, int64_t M, int nk)
{
  const int64_t blocks = ig_blocks (NP, M), target = 2 * (int64_t) MAX (c->sm_count, 1);
  if (mode != IG_IMPLICIT || blocks >= target)
    return 1;
  int64_t want = (target + blocks - 1) / blocks;
  want = MIN (want, MIN ((int64_t) 64, (int64_t) nk / 4));
  return (int) MAX (want, (int64_t) 1);
}

template <typename T>
static gboolean
launch_igemm (CudaCtx *c, IgMode mode, IgArgs<T> a, GError **error)
{
  const int nk = (a.K + IG_BK - 1) / IG_BK;
  int ksteps = nk;
  const int splits = ig_split (nk, igemm_splits (c, mode, a.NP, a.M, nk), &ksteps);
  void *ws = NULL;
  if (splits > 1) {
    ws = dcu_scratch (c, (size_t) splits * a.M * a.NP * sizeof (float), error);
    if (!ws)
      return FALSE;
    a.ws = (float *) ws;
    a.ksteps = ksteps;
  }
  dim3 grid ((unsigned) ((a.NP + IG_BN - 1) / IG_BN), (unsigned) ((a.M + IG_BM - 1) / IG_BM), (unsigned) splits);
  k_conv_igemm<T><<<grid, 256, 0, c->stream>>> (a);
  gboolean ok = dcu_check_launch (error, "conv2d (implicit GEMM)");
  if (ok && splits > 1) {
    const int64_t total = (int64_t) a.M * a.NP;
    k_igemm_reduce<T><<<dcu_blocks (c, total), 256, 0, c->stream>>> (a, splits, total);
    ok = dcu_check_launch (error, "conv2d (implicit GEMM, split-K sum)");
  }
  dcu_scratch_free (c, ws);
  return ok;
}

static gboolean
conv_igemm (CudaCtx *c, IgMode mode, DiffuseTensor *out, DiffuseTensor *x, DiffuseTensor *wc, DiffuseTensor *b,
            const ConvGeom &g, GError **error)
{
  const int dt = out->dtype;
  const int64_t N = x->shape[0], Cout = wc->shape[0], khw = g.kh * g.kw;
  gboolean ok = FALSE;
  void *xt = NULL, *wt = NULL;
  DiffuseTensor *bf = NULL;
  DiffuseTensor *xs = (int) x->dtype == dt ? diffuse_tensor_ref (x) : dcu_contig (x, dt, error);
  if (!xs)
    return FALSE;
  xt = dcu_scratch (c, (size_t) (N * g.Cin * g.H * g.W) * 2, error);
  wt = xt ? dcu_scratch (c, (size_t) (Cout * g.K) * 2, error) : NULL;
  if (!wt)
    goto done;
  if (b) {
    bf = dcu_contig (b, DIFFUSE_DTYPE_F32, error);
    if (!bf)
      goto done;
  }
  {
    const int HW = (int) (g.H * g.W);
    dim3 tgrid ((unsigned) ((HW + 31) / 32), (unsigned) ((g.Cin + 31) / 32), (unsigned) N);
    k_nchw_to_nhwc<<<tgrid, dim3 (32, 8), 0, c->stream>>> ((uint16_t *) xt, (const uint16_t *) dcu_ptr (xs),
                                                          xs->stride[0], xs->stride[1], xs->stride[2], xs->stride[3],
                                                          (int) g.Cin, (int) g.W, HW);
    if (!dcu_check_launch (error, "conv2d (channels-last input)"))
      goto done;
    const int64_t wtotal = Cout * g.K;
    k_weight_khwc<<<dcu_blocks (c, wtotal), 256, 0, c->stream>>> ((uint16_t *) wt, (const uint16_t *) dcu_ptr (wc),
                                                                    wtotal, (int) g.Cin, (int) khw);
    if (!dcu_check_launch (error, "conv2d (weight reorder)"))
      goto done;
  }
  if (dt == DIFFUSE_DTYPE_F16) {
    IgArgs<__half> a = { (const __half *) xt, (const __half *) wt, bf ? (const float *) dcu_ptr (bf) : NULL,
                         (__half *) dcu_ptr (out), (int) Cout, (int) g.K, (int) g.Cin, (int) g.H, (int) g.W,
                         (int) g.kw, (int) g.Wo, g.sh, g.sw, g.ph, g.pw, (int) g.P, (int) (N * g.P), NULL, 0 };
    ok = launch_igemm (c, mode, a, error);
  } else {
    IgArgs<__nv_bfloat16> a = { (const __nv_bfloat16 *) xt, (const __nv_bfloat16 *) wt,
                                bf ? (const float *) dcu_ptr (bf) : NULL, (__nv_bfloat16 *) dcu_ptr (out),
                                (int) Cout, (int) g.K, (int) g.Cin, (int) g.H, (int) g.W, (int) g.kw, (int) g.Wo,
                                g.sh, g.sw, g.ph, g.pw, (int) g.P, (int) (N * g.P), NULL, 0 };
    ok = launch_igemm (c, mode, a, error);
  }
done:
  dcu_scratch_free (c, xt);
  dcu_scratch_free (c, wt);
  diffuse_tensor_clear (&bf);
  diffuse_tensor_unref (xs);
  return ok;
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
  const IgMode mode = igemm_mode ();
  if (!(pointwise && x->dtype == dt && diffuse_tensor_is_contiguous (x)) && igemm_ok (c, mode, dt, g, N, Cout)) {
    ok = conv_igemm (c, mode, out, x, wc, b, g, error);   /* bias added in its epilogue */
    diffuse_tensor_unref (wc);
    return ok;
  }
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

/* ---- the implicit GEMM on the host (tests) ------------------------------ */

template <typename T>
static float
to_f32 (T v)
{
  return (float) v;
}

/* Every block of the grid, in turn: the 256 threads' slots, loads and
 * staging as the kernel does them (IgSlots), the eight warps' 4 x 2 WMMA
 * tiles by loops over the shared tiles, the epilogue per lane. */
template <typename T>
static void
igemm_emulate (IgArgs<T> a, int want_splits)
{
  const int gx = (a.NP + IG_BN - 1) / IG_BN, gy = (a.M + IG_BM - 1) / IG_BM;
  const int nk_all = (a.K + IG_BK - 1) / IG_BK;
  int ksteps = nk_all;
  const int splits = ig_split (nk_all, want_splits, &ksteps);
  if (splits > 1) {
    a.ws = g_new (float, (int64_t) splits * a.M * a.NP);
    a.ksteps = ksteps;
  }
  T *As = g_new0 (T, IG_BM * IG_LD), *Bs = g_new0 (T, IG_BN * IG_LD);
  float *acc = g_new (float, IG_BM * IG_BN);
  float cs[256];
  IgSlots<T> *sl = g_new (IgSlots<T>, 256);
  for (int bz = 0; bz < splits; bz++)
  for (int by = 0; by < gy; by++)
    for (int bx = 0; bx < gx; bx++) {
      const int m0 = by * IG_BM, n0 = bx * IG_BN;
      const int kt0 = a.ws ? bz * a.ksteps : 0;
      const int nk = a.ws ? MIN (nk_all, kt0 + a.ksteps) : nk_all;
      for (int tid = 0; tid < 256; tid++)
        sl[tid].init (a, tid, m0, n0);
      memset (acc, 0, sizeof (float) * IG_BM * IG_BN);
      for (int kt = kt0; kt < nk; kt++) {
        for (int tid = 0; tid < 256; tid++) {
          uint4 ra[2], rb[2];
          sl[tid].load (a, m0, kt * IG_BK, ra, rb);
          sl[tid].stage (As, Bs, ra, rb);
        }
        for (int warp = 0; warp < 8; warp++) {
          const int wm = warp >> 2, wn = warp & 3;
          for (int kk = 0; kk < IG_BK; kk += 16)
            for (int i = 0; i < 4; i++)
              for (int j = 0; j < 2; j++)
                for (int r = 0; r < 16; r++)
                  for (int c = 0; c < 16; c++) {
                    const T *ar = As + (wm * 64 + i * 16 + r) * IG_LD + kk;   /* row_major A */
                    const T *bc = Bs + (wn * 32 + j * 16 + c) * IG_LD + kk;   /* col_major B */
                    float sum = 0.0f;
                    for (int t = 0; t < 16; t++)
                      sum += to_f32 (ar[t]) * to_f32 (bc[t]);
                    acc[(wm * 64 + i * 16 + r) * IG_BN + wn * 32 + j * 16 + c] += sum;
                  }
        }
      }
      for (int warp = 0; warp < 8; warp++) {
        const int wm = warp >> 2, wn = warp & 3;
        for (int i = 0; i < 4; i++)
          for (int j = 0; j < 2; j++) {
            for (int r = 0; r < 16; r++)
              for (int c = 0; c < 16; c++)
                cs[r * 16 + c] = acc[(wm * 64 + i * 16 + r) * IG_BN + wn * 32 + j * 16 + c];
            for (int lane = 0; lane < 32; lane++)
              if (a.ws)
                ig_partial_lane (a, cs, lane, m0 + wm * 64 + i * 16, n0 + wn * 32 + j * 16, bz);
              else
                ig_epilogue_lane (a, cs, lane, m0 + wm * 64 + i * 16, n0 + wn * 32 + j * 16);
          }
      }
    }
  if (a.ws) {
    for (int64_t i = 0; i < (int64_t) a.M * a.NP; i++)
      ig_reduce_one (a, splits, i);
    g_free (a.ws);
  }
  g_free (As);
  g_free (Bs);
  g_free (acc);
  g_free (sl);
}

extern "C" DiffuseTensor *
_diffuse_cuda_conv_igemm_emulate (DiffuseTensor *x, DiffuseTensor *w, DiffuseTensor *b, int sh, int sw, int ph,
                                  int pw, int splits)
{
  g_return_val_if_fail (x && w && x->ndim == 4 && w->ndim == 4, NULL);
  const int dt = x->dtype;
  if ((dt != DIFFUSE_DTYPE_F16 && dt != DIFFUSE_DTYPE_BF16) || (int) w->dtype != dt || x->shape[1] % 8 != 0 ||
      w->shape[1] != x->shape[1] || !diffuse_device_is_cpu (x->storage->dev) ||
      !diffuse_device_is_cpu (w->storage->dev))
    return NULL;
  const int N = (int) x->shape[0], Cin = (int) x->shape[1], H = (int) x->shape[2], W = (int) x->shape[3];
  const int Cout = (int) w->shape[0], kh = (int) w->shape[2], kw = (int) w->shape[3], khw = kh * kw;
  const int Ho = (H + 2 * ph - kh) / sh + 1, Wo = (W + 2 * pw - kw) / sw + 1;
  if (Ho < 1 || Wo < 1)
    return NULL;
  DiffuseTensor *xc = diffuse_contiguous (x), *wc = diffuse_contiguous (w);
  DiffuseTensor *bf = NULL;
  if (b) {
    DiffuseTensor *b32 = diffuse_cast (b, DIFFUSE_DTYPE_F32);
    bf = diffuse_contiguous (b32);
    diffuse_tensor_clear (&b32);
  }
  int64_t oshape[4] = { N, Cout, Ho, Wo };
  DiffuseTensor *out = diffuse_tensor_new (diffuse_device_cpu (), (DiffuseDType) dt, 4, oshape);
  const int64_t K = (int64_t) khw * Cin;
  uint16_t *xt = g_new (uint16_t, (int64_t) N * Cin * H * W);
  uint16_t *wt = g_new (uint16_t, Cout * K);
  const uint16_t *xs = (const uint16_t *) dcu_ptr (xc), *ws = (const uint16_t *) dcu_ptr (wc);
  for (int n = 0; n < N; n++)
    for (int c = 0; c < Cin; c++)
      for (int p = 0; p < H * W; p++)
        xt[((int64_t) n * H * W + p) * Cin + c] = xs[((int64_t) n * Cin + c) * H * W + p];
  for (int64_t i = 0; i < Cout * K; i++)
    wt[i] = ws[ig_khwc_src (i, Cin, khw)];
  const float *bias = bf ? (const float *) dcu_ptr (bf) : NULL;
  if (dt == DIFFUSE_DTYPE_F16) {
    IgArgs<__half> a = { (const __half *) xt, (const __half *) wt, bias, (__half *) dcu_ptr (out), Cout, (int) K,
                         Cin, H, W, kw, Wo, sh, sw, ph, pw, Ho * Wo, N * Ho * Wo, NULL, 0 };
    igemm_emulate (a, splits);
  } else {
    IgArgs<__nv_bfloat16> a = { (const __nv_bfloat16 *) xt, (const __nv_bfloat16 *) wt, bias,
                                (__nv_bfloat16 *) dcu_ptr (out), Cout, (int) K, Cin, H, W, kw, Wo, sh, sw, ph, pw,
                                Ho * Wo, N * Ho * Wo, NULL, 0 };
    igemm_emulate (a, splits);
  }
  g_free (xt);
  g_free (wt);
  diffuse_tensor_unref (xc);
  diffuse_tensor_unref (wc);
  diffuse_tensor_clear (&bf);
  return out;
}
