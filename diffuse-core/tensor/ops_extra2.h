/* gst-diffuse — element-wise ops the models need that tensor.h lacks yet
 * (VAE posterior: clamp of logvar, exp for std).  Generic implementation:
 * the work is done on the host in f32 and the result moved back to the
 * input's device and dtype, so it runs on every backend (slowly on an
 * accelerator: meant for small tensors such as latents until a backend op
 * exists).  Same error convention as tensor.h. */
#pragma once

#include <diffuse/tensor.h>

G_BEGIN_DECLS

/* min (max (x, lo), hi), as torch.clamp (NaN stays NaN). */
DiffuseTensor *diffuse_clamp (DiffuseTensor *x, float lo, float hi);
/* exp (scale * x). */
DiffuseTensor *diffuse_exp (DiffuseTensor *x, float scale);

G_END_DECLS
