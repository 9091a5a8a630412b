/* gst-diffuse — the generic op layer: checks shapes, allocates outputs on the
 * input's device and dispatches to that device's backend. */
#include "tensor-private.h"
#include <string.h>
#include <math.h>

#define DEV(t) ((t)->storage->dev)

static gboolean
same_device (DiffuseTensor *a, DiffuseTensor *b, const char *op)
{
  if (!b || DEV (a) == DEV (b))
    return TRUE;
  g_critical ("%s: tensors on different devices (%s, %s)", op, DEV (a)->name, DEV (b)->name);
  return FALSE;
}

static gboolean
unsupported (DiffuseDevice *dev, const char *op)
{
  diffuse_tensor_set_error (g_error_new (DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                                         "Operation %s is not available on device %s", op, dev->name));
  return FALSE;
}

/* Runs a backend call; on failure records the error and drops out. */
#define RUN(out, call)                                  \
  G_STMT_START {                                        \
    GError *err_ = NULL;                                \
    if (!(call)) {                                      \
      diffuse_tensor_set_error (err_);                  \
      diffuse_tensor_unref (out);                       \
      return NULL;                                      \
    }                                                   \
  } G_STMT_END
#define ERR (&err_)

#define NEED(dev, fn) G_STMT_START { if (!(dev)->ops->fn) { unsupported ((dev), #fn); return NULL; } } G_STMT_END

/* ---- copies & conversions ---------------------------------------------- */

DiffuseTensor *
diffuse_copy (DiffuseTensor *x)
{
  if (!x)
    return NULL;
  DiffuseTensor *out = diffuse_tensor_new (DEV (x), x->dtype, x->ndim, x->shape);
  if (!out)
    return NULL;
  RUN (out, DEV (x)->ops->copy (out, x, ERR));
  return out;
}

DiffuseTensor *
diffuse_contiguous (DiffuseTensor *x)
{
  if (!x)
    return NULL;
  if (diffuse_tensor_is_contiguous (x))
    return diffuse_tensor_ref (x);
  return diffuse_copy (x);
}

DiffuseTensor *
diffuse_cast (DiffuseTensor *x, DiffuseDType dt)
{
  if (!x)
    return NULL;
  if (x->dtype == dt)
    return diffuse_tensor_ref (x);
  DiffuseTensor *out = diffuse_tensor_new (DEV (x), dt, x->ndim, x->shape);
  if (!out)
    return NULL;
  RUN (out, DEV (x)->ops->copy (out, x, ERR));
  return out;
}

gboolean
diffuse_copy_into (DiffuseTensor *dst, DiffuseTensor *src)
{
  if (!dst || !src)
    return FALSE;
  g_return_val_if_fail (diffuse_tensor_same_shape (dst, src), FALSE);
  if (DEV (dst) == DEV (src)) {
    GError *err = NULL;
    if (!DEV (dst)->ops->copy (dst, src, &err)) {
      diffuse_tensor_set_error (err);
      return FALSE;
    }
    return TRUE;
  }
  DiffuseTensor *moved = diffuse_to_device (src, DEV (dst));
  if (!moved)
    return FALSE;
  GError *err = NULL;
  gboolean ok = DEV (dst)->ops->copy (dst, moved, &err);
  if (!ok)
    diffuse_tensor_set_error (err);
  diffuse_tensor_unref (moved);
  return ok;
}

DiffuseTensor *
diffuse_to_host_f32 (DiffuseTensor *x)
{
  DiffuseTensor *h = diffuse_to_device (x, diffuse_device_cpu ());
  DiffuseTensor *f = diffuse_cast (h, DIFFUSE_DTYPE_F32);
  diffuse_tensor_clear (&h);
  DiffuseTensor *c = diffuse_contiguous (f);
  diffuse_tensor_clear (&f);
  return c;
}

