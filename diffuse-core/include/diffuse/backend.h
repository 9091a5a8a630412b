/* gst-diffuse — the backend interface (for backend implementers only).
 *
 * The generic layer in tensor/ops.c validates shapes and dtypes, allocates
 * the output on the input's device and then calls one of these.  A backend
 * may leave an op NULL when it cannot run it; the generic layer then reports
 * DIFFUSE_ERROR_UNSUPPORTED naming the op and the device.
 *
 * Conventions for every op below: `out` is freshly allocated, contiguous,
 * and has the final shape; inputs may be strided unless stated; inputs and
 * output are on the backend's device.  Return FALSE with *error set on a
 * runtime failure. */
#pragma once

#include <diffuse/tensor.h>

G_BEGIN_DECLS

typedef enum {
  DIFFUSE_BINARY_ADD,
  DIFFUSE_BINARY_SUB,
  DIFFUSE_BINARY_MUL,
  DIFFUSE_BINARY_DIV,
} DiffuseBinaryOp;

typedef struct _DiffuseBackendOps DiffuseBackendOps;

struct _DiffuseBackendOps {
  const char *name;

  /* memory */
  gpointer (*alloc) (DiffuseDevice *dev, size_t nbytes, GError **error);
  void (*free) (DiffuseDevice *dev, gpointer ptr);
  /* dst <- src, both on this device, same shape, any strides, dtype conversion allowed */
  gboolean (*copy) (DiffuseTensor *dst, DiffuseTensor *src, GError **error);
  /* host <-> device (contiguous on both ends, nbytes) */
  gboolean (*upload) (DiffuseDevice *dev, gpointer dst, const void *host_src, size_t nbytes, GError **error);
  gboolean (*download) (DiffuseDevice *dev, void *host_dst, gconstpointer src, size_t nbytes, GError **error);
  void (*fill_zero) (DiffuseTensor *out);

  /* element-wise: a, b already broadcast-expanded as strided views of out's shape */
  gboolean (*binary) (DiffuseBinaryOp op, DiffuseTensor *out, DiffuseTensor *a, DiffuseTensor *b, GError **error);
  gboolean (*scale) (DiffuseTensor *out, DiffuseTensor *x, float s, float b, GError **error);
  gboolean (*axpy) (DiffuseTensor *a, float alpha, DiffuseTensor *b, GError **error);
  gboolean (*activation) (DiffuseTensor *out, DiffuseTensor *x, DiffuseActivation act, GError **error);
  gboolean (*geglu) (DiffuseTensor *out, DiffuseTensor *x, GError **error);

  /* a, b contiguous in their last two dims after the generic layer's
   * preparation; batch dims broadcast (stride 0 allowed on batch dims) */
  gboolean (*matmul) (DiffuseTensor *out, DiffuseTensor *a, DiffuseTensor *b,
                      gboolean trans_a, gboolean trans_b, float alpha, GError **error);
  /* x contiguous [M, K], w [N, K], b [N] or NULL, out [M, N] */
  gboolean (*linear) (DiffuseTensor *out, DiffuseTensor *x, DiffuseTensor *w, DiffuseTensor *b, GError **error);
  gboolean (*conv2d) (DiffuseTensor *out, DiffuseTensor *x, DiffuseTensor *w, DiffuseTensor *b,
                      int stride_h, int stride_w, int pad_h, int pad_w, GError **error);
  gboolean (*pad2d) (DiffuseTensor *out, DiffuseTensor *x, int left, int top, GError **error);
  gboolean (*upsample_nearest) (DiffuseTensor *out, DiffuseTensor *x, GError **error);
  gboolean (*avg_pool2d) (DiffuseTensor *out, DiffuseTensor *x, int k, int stride, GError **error);

  gboolean (*group_norm) (DiffuseTensor *out, DiffuseTensor *x, int groups, DiffuseTensor *gamma,
                          DiffuseTensor *beta, float eps, DiffuseActivation act, GError **error);
  gboolean (*layer_norm) (DiffuseTensor *out, DiffuseTensor *x, DiffuseTensor *gamma, DiffuseTensor *beta,
                          float eps, GError **error);
  gboolean (*softmax) (DiffuseTensor *out, DiffuseTensor *x, GError **error);
  /* q/k/v [B, H, L, D] strided; mask NULL or expanded view [B, H, Lq, Lk] */
  gboolean (*sdpa) (DiffuseTensor *out, DiffuseTensor *q, DiffuseTensor *k, DiffuseTensor *v,
                    DiffuseTensor *mask, gboolean causal, float scale, GError **error);
  gboolean (*timestep_embedding) (DiffuseTensor *out, DiffuseTensor *t, gboolean flip_sin_to_cos,
                                  float downscale_freq_shift, float scale, float max_period, GError **error);
  gboolean (*embedding) (DiffuseTensor *out, DiffuseTensor *table, const int32_t *ids, int64_t n, GError **error);

  /* optional: gives every resource of the device back (cached memory,
   * streams, library handles) and frees backend_data; called by
   * diffuse_devices_shutdown() only when no storage is alive on dev */
  void (*close) (DiffuseDevice *dev);
};

/* Creates a device record for a backend (called by the backend itself). */
DiffuseDevice *diffuse_device_new (const DiffuseBackendOps *ops, const char *name, int index, gpointer backend_data);
const DiffuseBackendOps *diffuse_device_ops (DiffuseDevice *dev);
gpointer diffuse_device_backend_data (DiffuseDevice *dev);
int diffuse_device_index (DiffuseDevice *dev);

/* Registers an accelerator family ("cuda") so diffuse_device_get() can open
 * "cuda:N".  open() returns NULL + error when the device cannot be used;
 * count() says how many devices are usable now (0 when none / no driver). */
typedef DiffuseDevice *(*DiffuseBackendOpenFunc) (int index, GError **error);
typedef int (*DiffuseBackendCountFunc) (void);
void diffuse_backend_register (const char *prefix, DiffuseBackendOpenFunc open, DiffuseBackendCountFunc count);

/* A tensor view of out's shape onto x with stride 0 on broadcast dims (for
 * backends); x must be broadcastable to (ndim, shape). */
DiffuseTensor *diffuse_broadcast_to (DiffuseTensor *x, int ndim, const int64_t *shape);

G_END_DECLS
