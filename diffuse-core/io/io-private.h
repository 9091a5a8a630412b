/* Private to the io layer: helpers shared by safetensors.c, torch_pickle.c,
 * st_writer.c, weights.c and config.c. */
#pragma once

#include <diffuse/safetensors.h>
#include <json-glib/json-glib.h>

G_BEGIN_DECLS

/* Bytes per element of a file dtype (0 for an invalid value). */
guint _diffuse_st_dtype_size (DiffuseStDType dt);
/* Size of the data buffer of an opened file. */
guint64 _diffuse_safetensors_data_bytes (DiffuseSafetensors *st);
/* The tensor of an entry of st (see diffuse_safetensors_tensor). */
DiffuseTensor *_diffuse_st_entry_tensor (DiffuseSafetensors *st, const DiffuseStEntry *e, DiffuseDType dtype,
                                         DiffuseDevice *dev, GError **error);

/* PyTorch checkpoints (torch_pickle.c).  A torch.save file (torch >= 1.6)
 * is a ZIP archive: it starts with "PK\x03\x04". */
gboolean _diffuse_torch_zip_magic (const void *data, size_t len);
/* The pre-1.6 torch.save format (a bare pickle with torch's magic number). */
gboolean _diffuse_torch_legacy_magic (const void *data, size_t len);
/* Reads the state dict of the torch.save archive at base/len (never
 * executing anything: a whitelist of globals, as torch.load(weights_only=True))
 * into entries pointing into base, nested dicts flattened with ".".
 * Entries are unsorted, names unique and newly allocated; *data_bytes is the
 * size of the storages used.  Errors: DIFFUSE_ERROR_CORRUPT for malformed
 * archives or pickles, DIFFUSE_ERROR_UNSUPPORTED for valid files we do not
 * read (compressed entries, big-endian, forbidden globals, non-contiguous
 * tensors); messages start with label. */
gboolean _diffuse_torch_pickle_parse (const char *label, const guint8 *base, size_t len, DiffuseStEntry **entries,
                                      guint *n_entries, guint64 *data_bytes, GError **error);

/* JSON text exactly as Python's json.dumps(node, indent=indent,
 * sort_keys=True) writes it (ensure_ascii, float repr, "Infinity"/"NaN");
 * indent < 0 means the compact one-line form with ", " and ": ". */
char *_diffuse_json_dump_py (JsonNode *node, int indent);

/* Atomic file write: a temp file in the same folder, fsync'd, renamed over
 * path; nothing is left behind on failure.  ENOSPC/EDQUOT give
 * DIFFUSE_ERROR_DISK_FULL, other failures DIFFUSE_ERROR_IO. */
typedef struct _DiffuseAtomicFile DiffuseAtomicFile;
DiffuseAtomicFile *_diffuse_atomic_file_open (const char *path, guint64 expected_size, GError **error);
gboolean _diffuse_atomic_file_write (DiffuseAtomicFile *f, const void *data, size_t len, GError **error);
/* Commits (fsync + rename) and frees f. */
gboolean _diffuse_atomic_file_commit (DiffuseAtomicFile *f, GError **error);
/* Removes the temp file and frees f. */
void _diffuse_atomic_file_abort (DiffuseAtomicFile *f);
gboolean _diffuse_write_file_atomic (const char *path, const void *data, size_t len, GError **error);

G_END_DECLS
