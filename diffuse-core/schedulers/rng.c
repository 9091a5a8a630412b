/* gst-diffuse — PyTorch-compatible CPU random generator (see rng.h).
 *
 * Every float operation below is meant to round exactly as the
 * corresponding torch kernel does, so the compiler must not fuse a*b+c. */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize ("fp-contract=off")
#endif

#include "diffuse/rng.h"
#include "diffuse/tensor.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#define MT_N 624
#define MT_M 397

struct _DiffuseRng {
  guint64 seed;
  guint32 state[MT_N];
  int left;                /* as at::mt19937: words left before a regeneration, +1 */
  int next;
  gboolean have_cached_normal;
  double cached_normal;    /* torch's next_double_normal_sample */
  DiffuseRngMath math;
};

/* ---- engine ------------------------------------------------------------ */

static void
mt_seed (DiffuseRng *rng, guint64 seed)
{
  rng->seed = seed;
  /* torch keeps 64 bits as the seed but the engine state starts from the
   * low 32 bits only. */
  rng->state[0] = (guint32) (seed & 0xffffffffu);
  for (guint32 j = 1; j < MT_N; j++) {
    guint32 prev = rng->state[j - 1];
    rng->state[j] = 1812433253u * (prev ^ (prev >> 30)) + j;
  }
  rng->left = 1;
  rng->next = 0;
  rng->have_cached_normal = FALSE;
  rng->cached_normal = 0.0;
}

static inline guint32
mt_mix (guint32 upper_from, guint32 lower_from)
{
  guint32 v = (upper_from & 0x80000000u) | (lower_from & 0x7fffffffu);
  return (v >> 1) ^ ((lower_from & 1u) ? 0x9908b0dfu : 0u);
}

static void
mt_regenerate (DiffuseRng *rng)
{
  guint32 *s = rng->state;
  int k;
  for (k = 0; k < MT_N - MT_M; k++)
    s[k] = s[k + MT_M] ^ mt_mix (s[k], s[k + 1]);
  for (; k < MT_N - 1; k++)
    s[k] = s[k + MT_M - MT_N] ^ mt_mix (s[k], s[k + 1]);
  s[MT_N - 1] = s[MT_M - 1] ^ mt_mix (s[MT_N - 1], s[0]);
  rng->left = MT_N;
  rng->next = 0;
}

guint32
diffuse_rng_next_u32 (DiffuseRng *rng)
{
  g_return_val_if_fail (rng != NULL, 0);
  if (--rng->left == 0)
    mt_regenerate (rng);
  guint32 y = rng->state[rng->next++];
  y ^= y >> 11;
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  y ^= y >> 18;
  return y;
}

/* at::uniform_real_distribution<float>(0, 1): 24 random bits. */
static inline float
uniform_f32 (DiffuseRng *rng)
{
  guint32 v = diffuse_rng_next_u32 (rng) & ((1u << 24) - 1);
  return (float) v * (1.0f / 16777216.0f);
}

/* at::uniform_real_distribution<double>(0, 1): 53 bits of random64 (), whose
 * first word is the high half. */
static inline double
uniform_f64 (DiffuseRng *rng)
{
  guint64 hi = diffuse_rng_next_u32 (rng);
  guint64 lo = diffuse_rng_next_u32 (rng);
  guint64 v = ((hi << 32) | lo) & ((G_GUINT64_CONSTANT (1) << 53) - 1);
  return (double) v * (1.0 / 9007199254740992.0);
}

/* ---- float32 log / sincos as computed 8 lanes at a time by torch's AVX2
 * kernel (Cephes polynomials of avx_mathfun.h).  The operation order and the
 * fused multiply-adds are those of the machine code in the PyTorch x86-64
 * wheels (the compiler contracts mul+add pairs into FMA there); checked
 * against torch 2.15's libtorch_cpu.so. ------------------------------- */

static inline guint32 f2u (float f) { guint32 u; memcpy (&u, &f, 4); return u; }
static inline float u2f (guint32 u) { float f; memcpy (&f, &u, 4); return f; }

