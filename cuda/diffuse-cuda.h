/* gst-diffuse — CUDA-only extras of the backend (only in builds with
 * DIFFUSE_HAVE_CUDA; the functions live in libdiffuse-core).
 *
 * CUDA graphs.  Every op of a device is queued on one stream and every
 * allocation comes from a caching pool whose free lists are exact size
 * classes reused last-in first-out, so the same sequence of allocations gives
 * the same addresses.  A UNet step can therefore be captured once and
 * replayed:
 *
 *   1. run one step eagerly (warms the pool and cuBLAS' heuristics);
 *   2. keep the step's inputs in fixed device tensors (latent input, timestep
 *      as a device tensor, text embeddings) and refill them with
 *      diffuse_copy_into() before each replay;
 *   3. diffuse_cuda_graph_begin(); run the step (no host reads, no uploads of
 *      host memory, no synchronisation inside); keep the output tensor;
 *      g = diffuse_cuda_graph_end();
 *   4. each later step: refill inputs, diffuse_cuda_graph_replay(g), read the
 *      kept output tensor.
 *
 * Blocks allocated while capturing belong to the graph's private pool: when
 * freed they go back to that pool only (never to other users), so a replay
 * cannot overwrite tensors allocated between replays.  diffuse_cuda_graph_free
 * returns them to the general pool.  Tensors still alive from the capture
 * (the output) stay valid until unref'd.  Tensors made before the capture
 * and read inside it (inputs, weights) must stay alive until the graph is
 * freed: their blocks are not the graph's. */
#pragma once

#include <diffuse/backend.h>

G_BEGIN_DECLS

typedef struct _DiffuseCudaGraph DiffuseCudaGraph;

/* TRUE when dev is a CUDA device of this backend. */
gboolean diffuse_device_is_cuda (DiffuseDevice *dev);
/* Waits for every queued op of the device; reports a deferred kernel error. */
gboolean diffuse_cuda_synchronize (DiffuseDevice *dev, GError **error);
/* Human-readable device name ("NVIDIA H100 80GB HBM3"). */
const char *diffuse_cuda_device_name (DiffuseDevice *dev);

typedef struct {
  guint64 reserved_bytes;       /* held by the pool from cudaMalloc (cached + in use) */
  guint64 peak_reserved_bytes;
  guint64 n_cuda_mallocs;       /* cudaMalloc calls so far (a step in steady state makes none) */
  guint64 n_pool_hits;          /* allocations served from the cache */
} DiffuseCudaPoolStats;

void diffuse_cuda_get_pool_stats (DiffuseDevice *dev, DiffuseCudaPoolStats *out);
/* Returns cached free blocks of the general pool to the driver. */
void diffuse_cuda_empty_cache (DiffuseDevice *dev);

gboolean diffuse_cuda_graph_begin (DiffuseDevice *dev, GError **error);
DiffuseCudaGraph *diffuse_cuda_graph_end (DiffuseDevice *dev, GError **error);
gboolean diffuse_cuda_graph_replay (DiffuseCudaGraph *graph, GError **error);
void diffuse_cuda_graph_free (DiffuseCudaGraph *graph);

/* For tests: the implicit-GEMM convolution kernel's tiling — its load
 * slots, gather addresses, K steps, staging and epilogue, the same code —
 * run on the host, the tensor-core products done by loops.  x [N, Cin, H, W]
 * and w [Cout, Cin, kh, kw] f16 or bf16 (both the same) on the CPU, Cin % 8
 * == 0; b NULL or [Cout]; splits > 1: split-K into that many (at most
 * one per K step) and the partial sums' reduction.  Returns [N, Cout, Ho,
 * Wo] in x's dtype, or NULL where the kernel does not apply. */
DiffuseTensor *_diffuse_cuda_conv_igemm_emulate (DiffuseTensor *x, DiffuseTensor *w, DiffuseTensor *b, int sh,
                                                 int sw, int ph, int pw, int splits);

/* Called by the tensor layer once (registers "cuda" with diffuse_backend_register). */
void _diffuse_cuda_register (void);

G_END_DECLS
