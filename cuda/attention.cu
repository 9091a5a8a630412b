/* gst-diffuse — CUDA backend: fused scaled dot-product attention.
 *
 * Flash-style: a block owns BM query rows of one (batch, head) — one thread
 * per row — and walks the keys in tiles of BN, keeping the running max m,
 * the running sum l and the output accumulator in f32 (online softmax), so
 * no Lq x Lk matrix ever exists in global memory.  Q rows and accumulators
 * live in shared memory laid out [d][row] (consecutive threads hit
 * consecutive banks); the K/V tile is [key][d] (every thread reads the same
 * word: a broadcast).  Inputs of any dtype and strides, widened to f32.
 * Semantics are the CPU backend's: scores = scale * q.k + mask, causal keys
 * after the query masked, a row with every key masked gives zeros.
 *
 * Two kernels: the simple one below (CUDA cores, f32 FMA, any dtype, head
 * dims up to what shared memory holds) and a tensor-core one (WMMA,
 * f16/bf16 with D == Dv <= 256), used for f16/bf16 unless
 * DIFFUSE_CUDA_ATTN=simple.  Head dims neither holds (the VAE's 512) take an
 * unfused cuBLAS path (sdpa_unfused; DIFFUSE_CUDA_ATTN=unfused forces it). */
#include "common.cuh"
#include <string.h>

#define BM 64
#define BN 32

struct AttnArgs {
  const char *q, *k, *v, *mask;
  int qdt, kdt, vdt, mdt;
  int64_t qs[4], ks[4], vs[4], ms[4];
  int64_t H, Lq, Lk, D, Dv;
  float scale;
  int causal;
  char *o;
  int odt;
};

__global__ void __launch_bounds__ (BM)
k_attention (AttnArgs a)
{
  extern __shared__ float smem[];
  float *qs = smem;                       /* [D][BM] */
  float *acc = qs + a.D * BM;             /* [Dv][BM] */
  float *kt = acc + a.Dv * BM;            /* [BN][D] */
  float *vt = kt + BN * a.D;              /* [BN][Dv] */

  const int t = threadIdx.x;
  const int64_t bh = blockIdx.y;
  const int64_t b = bh / a.H, h = bh - b * a.H;
  const int64_t row = (int64_t) blockIdx.x * BM + t;
  const bool active = row < a.Lq;

  const int64_t qb = b * a.qs[0] + h * a.qs[1];
  const int64_t kb = b * a.ks[0] + h * a.ks[1];
  const int64_t vb = b * a.vs[0] + h * a.vs[1];
  const int64_t mb = b * a.ms[0] + h * a.ms[1] + row * a.ms[2];

  for (int64_t d = 0; d < a.D; d++)
    qs[d * BM + t] = active ? ldf (a.q, a.qdt, qb + row * a.qs[2] + d * a.qs[3]) : 0.0f;
  for (int64_t d = 0; d < a.Dv; d++)
    acc[d * BM + t] = 0.0f;

  float m = -INFINITY, l = 0.0f;
  int64_t kv_end = a.Lk;
  if (a.causal) {
    /* keys after the block's last row are masked for every row of the block */
    int64_t last = MIN ((int64_t) blockIdx.x * BM + BM - 1, a.Lq - 1);
    kv_end = MIN (a.Lk, last + 1);
  }

  for (int64_t kv0 = 0; kv0 < kv_end; kv0 += BN) {
    __syncthreads ();   /* the previous tile is consumed */
    for (int64_t i = t; i < BN * a.D; i += BM) {
      int64_t j = i / a.D, d = i - j * a.D, key = kv0 + j;
      kt[i] = key < a.Lk ? ldf (a.k, a.kdt, kb + key * a.ks[2] + d * a.ks[3]) : 0.0f;
    }
    for (int64_t i = t; i < BN * a.Dv; i += BM) {
      int64_t j = i / a.Dv, d = i - j * a.Dv, key = kv0 + j;
      vt[i] = key < a.Lk ? ldf (a.v, a.vdt, vb + key * a.vs[2] + d * a.vs[3]) : 0.0f;
    }
    __syncthreads ();
    if (!active)
      continue;

    float s[BN];
#pragma unroll
    for (int j = 0; j < BN; j++)
      s[j] = 0.0f;
    for (int64_t d = 0; d < a.D; d++) {
      const float qd = qs[d * BM + t];
#pragma unroll
      for (int j = 0; j < BN; j++)
        s[j] += qd * kt[j * a.D + d];
    }
    float mt = -INFINITY;
#pragma unroll
    for (int j = 0; j < BN; j++) {
      const int64_t key = kv0 + j;
      float v = s[j] * a.scale;
      if (key >= a.Lk || (a.causal && key > row))
        v = -INFINITY;
      else if (a.mask)
        v += ldf (a.mask, a.mdt, mb + key * a.ms[3]);
      s[j] = v;
      mt = fmaxf (mt, v);
    }
    const float mn = fmaxf (m, mt);
    if (mn == -INFINITY)
      continue;   /* every key so far masked */
    const float corr = expf (m - mn);   /* m = -inf: 0, and acc is still 0 */
    float ps = 0.0f;
#pragma unroll
    for (int j = 0; j < BN; j++) {
      s[j] = expf (s[j] - mn);
      ps += s[j];
    }
    l = l * corr + ps;
    for (int64_t d = 0; d < a.Dv; d++) {
      float x = acc[d * BM + t] * corr;
#pragma unroll
      for (int j = 0; j < BN; j++)
        x += s[j] * vt[j * a.Dv + d];
      acc[d * BM + t] = x;
    }
    m = mn;
  }

  if (!active)
    return;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  const int64_t ob = (bh * a.Lq + row) * a.Dv;
  for (int64_t d = 0; d < a.Dv; d++)
    stf (a.o, a.odt, ob + d, acc[d * BM + t] * inv);
}

