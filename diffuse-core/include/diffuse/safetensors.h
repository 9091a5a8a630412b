/* gst-diffuse — safetensors files: validated mmap reader, writer, shards.
 *
 * Format: 8-byte little-endian header length N, N bytes of JSON
 * {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
 *  "__metadata__": {"k": "v"}}, then the data buffer.  Offsets are relative
 * to the data buffer, must cover it exactly (no holes after sorting, no
 * overlap, no trailing bytes).  Every defect is a DIFFUSE_ERROR_CORRUPT
 * naming the file and the tensor. */
#pragma once

#include <diffuse/tensor.h>

G_BEGIN_DECLS

/* Dtypes a file may hold.  Only F32/F16/BF16 become tensors; the others
 * are accepted in the header (and reported as unsupported on access). */
typedef enum {
  DIFFUSE_ST_F64, DIFFUSE_ST_F32, DIFFUSE_ST_F16, DIFFUSE_ST_BF16,
  DIFFUSE_ST_I64, DIFFUSE_ST_I32, DIFFUSE_ST_I16, DIFFUSE_ST_I8, DIFFUSE_ST_U8, DIFFUSE_ST_BOOL,
  DIFFUSE_ST_F8_E4M3, DIFFUSE_ST_F8_E5M2, DIFFUSE_ST_U16, DIFFUSE_ST_U32, DIFFUSE_ST_U64,
} DiffuseStDType;

typedef struct _DiffuseSafetensors DiffuseSafetensors;

typedef struct {
  const char *name;
  DiffuseStDType dtype;
  int ndim;
  int64_t shape[8];
  const void *data;      /* inside the mapping */
  size_t nbytes;
} DiffuseStEntry;

/* Opens and fully validates a file.  The mapping lives as long as the
 * handle or any tensor made from it.
 *
 * A PyTorch checkpoint written by torch.save (torch >= 1.6: a ZIP archive,
 * "pytorch_model.bin", "diffusion_pytorch_model.bin", "*.pt") opens the same
 * way: its state dict is read without executing anything, as
 * torch.load(weights_only=True) reads it (only the globals a state dict of
 * tensors needs are accepted; any other is an error naming it), nested dicts
 * are flattened with "." ({"image_proj": {"proj.weight": t}} gives
 * "image_proj.proj.weight"), entries point into the mapping (no copy) and
 * there is no metadata.  Compressed entries, big-endian files, the pre-1.6
 * format and non-contiguous tensors are DIFFUSE_ERROR_UNSUPPORTED; malformed
 * archives or pickles DIFFUSE_ERROR_CORRUPT. */
DiffuseSafetensors *diffuse_safetensors_open (const char *path, GError **error);
/* Same validation on a memory buffer (copied); used by the fuzz target. */
DiffuseSafetensors *diffuse_safetensors_open_bytes (const void *data, size_t len, const char *label, GError **error);
DiffuseSafetensors *diffuse_safetensors_ref (DiffuseSafetensors *st);
void diffuse_safetensors_unref (DiffuseSafetensors *st);

const char *diffuse_safetensors_path (DiffuseSafetensors *st);
guint diffuse_safetensors_n_tensors (DiffuseSafetensors *st);
/* Entries sorted by name. */
const DiffuseStEntry *diffuse_safetensors_entry (DiffuseSafetensors *st, guint i);
const DiffuseStEntry *diffuse_safetensors_find (DiffuseSafetensors *st, const char *name);
/* The "__metadata__" map (string -> string), or NULL. */
GHashTable *diffuse_safetensors_metadata (DiffuseSafetensors *st);
const char *diffuse_st_dtype_name (DiffuseStDType dt);   /* "F32" ... */

/* A tensor for an entry.  When the file's dtype equals `dtype` and the
 * device is the CPU (dev NULL means the CPU), the tensor borrows the mapped
 * bytes (no copy; read-only memory: never write into it); otherwise it is
 * converted into a new tensor on `dev` (F32/F16/BF16 between each other,
 * F64 through f32 as torch does; data not aligned to the element size is
 * copied).  Integer/bool/F8 entries give DIFFUSE_ERROR_UNSUPPORTED, a
 * missing name DIFFUSE_ERROR_NOT_FOUND. */
DiffuseTensor *diffuse_safetensors_tensor (DiffuseSafetensors *st, const char *name, DiffuseDType dtype,
                                           DiffuseDevice *dev, GError **error);

/* ---- writer ----------------------------------------------------------- */

typedef struct _DiffuseStWriter DiffuseStWriter;

