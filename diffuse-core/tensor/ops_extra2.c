/* gst-diffuse — clamp and exp, computed on the host (see ops_extra2.h). */
#include "ops_extra2.h"
#include <math.h>

typedef enum { UNARY_CLAMP, UNARY_EXP } UnaryKind;

static DiffuseTensor *
unary_host (DiffuseTensor *x, UnaryKind kind, float a, float b)
{
  if (!x)
    return NULL;
  DiffuseDevice *dev = diffuse_tensor_device (x);
  DiffuseTensor *h = diffuse_to_device (x, diffuse_device_cpu ());
  DiffuseTensor *f = diffuse_cast (h, DIFFUSE_DTYPE_F32);
  diffuse_tensor_clear (&h);
  /* always a fresh contiguous buffer we may overwrite */
  DiffuseTensor *w = diffuse_copy (f);
  diffuse_tensor_clear (&f);
  if (!w)
    return NULL;
  float *p = diffuse_tensor_f32 (w);
  int64_t n = diffuse_tensor_numel (w);
  switch (kind) {
  case UNARY_CLAMP:
    for (int64_t i = 0; i < n; i++) {
      float v = p[i];
      if (v < a)
        v = a;
      if (v > b)
        v = b;
      p[i] = v;   /* NaN compares false: kept */
    }
    break;
  case UNARY_EXP:
    for (int64_t i = 0; i < n; i++)
      p[i] = expf (a * p[i]);
    break;
  }
  DiffuseTensor *c = diffuse_cast (w, x->dtype);
  diffuse_tensor_clear (&w);
  DiffuseTensor *out = diffuse_to_device (c, dev);
  diffuse_tensor_clear (&c);
  return out;
}

DiffuseTensor *
diffuse_clamp (DiffuseTensor *x, float lo, float hi)
{
  g_return_val_if_fail (lo <= hi, NULL);
  return unary_host (x, UNARY_CLAMP, lo, hi);
}

DiffuseTensor *
diffuse_exp (DiffuseTensor *x, float scale)
{
  return unary_host (x, UNARY_EXP, scale, 0.0f);
}
