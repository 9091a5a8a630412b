/* gpu-ops: every torch op case of tests/fixtures/ops run on a CUDA device.
 *
 *   gpu-ops [--device cuda:0] [--fixtures DIR] [--report FILE] [--filter SUBSTR]
 *
 * Same fixture format as tests/core/test-ops.c (cases.json + ops.safetensors:
 * "<case>.<input>", "<case>.out" = torch's f32 result).  Each input is
 * loaded on the CPU, moved to the device and given the case's view steps
 * there (so the GPU kernels see the same strides as the CPU ones).  Every
 * case runs in up to three variants:
 *
 *   native  inputs in their stored dtype (mostly f32; a few f16/bf16 cases);
 *           limit = max(case tol, 2e-5) * max(1, max|want|)  (f32; no TF32)
 *           cast: bit-exact as on the CPU (any NaN matches any NaN)
 *   f16     f32 inputs cast to float16; the result is compared with the CPU
 *           backend run on the same f16 inputs (both compute in f32 and
 *           round the output): limit = 5e-3 * max(1, max|cpu|)
 *   bf16    the same in bfloat16: limit = 2e-2 * max(1, max|cpu|)
 *
 * sdpa cases also run f16w/bf16w, f16s/bf16s and nat-u/f16u/bf16u: the
 * same with DIFFUSE_CUDA_ATTN=wmma, simple and unfused (the default f16/bf16
 * path is the flash kernel where it applies); conv2d cases run nat-e/f16e/
 * bf16e (element-wise im2col, no implicit GEMM) and nat-i/f16i/bf16i (the
 * implicit GEMM everywhere).
 *
 * Every line also prints the error against torch's f32 result (for f16/bf16
 * that includes the input rounding: softmax_large, with inputs of ~100,
 * loses everything in f16 on any backend).  timestep_embedding, cast, chunk
 * and permute run native only.  One line
 * per case and variant, then a summary; exit status 1 when any case fails.
 * NaN/inf in want must be matched exactly (NaN by any NaN).
 * On a CUDA device it ends with a CUDA-graph capture/replay check. */
#include <diffuse/diffuse.h>
#include <json-glib/json-glib.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include "diffuse-config.h"
#if DIFFUSE_HAVE_CUDA
#include "diffuse-cuda.h"
#endif

static DiffuseSafetensors *st;
static DiffuseDevice *gpu;
static FILE *report;
static int n_pass, n_fail, n_skip;

static void
say (const char *fmt, ...) G_GNUC_PRINTF (1, 2);

static void
say (const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  char *s = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  fputs (s, stdout);
  if (report)
    fputs (s, report);
  g_free (s);
}

static DiffuseDType
entry_dtype (const DiffuseStEntry *e)
{
  switch (e->dtype) {
  case DIFFUSE_ST_F16: return DIFFUSE_DTYPE_F16;
  case DIFFUSE_ST_BF16: return DIFFUSE_DTYPE_BF16;
  default: return DIFFUSE_DTYPE_F32;
  }
}

static DiffuseTensor *
raw_tensor (const char *cname, const char *name)
{
  g_autofree char *key = g_strdup_printf ("%s.%s", cname, name);
  const DiffuseStEntry *e = diffuse_safetensors_find (st, key);
  if (!e)
    return NULL;
  g_autoptr (GError) err = NULL;
  DiffuseTensor *t = diffuse_safetensors_tensor (st, key, entry_dtype (e), diffuse_device_cpu (), &err);
  if (!t)
    g_error ("loading %s: %s", key, err->message);
  return t;
}

/* The input on dev, cast to dt when dt >= 0 and it is f32, with the case's views applied on dev. */
static DiffuseTensor *
input (JsonObject *c, const char *name, DiffuseDevice *dev, int dt)
{
  JsonObject *ins = json_object_get_object_member (c, "inputs");
  if (!json_object_has_member (ins, name))
    return NULL;
  JsonObject *spec = json_object_get_object_member (ins, name);
  DiffuseTensor *h = raw_tensor (json_object_get_string_member (c, "name"), name);
  if (!h)
    g_error ("fixture tensor %s.%s missing", json_object_get_string_member (c, "name"), name);
  if (dt >= 0 && h->dtype == DIFFUSE_DTYPE_F32) {
    DiffuseTensor *x = diffuse_cast (h, (DiffuseDType) dt);
    diffuse_tensor_unref (h);
    h = x;
  }
  DiffuseTensor *t = diffuse_to_device (h, dev);
  diffuse_tensor_unref (h);
  if (!t)
    return NULL;
  if (json_object_has_member (spec, "view")) {
    JsonArray *steps = json_object_get_array_member (spec, "view");
    for (guint i = 0; i < json_array_get_length (steps); i++) {
      JsonArray *s = json_array_get_array_element (steps, i);
      const char *kind = json_array_get_string_element (s, 0);
      DiffuseTensor *v;
      if (g_str_equal (kind, "permute")) {
        JsonArray *p = json_array_get_array_element (s, 1);
        int perm[DIFFUSE_MAX_DIMS];
        for (guint k = 0; k < json_array_get_length (p); k++)
          perm[k] = (int) json_array_get_int_element (p, k);
        v = diffuse_permute (t, perm);
      } else {
        v = diffuse_narrow (t, (int) json_array_get_int_element (s, 1), json_array_get_int_element (s, 2),
                            json_array_get_int_element (s, 3));
      }
      diffuse_tensor_unref (t);
      t = v;
    }
  }
  return t;
}

