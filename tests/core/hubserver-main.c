/* hubserver: the test Hub (hubserver.c) as a program, for the reference
 * scripts (tests/reference/make_hf_cache.py) that run Python's
 * huggingface_hub against it.
 *
 *   hubserver MANIFEST.json
 *
 * Prints "endpoint URL", "cdn URL" and "token TOKEN" lines, then serves
 * until its standard input is closed. */
#include "hubserver.h"

#include <stdio.h>
#include <unistd.h>

int
main (int argc, char **argv)
{
  if (argc != 2) {
    fprintf (stderr, "usage: %s MANIFEST.json\n", argv[0]);
    return 2;
  }
  GError *err = NULL;
  HubServer *s = hub_server_new (&err);
  if (!s || !hub_server_load_manifest (s, argv[1], &err)) {
    fprintf (stderr, "hubserver: %s\n", err->message);
    g_error_free (err);
    hub_server_free (s);
    return 1;
  }
  printf ("endpoint %s\ncdn %s\ntoken %s\n", hub_server_endpoint (s), hub_server_cdn (s), hub_server_token (s));
  fflush (stdout);
  char buf[256];
  while (read (0, buf, sizeof buf) > 0)
    ;
  GPtrArray *log = hub_server_log (s);
  for (guint i = 0; i < log->len; i++)
    fprintf (stderr, "%s\n", (char *) log->pdata[i]);
  g_ptr_array_unref (log);
  hub_server_free (s);
  return 0;
}
