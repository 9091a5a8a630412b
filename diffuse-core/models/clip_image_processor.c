/* gst-diffuse — transformers' CLIPImageProcessor (safety_checker.h).
 *
 * transformers 5 runs it on its torchvision backend: the 8-bit image is
 * resized by torch's antialiased uint8 kernel (Pillow-SIMD's fixed-point
 * resampling: separable, horizontal pass first, int16 weights whose
 * precision follows the largest weight, 8-bit rounding between the
 * passes), center cropped (zero-padded where the crop is larger), then
 * rescaled and normalized in f32 as (x - mean / rescale_factor) /
 * (std / rescale_factor). */
#include <diffuse/safety_checker.h>
#include <diffuse/error.h>
#include <math.h>
#include <string.h>

typedef enum { SIZE_NONE, SIZE_SHORTEST_EDGE, SIZE_HW } SizeKind;

struct _DiffuseClipImageProcessor {
  gboolean do_resize, do_center_crop, do_rescale, do_normalize;
  SizeKind size_kind;
  int size_short, size_h, size_w;
  int crop_h, crop_w;
  int resample;                /* 2 bilinear, 3 bicubic */
  double rescale_factor;
  float mean[3], std[3];
};

static const double clip_mean[3] = { 0.48145466, 0.4578275, 0.40821073 };
static const double clip_std[3] = { 0.26862954, 0.26130258, 0.27577711 };

static gboolean
config_error (GError **error, DiffuseConfig *c, const char *key, const char *why)
{
  g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "%s: \"%s\" %s", diffuse_config_label (c), key, why);
  return FALSE;
}

/* a size entry: a number, {"shortest_edge": n} or {"height": h, "width": w} */
static gboolean
read_size (DiffuseConfig *c, const char *key, SizeKind number_kind, SizeKind *kind, int *s, int *h, int *w,
           GError **error)
{
  JsonNode *n = diffuse_config_get_node (c, key);
  *kind = SIZE_NONE;
  if (!n)
    return TRUE;
  if (JSON_NODE_HOLDS_VALUE (n) && json_node_get_value_type (n) == G_TYPE_INT64) {
    gint64 v = json_node_get_int (n);
    if (v < 1 || v > 16384)
      return config_error (error, c, key, "is out of range (1..16384)");
    *kind = number_kind;
    *s = *h = *w = (int) v;
    return TRUE;
  }
  if (!JSON_NODE_HOLDS_OBJECT (n))
    return config_error (error, c, key, "should be a number or an object");
  JsonObject *o = json_node_get_object (n);
  gint64 v[3] = { 0, 0, 0 };
  const char *names[3] = { "shortest_edge", "height", "width" };
  for (int i = 0; i < 3; i++)
    if (json_object_has_member (o, names[i])) {
      JsonNode *m = json_object_get_member (o, names[i]);
      if (!JSON_NODE_HOLDS_VALUE (m) || json_node_get_value_type (m) != G_TYPE_INT64 ||
          (v[i] = json_node_get_int (m)) < 1 || v[i] > 16384)
        return config_error (error, c, key, "has a size that is not an integer in 1..16384");
    }
  if (v[1] && v[2]) {
    *kind = SIZE_HW;
    *h = (int) v[1];
    *w = (int) v[2];
  } else if (v[0]) {
    *kind = SIZE_SHORTEST_EDGE;
    *s = (int) v[0];
  } else {
    return config_error (error, c, key, "needs \"shortest_edge\" or \"height\" and \"width\"");
  }
  return TRUE;
}

