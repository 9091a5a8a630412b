/* gst-diffuse — diffusers' StableDiffusionSafetyChecker (safety_checker.h).
 *
 *   pooled = CLIPVisionModel (pixel_values).pooler_output
 *   image_embeds = visual_projection (pooled)
 *   cos_dist[b, c] = normalize (image_embeds[b]) . normalize (concept_embeds[c])
 *   special_cos_dist likewise with special_care_embeds
 *   per image: adjustment = 0
 *     for each special concept s: score = round (special_cos_dist[s] - special_care_embeds_weights[s] + adjustment, 3)
 *                                 score > 0: adjustment = 0.01
 *     for each concept c: round (cos_dist[c] - concept_embeds_weights[c] + adjustment, 3) > 0: has_nsfw_concept
 */
#include <diffuse/safety_checker.h>
#include <diffuse/error.h>
#include "clip_private.h"
#include <math.h>
#include <string.h>

struct _DiffuseSafetyChecker {
  gint ref_count;
  DiffuseDevice *dev;
  DiffuseDType dtype;
  int proj_dim, n_concepts, n_special;
  DiffuseClipVision *vision;
  DiffuseTensor *proj_w;          /* [proj_dim, hidden], model dtype/device */
  float *concepts, *special;      /* normalized rows, f32 (from the stored dtype) */
  double *concept_t, *special_t;  /* thresholds, as .item () gives them */
};

static void
checker_free (DiffuseSafetyChecker *sc)
{
  _diffuse_clip_vision_free (sc->vision);
  diffuse_tensor_clear (&sc->proj_w);
  g_free (sc->concepts);
  g_free (sc->special);
  g_free (sc->concept_t);
  g_free (sc->special_t);
  g_free (sc);
}

/* a loaded tensor as host f32 values (its stored dtype's rounding kept) */
static float *
host_values (DiffuseTensor *t)
{
  if (!t)
    return NULL;
  DiffuseTensor *c = diffuse_to_host_f32 (t);
  float *v = c ? g_memdup2 (diffuse_tensor_f32 (c), sizeof (float) * (size_t) diffuse_tensor_numel (c)) : NULL;
  diffuse_tensor_clear (&c);
  return v;
}

/* torch.nn.functional.normalize: x / max (||x||, 1e-12), each row */
static void
normalize_rows (float *x, int rows, int dim)
{
  for (int r = 0; r < rows; r++) {
    float *v = x + (size_t) r * dim;
    double ss = 0.0;
    for (int i = 0; i < dim; i++)
      ss += (double) v[i] * v[i];
    float n = (float) sqrt (ss);
    if (n < 1e-12f)
      n = 1e-12f;
    for (int i = 0; i < dim; i++)
      v[i] /= n;
  }
}

