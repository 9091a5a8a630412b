/* gst-diffuse — CUDA backend: errors, the caching device pool, CUDA graphs.
 *
 * The pool.  Sizes are rounded to a class (512 B steps up to 1 MiB, 64 KiB
 * steps above); a freed block goes on its class's free list (a stack), and
 * an allocation of that class takes the most recently freed block.  A
 * denoising loop whose allocation sequence repeats therefore makes no new
 * allocation after its first step and gets the same addresses every step —
 * the property CUDA graph replay needs.  All work of a device is on one
 * stream, so a block freed by one op and reused by the next is ordered by
 * the stream.
 *
 * Under the classes, blocks are carved best-fit out of 64 MiB segments
 * (tensor/range-pool.h).  A miss first tries the segments' free ranges, then
 * hands every cached free block of the general pool back to its segment
 * (merging neighbours) and tries again, and only then takes a new segment
 * from cudaMalloc: the memory one phase of a run leaves (the UNet's
 * activations) serves the next (the VAE decoder's larger ones), and weights
 * are packed instead of each costing a 2 MiB-rounded cudaMalloc.  On the
 * full-size SD 1.5 run the one-cudaMalloc-per-class pool reserved 1.12x
 * diffusers' peak (docs/benchmarks.md).  DIFFUSE_CUDA_POOL=classes comes
 * close to that pool (2 MiB classes above 1 MiB, the cache never handed back
 * before a new segment is taken, segments no larger than a block).  When
 * cudaMalloc fails, the cached blocks are handed back, empty segments
 * released and the allocation retried once; then the failure is an
 * OUT_OF_MEMORY GError.
 *
 * Live and peak bytes of tensors are counted by the tensor layer in the
 * device record (diffuse_device_get_mem_stats); the pool adds what it
 * reserves from the driver (diffuse_cuda_get_pool_stats). */
#include "common.cuh"
#include "range-pool.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- errors ----------------------------------------------------------- */

gboolean
dcu_fail (GError **error, cudaError_t e, const char *what)
{
  int code = (e == cudaErrorMemoryAllocation) ? DIFFUSE_ERROR_OUT_OF_MEMORY : DIFFUSE_ERROR_DEVICE;
  g_set_error (error, DIFFUSE_ERROR, code, "CUDA error in %s: %s (%s)", what, cudaGetErrorString (e),
               cudaGetErrorName (e));
  return FALSE;
}

gboolean
dcu_fail_blas (GError **error, cublasStatus_t s, const char *what)
{
  int code = (s == CUBLAS_STATUS_ALLOC_FAILED) ? DIFFUSE_ERROR_OUT_OF_MEMORY : DIFFUSE_ERROR_DEVICE;
  g_set_error (error, DIFFUSE_ERROR, code, "cuBLAS error in %s: %s (%d)", what, cublasGetStatusString (s), (int) s);
  return FALSE;
}

gboolean
dcu_check_launch (GError **error, const char *what)
{
  cudaError_t e = cudaGetLastError ();
  if (e != cudaSuccess)
    return dcu_fail (error, e, what);
  return TRUE;
}

gboolean
dcu_enter (CudaCtx *c, GError **error)
{
  int cur = -1;
  if (cudaGetDevice (&cur) == cudaSuccess && cur == c->index)
    return TRUE;
  DCU_TRY (cudaSetDevice (c->index), "cudaSetDevice");
  return TRUE;
}

/* ---- per-op profile ---------------------------------------------------- */

int dcu_profile_on;
__thread int dcu_profile_depth;
static GMutex prof_lock;
static GHashTable *prof;   /* op -> double[2] (count, ms) */

static void
profile_print (void)
{
  g_mutex_lock (&prof_lock);
  if (prof) {
    GList *keys = g_list_sort (g_hash_table_get_keys (prof), (GCompareFunc) g_strcmp0);
    double total = 0;
    for (GList *l = keys; l; l = l->next)
      total += ((double *) g_hash_table_lookup (prof, l->data))[1];
    fprintf (stderr, "CUDA op profile (synchronised per op): %.1f ms in all\n", total);
    for (GList *l = keys; l; l = l->next) {
      double *v = (double *) g_hash_table_lookup (prof, l->data);
      fprintf (stderr, "  %-20s %8.0f calls %10.2f ms %5.1f%%\n", (const char *) l->data, v[0], v[1],
               total > 0 ? 100.0 * v[1] / total : 0.0);
    }
    g_list_free (keys);
  }
  g_mutex_unlock (&prof_lock);
}

