/* gst-diffuse — diffusers' StableDiffusionSafetyChecker and the
 * CLIPImageProcessor ("feature_extractor") that prepares its input.
 *
 * The checker: a CLIP vision model's pooled output, projected
 * (visual_projection), compared by cosine with 17 concept and 3
 * "special care" embeddings against per-concept thresholds, all stored in
 * the checker's weights (diffusers' safety_checker.py).  An image is flagged
 * (has_nsfw_concept) when a concept's score, rounded to 3 decimals, is
 * above 0; a special-care hit lowers every later threshold by 0.01.  The
 * pipelines black out flagged images, as diffusers does. */
#pragma once

#include <diffuse/tensor.h>
#include <diffuse/safetensors.h>
#include <diffuse/config.h>

G_BEGIN_DECLS

/* ---- the feature extractor (transformers' CLIPImageProcessor) ---------- */

typedef struct _DiffuseClipImageProcessor DiffuseClipImageProcessor;

/* From preprocessor_config.json: do_resize, size ({"shortest_edge": n},
 * {"height", "width"} or a number), resample (3 = bicubic; 2 = bilinear),
 * do_center_crop, crop_size ({"height", "width"} or a number), do_rescale,
 * rescale_factor, do_normalize, image_mean, image_std.  Errors:
 * DIFFUSE_ERROR_CONFIG (a value out of range or of the wrong type),
 * DIFFUSE_ERROR_UNSUPPORTED (another resample filter). */
DiffuseClipImageProcessor *diffuse_clip_image_processor_new (DiffuseConfig *config, GError **error);
void diffuse_clip_image_processor_free (DiffuseClipImageProcessor *p);
/* Output size of preprocess (crop size, or the resize size without a crop). */
void diffuse_clip_image_processor_output_size (DiffuseClipImageProcessor *p, int in_width, int in_height,
                                               int *out_width, int *out_height);
/* n 8-bit RGB images (rows of width * 3 bytes, stride bytes apart) as
 * transformers' processor makes pixel_values of them: resized (torch's
 * antialiased uint8 bicubic, which its torchvision backend uses), center
 * cropped (zero-padded when smaller), rescaled and normalized.  Returns f32
 * [n, 3, H, W] on the CPU; images of different sizes must give the same
 * output size (DIFFUSE_ERROR_INVALID_ARGUMENT otherwise). */
DiffuseTensor *diffuse_clip_image_processor_preprocess (DiffuseClipImageProcessor *p, const guint8 *const *rgb,
                                                        const int *width, const int *height, const int *stride,
                                                        int n, GError **error);

/* ---- the checker --------------------------------------------------------- */

typedef struct _DiffuseSafetyChecker DiffuseSafetyChecker;

/* config: the checker's CLIPConfig (its "vision_config" and
 * "projection_dim"); weights with "vision_model.vision_model.*" (as
 * checkpoints ship them) or "vision_model.*" (transformers 5) names,
 * "visual_projection.weight", "concept_embeds", "special_care_embeds",
 * "concept_embeds_weights", "special_care_embeds_weights".  Errors as the
 * other models' (DIFFUSE_ERROR_CONFIG, DIFFUSE_ERROR_NOT_FOUND naming the
 * tensor). */
DiffuseSafetyChecker *diffuse_safety_checker_new (DiffuseConfig *config, DiffuseWeights *weights, DiffuseDevice *dev,
                                                  DiffuseDType dtype, GError **error);
DiffuseSafetyChecker *diffuse_safety_checker_ref (DiffuseSafetyChecker *sc);
void diffuse_safety_checker_unref (DiffuseSafetyChecker *sc);
G_DEFINE_AUTOPTR_CLEANUP_FUNC (DiffuseSafetyChecker, diffuse_safety_checker_unref)

/* The vision model's input size (image_size). */
int diffuse_safety_checker_image_size (DiffuseSafetyChecker *sc);

/* What the decision was made of, per image (f32 on the CPU). */
typedef struct {
  DiffuseTensor *pooled;            /* [B, hidden] */
  DiffuseTensor *image_embeds;      /* [B, projection_dim] */
  DiffuseTensor *special_cos_dist;  /* [B, n_special] */
  DiffuseTensor *cos_dist;          /* [B, n_concepts] */
} DiffuseSafetyScores;

void diffuse_safety_scores_clear (DiffuseSafetyScores *s);

/* pixel_values [B, 3, S, S] (the feature extractor's output, any dtype and
 * device: cast to the checker's); nsfw[B] receives has_nsfw_concept;
 * scores NULL or filled (clear with diffuse_safety_scores_clear). */
gboolean diffuse_safety_checker_check (DiffuseSafetyChecker *sc, DiffuseTensor *pixel_values, gboolean *nsfw,
                                       DiffuseSafetyScores *scores, GError **error);

G_END_DECLS
