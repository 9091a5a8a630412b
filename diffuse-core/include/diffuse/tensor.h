/* gst-diffuse — tensors and the operations SD-family models need.
 *
 * A DiffuseTensor is a refcounted view (shape, strides in elements, dtype,
 * byte offset) on a refcounted DiffuseStorage that lives on one
 * DiffuseDevice.  Storage is either owned (allocated by the device's
 * backend, counted in its resident/peak bytes) or borrowed (for instance a
 * range of an mmap'd safetensors file, kept alive by a release callback).
 *
 * Operations are functions that return a new tensor (or NULL).  Error
 * convention, as in a graph library without a graph:
 *   - a NULL input makes an op return NULL at once (failures propagate);
 *   - a runtime failure (out of memory, device error) returns NULL and
 *     records a GError on the calling thread, fetched with
 *     diffuse_tensor_take_error ();
 *   - a shape/dtype mismatch is a programmer error: g_critical + NULL.
 * So model code can chain ops and check once at the end.
 *
 * Which backend runs an op is decided by the device of its first tensor
 * input; nothing above tensor/ needs to know. */
#pragma once

#include <glib.h>
#include <stdint.h>
#include <stddef.h>
#include <stdbool.h>

G_BEGIN_DECLS

#define DIFFUSE_MAX_DIMS 5

typedef enum {
  DIFFUSE_DTYPE_F32 = 0,
  DIFFUSE_DTYPE_F16,
  DIFFUSE_DTYPE_BF16,
  DIFFUSE_DTYPE_N
} DiffuseDType;

const char *diffuse_dtype_name (DiffuseDType dt);       /* "float32", "float16", "bfloat16" */
size_t diffuse_dtype_size (DiffuseDType dt);
/* Accepts "f32"/"fp32"/"float32"/"float", "f16"/"fp16"/"float16"/"half",
 * "bf16"/"bfloat16" (also with a "torch." prefix). */
gboolean diffuse_dtype_from_string (const char *s, DiffuseDType *out);

typedef struct _DiffuseDevice DiffuseDevice;
typedef struct _DiffuseStorage DiffuseStorage;
typedef struct _DiffuseTensor DiffuseTensor;

/* ---- devices ---------------------------------------------------------- */

/* The process-wide CPU device (never NULL, never freed). */
DiffuseDevice *diffuse_device_cpu (void);
/* "cpu", "auto", "cuda", "cuda:N".  "auto" picks the first accelerator when
 * one is usable, else the CPU (logging once why). */
DiffuseDevice *diffuse_device_get (const char *name, GError **error);
const char *diffuse_device_name (DiffuseDevice *dev);   /* "cpu", "cuda:0" */
gboolean diffuse_device_is_cpu (DiffuseDevice *dev);

typedef struct {
  guint64 resident_bytes;    /* owned storage alive now */
  guint64 peak_bytes;        /* high-water mark of resident_bytes */
  guint64 borrowed_bytes;    /* storage borrowed from files (mmap), alive now */
  guint64 n_allocs;          /* owned allocations made so far */
} DiffuseMemStats;

void diffuse_device_get_mem_stats (DiffuseDevice *dev, DiffuseMemStats *out);

/* Closes every accelerator device this process opened: cached device memory,
 * streams and library handles go back to the driver (for leak checkers such
 * as compute-sanitizer, and hosts that unload the library).  Call it when
 * every tensor is freed; a device still holding tensors stays open, with a
 * warning naming it and its bytes, and the call returns FALSE.  The
 * DiffuseDevice pointers of closed devices are invalid afterwards; a later
 * diffuse_device_get() opens the device afresh.  The CPU device is unaffected. */
gboolean diffuse_devices_shutdown (void);
void diffuse_device_reset_peak (DiffuseDevice *dev);

/* Number of CPU threads used by the CPU backend (0 = all cores). */
void diffuse_cpu_set_threads (int n);
int diffuse_cpu_get_threads (void);

/* ---- storage & tensors ------------------------------------------------ */

typedef void (*DiffuseReleaseFunc) (gpointer user_data);

struct _DiffuseTensor {
  /*< private >*/
  gint ref_count;
  /*< public, read-only >*/
  DiffuseDType dtype;
  int ndim;
  int64_t shape[DIFFUSE_MAX_DIMS];
  int64_t stride[DIFFUSE_MAX_DIMS];  /* in elements */
  size_t offset;                      /* in bytes, into the storage */
  DiffuseStorage *storage;
};

/* New contiguous tensor, contents uninitialised.  NULL + thread error on
 * allocation failure. */