DiffuseClipImageProcessor *
diffuse_clip_image_processor_new (DiffuseConfig *c, GError **error)
{
  g_return_val_if_fail (c != NULL, NULL);
  DiffuseClipImageProcessor *p = g_new0 (DiffuseClipImageProcessor, 1);
  p->do_resize = diffuse_config_get_bool (c, "do_resize", TRUE);
  p->do_center_crop = diffuse_config_get_bool (c, "do_center_crop", TRUE);
  p->do_rescale = diffuse_config_get_bool (c, "do_rescale", TRUE);
  p->do_normalize = diffuse_config_get_bool (c, "do_normalize", TRUE);
  p->rescale_factor = diffuse_config_get_double (c, "rescale_factor", 1.0 / 255.0);
  p->resample = (int) diffuse_config_get_int (c, "resample", 3);
  SizeKind ck = SIZE_NONE;
  int dummy = 0;
  double *mean = NULL, *std = NULL;
  guint nm = 0, ns = 0;
  if (!read_size (c, "size", SIZE_SHORTEST_EDGE, &p->size_kind, &p->size_short, &p->size_h, &p->size_w, error) ||
      !read_size (c, "crop_size", SIZE_HW, &ck, &dummy, &p->crop_h, &p->crop_w, error))
    goto fail;
  if (p->do_resize && p->size_kind == SIZE_NONE) {
    config_error (error, c, "size", "is missing (do_resize is true)");
    goto fail;
  }
  if (p->do_center_crop && ck != SIZE_HW) {
    config_error (error, c, "crop_size", "is missing or not a height and width (do_center_crop is true)");
    goto fail;
  }
  if (p->do_resize && p->resample != 2 && p->resample != 3) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                 "%s: resample %d is not supported (2 = bilinear, 3 = bicubic)", diffuse_config_label (c),
                 p->resample);
    goto fail;
  }
  if (!(p->rescale_factor > 0.0)) {
    config_error (error, c, "rescale_factor", "should be positive");
    goto fail;
  }
  if (diffuse_config_has (c, "image_mean") &&
      (nm = diffuse_config_get_double_array (c, "image_mean", &mean)) != 3) {
    config_error (error, c, "image_mean", "should be a list of 3 numbers");
    goto fail;
  }
  if (diffuse_config_has (c, "image_std") && (ns = diffuse_config_get_double_array (c, "image_std", &std)) != 3) {
    config_error (error, c, "image_std", "should be a list of 3 numbers");
    goto fail;
  }
  for (int i = 0; i < 3; i++) {
    p->mean[i] = (float) (mean ? mean[i] : clip_mean[i]);
    p->std[i] = (float) (std ? std[i] : clip_std[i]);
    if (p->do_normalize && !(p->std[i] > 0.0f)) {
      config_error (error, c, "image_std", "should be positive");
      goto fail;
    }
  }
  g_free (mean);
  g_free (std);
  return p;

fail:
  g_free (mean);
  g_free (std);
  g_free (p);
  return NULL;
}

void
diffuse_clip_image_processor_free (DiffuseClipImageProcessor *p)
{
  g_free (p);
}

static void
resize_size (DiffuseClipImageProcessor *p, int w, int h, int *ow, int *oh)
{
  *ow = w;
  *oh = h;
  if (!p->do_resize)
    return;
  if (p->size_kind == SIZE_HW) {
    *ow = p->size_w;
    *oh = p->size_h;
  } else {
    /* get_resize_output_image_size (default_to_square=False): the short side
     * becomes size, the long one int (size * long / short) */
    const int s = p->size_short;
    if (w <= h) {
      *ow = s;
      *oh = (int) ((double) s * h / w);
    } else {
      *oh = s;
      *ow = (int) ((double) s * w / h);
    }
  }
}

void
diffuse_clip_image_processor_output_size (DiffuseClipImageProcessor *p, int in_width, int in_height, int *out_width,
                                          int *out_height)
{
  resize_size (p, in_width, in_height, out_width, out_height);
  if (p->do_center_crop) {
    *out_width = p->crop_w;
    *out_height = p->crop_h;
  }
}

/* ---- resampling ------------------------------------------------------------ */

static double
filter_bicubic (double x)
{
  const double a = -0.5;
  x = fabs (x);
  if (x < 1.0)
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0)
    return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