/* ---- tensor-core path (f16/bf16, WMMA 16x16x16, f32 accumulation) ----------
 *
 * A block of 4 warps owns WM = 64 query rows (16 per warp) of one (b, h)
 * and walks the keys in tiles of WN = 64.  Per tile: S = Q K^T on the tensor
 * cores (f32 accumulators, stored to shared memory), then each warp's lanes
 * 0..15 run the online softmax of its 16 rows (running max m, sum l in f32;
 * P rounded to the input type, as FlashAttention does), then P V on the
 * tensor cores, added into the f32 output tile O after O is rescaled by the
 * row's correction.  Head dims are padded with zeros to DP, a multiple of
 * 16 (SD 1.5's 40 -> 48); D == Dv <= 256 (191 KiB of shared memory at 256).  Every shared-memory region's
 * offset is a multiple of 256 bytes, and every WMMA pointer a multiple of 32
 * bytes (rows of 16, column blocks of 16). */
#include <mma.h>

#define WM 64
#define WN 64
#define WT 128   /* threads: 4 warps */
#define SP (WN + 4)   /* row stride of S (floats): lanes walking rows hit 8 banks, not 1 */
#define PP (WN + 8)   /* row stride of P (16-bit elements), same reason */

static size_t
wmma_smem (int64_t DP)
{
  return (size_t) (WM * DP * 2 + 2 * WN * DP * 2 + WM * SP * 4 + WM * PP * 2 + WM * DP * 4 + 3 * WM * 4);
}