DiffuseTensor *
diffuse_to_device (DiffuseTensor *x, DiffuseDevice *dev)
{
  if (!x)
    return NULL;
  if (DEV (x) == dev)
    return diffuse_tensor_ref (x);
  DiffuseTensor *src = diffuse_contiguous (x);
  if (!src)
    return NULL;
  DiffuseTensor *out = diffuse_tensor_new (dev, x->dtype, x->ndim, x->shape);
  if (!out) {
    diffuse_tensor_unref (src);
    return NULL;
  }
  GError *err = NULL;
  gboolean ok;
  size_t n = diffuse_tensor_nbytes (out);
  if (diffuse_device_is_cpu (DEV (src)))
    ok = dev->ops->upload (dev, out->storage->data, diffuse_tensor_data (src), n, &err);
  else if (diffuse_device_is_cpu (dev))
    ok = DEV (src)->ops->download (DEV (src), diffuse_tensor_data (out),
                                   (char *) src->storage->data + src->offset, n, &err);
  else {
    /* device to device through the host */
    DiffuseTensor *host = diffuse_to_device (src, diffuse_device_cpu ());
    ok = host != NULL;
    if (ok)
      ok = dev->ops->upload (dev, out->storage->data, diffuse_tensor_data (host), n, &err);
    diffuse_tensor_clear (&host);
  }
  diffuse_tensor_unref (src);
  if (!ok) {
    if (err)
      diffuse_tensor_set_error (err);
    diffuse_tensor_unref (out);
    return NULL;
  }
  return out;
}

DiffuseTensor *
diffuse_concat (DiffuseTensor *const *xs, int n, int dim)
{
  g_return_val_if_fail (n > 0, NULL);
  for (int i = 0; i < n; i++)
    if (!xs[i])
      return NULL;
  DiffuseTensor *x0 = xs[0];
  if (dim < 0)
    dim += x0->ndim;
  g_return_val_if_fail (dim >= 0 && dim < x0->ndim, NULL);
  int64_t shape[DIFFUSE_MAX_DIMS];
  memcpy (shape, x0->shape, sizeof shape);
  shape[dim] = 0;
  for (int i = 0; i < n; i++) {
    g_return_val_if_fail (xs[i]->ndim == x0->ndim && same_device (x0, xs[i], "concat"), NULL);
    for (int d = 0; d < x0->ndim; d++)
      g_return_val_if_fail (d == dim || xs[i]->shape[d] == x0->shape[d], NULL);
    shape[dim] += xs[i]->shape[dim];
  }
  DiffuseTensor *out = diffuse_tensor_new (DEV (x0), x0->dtype, x0->ndim, shape);
  if (!out)
    return NULL;
  int64_t at = 0;
  for (int i = 0; i < n; i++) {
    DiffuseTensor *dst = diffuse_narrow (out, dim, at, xs[i]->shape[dim]);
    GError *err = NULL;
    gboolean ok = DEV (x0)->ops->copy (dst, xs[i], &err);
    diffuse_tensor_unref (dst);
    if (!ok) {
      diffuse_tensor_set_error (err);
      diffuse_tensor_unref (out);
      return NULL;
    }
    at += xs[i]->shape[dim];
  }
  return out;
}

/* ---- element-wise ------------------------------------------------------ */

static gboolean
broadcast_shape (DiffuseTensor *a, DiffuseTensor *b, int *ndim, int64_t *shape)
{
  int n = MAX (a->ndim, b->ndim);
  for (int i = 0; i < n; i++) {
    int ia = i - (n - a->ndim), ib = i - (n - b->ndim);
    int64_t sa = ia >= 0 ? a->shape[ia] : 1;
    int64_t sb = ib >= 0 ? b->shape[ib] : 1;
    if (sa != sb && sa != 1 && sb != 1) {
      char *da = diffuse_tensor_describe (a), *db = diffuse_tensor_describe (b);
      g_critical ("cannot broadcast %s with %s", da, db);
      g_free (da);
      g_free (db);
      return FALSE;
    }
    shape[i] = sa == 1 ? sb : sa;
  }
  *ndim = n;
  return TRUE;
}

