/* gst-diffuse — tensor records, storage, devices, views. */
#include "tensor-private.h"
#include "diffuse-config.h"
#include <string.h>
#include <stdio.h>
#if DIFFUSE_HAVE_CUDA
#include "diffuse-cuda.h"
#endif

/* ---- dtypes ------------------------------------------------------------ */

const char *
diffuse_dtype_name (DiffuseDType dt)
{
  switch (dt) {
    case DIFFUSE_DTYPE_F32: return "float32";
    case DIFFUSE_DTYPE_F16: return "float16";
    case DIFFUSE_DTYPE_BF16: return "bfloat16";
    default: return "invalid";
  }
}

size_t
diffuse_dtype_size (DiffuseDType dt)
{
  return dt == DIFFUSE_DTYPE_F32 ? 4 : 2;
}

gboolean
diffuse_dtype_from_string (const char *s, DiffuseDType *out)
{
  if (!s)
    return FALSE;
  if (g_str_has_prefix (s, "torch."))
    s += 6;
  static const struct { const char *name; DiffuseDType dt; } names[] = {
    { "f32", DIFFUSE_DTYPE_F32 }, { "fp32", DIFFUSE_DTYPE_F32 }, { "float32", DIFFUSE_DTYPE_F32 },
    { "float", DIFFUSE_DTYPE_F32 }, { "f16", DIFFUSE_DTYPE_F16 }, { "fp16", DIFFUSE_DTYPE_F16 },
    { "float16", DIFFUSE_DTYPE_F16 }, { "half", DIFFUSE_DTYPE_F16 }, { "bf16", DIFFUSE_DTYPE_BF16 },
    { "bfloat16", DIFFUSE_DTYPE_BF16 },
  };
  for (guint i = 0; i < G_N_ELEMENTS (names); i++)
    if (g_ascii_strcasecmp (s, names[i].name) == 0) {
      if (out)
        *out = names[i].dt;
      return TRUE;
    }
  return FALSE;
}

/* ---- devices ----------------------------------------------------------- */

DiffuseDevice *
diffuse_device_new (const DiffuseBackendOps *ops, const char *name, int index, gpointer backend_data)
{
  DiffuseDevice *dev = g_new0 (DiffuseDevice, 1);
  dev->ops = ops;
  dev->name = g_strdup (name);
  dev->index = index;
  dev->backend_data = backend_data;
  return dev;
}

const DiffuseBackendOps *diffuse_device_ops (DiffuseDevice *dev) { return dev->ops; }
gpointer diffuse_device_backend_data (DiffuseDevice *dev) { return dev->backend_data; }
int diffuse_device_index (DiffuseDevice *dev) { return dev->index; }
const char *diffuse_device_name (DiffuseDevice *dev) { return dev->name; }
gboolean diffuse_device_is_cpu (DiffuseDevice *dev) { return dev == diffuse_device_cpu (); }

DiffuseDevice *
diffuse_device_cpu (void)
{
  static gsize cpu;
  if (g_once_init_enter (&cpu)) {
    DiffuseDevice *d = diffuse_device_new (_diffuse_cpu_backend_ops (), "cpu", 0, NULL);
    g_once_init_leave (&cpu, (gsize) d);
  }
  return (DiffuseDevice *) cpu;
}

typedef struct {
  char *prefix;
  DiffuseBackendOpenFunc open;
  DiffuseBackendCountFunc count;
  GPtrArray *opened;     /* index -> DiffuseDevice* (or NULL) */
} BackendEntry;

static GMutex backends_lock;
static GPtrArray *backends;

void
diffuse_backend_register (const char *prefix, DiffuseBackendOpenFunc open, DiffuseBackendCountFunc count)
{
  g_mutex_lock (&backends_lock);
  if (!backends)
    backends = g_ptr_array_new ();
  BackendEntry *e = g_new0 (BackendEntry, 1);
  e->prefix = g_strdup (prefix);
  e->open = open;
  e->count = count;
  e->opened = g_ptr_array_new ();
  g_ptr_array_add (backends, e);
  g_mutex_unlock (&backends_lock);
}