void
dcu_profile_add (const char *op, double ms)
{
  g_mutex_lock (&prof_lock);
  if (!prof) {
    prof = g_hash_table_new_full (g_str_hash, g_str_equal, NULL, g_free);
    atexit (profile_print);
  }
  double *v = (double *) g_hash_table_lookup (prof, op);
  if (!v) {
    v = g_new0 (double, 2);
    g_hash_table_insert (prof, (gpointer) op, v);
  }
  v[0] += 1;
  v[1] += ms;
  g_mutex_unlock (&prof_lock);
}

/* ---- pool -------------------------------------------------------------- */

typedef struct {
  void *ptr;
  size_t size;       /* class size (what cudaMalloc got) */
  guint owner;       /* 0: general pool; else the id of the graph whose private pool owns it */
} Block;

typedef struct {
  guint id;
  GHashTable *free;  /* size -> GPtrArray of Block* (stack) */
} PrivatePool;

struct CudaPool {
  GMutex lock;
  GHashTable *free;       /* size -> GPtrArray of Block* (stack), general pool */
  GHashTable *live;       /* ptr -> Block* */
  GHashTable *privates;   /* id -> PrivatePool* */
  DiffuseRangePool *ranges;
  gboolean classes_only;  /* DIFFUSE_CUDA_POOL=classes: a segment per block, no merging */
  cudaError_t seg_err;    /* the last segment cudaMalloc's error */
  guint64 peak_reserved, n_mallocs, n_hits;   /* (reserved: _diffuse_range_pool_reserved) */
};

#define SEGMENT_BYTES ((size_t) 64 << 20)

static size_t
size_class (const CudaPool *p, size_t n)
{
  const size_t small = 512, big = p->classes_only ? (size_t) 2 << 20 : (size_t) 64 << 10;
  if (n <= (1u << 20))
    return (n + small - 1) / small * small;
  return (n + big - 1) / big * big;
}

static void *
segment_alloc (size_t size, gpointer user)
{
  CudaPool *p = (CudaPool *) user;
  void *ptr = NULL;
  cudaError_t e = cudaMalloc (&ptr, size);
  if (e != cudaSuccess) {
    cudaGetLastError ();
    p->seg_err = e;
    return NULL;
  }
  p->n_mallocs++;
  return ptr;
}

static void
segment_free (void *base, gpointer user)
{
  cudaFree (base);
}

static GHashTable *
new_free_table (void)
{
  return g_hash_table_new_full (g_int64_hash, g_int64_equal, g_free, (GDestroyNotify) g_ptr_array_unref);
}

static void
push_free (GHashTable *table, Block *b)
{
  gint64 key = (gint64) b->size;
  GPtrArray *stack = (GPtrArray *) g_hash_table_lookup (table, &key);
  if (!stack) {
    stack = g_ptr_array_new ();
    gint64 *k = g_new (gint64, 1);
    *k = key;
    g_hash_table_insert (table, k, stack);
  }
  g_ptr_array_add (stack, b);
}

static Block *
pop_free (GHashTable *table, size_t size)
{
  gint64 key = (gint64) size;
  GPtrArray *stack = (GPtrArray *) g_hash_table_lookup (table, &key);
  if (!stack || stack->len == 0)
    return NULL;
  return (Block *) g_ptr_array_steal_index (stack, stack->len - 1);
}

static void
private_free (gpointer p)
{
  PrivatePool *pp = (PrivatePool *) p;
  g_hash_table_unref (pp->free);
  g_free (pp);
}

gboolean
dcu_pool_init (CudaCtx *c, GError **error)
{
  CudaPool *p = g_new0 (CudaPool, 1);
  g_mutex_init (&p->lock);
  p->free = new_free_table ();
  p->live = g_hash_table_new (g_direct_hash, g_direct_equal);
  p->privates = g_hash_table_new_full (g_direct_hash, g_direct_equal, NULL, private_free);
  p->classes_only = g_strcmp0 (g_getenv ("DIFFUSE_CUDA_POOL"), "classes") == 0;
  p->ranges = _diffuse_range_pool_new (p->classes_only ? 0 : SEGMENT_BYTES, 512, segment_alloc, segment_free, p);
  c->pool = p;
  return TRUE;
}