static DiffuseTensor *
binary (DiffuseBinaryOp op, DiffuseTensor *a, DiffuseTensor *b)
{
  if (!a || !b)
    return NULL;
  if (!same_device (a, b, "binary op"))
    return NULL;
  int ndim;
  int64_t shape[DIFFUSE_MAX_DIMS];
  if (!broadcast_shape (a, b, &ndim, shape))
    return NULL;
  NEED (DEV (a), binary);
  DiffuseTensor *out = diffuse_tensor_new (DEV (a), a->dtype, ndim, shape);
  if (!out)
    return NULL;
  DiffuseTensor *ea = diffuse_broadcast_to (a, ndim, shape);
  DiffuseTensor *eb = diffuse_broadcast_to (b, ndim, shape);
  GError *err = NULL;
  gboolean ok = DEV (a)->ops->binary (op, out, ea, eb, &err);
  diffuse_tensor_unref (ea);
  diffuse_tensor_unref (eb);
  if (!ok) {
    diffuse_tensor_set_error (err);
    diffuse_tensor_unref (out);
    return NULL;
  }
  return out;
}

DiffuseTensor *diffuse_add (DiffuseTensor *a, DiffuseTensor *b) { return binary (DIFFUSE_BINARY_ADD, a, b); }
DiffuseTensor *diffuse_sub (DiffuseTensor *a, DiffuseTensor *b) { return binary (DIFFUSE_BINARY_SUB, a, b); }
DiffuseTensor *diffuse_mul (DiffuseTensor *a, DiffuseTensor *b) { return binary (DIFFUSE_BINARY_MUL, a, b); }
DiffuseTensor *diffuse_div (DiffuseTensor *a, DiffuseTensor *b) { return binary (DIFFUSE_BINARY_DIV, a, b); }

DiffuseTensor *
diffuse_scale (DiffuseTensor *x, float s, float b)
{
  if (!x)
    return NULL;
  NEED (DEV (x), scale);
  DiffuseTensor *out = diffuse_tensor_new (DEV (x), x->dtype, x->ndim, x->shape);
  if (!out)
    return NULL;
  RUN (out, DEV (x)->ops->scale (out, x, s, b, ERR));
  return out;
}

gboolean
diffuse_axpy_inplace (DiffuseTensor *a, float alpha, DiffuseTensor *b)
{
  if (!a || !b)
    return FALSE;
  g_return_val_if_fail (diffuse_tensor_same_shape (a, b) && diffuse_tensor_is_contiguous (a), FALSE);
  g_return_val_if_fail (same_device (a, b, "axpy"), FALSE);
  if (!DEV (a)->ops->axpy)
    return unsupported (DEV (a), "axpy");
  GError *err = NULL;
  if (!DEV (a)->ops->axpy (a, alpha, b, &err)) {
    diffuse_tensor_set_error (err);
    return FALSE;
  }
  return TRUE;
}

DiffuseTensor *
diffuse_activation (DiffuseTensor *x, DiffuseActivation act)
{
  if (!x)
    return NULL;
  if (act == DIFFUSE_ACT_NONE)
    return diffuse_tensor_ref (x);
  NEED (DEV (x), activation);
  DiffuseTensor *out = diffuse_tensor_new (DEV (x), x->dtype, x->ndim, x->shape);
  if (!out)
    return NULL;
  RUN (out, DEV (x)->ops->activation (out, x, act, ERR));
  return out;
}