#define P(c) json_object_get_object_member ((c), "params")
static double pd (JsonObject *c, const char *k) { return json_object_get_double_member (P (c), k); }
static int pi (JsonObject *c, const char *k) { return (int) json_object_get_int_member (P (c), k); }
static gboolean pb (JsonObject *c, const char *k) { return json_object_get_boolean_member (P (c), k); }
static const char *ps (JsonObject *c, const char *k) { return json_object_get_string_member (P (c), k); }

static DiffuseActivation
act_of (const char *s)
{
  DiffuseActivation a = DIFFUSE_ACT_NONE;
  if (g_str_equal (s, "gelu_tanh"))
    return DIFFUSE_ACT_GELU_TANH;
  if (!diffuse_activation_from_string (s, &a))
    g_error ("unknown activation %s", s);
  return a;
}

/* Runs the case's op on dev; outs[] gets the outputs (n returned). */
static int
run_op (JsonObject *c, DiffuseDevice *dev, int dt, DiffuseTensor **outs, DiffuseTensor **ins, int *n_in)
{
  const char *op = json_object_get_string_member (c, "op");
  int n_out = 1;
#define IN(name) (ins[(*n_in)++] = input (c, name, dev, dt))
  if (g_str_equal (op, "linear")) {
    DiffuseTensor *x = IN ("x"), *w = IN ("w"), *b = IN ("b");
    outs[0] = diffuse_linear (x, w, b);
  } else if (g_str_equal (op, "matmul")) {
    DiffuseTensor *a = IN ("a"), *b = IN ("b");
    outs[0] = diffuse_matmul (a, b, pb (c, "trans_a"), pb (c, "trans_b"), pd (c, "alpha"));
  } else if (g_str_equal (op, "conv2d")) {
    DiffuseTensor *x = IN ("x"), *w = IN ("w"), *b = IN ("b");
    outs[0] = diffuse_conv2d (x, w, b, pi (c, "stride_h"), pi (c, "stride_w"), pi (c, "pad_h"), pi (c, "pad_w"));
  } else if (g_str_equal (op, "pad2d")) {
    outs[0] = diffuse_pad2d (IN ("x"), pi (c, "left"), pi (c, "right"), pi (c, "top"), pi (c, "bottom"));
  } else if (g_str_equal (op, "group_norm")) {
    DiffuseTensor *x = IN ("x"), *g = IN ("gamma"), *b = IN ("beta");
    outs[0] = diffuse_group_norm (x, pi (c, "groups"), g, b, pd (c, "eps"), act_of (ps (c, "act")));
  } else if (g_str_equal (op, "layer_norm")) {
    DiffuseTensor *x = IN ("x"), *g = IN ("gamma"), *b = IN ("beta");
    outs[0] = diffuse_layer_norm (x, g, b, pd (c, "eps"));
  } else if (g_str_equal (op, "softmax")) {
    outs[0] = diffuse_softmax (IN ("x"));
  } else if (g_str_equal (op, "sdpa")) {
    DiffuseTensor *q = IN ("q"), *k = IN ("k"), *v = IN ("v"), *m = IN ("mask");
    outs[0] = diffuse_sdpa (q, k, v, m, pb (c, "causal"), pd (c, "scale"));
  } else if (g_str_equal (op, "activation")) {
    outs[0] = diffuse_activation (IN ("x"), act_of (ps (c, "act")));
  } else if (g_str_equal (op, "geglu")) {
    outs[0] = diffuse_geglu (IN ("x"));
  } else if (g_str_equal (op, "upsample_nearest")) {
    outs[0] = diffuse_upsample_nearest (IN ("x"), pi (c, "out_h"), pi (c, "out_w"));
  } else if (g_str_equal (op, "avg_pool2d")) {
    outs[0] = diffuse_avg_pool2d (IN ("x"), pi (c, "k"), pi (c, "stride"));
  } else if (g_str_equal (op, "binary")) {
    const char *kind = ps (c, "kind");
    DiffuseTensor *a = IN ("a"), *b = IN ("b");
    if (g_str_equal (kind, "add"))
      outs[0] = diffuse_add (a, b);
    else if (g_str_equal (kind, "sub"))
      outs[0] = diffuse_sub (a, b);
    else if (g_str_equal (kind, "mul"))
      outs[0] = diffuse_mul (a, b);
    else
      outs[0] = diffuse_div (a, b);
  } else if (g_str_equal (op, "scale")) {
    outs[0] = diffuse_scale (IN ("x"), pd (c, "s"), pd (c, "b"));
  } else if (g_str_equal (op, "axpy")) {
    DiffuseTensor *a = IN ("a"), *b = IN ("b");
    outs[0] = diffuse_copy (a);
    if (outs[0] && !diffuse_axpy_inplace (outs[0], pd (c, "alpha"), b))
      diffuse_tensor_clear (&outs[0]);
  } else if (g_str_equal (op, "concat")) {
    int n = pi (c, "n");
    int first = *n_in;
    for (int i = 0; i < n; i++) {
      g_autofree char *nm = g_strdup_printf ("x%d", i);
      IN (nm);
    }
    outs[0] = diffuse_concat (ins + first, n, pi (c, "dim"));
  } else if (g_str_equal (op, "chunk")) {
    DiffuseTensor *x = IN ("x");
    n_out = pi (c, "n");
    if (!diffuse_chunk (x, n_out, pi (c, "dim"), outs))
      memset (outs, 0, sizeof (DiffuseTensor *) * n_out);
  } else if (g_str_equal (op, "permute")) {
    DiffuseTensor *x = IN ("x");
    JsonArray *p = json_object_get_array_member (P (c), "perm");
    int perm[DIFFUSE_MAX_DIMS];
    for (guint k = 0; k < json_array_get_length (p); k++)
      perm[k] = (int) json_array_get_int_element (p, k);
    DiffuseTensor *v = ins[(*n_in)++] = diffuse_permute (x, perm);
    outs[0] = diffuse_contiguous (v);
  } else if (g_str_equal (op, "cast")) {
    const char *to = ps (c, "to");
    DiffuseDType d = g_str_equal (to, "f32") ? DIFFUSE_DTYPE_F32 : g_str_equal (to, "f16") ? DIFFUSE_DTYPE_F16
                                                                                            : DIFFUSE_DTYPE_BF16;
    outs[0] = diffuse_cast (IN ("x"), d);
  } else if (g_str_equal (op, "timestep_embedding")) {
    outs[0] = diffuse_timestep_embedding (IN ("t"), pi (c, "dim"), pb (c, "flip_sin_to_cos"),
                                          pd (c, "downscale_freq_shift"), pd (c, "scale"), pd (c, "max_period"));
  } else if (g_str_equal (op, "embedding")) {
    JsonArray *a = json_object_get_array_member (P (c), "ids");
    guint n = json_array_get_length (a);
    g_autofree int32_t *ids = g_new (int32_t, n);
    for (guint i = 0; i < n; i++)
      ids[i] = (int32_t) json_array_get_int_element (a, i);
    outs[0] = diffuse_embedding (IN ("table"), ids, n);
  } else {
    g_error ("unknown op %s", op);
  }
#undef IN
  return n_out;
}

