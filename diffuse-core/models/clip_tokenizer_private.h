/* gst-diffuse — internals of the CLIP tokenizer, exposed for its unit test only. */
#pragma once

#include <glib.h>

G_BEGIN_DECLS

typedef enum {
  DIFFUSE_CLIP_CHAR_OTHER = 0,   /* [^\s\p{L}\p{N}] */
  DIFFUSE_CLIP_CHAR_SPACE = 1,   /* \s (Unicode White_Space, as Oniguruma's \s) */
  DIFFUSE_CLIP_CHAR_LETTER = 2,  /* \p{L} */
  DIFFUSE_CLIP_CHAR_NUMBER = 3,  /* \p{N} */
} DiffuseClipCharClass;

DiffuseClipCharClass _diffuse_clip_char_class (gunichar c);
/* Rust's char::to_lowercase (what the `tokenizers` Lowercase normalizer
 * applies per character): writes 1 or 2 characters to out, returns the count. */
int _diffuse_clip_char_lower (gunichar c, gunichar out[3]);
/* Replaces each maximal invalid UTF-8 subsequence by U+FFFD (Python's
 * errors="replace", Rust's from_utf8_lossy).  len < 0: NUL-terminated. */
char *_diffuse_clip_utf8_make_valid (const char *s, gssize len);

G_END_DECLS
