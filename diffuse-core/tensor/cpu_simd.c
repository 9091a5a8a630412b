/* gst-diffuse — vectorised f32 row kernels of the CPU backend. */
#include "cpu_simd.h"
#include <math.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define DK_CLONES __attribute__ ((target_clones ("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#endif
#ifndef DK_CLONES
#define DK_CLONES
#endif

/* exp (x) for the vectoriser: no branches, no libm calls.  x below -87
 * gives 0 (expf gives a denormal or 0 there), x above 88 gives exp (88)
 * (callers never pass such values: softmax arguments are <= 0, SiLU's
 * x / (1 + exp (-x)) is -0 either way). */
static inline __attribute__ ((always_inline)) float
dk_expf (float x)
{
  const float lo = -87.0f, hi = 88.0f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  /* n = round (x / ln 2): adding and removing 1.5 * 2^23 rounds to nearest */
  const float shifter = 12582912.0f;
  float n = (xc * 1.44269504088896341f + shifter) - shifter;
  /* r = x - n ln 2 in two steps (Cody-Waite): |r| <= ln 2 / 2 */
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  /* Cephes' expf polynomial */
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * (r * r) + r + 1.0f;
  int32_t e = (int32_t) n + 127;
  /* 2^n, and 0 below lo (as a bit mask: branch-free for every target) */
  uint32_t bits = ((uint32_t) e << 23) & (uint32_t) -(int32_t) (x >= lo);
  float s;
  memcpy (&s, &bits, sizeof s);
  return y * s;
}

DK_CLONES float
dk_max (const float *x, int64_t n)
{
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; i++)
    m = x[i] > m ? x[i] : m;
  return m;
}

DK_CLONES float
dk_exp_sub_sum (float *x, int64_t n, float m)
{
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; i++) {
    float e = dk_expf (x[i] - m);
    x[i] = e;
    s += e;
  }
  return s;
}

DK_CLONES void
dk_scale (float *x, int64_t n, float s)
{
#pragma omp simd
  for (int64_t i = 0; i < n; i++)
    x[i] *= s;
}

DK_CLONES void
dk_silu (float *o, const float *x, int64_t n, float k)
{
#pragma omp simd
  for (int64_t i = 0; i < n; i++)
    o[i] = x[i] / (1.0f + dk_expf (-k * x[i]));
}

DK_CLONES void
dk_sigmoid (float *o, const float *x, int64_t n)
{
#pragma omp simd
  for (int64_t i = 0; i < n; i++)
    o[i] = 1.0f / (1.0f + dk_expf (-x[i]));
}

DK_CLONES void
dk_affine (float *o, const float *x, int64_t n, float a, float b, int silu)
{
  if (silu) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
      float v = x[i] * a + b;
      o[i] = v / (1.0f + dk_expf (-v));
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; i++)
      o[i] = x[i] * a + b;
  }
}

#define DK_BLOCK 4096

DK_CLONES double
dk_sum (const float *x, int64_t n)
{
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += DK_BLOCK) {
    int64_t i1 = i0 + DK_BLOCK < n ? i0 + DK_BLOCK : n;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = i0; i < i1; i++)
      s += x[i];
    total += s;
  }
  return total;
}

DK_CLONES double
dk_sqdev (const float *x, int64_t n, float mean)
{
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += DK_BLOCK) {
    int64_t i1 = i0 + DK_BLOCK < n ? i0 + DK_BLOCK : n;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = i0; i < i1; i++) {
      float d = x[i] - mean;
      s += d * d;
    }
    total += s;
  }
  return total;
}

DK_CLONES void
dk_mul_add (float *o, const float *x, int64_t n, const float *scale, const float *shift)
{
#pragma omp simd
  for (int64_t i = 0; i < n; i++)
    o[i] = x[i] * scale[i] + shift[i];
}

/* 1 + erf (z) = erfc (-z), from the Chebyshev fit of erfc in Numerical
 * Recipes (relative error below 1.2e-7 on erfc), branch-free */
static inline __attribute__ ((always_inline)) float
dk_one_plus_erf (float z)
{
  float a = z < 0.0f ? -z : z;
  float t = 1.0f / (1.0f + 0.5f * a);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  float ec = t * dk_expf (p - a * a);   /* erfc (|z|) */
  return z < 0.0f ? ec : 2.0f - ec;
}

DK_CLONES void
dk_gelu (float *o, const float *x, int64_t n)
{
#pragma omp simd
  for (int64_t i = 0; i < n; i++)
    o[i] = 0.5f * x[i] * dk_one_plus_erf (x[i] * 0.70710678118654752f);
}

DK_CLONES void
dk_geglu (float *o, const float *h, const float *g, int64_t n)
{
#pragma omp simd
  for (int64_t i = 0; i < n; i++)
    o[i] = h[i] * (0.5f * g[i] * dk_one_plus_erf (g[i] * 0.70710678118654752f));
}