/* f32 host copy, row-major */
static float *
host_f32 (DiffuseTensor *t)
{
  DiffuseTensor *h = diffuse_to_device (t, diffuse_device_cpu ());
  DiffuseTensor *f = diffuse_cast (h, DIFFUSE_DTYPE_F32);
  DiffuseTensor *cc = diffuse_contiguous (f);
  int64_t n = diffuse_tensor_numel (t);
  float *out = g_new0 (float, MAX (n, 1));
  if (cc)
    memcpy (out, diffuse_tensor_data (cc), n * sizeof (float));
  else
    for (int64_t i = 0; i < n; i++)
      out[i] = NAN;
  diffuse_tensor_clear (&h);
  diffuse_tensor_clear (&f);
  diffuse_tensor_clear (&cc);
  return out;
}

/* error of got vs want; FALSE when a non-finite want is not matched */
static gboolean
measure (DiffuseTensor *got, DiffuseTensor *want, double *err, double *maxw)
{
  int64_t n = diffuse_tensor_numel (want);
  g_autofree float *g = host_f32 (got);
  g_autofree float *w = host_f32 (want);
  gboolean finite_ok = TRUE;
  *err = 0;
  *maxw = 0;
  for (int64_t i = 0; i < n; i++)
    if (isfinite (w[i]))
      *maxw = MAX (*maxw, fabs (w[i]));
  for (int64_t i = 0; i < n; i++) {
    if (!isfinite (w[i])) {
      if (!(isnan (w[i]) ? isnan (g[i]) : g[i] == w[i]))
        finite_ok = FALSE;
      continue;
    }
    double e = isfinite (g[i]) ? fabs ((double) g[i] - (double) w[i]) : INFINITY;
    if (e > *err)
      *err = e;
  }
  return finite_ok;
}