template <typename T>
__global__ void __launch_bounds__ (WT)
k_attention_wmma (AttnArgs a, int DP)
{
  using namespace nvcuda;
  extern __shared__ __align__ (128) unsigned char sm[];
  T *Qs = (T *) sm;                                   /* [WM][DP] */
  T *Ks = Qs + WM * DP;                               /* [WN][DP] */
  T *Vs = Ks + WN * DP;                               /* [WN][DP] */
  float *S = (float *) (Vs + WN * DP);                /* [WM][SP] */
  T *P = (T *) (S + WM * SP);                         /* [WM][PP] */
  float *O = (float *) (P + WM * PP);                 /* [WM][DP] */
  float *mrow = O + WM * DP, *lrow = mrow + WM, *crow = lrow + WM;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t bh = blockIdx.y;
  const int64_t b = bh / a.H, h = bh - b * a.H;
  const int64_t q0 = (int64_t) blockIdx.x * WM;
  const int64_t qb = b * a.qs[0] + h * a.qs[1];
  const int64_t kb = b * a.ks[0] + h * a.ks[1];
  const int64_t vb = b * a.vs[0] + h * a.vs[1];
  const T *qp = (const T *) a.q, *kp = (const T *) a.k, *vp = (const T *) a.v;
  const T zero = from_f<T> (0.0f);

  for (int i = tid; i < WM * DP; i += WT) {
    int r = i / DP, d = i - r * DP;
    int64_t row = q0 + r;
    Qs[i] = (row < a.Lq && d < a.D) ? qp[qb + row * a.qs[2] + d * a.qs[3]] : zero;
    O[i] = 0.0f;
  }
  for (int i = tid; i < WM; i += WT) {
    mrow[i] = -INFINITY;
    lrow[i] = 0.0f;
  }

  int64_t kv_end = a.Lk;
  if (a.causal)
    kv_end = MIN (a.Lk, MIN (q0 + WM - 1, a.Lq - 1) + 1);

  const int ktiles = DP / 16;
  for (int64_t kv0 = 0; kv0 < kv_end; kv0 += WN) {
    __syncthreads ();   /* previous K/V consumed (and Q/O/stats written, first time) */
    for (int i = tid; i < WN * DP; i += WT) {
      int j = i / DP, d = i - j * DP;
      int64_t key = kv0 + j;
      bool in = key < a.Lk && d < a.D;
      Ks[i] = in ? kp[kb + key * a.ks[2] + d * a.ks[3]] : zero;
      Vs[i] = in ? vp[vb + key * a.vs[2] + d * a.vs[3]] : zero;
    }
    __syncthreads ();

    /* S[warp rows][0..WN) = Q K^T */
    for (int n = 0; n < WN / 16; n++) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment (acc, 0.0f);
      for (int k = 0; k < ktiles; k++) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync (fa, Qs + (warp * 16) * DP + k * 16, DP);
        wmma::load_matrix_sync (fb, Ks + (n * 16) * DP + k * 16, DP);
        wmma::mma_sync (acc, fa, fb, acc);
      }
      wmma::store_matrix_sync (S + (warp * 16) * SP + n * 16, acc, SP, wmma::mem_row_major);
    }
    __syncwarp ();

    /* online softmax of the warp's 16 rows: two lanes per row (lanes 2r and
     * 2r + 1), each over half of the tile's keys, max and sum combined by a
     * shuffle; the row's pair agrees on mn, so the branch below is uniform
     * per pair and every lane reaches both shuffles */
    {
      const int r = warp * 16 + (lane >> 1), j0 = (lane & 1) * (WN / 2);
      const int64_t row = q0 + r;
      float *sr = S + r * SP;
      T *pr = P + r * PP;
      const float m = mrow[r];
      float mt = -INFINITY;
      const int64_t mb = b * a.ms[0] + h * a.ms[1] + row * a.ms[2];
      for (int j = j0; j < j0 + WN / 2; j++) {
        const int64_t key = kv0 + j;
        float v = sr[j] * a.scale;
        if (row >= a.Lq || key >= a.Lk || (a.causal && key > row))
          v = -INFINITY;
        else if (a.mask)
          v += ldf (a.mask, a.mdt, mb + key * a.ms[3]);
        sr[j] = v;
        mt = fmaxf (mt, v);
      }
      mt = fmaxf (mt, __shfl_xor_sync (0xffffffffu, mt, 1));
      const float mn = fmaxf (m, mt);
      float ps = 0.0f, corr = 1.0f;
      if (mn == -INFINITY) {
        for (int j = j0; j < j0 + WN / 2; j++)
          pr[j] = zero;
      } else {
        corr = expf (m - mn);
        for (int j = j0; j < j0 + WN / 2; j++) {
          float pj = expf (sr[j] - mn);
          ps += pj;
          pr[j] = from_f<T> (pj);
        }
      }
      ps += __shfl_xor_sync (0xffffffffu, ps, 1);
      __syncwarp ();   /* both lanes have read mrow[r] */
      if ((lane & 1) == 0) {
        if (mn != -INFINITY) {
          lrow[r] = lrow[r] * corr + ps;
          mrow[r] = mn;
        }
        crow[r] = corr;
      }
    }
    __syncwarp ();

    /* O = O * corr + P V, one 16-column block of the head dim at a time */
    float *scratch = S + (warp * 16) * SP;   /* this warp's S rows are consumed */
    for (int dt = 0; dt < ktiles; dt++) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment (acc, 0.0f);
      for (int k = 0; k < WN / 16; k++) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync (fa, P + (warp * 16) * PP + k * 16, PP);
        wmma::load_matrix_sync (fb, Vs + (k * 16) * DP + dt * 16, DP);
        wmma::mma_sync (acc, fa, fb, acc);
      }
      wmma::store_matrix_sync (scratch, acc, SP, wmma::mem_row_major);
      __syncwarp ();
      for (int e = lane; e < 256; e += 32) {
        int rr = e >> 4, cc = e & 15;
        int r = warp * 16 + rr;
        float *o = O + r * DP + dt * 16 + cc;
        *o = *o * crow[r] + scratch[rr * SP + cc];
      }
      __syncwarp ();
    }
  }
  __syncthreads ();

  T *op = (T *) a.o;
  for (int i = tid; i < WM * a.D; i += WT) {
    int r = (int) (i / a.D);
    int64_t d = i - (int64_t) r * a.D, row = q0 + r;
    if (row >= a.Lq)
      continue;
    float l = lrow[r];
    float v = l > 0.0f ? O[r * DP + d] / l : 0.0f;
    op[(bh * a.Lq + row) * a.Dv + d] = from_f<T> (v);
  }
}

