/* gst-diffuse — IP-Adapter (diffusers' pipe.load_ip_adapter with the
 * original IP-Adapter's ImageProjection: h94/IP-Adapter ip-adapter_sd15).
 *
 * The image is prepared by the pipeline's feature extractor (or
 * CLIPImageProcessor (size = crop = the encoder's image_size) when it has
 * none), encoded by a CLIPVisionModelWithProjection (<subfolder>/image_encoder),
 * its image_embeds [1, E] (zeros for the unconditional half under CFG)
 * projected to T tokens: LayerNorm (reshape (proj (embeds), [B, T, D])).
 * Every cross-attention layer then adds scale * attention (q, to_k_ip
 * (tokens), to_v_ip (tokens)) to its text attention (blocks.h DiffuseBlkIp).
 * The weight file holds "image_proj.proj.weight/bias", "image_proj.norm.*"
 * and "ip_adapter.<1, 3, 5, ...>.to_k_ip.weight / to_v_ip.weight", one pair
 * per cross-attention layer in diffusers' attn_processors order. */
#include "pipelines-private.h"
#include "models/clip_private.h"
#include <diffuse/error.h>
#include <diffuse/hub.h>
#include <string.h>

struct _DiffuseIpAdapter {
  DiffuseDevice *dev;
  DiffuseDType dtype;
  DiffuseClipVision *vision;
  DiffuseTensor *vis_proj;                  /* [E, hidden] */
  DiffuseClipImageProcessor *processor;     /* the pipeline's feature extractor (borrowed), or own_processor */
  DiffuseClipImageProcessor *own_processor; /* when the pipeline has no feature extractor */
  DiffuseTensor *proj_w, *proj_b, *norm_w, *norm_b;
  int n_tokens, cross_dim, n_layers;
  DiffuseTensor **k, **v;
  float scale;
};

void
_diffuse_ip_adapter_free (DiffuseIpAdapter *ip)
{
  if (!ip)
    return;
  _diffuse_clip_vision_free (ip->vision);
  DiffuseTensor **all[] = { &ip->vis_proj, &ip->proj_w, &ip->proj_b, &ip->norm_w, &ip->norm_b };
  for (guint i = 0; i < G_N_ELEMENTS (all); i++)
    diffuse_tensor_clear (all[i]);
  for (int i = 0; i < ip->n_layers; i++) {
    diffuse_tensor_clear (&ip->k[i]);
    diffuse_tensor_clear (&ip->v[i]);
  }
  g_free (ip->k);
  g_free (ip->v);
  g_clear_pointer (&ip->own_processor, diffuse_clip_image_processor_free);
  g_free (ip);
}

/* local folder <ref>/<subfolder>/<name>, or the file from the Hub repo ref */
static char *
ip_file (const char *ref, const char *subfolder, const char *name, DiffuseHubClient **client, GError **error)
{
  char *rel = subfolder && *subfolder ? g_build_filename (subfolder, name, NULL) : g_strdup (name);
  char *path = NULL;
  if (g_file_test (ref, G_FILE_TEST_IS_DIR)) {
    path = g_build_filename (ref, rel, NULL);
    if (!g_file_test (path, G_FILE_TEST_IS_REGULAR)) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND, "IP-Adapter: %s is missing", path);
      g_clear_pointer (&path, g_free);
    }
  } else if (diffuse_is_repo_id (ref)) {
    if (!*client)
      *client = diffuse_hub_client_new (NULL, error);
    if (*client)
      path = diffuse_hub_download_file (*client, ref, NULL, rel, error);
  } else {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND,
                 "IP-Adapter %s: no such folder (a local folder or a Hub repo id such as h94/IP-Adapter)", ref);
  }
  g_free (rel);
  return path;
}

static DiffuseTensor *
st_get (DiffuseSafetensors *st, const char *key, int ndim, const int64_t *shape, DiffuseDType dt, DiffuseDevice *dev,
        const char *file, GError **error)
{
  if (*error)
    return NULL;
  const DiffuseStEntry *e = diffuse_safetensors_find (st, key);
  gboolean fits = e && e->ndim == ndim;
  for (int i = 0; fits && i < ndim; i++)
    fits = shape[i] < 0 || e->shape[i] == shape[i];
  if (!fits) {
    g_set_error (error, DIFFUSE_ERROR, e ? DIFFUSE_ERROR_CONFIG : DIFFUSE_ERROR_NOT_FOUND,
                 "IP-Adapter %s: tensor '%s' is %s", file, key, e ? "of another shape" : "missing");
    return NULL;
  }
  return diffuse_safetensors_tensor (st, key, dt, dev, error);
}

