/* gst-diffuse — reading PNG files (8-bit grey / grey+alpha / RGB / RGBA,
 * not interlaced) into a DiffuseImage, for image prompts (IP-Adapter) and
 * img2img inputs given as files.  Alpha is dropped, as PIL's convert ("RGB")
 * does before transformers' image processors. */
#include <diffuse/sd.h>
#include <diffuse/error.h>
#include <gio/gio.h>
#include <string.h>

static guint32
be32 (const guint8 *p)
{
  return ((guint32) p[0] << 24) | ((guint32) p[1] << 16) | ((guint32) p[2] << 8) | p[3];
}

static int
paeth (int a, int b, int c)
{
  int p = a + b - c, pa = ABS (p - a), pb = ABS (p - b), pc = ABS (p - c);
  return pa <= pb && pa <= pc ? a : (pb <= pc ? b : c);
}

static gboolean
fail (GError **error, const char *path, const char *why)
{
  g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT, "%s: %s", path, why);
  return FALSE;
}

DiffuseImage *
diffuse_image_load_png (const char *path, GError **error)
{
  gchar *data = NULL;
  gsize len = 0;
  if (!g_file_get_contents (path, &data, &len, error))
    return NULL;
  const guint8 *d = (const guint8 *) data;
  static const guint8 sig[8] = { 0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n' };
  DiffuseImage *img = NULL;
  GByteArray *idat = g_byte_array_new ();
  guint8 *raw = NULL;
  guint32 w = 0, h = 0;
  int ch = 0;
  gboolean ok = len >= 8 && memcmp (d, sig, 8) == 0;
  if (!ok)
    fail (error, path, "not a PNG file");
  gsize pos = 8;
  gboolean have_ihdr = FALSE, end = FALSE;
  while (ok && !end) {
    if (pos + 12 > len) {
      ok = fail (error, path, "truncated PNG (no IEND)");
      break;
    }
    const guint32 n = be32 (d + pos);
    const guint8 *type = d + pos + 4, *body = d + pos + 8;
    if (n > len - pos - 12) {
      ok = fail (error, path, "truncated PNG chunk");
      break;
    }
    if (memcmp (type, "IHDR", 4) == 0 && n >= 13) {
      w = be32 (body);
      h = be32 (body + 4);
      const int depth = body[8], ct = body[9], interlace = body[12];
      ch = ct == 0 ? 1 : ct == 2 ? 3 : ct == 4 ? 2 : ct == 6 ? 4 : 0;
      if (depth != 8 || ch == 0 || interlace != 0)
        ok = fail (error, path, "only 8-bit grey/RGB(A) PNGs without interlacing are read (palette, 16-bit and "
                                "interlaced ones are not)");
      else if (w == 0 || h == 0 || w > 16384 || h > 16384)
        ok = fail (error, path, "image size out of range");
      have_ihdr = TRUE;
    } else if (memcmp (type, "IDAT", 4) == 0) {
      g_byte_array_append (idat, body, n);
    } else if (memcmp (type, "IEND", 4) == 0) {
      end = TRUE;
    }
    pos += 12 + (gsize) n;
  }
  if (ok && !have_ihdr)
    ok = fail (error, path, "no IHDR chunk");
  const gsize stride = (gsize) w * ch, want = (stride + 1) * h;
  if (ok) {
    raw = g_malloc (want);
    GZlibDecompressor *z = g_zlib_decompressor_new (G_ZLIB_COMPRESSOR_FORMAT_ZLIB);
    gsize read = 0, written = 0;
    GError *e = NULL;
    GConverterResult r = g_converter_convert (G_CONVERTER (z), idat->data, idat->len, raw, want,
                                              G_CONVERTER_INPUT_AT_END, &read, &written, &e);
    g_object_unref (z);
    if ((r != G_CONVERTER_FINISHED && r != G_CONVERTER_CONVERTED) || written != want) {
      ok = fail (error, path, e ? e->message : "the image data does not inflate to its size");
    }
    g_clear_error (&e);
  }
  if (ok) {
    /* unfilter in place: row y at raw + y * (stride + 1) + 1, its filter byte before it */
    for (guint32 y = 0; y < h && ok; y++) {
      guint8 *row = raw + y * (stride + 1) + 1;
      const guint8 *prev = y ? raw + (y - 1) * (stride + 1) + 1 : NULL;
      const int f = row[-1];
      for (gsize i = 0; i < stride; i++) {
        const int a = i >= (gsize) ch ? row[i - ch] : 0, b = prev ? prev[i] : 0,
                  c = prev && i >= (gsize) ch ? prev[i - ch] : 0;
        switch (f) {
          case 0: break;
          case 1: row[i] = (guint8) (row[i] + a); break;
          case 2: row[i] = (guint8) (row[i] + b); break;
          case 3: row[i] = (guint8) (row[i] + ((a + b) >> 1)); break;
          case 4: row[i] = (guint8) (row[i] + paeth (a, b, c)); break;
          default: ok = fail (error, path, "bad PNG row filter"); i = stride; break;
        }
      }
    }
  }
  if (ok) {
    img = g_new0 (DiffuseImage, 1);
    img->width = (int) w;
    img->height = (int) h;
    img->pixels = g_new (float, (gsize) w * h * 3);
    for (guint32 y = 0; y < h; y++) {
      const guint8 *row = raw + y * (stride + 1) + 1;
      for (guint32 x = 0; x < w; x++)
        for (int c = 0; c < 3; c++)
          img->pixels[((gsize) y * w + x) * 3 + c] = row[x * ch + (ch < 3 ? 0 : c)] / 255.0f;
    }
  }
  g_free (raw);
  g_byte_array_unref (idat);
  g_free (data);
  return img;
}
