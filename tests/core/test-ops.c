/* Every tensor op of diffuse/tensor.h against torch.
 *
 * The cases come from tests/reference/make_op_fixtures.py:
 * fixtures/ops/cases.json lists them (op, parameters, which inputs, the view
 * steps that make an input strided, the tolerance) and fixtures/ops/ops.safetensors
 * holds "<case>.<input>" and "<case>.out" (expected, F32).  Each case is one
 * GTest path /ops/<op>/<case>; a case passes when
 *   max |got - want| <= tol * max (1, max |want|)
 * over the finite expected values (element-wise ops: |got - want| <= tol *
 * max (1, |want|) for every element), non-finite ones matching exactly (cast:
 * every element bit for bit, any NaN matching any NaN; the scalar converters
 * and diffuse_convert_row are checked on the same data).  Tolerances come from
 * the fixture (see the script): 1e-5 for float32, 1e-3 / 8e-3 for f16 / bf16
 * inputs, a few float32 ulps of the argument for the timestep embedding.
 * g_criticals do not abort: each fails the current case, and the program runs
 * every case (--keep-going) so one report lists every failing op.
 *
 * Then tests of the conventions of tensor.h: NULL propagation, the
 * thread-local error, programmer errors (g_critical + NULL), views sharing
 * storage, borrowed storage released exactly once, memory statistics. */
#include <math.h>
#include <string.h>
#include <json-glib/json-glib.h>

#include "testutil.h"
#include "diffuse-config.h"
#if DIFFUSE_HAVE_CUDA
#include "diffuse-cuda.h"
#endif

static DiffuseSafetensors *st;

/* ---- criticals: counted and turned into a failure of the current test
 * (unless the test expects them), never an abort, so that one op that
 * rejects a case does not hide the results of all the others. ---- */

static int n_criticals;
static char *last_critical;
static gboolean criticals_expected;

static void
log_handler (const char *domain, GLogLevelFlags level, const char *message, gpointer user_data)
{
  if (level & (G_LOG_LEVEL_CRITICAL | G_LOG_LEVEL_WARNING)) {
    n_criticals++;
    g_free (last_critical);
    last_critical = g_strdup (message);
    g_test_message ("%s-%s: %s", domain ? domain : "", (level & G_LOG_LEVEL_CRITICAL) ? "CRITICAL" : "WARNING",
                    message);
    if (!criticals_expected)
      g_test_fail_printf ("unexpected %s: %s", (level & G_LOG_LEVEL_CRITICAL) ? "g_critical" : "g_warning",
                          message);
    return;
  }
  g_log_default_handler (domain, level, message, user_data);
}

static void
reset_criticals (void)
{
  n_criticals = 0;
  g_clear_pointer (&last_critical, g_free);
}

/* ---- independent readers of tensor memory (not the library's converters) ---- */

static float
h2f (uint16_t h)
{
  uint32_t sign = (uint32_t) (h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0) {
    float f = ldexpf ((float) man, -24);
    return sign ? -f : f;
  }
  if (exp == 31)
    u = sign | 0x7f800000u | (man << 13);
  else
    u = sign | ((exp + 112) << 23) | (man << 13);
  float f;
  memcpy (&f, &u, 4);
  return f;
}

static float
bf2f (uint16_t b)
{
  uint32_t u = (uint32_t) b << 16;
  float f;
  memcpy (&f, &u, 4);
  return f;
}

static uint32_t
f2bits (float f)
{
  uint32_t u;
  memcpy (&u, &f, 4);
  return u;
}

/* Element i (row-major over the tensor's shape) of any CPU tensor, as f32. */
static float *
read_f32 (DiffuseTensor *t)
{
  int64_t n = diffuse_tensor_numel (t);
  float *out = g_new (float, MAX (n, 1));
  const char *base = diffuse_tensor_data (t);
  size_t es = diffuse_dtype_size (t->dtype);
  int64_t idx[DIFFUSE_MAX_DIMS] = { 0 };
  for (int64_t i = 0; i < n; i++) {
    int64_t off = 0;
    for (int d = 0; d < t->ndim; d++)
      off += idx[d] * t->stride[d];
    const char *p = base + off * (int64_t) es;
    if (t->dtype == DIFFUSE_DTYPE_F32)
      memcpy (&out[i], p, 4);
    else {
      uint16_t h;
      memcpy (&h, p, 2);
      out[i] = t->dtype == DIFFUSE_DTYPE_F16 ? h2f (h) : bf2f (h);
    }
    for (int d = t->ndim - 1; d >= 0; d--) {
      if (++idx[d] < t->shape[d])
        break;
      idx[d] = 0;
    }
  }
  return out;
}

/* Raw 16- or 32-bit patterns, row-major. */
static uint32_t *
read_bits (DiffuseTensor *t)
{
  int64_t n = diffuse_tensor_numel (t);
  uint32_t *out = g_new0 (uint32_t, MAX (n, 1));
  const char *base = diffuse_tensor_data (t);
  size_t es = diffuse_dtype_size (t->dtype);
  int64_t idx[DIFFUSE_MAX_DIMS] = { 0 };
  for (int64_t i = 0; i < n; i++) {
    int64_t off = 0;
    for (int d = 0; d < t->ndim; d++)
      off += idx[d] * t->stride[d];
    const char *p = base + off * (int64_t) es;
    if (es == 4)
      memcpy (&out[i], p, 4);
    else {
      uint16_t h;
      memcpy (&h, p, 2);
      out[i] = h;
    }
    for (int d = t->ndim - 1; d >= 0; d--) {
      if (++idx[d] < t->shape[d])
        break;
      idx[d] = 0;
    }
  }
  return out;
}

static char *
shape_str (DiffuseTensor *t)
{
  GString *s = g_string_new ("[");
  for (int d = 0; d < t->ndim; d++)
    g_string_append_printf (s, "%s%" G_GINT64_FORMAT, d ? ", " : "", t->shape[d]);
  g_string_append (s, "]");
  return g_string_free (s, FALSE);
}

static gboolean
check_shape (const char *what, DiffuseTensor *got, DiffuseTensor *want)
{
  gboolean same = got->ndim == want->ndim;
  for (int d = 0; same && d < got->ndim; d++)
    same = got->shape[d] == want->shape[d];
  if (!same) {
    g_autofree char *g = shape_str (got), *w = shape_str (want);
    g_test_fail_printf ("%s: shape %s, expected %s", what, g, w);
  }
  return same;
}

/* max|got - want| <= tol * max(1, max|want|) over finite want; non-finite
 * exact.  elementwise: |got - want| <= tol * max(1, |want|) for each element
 * (the reported error is then relative to max(1, |want|)). */