DiffuseIpAdapter *
_diffuse_ip_adapter_load (DiffusePipelineModel *pm, const char *ref, const char *subfolder, const char *weight_name,
                          DiffuseDevice *dev, DiffuseDType dtype, GError **error)
{
  GError *local = NULL;
  if (!error)
    error = &local;
  /* the pipeline's own feature extractor when it has one (diffusers uses it) */
  DiffuseClipImageProcessor *pipeline_processor = NULL;
  if (diffuse_pipeline_model_get (pm, "feature_extractor")) {
    pipeline_processor = _diffuse_pipeline_feature_extractor (pm, error);
    if (!pipeline_processor) {
      if (error == &local)
        g_clear_error (&local);
      return NULL;
    }
  }
  DiffuseHubClient *client = NULL;
  DiffuseIpAdapter *ip = g_new0 (DiffuseIpAdapter, 1);
  ip->dev = dev;
  ip->dtype = dtype;
  ip->scale = 1.0f;
  char *wfile = ip_file (ref, subfolder, weight_name, &client, error);
  char *ecfg = wfile ? ip_file (ref, subfolder, "image_encoder/config.json", &client, error) : NULL;
  char *ewts = NULL;
  if (ecfg) {
    /* transformers' from_pretrained: model.safetensors, else pytorch_model.bin
     * (read without executing it, as torch.load(weights_only=True)) */
    GError *e1 = NULL;
    ewts = ip_file (ref, subfolder, "image_encoder/model.safetensors", &client, &e1);
    if (!ewts && e1 && (e1->code == DIFFUSE_ERROR_NOT_FOUND || e1->code == DIFFUSE_ERROR_ENTRY_NOT_FOUND))
      ewts = ip_file (ref, subfolder, "image_encoder/pytorch_model.bin", &client, NULL);
    if (ewts)
      g_clear_error (&e1);
    else
      g_propagate_error (error, e1);
  }
  DiffuseSafetensors *st = ewts ? diffuse_safetensors_open (wfile, error) : NULL;
  DiffuseConfig *cfg = NULL;
  DiffuseWeights *w = NULL;
  char *component = NULL;
  if (!st)
    goto done;
  if (diffuse_safetensors_find (st, "image_proj.latents") || diffuse_safetensors_find (st, "image_proj.proj.3.weight") ||
      !diffuse_safetensors_find (st, "image_proj.proj.weight")) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                 "IP-Adapter %s: only the original IP-Adapter's image projection (image_proj.proj + norm) is read "
                 "yet, not Plus / Full Face / FaceID", wfile);
    goto done;
  }
  const DiffuseStEntry *ne = diffuse_safetensors_find (st, "image_proj.norm.weight");
  const DiffuseStEntry *pe = diffuse_safetensors_find (st, "image_proj.proj.weight");
  if (!ne || ne->ndim != 1 || pe->ndim != 2 || pe->shape[0] % ne->shape[0] != 0) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT, "IP-Adapter %s: image_proj.norm / proj do not fit", wfile);
    goto done;
  }
  ip->cross_dim = (int) ne->shape[0];
  ip->n_tokens = (int) (pe->shape[0] / ne->shape[0]);
  const int64_t E = pe->shape[1], TD = pe->shape[0], D = ip->cross_dim;
  ip->proj_w = st_get (st, "image_proj.proj.weight", 2, (int64_t[]) { TD, E }, dtype, dev, wfile, error);
  ip->proj_b = st_get (st, "image_proj.proj.bias", 1, (int64_t[]) { TD }, dtype, dev, wfile, error);
  ip->norm_w = st_get (st, "image_proj.norm.weight", 1, (int64_t[]) { D }, dtype, dev, wfile, error);
  ip->norm_b = st_get (st, "image_proj.norm.bias", 1, (int64_t[]) { D }, dtype, dev, wfile, error);
  /* the layers: ip_adapter.1, .3, .5, ... */
  for (int id = 1;; id += 2) {
    char *kk = g_strdup_printf ("ip_adapter.%d.to_k_ip.weight", id);
    gboolean has = diffuse_safetensors_find (st, kk) != NULL;
    g_free (kk);
    if (!has)
      break;
    ip->n_layers++;
  }
  ip->k = g_new0 (DiffuseTensor *, MAX (ip->n_layers, 1));
  ip->v = g_new0 (DiffuseTensor *, MAX (ip->n_layers, 1));
  for (int l = 0; l < ip->n_layers && !*error; l++) {
    char *kk = g_strdup_printf ("ip_adapter.%d.to_k_ip.weight", 2 * l + 1);
    char *vk = g_strdup_printf ("ip_adapter.%d.to_v_ip.weight", 2 * l + 1);
    ip->k[l] = st_get (st, kk, 2, (int64_t[]) { -1, D }, dtype, dev, wfile, error);
    ip->v[l] = st_get (st, vk, 2, (int64_t[]) { -1, D }, dtype, dev, wfile, error);
    g_free (kk);
    g_free (vk);
  }
  if (*error)
    goto done;
  if (ip->n_layers == 0) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT, "IP-Adapter %s: no ip_adapter.*.to_k_ip.weight", wfile);
    goto done;
  }
  /* the image encoder: CLIPVisionModelWithProjection */
  cfg = diffuse_config_load (ecfg, error);
  if (!cfg)
    goto done;
  w = diffuse_weights_open ((const char *const[]) { ewts, NULL }, error);
  if (!w)
    goto done;
  DiffuseConfig *vcfg = diffuse_config_ref (cfg);
  JsonNode *vn = diffuse_config_get_node (cfg, "vision_config");
  if (vn && JSON_NODE_HOLDS_OBJECT (vn)) {   /* a full CLIPConfig */
    diffuse_config_unref (vcfg);
    vcfg = diffuse_config_from_object (json_node_get_object (vn), ecfg);
  }
  component = g_strdup_printf ("CLIPVisionModelWithProjection (%s)", ecfg);
  DiffuseClipLoader ld;
  _diffuse_clip_loader_init (&ld, w, dev, dtype, "vision_model.", component, error);
  ip->vision = _diffuse_clip_vision_new (vcfg, &ld, error);
  if (ip->vision)
    ip->vis_proj = _diffuse_clip_load (&ld, "", "visual_projection.weight", 2,
                                       (int64_t[]) { E, _diffuse_clip_vision_hidden_size (ip->vision) });
  if (!*error)
    _diffuse_clip_warn_unused (&ld);
  _diffuse_clip_loader_clear (&ld);
  diffuse_config_unref (vcfg);
  if (*error)
    goto done;
  if (!pipeline_processor) {
    /* diffusers: CLIPImageProcessor (size=image_size, crop_size=image_size) */
    const int s = _diffuse_clip_vision_image_size (ip->vision);
    char *js = g_strdup_printf ("{\"size\": %d, \"crop_size\": %d}", s, s);
    DiffuseConfig *pc = diffuse_config_from_string (js, "CLIPImageProcessor (IP-Adapter default)", error);
    g_free (js);
    ip->own_processor = pc ? diffuse_clip_image_processor_new (pc, error) : NULL;
    g_clear_pointer (&pc, diffuse_config_unref);
  }
  ip->processor = pipeline_processor ? pipeline_processor : ip->own_processor;