static DiffuseDevice *
open_backend_device (BackendEntry *e, int index, GError **error)
{
  if (index < (int) e->opened->len && g_ptr_array_index (e->opened, index))
    return g_ptr_array_index (e->opened, index);
  DiffuseDevice *dev = e->open (index, error);
  if (!dev)
    return NULL;
  if (index >= (int) e->opened->len)
    g_ptr_array_set_size (e->opened, index + 1);
  g_ptr_array_index (e->opened, index) = dev;
  return dev;
}

gboolean
diffuse_devices_shutdown (void)
{
  gboolean all = TRUE;
  g_mutex_lock (&backends_lock);
  for (guint i = 0; backends && i < backends->len; i++) {
    BackendEntry *e = g_ptr_array_index (backends, i);
    for (guint j = 0; j < e->opened->len; j++) {
      DiffuseDevice *dev = g_ptr_array_index (e->opened, j);
      if (!dev)
        continue;
      gint64 live = __atomic_load_n (&dev->resident, __ATOMIC_RELAXED);
      if (live != 0) {
        g_warning ("%s: %" G_GINT64_FORMAT " bytes of tensors still alive: the device stays open", dev->name,
                   live);
        all = FALSE;
        continue;
      }
      if (dev->ops->close)
        dev->ops->close (dev);
      g_ptr_array_index (e->opened, j) = NULL;
      g_free (dev->name);
      g_free (dev);
    }
  }
  g_mutex_unlock (&backends_lock);
  return all;
}

/* Accelerator backends built into this library register themselves once,
 * the first time a device is asked for by name. */
static void
register_builtin_backends (void)
{
#if DIFFUSE_HAVE_CUDA
  static gsize done;
  if (g_once_init_enter (&done)) {
    _diffuse_cuda_register ();
    g_once_init_leave (&done, 1);
  }
#endif
}

DiffuseDevice *
diffuse_device_get (const char *name, GError **error)
{
  if (!name || !*name || g_ascii_strcasecmp (name, "cpu") == 0)
    return diffuse_device_cpu ();
  register_builtin_backends ();

  DiffuseDevice *dev = NULL;
  g_mutex_lock (&backends_lock);
  if (g_ascii_strcasecmp (name, "auto") == 0) {
    for (guint i = 0; backends && i < backends->len && !dev; i++) {
      BackendEntry *e = g_ptr_array_index (backends, i);
      if (e->count () > 0) {
        GError *err = NULL;
        dev = open_backend_device (e, 0, &err);
        if (!dev) {
          g_message ("device=auto: %s:0 cannot be used (%s); running on the CPU", e->prefix, err->message);
          g_error_free (err);
        }
      }
    }
    g_mutex_unlock (&backends_lock);
    if (!dev) {
      static gsize logged;
      if (g_once_init_enter (&logged)) {
        g_message ("device=auto: no accelerator available, running on the CPU");
        g_once_init_leave (&logged, 1);
      }
      dev = diffuse_device_cpu ();
    }
    return dev;
  }

  const char *colon = strchr (name, ':');
  gsize plen = colon ? (gsize) (colon - name) : strlen (name);
  int index = 0;
  if (colon) {
    char *end = NULL;
    gint64 v = g_ascii_strtoll (colon + 1, &end, 10);
    if (!end || *end || end == colon + 1 || v < 0 || v > 1024) {
      g_mutex_unlock (&backends_lock);
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                   "Invalid device \"%s\": expected cpu, auto, cuda or cuda:N", name);
      return NULL;
    }
    index = (int) v;
  }
  for (guint i = 0; backends && i < backends->len; i++) {
    BackendEntry *e = g_ptr_array_index (backends, i);
    if (strlen (e->prefix) == plen && g_ascii_strncasecmp (e->prefix, name, plen) == 0) {
      int n = e->count ();
      if (index >= n) {
        g_mutex_unlock (&backends_lock);
        g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_DEVICE,
                     "Device \"%s\" does not exist (%d %s device%s usable)", name, n, e->prefix,
                     n == 1 ? "" : "s");
        return NULL;
      }
      dev = open_backend_device (e, index, error);
      g_mutex_unlock (&backends_lock);
      return dev;
    }
  }
  g_mutex_unlock (&backends_lock);
  if (plen == 4 && g_ascii_strncasecmp (name, "cuda", 4) == 0)
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_DEVICE,
                 "Device \"%s\" is not available: this build has no CUDA backend", name);
  else
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "Unknown device \"%s\": expected cpu, auto, cuda or cuda:N", name);
  return NULL;
}