static void
compare (const char *what, DiffuseTensor *got, DiffuseTensor *want, double tol, gboolean elementwise)
{
  if (!check_shape (what, got, want))
    return;
  int64_t n = diffuse_tensor_numel (want);
  g_autofree float *g = read_f32 (got);
  g_autofree float *w = read_f32 (want);
  double maxw = 0, maxerr = 0;
  int64_t worst = -1, bad_nonfinite = -1;
  for (int64_t i = 0; i < n; i++)
    if (isfinite (w[i]))
      maxw = MAX (maxw, fabs (w[i]));
  for (int64_t i = 0; i < n; i++) {
    if (!isfinite (w[i])) {
      gboolean ok = isnan (w[i]) ? isnan (g[i]) : g[i] == w[i];
      if (!ok && bad_nonfinite < 0)
        bad_nonfinite = i;
      continue;
    }
    double e = isnan (g[i]) ? INFINITY : fabs ((double) g[i] - (double) w[i]);
    if (elementwise)
      e /= MAX (1.0, fabs (w[i]));
    if (worst < 0 || e > maxerr) {
      maxerr = e;
      worst = i;
    }
  }
  double limit = elementwise ? tol : tol * MAX (1.0, maxw);
  g_test_message ("%s: max %s err %.3g (limit %.3g, max|want| %.3g, got dtype %s)", what,
                  elementwise ? "element-wise relative" : "abs", maxerr, limit, maxw, diffuse_dtype_name (got->dtype));
  if (bad_nonfinite >= 0)
    g_test_fail_printf ("%s: element %" G_GINT64_FORMAT ": got %.9g, expected %.9g", what, bad_nonfinite,
                        g[bad_nonfinite], w[bad_nonfinite]);
  if (!(maxerr <= limit))
    g_test_fail_printf ("%s: max %s err %.4g > limit %.4g (tol %.3g); worst element %" G_GINT64_FORMAT
                        ": got %.9g, expected %.9g (got dtype %s)",
                        what, elementwise ? "element-wise relative" : "abs", maxerr, limit, tol, worst,
                        worst >= 0 ? g[worst] : NAN, worst >= 0 ? w[worst] : NAN, diffuse_dtype_name (got->dtype));
}

/* ---- case plumbing ---------------------------------------------------- */

static DiffuseDType
entry_dtype (const DiffuseStEntry *e)
{
  switch (e->dtype) {
  case DIFFUSE_ST_F32: return DIFFUSE_DTYPE_F32;
  case DIFFUSE_ST_F16: return DIFFUSE_DTYPE_F16;
  case DIFFUSE_ST_BF16: return DIFFUSE_DTYPE_BF16;
  default: g_error ("fixture %s: unexpected dtype %s", e->name, diffuse_st_dtype_name (e->dtype));
  }
  return DIFFUSE_DTYPE_F32;
}

/* The stored tensor "<case>.<name>" in its own dtype (a borrowed view of the mapping). */
static DiffuseTensor *
raw_tensor (const char *cname, const char *name)
{
  g_autofree char *key = g_strdup_printf ("%s.%s", cname, name);
  const DiffuseStEntry *e = diffuse_safetensors_find (st, key);
  if (!e)
    g_error ("fixture tensor %s missing", key);
  g_autoptr (GError) err = NULL;
  DiffuseTensor *t = diffuse_safetensors_tensor (st, key, entry_dtype (e), diffuse_device_cpu (), &err);
  if (!t)
    g_error ("loading %s: %s", key, err->message);
  return t;
}

/* An input with its view steps applied; NULL when the case has no such input. */
static DiffuseTensor *
input (JsonObject *c, const char *name)
{
  JsonObject *ins = json_object_get_object_member (c, "inputs");
  if (!json_object_has_member (ins, name))
    return NULL;
  JsonObject *spec = json_object_get_object_member (ins, name);
  DiffuseTensor *t = raw_tensor (json_object_get_string_member (c, "name"), name);
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
        g_assert_cmpstr (kind, ==, "narrow");
        v = diffuse_narrow (t, (int) json_array_get_int_element (s, 1), json_array_get_int_element (s, 2),
                            json_array_get_int_element (s, 3));
      }
      g_assert_nonnull (v);
      diffuse_tensor_unref (t);
      t = v;
    }
  }
  return t;
}

static double
pdouble (JsonObject *c, const char *k)
{
  return json_object_get_double_member (json_object_get_object_member (c, "params"), k);
}

static int
pint (JsonObject *c, const char *k)
{
  return (int) json_object_get_int_member (json_object_get_object_member (c, "params"), k);
}

static gboolean
pbool (JsonObject *c, const char *k)
{
  return json_object_get_boolean_member (json_object_get_object_member (c, "params"), k);
}

static const char *
pstr (JsonObject *c, const char *k)
{
  return json_object_get_string_member (json_object_get_object_member (c, "params"), k);
}

static DiffuseActivation
act_of (const char *s)
{
  static const struct { const char *n; DiffuseActivation a; } map[] = {
    { "none", DIFFUSE_ACT_NONE }, { "silu", DIFFUSE_ACT_SILU }, { "gelu", DIFFUSE_ACT_GELU },
    { "gelu_tanh", DIFFUSE_ACT_GELU_TANH }, { "quick_gelu", DIFFUSE_ACT_QUICK_GELU },
    { "relu", DIFFUSE_ACT_RELU }, { "sigmoid", DIFFUSE_ACT_SIGMOID },
  };
  for (guint i = 0; i < G_N_ELEMENTS (map); i++)
    if (g_str_equal (map[i].n, s))
      return map[i].a;
  g_error ("unknown activation %s", s);
  return DIFFUSE_ACT_NONE;
}

static DiffuseDType
dtype_of (const char *s)
{
  if (g_str_equal (s, "f32"))
    return DIFFUSE_DTYPE_F32;
  if (g_str_equal (s, "f16"))
    return DIFFUSE_DTYPE_F16;
  g_assert_cmpstr (s, ==, "bf16");
  return DIFFUSE_DTYPE_BF16;
}

/* Cast: bit-exact against torch's .to(); also the scalar converters and
 * diffuse_convert_row on the same data when the source is contiguous. */
static void
check_cast (JsonObject *c, DiffuseTensor *x, DiffuseTensor *got, DiffuseTensor *want)
{
  const char *cname = json_object_get_string_member (c, "name");
  if (got->dtype != want->dtype) {
    g_test_fail_printf ("%s: dtype %s, expected %s", cname, diffuse_dtype_name (got->dtype),
                        diffuse_dtype_name (want->dtype));
    return;
  }
  if (!check_shape (cname, got, want))
    return;
  int64_t n = diffuse_tensor_numel (want);
  g_autofree uint32_t *gb = read_bits (got);
  g_autofree uint32_t *wb = read_bits (want);
  g_autofree float *wf = read_f32 (want);
  g_autofree float *gf = read_f32 (got);
  g_autofree float *xf = read_f32 (x);
  g_autofree uint32_t *xb = read_bits (x);
  int bad = 0;
  for (int64_t i = 0; i < n; i++) {
    gboolean ok = isnan (wf[i]) ? isnan (gf[i]) : gb[i] == wb[i];
    if (!ok && bad++ < 8)
      g_test_fail_printf ("%s: element %" G_GINT64_FORMAT " (source %.9g, bits 0x%08x): got bits 0x%04x (%.9g), "
                          "expected 0x%04x (%.9g)", cname, i, xf[i], xb[i], gb[i], gf[i], wb[i], wf[i]);
  }
  if (bad)
    g_test_message ("%s: %d elements differ", cname, bad);

  /* scalar converters */
  bad = 0;
  for (int64_t i = 0; i < n; i++) {
    uint32_t r;
    float rf;
    if (x->dtype == DIFFUSE_DTYPE_F32 && want->dtype == DIFFUSE_DTYPE_F16) {
      r = diffuse_f32_to_f16 (xf[i]);
      rf = h2f ((uint16_t) r);
    } else if (x->dtype == DIFFUSE_DTYPE_F32 && want->dtype == DIFFUSE_DTYPE_BF16) {
      r = diffuse_f32_to_bf16 (xf[i]);
      rf = bf2f ((uint16_t) r);
    } else if (x->dtype == DIFFUSE_DTYPE_F16 && want->dtype == DIFFUSE_DTYPE_F32) {
      rf = diffuse_f16_to_f32 ((uint16_t) xb[i]);
      r = f2bits (rf);
    } else if (x->dtype == DIFFUSE_DTYPE_BF16 && want->dtype == DIFFUSE_DTYPE_F32) {
      rf = diffuse_bf16_to_f32 ((uint16_t) xb[i]);
      r = f2bits (rf);
    } else
      break;
    gboolean ok = isnan (wf[i]) ? isnan (rf) : r == wb[i];
    if (!ok && bad++ < 8)
      g_test_fail_printf ("%s: scalar converter, element %" G_GINT64_FORMAT " (source bits 0x%08x): got 0x%04x, "
                          "expected 0x%04x", cname, i, xb[i], r, wb[i]);
  }

  /* diffuse_convert_row on the contiguous source */
  if (diffuse_tensor_is_contiguous (x)) {
    size_t es = diffuse_dtype_size (want->dtype);
    g_autofree char *row = g_malloc0 (n * es);
    diffuse_convert_row (row, want->dtype, diffuse_tensor_data (x), x->dtype, n);
    bad = 0;
    for (int64_t i = 0; i < n; i++) {
      uint32_t r = 0;
      float rf;
      if (es == 4) {
        memcpy (&r, row + 4 * i, 4);
        memcpy (&rf, &r, 4);
      } else {
        uint16_t h;
        memcpy (&h, row + 2 * i, 2);
        r = h;
        rf = want->dtype == DIFFUSE_DTYPE_F16 ? h2f (h) : bf2f (h);
      }
      gboolean ok = isnan (wf[i]) ? isnan (rf) : r == wb[i];
      if (!ok && bad++ < 8)
        g_test_fail_printf ("%s: diffuse_convert_row, element %" G_GINT64_FORMAT ": got 0x%04x, expected 0x%04x",
                            cname, i, r, wb[i]);
    }
  }
}