done:
  if (st)
    diffuse_safetensors_unref (st);
  g_clear_pointer (&cfg, diffuse_config_unref);
  g_clear_pointer (&w, diffuse_weights_unref);
  g_clear_pointer (&client, diffuse_hub_client_free);
  g_free (component);
  g_free (wfile);
  g_free (ecfg);
  g_free (ewts);
  if (*error) {
    _diffuse_ip_adapter_free (ip);
    g_clear_error (&local);
    return NULL;
  }
  return ip;
}

void
_diffuse_ip_adapter_set_scale (DiffuseIpAdapter *ip, float scale)
{
  ip->scale = scale;
}

void
_diffuse_ip_adapter_args (DiffuseIpAdapter *ip, DiffuseTensor *tokens, DiffuseUNetForwardArgs *args)
{
  args->ip_tokens = tokens;
  args->ip_k = ip->k;
  args->ip_v = ip->v;
  args->n_ip_layers = ip->n_layers;
  args->ip_scale = ip->scale;
}

DiffuseTensor *
_diffuse_ip_adapter_tokens (DiffuseIpAdapter *ip, const DiffuseImage *image, int n, gboolean cfg, GError **error)
{
  DiffuseClipImageProcessor *proc = ip->processor;
  guint8 *rgb = g_new (guint8, (size_t) image->width * image->height * 3);
  diffuse_image_to_rgb8 (image, rgb, image->width * 3);
  const guint8 *one[1] = { rgb };
  DiffuseTensor *pv = diffuse_clip_image_processor_preprocess (proc, one, &image->width, &image->height, NULL, 1,
                                                               error);
  g_free (rgb);
  DiffuseTensor *pooled = pv ? _diffuse_clip_vision_pooled (ip->vision, pv, error) : NULL;
  diffuse_tensor_clear (&pv);
  DiffuseTensor *emb = pooled ? diffuse_linear (pooled, ip->vis_proj, NULL) : NULL;
  diffuse_tensor_clear (&pooled);
  /* [uncond (zeros) x n; cond x n] as diffusers' prepare_ip_adapter_image_embeds */
  DiffuseTensor *tokens = NULL;
  if (emb) {
    DiffuseTensor *zero = diffuse_scale (emb, 0.0f, 0.0f);
    const int B = cfg ? 2 * n : n;
    DiffuseTensor **rows = g_new (DiffuseTensor *, B);
    for (int i = 0; i < B; i++)
      rows[i] = cfg && i < n ? zero : emb;
    DiffuseTensor *batch = zero ? diffuse_concat (rows, B, 0) : NULL;
    g_free (rows);
    diffuse_tensor_clear (&zero);
    DiffuseTensor *h = batch ? diffuse_linear (batch, ip->proj_w, ip->proj_b) : NULL;
    diffuse_tensor_clear (&batch);
    DiffuseTensor *h3 = h ? diffuse_reshape (h, 3, (const int64_t[]) { B, ip->n_tokens, ip->cross_dim }) : NULL;
    diffuse_tensor_clear (&h);
    tokens = h3 ? diffuse_layer_norm (h3, ip->norm_w, ip->norm_b, 1e-5f) : NULL;
    diffuse_tensor_clear (&h3);
  }
  diffuse_tensor_clear (&emb);
  if (!tokens && error && !*error && !diffuse_tensor_take_error (error))
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "IP-Adapter: encoding the image failed");
  return tokens;
}
