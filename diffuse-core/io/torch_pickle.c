/* gst-diffuse — PyTorch checkpoints (torch.save, torch >= 1.6), read the way
 * torch.load (..., weights_only=True) reads them: nothing in the file is ever
 * executed.
 *
 * The format: a ZIP archive whose entries are stored (not compressed),
 *   <prefix>/data.pkl         the pickled object (protocol 2)
 *   <prefix>/data/<key>       raw bytes of each storage (aligned to 64 bytes)
 *   <prefix>/byteorder        "little" (absent in old files: little)
 *   <prefix>/version, .format_version, .storage_alignment, .data/...
 * with a ZIP64 end record (torch's writer always adds one).  The central
 * directory is parsed here; the storages are used in place in the mapping.
 *
 * data.pkl is run by a small pickle machine that can only build data:
 * None/bool/int/float/str/bytes, tuples, lists, dicts, plus the few globals
 * torch's weights_only unpickler allows for a state dict
 * (torch/_weights_only_unpickler.py): collections.OrderedDict,
 * torch._utils._rebuild_tensor_v2 / _rebuild_parameter(_with_state) and the
 * typed storage classes, which only appear inside the persistent ids
 * ('storage', <storage class>, key, location, numel).  Any other global is
 * refused by name.  Every object lives in one arena freed at the end, so
 * cycles or deep nesting made with the memo cannot cause recursion on free.
 *
 * The result must be a dict; nested dicts are flattened with "." (the
 * IP-Adapter checkpoint {"image_proj": {...}, "ip_adapter": {...}} gives
 * "image_proj.proj.weight" as its safetensors twin names it).  Leaves that
 * are not tensors (a state dict's "_metadata" is BUILD state and never a
 * leaf; an "epoch": 3 would be) are skipped.  Tensors must be contiguous and
 * lie inside their storage; several may share one storage (views). */
#include "io/io-private.h"

#include <diffuse/error.h>
#include <stdarg.h>
#include <string.h>

#define TP_MAX_DIMS 8          /* as DiffuseStEntry */
#define TP_MAX_NEST 64         /* dict nesting followed when flattening */
#define ZIP_LOCAL_SIG 0x04034b50u
#define ZIP_CENTRAL_SIG 0x02014b50u
#define ZIP_EOCD_SIG 0x06054b50u
#define ZIP64_EOCD_SIG 0x06064b50u
#define ZIP64_LOCATOR_SIG 0x07064b50u

/* ---- errors ------------------------------------------------------------- */

static gboolean tp_fail (GError **error, int code, const char *label, const char *fmt, ...) G_GNUC_PRINTF (4, 5);

static gboolean
tp_fail (GError **error, int code, const char *label, const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  char *msg = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  if (code == DIFFUSE_ERROR_CORRUPT)
    g_set_error (error, DIFFUSE_ERROR, code, "%s: corrupt PyTorch checkpoint: %s", label, msg);
  else
    g_set_error (error, DIFFUSE_ERROR, code, "%s: %s", label, msg);
  g_free (msg);
  return FALSE;
}

/* ---- little-endian reads (callers check bounds first) -------------------- */

static guint16
rd16 (const guint8 *p)
{
  return (guint16) (p[0] | (p[1] << 8));
}

static guint32
rd32 (const guint8 *p)
{
  return (guint32) p[0] | ((guint32) p[1] << 8) | ((guint32) p[2] << 16) | ((guint32) p[3] << 24);
}

static guint64
rd64 (const guint8 *p)
{
  return (guint64) rd32 (p) | ((guint64) rd32 (p + 4) << 32);
}

gboolean
_diffuse_torch_zip_magic (const void *data, size_t len)
{
  return len >= 4 && memcmp (data, "PK\x03\x04", 4) == 0;
}

gboolean
_diffuse_torch_legacy_magic (const void *data, size_t len)
{
  /* PROTO 2, LONG1 of 10 bytes: torch's legacy magic number
   * 0x1950a86a20f9469cfc6c (torch/serialization.py MAGIC_NUMBER) */
  static const guint8 magic[] = { 0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19 };
  return len >= sizeof magic && memcmp (data, magic, sizeof magic) == 0;
}

/* ---- the ZIP archive ------------------------------------------------------- */

typedef struct {
  const guint8 *data;
  guint64 size;
} ZipRecord;

