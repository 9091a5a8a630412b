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
 * Three fused kernels: the simple one below (CUDA cores, f32 FMA, any
 * dtype, head dims up to what shared memory holds), a WMMA one (f16/bf16,
 * D == Dv <= 256, masks and causal) and a FlashAttention-2-style one
 * (k_flash: mma.sync with the scores in registers; f16/bf16, no mask, D % 8
 * == 0, D <= 160 — every attention of the SD UNets and motion modules).
 * Head dims no fused kernel holds (the VAE's 512) take an unfused cuBLAS
 * path (sdpa_unfused).  The choice per call: attn_path (DIFFUSE_CUDA_ATTN). */
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

/* DIFFUSE_CUDA_ATTN: the path of f16/bf16 attention.  flash, wmma, simple,
 * unfused: that kernel wherever it applies (else the next that does);
 * unset (auto): the flash kernel where it applies, else the WMMA one for
 * short key sequences (Lk <= 128: the cross-attentions) and the unfused
 * cuBLAS path for longer ones, where it was measured faster (docs/gpu-check.md). */
typedef enum { ATTN_AUTO, ATTN_FLASH, ATTN_WMMA, ATTN_SIMPLE, ATTN_UNFUSED } AttnPath;

static AttnPath
attn_path (void)
{
  const char *e = g_getenv ("DIFFUSE_CUDA_ATTN");
  if (!e)
    return ATTN_AUTO;
  return strcmp (e, "flash") == 0 ? ATTN_FLASH : strcmp (e, "wmma") == 0 ? ATTN_WMMA
       : strcmp (e, "simple") == 0 ? ATTN_SIMPLE : strcmp (e, "unfused") == 0 ? ATTN_UNFUSED : ATTN_AUTO;
}

static gboolean
use_wmma (CudaCtx *c, DiffuseTensor *out, DiffuseTensor *q, DiffuseTensor *k, DiffuseTensor *v)
{
  if (out->dtype == DIFFUSE_DTYPE_F32 || q->dtype != out->dtype || k->dtype != out->dtype || v->dtype != out->dtype)
    return FALSE;
  return q->shape[3] == v->shape[3] && q->shape[3] <= 256 &&
         wmma_smem ((q->shape[3] + 15) / 16 * 16) <= c->smem_optin;
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

/* ---- FlashAttention-2-style kernel (mma.sync, scores in registers) --------
 * The WMMA kernel above stages every score tile through shared memory (its
 * fragments' layout is opaque); measured on an H200 it lost to the unfused
 * cuBLAS path at every self-attention shape of SD 1.5 (2.26 vs 1.73 ms at
 * 64x64).  This one uses the PTX m16n8k16 instruction, whose fragment
 * layout is documented, so the scores, the online softmax and P never leave
 * registers:
 *   - a block owns FA_BM = 64 query rows of one (batch, head), 4 warps of 16
 *     rows (128 rows, 8 warps, for Lq >= 2048: half the K/V traffic per
 *     query; flash_warps); keys go in tiles of FA_BN = 64, double-buffered in shared memory
 *     by cp.async (16-byte copies, zero-filled past Lk and past D);
 *   - per tile a warp computes S = Q K^T (16 x 64, f32 accumulators: thread
 *     (g = lane / 4, t = lane % 4) holds rows g and g + 8, columns 8n + 2t,
 *     8n + 2t + 1 of each 8-key slice n), scales by scale * log2 e, takes the
 *     row max over its 16 values and the 3 other threads of the row (two
 *     shuffles), rescales the running output by exp2 (m_old - m_new) and
 *     turns its own accumulators into the A operand of P V (the C layout of
 *     two adjacent 8-key slices is the A layout of one 16-key step);
 *   - V's B operand comes from ldmatrix .trans (V stays [key][d]);
 *   - the row sums stay per thread until the end (one correction factor per
 *     row, the same in the row's 4 threads), then O / l is stored.
 * Rows of shared memory are DP + 8 elements long: 16-byte row starts and no
 * bank conflict for the fragment loads.  Requirements (flash_ok): f16/bf16
 * q, k, v and out; no mask, not causal; D == Dv, D % 8 == 0, D <= 160;
 * unit stride along D and 16-byte aligned rows (SD's [B, L, H * D] views
 * qualify). */
#define FA_BN 64

template <typename T> struct FaMma;
template <> struct FaMma<__half> {
  static __device__ __forceinline__ void run (float *c, const uint32_t *a, uint32_t b0, uint32_t b1)
  {
    asm volatile ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                  "{%0,%1,%2,%3};\n"
                  : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack (float lo, float hi)
  {
    __half2 h = __floats2half2_rn (lo, hi);
    return *reinterpret_cast<uint32_t *> (&h);
  }
};
template <> struct FaMma<__nv_bfloat16> {
  static __device__ __forceinline__ void run (float *c, const uint32_t *a, uint32_t b0, uint32_t b1)
  {
    asm volatile ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                  "{%0,%1,%2,%3};\n"
                  : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack (float lo, float hi)
  {
    __nv_bfloat162 h = __floats2bfloat162_rn (lo, hi);
    return *reinterpret_cast<uint32_t *> (&h);
  }
};

__device__ __forceinline__ void
fa_cp16 (void *dst, const void *src, bool valid)
{
  const unsigned s = (unsigned) __cvta_generic_to_shared (dst);
  const int n = valid ? 16 : 0;   /* 0: the 16 bytes are zero-filled, nothing is read */
  asm volatile ("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(n));
}

/* rows [r0, r0 + ROWS) of a [L][D] slice (row stride rs elements, unit
 * stride along D) into dst [ROWS][SR], in 16-byte pieces; rows >= L and
 * columns >= D are zeros */
template <typename T, int DP, int ROWS, int NT>
__device__ __forceinline__ void
fa_load_tile (T *dst, const T *src, int64_t rs, int64_t r0, int64_t L, int D)
{
  constexpr int SR = DP + 8, CH = DP / 8;
  for (int i = threadIdx.x; i < ROWS * CH; i += NT) {
    const int r = i / CH, ch = i - r * CH;
    const bool valid = r0 + r < L && ch * 8 < D;
    fa_cp16 (dst + r * SR + ch * 8, valid ? src + (r0 + r) * rs + ch * 8 : src, valid);
  }
}

template <typename T, int DP, int NW>
__global__ void __launch_bounds__ (NW * 32)
k_flash (AttnArgs a)
{
  constexpr int SR = DP + 8, FA_BM = NW * 16, NT = NW * 32;
  extern __shared__ __align__ (128) unsigned char sm[];
  T *Qs = (T *) sm;                /* [FA_BM][SR] */
  T *Ks = Qs + FA_BM * SR;         /* [2][64][SR] */
  T *Vs = Ks + 2 * FA_BN * SR;     /* [2][64][SR] */
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int64_t bh = blockIdx.y, b = bh / a.H, h = bh - b * a.H;
  const int64_t q0 = (int64_t) blockIdx.x * FA_BM;
  const T *qp = (const T *) a.q + b * a.qs[0] + h * a.qs[1];
  const T *kp = (const T *) a.k + b * a.ks[0] + h * a.ks[1];
  const T *vp = (const T *) a.v + b * a.vs[0] + h * a.vs[1];
  const int D = (int) a.D;

  fa_load_tile<T, DP, FA_BM, NT> (Qs, qp, a.qs[2], q0, a.Lq, D);
  fa_load_tile<T, DP, FA_BN, NT> (Ks, kp, a.ks[2], 0, a.Lk, D);
  fa_load_tile<T, DP, FA_BN, NT> (Vs, vp, a.vs[2], 0, a.Lk, D);
  asm volatile ("cp.async.commit_group;\n" ::);

  float o[DP / 8][4];
#pragma unroll
  for (int j = 0; j < DP / 8; j++)
    o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
  const float sl = a.scale * 1.4426950408889634f;   /* exp (x) = exp2 (x log2 e) */
  const int ntiles = (int) ((a.Lk + FA_BN - 1) / FA_BN);

  for (int it = 0; it < ntiles; it++) {
    const int cur = it & 1;
    if (it + 1 < ntiles) {
      const int64_t k1 = (int64_t) (it + 1) * FA_BN;
      fa_load_tile<T, DP, FA_BN, NT> (Ks + (cur ^ 1) * FA_BN * SR, kp, a.ks[2], k1, a.Lk, D);
      fa_load_tile<T, DP, FA_BN, NT> (Vs + (cur ^ 1) * FA_BN * SR, vp, a.vs[2], k1, a.Lk, D);
      asm volatile ("cp.async.commit_group;\n" ::);
      asm volatile ("cp.async.wait_group 1;\n" ::);
    } else {
      asm volatile ("cp.async.wait_group 0;\n" ::);
    }
    __syncthreads ();   /* tile it (and Q) visible to every warp */
    const T *Kc = Ks + cur * FA_BN * SR, *Vc = Vs + cur * FA_BN * SR;

    /* S = Q K^T: 16 rows x 64 keys per warp */
    float s[FA_BN / 8][4];
#pragma unroll
    for (int n = 0; n < FA_BN / 8; n++)
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < DP / 16; kk++) {
      const T *qr = Qs + (warp * 16 + g) * SR + kk * 16 + 2 * t4;
      uint32_t af[4];
      af[0] = *(const uint32_t *) qr;                   /* row g,     k 2t, 2t+1 */
      af[1] = *(const uint32_t *) (qr + 8 * SR);        /* row g + 8, k 2t, 2t+1 */
      af[2] = *(const uint32_t *) (qr + 8);             /* row g,     k 2t+8, 2t+9 */
      af[3] = *(const uint32_t *) (qr + 8 * SR + 8);    /* row g + 8, k 2t+8, 2t+9 */
#pragma unroll
      for (int n = 0; n < FA_BN / 8; n++) {
        const T *kr = Kc + (n * 8 + g) * SR + kk * 16 + 2 * t4;   /* B[k][n] = K[key n][d k] */
        FaMma<T>::run (s[n], af, *(const uint32_t *) kr, *(const uint32_t *) (kr + 8));
      }
    }

    /* online softmax in registers (rows g and g + 8 of the warp) */
    const int64_t kv0 = (int64_t) it * FA_BN;
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int n = 0; n < FA_BN / 8; n++)
#pragma unroll
      for (int e = 0; e < 2; e++) {
        const bool in = kv0 + n * 8 + 2 * t4 + e < a.Lk;
        s[n][e] = in ? s[n][e] * sl : -INFINITY;
        s[n][2 + e] = in ? s[n][2 + e] * sl : -INFINITY;
        mx0 = fmaxf (mx0, s[n][e]);
        mx1 = fmaxf (mx1, s[n][2 + e]);
      }
    mx0 = fmaxf (mx0, __shfl_xor_sync (0xffffffffu, mx0, 1));
    mx0 = fmaxf (mx0, __shfl_xor_sync (0xffffffffu, mx0, 2));
    mx1 = fmaxf (mx1, __shfl_xor_sync (0xffffffffu, mx1, 1));
    mx1 = fmaxf (mx1, __shfl_xor_sync (0xffffffffu, mx1, 2));
    /* every tile holds at least one key < Lk: the new maxima are finite */
    const float mn0 = fmaxf (m0, mx0), mn1 = fmaxf (m1, mx1);
    const float c0 = exp2f (m0 - mn0), c1 = exp2f (m1 - mn1);   /* 0 on the first tile */
    m0 = mn0;
    m1 = mn1;
    uint32_t pf[FA_BN / 16][4];
    float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
    for (int n = 0; n < FA_BN / 8; n++) {
      const float p00 = exp2f (s[n][0] - mn0), p01 = exp2f (s[n][1] - mn0);
      const float p10 = exp2f (s[n][2] - mn1), p11 = exp2f (s[n][3] - mn1);
      ps0 += p00 + p01;
      ps1 += p10 + p11;
      /* C of slices 2kk, 2kk + 1 = A of key step kk */
      pf[n >> 1][(n & 1) * 2 + 0] = FaMma<T>::pack (p00, p01);
      pf[n >> 1][(n & 1) * 2 + 1] = FaMma<T>::pack (p10, p11);
    }
    l0 = l0 * c0 + ps0;
    l1 = l1 * c1 + ps1;
#pragma unroll
    for (int j = 0; j < DP / 8; j++) {
      o[j][0] *= c0;
      o[j][1] *= c0;
      o[j][2] *= c1;
      o[j][3] *= c1;
    }

    /* O += P V: ldmatrix .x4 .trans gives the B operands of two 8-column
     * slices of V for one 16-key step (lanes 0-15: keys 0-15 of columns
     * 16jp..+7, lanes 16-31: the same keys, columns +8..+15) */
#pragma unroll
    for (int kk = 0; kk < FA_BN / 16; kk++)
#pragma unroll
      for (int jp = 0; jp < DP / 16; jp++) {
        const T *vr = Vc + (kk * 16 + (lane & 15)) * SR + jp * 16 + (lane >> 4) * 8;
        const unsigned addr = (unsigned) __cvta_generic_to_shared (vr);
        uint32_t r0, r1, r2, r3;
        asm volatile ("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                      : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                      : "r"(addr));
        FaMma<T>::run (o[2 * jp], pf[kk], r0, r1);
        FaMma<T>::run (o[2 * jp + 1], pf[kk], r2, r3);
      }
    __syncthreads ();   /* every warp done with buffer cur before it is refilled */
  }

  l0 += __shfl_xor_sync (0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync (0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync (0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync (0xffffffffu, l1, 2);
  const float i0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, i1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
  const int64_t row0 = q0 + warp * 16 + g, row1 = row0 + 8;
  T *op = (T *) a.o + bh * a.Lq * a.Dv;
#pragma unroll
  for (int j = 0; j < DP / 8; j++) {
    const int col = j * 8 + 2 * t4;
    if (col >= D)
      continue;
    if (row0 < a.Lq)
      *(uint32_t *) (op + row0 * a.Dv + col) = FaMma<T>::pack (o[j][0] * i0, o[j][1] * i0);
    if (row1 < a.Lq)
      *(uint32_t *) (op + row1 * a.Dv + col) = FaMma<T>::pack (o[j][2] * i1, o[j][3] * i1);
  }
}

/* the padded head dim of the instantiated kernels, 0 for none */
static int
flash_dp (int64_t D)
{
  static const int dps[] = { 32, 48, 64, 80, 96, 128, 160 };
  for (guint i = 0; i < G_N_ELEMENTS (dps); i++)
    if (D <= dps[i])
      return dps[i];
  return 0;
}

/* warps per block (16 query rows each): 8 for long query sequences (SD's
 * 64x64 level: 0.351 vs 0.370 ms on an H200), 4 otherwise (at 16x16 8 warps
 * were slower: 0.030 vs 0.025 ms; too few blocks); DIFFUSE_CUDA_FLASH_ROWS=64
 * or 128 forces one */
static int
flash_warps (int64_t Lq)
{
  const char *e = g_getenv ("DIFFUSE_CUDA_FLASH_ROWS");
  if (e && strcmp (e, "128") == 0)
    return 8;
  if (e && strcmp (e, "64") == 0)
    return 4;
  return Lq >= 2048 ? 8 : 4;
}

static size_t
flash_smem (int DP, int NW)
{
  return (size_t) (NW * 16 + 4 * FA_BN) * (DP + 8) * 2;
}

static gboolean
aligned16 (const DiffuseTensor *t)
{
  if (((uintptr_t) dcu_ptr (t)) % 16 != 0 || t->stride[3] != 1)
    return FALSE;
  for (int i = 0; i < 3; i++)
    if ((t->stride[i] * 2) % 16 != 0)
      return FALSE;
  return TRUE;
}

static gboolean
flash_ok (CudaCtx *c, DiffuseTensor *out, DiffuseTensor *q, DiffuseTensor *k, DiffuseTensor *v, DiffuseTensor *mask,
          gboolean causal)
{
  if ((out->dtype != DIFFUSE_DTYPE_F16 && out->dtype != DIFFUSE_DTYPE_BF16) || q->dtype != out->dtype ||
      k->dtype != out->dtype || v->dtype != out->dtype || mask || causal)
    return FALSE;
  const int64_t D = q->shape[3];
  if (D != v->shape[3] || D % 8 != 0 || !flash_dp (D) || flash_smem (flash_dp (D), 8) > c->smem_optin)
    return FALSE;
  if (q->shape[0] * q->shape[1] > 65535 || q->shape[2] > (int64_t) G_MAXINT ||
      k->shape[2] > (int64_t) G_MAXINT - FA_BN)
    return FALSE;
  return aligned16 (q) && aligned16 (k) && aligned16 (v) && ((uintptr_t) dcu_ptr (out)) % 4 == 0;
}

template <typename T, int DP, int NW>
static gboolean
launch_flash_nw (CudaCtx *c, const AttnArgs &a, int64_t BH, GError **error)
{
  const size_t smem = flash_smem (DP, NW);
  if (smem > 48 * 1024)
    DCU_TRY (cudaFuncSetAttribute (k_flash<T, DP, NW>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem),
             "attention smem");
  dim3 grid ((unsigned) ((a.Lq + NW * 16 - 1) / (NW * 16)), (unsigned) BH);
  k_flash<T, DP, NW><<<grid, NW * 32, smem, c->stream>>> (a);
  return dcu_check_launch (error, "attention (flash)");
}

template <typename T, int DP>
static gboolean
launch_flash_dp (CudaCtx *c, const AttnArgs &a, int64_t BH, GError **error)
{
  if (flash_warps (a.Lq) == 8)
    return launch_flash_nw<T, DP, 8> (c, a, BH, error);
  return launch_flash_nw<T, DP, 4> (c, a, BH, error);
}

template <typename T>
static gboolean
launch_flash (CudaCtx *c, const AttnArgs &a, int64_t BH, GError **error)
{
  switch (flash_dp (a.D)) {
  case 32: return launch_flash_dp<T, 32> (c, a, BH, error);
  case 48: return launch_flash_dp<T, 48> (c, a, BH, error);
  case 64: return launch_flash_dp<T, 64> (c, a, BH, error);
  case 80: return launch_flash_dp<T, 80> (c, a, BH, error);
  case 96: return launch_flash_dp<T, 96> (c, a, BH, error);
  case 128: return launch_flash_dp<T, 128> (c, a, BH, error);
  default: return launch_flash_dp<T, 160> (c, a, BH, error);
  }
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
  const AttnPath path = attn_path ();
  if ((path == ATTN_AUTO || path == ATTN_FLASH) && flash_ok (c, out, q, k, v, mask, causal)) {
    if (out->dtype == DIFFUSE_DTYPE_F16)
      return launch_flash<__half> (c, a, B * a.H, error);
    return launch_flash<__nv_bfloat16> (c, a, B * a.H, error);
  }
  const size_t smem = sizeof (float) * (size_t) ((BM + BN) * (a.D + a.Dv));
  if (path != ATTN_SIMPLE && path != ATTN_UNFUSED && B * a.H <= 65535 && use_wmma (c, out, q, k, v)) {
    if (path == ATTN_AUTO && a.Lk > 128)
      return sdpa_unfused (c, out, q, k, v, mask, causal, scale, error);
    if (out->dtype == DIFFUSE_DTYPE_F16)
      return launch_wmma<__half> (c, a, B * a.H, error);
    return launch_wmma<__nv_bfloat16> (c, a, B * a.H, error);
  }
  if (smem > c->smem_optin || path == ATTN_UNFUSED)
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