static gboolean
same_bits (DiffuseTensor *got, DiffuseTensor *want)
{
  if (got->dtype != want->dtype)
    return FALSE;
  DiffuseTensor *h = diffuse_to_device (got, diffuse_device_cpu ());
  DiffuseTensor *hc = diffuse_contiguous (h);
  DiffuseTensor *wc = diffuse_contiguous (want);
  gboolean ok = hc && wc;
  int64_t n = diffuse_tensor_numel (want);
  size_t es = diffuse_dtype_size (want->dtype);
  g_autofree float *gf = host_f32 (hc), *wf = host_f32 (wc);
  for (int64_t i = 0; ok && i < n; i++) {
    if (isnan (wf[i]))
      ok = isnan (gf[i]);
    else
      ok = memcmp ((char *) diffuse_tensor_data (hc) + i * es, (char *) diffuse_tensor_data (wc) + i * es, es) == 0;
  }
  diffuse_tensor_clear (&h);
  diffuse_tensor_clear (&hc);
  diffuse_tensor_clear (&wc);
  return ok;
}

static void
run_variant (JsonObject *c, int dt, const char *vname, double tol)
{
  const char *cname = json_object_get_string_member (c, "name");
  const char *op = json_object_get_string_member (c, "op");
  DiffuseTensor *gout[16] = { NULL }, *cout[16] = { NULL }, *gin[16] = { NULL }, *cin[16] = { NULL };
  int gn_in = 0, cn_in = 0;
  gint64 t0 = g_get_monotonic_time ();
  int n_out = run_op (c, gpu, dt, gout, gin, &gn_in);
  g_autoptr (GError) err = NULL;
  gboolean had_err = diffuse_tensor_take_error (&err);
  double ms = (g_get_monotonic_time () - t0) / 1000.0;
  run_op (c, diffuse_device_cpu (), dt, cout, cin, &cn_in);
  g_autoptr (GError) cerr = NULL;
  diffuse_tensor_take_error (&cerr);

  JsonArray *names = json_object_get_array_member (c, "outputs");
  for (int i = 0; i < n_out; i++) {
    const char *oname = json_array_get_string_element (names, i);
    if (!gout[i]) {
      say ("FAIL %-18s %-40s %-6s output %s is NULL: %s\n", op, cname, vname, oname,
           had_err ? err->message : "(no error set)");
      n_fail++;
      continue;
    }
    if (!g_str_equal (diffuse_device_name (diffuse_tensor_device (gout[i])), diffuse_device_name (gpu))) {
      say ("FAIL %-18s %-40s %-6s output on %s\n", op, cname, vname,
           diffuse_device_name (diffuse_tensor_device (gout[i])));
      n_fail++;
      continue;
    }
    DiffuseTensor *want = raw_tensor (cname, oname);
    if (g_str_equal (op, "cast")) {
      gboolean ok = same_bits (gout[i], want);
      say ("%s %-18s %-40s %-6s bit-exact %s\n", ok ? "PASS" : "FAIL", op, cname, vname, ok ? "yes" : "NO");
      ok ? n_pass++ : n_fail++;
    } else {
      /* native: against torch; f16/bf16: against the CPU backend on the same
       * rounded inputs (torch's f32 result is printed for information) */
      double e, maxw, ecpu = NAN, maxc = 0;
      gboolean fin = measure (gout[i], want, &e, &maxw), finc = FALSE;
      if (cout[i])
        finc = measure (gout[i], cout[i], &ecpu, &maxc);
      gboolean ok;
      double limit;
      if (dt < 0) {
        limit = tol * MAX (1.0, maxw);
        ok = fin && e <= limit;
      } else {
        /* inputs stored in f16/bf16 are not cast (only f32 ones are), so the
         * variant computes in the stored dtype: its rounding sets the limit */
        double vtol = tol;
        if (gout[i]->dtype == DIFFUSE_DTYPE_BF16)
          vtol = MAX (vtol, 2e-2);
        else if (gout[i]->dtype == DIFFUSE_DTYPE_F16)
          vtol = MAX (vtol, 5e-3);
        limit = vtol * MAX (1.0, maxc);
        ok = cout[i] && finc && ecpu <= limit;
      }
      say ("%s %-18s %-40s %-6s vs-torch %.3g vs-cpu %.3g limit %.3g (%s; max|want| %.3g) %s%.2f ms\n",
           ok ? "PASS" : "FAIL", op, cname, vname, e, ecpu, limit, dt < 0 ? "vs torch" : "vs cpu", maxw,
           (dt < 0 ? fin : finc) ? "" : "NONFINITE-MISMATCH ", ms);
      ok ? n_pass++ : n_fail++;
    }
    diffuse_tensor_unref (want);
  }
  for (int i = 0; i < 16; i++) {
    diffuse_tensor_clear (&gout[i]);
    diffuse_tensor_clear (&cout[i]);
    diffuse_tensor_clear (&gin[i]);
    diffuse_tensor_clear (&cin[i]);
  }
}

