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
 * This is the simple correct kernel (CUDA cores, f32 FMA).  A tensor-core
 * version (mma.sync / wgmma on f16/bf16 tiles) is what makes attention
 * cheaper than diffusers' SDPA; see docs/gpu-check.md. */
#include "common.cuh"

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

gboolean
dcu_sdpa (DiffuseTensor *out, DiffuseTensor *q, DiffuseTensor *k, DiffuseTensor *v, DiffuseTensor *mask,
          gboolean causal, float scale, GError **error)
{
  CudaCtx *c = dcu_ctx_of (out);
  if (!dcu_enter (c, error))
    return FALSE;
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
  const size_t smem = sizeof (float) * (size_t) ((BM + BN) * (a.D + a.Dv));
  if (smem > c->smem_optin || B * a.H > 65535) {
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