/* The stored records by full name.  Names are validated UTF-8 without NUL. */
static GHashTable *
zip_read (const char *label, const guint8 *base, size_t len, char **prefix_out, GError **error)
{
  /* end of central directory: 22 bytes + a comment of up to 65535 */
  if (len < 22) {
    tp_fail (error, DIFFUSE_ERROR_CORRUPT, label, "file is %zu bytes, too short for a ZIP archive", len);
    return NULL;
  }
  size_t eocd = (size_t) -1;
  size_t lowest = len > 22 + 65535 ? len - 22 - 65535 : 0;
  for (size_t p = len - 22 + 1; p-- > lowest;)
    if (rd32 (base + p) == ZIP_EOCD_SIG && p + 22 + rd16 (base + p + 20) <= len) {
      eocd = p;
      break;
    }
  if (eocd == (size_t) -1) {
    tp_fail (error, DIFFUSE_ERROR_CORRUPT, label, "no ZIP end-of-central-directory record (truncated file?)");
    return NULL;
  }
  if (rd16 (base + eocd + 4) != 0 || rd16 (base + eocd + 6) != 0) {
    tp_fail (error, DIFFUSE_ERROR_UNSUPPORTED, label, "multi-disk ZIP archives are not supported");
    return NULL;
  }
  guint64 n_entries = rd16 (base + eocd + 10);
  guint64 cd_size = rd32 (base + eocd + 12);
  guint64 cd_off = rd32 (base + eocd + 16);
  /* ZIP64: a locator right before the end record points at the ZIP64 end
   * record (torch's writer always adds them; needed past 4 GiB / 65535 entries) */
  if (eocd >= 20 && rd32 (base + eocd - 20) == ZIP64_LOCATOR_SIG) {
    guint64 z = rd64 (base + eocd - 20 + 8);
    if (z > len || len - z < 56 || rd32 (base + z) != ZIP64_EOCD_SIG) {
      tp_fail (error, DIFFUSE_ERROR_CORRUPT, label, "ZIP64 end record offset %" G_GUINT64_FORMAT " is invalid", z);
      return NULL;
    }
    n_entries = rd64 (base + z + 32);
    cd_size = rd64 (base + z + 40);
    cd_off = rd64 (base + z + 48);
  } else if (n_entries == 0xffff || cd_size == 0xffffffffu || cd_off == 0xffffffffu) {
    tp_fail (error, DIFFUSE_ERROR_CORRUPT, label, "ZIP64 values without a ZIP64 end record");
    return NULL;
  }
  if (cd_off > eocd || cd_size > eocd - cd_off) {
    tp_fail (error, DIFFUSE_ERROR_CORRUPT, label,
             "central directory [%" G_GUINT64_FORMAT ", +%" G_GUINT64_FORMAT "] is outside the file", cd_off, cd_size);
    return NULL;
  }
  /* each central entry is at least 46 bytes: bounds the count before any allocation */
  if (n_entries > cd_size / 46) {
    tp_fail (error, DIFFUSE_ERROR_CORRUPT, label,
             "%" G_GUINT64_FORMAT " entries cannot fit in a %" G_GUINT64_FORMAT "-byte central directory", n_entries,
             cd_size);
    return NULL;
  }

  GHashTable *recs = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  char *prefix = NULL;
  const guint8 *p = base + cd_off, *end = base + cd_off + cd_size;
  for (guint64 i = 0; i < n_entries; i++) {
    if (end - p < 46 || rd32 (p) != ZIP_CENTRAL_SIG) {
      tp_fail (error, DIFFUSE_ERROR_CORRUPT, label, "central directory entry %" G_GUINT64_FORMAT " is invalid", i);
      goto fail;
    }
    guint flags = rd16 (p + 8), method = rd16 (p + 10);
    guint64 csize = rd32 (p + 20), usize = rd32 (p + 24);
    guint nlen = rd16 (p + 28), xlen = rd16 (p + 30), clen = rd16 (p + 32);
    guint disk = rd16 (p + 34);
    guint64 loff = rd32 (p + 42);
    if ((size_t) (end - p) - 46 < (size_t) nlen + xlen + clen) {
      tp_fail (error, DIFFUSE_ERROR_CORRUPT, label, "central directory entry %" G_GUINT64_FORMAT " overruns it", i);
      goto fail;
    }
    const char *nm = (const char *) p + 46;
    if (nlen == 0 || memchr (nm, 0, nlen) || !g_utf8_validate_len (nm, nlen, NULL)) {
      tp_fail (error, DIFFUSE_ERROR_CORRUPT, label, "central directory entry %" G_GUINT64_FORMAT
               " has an invalid name", i);
      goto fail;
    }
    char *name = g_strndup (nm, nlen);
    /* ZIP64 extended information: the 0xffffffff fields, in this order */
    const guint8 *x = p + 46 + nlen, *xend = x + xlen;
    gboolean bad_extra = FALSE;
    while (xend - x >= 4) {
      guint id = rd16 (x), sz = rd16 (x + 2);
      if ((size_t) (xend - x) - 4 < sz) {
        bad_extra = TRUE;
        break;
      }
      if (id == 0x0001) {
        const guint8 *f = x + 4, *fend = x + 4 + sz;
        guint64 *want[3] = { usize == 0xffffffffu ? &usize : NULL, csize == 0xffffffffu ? &csize : NULL,
                             loff == 0xffffffffu ? &loff : NULL };
        for (int k = 0; k < 3; k++) {
          if (!want[k])
            continue;
          if (fend - f < 8) {
            bad_extra = TRUE;
            break;
          }
          *want[k] = rd64 (f);
          f += 8;
        }
      }
      x += 4 + sz;
    }
    if (bad_extra || usize == 0xffffffffu || csize == 0xffffffffu || loff == 0xffffffffu) {
      tp_fail (error, DIFFUSE_ERROR_CORRUPT, label, "entry %s: invalid ZIP64 extra field", name);
      g_free (name);
      goto fail;
    }
    if (flags & 0x41) {
      tp_fail (error, DIFFUSE_ERROR_UNSUPPORTED, label, "entry %s is encrypted", name);
      g_free (name);
      goto fail;
    }
    if (method != 0 || csize != usize) {
      tp_fail (error, DIFFUSE_ERROR_UNSUPPORTED, label,
               "entry %s is compressed (ZIP method %u); torch.save stores entries uncompressed", name, method);
      g_free (name);
      goto fail;
    }
    if (disk != 0) {
      tp_fail (error, DIFFUSE_ERROR_UNSUPPORTED, label, "entry %s is on another disk", name);
      g_free (name);
      goto fail;
    }
    /* the local header: its own name/extra lengths decide where the data starts */
    if (loff > cd_off || cd_off - loff < 30 || rd32 (base + loff) != ZIP_LOCAL_SIG) {
      tp_fail (error, DIFFUSE_ERROR_CORRUPT, label, "entry %s: local header at %" G_GUINT64_FORMAT " is invalid",
               name, loff);
      g_free (name);
      goto fail;
    }
    guint64 lnlen = rd16 (base + loff + 26), lxlen = rd16 (base + loff + 28);
    guint64 doff = loff + 30 + lnlen + lxlen;
    if (doff > cd_off || usize > cd_off - doff || lnlen != nlen || memcmp (base + loff + 30, nm, nlen) != 0) {
      tp_fail (error, DIFFUSE_ERROR_CORRUPT, label,
               "entry %s: data [%" G_GUINT64_FORMAT ", +%" G_GUINT64_FORMAT "] does not fit before the central "
               "directory, or the local header does not match", name, doff, usize);
      g_free (name);
      goto fail;
    }
    if (!prefix) {
      /* torch's reader: the archive name is the first entry's top folder */
      const char *slash = strchr (name, '/');
      if (!slash) {
        tp_fail (error, DIFFUSE_ERROR_CORRUPT, label, "first entry %s is not inside a folder", name);
        g_free (name);
        goto fail;
      }
      prefix = g_strndup (name, slash - name);
    }
    if (g_hash_table_contains (recs, name)) {
      tp_fail (error, DIFFUSE_ERROR_CORRUPT, label, "entry %s appears twice", name);
      g_free (name);
      goto fail;
    }
    ZipRecord *r = g_new (ZipRecord, 1);
    r->data = base + doff;
    r->size = usize;
    g_hash_table_insert (recs, name, r);
    p += 46 + nlen + xlen + clen;
  }
  if (!prefix) {
    tp_fail (error, DIFFUSE_ERROR_CORRUPT, label, "empty ZIP archive");
    goto fail;
  }
  *prefix_out = prefix;
  return recs;

fail:
  g_free (prefix);
  g_hash_table_unref (recs);
  return NULL;
}

