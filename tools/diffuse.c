/* gst-diffuse — the command-line companion.
 *
 *   diffuse inspect MODEL [--variant V] [--dtype D] [--revision R] [--offline]
 *   diffuse download REPO [--variant V] [--revision R]
 *   diffuse save MODEL OUTDIR [--variant V] [--dtype D] [--max-shard-size BYTES]
 *
 * MODEL is a local diffusers pipeline folder or a Hub repo id. */
#include <diffuse/diffuse.h>
#include <diffuse/pipeline.h>
#include <stdio.h>
#include <string.h>

static char *opt_variant, *opt_dtype, *opt_revision, *opt_device, *opt_class;
static gboolean opt_offline;
static gint64 opt_shard;

static GOptionEntry entries[] = {
  { "variant", 0, 0, G_OPTION_ARG_STRING, &opt_variant, "Weight variant (fp16, non_ema, ...)", "V" },
  { "dtype", 0, 0, G_OPTION_ARG_STRING, &opt_dtype, "Load/save dtype (float32, float16, bfloat16)", "D" },
  { "revision", 0, 0, G_OPTION_ARG_STRING, &opt_revision, "Hub revision (branch, tag, commit)", "R" },
  { "device", 0, 0, G_OPTION_ARG_STRING, &opt_device, "Device (cpu, auto, cuda:N)", "DEV" },
  { "pipeline-class", 0, 0, G_OPTION_ARG_STRING, &opt_class, "Load as this pipeline class", "CLASS" },
  { "offline", 0, 0, G_OPTION_ARG_NONE, &opt_offline, "Use the Hub cache only", NULL },
  { "max-shard-size", 0, 0, G_OPTION_ARG_INT64, &opt_shard, "Shard weights above this many bytes (save)", "BYTES" },
  { NULL },
};

static gboolean
progress (const DiffuseLoadProgress *p, gpointer user_data)
{
  if (strcmp (p->stage, "download") == 0)
    fprintf (stderr, "\rdownloading %s: %.1f / %.1f MB   ", p->what, p->done / 1e6, p->total / 1e6);
  return TRUE;
}

static const char *
kind_name (DiffuseComponentKind k)
{
  switch (k) {
    case DIFFUSE_COMPONENT_MODEL: return "model";
    case DIFFUSE_COMPONENT_SCHEDULER: return "scheduler";
    case DIFFUSE_COMPONENT_TOKENIZER: return "tokenizer";
    default: return "processor";
  }
}

static void
print_model (DiffusePipelineModel *pm, DiffuseComponentCache *cache)
{
  printf ("pipeline: %s\nfolder:   %s\n", diffuse_pipeline_model_class (pm), diffuse_pipeline_model_folder (pm));
  const char *const *names = diffuse_pipeline_model_component_names (pm);
  for (int i = 0; names[i]; i++) {
    DiffuseComponent *c = diffuse_pipeline_model_get (pm, names[i]);
    if (!c) {
      printf ("  %-18s (none)\n", names[i]);
      continue;
    }
    printf ("  %-18s %s.%s [%s]", names[i], diffuse_component_library (c), diffuse_component_class (c),
            kind_name (diffuse_component_kind (c)));
    if (diffuse_component_weights (c)) {
      guint n = 0;
      g_free (diffuse_weights_names (diffuse_component_weights (c), &n));
      printf (" %u tensors, %.2f MB as %s", n, diffuse_component_bytes (c) / 1e6,
              diffuse_dtype_name (diffuse_component_dtype (c)));
      if (diffuse_component_variant (c))
        printf (", variant %s", diffuse_component_variant (c));
      const char *const *files = diffuse_component_files (c);
      for (int f = 0; files && files[f]; f++) {
        char *b = g_path_get_basename (files[f]);
        printf ("%s%s", f ? ", " : "\n      files: ", b);
        g_free (b);
      }
    }
    printf ("\n");
  }
  DiffuseCacheStats s;
  diffuse_component_cache_get_stats (cache, &s);
  printf ("components loaded: %" G_GUINT64_FORMAT ", resident %.2f MB\n", s.n_loads, s.resident_bytes / 1e6);
}

int
main (int argc, char **argv)
{
  GError *err = NULL;
  GOptionContext *ctx = g_option_context_new ("inspect|download|save MODEL [OUTDIR]");
  g_option_context_set_summary (ctx, "Inspect, download and convert diffusers pipelines.");
  g_option_context_add_main_entries (ctx, entries, NULL);
  if (!g_option_context_parse (ctx, &argc, &argv, &err)) {
    fprintf (stderr, "%s\n", err->message);
    return 2;
  }
  if (argc < 3) {
    char *help = g_option_context_get_help (ctx, TRUE, NULL);
    fprintf (stderr, "%s", help);
    g_free (help);
    return 2;
  }
  const char *cmd = argv[1], *model = argv[2];
  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.variant = opt_variant;
  lp.revision = opt_revision;
  lp.device = opt_device;
  lp.pipeline_class = opt_class;
  lp.offline = opt_offline;
  lp.progress = progress;
  if (opt_dtype) {
    if (!diffuse_dtype_from_string (opt_dtype, &lp.dtype)) {
      fprintf (stderr, "unknown dtype %s\n", opt_dtype);
      return 2;
    }
    lp.have_dtype = TRUE;
  }
  int rc = 0;
  DiffuseComponentCache *cache = diffuse_component_cache_new ();
  if (strcmp (cmd, "inspect") == 0 || strcmp (cmd, "download") == 0 || strcmp (cmd, "save") == 0) {
    DiffusePipelineModel *pm = diffuse_pipeline_model_load (model, &lp, cache, &err);
    if (!pm) {
      fprintf (stderr, "error: %s\n", err->message);
      rc = 1;
    } else if (strcmp (cmd, "save") == 0) {
      if (argc < 4) {
        fprintf (stderr, "save needs an output folder\n");
        rc = 2;
      } else {
        DiffuseSaveParams sp = diffuse_save_default_params ();
        sp.variant = opt_variant;
        sp.max_shard_size = (guint64) MAX (opt_shard, 0);
        sp.have_dtype = lp.have_dtype;
        sp.dtype = lp.dtype;
        if (!diffuse_pipeline_model_save (pm, argv[3], &sp, &err)) {
          fprintf (stderr, "error: %s\n", err->message);
          rc = 1;
        } else {
          printf ("saved to %s\n", argv[3]);
        }
      }
    } else {
      print_model (pm, cache);
    }
    if (pm)
      diffuse_pipeline_model_unref (pm);
  } else {
    fprintf (stderr, "unknown command %s\n", cmd);
    rc = 2;
  }
  g_clear_error (&err);
  diffuse_component_cache_unref (cache);
  g_option_context_free (ctx);
  return rc;
}
