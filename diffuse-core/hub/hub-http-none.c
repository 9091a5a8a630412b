/* gst-diffuse — the hub layer built without libsoup: the cache still works
 * (offline use of a cache filled by huggingface_hub or an earlier build), any
 * network access fails with DIFFUSE_ERROR_UNSUPPORTED (not retried). */
#include "hub-private.h"

struct _HubHttp {
  int unused;
};

const char *
hub_http_backend_name (void)
{
  return "no-http";
}

HubHttp *
hub_http_new (const char *user_agent, guint timeout_s)
{
  return g_new0 (HubHttp, 1);
}

void
hub_http_free (HubHttp *http)
{
  g_free (http);
}

gboolean
hub_http_send (HubHttp *http, const char *method, const char *url,
               const char *const *headers, HubResponse *resp, GInputStream **body,
               GCancellable *cancellable, GError **error)
{
  g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
               "%s %s: gst-diffuse was built without libsoup (hub feature disabled); "
               "only cached files can be used", method, url);
  return FALSE;
}