/* ---- the pickle machine ---------------------------------------------------- */

typedef enum {
  PV_NONE, PV_BOOL, PV_INT, PV_FLOAT, PV_STR, PV_BYTES, PV_TUPLE, PV_LIST, PV_DICT, PV_GLOBAL, PV_STORAGE, PV_TENSOR,
} PvKind;

/* The globals a state dict may name (torch/_weights_only_unpickler.py). */
typedef enum {
  G_ORDERED_DICT,
  G_REBUILD_TENSOR_V2,
  G_REBUILD_PARAMETER,
  G_REBUILD_PARAMETER_WITH_STATE,
  G_STORAGE_TYPE,     /* + which dtype */
} GlobalId;

static const struct {
  const char *module, *name;
  GlobalId id;
  DiffuseStDType dtype;
} allowed_globals[] = {
  { "collections", "OrderedDict", G_ORDERED_DICT, 0 },
  { "torch._utils", "_rebuild_tensor_v2", G_REBUILD_TENSOR_V2, 0 },
  { "torch._utils", "_rebuild_parameter", G_REBUILD_PARAMETER, 0 },
  { "torch._utils", "_rebuild_parameter_with_state", G_REBUILD_PARAMETER_WITH_STATE, 0 },
  { "torch", "DoubleStorage", G_STORAGE_TYPE, DIFFUSE_ST_F64 },
  { "torch", "FloatStorage", G_STORAGE_TYPE, DIFFUSE_ST_F32 },
  { "torch", "HalfStorage", G_STORAGE_TYPE, DIFFUSE_ST_F16 },
  { "torch", "BFloat16Storage", G_STORAGE_TYPE, DIFFUSE_ST_BF16 },
  { "torch", "LongStorage", G_STORAGE_TYPE, DIFFUSE_ST_I64 },
  { "torch", "IntStorage", G_STORAGE_TYPE, DIFFUSE_ST_I32 },
  { "torch", "ShortStorage", G_STORAGE_TYPE, DIFFUSE_ST_I16 },
  { "torch", "CharStorage", G_STORAGE_TYPE, DIFFUSE_ST_I8 },
  { "torch", "ByteStorage", G_STORAGE_TYPE, DIFFUSE_ST_U8 },
  { "torch", "BoolStorage", G_STORAGE_TYPE, DIFFUSE_ST_BOOL },
  { "torch", "Float8_e4m3fnStorage", G_STORAGE_TYPE, DIFFUSE_ST_F8_E4M3 },
  { "torch", "Float8_e5m2Storage", G_STORAGE_TYPE, DIFFUSE_ST_F8_E5M2 },
};

typedef struct {
  char *key;
  DiffuseStDType dtype;
  guint64 numel;
  const guint8 *data;
} Storage;

typedef struct PVal PVal;
struct PVal {
  PvKind kind;
  union {
    gint64 i;                      /* BOOL, INT */
    double f;
    struct {
      char *s;                     /* NUL-terminated copy */
      size_t len;
    } str;                         /* STR, BYTES */
    GPtrArray *items;              /* TUPLE, LIST: PVal* (not owned) */
    struct {
      GPtrArray *keys, *vals;      /* insertion order, as a Python dict */
      GHashTable *index;           /* str key -> position + 1 */
    } dict;
    guint global;                  /* index in allowed_globals */
    Storage *storage;
    struct {
      Storage *st;
      gint64 offset;
      int ndim;
      gint64 shape[TP_MAX_DIMS], stride[TP_MAX_DIMS];
    } tensor;
  };
};

typedef struct {
  const char *label;
  const guint8 *pkl;
  size_t n, pos, op_pos;
  GHashTable *recs;                /* ZIP records */
  const char *prefix;
  GPtrArray *arena;                /* every PVal */
  GPtrArray *stack;
  GArray *marks;                   /* stack heights */
  GHashTable *memo;                /* guint -> PVal* */
  GHashTable *storages;            /* key -> Storage* */
  GError **error;
} Vm;

static void
pval_free (gpointer p)
{
  PVal *v = p;
  switch (v->kind) {
  case PV_STR:
  case PV_BYTES:
    g_free (v->str.s);
    break;
  case PV_TUPLE:
  case PV_LIST:
    g_ptr_array_unref (v->items);
    break;
  case PV_DICT:
    g_ptr_array_unref (v->dict.keys);
    g_ptr_array_unref (v->dict.vals);
    g_hash_table_unref (v->dict.index);
    break;
  default:
    break;
  }
  g_free (v);
}

static void
storage_free (gpointer p)
{
  Storage *s = p;
  g_free (s->key);
  g_free (s);
}

static gboolean vm_fail (Vm *vm, int code, const char *fmt, ...) G_GNUC_PRINTF (3, 4);

static gboolean
vm_fail (Vm *vm, int code, const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  char *msg = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  tp_fail (vm->error, code, vm->label, "%s (%s/data.pkl, byte %zu)", msg, vm->prefix, vm->op_pos);
  g_free (msg);
  return FALSE;
}

static PVal *
pv_new (Vm *vm, PvKind kind)
{
  PVal *v = g_new0 (PVal, 1);
  v->kind = kind;
  if (kind == PV_TUPLE || kind == PV_LIST)
    v->items = g_ptr_array_new ();
  else if (kind == PV_DICT) {
    v->dict.keys = g_ptr_array_new ();
    v->dict.vals = g_ptr_array_new ();
    v->dict.index = g_hash_table_new (g_str_hash, g_str_equal);
  }
  g_ptr_array_add (vm->arena, v);
  return v;
}

static const char *
kind_name (PvKind k)
{
  static const char *names[] = { "None", "bool", "int", "float", "str", "bytes", "tuple", "list", "dict",
                                 "global", "storage", "tensor" };
  return names[k];
}

static gboolean
need (Vm *vm, size_t k)
{
  if (vm->n - vm->pos < k)
    return vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "pickle ends inside an opcode's argument (truncated)");
  return TRUE;
}

static void
push (Vm *vm, PVal *v)
{
  g_ptr_array_add (vm->stack, v);
}

