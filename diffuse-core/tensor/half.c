/* gst-diffuse — float16 / bfloat16 <-> float32, round to nearest even as torch. */
#include <diffuse/tensor.h>
#include <string.h>
#include <math.h>

static inline uint32_t f2u (float f) { uint32_t u; memcpy (&u, &f, 4); return u; }
static inline float u2f (uint32_t u) { float f; memcpy (&f, &u, 4); return f; }

uint16_t
diffuse_f32_to_f16 (float f)
{
  uint32_t x = f2u (f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t absx = x & 0x7fffffffu;

  if (absx >= 0x7f800000u) {               /* inf or nan */
    if (absx > 0x7f800000u)
      return (uint16_t) (sign | 0x7e00u | ((absx >> 13) & 0x3ffu));
    return (uint16_t) (sign | 0x7c00u);
  }
  if (absx >= 0x477ff000u)                 /* rounds to >= 65520: overflow to inf */
    return (uint16_t) (sign | 0x7c00u);
  if (absx < 0x38800000u) {                /* below the smallest normal half (2^-14) */
    if (absx < 0x33000000u)                /* below half of the smallest subnormal: 0 */
      return (uint16_t) sign;
    /* subnormal: value = mant * 2^-24; shift with round-to-nearest-even */
    uint32_t e = absx >> 23;
    uint32_t m = (absx & 0x7fffffu) | 0x800000u;
    int shift = 126 - (int) e;             /* 113 + 13 = 126 */
    uint32_t q = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1);
    uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (q & 1)))
      q++;
    return (uint16_t) (sign | q);
  }
  /* normal */
  uint32_t r = absx - 0x38000000u;         /* rebias exponent 127 -> 15 */
  uint32_t q = r >> 13;
  uint32_t rem = r & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (q & 1)))
    q++;
  return (uint16_t) (sign | q);
}

float
diffuse_f16_to_f32 (uint16_t h)
{
  uint32_t sign = (uint32_t) (h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu;
  uint32_t m = h & 0x3ffu;
  if (e == 0) {
    if (m == 0)
      return u2f (sign);
    /* subnormal: m * 2^-24 */
    float v = (float) m * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  if (e == 31)
    return u2f (sign | 0x7f800000u | (m << 13));
  return u2f (sign | ((e + 112u) << 23) | (m << 13));
}

uint16_t
diffuse_f32_to_bf16 (float f)
{
  uint32_t x = f2u (f);
  if ((x & 0x7fffffffu) > 0x7f800000u)     /* nan: keep it quiet */
    return (uint16_t) ((x >> 16) | 0x40u);
  uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
  return (uint16_t) ((x + rounding) >> 16);
}

float
diffuse_bf16_to_f32 (uint16_t h)
{
  return u2f ((uint32_t) h << 16);
}

void
diffuse_convert_row (void *dst, DiffuseDType dst_dt, const void *src, DiffuseDType src_dt, size_t n)
{
  if (dst_dt == src_dt) {
    memcpy (dst, src, n * diffuse_dtype_size (dst_dt));
    return;
  }
  if (dst_dt == DIFFUSE_DTYPE_F32) {
    float *d = dst;
    const uint16_t *s = src;
    if (src_dt == DIFFUSE_DTYPE_F16)
      for (size_t i = 0; i < n; i++) d[i] = diffuse_f16_to_f32 (s[i]);
    else
      for (size_t i = 0; i < n; i++) d[i] = diffuse_bf16_to_f32 (s[i]);
    return;
  }
  if (src_dt == DIFFUSE_DTYPE_F32) {
    uint16_t *d = dst;
    const float *s = src;
    if (dst_dt == DIFFUSE_DTYPE_F16)
      for (size_t i = 0; i < n; i++) d[i] = diffuse_f32_to_f16 (s[i]);
    else
      for (size_t i = 0; i < n; i++) d[i] = diffuse_f32_to_bf16 (s[i]);
    return;
  }
  /* f16 <-> bf16 through f32 (exact for the intermediate) */
  uint16_t *d = dst;
  const uint16_t *s = src;
  for (size_t i = 0; i < n; i++) {
    float v = src_dt == DIFFUSE_DTYPE_F16 ? diffuse_f16_to_f32 (s[i]) : diffuse_bf16_to_f32 (s[i]);
    d[i] = dst_dt == DIFFUSE_DTYPE_F16 ? diffuse_f32_to_f16 (v) : diffuse_f32_to_bf16 (v);
  }
}