static gboolean
use_wmma (CudaCtx *c, DiffuseTensor *out, DiffuseTensor *q, DiffuseTensor *k, DiffuseTensor *v)
{
  if (out->dtype == DIFFUSE_DTYPE_F32 || q->dtype != out->dtype || k->dtype != out->dtype || v->dtype != out->dtype)
    return FALSE;
  if (q->shape[3] != v->shape[3] || q->shape[3] > 256 || wmma_smem ((q->shape[3] + 15) / 16 * 16) > c->smem_optin)
    return FALSE;
  const char *e = g_getenv ("DIFFUSE_CUDA_ATTN");
  return !(e && (strcmp (e, "simple") == 0 || strcmp (e, "unfused") == 0));
}

template <typename T>
static gboolean
launch_wmma (CudaCtx *c, const AttnArgs &a, int64_t BH, GError **error)
{
  const int DP = (int) ((a.D + 15) / 16 * 16);
  const size_t smem = wmma_smem (DP);
  if (smem > c->smem_optin) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "attention: %zu bytes of shared memory needed",
                 smem);
    return FALSE;
  }
  if (smem > 48 * 1024)
    DCU_TRY (cudaFuncSetAttribute (k_attention_wmma<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem),
             "attention smem");
  dim3 grid ((unsigned) ((a.Lq + WM - 1) / WM), (unsigned) BH);
  k_attention_wmma<T><<<grid, WT, smem, c->stream>>> (a, DP);
  return dcu_check_launch (error, "attention (tensor cores)");
}

/* ---- unfused path for head dims the fused kernels cannot hold ------------
 * (the VAE's mid-block attention: one head of 512 channels).  S = scale *
 * Q K^T in f32 through cuBLAS, mask + causal + softmax in f32 (one block per
 * row), P in the output dtype, O = P V through cuBLAS, as torch's math SDPA.
 * Query rows go in chunks so S and P stay under UNFUSED_BYTES. */
#define UNFUSED_BYTES ((size_t) 256 << 20)
#define SM_NT 256

__device__ static float
sm_block_reduce (float v, bool is_max)
{
  __shared__ float sh[SM_NT / 32];
  for (int o = 16; o > 0; o >>= 1) {
    float w = __shfl_xor_sync (0xffffffffu, v, o);
    v = is_max ? fmaxf (v, w) : v + w;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0)
    sh[warp] = v;
  __syncthreads ();
  float r = is_max ? -INFINITY : 0.0f;
  for (int i = 0; i < (int) (blockDim.x >> 5); i++)
    r = is_max ? fmaxf (r, sh[i]) : r + sh[i];
  __syncthreads ();
  return r;
}