/* The height of the stack above the last mark (without popping it). */
static gboolean
mark_base (Vm *vm, guint *base)
{
  if (vm->marks->len == 0)
    return vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "no MARK on the stack");
  *base = g_array_index (vm->marks, guint, vm->marks->len - 1);
  if (*base > vm->stack->len)
    return vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "MARK above the stack");
  return TRUE;
}

static PVal *
pop (Vm *vm)
{
  guint floor = vm->marks->len ? g_array_index (vm->marks, guint, vm->marks->len - 1) : 0;
  if (vm->stack->len <= floor) {
    vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "stack underflow");
    return NULL;
  }
  return g_ptr_array_steal_index (vm->stack, vm->stack->len - 1);
}

static PVal *
top (Vm *vm)
{
  guint floor = vm->marks->len ? g_array_index (vm->marks, guint, vm->marks->len - 1) : 0;
  if (vm->stack->len <= floor) {
    vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "stack underflow");
    return NULL;
  }
  return g_ptr_array_index (vm->stack, vm->stack->len - 1);
}

static gboolean
dict_set (Vm *vm, PVal *d, PVal *k, PVal *v)
{
  if (d->kind != PV_DICT)
    return vm_fail (vm, DIFFUSE_ERROR_UNSUPPORTED, "SETITEM on a %s, not a dict", kind_name (d->kind));
  if (k->kind == PV_STR) {
    gpointer pos = g_hash_table_lookup (d->dict.index, k->str.s);
    if (pos) {   /* d[k] = v again: the later value wins, the first position stays */
      g_ptr_array_index (d->dict.vals, GPOINTER_TO_UINT (pos) - 1) = v;
      return TRUE;
    }
    g_hash_table_insert (d->dict.index, k->str.s, GUINT_TO_POINTER (d->dict.keys->len + 1));
  }
  g_ptr_array_add (d->dict.keys, k);
  g_ptr_array_add (d->dict.vals, v);
  return TRUE;
}

/* A string argument: validated UTF-8, copied (NUL bytes are kept in len). */
static PVal *
read_str (Vm *vm, size_t len, gboolean bytes)
{
  if (!need (vm, len))
    return NULL;
  const char *s = (const char *) vm->pkl + vm->pos;
  if (!bytes && !g_utf8_validate_len (s, len, NULL)) {
    vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "string is not valid UTF-8");
    return NULL;
  }
  PVal *v = pv_new (vm, bytes ? PV_BYTES : PV_STR);
  v->str.s = g_strndup (s, len);
  v->str.len = len;
  vm->pos += len;
  return v;
}

/* A text line (GLOBAL's module and name) without the newline. */
static char *
read_line (Vm *vm)
{
  const guint8 *nl = memchr (vm->pkl + vm->pos, '\n', vm->n - vm->pos);
  if (!nl) {
    vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "pickle ends inside a GLOBAL (truncated)");
    return NULL;
  }
  size_t len = (size_t) (nl - (vm->pkl + vm->pos));
  const char *s = (const char *) vm->pkl + vm->pos;
  if (memchr (s, 0, len) || !g_utf8_validate_len (s, len, NULL)) {
    vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "GLOBAL name is not valid text");
    return NULL;
  }
  vm->pos += len + 1;
  return g_strndup (s, len);
}

static gboolean
push_global (Vm *vm, const char *module, const char *name)
{
  for (guint i = 0; i < G_N_ELEMENTS (allowed_globals); i++)
    if (strcmp (allowed_globals[i].module, module) == 0 && strcmp (allowed_globals[i].name, name) == 0) {
      PVal *v = pv_new (vm, PV_GLOBAL);
      v->global = i;
      push (vm, v);
      return TRUE;
    }
  /* never imported, never called: only these names build a state dict */
  return vm_fail (vm, DIFFUSE_ERROR_UNSUPPORTED,
                  "the pickle refers to the global %s.%s, which is not allowed (checkpoints are read without "
                  "executing anything, as torch.load(weights_only=True) reads them; only state dicts of tensors "
                  "are accepted)", module, name);
}

static gboolean
as_int (Vm *vm, PVal *v, const char *what, gint64 *out)
{
  if (!v || (v->kind != PV_INT && v->kind != PV_BOOL))
    return vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "%s is a %s, not an int", what, v ? kind_name (v->kind) : "?");
  *out = v->i;
  return TRUE;
}

/* persistent_load: ('storage', <storage class>, key, location, numel) */
static PVal *
persistent_load (Vm *vm, PVal *pid)
{
  if (pid->kind != PV_TUPLE || pid->items->len != 5) {
    vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "persistent id is not a 5-tuple ('storage', type, key, location, numel)");
    return NULL;
  }
  PVal **it = (PVal **) pid->items->pdata;
  if (it[0]->kind != PV_STR || strcmp (it[0]->str.s, "storage") != 0) {
    vm_fail (vm, DIFFUSE_ERROR_UNSUPPORTED, "persistent id of an unknown kind (not 'storage')");
    return NULL;
  }
  if (it[1]->kind != PV_GLOBAL || allowed_globals[it[1]->global].id != G_STORAGE_TYPE) {
    vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "persistent id names no storage type");
    return NULL;
  }
  if (it[2]->kind != PV_STR || it[3]->kind != PV_STR) {
    vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "persistent id: storage key or location is not a string");
    return NULL;
  }
  gint64 numel = 0;
  if (!as_int (vm, it[4], "storage numel", &numel))
    return NULL;
  DiffuseStDType dt = allowed_globals[it[1]->global].dtype;
  const char *key = it[2]->str.s;
  if (numel < 0 || strlen (key) != it[2]->str.len) {
    vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "storage %s: invalid key or size", key);
    return NULL;
  }
  Storage *s = g_hash_table_lookup (vm->storages, key);
  if (s) {
    if (s->dtype != dt || s->numel != (guint64) numel) {
      vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "storage %s is used as two types or sizes", key);
      return NULL;
    }
  } else {
    char *rname = g_strdup_printf ("%s/data/%s", vm->prefix, key);
    ZipRecord *r = g_hash_table_lookup (vm->recs, rname);
    g_free (rname);
    guint64 nbytes;
    if (!r) {
      vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "storage %s: no record %s/data/%s in the archive", key, vm->prefix, key);
      return NULL;
    }
    if (__builtin_mul_overflow ((guint64) numel, (guint64) _diffuse_st_dtype_size (dt), &nbytes) || nbytes != r->size) {
      vm_fail (vm, DIFFUSE_ERROR_CORRUPT,
               "storage %s: %" G_GINT64_FORMAT " elements of %s do not match its record of %" G_GUINT64_FORMAT
               " bytes", key, numel, diffuse_st_dtype_name (dt), r->size);
      return NULL;
    }
    s = g_new0 (Storage, 1);
    s->key = g_strdup (key);
    s->dtype = dt;
    s->numel = (guint64) numel;
    s->data = r->data;
    g_hash_table_insert (vm->storages, s->key, s);
  }
  PVal *v = pv_new (vm, PV_STORAGE);
  v->storage = s;
  return v;
}