gboolean
diffuse_activation_from_string (const char *s, DiffuseActivation *out)
{
  static const struct { const char *name; DiffuseActivation act; } names[] = {
    { "silu", DIFFUSE_ACT_SILU }, { "swish", DIFFUSE_ACT_SILU }, { "gelu", DIFFUSE_ACT_GELU },
    { "gelu_pytorch_tanh", DIFFUSE_ACT_GELU_TANH }, { "gelu_new", DIFFUSE_ACT_GELU_TANH },
    { "gelu-approximate", DIFFUSE_ACT_GELU_TANH }, { "gelu_fast", DIFFUSE_ACT_GELU_TANH },
    { "quick_gelu", DIFFUSE_ACT_QUICK_GELU }, { "relu", DIFFUSE_ACT_RELU },
    { "sigmoid", DIFFUSE_ACT_SIGMOID }, { "none", DIFFUSE_ACT_NONE }, { "linear", DIFFUSE_ACT_NONE },
  };
  if (!s)
    return FALSE;
  for (guint i = 0; i < G_N_ELEMENTS (names); i++)
    if (g_ascii_strcasecmp (s, names[i].name) == 0) {
      if (out)
        *out = names[i].act;
      return TRUE;
    }
  return FALSE;
}

DiffuseTensor *
diffuse_geglu (DiffuseTensor *x)
{
  if (!x)
    return NULL;
  g_return_val_if_fail (x->ndim >= 1 && x->shape[x->ndim - 1] % 2 == 0, NULL);
  NEED (DEV (x), geglu);
  int64_t shape[DIFFUSE_MAX_DIMS];
  memcpy (shape, x->shape, sizeof shape);
  shape[x->ndim - 1] /= 2;
  DiffuseTensor *out = diffuse_tensor_new (DEV (x), x->dtype, x->ndim, shape);
  if (!out)
    return NULL;
  RUN (out, DEV (x)->ops->geglu (out, x, ERR));
  return out;
}

/* ---- linear algebra ---------------------------------------------------- */

DiffuseTensor *
diffuse_linear (DiffuseTensor *x, DiffuseTensor *w, DiffuseTensor *b)
{
  if (!x || !w)
    return NULL;
  g_return_val_if_fail (w->ndim == 2 && x->ndim >= 1, NULL);
  int64_t K = x->shape[x->ndim - 1];
  int64_t N = w->shape[0];
  if (w->shape[1] != K) {
    char *dx = diffuse_tensor_describe (x), *dw = diffuse_tensor_describe (w);
    g_critical ("diffuse_linear: input %s does not match weight %s", dx, dw);
    g_free (dx);
    g_free (dw);
    return NULL;
  }
  g_return_val_if_fail (!b || (b->ndim == 1 && b->shape[0] == N), NULL);
  g_return_val_if_fail (same_device (x, w, "linear") && same_device (x, b, "linear"), NULL);
  NEED (DEV (x), linear);
  DiffuseTensor *xc = diffuse_contiguous (x);
  if (!xc)
    return NULL;
  int64_t M = diffuse_tensor_numel (x) / MAX (K, 1);
  int64_t shape[DIFFUSE_MAX_DIMS];
  memcpy (shape, x->shape, sizeof shape);
  shape[x->ndim - 1] = N;
  DiffuseTensor *out = diffuse_tensor_new (DEV (x), x->dtype, x->ndim, shape);
  if (!out) {
    diffuse_tensor_unref (xc);
    return NULL;
  }
  DiffuseTensor *x2 = diffuse_reshape_4d (xc, 1, 1, M, K);
  DiffuseTensor *o2 = diffuse_reshape_4d (out, 1, 1, M, N);
  diffuse_tensor_unref (xc);
  /* backends see [M, K] and [M, N] as 2-D */
  x2->ndim = 2; x2->shape[0] = M; x2->shape[1] = K; x2->stride[0] = K; x2->stride[1] = 1;
  o2->ndim = 2; o2->shape[0] = M; o2->shape[1] = N; o2->stride[0] = N; o2->stride[1] = 1;
  GError *err = NULL;
  gboolean ok = DEV (x)->ops->linear (o2, x2, w, b, &err);
  diffuse_tensor_unref (x2);
  diffuse_tensor_unref (o2);
  if (!ok) {
    diffuse_tensor_set_error (err);
    diffuse_tensor_unref (out);
    return NULL;
  }
  return out;
}