/* row (bh, r0 + i) of S [BH][rows][Lk] (f32) -> P (dtype pdt), mask added,
 * keys after the query masked when causal; a fully masked row gives zeros */
__global__ void __launch_bounds__ (SM_NT)
k_attn_softmax (const float *S, char *P, int pdt, const char *mask, int mdt, int64_t ms0, int64_t ms1, int64_t ms2,
                int64_t ms3, int64_t H, int64_t rows, int64_t r0, int64_t Lk, int causal)
{
  const int64_t i = blockIdx.x, bh = blockIdx.y, b = bh / H, h = bh - b * H, q = r0 + i;
  const float *row = S + (bh * rows + i) * Lk;
  const int64_t pbase = (bh * rows + i) * Lk;
  const int64_t n = causal ? MIN (Lk, q + 1) : Lk;
  const int64_t mo = b * ms0 + h * ms1 + q * ms2;
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
    m = fmaxf (m, row[j] + (mask ? ldf (mask, mdt, mo + j * ms3) : 0.0f));
  m = sm_block_reduce (m, true);
  if (m == -INFINITY) {
    for (int64_t j = threadIdx.x; j < Lk; j += blockDim.x)
      stf (P, pdt, pbase + j, 0.0f);
    return;
  }
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
    sum += expf (row[j] + (mask ? ldf (mask, mdt, mo + j * ms3) : 0.0f) - m);
  const float inv = 1.0f / sm_block_reduce (sum, false);
  for (int64_t j = threadIdx.x; j < Lk; j += blockDim.x)
    stf (P, pdt, pbase + j,
         j < n ? expf (row[j] + (mask ? ldf (mask, mdt, mo + j * ms3) : 0.0f) - m) * inv : 0.0f);
}

static gboolean
sdpa_unfused (CudaCtx *c, DiffuseTensor *out, DiffuseTensor *q, DiffuseTensor *k, DiffuseTensor *v,
              DiffuseTensor *mask, gboolean causal, float scale, GError **error)
{
  const int dt = out->dtype;
  const int64_t B = q->shape[0], H = q->shape[1], Lq = q->shape[2], Lk = k->shape[2], D = q->shape[3],
                Dv = v->shape[3], BH = B * H;
  const size_t es = diffuse_dtype_size ((DiffuseDType) dt);
  if (BH > 65535) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                 "attention on %s: %" G_GINT64_FORMAT " batch*heads (at most 65535)", diffuse_device_name (c->dev), BH);
    return FALSE;
  }
  const size_t per_row = (size_t) BH * Lk * (sizeof (float) + es);
  int64_t rows = (int64_t) MAX ((size_t) 1, UNFUSED_BYTES / MAX (per_row, (size_t) 1));
  rows = MIN (rows, Lq);
  rows = MIN (rows, (int64_t) 65535);
  DiffuseTensor *qc = dcu_contig (q, dt, error);
  DiffuseTensor *kc = qc ? dcu_contig (k, dt, error) : NULL;
  DiffuseTensor *vc = kc ? dcu_contig (v, dt, error) : NULL;
  float *S = vc ? (float *) dcu_scratch (c, (size_t) BH * rows * Lk * sizeof (float), error) : NULL;
  char *P = S ? (char *) dcu_scratch (c, (size_t) BH * rows * Lk * es, error) : NULL;
  gboolean ok = P != NULL;
  for (int64_t r0 = 0; ok && r0 < Lq; r0 += rows) {
    const int64_t m = MIN (rows, Lq - r0);
    /* S^T[Lk, m] (column-major) = K[Lk, D] . Q[r0:r0+m, D]^T */
    ok = dcu_gemm_ex (c, dt, DIFFUSE_DTYPE_F32, TRUE, FALSE, Lk, m, D, scale, dcu_ptr (kc), D, Lk * D,
                      dcu_ptr (qc) + (size_t) r0 * D * es, D, Lq * D, 0.0f, S, Lk, rows * Lk, BH, error);
    if (!ok)
      break;
    dim3 grid ((unsigned) m, (unsigned) BH);
    k_attn_softmax<<<grid, SM_NT, 0, c->stream>>> (S, P, dt, mask ? dcu_ptr (mask) : NULL,
                                                    mask ? mask->dtype : 0, mask ? mask->stride[0] : 0,
                                                    mask ? mask->stride[1] : 0, mask ? mask->stride[2] : 0,
                                                    mask ? mask->stride[3] : 0, H, rows, r0, Lk, causal ? 1 : 0);
    ok = dcu_check_launch (error, "attention softmax");
    if (!ok)
      break;
    /* O^T[Dv, m] = V^T[Dv, Lk] . P^T[Lk, m] */
    ok = dcu_gemm (c, dt, FALSE, FALSE, Dv, m, Lk, 1.0f, dcu_ptr (vc), Dv, Lk * Dv, P, Lk, rows * Lk, 0.0f,
                   dcu_ptr (out) + (size_t) r0 * Dv * es, Dv, Lq * Dv, BH, error);
  }
  dcu_scratch_free (c, P);
  dcu_scratch_free (c, S);
  diffuse_tensor_clear (&qc);
  diffuse_tensor_clear (&kc);
  diffuse_tensor_clear (&vc);
  return ok;
}