/* An int tuple (size or stride) into out[]. */
static gboolean
int_tuple (Vm *vm, PVal *t, const char *what, gint64 *out, int *n)
{
  if (t->kind != PV_TUPLE)
    return vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "tensor %s is a %s, not a tuple", what, kind_name (t->kind));
  if (t->items->len > TP_MAX_DIMS)
    return vm_fail (vm, DIFFUSE_ERROR_UNSUPPORTED, "tensor with %u dimensions (at most %d)", t->items->len,
                    TP_MAX_DIMS);
  for (guint i = 0; i < t->items->len; i++)
    if (!as_int (vm, g_ptr_array_index (t->items, i), what, &out[i]))
      return FALSE;
  *n = (int) t->items->len;
  return TRUE;
}

/* REDUCE: callable(*args) for the allowed callables only. */
static PVal *
call_global (Vm *vm, PVal *fn, PVal *args)
{
  if (fn->kind != PV_GLOBAL) {
    vm_fail (vm, DIFFUSE_ERROR_UNSUPPORTED, "REDUCE calls a %s", kind_name (fn->kind));
    return NULL;
  }
  const char *fname = allowed_globals[fn->global].name;
  if (args->kind != PV_TUPLE) {
    vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "REDUCE arguments of %s are not a tuple", fname);
    return NULL;
  }
  PVal **a = (PVal **) args->items->pdata;
  guint na = args->items->len;
  switch (allowed_globals[fn->global].id) {
  case G_ORDERED_DICT:
    if (na != 0) {
      vm_fail (vm, DIFFUSE_ERROR_UNSUPPORTED, "OrderedDict built with arguments");
      return NULL;
    }
    return pv_new (vm, PV_DICT);
  case G_REBUILD_TENSOR_V2: {
    /* (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata]) */
    if (na != 6 && na != 7) {
      vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "_rebuild_tensor_v2 with %u arguments", na);
      return NULL;
    }
    if (a[0]->kind != PV_STORAGE) {
      vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "_rebuild_tensor_v2 of a %s, not a storage", kind_name (a[0]->kind));
      return NULL;
    }
    PVal *t = pv_new (vm, PV_TENSOR);
    int nstride = 0;
    t->tensor.st = a[0]->storage;
    if (!as_int (vm, a[1], "storage offset", &t->tensor.offset) ||
        !int_tuple (vm, a[2], "size", t->tensor.shape, &t->tensor.ndim) ||
        !int_tuple (vm, a[3], "stride", t->tensor.stride, &nstride))
      return NULL;
    if (nstride != t->tensor.ndim) {
      vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "tensor size and stride have different lengths");
      return NULL;
    }
    return t;
  }
  case G_REBUILD_PARAMETER:
  case G_REBUILD_PARAMETER_WITH_STATE:
    /* (data, requires_grad, backward_hooks[, state]): the tensor itself */
    if (na < 1 || a[0]->kind != PV_TENSOR || na != (allowed_globals[fn->global].id == G_REBUILD_PARAMETER ? 3u : 4u)) {
      vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "%s with invalid arguments", fname);
      return NULL;
    }
    return a[0];
  case G_STORAGE_TYPE:
  default:
    vm_fail (vm, DIFFUSE_ERROR_UNSUPPORTED, "REDUCE calls %s.%s", allowed_globals[fn->global].module, fname);
    return NULL;
  }
}

/* Little-endian two's complement of n bytes (LONG1/LONG4) into an int64. */
static gboolean
read_long (Vm *vm, size_t n, gint64 *out)
{
  if (!need (vm, n))
    return FALSE;
  const guint8 *b = vm->pkl + vm->pos;
  if (n > 8) {
    /* larger encodings are fine if they are sign extensions */
    guint8 ext = (b[n - 1] & 0x80) ? 0xff : 0;
    for (size_t i = 8; i < n; i++)
      if (b[i] != ext || ((b[7] & 0x80) ? 0xff : 0) != ext)
        return vm_fail (vm, DIFFUSE_ERROR_UNSUPPORTED, "integer of %zu bytes does not fit in 64 bits", n);
  }
  guint64 v = 0;
  size_t k = MIN (n, (size_t) 8);
  for (size_t i = 0; i < k; i++)
    v |= (guint64) b[i] << (8 * i);
  if (k > 0 && k < 8 && (b[k - 1] & 0x80))
    v |= ~(guint64) 0 << (8 * k);   /* sign-extend */
  *out = (gint64) v;
  vm->pos += n;
  return TRUE;
}