DiffuseTensor *diffuse_tensor_new (DiffuseDevice *dev, DiffuseDType dt, int ndim, const int64_t *shape);
DiffuseTensor *diffuse_tensor_new_4d (DiffuseDevice *dev, DiffuseDType dt, int64_t a, int64_t b, int64_t c, int64_t d);
DiffuseTensor *diffuse_tensor_zeros (DiffuseDevice *dev, DiffuseDType dt, int ndim, const int64_t *shape);
/* A CPU f32 tensor holding a copy of data. */
DiffuseTensor *diffuse_tensor_from_f32 (const float *data, int ndim, const int64_t *shape);
/* Wrap memory owned by someone else (no copy).  release(user_data) is called
 * when the last tensor using it goes away.  The bytes are counted as
 * borrowed, not resident. */
DiffuseTensor *diffuse_tensor_new_borrowed (DiffuseDevice *dev, DiffuseDType dt, int ndim, const int64_t *shape,
                                            gpointer data, DiffuseReleaseFunc release, gpointer user_data);

DiffuseTensor *diffuse_tensor_ref (DiffuseTensor *t);
void diffuse_tensor_unref (DiffuseTensor *t);
/* g_clear_pointer friendly */
#define diffuse_tensor_clear(pp) g_clear_pointer ((pp), diffuse_tensor_unref)

DiffuseDevice *diffuse_tensor_device (const DiffuseTensor *t);
int64_t diffuse_tensor_numel (const DiffuseTensor *t);
size_t diffuse_tensor_nbytes (const DiffuseTensor *t);
gboolean diffuse_tensor_is_contiguous (const DiffuseTensor *t);
gboolean diffuse_tensor_same_shape (const DiffuseTensor *a, const DiffuseTensor *b);
/* Host pointer to the first element (CPU tensors only). */
void *diffuse_tensor_data (const DiffuseTensor *t);
static inline float *diffuse_tensor_f32 (const DiffuseTensor *t) { return (float *) diffuse_tensor_data (t); }
/* "[2, 4, 64, 64] float32 cpu" — free with g_free */
char *diffuse_tensor_describe (const DiffuseTensor *t);
/* The storage's owner bookkeeping: TRUE when the tensor's memory is borrowed (mmap). */
gboolean diffuse_tensor_is_borrowed (const DiffuseTensor *t);

/* Thread-local error of the last failed op (see the header comment). */
gboolean diffuse_tensor_take_error (GError **error);
void diffuse_tensor_set_error (GError *error);    /* takes ownership */

/* ---- views (no copy) -------------------------------------------------- */

/* -1 in one position is inferred.  The input must be contiguous. */
DiffuseTensor *diffuse_reshape (DiffuseTensor *x, int ndim, const int64_t *shape);
DiffuseTensor *diffuse_reshape_4d (DiffuseTensor *x, int64_t a, int64_t b, int64_t c, int64_t d);
DiffuseTensor *diffuse_permute (DiffuseTensor *x, const int *perm);   /* view with permuted strides */
DiffuseTensor *diffuse_narrow (DiffuseTensor *x, int dim, int64_t start, int64_t length);
/* Split into n equal chunks along dim (torch.chunk); out[] gets n views. */
gboolean diffuse_chunk (DiffuseTensor *x, int n, int dim, DiffuseTensor **out);

/* ---- copies & conversions --------------------------------------------- */

DiffuseTensor *diffuse_contiguous (DiffuseTensor *x);          /* ref when already contiguous */
DiffuseTensor *diffuse_copy (DiffuseTensor *x);                /* always a new contiguous tensor */
DiffuseTensor *diffuse_cast (DiffuseTensor *x, DiffuseDType dt); /* ref when same dtype */
DiffuseTensor *diffuse_to_device (DiffuseTensor *x, DiffuseDevice *dev);
/* x as a contiguous f32 tensor on the CPU (a ref when it already is one), to read its values */
DiffuseTensor *diffuse_to_host_f32 (DiffuseTensor *x);
DiffuseTensor *diffuse_concat (DiffuseTensor *const *xs, int n, int dim);
/* Copy src into dst (same shape; any strides, dtypes may differ). */
gboolean diffuse_copy_into (DiffuseTensor *dst, DiffuseTensor *src);

/* Scalar conversions (round to nearest even, as torch). */
uint16_t diffuse_f32_to_f16 (float f);
float diffuse_f16_to_f32 (uint16_t h);
uint16_t diffuse_f32_to_bf16 (float f);
float diffuse_bf16_to_f32 (uint16_t h);
void diffuse_convert_row (void *dst, DiffuseDType dst_dt, const void *src, DiffuseDType src_dt, size_t n);

/* ---- element-wise ----------------------------------------------------- */