/* Hands every cached free block of a table back to its segment (lock held). */
static void
flush_table (CudaPool *p, GHashTable *table)
{
  GHashTableIter it;
  gpointer k, v;
  g_hash_table_iter_init (&it, table);
  while (g_hash_table_iter_next (&it, &k, &v)) {
    GPtrArray *stack = (GPtrArray *) v;
    for (guint i = 0; i < stack->len; i++) {
      Block *b = (Block *) g_ptr_array_index (stack, i);
      _diffuse_range_pool_free (p->ranges, b->ptr);
      g_free (b);
    }
    g_ptr_array_set_size (stack, 0);
  }
}

/* ... and the segments left empty to the driver (lock held, stream idle). */
static void
release_table (CudaPool *p, GHashTable *table)
{
  flush_table (p, table);
  _diffuse_range_pool_trim (p->ranges);
}

void
dcu_pool_destroy (CudaCtx *c)
{
  CudaPool *p = c->pool;
  if (!p)
    return;
  cudaStreamSynchronize (c->stream);
  release_table (p, p->free);
  {
    /* graphs never freed: their private pools' cached blocks too */
    GHashTableIter it;
    gpointer k, v;
    g_hash_table_iter_init (&it, p->privates);
    while (g_hash_table_iter_next (&it, &k, &v))
      release_table (p, ((PrivatePool *) v)->free);
  }
  _diffuse_range_pool_destroy (p->ranges);   /* blocks still live: tensors outlived the device */
  g_hash_table_unref (p->free);
  g_hash_table_unref (p->privates);
  g_hash_table_unref (p->live);
  g_mutex_clear (&p->lock);
  g_free (p);
  c->pool = NULL;
}

void *
dcu_pool_alloc (CudaCtx *c, size_t nbytes, GError **error)
{
  CudaPool *p = c->pool;
  size_t size = size_class (p, nbytes ? nbytes : 1);
  Block *b = NULL;
  g_mutex_lock (&p->lock);
  PrivatePool *pp = c->capturing ? (PrivatePool *) g_hash_table_lookup (p->privates, GUINT_TO_POINTER (c->capture_id))
                                 : NULL;
  if (pp)
    b = pop_free (pp->free, size);
  if (!b)
    b = pop_free (p->free, size);
  if (b) {
    p->n_hits++;
  } else {
    if (!dcu_enter (c, error)) {
      g_mutex_unlock (&p->lock);
      return NULL;
    }
    /* free space in the segments; then with the general cache merged back
     * into them; then a new segment */
    void *ptr = _diffuse_range_pool_alloc (p->ranges, size, FALSE);
    if (!ptr && !p->classes_only) {
      flush_table (p, p->free);
      ptr = _diffuse_range_pool_alloc (p->ranges, size, FALSE);
    }
    p->seg_err = cudaSuccess;
    if (!ptr)
      ptr = _diffuse_range_pool_alloc (p->ranges, size, TRUE);
    if (!ptr && p->seg_err == cudaErrorMemoryAllocation && !c->capturing) {
      /* give the cache and the empty segments back and retry once */
      cudaStreamSynchronize (c->stream);
      release_table (p, p->free);
      p->seg_err = cudaSuccess;
      ptr = _diffuse_range_pool_alloc (p->ranges, size, TRUE);
    }
    cudaError_t e = ptr ? cudaSuccess : p->seg_err != cudaSuccess ? p->seg_err : cudaErrorMemoryAllocation;
    if (!ptr) {
      size_t fr = 0, total = 0;
      cudaMemGetInfo (&fr, &total);
      cudaGetLastError ();
      const guint64 held = _diffuse_range_pool_reserved (p->ranges);
      g_mutex_unlock (&p->lock);
      g_set_error (error, DIFFUSE_ERROR,
                   e == cudaErrorMemoryAllocation ? DIFFUSE_ERROR_OUT_OF_MEMORY : DIFFUSE_ERROR_DEVICE,
                   "%s: cannot allocate %" G_GSIZE_FORMAT " bytes of device memory (%s; %" G_GSIZE_FORMAT
                   " MiB free of %" G_GSIZE_FORMAT " MiB, %" G_GUINT64_FORMAT " MiB held by the pool)",
                   diffuse_device_name (c->dev), nbytes, cudaGetErrorString (e), fr >> 20, total >> 20,
                   held >> 20);
      return NULL;
    }
    b = g_new0 (Block, 1);
    b->ptr = ptr;
    b->size = size;
    p->peak_reserved = MAX (p->peak_reserved, (guint64) _diffuse_range_pool_reserved (p->ranges));
  }
  if (pp)
    b->owner = pp->id;   /* taken while capturing: the graph's from now on */
  g_hash_table_insert (p->live, b->ptr, b);
  g_mutex_unlock (&p->lock);
  return b->ptr;
}