static float
avx_logf (float x)
{
  const float one = 1.0f;
  gboolean invalid = (x <= 0.0f);
  const float min_norm = u2f (0x00800000u);
  x = (x > min_norm) ? x : min_norm;          /* _mm256_max_ps (x, min_norm) */
  gint32 expo = (gint32) (f2u (x) >> 23);
  x = u2f ((f2u (x) & ~0x7f800000u) | f2u (0.5f));
  expo -= 0x7f;
  float e = (float) expo;
  e = e + one;

  gboolean below = x < (float) 0.707106781186547524;
  float tmp = below ? x : 0.0f;
  x = x - one;
  e = e - (below ? one : 0.0f);
  x = x + tmp;

  float z = x * x;
  float y = fmaf ((float) 7.0376836292E-2, x, (float) -1.1514610310E-1);
  y = fmaf (y, x, (float) 1.1676998740E-1);
  y = fmaf (y, x, (float) -1.2420140846E-1);
  y = fmaf (y, x, (float) 1.4249322787E-1);
  y = fmaf (y, x, (float) -1.6668057665E-1);
  y = fmaf (y, x, (float) 2.0000714765E-1);
  y = fmaf (y, x, (float) -2.4999993993E-1);
  y = fmaf (y, x, (float) 3.3333331174E-1);
  y = y * x;
  y = fmaf (y, z, e * (float) -2.12194440e-4);
  y = fmaf (-z, 0.5f, y);
  x = x + y;
  x = fmaf (e, (float) 0.693359375, x);
  if (invalid)
    x = u2f (0xffffffffu);
  return x;
}

static void
avx_sincosf (float x, float *s, float *c)
{
  guint32 sign_sin = f2u (x) & 0x80000000u;
  x = u2f (f2u (x) & 0x7fffffffu);
  float y = x * (float) 1.27323954473516;
  gint32 j = (y < 2147483648.0f) ? (gint32) y : G_MININT32;   /* cvttps */
  j = (gint32) (((guint32) j + 1u) & ~1u);
  y = (float) j;
  guint32 swap_sin = ((guint32) j & 4u) << 29;
  gboolean poly_sin_is_y2 = ((guint32) j & 2u) == 0;

  x = fmaf (y, (float) -0.78515625, x);
  x = fmaf (y, (float) -2.4187564849853515625e-4, x);
  x = fmaf (y, (float) -3.77489497744594108e-8, x);

  guint32 sign_cos = (~((guint32) j - 2u) & 4u) << 29;
  sign_sin ^= swap_sin;

  float z = x * x;
  float tmp = z * 0.5f;
  float yc = fmaf ((float) 2.443315711809948E-005, z, (float) -1.388731625493765E-003);
  yc = fmaf (yc, z, (float) 4.166664568298827E-002);
  yc = yc * z;
  yc = fmaf (yc, z, -tmp);
  yc = yc + 1.0f;

  float ys = fmaf ((float) -1.9515295891E-4, z, (float) 8.3321608736E-3);
  ys = fmaf (ys, z, (float) -1.6666654611E-1);
  ys = ys * z;
  ys = fmaf (ys, x, x);

  float ysin2 = poly_sin_is_y2 ? ys : 0.0f;
  float ysin1 = poly_sin_is_y2 ? 0.0f : yc;
  ys = ys - ysin2;
  yc = yc - ysin1;
  float vs = ysin1 + ysin2;
  float vc = yc + ys;
  *s = u2f (f2u (vs) ^ sign_sin);
  *c = u2f (f2u (vc) ^ sign_cos);
}

/* Box-Muller on 16 uniforms in place: pairs (j, j + 8). */
static void
box_muller_16 (float *d, DiffuseRngMath math)
{
  if (math == DIFFUSE_RNG_MATH_X86_AVX) {
    const float two_pi = (float) (2.0f * G_PI);
    for (int j = 0; j < 8; j++) {
      float u1 = 1.0f - d[j];
      float u2 = d[j + 8];
      float radius = sqrtf (-2.0f * avx_logf (u1));
      float theta = two_pi * u2;
      float st, ct;
      avx_sincosf (theta, &st, &ct);
      float n1 = radius * ct;
      float n2 = radius * st;
      d[j] = fmaf (n1, 1.0f, 0.0f);
      d[j + 8] = fmaf (n2, 1.0f, 0.0f);
    }
  } else {
    for (int j = 0; j < 8; j++) {
      float u1 = 1.0f - d[j];
      float u2 = d[j + 8];
      float radius = sqrtf (-2.0f * logf (u1));
      float theta = (float) ((double) (2.0f * G_PI) * (double) u2);
      d[j] = fmaf (radius * cosf (theta), 1.0f, 0.0f);
      d[j + 8] = fmaf (radius * sinf (theta), 1.0f, 0.0f);
    }
  }
}