DiffuseSafetyChecker *
diffuse_safety_checker_new (DiffuseConfig *config, DiffuseWeights *weights, DiffuseDevice *dev, DiffuseDType dtype,
                            GError **error)
{
  g_return_val_if_fail (config != NULL && weights != NULL && dev != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);
  GError *local = NULL;
  if (!error)
    error = &local;
  const char *label = diffuse_config_label (config);
  JsonNode *vn = diffuse_config_get_node (config, "vision_config");
  if (!vn || !JSON_NODE_HOLDS_OBJECT (vn)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "%s: the safety checker's config has no vision_config",
                 label);
    g_clear_error (&local);
    return NULL;
  }
  DiffuseConfig *vcfg = diffuse_config_from_object (json_node_get_object (vn), label);
  DiffuseSafetyChecker *sc = g_new0 (DiffuseSafetyChecker, 1);
  sc->ref_count = 1;
  sc->dev = dev;
  sc->dtype = dtype;
  sc->proj_dim = (int) diffuse_config_get_int (config, "projection_dim", 768);
  char *component = g_strdup_printf ("StableDiffusionSafetyChecker (%s)", label);
  /* checkpoints carry transformers 4's names; transformers 5 writes one "vision_model." less */
  const char *prefix = diffuse_weights_has (weights, "vision_model.vision_model.embeddings.class_embedding")
                       ? "vision_model.vision_model." : "vision_model.";
  DiffuseClipLoader ld;
  _diffuse_clip_loader_init (&ld, weights, dev, dtype, prefix, component, error);
  DiffuseTensor *ce = NULL, *se = NULL, *cw = NULL, *sw = NULL;
  if (sc->proj_dim <= 0) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "%s: projection_dim %d", component, sc->proj_dim);
    goto done;
  }
  sc->vision = _diffuse_clip_vision_new (vcfg, &ld, error);
  if (!sc->vision)
    goto done;
  const int64_t P = sc->proj_dim, D = _diffuse_clip_vision_hidden_size (sc->vision);
  sc->proj_w = _diffuse_clip_load (&ld, "", "visual_projection.weight", 2, (int64_t[]) { P, D });
  /* 17 and 3 in every released checker; taken from the file */
  const DiffuseStEntry *e = diffuse_weights_has (weights, "concept_embeds")
                            ? diffuse_weights_entry (weights, "concept_embeds") : NULL;
  const DiffuseStEntry *s = diffuse_weights_has (weights, "special_care_embeds")
                            ? diffuse_weights_entry (weights, "special_care_embeds") : NULL;
  sc->n_concepts = e && e->ndim == 2 ? (int) e->shape[0] : 17;
  sc->n_special = s && s->ndim == 2 ? (int) s->shape[0] : 3;
  ce = _diffuse_clip_load (&ld, "", "concept_embeds", 2, (int64_t[]) { sc->n_concepts, P });
  se = _diffuse_clip_load (&ld, "", "special_care_embeds", 2, (int64_t[]) { sc->n_special, P });
  cw = _diffuse_clip_load (&ld, "", "concept_embeds_weights", 1, (int64_t[]) { sc->n_concepts });
  sw = _diffuse_clip_load (&ld, "", "special_care_embeds_weights", 1, (int64_t[]) { sc->n_special });
  if (*error)
    goto done;
  _diffuse_clip_warn_unused (&ld);
  sc->concepts = host_values (ce);
  sc->special = host_values (se);
  float *ct = host_values (cw), *st = host_values (sw);
  if (!sc->concepts || !sc->special || !ct || !st) {
    if (!diffuse_tensor_take_error (error))
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "%s: reading the concept embeddings failed",
                   component);
  } else {
    normalize_rows (sc->concepts, sc->n_concepts, sc->proj_dim);
    normalize_rows (sc->special, sc->n_special, sc->proj_dim);
    sc->concept_t = g_new (double, sc->n_concepts);
    sc->special_t = g_new (double, sc->n_special);
    for (int i = 0; i < sc->n_concepts; i++)
      sc->concept_t[i] = ct[i];
    for (int i = 0; i < sc->n_special; i++)
      sc->special_t[i] = st[i];
  }
  g_free (ct);
  g_free (st);

done:
  diffuse_tensor_clear (&ce);
  diffuse_tensor_clear (&se);
  diffuse_tensor_clear (&cw);
  diffuse_tensor_clear (&sw);
  _diffuse_clip_loader_clear (&ld);
  g_free (component);
  diffuse_config_unref (vcfg);
  if (*error) {
    checker_free (sc);
    g_clear_error (&local);
    return NULL;
  }
  return sc;
}

DiffuseSafetyChecker *
diffuse_safety_checker_ref (DiffuseSafetyChecker *sc)
{
  g_atomic_int_inc (&sc->ref_count);
  return sc;
}

void
diffuse_safety_checker_unref (DiffuseSafetyChecker *sc)
{
  if (sc && g_atomic_int_dec_and_test (&sc->ref_count))
    checker_free (sc);
}

