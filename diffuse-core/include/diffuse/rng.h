/* gst-diffuse — a random generator that reproduces PyTorch's CPU generator.
 *
 * diffuse_rng_new (seed) + diffuse_rng_randn (rng, out, n) gives the values of
 *
 *     g = torch.Generator ("cpu").manual_seed (seed)
 *     torch.randn (shape, generator=g)          # numel (shape) == n, float32
 *
 * and successive calls continue the stream exactly as successive torch.randn
 * calls on the same generator do (diffusers' randn_tensor with one generator:
 * initial latents, then the noise of ancestral / DDPM / LCM steps).
 *
 * What is reproduced:
 *  - the engine: mt19937 seeded as at::CPUGeneratorImpl does; only the low
 *    32 bits of the 64-bit seed reach the engine (torch keeps the full value
 *    as initial_seed (), so manual_seed (2**32 + 5) draws as manual_seed (5));
 *  - n >= 16 (torch's normal_fill): one 24-bit uniform per element, then
 *    Box-Muller on blocks of 16 (8 pairs); when n is not a multiple of 16 the
 *    last 16 elements are recomputed from 16 fresh uniforms;
 *  - n < 16: at::normal_distribution<double> per element, with the second
 *    value of each Box-Muller pair cached in the generator and used by the
 *    next scalar draw (as torch's next_double_normal_sample).
 *
 * Box-Muller on blocks of 16 is where torch builds differ: x86-64 builds with
 * AVX2 or AVX-512 (the usual case) use Cephes-style float log/sin/cos
 * polynomials (avx_mathfun.h); other builds (ARM, or
 * ATEN_CPU_CAPABILITY=default) use the C library's logf/cosf/sinf.
 * DIFFUSE_RNG_MATH_X86_AVX (the default) reproduces the former bit for bit on
 * any machine; DIFFUSE_RNG_MATH_LIBM reproduces the latter where the C library
 * is glibc (other libms may differ by an ulp). */
#pragma once

#include <glib.h>
#include <stddef.h>

G_BEGIN_DECLS

typedef struct _DiffuseRng DiffuseRng;

typedef enum {
  DIFFUSE_RNG_MATH_X86_AVX,   /* torch on x86-64 with AVX2/AVX-512 (default) */
  DIFFUSE_RNG_MATH_LIBM,      /* torch's portable path (ARM, ATEN_CPU_CAPABILITY=default) */
} DiffuseRngMath;

/* The dtype torch.randn was asked for.  F16/BF16 tensors draw their uniforms
 * block by block, so for n >= 16 and n % 16 != 0 the last 16 values differ
 * from the F32 layout.  diffuse_rng_randn_dtype () returns the float values
 * torch computes before the cast; round them to nearest-even to f16/bf16 to
 * get torch's tensor. */
typedef enum {
  DIFFUSE_RNG_F32,
  DIFFUSE_RNG_F16,
  DIFFUSE_RNG_BF16,
} DiffuseRngDType;

/* torch.Generator ("cpu").manual_seed (seed). */
DiffuseRng *diffuse_rng_new (guint64 seed);
DiffuseRng *diffuse_rng_copy (const DiffuseRng *rng);  /* same state: draws the same stream */
void diffuse_rng_free (DiffuseRng *rng);
G_DEFINE_AUTOPTR_CLEANUP_FUNC (DiffuseRng, diffuse_rng_free)

/* Re-seeds (drops the cached normal, as torch does). */
void diffuse_rng_manual_seed (DiffuseRng *rng, guint64 seed);
guint64 diffuse_rng_initial_seed (const DiffuseRng *rng);
void diffuse_rng_set_math (DiffuseRng *rng, DiffuseRngMath math);
DiffuseRngMath diffuse_rng_get_math (const DiffuseRng *rng);

/* torch.randn (n elements, float32).  n == 0 draws nothing. */
void diffuse_rng_randn (DiffuseRng *rng, float *out, size_t n);
/* torch.randn (n elements, dtype) before the final cast (see above). */
void diffuse_rng_randn_dtype (DiffuseRng *rng, DiffuseRngDType dtype, float *out, size_t n);

/* torch.randn (n elements, dtype) as the tensor holds them: the values of
 * diffuse_rng_randn_dtype rounded (nearest-even) to f16/bf16 and returned as
 * floats.  diffusers draws its noise this way in the pipeline's dtype
 * (randn_tensor (..., dtype=prompt_embeds.dtype) / model_output.dtype). */
void diffuse_rng_randn_as (DiffuseRng *rng, DiffuseRngDType dtype, float *out, size_t n);
/* out[i] rounded to dtype (nearest-even), in place; F32: unchanged. */
void diffuse_rng_round (DiffuseRngDType dtype, float *out, size_t n);

/* The raw engine: the next 32-bit word (torch's generator.random ()). */
guint32 diffuse_rng_next_u32 (DiffuseRng *rng);

G_END_DECLS