/* Runs data.pkl; returns the object STOP leaves (owned by the arena). */
static PVal *
vm_run (Vm *vm)
{
  while (TRUE) {
    if (vm->pos >= vm->n) {
      vm->op_pos = vm->pos;
      vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "pickle ends without STOP (truncated)");
      return NULL;
    }
    vm->op_pos = vm->pos;
    guint8 op = vm->pkl[vm->pos++];
    switch (op) {
    case 0x80:   /* PROTO */
      if (!need (vm, 1))
        return NULL;
      if (vm->pkl[vm->pos] > 5) {
        vm_fail (vm, DIFFUSE_ERROR_UNSUPPORTED, "pickle protocol %u", vm->pkl[vm->pos]);
        return NULL;
      }
      vm->pos++;
      break;
    case 0x95:   /* FRAME (protocol 4): only a length hint */
      if (!need (vm, 8))
        return NULL;
      vm->pos += 8;
      break;
    case '.':    /* STOP: the top of the stack (anything below is ignored, as by Python) */
      return pop (vm);
    case '(':    /* MARK */
      g_array_append_val (vm->marks, vm->stack->len);
      break;
    case '0':    /* POP */
      if (!pop (vm))
        return NULL;
      break;
    case '1': {  /* POP_MARK */
      guint base = 0;
      if (!mark_base (vm, &base))
        return NULL;
      g_ptr_array_set_size (vm->stack, base);
      g_array_set_size (vm->marks, vm->marks->len - 1);
      break;
    }
    case '2': {  /* DUP */
      PVal *v = top (vm);
      if (!v)
        return NULL;
      push (vm, v);
      break;
    }
    case 'N':
      push (vm, pv_new (vm, PV_NONE));
      break;
    case 0x88:   /* NEWTRUE */
    case 0x89: { /* NEWFALSE */
      PVal *v = pv_new (vm, PV_BOOL);
      v->i = op == 0x88;
      push (vm, v);
      break;
    }
    case 'J':    /* BININT */
    case 'K':    /* BININT1 */
    case 'M': {  /* BININT2 */
      size_t k = op == 'J' ? 4 : op == 'K' ? 1 : 2;
      if (!need (vm, k))
        return NULL;
      const guint8 *b = vm->pkl + vm->pos;
      PVal *v = pv_new (vm, PV_INT);
      v->i = op == 'J' ? (gint64) (gint32) rd32 (b) : op == 'K' ? b[0] : rd16 (b);
      vm->pos += k;
      push (vm, v);
      break;
    }
    case 0x8a:   /* LONG1 */
    case 0x8b: { /* LONG4 */
      size_t n;
      if (op == 0x8a) {
        if (!need (vm, 1))
          return NULL;
        n = vm->pkl[vm->pos++];
      } else {
        if (!need (vm, 4))
          return NULL;
        n = rd32 (vm->pkl + vm->pos);
        vm->pos += 4;
      }
      PVal *v = pv_new (vm, PV_INT);
      if (!read_long (vm, n, &v->i))
        return NULL;
      push (vm, v);
      break;
    }
    case 'G': {  /* BINFLOAT: big-endian double */
      if (!need (vm, 8))
        return NULL;
      guint64 bits = 0;
      for (int i = 0; i < 8; i++)
        bits = (bits << 8) | vm->pkl[vm->pos + i];
      vm->pos += 8;
      PVal *v = pv_new (vm, PV_FLOAT);
      memcpy (&v->f, &bits, 8);
      push (vm, v);
      break;
    }
    case 'X':    /* BINUNICODE */
    case 0x8c:   /* SHORT_BINUNICODE */
    case 'T':    /* BINSTRING (protocol 1 str, decoded as UTF-8 as torch.load does) */
    case 'U':    /* SHORT_BINSTRING */
    case 'B':    /* BINBYTES */
    case 'C': {  /* SHORT_BINBYTES */
      gboolean shortlen = op == 0x8c || op == 'U' || op == 'C';
      size_t len;
      if (!need (vm, shortlen ? 1 : 4))
        return NULL;
      len = shortlen ? vm->pkl[vm->pos] : rd32 (vm->pkl + vm->pos);
      vm->pos += shortlen ? 1 : 4;
      PVal *v = read_str (vm, len, op == 'B' || op == 'C');
      if (!v)
        return NULL;
      push (vm, v);
      break;
    }
    case ')':
      push (vm, pv_new (vm, PV_TUPLE));
      break;
    case ']':
      push (vm, pv_new (vm, PV_LIST));
      break;
    case '}':
      push (vm, pv_new (vm, PV_DICT));
      break;
    case 't': {  /* TUPLE: items above the mark */
      guint base = 0;
      if (!mark_base (vm, &base))
        return NULL;
      PVal *t = pv_new (vm, PV_TUPLE);
      for (guint i = base; i < vm->stack->len; i++)
        g_ptr_array_add (t->items, g_ptr_array_index (vm->stack, i));
      g_ptr_array_set_size (vm->stack, base);
      g_array_set_size (vm->marks, vm->marks->len - 1);
      push (vm, t);
      break;
    }
    case 0x85:   /* TUPLE1 */
    case 0x86:   /* TUPLE2 */
    case 0x87: { /* TUPLE3 */
      guint k = op - 0x84;
      PVal *it[3];
      for (guint i = 0; i < k; i++)
        if (!(it[k - 1 - i] = pop (vm)))
          return NULL;
      PVal *t = pv_new (vm, PV_TUPLE);
      for (guint i = 0; i < k; i++)
        g_ptr_array_add (t->items, it[i]);
      push (vm, t);
      break;
    }
    case 'a': {  /* APPEND */
      PVal *v = pop (vm), *l = v ? top (vm) : NULL;
      if (!l)
        return NULL;
      if (l->kind != PV_LIST) {
        vm_fail (vm, DIFFUSE_ERROR_UNSUPPORTED, "APPEND to a %s", kind_name (l->kind));
        return NULL;
      }
      g_ptr_array_add (l->items, v);
      break;
    }
    case 'e': {  /* APPENDS */
      guint base = 0;
      if (!mark_base (vm, &base))
        return NULL;
      if (base == 0) {
        vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "APPENDS without a list");
        return NULL;
      }
      PVal *l = g_ptr_array_index (vm->stack, base - 1);
      if (l->kind != PV_LIST) {
        vm_fail (vm, DIFFUSE_ERROR_UNSUPPORTED, "APPENDS to a %s", kind_name (l->kind));
        return NULL;
      }
      for (guint i = base; i < vm->stack->len; i++)
        g_ptr_array_add (l->items, g_ptr_array_index (vm->stack, i));
      g_ptr_array_set_size (vm->stack, base);
      g_array_set_size (vm->marks, vm->marks->len - 1);
      break;
    }
    case 's': {  /* SETITEM */
      PVal *v = pop (vm), *k = v ? pop (vm) : NULL, *d = k ? top (vm) : NULL;
      if (!d || !dict_set (vm, d, k, v))
        return NULL;
      break;
    }
    case 'u': {  /* SETITEMS */
      guint base = 0;
      if (!mark_base (vm, &base))
        return NULL;
      if (base == 0 || (vm->stack->len - base) % 2) {
        vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "SETITEMS without a dict or with an odd number of items");
        return NULL;
      }
      PVal *d = g_ptr_array_index (vm->stack, base - 1);
      for (guint i = base; i < vm->stack->len; i += 2)
        if (!dict_set (vm, d, g_ptr_array_index (vm->stack, i), g_ptr_array_index (vm->stack, i + 1)))
          return NULL;
      g_ptr_array_set_size (vm->stack, base);
      g_array_set_size (vm->marks, vm->marks->len - 1);
      break;
    }
    case 'q':    /* BINPUT */
    case 'r':    /* LONG_BINPUT */
    case 0x94: { /* MEMOIZE */
      guint idx;
      if (op == 'q') {
        if (!need (vm, 1))
          return NULL;
        idx = vm->pkl[vm->pos++];
      } else if (op == 'r') {
        if (!need (vm, 4))
          return NULL;
        idx = rd32 (vm->pkl + vm->pos);
        vm->pos += 4;
      } else {
        idx = g_hash_table_size (vm->memo);
      }
      PVal *v = top (vm);
      if (!v)
        return NULL;
      g_hash_table_insert (vm->memo, GUINT_TO_POINTER (idx), v);
      break;
    }
    case 'h':    /* BINGET */
    case 'j': {  /* LONG_BINGET */
      guint idx;
      size_t k = op == 'h' ? 1 : 4;
      if (!need (vm, k))
        return NULL;
      idx = op == 'h' ? vm->pkl[vm->pos] : rd32 (vm->pkl + vm->pos);
      vm->pos += k;
      PVal *v = g_hash_table_lookup (vm->memo, GUINT_TO_POINTER (idx));
      if (!v) {
        vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "memo entry %u was never stored", idx);
        return NULL;
      }
      push (vm, v);
      break;
    }
    case 'c': {  /* GLOBAL "module\nname\n" */
      char *module = read_line (vm);
      char *name = module ? read_line (vm) : NULL;
      gboolean ok = name && push_global (vm, module, name);
      g_free (module);
      g_free (name);
      if (!ok)
        return NULL;
      break;
    }
    case 0x93: { /* STACK_GLOBAL (protocol 4) */
      PVal *name = pop (vm), *module = name ? pop (vm) : NULL;
      if (!module)
        return NULL;
      if (name->kind != PV_STR || module->kind != PV_STR || strlen (name->str.s) != name->str.len ||
          strlen (module->str.s) != module->str.len) {
        vm_fail (vm, DIFFUSE_ERROR_CORRUPT, "STACK_GLOBAL of non-strings");
        return NULL;
      }
      if (!push_global (vm, module->str.s, name->str.s))
        return NULL;
      break;
    }
    case 'Q': {  /* BINPERSID */
      PVal *pid = pop (vm), *s = pid ? persistent_load (vm, pid) : NULL;
      if (!s)
        return NULL;
      push (vm, s);
      break;
    }
    case 'R': {  /* REDUCE */
      PVal *args = pop (vm), *fn = args ? pop (vm) : NULL;
      PVal *r = fn ? call_global (vm, fn, args) : NULL;
      if (!r)
        return NULL;
      push (vm, r);
      break;
    }
    case 'b': {  /* BUILD: an OrderedDict's __dict__ (a state dict's _metadata) is ignored */
      PVal *state = pop (vm), *obj = state ? top (vm) : NULL;
      if (!obj)
        return NULL;
      if (obj->kind != PV_DICT) {
        vm_fail (vm, DIFFUSE_ERROR_UNSUPPORTED, "BUILD on a %s", kind_name (obj->kind));
        return NULL;
      }
      break;
    }
    default:
      vm_fail (vm, DIFFUSE_ERROR_UNSUPPORTED, "pickle opcode 0x%02x is not supported (not one torch.save writes "
               "for a state dict)", op);
      return NULL;
    }
  }
}