static void
run_case (gconstpointer data)
{
  JsonObject *c = (JsonObject *) data;
  const char *cname = json_object_get_string_member (c, "name");
  const char *op = json_object_get_string_member (c, "op");
  double tol = json_object_get_double_member (c, "tol");
  gboolean ew = json_object_get_boolean_member_with_default (c, "elementwise", FALSE);
  DiffuseTensor *outs[16] = { NULL };
  int n_out = 1;
  DiffuseTensor *ins[16] = { NULL };
  int n_in = 0;
#define IN(name) (ins[n_in++] = input (c, name))

  reset_criticals ();
  if (g_str_equal (op, "linear")) {
    DiffuseTensor *x = IN ("x"), *w = IN ("w"), *b = IN ("b");
    outs[0] = diffuse_linear (x, w, b);
  } else if (g_str_equal (op, "matmul")) {
    DiffuseTensor *a = IN ("a"), *b = IN ("b");
    outs[0] = diffuse_matmul (a, b, pbool (c, "trans_a"), pbool (c, "trans_b"), pdouble (c, "alpha"));
  } else if (g_str_equal (op, "conv2d")) {
    DiffuseTensor *x = IN ("x"), *w = IN ("w"), *b = IN ("b");
    outs[0] = diffuse_conv2d (x, w, b, pint (c, "stride_h"), pint (c, "stride_w"), pint (c, "pad_h"),
                              pint (c, "pad_w"));
  } else if (g_str_equal (op, "pad2d")) {
    outs[0] = diffuse_pad2d (IN ("x"), pint (c, "left"), pint (c, "right"), pint (c, "top"), pint (c, "bottom"));
  } else if (g_str_equal (op, "group_norm")) {
    DiffuseTensor *x = IN ("x"), *g = IN ("gamma"), *b = IN ("beta");
    outs[0] = diffuse_group_norm (x, pint (c, "groups"), g, b, pdouble (c, "eps"), act_of (pstr (c, "act")));
  } else if (g_str_equal (op, "layer_norm")) {
    DiffuseTensor *x = IN ("x"), *g = IN ("gamma"), *b = IN ("beta");
    outs[0] = diffuse_layer_norm (x, g, b, pdouble (c, "eps"));
  } else if (g_str_equal (op, "softmax")) {
    outs[0] = diffuse_softmax (IN ("x"));
  } else if (g_str_equal (op, "sdpa")) {
    DiffuseTensor *q = IN ("q"), *k = IN ("k"), *v = IN ("v"), *m = IN ("mask");
    outs[0] = diffuse_sdpa (q, k, v, m, pbool (c, "causal"), pdouble (c, "scale"));
  } else if (g_str_equal (op, "activation")) {
    outs[0] = diffuse_activation (IN ("x"), act_of (pstr (c, "act")));
  } else if (g_str_equal (op, "geglu")) {
    outs[0] = diffuse_geglu (IN ("x"));
  } else if (g_str_equal (op, "upsample_nearest")) {
    outs[0] = diffuse_upsample_nearest (IN ("x"), pint (c, "out_h"), pint (c, "out_w"));
  } else if (g_str_equal (op, "avg_pool2d")) {
    outs[0] = diffuse_avg_pool2d (IN ("x"), pint (c, "k"), pint (c, "stride"));
  } else if (g_str_equal (op, "binary")) {
    const char *kind = pstr (c, "kind");
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
    outs[0] = diffuse_scale (IN ("x"), pdouble (c, "s"), pdouble (c, "b"));
  } else if (g_str_equal (op, "axpy")) {
    DiffuseTensor *a = IN ("a"), *b = IN ("b");
    outs[0] = diffuse_copy (a);
    g_assert_true (outs[0] != a && outs[0]->storage != a->storage);
    if (!diffuse_axpy_inplace (outs[0], pdouble (c, "alpha"), b))
      diffuse_tensor_clear (&outs[0]);
  } else if (g_str_equal (op, "concat")) {
    int n = pint (c, "n");
    for (int i = 0; i < n; i++) {
      g_autofree char *nm = g_strdup_printf ("x%d", i);
      IN (nm);
    }
    outs[0] = diffuse_concat (ins, n, pint (c, "dim"));
  } else if (g_str_equal (op, "chunk")) {
    DiffuseTensor *x = IN ("x");
    n_out = pint (c, "n");
    if (!diffuse_chunk (x, n_out, pint (c, "dim"), outs))
      memset (outs, 0, sizeof outs);
    for (int i = 0; i < n_out && outs[0]; i++)
      if (outs[i] && outs[i]->storage != x->storage)
        g_test_fail_printf ("%s: chunk %d does not share the input's storage", cname, i);
  } else if (g_str_equal (op, "permute")) {
    DiffuseTensor *x = IN ("x");
    JsonArray *p = json_object_get_array_member (json_object_get_object_member (c, "params"), "perm");
    int perm[DIFFUSE_MAX_DIMS];
    for (guint k = 0; k < json_array_get_length (p); k++)
      perm[k] = (int) json_array_get_int_element (p, k);
    DiffuseTensor *v = ins[n_in++] = diffuse_permute (x, perm);
    if (v && v->storage != x->storage)
      g_test_fail_printf ("%s: permute is not a view", cname);
    outs[0] = diffuse_contiguous (v);
    if (outs[0] && !diffuse_tensor_is_contiguous (outs[0]))
      g_test_fail_printf ("%s: diffuse_contiguous returned a non-contiguous tensor", cname);
    /* the same through diffuse_copy and diffuse_copy_into */
    outs[1] = diffuse_copy (v);
    outs[2] = v ? diffuse_tensor_new (diffuse_device_cpu (), v->dtype, v->ndim, v->shape) : NULL;
    if (outs[2] && !diffuse_copy_into (outs[2], v))
      diffuse_tensor_clear (&outs[2]);
    n_out = 3;
  } else if (g_str_equal (op, "cast")) {
    DiffuseTensor *x = IN ("x");
    outs[0] = diffuse_cast (x, dtype_of (pstr (c, "to")));
  } else if (g_str_equal (op, "timestep_embedding")) {
    outs[0] = diffuse_timestep_embedding (IN ("t"), pint (c, "dim"), pbool (c, "flip_sin_to_cos"),
                                          pdouble (c, "downscale_freq_shift"), pdouble (c, "scale"),
                                          pdouble (c, "max_period"));
  } else if (g_str_equal (op, "embedding")) {
    JsonArray *a = json_object_get_array_member (json_object_get_object_member (c, "params"), "ids");
    guint n = json_array_get_length (a);
    g_autofree int32_t *ids = g_new (int32_t, n);
    for (guint i = 0; i < n; i++)
      ids[i] = (int32_t) json_array_get_int_element (a, i);
    outs[0] = diffuse_embedding (IN ("table"), ids, n);
  } else {
    g_error ("unknown op %s in cases.json", op);
  }
#undef IN

  if (n_criticals)
    g_test_fail_printf ("%s (%s): %d critical(s), last: %s", cname, op, n_criticals, last_critical);
  g_autoptr (GError) err = NULL;
  gboolean had_err = diffuse_tensor_take_error (&err);
  for (int i = 0; i < n_out; i++)
    if (!outs[i]) {
      g_test_fail_printf ("%s (%s): output %d is NULL%s%s", cname, op, i, had_err ? ": " : " (no error set)",
                          had_err ? err->message : "");
      break;
    }

  if (g_str_equal (op, "cast")) {
    DiffuseTensor *want = raw_tensor (cname, "out");
    if (outs[0])
      check_cast (c, ins[0], outs[0], want);
    diffuse_tensor_unref (want);
  } else if (g_str_equal (op, "permute")) {
    DiffuseTensor *want = raw_tensor (cname, "out");
    const char *how[] = { "contiguous", "copy", "copy_into" };
    for (int i = 0; i < 3; i++)
      if (outs[i]) {
        g_autofree char *what = g_strdup_printf ("%s (%s)", cname, how[i]);
        compare (what, outs[i], want, tol, ew);
      }
    diffuse_tensor_unref (want);
  } else {
    JsonArray *names = json_object_get_array_member (c, "outputs");
    g_assert_cmpint ((int) json_array_get_length (names), ==, n_out);
    for (int i = 0; i < n_out; i++) {
      if (!outs[i])
        continue;
      DiffuseTensor *want = raw_tensor (cname, json_array_get_string_element (names, i));
      g_autofree char *what = g_strdup_printf ("%s.%s", cname, json_array_get_string_element (names, i));
      compare (what, outs[i], want, tol, ew);
      if (diffuse_tensor_is_borrowed (outs[i]) && !g_str_equal (op, "chunk"))
        g_test_fail_printf ("%s: the output of an op is marked borrowed", what);
      diffuse_tensor_unref (want);
    }
  }

#if DIFFUSE_HAVE_CUDA
  /* the CUDA implicit-GEMM convolution's tiling, run on the host: every
   * 16-bit case with Cin % 8 == 0, against torch with the case's tolerance */
  if (g_str_equal (op, "conv2d") && ins[0] && ins[1] && ins[0]->dtype != DIFFUSE_DTYPE_F32 &&
      ins[0]->shape[1] % 8 == 0) {
    /* one block per K range, and split-K in 3 (K steps 3..14 in these cases) */
    for (int splits = 1; splits <= 3; splits += 2) {
      DiffuseTensor *emu = _diffuse_cuda_conv_igemm_emulate (ins[0], ins[1], ins[2], pint (c, "stride_h"),
                                                             pint (c, "stride_w"), pint (c, "pad_h"),
                                                             pint (c, "pad_w"), splits);
      g_autofree char *what = g_strdup_printf ("%s.out (implicit GEMM on the host, %d split%s)", cname, splits,
                                               splits > 1 ? "s" : "");
      if (!emu) {
        g_test_fail_printf ("%s: not computed", what);
      } else {
        DiffuseTensor *want = raw_tensor (cname, "out");
        compare (what, emu, want, tol, ew);
        diffuse_tensor_unref (want);
        diffuse_tensor_unref (emu);
      }
    }
  }
#endif

  for (int i = 0; i < n_out; i++)
    diffuse_tensor_clear (&outs[i]);
  for (int i = 0; i < n_in; i++)
    diffuse_tensor_clear (&ins[i]);
}