#if DIFFUSE_HAVE_CUDA
/* The backend side of CUDA graphs: a small block (conv, group norm + SiLU,
 * residual add, linear over the channels) captured once, replayed on new
 * input values written into the same device tensor, each replay equal to
 * the same ops run eagerly; no cudaMalloc during the replays. */
static DiffuseTensor *
graph_block (DiffuseTensor *x, DiffuseTensor *w, DiffuseTensor *g, DiffuseTensor *lw)
{
  DiffuseTensor *a = diffuse_conv2d (x, w, NULL, 1, 1, 1, 1);
  DiffuseTensor *b = diffuse_group_norm (a, 4, g, NULL, 1e-5f, DIFFUSE_ACT_SILU);
  DiffuseTensor *c = diffuse_add (b, x);
  int perm[4] = { 0, 2, 3, 1 };
  DiffuseTensor *cp = diffuse_permute (c, perm);            /* [N, H, W, C] view */
  DiffuseTensor *d = diffuse_linear (cp, lw, NULL);        /* contiguous copy + GEMM */
  diffuse_tensor_clear (&a);
  diffuse_tensor_clear (&b);
  diffuse_tensor_clear (&c);
  diffuse_tensor_clear (&cp);
  return d;
}

static DiffuseTensor *
rand_host (int ndim, const int64_t *shape, guint32 seed, float amp)
{
  int64_t n = 1;
  for (int i = 0; i < ndim; i++)
    n *= shape[i];
  float *v = g_new (float, n);
  for (int64_t i = 0; i < n; i++) {
    seed = seed * 1664525u + 1013904223u;
    v[i] = ((seed >> 8) / 16777216.0f - 0.5f) * amp;
  }
  DiffuseTensor *t = diffuse_tensor_from_f32 (v, ndim, shape);
  g_free (v);
  return t;
}