void
dcu_pool_free (CudaCtx *c, void *ptr)
{
  CudaPool *p = c->pool;
  g_mutex_lock (&p->lock);
  Block *b = (Block *) g_hash_table_lookup (p->live, ptr);
  if (!b) {
    g_mutex_unlock (&p->lock);
    g_critical ("CUDA pool: free of an unknown pointer %p", ptr);
    return;
  }
  g_hash_table_remove (p->live, ptr);
  PrivatePool *pp = b->owner ? (PrivatePool *) g_hash_table_lookup (p->privates, GUINT_TO_POINTER (b->owner)) : NULL;
  if (pp)
    push_free (pp->free, b);
  else {
    b->owner = 0;
    push_free (p->free, b);
  }
  g_mutex_unlock (&p->lock);
}

void
diffuse_cuda_get_pool_stats (DiffuseDevice *dev, DiffuseCudaPoolStats *out)
{
  memset (out, 0, sizeof *out);
  if (!diffuse_device_is_cuda (dev))
    return;
  CudaPool *p = dcu_ctx (dev)->pool;
  g_mutex_lock (&p->lock);
  out->reserved_bytes = _diffuse_range_pool_reserved (p->ranges);
  out->peak_reserved_bytes = p->peak_reserved;
  out->n_cuda_mallocs = p->n_mallocs;
  out->n_pool_hits = p->n_hits;
  g_mutex_unlock (&p->lock);
}

void
diffuse_cuda_empty_cache (DiffuseDevice *dev)
{
  if (!diffuse_device_is_cuda (dev))
    return;
  CudaCtx *c = dcu_ctx (dev);
  if (c->capturing)
    return;
  GError *err = NULL;
  if (!dcu_enter (c, &err)) {
    g_clear_error (&err);
    return;
  }
  g_mutex_lock (&c->pool->lock);
  cudaStreamSynchronize (c->stream);
  release_table (c->pool, c->pool->free);
  g_mutex_unlock (&c->pool->lock);
}

/* ---- helpers ----------------------------------------------------------- */

DiffuseTensor *
dcu_contig (DiffuseTensor *t, int dt, GError **error)
{
  DiffuseTensor *r;
  if (dt >= 0 && (int) t->dtype != dt) {
    DiffuseTensor *c = diffuse_tensor_new (t->storage->dev, (DiffuseDType) dt, t->ndim, t->shape);
    if (!c) {
      diffuse_tensor_take_error (error);
      return NULL;
    }
    if (!dcu_copy (c, t, error)) {
      diffuse_tensor_unref (c);
      return NULL;
    }
    return c;
  }
  if (diffuse_tensor_is_contiguous (t))
    return diffuse_tensor_ref (t);
  r = diffuse_tensor_new (t->storage->dev, t->dtype, t->ndim, t->shape);
  if (!r) {
    diffuse_tensor_take_error (error);
    return NULL;
  }
  if (!dcu_copy (r, t, error)) {
    diffuse_tensor_unref (r);
    return NULL;
  }
  return r;
}

/* ---- CUDA graphs ------------------------------------------------------- */

struct _DiffuseCudaGraph {
  CudaCtx *ctx;
  guint id;
  cudaGraph_t graph;
  cudaGraphExec_t exec;
};

static guint next_graph_id = 1;