int
diffuse_safety_checker_image_size (DiffuseSafetyChecker *sc)
{
  return _diffuse_clip_vision_image_size (sc->vision);
}

void
diffuse_safety_scores_clear (DiffuseSafetyScores *s)
{
  diffuse_tensor_clear (&s->pooled);
  diffuse_tensor_clear (&s->image_embeds);
  diffuse_tensor_clear (&s->special_cos_dist);
  diffuse_tensor_clear (&s->cos_dist);
}

/* round (x, 3) > 0 as numpy does it: rint (x * 1000) > 0 */
static gboolean
score_positive (double x)
{
  return nearbyint (x * 1000.0) > 0.0;
}

gboolean
diffuse_safety_checker_check (DiffuseSafetyChecker *sc, DiffuseTensor *pixel_values, gboolean *nsfw,
                              DiffuseSafetyScores *scores, GError **error)
{
  g_return_val_if_fail (sc != NULL && pixel_values != NULL && nsfw != NULL, FALSE);
  if (scores)
    memset (scores, 0, sizeof *scores);
  DiffuseTensor *pooled = _diffuse_clip_vision_pooled (sc->vision, pixel_values, error);
  if (!pooled)
    return FALSE;
  DiffuseTensor *emb = diffuse_linear (pooled, sc->proj_w, NULL);
  float *e = host_values (emb);
  if (!e) {
    diffuse_tensor_unref (pooled);
    diffuse_tensor_clear (&emb);
    if (!diffuse_tensor_take_error (error))
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "safety checker: visual projection failed");
    return FALSE;
  }
  const int B = (int) pixel_values->shape[0], P = sc->proj_dim;
  float *cd = g_new (float, (size_t) B * sc->n_concepts), *sd = g_new (float, (size_t) B * sc->n_special);
  float *ne = g_memdup2 (e, sizeof (float) * (size_t) B * P);
  normalize_rows (ne, B, P);
  for (int b = 0; b < B; b++) {
    const float *x = ne + (size_t) b * P;
    for (int c = 0; c < sc->n_concepts + sc->n_special; c++) {
      const gboolean special = c >= sc->n_concepts;
      const float *y = special ? sc->special + (size_t) (c - sc->n_concepts) * P : sc->concepts + (size_t) c * P;
      float dot = 0.0f;
      for (int i = 0; i < P; i++)
        dot += x[i] * y[i];
      if (special)
        sd[(size_t) b * sc->n_special + c - sc->n_concepts] = dot;
      else
        cd[(size_t) b * sc->n_concepts + c] = dot;
    }
    double adjustment = 0.0;
    for (int s = 0; s < sc->n_special; s++)
      if (score_positive ((double) sd[(size_t) b * sc->n_special + s] - sc->special_t[s] + adjustment))
        adjustment = 0.01;
    nsfw[b] = FALSE;
    for (int c = 0; c < sc->n_concepts; c++)
      if (score_positive ((double) cd[(size_t) b * sc->n_concepts + c] - sc->concept_t[c] + adjustment))
        nsfw[b] = TRUE;
  }
  if (scores) {
    float *pv = host_values (pooled);
    const int D = _diffuse_clip_vision_hidden_size (sc->vision);
    if (pv)
      scores->pooled = diffuse_tensor_from_f32 (pv, 2, (const int64_t[]) { B, D });
    scores->image_embeds = diffuse_tensor_from_f32 (e, 2, (const int64_t[]) { B, P });
    scores->cos_dist = diffuse_tensor_from_f32 (cd, 2, (const int64_t[]) { B, sc->n_concepts });
    scores->special_cos_dist = diffuse_tensor_from_f32 (sd, 2, (const int64_t[]) { B, sc->n_special });
    g_free (pv);
  }
  g_free (ne);
  g_free (e);
  g_free (cd);
  g_free (sd);
  diffuse_tensor_unref (pooled);
  diffuse_tensor_unref (emb);
  return TRUE;
}
