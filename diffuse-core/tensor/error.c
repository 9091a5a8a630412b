/* gst-diffuse — the DIFFUSE_ERROR domain and the thread-local op error. */
#include <diffuse/error.h>
#include <diffuse/tensor.h>

G_DEFINE_QUARK (diffuse-error-quark, diffuse_error)

static GPrivate op_error = G_PRIVATE_INIT ((GDestroyNotify) g_error_free);

void
diffuse_tensor_set_error (GError *error)
{
  if (!error)
    return;
  /* Keep the first error: later ones are usually consequences of it. */
  if (g_private_get (&op_error)) {
    g_error_free (error);
    return;
  }
  g_private_set (&op_error, error);
}

gboolean
diffuse_tensor_take_error (GError **error)
{
  GError *e = g_private_get (&op_error);
  if (!e)
    return FALSE;
  /* g_private_set would free the old value: steal it first */
  GError *copy = g_error_copy (e);
  g_private_replace (&op_error, NULL);
  if (error)
    g_propagate_error (error, copy);
  else
    g_error_free (copy);
  return TRUE;
}
