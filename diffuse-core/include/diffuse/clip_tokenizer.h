/* gst-diffuse — the CLIP tokenizer (transformers' CLIPTokenizer).
 *
 * Loads a transformers CLIP tokenizer folder (the "tokenizer/" component of a
 * Stable Diffusion repository): vocab.json and merges.txt (required), plus
 * tokenizer_config.json and special_tokens_map.json (optional).  Encoding is
 * byte-level BPE exactly as the installed transformers (5.x) CLIPTokenizer
 * does it — that class is backed by the `tokenizers` library:
 *
 *   1. special ("added") tokens — bos, eos, unk, pad, and any listed in
 *      added_tokens_decoder / additional_special_tokens — are cut out of the
 *      text first: tokens flagged normalized=false on the raw text, the others
 *      on the normalized text (the flags are resolved the way transformers
 *      resolves them; SD 1.x: "<|startoftext|>" normalized, "<|endoftext|>"
 *      not; SD 2.x also cuts out its pad token "!", which becomes id 0);
 *   2. normalization: Unicode NFC, every run of white space -> one " ",
 *      lower-casing (per character, Unicode full mapping);
 *   3. pre-tokenization with CLIP's pattern
 *      <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
 *      (white space dropped), then the GPT-2 byte-level split;
 *   4. byte-to-unicode mapping, "</w>" on the last symbol, BPE merges by rank
 *      (cached per word);
 *   5. <|startoftext|> ... <|endoftext|> around the ids; truncation to
 *      model_max_length and padding with the pad token, as diffusers' pipelines
 *      call it: tokenizer(prompt, padding="max_length",
 *      max_length=tokenizer.model_max_length, truncation=True).
 *
 * ftfy is not used: transformers 5 never calls it (the 4.x slow tokenizer did,
 * when installed).  Unicode classes come from GLib (g_unichar_type), NFC from
 * g_utf8_normalize, lower-casing from g_unichar_tolower plus the few mappings
 * GLib lacks; letters/numbers newer than GLib's Unicode tables come from a
 * small built-in table.  Checked against `tokenizers` for every code point
 * (classes, lowercase, single-character NFC); compositions of characters
 * newer than GLib's tables could still differ.
 *
 * Input text that is not valid UTF-8 is not an error: each maximal invalid
 * subsequence is replaced by U+FFFD, as Python's bytes.decode("utf-8",
 * "replace") does, so the ids equal transformers' ids for that decoded string.
 *
 * model_max_length comes from tokenizer_config.json; when it is absent (or
 * the "very large" sentinel transformers writes when unset) it is 77.
 * padding_side / truncation_side ("right" by default, or "left") are honoured.
 *
 * A tokenizer is immutable after loading except for its internal BPE cache,
 * which is locked: encode/decode may run from several threads at once. */
#pragma once

#include <glib.h>
#include <stdint.h>

G_BEGIN_DECLS

typedef struct _DiffuseClipTokenizer DiffuseClipTokenizer;

/* Errors: DIFFUSE_ERROR_NOT_FOUND (folder, vocab.json or merges.txt missing),
 * DIFFUSE_ERROR_IO (unreadable file), DIFFUSE_ERROR_CORRUPT (bad JSON, a bad
 * merges.txt line, a merge whose tokens are not in the vocabulary; the message
 * names the file and line/entry), DIFFUSE_ERROR_CONFIG (a special token that
 * is not in the vocabulary, model_max_length < 2, a bad padding_side),
 * DIFFUSE_ERROR_UNSUPPORTED (added_tokens.json with entries, a special token
 * flagged single_word). */
DiffuseClipTokenizer *diffuse_clip_tokenizer_load (const char *folder, GError **error);
DiffuseClipTokenizer *diffuse_clip_tokenizer_ref (DiffuseClipTokenizer *tok);
void diffuse_clip_tokenizer_unref (DiffuseClipTokenizer *tok);
/* Same as unref (drops the caller's reference). */
void diffuse_clip_tokenizer_free (DiffuseClipTokenizer *tok);
G_DEFINE_AUTOPTR_CLEANUP_FUNC (DiffuseClipTokenizer, diffuse_clip_tokenizer_unref)

/* Encodes `text` (UTF-8, NUL-terminated).
 *
 * pad_to_max = TRUE: the pipelines' call — truncation to model_max_length
 *   (bos and eos kept) and padding to it.  Writes exactly model_max_length ids;
 *   `max` must be >= model_max_length (else DIFFUSE_ERROR_INVALID_ARGUMENT).
 *   Returns model_max_length.
 * pad_to_max = FALSE: tokenizer(text) — no truncation, no padding.  Returns
 *   the full number of ids n (bos + text + eos) and writes the first MIN(n, max)
 *   of them (snprintf-like: pass max = 0, ids_out = NULL to learn n).
 *
 * Returns -1 with `error` set on failure. */
int diffuse_clip_tokenizer_encode (DiffuseClipTokenizer *tok, const char *text, gboolean pad_to_max,
                                   int32_t *ids_out, int max, GError **error);
/* As encode, also writing the attention mask (1 for a real token, 0 for
 * padding) to `mask_out` when it is not NULL (same length as the ids). */
int diffuse_clip_tokenizer_encode_full (DiffuseClipTokenizer *tok, const char *text, gboolean pad_to_max,
                                        int32_t *ids_out, int32_t *mask_out, int max, GError **error);

/* tokenizer.decode(ids, skip_special_tokens=...): the byte-level text with
 * "</w>" turned into spaces, stripped; ids outside the vocabulary are
 * skipped.  g_free the result. */
char *diffuse_clip_tokenizer_decode (DiffuseClipTokenizer *tok, const int32_t *ids, int n,
                                     gboolean skip_special_tokens);
/* What diffusers' pipelines print in "The following part of your input was
 * truncated because CLIP can only handle sequences up to N tokens: ...":
 * tokenizer.batch_decode(untruncated_ids[:, model_max_length - 1 : -1]).
 * NULL when the prompt fits (nothing is cut).  g_free the result. */
char *diffuse_clip_tokenizer_truncated_text (DiffuseClipTokenizer *tok, const char *text);

int32_t diffuse_clip_tokenizer_bos_id (DiffuseClipTokenizer *tok);
int32_t diffuse_clip_tokenizer_eos_id (DiffuseClipTokenizer *tok);
int32_t diffuse_clip_tokenizer_pad_id (DiffuseClipTokenizer *tok);
int32_t diffuse_clip_tokenizer_unk_id (DiffuseClipTokenizer *tok);   /* -1 when none */
int diffuse_clip_tokenizer_model_max_length (DiffuseClipTokenizer *tok);
/* Number of entries of vocab.json (49408 for CLIP). */
int diffuse_clip_tokenizer_vocab_size (DiffuseClipTokenizer *tok);
/* -1 when the token is not in the vocabulary. */
int32_t diffuse_clip_tokenizer_token_to_id (DiffuseClipTokenizer *tok, const char *token);
/* NULL when the id is not in the vocabulary; owned by the tokenizer. */
const char *diffuse_clip_tokenizer_id_to_token (DiffuseClipTokenizer *tok, int32_t id);

G_END_DECLS