gboolean
dcu_sdpa (DiffuseTensor *out, DiffuseTensor *q, DiffuseTensor *k, DiffuseTensor *v, DiffuseTensor *mask,
          gboolean causal, float scale, GError **error)
{
  CudaCtx *c = dcu_ctx_of (out);
  if (!dcu_enter (c, error))
    return FALSE;
  DCU_PROF (c, "sdpa");
  AttnArgs a;
  a.q = dcu_ptr (q);
  a.k = dcu_ptr (k);
  a.v = dcu_ptr (v);
  a.mask = mask ? dcu_ptr (mask) : NULL;
  a.qdt = q->dtype;
  a.kdt = k->dtype;
  a.vdt = v->dtype;
  a.mdt = mask ? mask->dtype : 0;
  for (int i = 0; i < 4; i++) {
    a.qs[i] = q->stride[i];
    a.ks[i] = k->stride[i];
    a.vs[i] = v->stride[i];
    a.ms[i] = mask ? mask->stride[i] : 0;
  }
  const int64_t B = q->shape[0];
  a.H = q->shape[1];
  a.Lq = q->shape[2];
  a.Lk = k->shape[2];
  a.D = q->shape[3];
  a.Dv = v->shape[3];
  a.scale = scale;
  a.causal = causal ? 1 : 0;
  a.o = dcu_ptr (out);
  a.odt = out->dtype;
  if (B * a.H * a.Lq * a.Dv == 0)
    return TRUE;
  if (B * a.H <= 65535 && use_wmma (c, out, q, k, v)) {
    if (out->dtype == DIFFUSE_DTYPE_F16)
      return launch_wmma<__half> (c, a, B * a.H, error);
    return launch_wmma<__nv_bfloat16> (c, a, B * a.H, error);
  }
  const size_t smem = sizeof (float) * (size_t) ((BM + BN) * (a.D + a.Dv));
  if (smem > c->smem_optin || g_strcmp0 (g_getenv ("DIFFUSE_CUDA_ATTN"), "unfused") == 0)
    return sdpa_unfused (c, out, q, k, v, mask, causal, scale, error);
  if (B * a.H > 65535) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                 "attention on %s: head dims %" G_GINT64_FORMAT "/%" G_GINT64_FORMAT " or %" G_GINT64_FORMAT
                 " batch*heads exceed the fused kernel's limits", diffuse_device_name (c->dev), a.D, a.Dv, B * a.H);
    return FALSE;
  }
  if (smem > 48 * 1024)
    DCU_TRY (cudaFuncSetAttribute (k_attention, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem),
             "attention smem");
  dim3 grid ((unsigned) ((a.Lq + BM - 1) / BM), (unsigned) (B * a.H));
  k_attention<<<grid, BM, smem, c->stream>>> (a);
  return dcu_check_launch (error, "attention");
}