/* ---- flattening into entries ----------------------------------------------- */

typedef struct {
  const char *label;
  GArray *entries;        /* DiffuseStEntry */
  GHashTable *names;      /* owned by entries */
  guint64 budget;         /* dict items left to visit */
  GError **error;
} Flat;

static gboolean
add_tensor (Flat *fl, const char *name, PVal *t)
{
  const Storage *s = t->tensor.st;
  guint esz = _diffuse_st_dtype_size (s->dtype);
  int nd = t->tensor.ndim;
  guint64 numel = 1;
  for (int d = 0; d < nd; d++) {
    if (t->tensor.shape[d] < 0)
      return tp_fail (fl->error, DIFFUSE_ERROR_CORRUPT, fl->label, "tensor \"%s\": negative size", name);
    if (__builtin_mul_overflow (numel, (guint64) t->tensor.shape[d], &numel))
      return tp_fail (fl->error, DIFFUSE_ERROR_CORRUPT, fl->label, "tensor \"%s\": element count overflows", name);
  }
  if (t->tensor.offset < 0)
    return tp_fail (fl->error, DIFFUSE_ERROR_CORRUPT, fl->label, "tensor \"%s\": negative storage offset", name);
  guint64 last;
  if (__builtin_add_overflow ((guint64) t->tensor.offset, numel, &last) || last > s->numel)
    return tp_fail (fl->error, DIFFUSE_ERROR_CORRUPT, fl->label,
                    "tensor \"%s\": elements [%" G_GINT64_FORMAT ", +%" G_GUINT64_FORMAT "] lie outside storage %s of "
                    "%" G_GUINT64_FORMAT " elements", name, t->tensor.offset, numel, s->key, s->numel);
  if (numel > 0) {
    /* contiguous: each stride is the product of the later sizes (dims of
     * size 1 may have any stride, as torch's is_contiguous) */
    gint64 want = 1;
    for (int d = nd - 1; d >= 0; d--) {
      if (t->tensor.shape[d] != 1 && t->tensor.stride[d] != want) {
        GString *sz = g_string_new (NULL), *st = g_string_new (NULL);
        for (int k = 0; k < nd; k++) {
          g_string_append_printf (sz, "%s%" G_GINT64_FORMAT, k ? ", " : "", t->tensor.shape[k]);
          g_string_append_printf (st, "%s%" G_GINT64_FORMAT, k ? ", " : "", t->tensor.stride[k]);
        }
        tp_fail (fl->error, DIFFUSE_ERROR_UNSUPPORTED, fl->label,
                 "tensor \"%s\" is not contiguous (size [%s], stride [%s]); save it after .contiguous()", name,
                 sz->str, st->str);
        g_string_free (sz, TRUE);
        g_string_free (st, TRUE);
        return FALSE;
      }
      want *= t->tensor.shape[d];   /* <= numel, inside the storage: no overflow */
    }
  }
  if (g_hash_table_contains (fl->names, name))
    return tp_fail (fl->error, DIFFUSE_ERROR_CORRUPT, fl->label, "two tensors are named \"%s\" once flattened",
                    name);
  DiffuseStEntry e;
  memset (&e, 0, sizeof e);
  e.name = g_strdup (name);
  e.dtype = s->dtype;
  e.ndim = nd;
  for (int d = 0; d < nd; d++)
    e.shape[d] = t->tensor.shape[d];
  /* numel == 0: a valid pointer at the storage start (offset may equal numel) */
  e.data = s->data + (numel ? (size_t) t->tensor.offset * esz : 0);
  e.nbytes = (size_t) (numel * esz);
  g_array_append_val (fl->entries, e);
  g_hash_table_add (fl->names, (gpointer) e.name);
  return TRUE;
}