/* ---- conventions ------------------------------------------------------ */

static DiffuseTensor *
ramp (int ndim, const int64_t *shape, float mul)
{
  int64_t n = 1;
  for (int d = 0; d < ndim; d++)
    n *= shape[d];
  g_autofree float *v = g_new (float, n);
  for (int64_t i = 0; i < n; i++)
    v[i] = (float) i * mul;
  return diffuse_tensor_from_f32 (v, ndim, shape);
}

/* A NULL input: NULL at once, no critical, no error recorded. */
#define EXPECT_NULL(expr) G_STMT_START {                                              \
    reset_criticals ();                                                               \
    DiffuseTensor *r_ = (expr);                                                       \
    if (r_) {                                                                         \
      g_test_fail_printf ("%s: returned a tensor", #expr);                            \
      diffuse_tensor_unref (r_);                                                      \
    }                                                                                 \
    if (n_criticals)                                                                  \
      g_test_fail_printf ("%s: g_critical on a NULL input: %s", #expr, last_critical); \
  } G_STMT_END

static void
test_null_propagation (void)
{
  const int64_t s2[] = { 2, 3 }, s4[] = { 1, 2, 4, 4 }, s1[] = { 3 };
  DiffuseTensor *x = ramp (2, s2, 0.1f);
  DiffuseTensor *w = ramp (2, s2, 0.2f);
  DiffuseTensor *x4 = ramp (4, s4, 0.01f);
  DiffuseTensor *t1 = ramp (1, s1, 1.0f);
  int perm[] = { 1, 0 };
  int32_t ids[] = { 0 };
  DiffuseTensor *parts[2] = { x, NULL };
  DiffuseTensor *chunks[2] = { NULL, NULL };

  EXPECT_NULL (diffuse_add (NULL, x));
  EXPECT_NULL (diffuse_add (x, NULL));
  EXPECT_NULL (diffuse_sub (NULL, x));
  EXPECT_NULL (diffuse_mul (x, NULL));
  EXPECT_NULL (diffuse_div (NULL, NULL));
  EXPECT_NULL (diffuse_scale (NULL, 2.0f, 1.0f));
  EXPECT_NULL (diffuse_activation (NULL, DIFFUSE_ACT_SILU));
  EXPECT_NULL (diffuse_geglu (NULL));
  EXPECT_NULL (diffuse_linear (NULL, w, NULL));
  EXPECT_NULL (diffuse_linear (x, NULL, NULL));
  EXPECT_NULL (diffuse_matmul (NULL, w, FALSE, TRUE, 1.0f));
  EXPECT_NULL (diffuse_matmul (x, NULL, FALSE, TRUE, 1.0f));
  EXPECT_NULL (diffuse_conv2d (NULL, x4, NULL, 1, 1, 0, 0));
  EXPECT_NULL (diffuse_conv2d (x4, NULL, NULL, 1, 1, 0, 0));
  EXPECT_NULL (diffuse_pad2d (NULL, 1, 1, 1, 1));
  EXPECT_NULL (diffuse_upsample_nearest (NULL, 8, 8));
  EXPECT_NULL (diffuse_avg_pool2d (NULL, 2, 2));
  EXPECT_NULL (diffuse_group_norm (NULL, 1, NULL, NULL, 1e-5f, DIFFUSE_ACT_NONE));
  EXPECT_NULL (diffuse_layer_norm (NULL, NULL, NULL, 1e-5f));
  EXPECT_NULL (diffuse_softmax (NULL));
  EXPECT_NULL (diffuse_sdpa (NULL, x4, x4, NULL, FALSE, 0));
  EXPECT_NULL (diffuse_sdpa (x4, NULL, x4, NULL, FALSE, 0));
  EXPECT_NULL (diffuse_sdpa (x4, x4, NULL, NULL, FALSE, 0));
  EXPECT_NULL (diffuse_timestep_embedding (NULL, 8, TRUE, 0, 1, 10000));
  EXPECT_NULL (diffuse_embedding (NULL, ids, 1));
  EXPECT_NULL (diffuse_reshape_4d (NULL, 1, 1, 2, 3));
  EXPECT_NULL (diffuse_permute (NULL, perm));
  EXPECT_NULL (diffuse_narrow (NULL, 0, 0, 1));
  EXPECT_NULL (diffuse_contiguous (NULL));
  EXPECT_NULL (diffuse_copy (NULL));
  EXPECT_NULL (diffuse_cast (NULL, DIFFUSE_DTYPE_F16));
  EXPECT_NULL (diffuse_to_device (NULL, diffuse_device_cpu ()));
  EXPECT_NULL (diffuse_concat (parts, 2, 0));
  /* a chain fails once, at the end */
  EXPECT_NULL (diffuse_softmax (diffuse_scale (diffuse_add (NULL, t1), 2.0f, 0.0f)));
  reset_criticals ();
  if (diffuse_chunk (NULL, 2, 0, chunks))
    g_test_fail_printf ("diffuse_chunk (NULL) returned TRUE");
  g_assert_null (chunks[0]);
  if (n_criticals)
    g_test_fail_printf ("diffuse_chunk (NULL): g_critical: %s", last_critical);
  /* propagation alone records no error */
  GError *err = NULL;
  if (diffuse_tensor_take_error (&err)) {
    g_test_fail_printf ("NULL propagation recorded an error: %s", err->message);
    g_clear_error (&err);
  }
  diffuse_tensor_unref (x);
  diffuse_tensor_unref (w);
  diffuse_tensor_unref (x4);
  diffuse_tensor_unref (t1);
}

static gpointer
thread_set_error (gpointer data)
{
  diffuse_tensor_set_error (g_error_new (DIFFUSE_ERROR, DIFFUSE_ERROR_DEVICE, "from another thread"));
  GError *err = NULL;
  gboolean got = diffuse_tensor_take_error (&err);
  g_clear_error (&err);
  return GINT_TO_POINTER (got);
}

static void
test_take_error (void)
{
  g_autoptr (GError) err = NULL;
  g_assert_false (diffuse_tensor_take_error (&err));
  g_assert_null (err);

  diffuse_tensor_set_error (g_error_new (DIFFUSE_ERROR, DIFFUSE_ERROR_CANCELLED, "stop %d", 1));
  g_assert_true (diffuse_tensor_take_error (&err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CANCELLED);
  g_assert_cmpstr (err->message, ==, "stop 1");
  g_clear_error (&err);
  /* taking clears it */
  g_assert_false (diffuse_tensor_take_error (&err));
  g_assert_null (err);

  /* thread-local: an error set in another thread is not seen here */
  GThread *th = g_thread_new ("seterr", thread_set_error, NULL);
  g_assert_true (GPOINTER_TO_INT (g_thread_join (th)));
  g_assert_false (diffuse_tensor_take_error (&err));
  g_assert_null (err);
}

/* Allocation failure: NULL + OUT_OF_MEMORY, and the chain after it keeps the
 * first error.  In a subprocess, so an abort (g_malloc) is reported as such. */
static void
test_alloc_failure (void)
{
  if (g_test_subprocess ()) {
    const int64_t huge[] = { (int64_t) 1 << 20, (int64_t) 1 << 20, (int64_t) 1 << 12 };   /* 16 PiB of f32 */
    const int64_t s1[] = { (int64_t) 1 << 20, (int64_t) 1 << 20, (int64_t) 1 << 12 };
    DiffuseTensor *t = diffuse_tensor_new (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 3, huge);
    g_assert_null (t);
    g_autoptr (GError) err = NULL;
    g_assert_true (diffuse_tensor_take_error (&err));
    g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_OUT_OF_MEMORY);
    g_clear_error (&err);

    t = diffuse_tensor_zeros (diffuse_device_cpu (), DIFFUSE_DTYPE_F16, 3, s1);
    g_assert_null (t);
    /* the chain: the ops after the failure see NULL and keep the error */
    g_assert_null (diffuse_activation (diffuse_scale (t, 1.0f, 0.0f), DIFFUSE_ACT_SILU));
    g_assert_true (diffuse_tensor_take_error (&err));
    g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_OUT_OF_MEMORY);
    g_test_message ("allocation failure: %s", err->message);
    return;
  }
  g_test_trap_subprocess (NULL, 60 * G_USEC_PER_SEC, G_TEST_SUBPROCESS_DEFAULT);
  g_test_trap_assert_passed ();
}