void
diffuse_device_get_mem_stats (DiffuseDevice *dev, DiffuseMemStats *out)
{
  out->resident_bytes = (guint64) __atomic_load_n (&dev->resident, __ATOMIC_RELAXED);
  out->peak_bytes = (guint64) __atomic_load_n (&dev->peak, __ATOMIC_RELAXED);
  out->borrowed_bytes = (guint64) __atomic_load_n (&dev->borrowed, __ATOMIC_RELAXED);
  out->n_allocs = (guint64) __atomic_load_n (&dev->n_allocs, __ATOMIC_RELAXED);
}

void
diffuse_device_reset_peak (DiffuseDevice *dev)
{
  __atomic_store_n (&dev->peak, __atomic_load_n (&dev->resident, __ATOMIC_RELAXED), __ATOMIC_RELAXED);
}

static void
account_alloc (DiffuseDevice *dev, gint64 n)
{
  gint64 now = __atomic_add_fetch (&dev->resident, n, __ATOMIC_RELAXED);
  __atomic_add_fetch (&dev->n_allocs, 1, __ATOMIC_RELAXED);
  gint64 peak = __atomic_load_n (&dev->peak, __ATOMIC_RELAXED);
  while (now > peak && !__atomic_compare_exchange_n (&dev->peak, &peak, now, TRUE, __ATOMIC_RELAXED,
                                                       __ATOMIC_RELAXED))
    ;
}

/* ---- storage ----------------------------------------------------------- */

static DiffuseStorage *
storage_alloc (DiffuseDevice *dev, size_t nbytes)
{
  GError *err = NULL;
  gpointer data = dev->ops->alloc (dev, nbytes ? nbytes : 1, &err);
  if (!data) {
    diffuse_tensor_set_error (err);
    return NULL;
  }
  DiffuseStorage *st = g_new0 (DiffuseStorage, 1);
  st->ref_count = 1;
  st->dev = dev;
  st->data = data;
  st->nbytes = nbytes;
  account_alloc (dev, (gint64) nbytes);
  return st;
}

static void
storage_unref (DiffuseStorage *st)
{
  if (!g_atomic_int_dec_and_test (&st->ref_count))
    return;
  if (st->borrowed) {
    __atomic_sub_fetch (&st->dev->borrowed, (gint64) st->nbytes, __ATOMIC_RELAXED);
    if (st->release)
      st->release (st->user_data);
  } else {
    st->dev->ops->free (st->dev, st->data);
    __atomic_sub_fetch (&st->dev->resident, (gint64) st->nbytes, __ATOMIC_RELAXED);
  }
  g_free (st);
}

/* ---- tensors ----------------------------------------------------------- */

void
_diffuse_contiguous_strides (int ndim, const int64_t *shape, int64_t *stride)
{
  int64_t s = 1;
  for (int i = ndim - 1; i >= 0; i--) {
    stride[i] = s;
    s *= shape[i];
  }
}