static double
filter_bilinear (double x)
{
  x = fabs (x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

typedef struct {
  int *start, *count;     /* per output pixel */
  int16_t *k;             /* [out][kmax] */
  int kmax, precision;
} Coeffs;

static void
coeffs_make (Coeffs *c, int in, int out, int resample)
{
  const double support0 = resample == 3 ? 2.0 : 1.0;
  const double scale = (double) in / out, fs = scale > 1.0 ? scale : 1.0, support = support0 * fs, ss = 1.0 / fs;
  c->kmax = (int) ceil (support) * 2 + 1;
  c->start = g_new (int, out);
  c->count = g_new (int, out);
  double *w = g_new0 (double, (size_t) out * c->kmax);
  double wmax = 0.0;
  for (int o = 0; o < out; o++) {
    const double center = (o + 0.5) * scale;
    int xmin = (int) (center - support + 0.5), xmax = (int) (center + support + 0.5);
    if (xmin < 0)
      xmin = 0;
    if (xmax > in)
      xmax = in;
    int n = xmax - xmin;
    if (n > c->kmax)
      n = c->kmax;
    double *wo = w + (size_t) o * c->kmax, sum = 0.0;
    for (int j = 0; j < n; j++) {
      wo[j] = resample == 3 ? filter_bicubic ((j + xmin - center + 0.5) * ss)
                            : filter_bilinear ((j + xmin - center + 0.5) * ss);
      sum += wo[j];
    }
    for (int j = 0; j < n && sum != 0.0; j++)
      wo[j] /= sum;
    for (int j = 0; j < n; j++)
      wmax = wo[j] > wmax ? wo[j] : wmax;
    c->start[o] = xmin;
    c->count[o] = n;
  }
  /* the largest precision whose largest weight still fits int16 (with a bit to spare) */
  int p = 0;
  for (; p < 22; p++)
    if ((int) (0.5 + wmax * (double) (1 << (p + 1))) >= (1 << 15))
      break;
  c->precision = p;
  c->k = g_new0 (int16_t, (size_t) out * c->kmax);
  for (size_t i = 0; i < (size_t) out * c->kmax; i++) {
    const double v = w[i] * (double) (1 << p);
    c->k[i] = (int16_t) (v < 0.0 ? v - 0.5 : v + 0.5);
  }
  g_free (w);
}

static void
coeffs_clear (Coeffs *c)
{
  g_free (c->start);
  g_free (c->count);
  g_free (c->k);
}

static inline guint8
clip8 (int32_t v, int precision)
{
  int32_t r = v >> precision;
  return (guint8) (r < 0 ? 0 : (r > 255 ? 255 : r));
}

/* src [h][w][3] (row stride sstride bytes) -> dst [h][ow][3] */
static void
pass_horizontal (const guint8 *src, int sstride, int w, int h, guint8 *dst, int ow, int resample)
{
  Coeffs c;
  coeffs_make (&c, w, ow, resample);
  const int32_t half = c.precision > 0 ? 1 << (c.precision - 1) : 0;
  for (int y = 0; y < h; y++) {
    const guint8 *row = src + (size_t) y * sstride;
    guint8 *out = dst + (size_t) y * ow * 3;
    for (int o = 0; o < ow; o++) {
      const int16_t *k = c.k + (size_t) o * c.kmax;
      int32_t s[3] = { half, half, half };
      for (int j = 0; j < c.count[o]; j++) {
        const guint8 *px = row + (size_t) (c.start[o] + j) * 3;
        s[0] += px[0] * k[j];
        s[1] += px[1] * k[j];
        s[2] += px[2] * k[j];
      }
      for (int ch = 0; ch < 3; ch++)
        out[o * 3 + ch] = clip8 (s[ch], c.precision);
    }
  }
  coeffs_clear (&c);
}

/* src [h][w][3] packed -> dst [oh][w][3] */
static void
pass_vertical (const guint8 *src, int w, int h, guint8 *dst, int oh, int resample)
{
  Coeffs c;
  coeffs_make (&c, h, oh, resample);
  const int32_t half = c.precision > 0 ? 1 << (c.precision - 1) : 0;
  for (int o = 0; o < oh; o++) {
    const int16_t *k = c.k + (size_t) o * c.kmax;
    guint8 *out = dst + (size_t) o * w * 3;
    for (int i = 0; i < w * 3; i++) {
      int32_t s = half;
      for (int j = 0; j < c.count[o]; j++)
        s += src[((size_t) (c.start[o] + j) * w) * 3 + i] * k[j];
      out[i] = clip8 (s, c.precision);
    }
  }
  coeffs_clear (&c);
}

/* one image to packed 8-bit RGB at (ow, oh) */
static guint8 *
resize_rgb8 (const guint8 *src, int stride, int w, int h, int ow, int oh, int resample)
{
  guint8 *cur = g_new (guint8, (size_t) w * h * 3);
  for (int y = 0; y < h; y++)
    memcpy (cur + (size_t) y * w * 3, src + (size_t) y * stride, (size_t) w * 3);
  if (ow != w) {
    guint8 *t = g_new (guint8, (size_t) ow * h * 3);
    pass_horizontal (cur, w * 3, w, h, t, ow, resample);
    g_free (cur);
    cur = t;
  }
  if (oh != h) {
    guint8 *t = g_new (guint8, (size_t) ow * oh * 3);
    pass_vertical (cur, ow, h, t, oh, resample);
    g_free (cur);
    cur = t;
  }
  return cur;
}

DiffuseTensor *
diffuse_clip_image_processor_preprocess (DiffuseClipImageProcessor *p, const guint8 *const *rgb, const int *width,
                                         const int *height, const int *stride, int n, GError **error)
{
  g_return_val_if_fail (p != NULL && rgb != NULL && width != NULL && height != NULL && n > 0, NULL);
  int OW = 0, OH = 0;
  for (int i = 0; i < n; i++) {
    if (width[i] < 1 || height[i] < 1 || !rgb[i]) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "image processor: image %d is empty", i);
      return NULL;
    }
    int ow, oh;
    diffuse_clip_image_processor_output_size (p, width[i], height[i], &ow, &oh);
    if (i == 0) {
      OW = ow;
      OH = oh;
    } else if (ow != OW || oh != OH) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                   "image processor: image %d becomes %dx%d, image 0 %dx%d (no center crop to even them)", i, ow,
                   oh, OW, OH);
      return NULL;
    }
  }
  DiffuseTensor *out = diffuse_tensor_new (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 4,
                                           (const int64_t[]) { n, 3, OH, OW });
  if (!out) {
    diffuse_tensor_take_error (error);
    return NULL;
  }
  float *o = diffuse_tensor_f32 (out);
  /* the fused rescale + normalize: mean and std over rescale_factor, in f32 */
  const float inv = (float) (1.0 / p->rescale_factor);
  float m[3], s[3];
  for (int c = 0; c < 3; c++) {
    m[c] = p->do_rescale ? p->mean[c] * inv : p->mean[c];
    s[c] = p->do_rescale ? p->std[c] * inv : p->std[c];
  }
  const float rf = (float) p->rescale_factor;
  for (int i = 0; i < n; i++) {
    int rw, rh;
    resize_size (p, width[i], height[i], &rw, &rh);
    const int st = stride ? stride[i] : width[i] * 3;
    guint8 *img = (rw != width[i] || rh != height[i]) ? resize_rgb8 (rgb[i], st, width[i], height[i], rw, rh,
                                                                      p->resample)
                                                      : NULL;
    const guint8 *src = img ? img : rgb[i];
    const int sst = img ? rw * 3 : st;
    /* center crop: pad (left/top get the smaller half) where the crop is larger, then crop */
    int top = 0, left = 0;
    if (p->do_center_crop) {
      const int pad_t = OH > rh ? (OH - rh) / 2 : 0, pad_l = OW > rw ? (OW - rw) / 2 : 0;
      const int ph = rh + (OH > rh ? OH - rh : 0), pw = rw + (OW > rw ? OW - rw : 0);
      top = (int) ((ph - OH) / 2.0) - pad_t;
      left = (int) ((pw - OW) / 2.0) - pad_l;
    }
    for (int y = 0; y < OH; y++)
      for (int x = 0; x < OW; x++) {
        const int sy = y + top, sx = x + left;
        const gboolean in = sy >= 0 && sy < rh && sx >= 0 && sx < rw;
        for (int c = 0; c < 3; c++) {
          const float v = in ? (float) src[(size_t) sy * sst + (size_t) sx * 3 + c] : 0.0f;
          float r;
          if (p->do_normalize)
            r = (v - m[c]) / s[c];
          else if (p->do_rescale)
            r = v * rf;
          else
            r = v;
          o[(((size_t) i * 3 + c) * OH + y) * OW + x] = r;
        }
      }
    g_free (img);
  }
  return out;
}
