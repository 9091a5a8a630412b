/* libFuzzer target: the safetensors reader (and, for bytes that look like a
 * torch.save zip or pickle, the PyTorch checkpoint reader) on arbitrary bytes.
 *
 * Opens the input with diffuse_safetensors_open_bytes and, when it is
 * accepted, touches everything a caller could: every entry's bytes (so
 * AddressSanitizer sees any out-of-range offset), names, metadata, lookups,
 * and a tensor in each float dtype for the convertible entries. */
#include <diffuse/diffuse.h>

#include <stdint.h>
#include <string.h>

static volatile guint64 sink;

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  GError *err = NULL;
  DiffuseSafetensors *st = diffuse_safetensors_open_bytes (data, size, "fuzz", &err);
  if (!st) {
    /* every rejection is a CORRUPT error naming the label, or UNSUPPORTED for
     * a PyTorch checkpoint in a form the pickle reader knows but does not
     * read (legacy, compressed, big-endian, a forbidden global, ...) */
    if (!err || err->domain != DIFFUSE_ERROR ||
        (err->code != DIFFUSE_ERROR_CORRUPT && err->code != DIFFUSE_ERROR_UNSUPPORTED) || !strstr (err->message, "fuzz"))
      __builtin_trap ();
    g_error_free (err);
    return 0;
  }
  guint n = diffuse_safetensors_n_tensors (st);
  guint64 acc = 0;
  for (guint i = 0; i < n; i++) {
    const DiffuseStEntry *e = diffuse_safetensors_entry (st, i);
    if (diffuse_safetensors_find (st, e->name) != e)
      __builtin_trap ();
    acc += strlen (e->name) + strlen (diffuse_st_dtype_name (e->dtype));
    for (int d = 0; d < e->ndim; d++)
      acc += (guint64) e->shape[d];
    const guint8 *p = e->data;
    for (size_t k = 0; k < e->nbytes; k++)
      acc += p[k];
    if (e->dtype == DIFFUSE_ST_F32 || e->dtype == DIFFUSE_ST_F16 || e->dtype == DIFFUSE_ST_BF16
        || e->dtype == DIFFUSE_ST_F64 || e->dtype == DIFFUSE_ST_I64) {
      for (int dt = 0; dt < DIFFUSE_DTYPE_N; dt++) {
        DiffuseTensor *t = diffuse_safetensors_tensor (st, e->name, (DiffuseDType) dt, NULL, &err);
        if (t) {
          const guint8 *q = diffuse_tensor_data (t);
          size_t nb = diffuse_tensor_nbytes (t);
          if (nb)
            acc += q[0] + q[nb - 1];
          diffuse_tensor_unref (t);
        } else {
          g_clear_error (&err);
        }
      }
    }
  }
  GHashTable *md = diffuse_safetensors_metadata (st);
  if (md) {
    GHashTableIter it;
    gpointer k, v;
    g_hash_table_iter_init (&it, md);
    while (g_hash_table_iter_next (&it, &k, &v))
      acc += strlen (k) + strlen (v);
  }
  sink = acc;
  diffuse_safetensors_unref (st);
  return 0;
}