/* Makes the last two dims GEMM-friendly: unit stride along one of them. */
static DiffuseTensor *
gemm_ready (DiffuseTensor *x)
{
  int n = x->ndim;
  if (x->stride[n - 1] == 1 && x->stride[n - 2] >= MAX (x->shape[n - 1], 1))
    return diffuse_tensor_ref (x);
  if (x->stride[n - 2] == 1 && x->stride[n - 1] >= MAX (x->shape[n - 2], 1))
    return diffuse_tensor_ref (x);
  return diffuse_copy (x);
}

DiffuseTensor *
diffuse_matmul (DiffuseTensor *a, DiffuseTensor *b, gboolean trans_a, gboolean trans_b, float alpha)
{
  if (!a || !b)
    return NULL;
  g_return_val_if_fail (a->ndim >= 2 && b->ndim >= 2, NULL);
  g_return_val_if_fail (same_device (a, b, "matmul"), NULL);
  int64_t M = trans_a ? a->shape[a->ndim - 1] : a->shape[a->ndim - 2];
  int64_t Ka = trans_a ? a->shape[a->ndim - 2] : a->shape[a->ndim - 1];
  int64_t Kb = trans_b ? b->shape[b->ndim - 1] : b->shape[b->ndim - 2];
  int64_t N = trans_b ? b->shape[b->ndim - 2] : b->shape[b->ndim - 1];
  if (Ka != Kb) {
    char *da = diffuse_tensor_describe (a), *db = diffuse_tensor_describe (b);
    g_critical ("diffuse_matmul: inner dims differ: %s x %s", da, db);
    g_free (da);
    g_free (db);
    return NULL;
  }
  NEED (DEV (a), matmul);
  /* broadcast batch dims */
  int nb = MAX (a->ndim, b->ndim) - 2;
  int64_t shape[DIFFUSE_MAX_DIMS];
  for (int i = 0; i < nb; i++) {
    int ia = i - (nb - (a->ndim - 2)), ib = i - (nb - (b->ndim - 2));
    int64_t sa = ia >= 0 ? a->shape[ia] : 1, sb = ib >= 0 ? b->shape[ib] : 1;
    g_return_val_if_fail (sa == sb || sa == 1 || sb == 1, NULL);
    shape[i] = MAX (sa, sb);
  }
  shape[nb] = M;
  shape[nb + 1] = N;
  int64_t sa_shape[DIFFUSE_MAX_DIMS], sb_shape[DIFFUSE_MAX_DIMS];
  memcpy (sa_shape, shape, sizeof shape);
  memcpy (sb_shape, shape, sizeof shape);
  sa_shape[nb] = a->shape[a->ndim - 2];
  sa_shape[nb + 1] = a->shape[a->ndim - 1];
  sb_shape[nb] = b->shape[b->ndim - 2];
  sb_shape[nb + 1] = b->shape[b->ndim - 1];
  DiffuseTensor *ra = gemm_ready (a), *rb = gemm_ready (b);
  if (!ra || !rb) {
    diffuse_tensor_clear (&ra);
    diffuse_tensor_clear (&rb);
    return NULL;
  }
  DiffuseTensor *ea = diffuse_broadcast_to (ra, nb + 2, sa_shape);
  DiffuseTensor *eb = diffuse_broadcast_to (rb, nb + 2, sb_shape);
  /* broadcast_to zeroes the strides of size-1 dims: keep the matrix strides */
  for (int i = 0; i < 2; i++) {
    ea->stride[nb + i] = ra->stride[ra->ndim - 2 + i];
    eb->stride[nb + i] = rb->stride[rb->ndim - 2 + i];
  }
  diffuse_tensor_unref (ra);
  diffuse_tensor_unref (rb);
  DiffuseTensor *out = diffuse_tensor_new (DEV (a), a->dtype, nb + 2, shape);
  GError *err = NULL;
  gboolean ok = out && DEV (a)->ops->matmul (out, ea, eb, trans_a, trans_b, alpha, &err);
  diffuse_tensor_unref (ea);
  diffuse_tensor_unref (eb);
  if (!ok) {
    if (err)
      diffuse_tensor_set_error (err);
    diffuse_tensor_clear (&out);
    return NULL;
  }
  return out;
}