DiffuseTensor *
_diffuse_tensor_view (DiffuseStorage *st, DiffuseDType dt, int ndim, const int64_t *shape,
                      const int64_t *stride, size_t offset)
{
  DiffuseTensor *t = g_new0 (DiffuseTensor, 1);
  t->ref_count = 1;
  t->dtype = dt;
  t->ndim = ndim;
  for (int i = 0; i < ndim; i++) {
    t->shape[i] = shape[i];
    t->stride[i] = stride[i];
  }
  t->offset = offset;
  t->storage = st;
  g_atomic_int_inc (&st->ref_count);
  return t;
}

static gboolean
shape_ok (int ndim, const int64_t *shape, size_t elsize, size_t *nbytes)
{
  if (ndim < 0 || ndim > DIFFUSE_MAX_DIMS)
    return FALSE;
  size_t n = 1;
  for (int i = 0; i < ndim; i++) {
    if (shape[i] < 0)
      return FALSE;
    if (shape[i] && n > SIZE_MAX / (size_t) shape[i] / elsize)
      return FALSE;
    n *= (size_t) shape[i];
  }
  *nbytes = n * elsize;
  return TRUE;
}

DiffuseTensor *
diffuse_tensor_new (DiffuseDevice *dev, DiffuseDType dt, int ndim, const int64_t *shape)
{
  size_t nbytes;
  g_return_val_if_fail (dev != NULL, NULL);
  g_return_val_if_fail (dt < DIFFUSE_DTYPE_N, NULL);
  if (!shape_ok (ndim, shape, diffuse_dtype_size (dt), &nbytes)) {
    diffuse_tensor_set_error (g_error_new (DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                                           "Invalid tensor shape (%d dims)", ndim));
    return NULL;
  }
  DiffuseStorage *st = storage_alloc (dev, nbytes);
  if (!st)
    return NULL;
  int64_t stride[DIFFUSE_MAX_DIMS];
  _diffuse_contiguous_strides (ndim, shape, stride);
  DiffuseTensor *t = _diffuse_tensor_view (st, dt, ndim, shape, stride, 0);
  storage_unref (st);
  return t;
}

DiffuseTensor *
diffuse_tensor_new_4d (DiffuseDevice *dev, DiffuseDType dt, int64_t a, int64_t b, int64_t c, int64_t d)
{
  int64_t shape[4] = { a, b, c, d };
  return diffuse_tensor_new (dev, dt, 4, shape);
}

DiffuseTensor *
diffuse_tensor_zeros (DiffuseDevice *dev, DiffuseDType dt, int ndim, const int64_t *shape)
{
  DiffuseTensor *t = diffuse_tensor_new (dev, dt, ndim, shape);
  if (t)
    dev->ops->fill_zero (t);
  return t;
}

DiffuseTensor *
diffuse_tensor_from_f32 (const float *data, int ndim, const int64_t *shape)
{
  DiffuseTensor *t = diffuse_tensor_new (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, ndim, shape);
  if (t && data)
    memcpy (diffuse_tensor_data (t), data, diffuse_tensor_nbytes (t));
  return t;
}

DiffuseTensor *
diffuse_tensor_new_borrowed (DiffuseDevice *dev, DiffuseDType dt, int ndim, const int64_t *shape,
                             gpointer data, DiffuseReleaseFunc release, gpointer user_data)
{
  size_t nbytes;
  g_return_val_if_fail (dev != NULL, NULL);
  if (!shape_ok (ndim, shape, diffuse_dtype_size (dt), &nbytes)) {
    diffuse_tensor_set_error (g_error_new (DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                                           "Invalid tensor shape (%d dims)", ndim));
    if (release)
      release (user_data);
    return NULL;
  }
  DiffuseStorage *st = g_new0 (DiffuseStorage, 1);
  st->ref_count = 1;
  st->dev = dev;
  st->data = data;
  st->nbytes = nbytes;
  st->borrowed = TRUE;
  st->release = release;
  st->user_data = user_data;
  __atomic_add_fetch (&dev->borrowed, (gint64) nbytes, __ATOMIC_RELAXED);
  int64_t stride[DIFFUSE_MAX_DIMS];
  _diffuse_contiguous_strides (ndim, shape, stride);
  DiffuseTensor *t = _diffuse_tensor_view (st, dt, ndim, shape, stride, 0);
  storage_unref (st);
  return t;
}