/* Shape/dtype mismatches are programmer errors: g_critical + NULL, no crash. */
static void
test_programmer_errors (void)
{
  const int64_t s23[] = { 2, 3 }, s4[] = { 4 }, s35[] = { 3, 5 }, s44[] = { 4, 4 };
  const int64_t x4[] = { 1, 3, 5, 5 }, w4[] = { 2, 4, 3, 3 };
  DiffuseTensor *a = ramp (2, s23, 1);
  DiffuseTensor *b = ramp (1, s4, 1);
  DiffuseTensor *m = ramp (2, s35, 1);
  DiffuseTensor *sq = ramp (2, s44, 1);
  DiffuseTensor *x = ramp (4, x4, 1);
  DiffuseTensor *w = ramp (4, w4, 1);
  struct { const char *what; DiffuseTensor *r; } r[8];
  int n = 0;

  reset_criticals ();
  criticals_expected = TRUE;
  r[n].what = "add [2,3] + [4]", r[n++].r = diffuse_add (a, b);
  r[n].what = "linear x[2,3] w[3,5] (K mismatch)", r[n++].r = diffuse_linear (a, m, NULL);
  r[n].what = "matmul [2,3] @ [4,4]", r[n++].r = diffuse_matmul (a, sq, FALSE, FALSE, 1.0f);
  r[n].what = "conv2d Cin 3 vs weight Cin 4", r[n++].r = diffuse_conv2d (x, w, NULL, 1, 1, 1, 1);
  r[n].what = "group_norm 3 channels in 2 groups", r[n++].r = diffuse_group_norm (x, 2, NULL, NULL, 1e-5f,
                                                                                  DIFFUSE_ACT_NONE);
  r[n].what = "geglu odd last dim", r[n++].r = diffuse_geglu (a);
  int crit = 0;
  for (int i = 0; i < n; i++) {
    if (r[i].r) {
      g_test_fail_printf ("%s: returned a tensor instead of NULL", r[i].what);
      diffuse_tensor_unref (r[i].r);
    }
  }
  crit = n_criticals;
  criticals_expected = FALSE;
  g_test_message ("%d critical(s) for %d invalid calls", crit, n);
  if (crit < n)
    g_test_fail_printf ("expected a g_critical for each of the %d invalid calls, got %d", n, crit);
  /* nothing recorded as a runtime error */
  GError *err = NULL;
  if (diffuse_tensor_take_error (&err)) {
    g_test_message ("note: a thread error was also set: %s", err->message);
    g_clear_error (&err);
  }
  reset_criticals ();
  diffuse_tensor_unref (a);
  diffuse_tensor_unref (b);
  diffuse_tensor_unref (m);
  diffuse_tensor_unref (sq);
  diffuse_tensor_unref (x);
  diffuse_tensor_unref (w);
}