/* ---- convolution & resampling ------------------------------------------ */

DiffuseTensor *
diffuse_conv2d (DiffuseTensor *x, DiffuseTensor *w, DiffuseTensor *b, int stride_h, int stride_w, int pad_h,
                int pad_w)
{
  if (!x || !w)
    return NULL;
  g_return_val_if_fail (x->ndim == 4 && w->ndim == 4, NULL);
  g_return_val_if_fail (stride_h > 0 && stride_w > 0 && pad_h >= 0 && pad_w >= 0, NULL);
  if (w->shape[1] != x->shape[1]) {
    char *dx = diffuse_tensor_describe (x), *dw = diffuse_tensor_describe (w);
    g_critical ("diffuse_conv2d: input %s does not match weight %s", dx, dw);
    g_free (dx);
    g_free (dw);
    return NULL;
  }
  g_return_val_if_fail (!b || (b->ndim == 1 && b->shape[0] == w->shape[0]), NULL);
  g_return_val_if_fail (same_device (x, w, "conv2d") && same_device (x, b, "conv2d"), NULL);
  int64_t Ho = (x->shape[2] + 2 * pad_h - w->shape[2]) / stride_h + 1;
  int64_t Wo = (x->shape[3] + 2 * pad_w - w->shape[3]) / stride_w + 1;
  g_return_val_if_fail (Ho > 0 && Wo > 0, NULL);
  NEED (DEV (x), conv2d);
  DiffuseTensor *out = diffuse_tensor_new_4d (DEV (x), x->dtype, x->shape[0], w->shape[0], Ho, Wo);
  if (!out)
    return NULL;
  RUN (out, DEV (x)->ops->conv2d (out, x, w, b, stride_h, stride_w, pad_h, pad_w, ERR));
  return out;
}

DiffuseTensor *
diffuse_pad2d (DiffuseTensor *x, int left, int right, int top, int bottom)
{
  if (!x)
    return NULL;
  g_return_val_if_fail (x->ndim >= 2 && left >= 0 && right >= 0 && top >= 0 && bottom >= 0, NULL);
  NEED (DEV (x), pad2d);
  int64_t shape[DIFFUSE_MAX_DIMS];
  memcpy (shape, x->shape, sizeof shape);
  shape[x->ndim - 2] += top + bottom;
  shape[x->ndim - 1] += left + right;
  DiffuseTensor *out = diffuse_tensor_new (DEV (x), x->dtype, x->ndim, shape);
  if (!out)
    return NULL;
  RUN (out, DEV (x)->ops->pad2d (out, x, left, top, ERR));
  return out;
}

DiffuseTensor *
diffuse_upsample_nearest (DiffuseTensor *x, int out_h, int out_w)
{
  if (!x)
    return NULL;
  g_return_val_if_fail (x->ndim == 4 && out_h > 0 && out_w > 0, NULL);
  NEED (DEV (x), upsample_nearest);
  DiffuseTensor *out = diffuse_tensor_new_4d (DEV (x), x->dtype, x->shape[0], x->shape[1], out_h, out_w);
  if (!out)
    return NULL;
  RUN (out, DEV (x)->ops->upsample_nearest (out, x, ERR));
  return out;
}

DiffuseTensor *
diffuse_avg_pool2d (DiffuseTensor *x, int k, int stride)
{
  if (!x)
    return NULL;
  g_return_val_if_fail (x->ndim == 4 && k > 0 && stride > 0, NULL);
  NEED (DEV (x), avg_pool2d);
  int64_t Ho = (x->shape[2] - k) / stride + 1, Wo = (x->shape[3] - k) / stride + 1;
  g_return_val_if_fail (Ho > 0 && Wo > 0, NULL);
  DiffuseTensor *out = diffuse_tensor_new_4d (DEV (x), x->dtype, x->shape[0], x->shape[1], Ho, Wo);
  if (!out)
    return NULL;
  RUN (out, DEV (x)->ops->avg_pool2d (out, x, k, stride, ERR));
  return out;
}

