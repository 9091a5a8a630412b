/* gst-diffuse — HTTP transport of the hub layer through libsoup 3.
 *
 * One SoupSession per HubHttp, created by the thread that makes the
 * requests (libsoup >= 3.2 sends from any thread; we use one at a time).
 * Redirects are never followed here: hub-client.c decides, so that the
 * token is dropped when a redirect leaves the endpoint.  The content decoder
 * is removed so sizes are the real file sizes (Accept-Encoding: identity). */
#include "hub-private.h"

#include <libsoup/soup.h>

struct _HubHttp {
  SoupSession *session;
};

const char *
hub_http_backend_name (void)
{
  static char name[32];
  if (!name[0])
    g_snprintf (name, sizeof name, "libsoup/%u.%u.%u", soup_get_major_version (),
                soup_get_minor_version (), soup_get_micro_version ());
  return name;
}

HubHttp *
hub_http_new (const char *user_agent, guint timeout_s)
{
  HubHttp *http = g_new0 (HubHttp, 1);
  http->session = soup_session_new_with_options ("user-agent", user_agent,
                                                 "timeout", timeout_s,
                                                 "idle-timeout", 60,
                                                 "max-conns-per-host", 4,
                                                 NULL);
  soup_session_remove_feature_by_type (http->session, SOUP_TYPE_CONTENT_DECODER);
  soup_session_remove_feature_by_type (http->session, SOUP_TYPE_CONTENT_SNIFFER);
  return http;
}

void
hub_http_free (HubHttp *http)
{
  if (!http)
    return;
  soup_session_abort (http->session);
  g_object_unref (http->session);
  g_free (http);
}

static void
collect_header (const char *name, const char *value, gpointer user_data)
{
  GHashTable *h = user_data;
  char *key = g_ascii_strdown (name, -1);
  const char *old = g_hash_table_lookup (h, key);
  if (old) /* repeated header: comma-join as HTTP allows */
    g_hash_table_replace (h, key, g_strconcat (old, ", ", value, NULL));
  else
    g_hash_table_replace (h, key, g_strdup (value));
}

gboolean
hub_http_send (HubHttp *http, const char *method, const char *url,
               const char *const *headers, HubResponse *resp, GInputStream **body,
               GCancellable *cancellable, GError **error)
{
  GError *local = NULL;
  SoupMessage *msg = soup_message_new (method, url);
  if (!msg) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "invalid URL '%s'", url);
    return FALSE;
  }
  soup_message_add_flags (msg, SOUP_MESSAGE_NO_REDIRECT);
  SoupMessageHeaders *rh = soup_message_get_request_headers (msg);
  for (const char *const *h = headers; h && h[0] && h[1]; h += 2)
    soup_message_headers_replace (rh, h[0], h[1]);

  GInputStream *stream = soup_session_send (http->session, msg, cancellable, &local);
  if (!stream) {
    if (g_error_matches (local, G_IO_ERROR, G_IO_ERROR_CANCELLED))
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CANCELLED, "%s %s: cancelled", method, url);
    else
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NETWORK, "%s %s: %s", method, url, local->message);
    g_clear_error (&local);
    g_object_unref (msg);
    return FALSE;
  }
  resp->status = soup_message_get_status (msg);
  resp->headers = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  soup_message_headers_foreach (soup_message_get_response_headers (msg), collect_header, resp->headers);
  if (body)
    *body = stream;
  else {
    g_input_stream_close (stream, NULL, NULL);
    g_object_unref (stream);
  }
  g_object_unref (msg);
  return TRUE;
}