static void
test_views (void)
{
  const int64_t s[] = { 2, 3, 4 };
  DiffuseTensor *x = ramp (3, s, 1);
  float *px = diffuse_tensor_f32 (x);
  g_assert_true (diffuse_tensor_is_contiguous (x));
  g_assert_false (diffuse_tensor_is_borrowed (x));
  g_autofree char *desc = diffuse_tensor_describe (x);
  g_assert_cmpstr (desc, ==, "[2, 3, 4] float32 cpu");

  /* reshape of a contiguous tensor: a view, -1 inferred */
  const int64_t rs[] = { 4, -1 };
  DiffuseTensor *r = diffuse_reshape (x, 2, rs);
  g_assert_nonnull (r);
  g_assert_cmpint (r->ndim, ==, 2);
  g_assert_cmpint (r->shape[0], ==, 4);
  g_assert_cmpint (r->shape[1], ==, 6);
  g_assert_true (r->storage == x->storage);
  g_assert_true (diffuse_tensor_f32 (r) == px);

  /* narrow: a view at the right offset; writes through the base are seen */
  DiffuseTensor *nv = diffuse_narrow (x, 2, 1, 2);
  g_assert_nonnull (nv);
  g_assert_true (nv->storage == x->storage);
  g_assert_false (diffuse_tensor_is_contiguous (nv));
  g_assert_true (diffuse_tensor_f32 (nv) == px + 1);
  g_assert_cmpint (nv->stride[2], ==, 1);
  g_assert_cmpint (nv->stride[1], ==, 4);
  px[1 * 12 + 2 * 4 + 1 + 1] = 1234.5f;     /* x[1, 2, 2] == nv[1, 2, 1] */
  float *pn = diffuse_tensor_f32 (nv);
  g_assert_cmpfloat (pn[1 * nv->stride[0] + 2 * nv->stride[1] + 1], ==, 1234.5f);
  DiffuseTensor *nv0 = diffuse_narrow (x, 0, 1, 1);
  g_assert_true (diffuse_tensor_is_contiguous (nv0));
  g_assert_true (diffuse_tensor_f32 (nv0) == px + 12);

  /* reshape of a non-contiguous view fails cleanly: NULL, no crash, input intact */
  const int64_t flat[] = { -1 };
  reset_criticals ();
  criticals_expected = TRUE;
  DiffuseTensor *bad = diffuse_reshape (nv, 1, flat);
  g_assert_null (bad);
  GError *err = NULL;
  gboolean had_err = diffuse_tensor_take_error (&err);
  g_test_message ("reshape of a non-contiguous view: %d critical(s)%s%s", n_criticals, had_err ? ", error: " : "",
                  had_err ? err->message : "");
  g_assert_true (n_criticals > 0 || had_err);
  g_clear_error (&err);
  reset_criticals ();
  criticals_expected = TRUE;
  int perm[] = { 2, 0, 1 };
  DiffuseTensor *pv = diffuse_permute (x, perm);
  g_assert_true (pv->storage == x->storage);
  g_assert_cmpint (pv->shape[0], ==, 4);
  g_assert_cmpint (pv->stride[0], ==, 1);
  g_assert_cmpint (pv->stride[1], ==, 12);
  g_assert_null (diffuse_reshape_4d (pv, 1, 4, 2, 3));
  had_err = diffuse_tensor_take_error (&err);
  g_clear_error (&err);
  g_assert_true (n_criticals > 0 || had_err);
  criticals_expected = FALSE;
  reset_criticals ();

  /* contiguous / cast of a tensor that needs nothing: a ref to the same tensor */
  DiffuseTensor *same = diffuse_contiguous (x);
  g_assert_true (same == x);
  diffuse_tensor_unref (same);
  same = diffuse_cast (x, DIFFUSE_DTYPE_F32);
  g_assert_true (same == x);
  diffuse_tensor_unref (same);
  /* of a view: a new contiguous storage */
  DiffuseTensor *pc = diffuse_contiguous (pv);
  g_assert_true (pc->storage != x->storage);
  g_assert_true (diffuse_tensor_is_contiguous (pc));
  g_assert_cmpfloat (diffuse_tensor_f32 (pc)[1 * 6 + 0 * 3 + 2], ==, px[0 * 12 + 2 * 4 + 1]);
  DiffuseTensor *cp = diffuse_copy (x);
  g_assert_true (cp != x && cp->storage != x->storage);
  g_assert_cmpfloat (diffuse_tensor_max_abs_diff (cp, x), ==, 0.0);
  g_assert_cmpfloat (diffuse_tensor_max_abs (x), ==, 1234.5);
  diffuse_tensor_f32 (cp)[5] += 0.25f;
  g_assert_cmpfloat (diffuse_tensor_max_abs_diff (cp, x), ==, 0.25);

  /* chunk: views sharing storage */
  DiffuseTensor *ch[3] = { NULL, NULL, NULL };
  g_assert_true (diffuse_chunk (x, 2, 2, ch));
  g_assert_true (ch[0]->storage == x->storage && ch[1]->storage == x->storage);
  g_assert_true (diffuse_tensor_f32 (ch[1]) == px + 2);
  g_assert_cmpint (ch[1]->shape[2], ==, 2);
  diffuse_tensor_unref (ch[1]);
  g_assert_true (diffuse_chunk (x, 2, 0, ch + 1));
  g_assert_true (diffuse_tensor_is_contiguous (ch[2]));
  g_assert_true (diffuse_tensor_f32 (ch[1]) == px);
  g_assert_true (diffuse_tensor_f32 (ch[2]) == px + 12);
  diffuse_tensor_unref (ch[1]);
  diffuse_tensor_unref (ch[2]);

  /* copy_into a strided destination */
  const int64_t s2[] = { 4, 2, 3 };
  DiffuseTensor *dst = diffuse_tensor_zeros (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 3, s2);
  int perm2[] = { 1, 2, 0 };
  DiffuseTensor *dv = diffuse_permute (dst, perm2);     /* [2, 3, 4] view */
  g_assert_true (diffuse_copy_into (dv, x));
  g_assert_cmpfloat (diffuse_tensor_f32 (dst)[3 * 6 + 1 * 3 + 2], ==, px[1 * 12 + 2 * 4 + 3]);
  diffuse_tensor_unref (dv);
  g_assert_cmpfloat (diffuse_tensor_f32 (dst)[0], ==, 0.0f);
  diffuse_tensor_unref (dst);

  /* views outlive their base (valgrind checks the reads) */
  diffuse_tensor_unref (x);
  g_assert_cmpfloat (diffuse_tensor_f32 (nv0)[0], ==, 12.0f);
  g_assert_cmpfloat (diffuse_tensor_f32 (ch[0])[1], ==, 1.0f);
  g_assert_true (diffuse_tensor_ref (r) == r);
  diffuse_tensor_unref (r);
  diffuse_tensor_unref (r);
  diffuse_tensor_unref (nv);
  diffuse_tensor_unref (nv0);
  diffuse_tensor_unref (pv);
  diffuse_tensor_unref (pc);
  diffuse_tensor_unref (cp);
  diffuse_tensor_unref (ch[0]);
}