/* ---- normalisation ----------------------------------------------------- */

DiffuseTensor *
diffuse_group_norm (DiffuseTensor *x, int groups, DiffuseTensor *gamma, DiffuseTensor *beta, float eps,
                    DiffuseActivation fused_act)
{
  if (!x)
    return NULL;
  g_return_val_if_fail (x->ndim >= 2 && groups > 0 && x->shape[1] % groups == 0, NULL);
  g_return_val_if_fail (!gamma || diffuse_tensor_numel (gamma) == x->shape[1], NULL);
  g_return_val_if_fail (!beta || diffuse_tensor_numel (beta) == x->shape[1], NULL);
  NEED (DEV (x), group_norm);
  DiffuseTensor *out = diffuse_tensor_new (DEV (x), x->dtype, x->ndim, x->shape);
  if (!out)
    return NULL;
  RUN (out, DEV (x)->ops->group_norm (out, x, groups, gamma, beta, eps, fused_act, ERR));
  return out;
}

DiffuseTensor *
diffuse_layer_norm (DiffuseTensor *x, DiffuseTensor *gamma, DiffuseTensor *beta, float eps)
{
  if (!x)
    return NULL;
  int64_t D = x->shape[x->ndim - 1];
  g_return_val_if_fail (!gamma || diffuse_tensor_numel (gamma) == D, NULL);
  g_return_val_if_fail (!beta || diffuse_tensor_numel (beta) == D, NULL);
  NEED (DEV (x), layer_norm);
  DiffuseTensor *out = diffuse_tensor_new (DEV (x), x->dtype, x->ndim, x->shape);
  if (!out)
    return NULL;
  RUN (out, DEV (x)->ops->layer_norm (out, x, gamma, beta, eps, ERR));
  return out;
}

DiffuseTensor *
diffuse_softmax (DiffuseTensor *x)
{
  if (!x)
    return NULL;
  NEED (DEV (x), softmax);
  DiffuseTensor *out = diffuse_tensor_new (DEV (x), x->dtype, x->ndim, x->shape);
  if (!out)
    return NULL;
  RUN (out, DEV (x)->ops->softmax (out, x, ERR));
  return out;
}

DiffuseTensor *
diffuse_sdpa (DiffuseTensor *q, DiffuseTensor *k, DiffuseTensor *v, DiffuseTensor *mask, gboolean causal,
              float scale)
{
  if (!q || !k || !v)
    return NULL;
  g_return_val_if_fail (q->ndim == 4 && k->ndim == 4 && v->ndim == 4, NULL);
  g_return_val_if_fail (q->shape[0] == k->shape[0] && q->shape[1] == k->shape[1] && q->shape[3] == k->shape[3],
                        NULL);
  g_return_val_if_fail (k->shape[0] == v->shape[0] && k->shape[1] == v->shape[1] && k->shape[2] == v->shape[2],
                        NULL);
  g_return_val_if_fail (same_device (q, k, "sdpa") && same_device (q, v, "sdpa") && same_device (q, mask, "sdpa"),
                        NULL);
  NEED (DEV (q), sdpa);
  int64_t shape[4] = { q->shape[0], q->shape[1], q->shape[2], v->shape[3] };
  if (scale <= 0.0f)
    scale = 1.0f / sqrtf ((float) q->shape[3]);
  DiffuseTensor *em = NULL;
  if (mask) {
    int64_t ms[4] = { q->shape[0], q->shape[1], q->shape[2], k->shape[2] };
    em = diffuse_broadcast_to (mask, 4, ms);
    if (!em)
      return NULL;
  }
  DiffuseTensor *out = diffuse_tensor_new (DEV (q), q->dtype, 4, shape);
  GError *err = NULL;
  gboolean ok = out && DEV (q)->ops->sdpa (out, q, k, v, em, causal, scale, &err);
  diffuse_tensor_clear (&em);
  if (!ok) {
    if (err)
      diffuse_tensor_set_error (err);
    diffuse_tensor_clear (&out);
    return NULL;
  }
  return out;
}

