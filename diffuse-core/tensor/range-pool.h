/* gst-diffuse — a best-fit range allocator over large segments.
 *
 * The CUDA backend's pool (cuda/memory.cu) keeps freed blocks in exact size
 * classes for speed and for the fixed addresses CUDA graphs need; this is
 * the layer under those classes.  Device memory is taken from the driver in
 * segments (at least `segment_min` bytes each) and blocks are carved out of
 * them best-fit; a freed block merges with its free neighbours, so memory
 * left by one phase of a run (the UNet's activations) serves the next (the
 * VAE's larger ones) instead of a new cudaMalloc, and a 3.3 MB weight no
 * longer costs a 4 MiB driver allocation.  Segments are handed back to the
 * driver only by _diffuse_range_pool_trim (empty ones).
 *
 * Pure host bookkeeping: the segment allocator is a callback (cudaMalloc in
 * the backend, malloc in tests/core/test-range-pool.c).  Not thread-safe:
 * the caller holds its own lock.  Offsets and sizes are multiples of
 * `align`; a request is rounded up to it. */
#pragma once

#include <glib.h>

G_BEGIN_DECLS

typedef struct _DiffuseRangePool DiffuseRangePool;

/* returns the base of a new segment of exactly `size` bytes, or NULL */
typedef void *(*DiffuseRangeSegAlloc) (size_t size, gpointer user);
typedef void (*DiffuseRangeSegFree) (void *base, gpointer user);

DiffuseRangePool *_diffuse_range_pool_new (size_t segment_min, size_t align, DiffuseRangeSegAlloc seg_alloc,
                                           DiffuseRangeSegFree seg_free, gpointer user);

/* A block of at least `size` bytes: best fit among the free ranges (the
 * smallest that holds it; ties: the oldest segment, the lowest address).
 * When none holds it and `grow` is TRUE, a new segment of
 * MAX (segment_min, size rounded to segment_step) is taken; NULL when none
 * holds it and !grow, or when the segment allocator fails. */
void *_diffuse_range_pool_alloc (DiffuseRangePool *p, size_t size, gboolean grow);

/* Returns a block (a pointer _alloc gave and not yet freed; anything else is
 * a g_critical and ignored) to its segment, merged with free neighbours. */
void _diffuse_range_pool_free (DiffuseRangePool *p, void *ptr);

/* Hands every segment with no live block back to the segment allocator;
 * returns the bytes released. */
size_t _diffuse_range_pool_trim (DiffuseRangePool *p);

/* bytes held in segments / in live blocks / the largest free range */
size_t _diffuse_range_pool_reserved (const DiffuseRangePool *p);
size_t _diffuse_range_pool_live (const DiffuseRangePool *p);
size_t _diffuse_range_pool_largest_free (const DiffuseRangePool *p);
guint _diffuse_range_pool_n_segments (const DiffuseRangePool *p);

/* Frees every segment (live blocks included) and the pool. */
void _diffuse_range_pool_destroy (DiffuseRangePool *p);

G_END_DECLS