static void
graph_check (void)
{
  if (!diffuse_device_is_cuda (gpu))
    return;
  const int64_t xs[4] = { 2, 8, 16, 16 }, ws[4] = { 8, 8, 3, 3 }, gs[1] = { 8 }, ls[2] = { 16, 8 };
  DiffuseTensor *hw = rand_host (4, ws, 7, 0.5f), *hg = rand_host (1, gs, 9, 2.0f), *hl = rand_host (2, ls, 11, 0.5f);
  DiffuseTensor *w = diffuse_to_device (hw, gpu), *g = diffuse_to_device (hg, gpu), *lw = diffuse_to_device (hl, gpu);
  DiffuseTensor *hx = rand_host (4, xs, 1, 2.0f);
  DiffuseTensor *x = diffuse_to_device (hx, gpu);
  GError *err = NULL;
  gboolean ok = x && w && g && lw;
  DiffuseTensor *warm = ok ? graph_block (x, w, g, lw) : NULL;   /* warms the pool and cuBLAS */
  diffuse_tensor_clear (&warm);
  DiffuseCudaGraph *graph = NULL;
  DiffuseTensor *y = NULL;
  if (ok && diffuse_cuda_graph_begin (gpu, &err)) {
    y = graph_block (x, w, g, lw);
    graph = diffuse_cuda_graph_end (gpu, &err);
  }
  double worst = 0;
  guint64 mallocs0 = 0, mallocs1 = 0;
  for (int r = 0; graph && y && r < 3; r++) {
    DiffuseTensor *hn = rand_host (4, xs, 100 + r, 2.0f);
    if (!diffuse_copy_into (x, hn) || !diffuse_cuda_graph_replay (graph, &err)) {
      diffuse_tensor_unref (hn);
      break;
    }
    DiffuseTensor *ref = graph_block (x, w, g, lw);
    if (r == 0) {
      DiffuseCudaPoolStats ps;
      diffuse_cuda_get_pool_stats (gpu, &ps);
      mallocs0 = ps.n_cuda_mallocs;
    }
    double d = ref ? diffuse_tensor_max_abs_diff (y, ref) : INFINITY;
    worst = MAX (worst, d);
    diffuse_tensor_clear (&ref);
    diffuse_tensor_unref (hn);
  }
  DiffuseCudaPoolStats ps;
  diffuse_cuda_get_pool_stats (gpu, &ps);
  mallocs1 = ps.n_cuda_mallocs;
  if (!err)
    diffuse_tensor_take_error (&err);
  gboolean pass = graph && y && !err && worst <= 1e-5 && mallocs1 == mallocs0;
  say ("%s graph              capture-replay                           f32    max |replay - eager| %.3g, "
       "cudaMalloc during replays %" G_GUINT64_FORMAT "%s%s\n", pass ? "PASS" : "FAIL", worst, mallocs1 - mallocs0,
       err ? ": " : "", err ? err->message : "");
  pass ? n_pass++ : n_fail++;
  g_clear_error (&err);
  diffuse_cuda_graph_free (graph);
  diffuse_tensor_clear (&y);
  diffuse_tensor_clear (&x);
  diffuse_tensor_clear (&w);
  diffuse_tensor_clear (&g);
  diffuse_tensor_clear (&lw);
  diffuse_tensor_unref (hx);
  diffuse_tensor_unref (hw);
  diffuse_tensor_unref (hg);
  diffuse_tensor_unref (hl);
}

/* --attn-timing: f16 attention at SD 1.5 512x512 shapes (CFG batch 2 x 8
 * heads; the VAE's one 512-wide head) through each path, median of 10 after 2
 * warm-ups, and each path's largest difference from the unfused one: the data
 * for choosing the default path per shape. */
static void
attn_timing (void)
{
  static const struct { int64_t bh, lq, lk, d; const char *what; } shapes[] = {
    { 16, 4096, 4096, 40, "self 64x64" },  { 16, 4096, 77, 40, "cross 64x64" },
    { 16, 1024, 1024, 80, "self 32x32" },  { 16, 1024, 77, 80, "cross 32x32" },
    { 16, 256, 256, 160, "self 16x16" },   { 16, 256, 77, 160, "cross 16x16" },
    { 16, 64, 64, 160, "self 8x8 (mid)" }, { 1, 4096, 4096, 512, "VAE mid 64x64" },
  };
  static const char *modes[] = { "unfused", "flash", "flash64", "flash128", "wmma", "simple" };
  for (guint si = 0; si < G_N_ELEMENTS (shapes); si++) {
    const int64_t qs[4] = { 1, shapes[si].bh, shapes[si].lq, shapes[si].d };
    const int64_t ks[4] = { 1, shapes[si].bh, shapes[si].lk, shapes[si].d };
    DiffuseTensor *hq = rand_host (4, qs, 3 + si, 4.0f), *hk = rand_host (4, ks, 5 + si, 4.0f),
                  *hv = rand_host (4, ks, 7 + si, 2.0f);
    DiffuseTensor *cq = diffuse_cast (hq, DIFFUSE_DTYPE_F16), *ck = diffuse_cast (hk, DIFFUSE_DTYPE_F16),
                  *cv = diffuse_cast (hv, DIFFUSE_DTYPE_F16);
    DiffuseTensor *q = diffuse_to_device (cq, gpu), *k = diffuse_to_device (ck, gpu), *v = diffuse_to_device (cv, gpu);
    DiffuseTensor *ref = NULL;
    for (guint mi = 0; mi < G_N_ELEMENTS (modes); mi++) {
      const gboolean rows = g_str_has_prefix (modes[mi], "flash") && modes[mi][5];   /* flash64, flash128 */
      g_setenv ("DIFFUSE_CUDA_ATTN", rows ? "flash" : modes[mi], TRUE);
      if (rows)
        g_setenv ("DIFFUSE_CUDA_FLASH_ROWS", modes[mi] + 5, TRUE);
      else
        g_unsetenv ("DIFFUSE_CUDA_FLASH_ROWS");
      double t[10];
      DiffuseTensor *o = NULL;
      GError *err = NULL;
      for (int r = -2; r < 10; r++) {
        diffuse_tensor_clear (&o);
        gint64 a = g_get_monotonic_time ();
        o = diffuse_sdpa (q, k, v, NULL, FALSE, 0.0f);
        if (!o || !diffuse_cuda_synchronize (gpu, &err))
          break;
        if (r >= 0)
          t[r] = (g_get_monotonic_time () - a) / 1e3;
      }
      if (!o) {
        diffuse_tensor_take_error (&err);
        say ("attn %-16s %-8s failed: %s\n", shapes[si].what, modes[mi], err ? err->message : "?");
        g_clear_error (&err);
        continue;
      }
      for (int i = 1; i < 10; i++)   /* insertion sort for the median */
        for (int j = i; j > 0 && t[j] < t[j - 1]; j--) {
          double x = t[j];
          t[j] = t[j - 1];
          t[j - 1] = x;
        }
      double diff = ref ? diffuse_tensor_max_abs_diff (o, ref) : 0.0;
      say ("attn %-16s BH %3" G_GINT64_FORMAT " Lq %5" G_GINT64_FORMAT " Lk %5" G_GINT64_FORMAT " D %3" G_GINT64_FORMAT
           "  %-8s %8.3f ms  max|o - unfused| %.3g\n", shapes[si].what, shapes[si].bh, shapes[si].lq, shapes[si].lk,
           shapes[si].d, modes[mi], 0.5 * (t[4] + t[5]), diff);
      if (!ref)
        ref = o;
      else
        diffuse_tensor_unref (o);
    }
    g_unsetenv ("DIFFUSE_CUDA_ATTN");
    g_unsetenv ("DIFFUSE_CUDA_FLASH_ROWS");
    diffuse_tensor_clear (&ref);
    DiffuseTensor *all[] = { hq, hk, hv, cq, ck, cv, q, k, v };
    for (guint i = 0; i < G_N_ELEMENTS (all); i++)
      diffuse_tensor_clear (&all[i]);
  }
}
#endif