/* ---- misc ---------------------------------------------------------------- */

DiffuseTensor *
diffuse_timestep_embedding (DiffuseTensor *t, int dim, gboolean flip_sin_to_cos, float downscale_freq_shift,
                            float scale, float max_period)
{
  if (!t)
    return NULL;
  g_return_val_if_fail (t->ndim == 1 && dim > 0, NULL);
  NEED (DEV (t), timestep_embedding);
  int64_t shape[2] = { t->shape[0], dim };
  DiffuseTensor *out = diffuse_tensor_new (DEV (t), DIFFUSE_DTYPE_F32, 2, shape);
  if (!out)
    return NULL;
  RUN (out, DEV (t)->ops->timestep_embedding (out, t, flip_sin_to_cos, downscale_freq_shift, scale, max_period,
                                                 ERR));
  return out;
}

DiffuseTensor *
diffuse_embedding (DiffuseTensor *table, const int32_t *ids, int64_t n)
{
  if (!table)
    return NULL;
  g_return_val_if_fail (table->ndim == 2 && n >= 0, NULL);
  for (int64_t i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= table->shape[0]) {
      diffuse_tensor_set_error (g_error_new (DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                                             "Token id %d out of range (vocabulary of %" G_GINT64_FORMAT ")",
                                             ids[i], (gint64) table->shape[0]));
      return NULL;
    }
  NEED (DEV (table), embedding);
  int64_t shape[2] = { n, table->shape[1] };
  DiffuseTensor *out = diffuse_tensor_new (DEV (table), table->dtype, 2, shape);
  if (!out)
    return NULL;
  RUN (out, DEV (table)->ops->embedding (out, table, ids, n, ERR));
  return out;
}

static DiffuseTensor *
host_f32 (DiffuseTensor *x)
{
  DiffuseTensor *h = diffuse_to_device (x, diffuse_device_cpu ());
  DiffuseTensor *f = diffuse_cast (h, DIFFUSE_DTYPE_F32);
  diffuse_tensor_clear (&h);
  DiffuseTensor *c = diffuse_contiguous (f);
  diffuse_tensor_clear (&f);
  return c;
}

double
diffuse_tensor_max_abs_diff (DiffuseTensor *a, DiffuseTensor *b)
{
  g_return_val_if_fail (a && b && diffuse_tensor_numel (a) == diffuse_tensor_numel (b), INFINITY);
  DiffuseTensor *ha = host_f32 (a), *hb = host_f32 (b);
  double m = 0;
  if (ha && hb) {
    const float *pa = diffuse_tensor_f32 (ha), *pb = diffuse_tensor_f32 (hb);
    int64_t n = diffuse_tensor_numel (ha);
    for (int64_t i = 0; i < n; i++) {
      double d = fabs ((double) pa[i] - (double) pb[i]);
      if (isnan (d)) {
        if (isnan (pa[i]) && isnan (pb[i]))
          continue;
        m = INFINITY;
        break;
      }
      if (d > m)
        m = d;
    }
  } else {
    m = INFINITY;
  }
  diffuse_tensor_clear (&ha);
  diffuse_tensor_clear (&hb);
  return m;
}

double
diffuse_tensor_max_abs (DiffuseTensor *a)
{
  DiffuseTensor *h = host_f32 (a);
  if (!h)
    return INFINITY;
  double m = 0;
  const float *p = diffuse_tensor_f32 (h);
  for (int64_t i = 0, n = diffuse_tensor_numel (h); i < n; i++)
    if (fabs (p[i]) > m)
      m = fabs (p[i]);
  diffuse_tensor_unref (h);
  return m;
}