DiffuseStWriter *diffuse_st_writer_new (void);
void diffuse_st_writer_free (DiffuseStWriter *w);
/* The tensor is referenced until the writer is freed; it is stored in its own dtype
 * (any strides, any device).  Adding a name again replaces the tensor and keeps
 * the first position, as a Python dict does. */
void diffuse_st_writer_add (DiffuseStWriter *w, const char *name, DiffuseTensor *t);
/* "format" is reserved (always "pt"). */
void diffuse_st_writer_add_metadata (DiffuseStWriter *w, const char *key, const char *value);
/* Writes one file (atomically: temp file in the same folder, fsync, rename;
 * nothing is left behind on failure; ENOSPC is DIFFUSE_ERROR_DISK_FULL).
 * Metadata always holds {"format": "pt"}.  With only that metadata the bytes
 * are those of safetensors.torch.save_file for the same tensors. */
gboolean diffuse_st_writer_write (DiffuseStWriter *w, const char *path, GError **error);
/* Writes <dir>/<prefix>[.<variant>].safetensors when everything fits in
 * max_shard_size bytes (0 = no limit); otherwise diffusers' shard naming
 * <prefix>[.<variant>]-00001-of-0000N.safetensors (the variant comes before
 * the shard suffix: diffusion_pytorch_model.fp16-00001-of-00003.safetensors)
 * plus the index <prefix>.safetensors.index[.<variant>].json.  Tensors are
 * assigned in insertion order by huggingface_hub's rule (a tensor larger
 * than the limit gets a shard of its own) and never split; fed a model's
 * state_dict order, the files are byte-identical to diffusers'
 * save_pretrained(max_shard_size=..., variant=...).  Files of an earlier save
 * with the same prefix/variant that the new one supersedes (other shard
 * sets, the single file or the index) are removed; on failure the shards
 * this call wrote are removed. */
gboolean diffuse_st_writer_write_sharded (DiffuseStWriter *w, const char *dir, const char *prefix,
                                          const char *variant, guint64 max_shard_size, GError **error);

/* ---- a set of tensors from one or more files (one component) ---------- */

typedef struct _DiffuseWeights DiffuseWeights;

/* Opens files (one, or the shards listed by an index json) and maps every
 * tensor name to its file.  A name present in two files is an error. */
DiffuseWeights *diffuse_weights_open (const char *const *paths, GError **error);
/* From a *.safetensors.index*.json: opens the shard files it lists, from the
 * same folder, each once, checking each listed tensor is in the shard named
 * (else DIFFUSE_ERROR_CORRUPT); a missing shard is DIFFUSE_ERROR_NOT_FOUND
 * naming the index and the shard.  Tensors of the shards that the index does
 * not list are included too (diffusers loads whole shard files). */
DiffuseWeights *diffuse_weights_open_index (const char *index_json_path, GError **error);
DiffuseWeights *diffuse_weights_ref (DiffuseWeights *w);
void diffuse_weights_unref (DiffuseWeights *w);
/* base with some tensors replaced (LoRA merged into a component): patches
 * maps names of base (char*) to replacement tensors of the same shape (any
 * dtype, CPU), which are cast/moved like the files' tensors.  Every other
 * tensor is base's own (diffuse_weights_get shares base's, made once there);
 * names and entries are base's.  what: for messages ("LoRA a, b"). */
DiffuseWeights *diffuse_weights_new_patched (DiffuseWeights *base, GHashTable *patches, const char *what);

gboolean diffuse_weights_has (DiffuseWeights *w, const char *name);
/* NULL-terminated, sorted; free with g_free (strings belong to w). */
const char **diffuse_weights_names (DiffuseWeights *w, guint *n);
const DiffuseStEntry *diffuse_weights_entry (DiffuseWeights *w, const char *name);
/* Tensor by name, in `dtype` on `dev` (borrowed from the mapping when
 * possible).  Each (name, dtype, device) is made once and kept by w, so every
 * model built on the same weights shares the same tensors (the component
 * cache relies on this).  A missing name is DIFFUSE_ERROR_NOT_FOUND naming
 * the tensor and the files. */
DiffuseTensor *diffuse_weights_get (DiffuseWeights *w, const char *name, DiffuseDType dtype,
                                    DiffuseDevice *dev, GError **error);
/* The same, without keeping the result (for one-off conversions such as saving). */
DiffuseTensor *diffuse_weights_get_uncached (DiffuseWeights *w, const char *name, DiffuseDType dtype,
                                             DiffuseDevice *dev, GError **error);
/* Sum of tensor bytes in the files. */
guint64 diffuse_weights_file_bytes (DiffuseWeights *w);
const char *diffuse_weights_describe (DiffuseWeights *w);   /* file list for messages */

G_END_DECLS