DiffuseTensor *
diffuse_tensor_ref (DiffuseTensor *t)
{
  if (t)
    g_atomic_int_inc (&t->ref_count);
  return t;
}

void
diffuse_tensor_unref (DiffuseTensor *t)
{
  if (!t || !g_atomic_int_dec_and_test (&t->ref_count))
    return;
  storage_unref (t->storage);
  g_free (t);
}

DiffuseDevice *
diffuse_tensor_device (const DiffuseTensor *t)
{
  return t->storage->dev;
}

int64_t
diffuse_tensor_numel (const DiffuseTensor *t)
{
  int64_t n = 1;
  for (int i = 0; i < t->ndim; i++)
    n *= t->shape[i];
  return n;
}

size_t
diffuse_tensor_nbytes (const DiffuseTensor *t)
{
  return (size_t) diffuse_tensor_numel (t) * diffuse_dtype_size (t->dtype);
}

gboolean
diffuse_tensor_is_contiguous (const DiffuseTensor *t)
{
  int64_t s = 1;
  for (int i = t->ndim - 1; i >= 0; i--) {
    if (t->shape[i] != 1 && t->stride[i] != s)
      return FALSE;
    s *= t->shape[i];
  }
  return TRUE;
}

gboolean
diffuse_tensor_same_shape (const DiffuseTensor *a, const DiffuseTensor *b)
{
  if (a->ndim != b->ndim)
    return FALSE;
  for (int i = 0; i < a->ndim; i++)
    if (a->shape[i] != b->shape[i])
      return FALSE;
  return TRUE;
}

void *
diffuse_tensor_data (const DiffuseTensor *t)
{
  g_return_val_if_fail (t != NULL, NULL);
  g_return_val_if_fail (diffuse_device_is_cpu (t->storage->dev), NULL);
  return (char *) t->storage->data + t->offset;
}

gboolean
diffuse_tensor_is_borrowed (const DiffuseTensor *t)
{
  return t->storage->borrowed;
}

char *
diffuse_tensor_describe (const DiffuseTensor *t)
{
  if (!t)
    return g_strdup ("(null)");
  GString *s = g_string_new ("[");
  for (int i = 0; i < t->ndim; i++)
    g_string_append_printf (s, "%s%" G_GINT64_FORMAT, i ? ", " : "", (gint64) t->shape[i]);
  g_string_append_printf (s, "] %s %s", diffuse_dtype_name (t->dtype), t->storage->dev->name);
  return g_string_free (s, FALSE);
}

/* ---- views ------------------------------------------------------------- */

static void
op_fail (int code, const char *fmt, ...) G_GNUC_PRINTF (2, 3);

static void
op_fail (int code, const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  char *msg = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  diffuse_tensor_set_error (g_error_new_literal (DIFFUSE_ERROR, code, msg));
  g_free (msg);
}

DiffuseTensor *
diffuse_reshape (DiffuseTensor *x, int ndim, const int64_t *shape)
{
  if (!x)
    return NULL;
  g_return_val_if_fail (ndim >= 0 && ndim <= DIFFUSE_MAX_DIMS, NULL);
  int64_t sh[DIFFUSE_MAX_DIMS];
  int infer = -1;
  int64_t known = 1;
  for (int i = 0; i < ndim; i++) {
    sh[i] = shape[i];
    if (shape[i] == -1) {
      g_return_val_if_fail (infer < 0, NULL);
      infer = i;
    } else {
      known *= shape[i];
    }
  }
  int64_t n = diffuse_tensor_numel (x);
  if (infer >= 0) {
    g_return_val_if_fail (known > 0 && n % known == 0, NULL);
    sh[infer] = n / known;
    known *= sh[infer];
  }
  if (known != n) {
    char *d = diffuse_tensor_describe (x);
    g_critical ("diffuse_reshape: cannot view %s as %" G_GINT64_FORMAT " elements", d, (gint64) known);
    g_free (d);
    return NULL;
  }
  if (!diffuse_tensor_is_contiguous (x)) {
    op_fail (DIFFUSE_ERROR_INVALID_ARGUMENT, "reshape of a non-contiguous tensor (call diffuse_contiguous first)");
    return NULL;
  }
  int64_t stride[DIFFUSE_MAX_DIMS];
  _diffuse_contiguous_strides (ndim, sh, stride);
  return _diffuse_tensor_view (x->storage, x->dtype, ndim, sh, stride, x->offset);
}