static int release_calls;

static void
release_buf (gpointer data)
{
  release_calls++;
  g_free (data);
}

static void
test_borrowed (void)
{
  DiffuseDevice *cpu = diffuse_device_cpu ();
  DiffuseMemStats s0, s1, s2;
  diffuse_device_get_mem_stats (cpu, &s0);
  const int64_t shape[] = { 4, 6 };
  float *buf = g_new (float, 24);
  for (int i = 0; i < 24; i++)
    buf[i] = (float) i - 5.0f;
  release_calls = 0;
  DiffuseTensor *t = diffuse_tensor_new_borrowed (cpu, DIFFUSE_DTYPE_F32, 2, shape, buf, release_buf, buf);
  g_assert_nonnull (t);
  g_assert_true (diffuse_tensor_is_borrowed (t));
  g_assert_true (diffuse_tensor_f32 (t) == buf);
  diffuse_device_get_mem_stats (cpu, &s1);
  g_assert_cmpuint (s1.borrowed_bytes, ==, s0.borrowed_bytes + 24 * sizeof (float));
  g_assert_cmpuint (s1.resident_bytes, ==, s0.resident_bytes);

  DiffuseTensor *n = diffuse_narrow (t, 0, 1, 2);
  DiffuseTensor *r = diffuse_reshape_4d (t, 2, 2, 3, 2);
  int perm[] = { 1, 0 };
  DiffuseTensor *p = diffuse_permute (t, perm);
  DiffuseTensor *ch[2];
  g_assert_true (diffuse_chunk (t, 2, 1, ch));
  g_assert_true (diffuse_tensor_is_borrowed (n) && diffuse_tensor_is_borrowed (ch[1]));
  /* an op on borrowed memory gives owned memory */
  DiffuseTensor *y = diffuse_scale (p, 2.0f, 0.0f);
  g_assert_nonnull (y);
  g_assert_false (diffuse_tensor_is_borrowed (y));
  g_assert_cmpfloat (diffuse_tensor_f32 (y)[1], ==, 2.0f * buf[6]);
  diffuse_tensor_unref (y);

  diffuse_tensor_unref (t);
  g_assert_cmpint (release_calls, ==, 0);
  diffuse_tensor_unref (n);
  diffuse_tensor_unref (r);
  diffuse_tensor_unref (ch[0]);
  diffuse_tensor_unref (p);
  g_assert_cmpint (release_calls, ==, 0);
  g_assert_cmpfloat (diffuse_tensor_f32 (ch[1])[0], ==, buf[3]);
  diffuse_tensor_unref (ch[1]);
  g_assert_cmpint (release_calls, ==, 1);
  diffuse_device_get_mem_stats (cpu, &s2);
  g_assert_cmpuint (s2.borrowed_bytes, ==, s0.borrowed_bytes);

  /* release NULL is allowed: memory that needs no release */
  static float fixed[6] = { 1, 2, 3, 4, 5, 6 };
  const int64_t s6[] = { 6 };
  t = diffuse_tensor_new_borrowed (cpu, DIFFUSE_DTYPE_F32, 1, s6, fixed, NULL, NULL);
  g_assert_nonnull (t);
  diffuse_tensor_unref (t);
  g_assert_cmpint (release_calls, ==, 1);
}

static void
test_mem_stats (void)
{
  DiffuseDevice *cpu = diffuse_device_cpu ();
  DiffuseMemStats s0, s1, s2, s3;
  const int64_t a_shape[] = { 256, 1024 };        /* 1 MiB of f32 */
  const int64_t b_shape[] = { 3, 256, 1024 };     /* 3 MiB of f16 * 2 = 1.5 MiB */

  diffuse_device_get_mem_stats (cpu, &s0);
  DiffuseTensor *a = diffuse_tensor_new (cpu, DIFFUSE_DTYPE_F32, 2, a_shape);
  diffuse_device_get_mem_stats (cpu, &s1);
  g_assert_cmpuint (s1.resident_bytes, >=, s0.resident_bytes + (1 << 20));
  g_assert_cmpuint (s1.resident_bytes, <=, s0.resident_bytes + (1 << 20) + 4096);
  g_assert_cmpuint (s1.n_allocs, ==, s0.n_allocs + 1);
  g_assert_cmpuint (s1.peak_bytes, >=, s1.resident_bytes);
  diffuse_tensor_unref (a);
  diffuse_device_get_mem_stats (cpu, &s2);
  g_assert_cmpuint (s2.resident_bytes, ==, s0.resident_bytes);
  g_assert_cmpuint (s2.peak_bytes, >=, s1.resident_bytes);

  /* peak: the high-water mark since the reset */
  diffuse_device_reset_peak (cpu);
  diffuse_device_get_mem_stats (cpu, &s2);
  g_assert_cmpuint (s2.peak_bytes, ==, s2.resident_bytes);
  a = diffuse_tensor_new (cpu, DIFFUSE_DTYPE_F32, 2, a_shape);
  DiffuseTensor *b = diffuse_tensor_zeros (cpu, DIFFUSE_DTYPE_F16, 3, b_shape);
  diffuse_tensor_unref (a);
  diffuse_tensor_unref (b);
  diffuse_device_get_mem_stats (cpu, &s3);
  g_assert_cmpuint (s3.resident_bytes, ==, s0.resident_bytes);
  g_assert_cmpuint (s3.peak_bytes, >=, s0.resident_bytes + (1 << 20) + 3 * (1 << 19));
  g_assert_cmpuint (s3.peak_bytes, <=, s0.resident_bytes + (1 << 20) + 3 * (1 << 19) + 8192);

  /* views allocate nothing */
  a = diffuse_tensor_new (cpu, DIFFUSE_DTYPE_F32, 2, a_shape);
  diffuse_device_get_mem_stats (cpu, &s1);
  DiffuseTensor *v = diffuse_narrow (a, 1, 3, 100);
  int perm[] = { 1, 0 };
  DiffuseTensor *pv = diffuse_permute (v, perm);
  diffuse_device_get_mem_stats (cpu, &s2);
  g_assert_cmpuint (s2.resident_bytes, ==, s1.resident_bytes);
  g_assert_cmpuint (s2.n_allocs, ==, s1.n_allocs);
  diffuse_tensor_unref (a);
  diffuse_device_get_mem_stats (cpu, &s2);
  g_assert_cmpuint (s2.resident_bytes, ==, s1.resident_bytes);  /* still held by the views */
  diffuse_tensor_unref (v);
  diffuse_tensor_unref (pv);
  diffuse_device_get_mem_stats (cpu, &s2);
  g_assert_cmpuint (s2.resident_bytes, ==, s0.resident_bytes);

  /* an op: whatever scratch it uses is gone after it returns (after a warm-up call) */
  const int64_t xs[] = { 1, 8, 16, 16 }, ws[] = { 8, 8, 3, 3 };
  DiffuseTensor *x = ramp (4, xs, 1e-3f);
  DiffuseTensor *w = ramp (4, ws, 1e-3f);
  DiffuseTensor *y = diffuse_conv2d (x, w, NULL, 1, 1, 1, 1);
  diffuse_tensor_unref (y);
  diffuse_device_get_mem_stats (cpu, &s1);
  diffuse_device_reset_peak (cpu);
  y = diffuse_conv2d (x, w, NULL, 1, 1, 1, 1);
  g_assert_nonnull (y);
  diffuse_device_get_mem_stats (cpu, &s2);
  g_assert_cmpuint (s2.resident_bytes, >=, s1.resident_bytes + diffuse_tensor_nbytes (y));
  g_assert_cmpuint (s2.peak_bytes, >=, s2.resident_bytes);
  size_t ybytes = diffuse_tensor_nbytes (y);
  diffuse_tensor_unref (y);
  diffuse_device_get_mem_stats (cpu, &s3);
  g_assert_cmpuint (s3.resident_bytes, ==, s1.resident_bytes);
  g_test_message ("conv2d [1,8,16,16]: peak above the inputs %" G_GUINT64_FORMAT " bytes (output %zu)",
                  s3.peak_bytes - s1.resident_bytes, ybytes);
  diffuse_tensor_unref (x);
  diffuse_tensor_unref (w);
}