/* at::normal_distribution<double>(0, 1) with the cached second sample. */
static double
normal_f64 (DiffuseRng *rng)
{
  if (rng->have_cached_normal) {
    rng->have_cached_normal = FALSE;
    return rng->cached_normal * 1.0 + 0.0;
  }
  double u1 = uniform_f64 (rng);
  double u2 = uniform_f64 (rng);
  double r = sqrt (-2.0 * log1p (-u2));
  double theta = 2.0 * G_PI * u1;
  rng->cached_normal = r * sin (theta);
  rng->have_cached_normal = TRUE;
  return r * cos (theta) * 1.0 + 0.0;
}

/* ---- public ------------------------------------------------------------ */

DiffuseRng *
diffuse_rng_new (guint64 seed)
{
  DiffuseRng *rng = g_new0 (DiffuseRng, 1);
  rng->math = DIFFUSE_RNG_MATH_X86_AVX;
  mt_seed (rng, seed);
  return rng;
}

DiffuseRng *
diffuse_rng_copy (const DiffuseRng *rng)
{
  g_return_val_if_fail (rng != NULL, NULL);
  return g_memdup2 (rng, sizeof *rng);
}

void
diffuse_rng_free (DiffuseRng *rng)
{
  g_free (rng);
}

void
diffuse_rng_manual_seed (DiffuseRng *rng, guint64 seed)
{
  g_return_if_fail (rng != NULL);
  mt_seed (rng, seed);
}

guint64
diffuse_rng_initial_seed (const DiffuseRng *rng)
{
  g_return_val_if_fail (rng != NULL, 0);
  return rng->seed;
}

void
diffuse_rng_set_math (DiffuseRng *rng, DiffuseRngMath math)
{
  g_return_if_fail (rng != NULL);
  g_return_if_fail (math == DIFFUSE_RNG_MATH_X86_AVX || math == DIFFUSE_RNG_MATH_LIBM);
  rng->math = math;
}

DiffuseRngMath
diffuse_rng_get_math (const DiffuseRng *rng)
{
  g_return_val_if_fail (rng != NULL, DIFFUSE_RNG_MATH_X86_AVX);
  return rng->math;
}

void
diffuse_rng_randn_dtype (DiffuseRng *rng, DiffuseRngDType dtype, float *out, size_t n)
{
  g_return_if_fail (rng != NULL);
  g_return_if_fail (out != NULL || n == 0);
  g_return_if_fail (dtype == DIFFUSE_RNG_F32 || dtype == DIFFUSE_RNG_F16 || dtype == DIFFUSE_RNG_BF16);

  if (n < 16) {
    for (size_t i = 0; i < n; i++)
      out[i] = (float) normal_f64 (rng);
    return;
  }

  if (dtype == DIFFUSE_RNG_F32) {
    /* all uniforms first, in the output buffer, then the transform */
    for (size_t i = 0; i < n; i++)
      out[i] = uniform_f32 (rng);
    for (size_t i = 0; i + 16 <= n; i += 16)
      box_muller_16 (out + i, rng->math);
  } else {
    /* reduced precision: 16 uniforms per block, drawn as each block goes */
    for (size_t i = 0; i + 16 <= n; i += 16) {
      for (int j = 0; j < 16; j++)
        out[i + j] = uniform_f32 (rng);
      box_muller_16 (out + i, rng->math);
    }
  }
  if (n % 16 != 0) {
    /* the tail: the last 16 values again from 16 fresh uniforms */
    float *d = out + n - 16;
    for (int j = 0; j < 16; j++)
      d[j] = uniform_f32 (rng);
    box_muller_16 (d, rng->math);
  }
}

void
diffuse_rng_randn (DiffuseRng *rng, float *out, size_t n)
{
  diffuse_rng_randn_dtype (rng, DIFFUSE_RNG_F32, out, n);
}

void
diffuse_rng_round (DiffuseRngDType dtype, float *out, size_t n)
{
  if (dtype == DIFFUSE_RNG_F16)
    for (size_t i = 0; i < n; i++)
      out[i] = diffuse_f16_to_f32 (diffuse_f32_to_f16 (out[i]));
  else if (dtype == DIFFUSE_RNG_BF16)
    for (size_t i = 0; i < n; i++)
      out[i] = diffuse_bf16_to_f32 (diffuse_f32_to_bf16 (out[i]));
}

void
diffuse_rng_randn_as (DiffuseRng *rng, DiffuseRngDType dtype, float *out, size_t n)
{
  diffuse_rng_randn_dtype (rng, dtype, out, n);
  diffuse_rng_round (dtype, out, n);
}