DiffuseTensor *
diffuse_reshape_4d (DiffuseTensor *x, int64_t a, int64_t b, int64_t c, int64_t d)
{
  int64_t s[4] = { a, b, c, d };
  return diffuse_reshape (x, 4, s);
}

DiffuseTensor *
diffuse_permute (DiffuseTensor *x, const int *perm)
{
  if (!x)
    return NULL;
  int64_t sh[DIFFUSE_MAX_DIMS], st[DIFFUSE_MAX_DIMS];
  guint seen = 0;
  for (int i = 0; i < x->ndim; i++) {
    g_return_val_if_fail (perm[i] >= 0 && perm[i] < x->ndim && !(seen & (1u << perm[i])), NULL);
    seen |= 1u << perm[i];
    sh[i] = x->shape[perm[i]];
    st[i] = x->stride[perm[i]];
  }
  return _diffuse_tensor_view (x->storage, x->dtype, x->ndim, sh, st, x->offset);
}

DiffuseTensor *
diffuse_narrow (DiffuseTensor *x, int dim, int64_t start, int64_t length)
{
  if (!x)
    return NULL;
  if (dim < 0)
    dim += x->ndim;
  g_return_val_if_fail (dim >= 0 && dim < x->ndim, NULL);
  g_return_val_if_fail (start >= 0 && length >= 0 && start + length <= x->shape[dim], NULL);
  int64_t sh[DIFFUSE_MAX_DIMS];
  memcpy (sh, x->shape, sizeof sh);
  sh[dim] = length;
  size_t off = x->offset + (size_t) (start * x->stride[dim]) * diffuse_dtype_size (x->dtype);
  return _diffuse_tensor_view (x->storage, x->dtype, x->ndim, sh, x->stride, off);
}

gboolean
diffuse_chunk (DiffuseTensor *x, int n, int dim, DiffuseTensor **out)
{
  if (!x)
    return FALSE;
  if (dim < 0)
    dim += x->ndim;
  g_return_val_if_fail (dim >= 0 && dim < x->ndim && n > 0, FALSE);
  g_return_val_if_fail (x->shape[dim] % n == 0, FALSE);
  int64_t len = x->shape[dim] / n;
  for (int i = 0; i < n; i++)
    out[i] = diffuse_narrow (x, dim, i * len, len);
  return TRUE;
}

DiffuseTensor *
diffuse_broadcast_to (DiffuseTensor *x, int ndim, const int64_t *shape)
{
  if (!x)
    return NULL;
  g_return_val_if_fail (x->ndim <= ndim, NULL);
  int64_t st[DIFFUSE_MAX_DIMS];
  int off = ndim - x->ndim;
  for (int i = 0; i < ndim; i++) {
    if (i < off) {
      st[i] = 0;
      continue;
    }
    int64_t xs = x->shape[i - off];
    if (xs == shape[i])
      st[i] = xs == 1 ? 0 : x->stride[i - off];
    else if (xs == 1)
      st[i] = 0;
    else {
      g_critical ("diffuse_broadcast_to: dim %d of size %" G_GINT64_FORMAT " cannot broadcast to %"
                  G_GINT64_FORMAT, i, (gint64) xs, (gint64) shape[i]);
      return NULL;
    }
  }
  return _diffuse_tensor_view (x->storage, x->dtype, ndim, shape, st, x->offset);
}