static void
test_strings (void)
{
  struct { const char *s; DiffuseDType dt; } ok[] = {
    { "f32", DIFFUSE_DTYPE_F32 }, { "fp32", DIFFUSE_DTYPE_F32 }, { "float32", DIFFUSE_DTYPE_F32 },
    { "float", DIFFUSE_DTYPE_F32 }, { "torch.float32", DIFFUSE_DTYPE_F32 },
    { "f16", DIFFUSE_DTYPE_F16 }, { "fp16", DIFFUSE_DTYPE_F16 }, { "float16", DIFFUSE_DTYPE_F16 },
    { "half", DIFFUSE_DTYPE_F16 }, { "torch.float16", DIFFUSE_DTYPE_F16 },
    { "bf16", DIFFUSE_DTYPE_BF16 }, { "bfloat16", DIFFUSE_DTYPE_BF16 }, { "torch.bfloat16", DIFFUSE_DTYPE_BF16 },
  };
  for (guint i = 0; i < G_N_ELEMENTS (ok); i++) {
    DiffuseDType dt = DIFFUSE_DTYPE_N;
    g_assert_true (diffuse_dtype_from_string (ok[i].s, &dt));
    g_assert_cmpint (dt, ==, ok[i].dt);
  }
  DiffuseDType dt;
  g_assert_false (diffuse_dtype_from_string ("int8", &dt));
  g_assert_false (diffuse_dtype_from_string ("", &dt));
  g_assert_cmpstr (diffuse_dtype_name (DIFFUSE_DTYPE_F32), ==, "float32");
  g_assert_cmpstr (diffuse_dtype_name (DIFFUSE_DTYPE_F16), ==, "float16");
  g_assert_cmpstr (diffuse_dtype_name (DIFFUSE_DTYPE_BF16), ==, "bfloat16");
  g_assert_cmpuint (diffuse_dtype_size (DIFFUSE_DTYPE_F32), ==, 4);
  g_assert_cmpuint (diffuse_dtype_size (DIFFUSE_DTYPE_F16), ==, 2);
  g_assert_cmpuint (diffuse_dtype_size (DIFFUSE_DTYPE_BF16), ==, 2);

  struct { const char *s; DiffuseActivation a; } acts[] = {
    { "silu", DIFFUSE_ACT_SILU }, { "swish", DIFFUSE_ACT_SILU }, { "gelu", DIFFUSE_ACT_GELU },
    { "gelu_pytorch_tanh", DIFFUSE_ACT_GELU_TANH }, { "gelu_new", DIFFUSE_ACT_GELU_TANH },
    { "gelu-approximate", DIFFUSE_ACT_GELU_TANH }, { "quick_gelu", DIFFUSE_ACT_QUICK_GELU },
    { "relu", DIFFUSE_ACT_RELU }, { "sigmoid", DIFFUSE_ACT_SIGMOID },
  };
  for (guint i = 0; i < G_N_ELEMENTS (acts); i++) {
    DiffuseActivation a = DIFFUSE_ACT_NONE;
    g_assert_true (diffuse_activation_from_string (acts[i].s, &a));
    g_assert_cmpint (a, ==, acts[i].a);
  }
  DiffuseActivation a;
  g_assert_false (diffuse_activation_from_string ("mish", &a));

  g_assert_true (diffuse_device_is_cpu (diffuse_device_cpu ()));
  g_assert_cmpstr (diffuse_device_name (diffuse_device_cpu ()), ==, "cpu");
  g_autoptr (GError) err = NULL;
  g_assert_true (diffuse_device_get ("cpu", &err) == diffuse_device_cpu ());
  g_assert_no_error (err);

  /* to_device on the same device: same values */
  const int64_t s[] = { 3 };
  DiffuseTensor *x = ramp (1, s, 0.5f);
  DiffuseTensor *y = diffuse_to_device (x, diffuse_device_cpu ());
  g_assert_nonnull (y);
  g_assert_cmpfloat (diffuse_tensor_max_abs_diff (x, y), ==, 0.0);
  diffuse_tensor_unref (x);
  diffuse_tensor_unref (y);
}

/* ---- main ------------------------------------------------------------- */

int
main (int argc, char **argv)
{
  /* run every case even after a failure (as -k): the report lists all failing ops */
  char **args = g_new0 (char *, argc + 2);
  args[0] = argv[0];
  args[1] = (char *) "--keep-going";
  for (int i = 1; i < argc; i++)
    args[i + 1] = argv[i];
  int nargs = argc + 1;
  char **argp = args;
  g_test_init (&nargs, &argp, NULL);
  /* criticals/warnings are not fatal here: log_handler fails the test instead */
  g_log_set_always_fatal (G_LOG_FATAL_MASK);
  g_log_set_fatal_mask ("diffuse", G_LOG_FATAL_MASK);
  g_log_set_default_handler (log_handler, NULL);
  diffuse_cpu_set_threads (2);

  g_test_add_func ("/ops/conventions/null-propagation", test_null_propagation);
  g_test_add_func ("/ops/conventions/take-error", test_take_error);
  g_test_add_func ("/ops/conventions/alloc-failure", test_alloc_failure);
  g_test_add_func ("/ops/conventions/programmer-errors", test_programmer_errors);
  g_test_add_func ("/ops/conventions/views", test_views);
  g_test_add_func ("/ops/conventions/borrowed", test_borrowed);
  g_test_add_func ("/ops/conventions/mem-stats", test_mem_stats);
  g_test_add_func ("/ops/conventions/strings", test_strings);

  g_autoptr (JsonParser) parser = json_parser_new ();
  g_autofree char *json_path = tu_fixture ("ops/cases.json");
  g_autofree char *st_path = tu_fixture ("ops/ops.safetensors");
  if (g_file_test (json_path, G_FILE_TEST_EXISTS) && g_file_test (st_path, G_FILE_TEST_EXISTS)) {
    g_autoptr (GError) err = NULL;
    if (!json_parser_load_from_file (parser, json_path, &err))
      g_error ("%s: %s", json_path, err->message);
    st = diffuse_safetensors_open (st_path, &err);
    if (!st)
      g_error ("%s: %s", st_path, err->message);
    JsonArray *cases = json_object_get_array_member (json_node_get_object (json_parser_get_root (parser)), "cases");
    for (guint i = 0; i < json_array_get_length (cases); i++) {
      JsonObject *c = json_array_get_object_element (cases, i);
      g_autofree char *path = g_strdup_printf ("/ops/%s/%s", json_object_get_string_member (c, "op"),
                                               json_object_get_string_member (c, "name"));
      g_test_add_data_func (path, c, run_case);
    }
  } else {
    g_printerr ("fixtures ops/cases.json / ops/ops.safetensors missing: only the convention tests run\n");
  }

  int ret = g_test_run ();
  g_clear_pointer (&st, diffuse_safetensors_unref);
  g_clear_pointer (&last_critical, g_free);
  g_free (args);
  return ret;
}