/* Numpy/torch broadcasting on up to DIFFUSE_MAX_DIMS dims. */
DiffuseTensor *diffuse_add (DiffuseTensor *a, DiffuseTensor *b);
DiffuseTensor *diffuse_sub (DiffuseTensor *a, DiffuseTensor *b);
DiffuseTensor *diffuse_mul (DiffuseTensor *a, DiffuseTensor *b);
DiffuseTensor *diffuse_div (DiffuseTensor *a, DiffuseTensor *b);
/* y = x * s + b */
DiffuseTensor *diffuse_scale (DiffuseTensor *x, float s, float b);
/* In place a += alpha * b (same shape, a contiguous). */
gboolean diffuse_axpy_inplace (DiffuseTensor *a, float alpha, DiffuseTensor *b);

typedef enum {
  DIFFUSE_ACT_NONE = 0,
  DIFFUSE_ACT_SILU,
  DIFFUSE_ACT_GELU,        /* exact, erf */
  DIFFUSE_ACT_GELU_TANH,
  DIFFUSE_ACT_QUICK_GELU,  /* x * sigmoid(1.702 x) */
  DIFFUSE_ACT_RELU,
  DIFFUSE_ACT_SIGMOID,
} DiffuseActivation;

DiffuseTensor *diffuse_activation (DiffuseTensor *x, DiffuseActivation act);
/* Parses "silu"/"swish", "gelu", "gelu_pytorch_tanh"/"gelu_new"/"gelu-approximate",
 * "quick_gelu", "relu", "sigmoid". */
gboolean diffuse_activation_from_string (const char *s, DiffuseActivation *out);
/* GEGLU: x [..., 2n] -> first half * gelu(second half), as diffusers' GEGLU. */
DiffuseTensor *diffuse_geglu (DiffuseTensor *x);

/* ---- linear algebra --------------------------------------------------- */

/* y = x @ w^T + b over the last dim of x; w [out, in] (torch Linear layout). */
DiffuseTensor *diffuse_linear (DiffuseTensor *x, DiffuseTensor *w, DiffuseTensor *b);
/* Batched matmul over leading dims (broadcast on batch), optional transposes
 * of the last two dims: out = alpha * op(a) @ op(b). */
DiffuseTensor *diffuse_matmul (DiffuseTensor *a, DiffuseTensor *b, gboolean trans_a, gboolean trans_b, float alpha);

/* ---- convolution & resampling (NCHW) ---------------------------------- */

/* w [Cout, Cin, kh, kw]; b [Cout] or NULL; groups = 1. */
DiffuseTensor *diffuse_conv2d (DiffuseTensor *x, DiffuseTensor *w, DiffuseTensor *b,
                               int stride_h, int stride_w, int pad_h, int pad_w);
/* Explicit zero padding (left, right, top, bottom), as F.pad on the last two dims. */
DiffuseTensor *diffuse_pad2d (DiffuseTensor *x, int left, int right, int top, int bottom);
DiffuseTensor *diffuse_upsample_nearest (DiffuseTensor *x, int out_h, int out_w);
DiffuseTensor *diffuse_avg_pool2d (DiffuseTensor *x, int k, int stride);

/* ---- normalisation & softmax ------------------------------------------ */

/* x [N, C, ...]; gamma/beta [C] or NULL.  Statistics in f32. */
DiffuseTensor *diffuse_group_norm (DiffuseTensor *x, int groups, DiffuseTensor *gamma, DiffuseTensor *beta,
                                   float eps, DiffuseActivation fused_act);
/* Over the last dim; gamma/beta [D] or NULL. */
DiffuseTensor *diffuse_layer_norm (DiffuseTensor *x, DiffuseTensor *gamma, DiffuseTensor *beta, float eps);
/* Over the last dim. */
DiffuseTensor *diffuse_softmax (DiffuseTensor *x);

/* Scaled dot-product attention.  q [B, H, Lq, D], k/v [B, H, Lk, D] (any
 * strides); mask NULL, or additive [Lq, Lk] / broadcastable to [B, H, Lq, Lk];
 * causal adds the upper-triangular -inf mask.  scale <= 0 means 1/sqrt(D).
 * Computed in f32.  Output [B, H, Lq, D] contiguous. */
DiffuseTensor *diffuse_sdpa (DiffuseTensor *q, DiffuseTensor *k, DiffuseTensor *v,
                             DiffuseTensor *mask, gboolean causal, float scale);

/* ---- misc ------------------------------------------------------------- */

/* diffusers get_timestep_embedding: t [N] -> [N, dim]. */
DiffuseTensor *diffuse_timestep_embedding (DiffuseTensor *t, int dim, gboolean flip_sin_to_cos,
                                           float downscale_freq_shift, float scale, float max_period);
/* Rows of table [V, D] picked by ids -> [n, D]. */
DiffuseTensor *diffuse_embedding (DiffuseTensor *table, const int32_t *ids, int64_t n);

/* Max abs difference between two same-shape tensors (any dtype/device). */
double diffuse_tensor_max_abs_diff (DiffuseTensor *a, DiffuseTensor *b);
double diffuse_tensor_max_abs (DiffuseTensor *a);

G_END_DECLS