int
main (int argc, char **argv)
{
  g_autofree char *device_s = NULL, *fixtures_s = NULL, *report_path = NULL, *filter = NULL;
  gboolean attn_only = FALSE;
  GOptionEntry entries[] = {
    { "attn-timing", 0, 0, G_OPTION_ARG_NONE, &attn_only, "only time f16 attention at SD 1.5 shapes per path", NULL },
    { "device", 0, 0, G_OPTION_ARG_STRING, &device_s, "device (cuda:0)", "DEV" },
    { "fixtures", 0, 0, G_OPTION_ARG_STRING, &fixtures_s, "tests/fixtures folder", "DIR" },
    { "report", 0, 0, G_OPTION_ARG_STRING, &report_path, "also write the lines here", "FILE" },
    { "filter", 0, 0, G_OPTION_ARG_STRING, &filter, "only cases whose name contains this", "S" },
    { NULL },
  };
  g_autoptr (GOptionContext) oc = g_option_context_new ("- op cases on a GPU");
  g_option_context_add_main_entries (oc, entries, NULL);
  g_autoptr (GError) err = NULL;
  if (!g_option_context_parse (oc, &argc, &argv, &err)) {
    fprintf (stderr, "%s\n", err->message);
    return 2;
  }
  const char *device = device_s ? device_s : "cuda:0";
  const char *fixtures = fixtures_s ? fixtures_s : g_getenv ("DIFFUSE_FIXTURES");
  if (!fixtures) {
    fprintf (stderr, "--fixtures or DIFFUSE_FIXTURES needed\n");
    return 2;
  }
  gpu = diffuse_device_get (device, &err);
  if (!gpu) {
    printf ("SKIP: %s\n", err->message);
    return 77;
  }
  if (report_path)
    report = fopen (report_path, "w");
  if (attn_only) {
#if DIFFUSE_HAVE_CUDA
    if (diffuse_device_is_cuda (gpu))
      attn_timing ();
#endif
    if (report)
      fclose (report);
    return 0;
  }
  g_autofree char *json_path = g_build_filename (fixtures, "ops", "cases.json", NULL);
  g_autofree char *st_path = g_build_filename (fixtures, "ops", "ops.safetensors", NULL);
  g_autoptr (JsonParser) parser = json_parser_new ();
  if (!json_parser_load_from_file (parser, json_path, &err))
    g_error ("%s: %s", json_path, err->message);
  st = diffuse_safetensors_open (st_path, &err);
  if (!st)
    g_error ("%s: %s", st_path, err->message);
  JsonArray *cases = json_object_get_array_member (json_node_get_object (json_parser_get_root (parser)), "cases");
  say ("device %s, %u cases\n", device, json_array_get_length (cases));
  for (guint i = 0; i < json_array_get_length (cases); i++) {
    JsonObject *c = json_array_get_object_element (cases, i);
    const char *name = json_object_get_string_member (c, "name");
    const char *op = json_object_get_string_member (c, "op");
    if (filter && !strstr (name, filter))
      continue;
    double tol = json_object_get_double_member (c, "tol");
    run_variant (c, -1, "native", MAX (tol, 2e-5));
    gboolean native_only = g_str_equal (op, "cast") || g_str_equal (op, "chunk") || g_str_equal (op, "permute") ||
                           g_str_equal (op, "timestep_embedding");
    if (native_only) {
      n_skip += 2;
      continue;
    }
    run_variant (c, DIFFUSE_DTYPE_F16, "f16", 5e-3);
    run_variant (c, DIFFUSE_DTYPE_BF16, "bf16", 2e-2);
    if (g_str_equal (op, "conv2d")) {
      /* the default is the row-wise im2col + cuBLAS for these small grids
       * (the implicit GEMM takes only grids that fill the GPU); also the
       * element-wise im2col kernel with no implicit GEMM at all */
      g_setenv ("DIFFUSE_CUDA_IM2COL", "elements", TRUE);
      g_setenv ("DIFFUSE_CUDA_CONV", "im2col", TRUE);
      run_variant (c, -1, "nat-e", MAX (tol, 2e-5));
      run_variant (c, DIFFUSE_DTYPE_F16, "f16e", 5e-3);
      run_variant (c, DIFFUSE_DTYPE_BF16, "bf16e", 2e-2);
      g_unsetenv ("DIFFUSE_CUDA_IM2COL");
      /* the implicit GEMM everywhere (DIFFUSE_CUDA_CONV=implicit: every
       * f16/bf16 conv with Cin % 8 == 0 that is not a plain 1x1, split-K) */
      g_setenv ("DIFFUSE_CUDA_CONV", "implicit", TRUE);
      run_variant (c, -1, "nat-i", MAX (tol, 2e-5));
      run_variant (c, DIFFUSE_DTYPE_F16, "f16i", 5e-3);
      run_variant (c, DIFFUSE_DTYPE_BF16, "bf16i", 2e-2);
      g_unsetenv ("DIFFUSE_CUDA_CONV");
    }
    if (g_str_equal (op, "sdpa")) {
      /* f16/bf16 attention runs on the flash kernel where it applies (no
       * mask, D % 8 == 0, D <= 160), else WMMA / unfused; each forced too */
      g_setenv ("DIFFUSE_CUDA_FLASH_ROWS", "128", TRUE);   /* the flash kernel's 8-warp blocks */
      run_variant (c, DIFFUSE_DTYPE_F16, "f16f8", 5e-3);
      run_variant (c, DIFFUSE_DTYPE_BF16, "bf16f8", 2e-2);
      g_unsetenv ("DIFFUSE_CUDA_FLASH_ROWS");
      g_setenv ("DIFFUSE_CUDA_ATTN", "wmma", TRUE);
      run_variant (c, DIFFUSE_DTYPE_F16, "f16w", 5e-3);
      run_variant (c, DIFFUSE_DTYPE_BF16, "bf16w", 2e-2);
      g_setenv ("DIFFUSE_CUDA_ATTN", "simple", TRUE);
      run_variant (c, DIFFUSE_DTYPE_F16, "f16s", 5e-3);
      run_variant (c, DIFFUSE_DTYPE_BF16, "bf16s", 2e-2);
      /* and the unfused path (cuBLAS + softmax) that head dims over the fused kernels' take */
      g_setenv ("DIFFUSE_CUDA_ATTN", "unfused", TRUE);
      run_variant (c, -1, "nat-u", MAX (tol, 2e-5));
      run_variant (c, DIFFUSE_DTYPE_F16, "f16u", 5e-3);
      run_variant (c, DIFFUSE_DTYPE_BF16, "bf16u", 2e-2);
      g_unsetenv ("DIFFUSE_CUDA_ATTN");
    }
  }
#if DIFFUSE_HAVE_CUDA
  if (!filter)
    graph_check ();
#endif
  say ("SUMMARY device %s (%s): %d pass, %d fail, %d variants not run\n", device, diffuse_device_name (gpu), n_pass,
       n_fail, n_skip);
  if (report)
    fclose (report);
  diffuse_safetensors_unref (st);
  return n_fail ? 1 : 0;
}