static gboolean
flatten (Flat *fl, PVal *d, const char *prefix, int depth)
{
  if (depth > TP_MAX_NEST)
    return tp_fail (fl->error, DIFFUSE_ERROR_UNSUPPORTED, fl->label, "dicts nested more than %d deep at \"%s\"",
                    TP_MAX_NEST, prefix);
  for (guint i = 0; i < d->dict.keys->len; i++) {
    PVal *k = g_ptr_array_index (d->dict.keys, i), *v = g_ptr_array_index (d->dict.vals, i);
    /* the memo can make one dict the value of many keys at every level: a
     * DAG whose paths grow exponentially; a real state dict is a tree */
    if (fl->budget-- == 0)
      return tp_fail (fl->error, DIFFUSE_ERROR_UNSUPPORTED, fl->label,
                      "the same dicts are reused under too many names (at \"%s\")", *prefix ? prefix : "(top)");
    char *ks;
    if (k->kind == PV_STR) {
      if (strlen (k->str.s) != k->str.len)
        return tp_fail (fl->error, DIFFUSE_ERROR_UNSUPPORTED, fl->label, "a key holds a NUL character");
      ks = g_strdup (k->str.s);
    } else if (k->kind == PV_INT) {
      ks = g_strdup_printf ("%" G_GINT64_FORMAT, k->i);
    } else {
      continue;   /* not a name: cannot hold weights we look up */
    }
    char *name = *prefix ? g_strdup_printf ("%s.%s", prefix, ks) : g_strdup (ks);
    g_free (ks);
    gboolean ok = TRUE;
    if (v->kind == PV_TENSOR)
      ok = add_tensor (fl, name, v);
    else if (v->kind == PV_DICT)
      ok = flatten (fl, v, name, depth + 1);
    g_free (name);
    if (!ok)
      return FALSE;
  }
  return TRUE;
}

/* ---- entry point ------------------------------------------------------------ */

gboolean
_diffuse_torch_pickle_parse (const char *label, const guint8 *base, size_t len, DiffuseStEntry **entries_out,
                             guint *n_entries_out, guint64 *data_bytes_out, GError **error)
{
  char *prefix = NULL;
  GHashTable *recs = zip_read (label, base, len, &prefix, error);
  if (!recs)
    return FALSE;

  gboolean ok = FALSE;
  char *bo_name = g_strdup_printf ("%s/byteorder", prefix);
  char *pkl_name = g_strdup_printf ("%s/data.pkl", prefix);
  ZipRecord *bo = g_hash_table_lookup (recs, bo_name);
  ZipRecord *pkl = g_hash_table_lookup (recs, pkl_name);
  Vm vm = { .label = label, .recs = recs, .prefix = prefix, .error = error };
  Flat fl = { .label = label, .error = error };
  if (bo && !(bo->size == 6 && memcmp (bo->data, "little", 6) == 0)) {
    tp_fail (error, DIFFUSE_ERROR_UNSUPPORTED, label, "%s is \"%.*s\": only little-endian checkpoints are read",
             bo_name, (int) MIN (bo->size, 16), (const char *) bo->data);
    goto out;
  }
  if (!pkl) {
    tp_fail (error, DIFFUSE_ERROR_CORRUPT, label, "no %s in the archive (not a torch.save file?)", pkl_name);
    goto out;
  }
  vm.pkl = pkl->data;
  vm.n = (size_t) pkl->size;
  vm.arena = g_ptr_array_new_with_free_func (pval_free);
  vm.stack = g_ptr_array_new ();
  vm.marks = g_array_new (FALSE, FALSE, sizeof (guint));
  vm.memo = g_hash_table_new (g_direct_hash, g_direct_equal);
  vm.storages = g_hash_table_new_full (g_str_hash, g_str_equal, NULL, storage_free);
  PVal *result = vm_run (&vm);
  if (!result)
    goto out;
  if (result->kind != PV_DICT) {
    tp_fail (error, DIFFUSE_ERROR_UNSUPPORTED, label, "the checkpoint holds a %s, not a dict of tensors",
             kind_name (result->kind));
    goto out;
  }
  fl.entries = g_array_new (FALSE, TRUE, sizeof (DiffuseStEntry));
  fl.names = g_hash_table_new (g_str_hash, g_str_equal);
  fl.budget = 2 * (guint64) vm.arena->len + 16;
  if (!flatten (&fl, result, "", 0))
    goto out;

  guint64 bytes = 0;
  GHashTableIter it;
  gpointer v;
  g_hash_table_iter_init (&it, vm.storages);
  while (g_hash_table_iter_next (&it, NULL, &v)) {
    Storage *s = v;
    bytes += s->numel * _diffuse_st_dtype_size (s->dtype);
  }
  *data_bytes_out = bytes;
  *n_entries_out = fl.entries->len;
  *entries_out = (DiffuseStEntry *) g_array_free (fl.entries, FALSE);
  fl.entries = NULL;
  ok = TRUE;

out:
  if (fl.entries) {
    for (guint i = 0; i < fl.entries->len; i++)
      g_free ((char *) g_array_index (fl.entries, DiffuseStEntry, i).name);
    g_array_free (fl.entries, TRUE);
  }
  if (fl.names)
    g_hash_table_unref (fl.names);
  if (vm.arena) {
    g_ptr_array_unref (vm.stack);
    g_array_free (vm.marks, TRUE);
    g_hash_table_unref (vm.memo);
    g_hash_table_unref (vm.storages);
    g_ptr_array_unref (vm.arena);
  }
  g_free (bo_name);
  g_free (pkl_name);
  g_free (prefix);
  g_hash_table_unref (recs);
  return ok;
}