gboolean
diffuse_cuda_graph_begin (DiffuseDevice *dev, GError **error)
{
  if (!diffuse_device_is_cuda (dev)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "Graph capture needs a CUDA device, not %s",
                 diffuse_device_name (dev));
    return FALSE;
  }
  CudaCtx *c = dcu_ctx (dev);
  if (c->capturing) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "%s: a capture is already under way",
                 diffuse_device_name (dev));
    return FALSE;
  }
  if (!dcu_enter (c, error))
    return FALSE;
  PrivatePool *pp = g_new0 (PrivatePool, 1);
  pp->free = new_free_table ();
  g_mutex_lock (&c->pool->lock);
  pp->id = next_graph_id++;
  g_hash_table_insert (c->pool->privates, GUINT_TO_POINTER (pp->id), pp);
  g_mutex_unlock (&c->pool->lock);
  /* relaxed: a pool miss may still cudaMalloc while capturing */
  cudaError_t e = cudaStreamBeginCapture (c->stream, cudaStreamCaptureModeRelaxed);
  if (e != cudaSuccess) {
    g_mutex_lock (&c->pool->lock);
    g_hash_table_remove (c->pool->privates, GUINT_TO_POINTER (pp->id));
    g_mutex_unlock (&c->pool->lock);
    return dcu_fail (error, e, "cudaStreamBeginCapture");
  }
  c->capture_id = pp->id;
  c->capturing = TRUE;
  return TRUE;
}

/* Moves the free blocks of a private pool back to the general pool and
 * forgets the pool (lock held); live blocks of it return to the general pool
 * when freed. */
static void
drop_private (CudaPool *p, guint id)
{
  PrivatePool *pp = (PrivatePool *) g_hash_table_lookup (p->privates, GUINT_TO_POINTER (id));
  if (!pp)
    return;
  GHashTableIter it;
  gpointer k, v;
  g_hash_table_iter_init (&it, pp->free);
  while (g_hash_table_iter_next (&it, &k, &v)) {
    GPtrArray *stack = (GPtrArray *) v;
    for (guint i = 0; i < stack->len; i++) {
      Block *b = (Block *) g_ptr_array_index (stack, i);
      b->owner = 0;
      push_free (p->free, b);
    }
    g_ptr_array_set_size (stack, 0);
  }
  g_hash_table_remove (p->privates, GUINT_TO_POINTER (id));
}

DiffuseCudaGraph *
diffuse_cuda_graph_end (DiffuseDevice *dev, GError **error)
{
  g_return_val_if_fail (diffuse_device_is_cuda (dev), NULL);
  CudaCtx *c = dcu_ctx (dev);
  if (!c->capturing) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "%s: no capture under way",
                 diffuse_device_name (dev));
    return NULL;
  }
  if (!dcu_enter (c, error))
    return NULL;
  cudaGraph_t graph = NULL;
  cudaError_t e = cudaStreamEndCapture (c->stream, &graph);
  c->capturing = FALSE;
  guint id = c->capture_id;
  c->capture_id = 0;
  cudaGraphExec_t exec = NULL;
  if (e == cudaSuccess)
    e = cudaGraphInstantiate (&exec, graph, 0);
  if (e != cudaSuccess) {
    cudaGetLastError ();
    if (graph)
      cudaGraphDestroy (graph);
    g_mutex_lock (&c->pool->lock);
    drop_private (c->pool, id);
    g_mutex_unlock (&c->pool->lock);
    dcu_fail (error, e, "graph capture (an op in the captured region synchronised or used host memory?)");
    return NULL;
  }
  DiffuseCudaGraph *g = g_new0 (DiffuseCudaGraph, 1);
  g->ctx = c;
  g->id = id;
  g->graph = graph;
  g->exec = exec;
  return g;
}

gboolean
diffuse_cuda_graph_replay (DiffuseCudaGraph *g, GError **error)
{
  g_return_val_if_fail (g != NULL, FALSE);
  if (!dcu_enter (g->ctx, error))
    return FALSE;
  DCU_TRY (cudaGraphLaunch (g->exec, g->ctx->stream), "cudaGraphLaunch");
  return TRUE;
}

void
diffuse_cuda_graph_free (DiffuseCudaGraph *g)
{
  if (!g)
    return;
  CudaCtx *c = g->ctx;
  GError *err = NULL;
  if (dcu_enter (c, &err)) {
    cudaStreamSynchronize (c->stream);
    cudaGraphExecDestroy (g->exec);
    cudaGraphDestroy (g->graph);
  }
  g_clear_error (&err);
  g_mutex_lock (&c->pool->lock);
  drop_private (c->pool, g->id);
  g_mutex_unlock (&c->pool->lock);
  g_free (g);
}
