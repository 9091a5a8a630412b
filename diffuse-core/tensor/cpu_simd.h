/* gst-diffuse — vectorised f32 row kernels of the CPU backend (cpu_simd.c).
 *
 * Each kernel is compiled for AVX-512, AVX2+FMA and baseline x86-64 (GCC's
 * target_clones, chosen once at load time) and elsewhere for the build's
 * target only.  exp is a Cody-Waite range reduction plus a degree-6
 * polynomial (relative error about 1e-7, i.e. 1-2 ulp of expf), written so
 * that the compiler vectorises it. */
#pragma once

#include <stdint.h>

/* max of x[0..n-1]; -INFINITY when n == 0 */
float dk_max (const float *x, int64_t n);
/* x[i] = exp (x[i] - m); returns the sum of the new values */
float dk_exp_sub_sum (float *x, int64_t n, float m);
/* x[i] *= s */
void dk_scale (float *x, int64_t n, float s);
/* o[i] = x[i] / (1 + exp (-k * x[i])) (SiLU with k = 1, quick GELU with k = 1.702) */
void dk_silu (float *o, const float *x, int64_t n, float k);
/* o[i] = 1 / (1 + exp (-x[i])) */
void dk_sigmoid (float *o, const float *x, int64_t n);
/* o[i] = x[i] * a + b, then SiLU when silu != 0 */
void dk_affine (float *o, const float *x, int64_t n, float a, float b, int silu);
/* sum of x[i], accumulated in float lanes over blocks that are summed in double */
double dk_sum (const float *x, int64_t n);
/* sum of (x[i] - mean)^2, same accumulation */
double dk_sqdev (const float *x, int64_t n, float mean);
/* o[i] = x[i] * scale[i] + shift[i] */
void dk_mul_add (float *o, const float *x, int64_t n, const float *scale, const float *shift);
/* o[i] = GELU (x[i]) with the exact (erf) form; erf to about 1e-7 */
void dk_gelu (float *o, const float *x, int64_t n);
/* o[i] = h[i] * GELU (g[i]) (GEGLU) */
void dk_geglu (float *o, const float *h, const float *g, int64_t n);
