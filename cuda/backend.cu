/* gst-diffuse — CUDA backend: device discovery, opening, the ops table,
 * host <-> device transfers.
 *
 * "cuda" is registered with the tensor layer (diffuse_backend_register) the
 * first time a device is asked for.  count() is cudaGetDeviceCount, 0 when
 * there is no driver or no device (never an error), or when
 * DIFFUSE_DISABLE_CUDA is set; device=auto then runs on the CPU.  A device
 * once opened stays open for the life of the process (as the CPU device).
 *
 * Uploads go through two pinned staging buffers: the host copies chunk i+1
 * out of the (mmap'd) source while the DMA engine moves chunk i, and the
 * call returns as soon as the source is no longer needed. */
#include "common.cuh"
#include <stdlib.h>
#include <string.h>

#define STAGE_SIZE ((size_t) 16 << 20)
#define BLAS_WS_SIZE ((size_t) 32 << 20)

static const DiffuseBackendOps *cuda_ops (void);

/* ---- memory ops ------------------------------------------------------------- */

static gpointer
cuda_alloc (DiffuseDevice *dev, size_t nbytes, GError **error)
{
  return dcu_pool_alloc (dcu_ctx (dev), nbytes, error);
}

static void
cuda_free (DiffuseDevice *dev, gpointer p)
{
  dcu_pool_free (dcu_ctx (dev), p);
}

gboolean
dcu_upload (CudaCtx *c, void *dst, const void *src, size_t nbytes, GError **error)
{
  if (nbytes == 0)
    return TRUE;
  if (c->capturing) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                 "%s: host-to-device copy inside a CUDA graph capture (keep inputs on the device)",
                 diffuse_device_name (c->dev));
    return FALSE;
  }
  if (!dcu_enter (c, error))
    return FALSE;
  DCU_PROF (c, "upload");
  g_mutex_lock (&c->stage_lock);
  if (!c->stage[0] && !c->stage_failed) {
    gboolean ok = TRUE;
    for (int i = 0; i < 2 && ok; i++) {
      ok = cudaHostAlloc (&c->stage[i], STAGE_SIZE, cudaHostAllocDefault) == cudaSuccess &&
           cudaEventCreateWithFlags (&c->stage_ev[i], cudaEventDisableTiming) == cudaSuccess;
    }
    if (!ok) {
      cudaGetLastError ();
      g_message ("%s: no pinned staging memory, uploads are synchronous", diffuse_device_name (c->dev));
      c->stage_failed = TRUE;
    }
    c->stage_size = STAGE_SIZE;
  }
  cudaError_t e = cudaSuccess;
  if (c->stage_failed) {
    e = cudaMemcpyAsync (dst, src, nbytes, cudaMemcpyHostToDevice, c->stream);
    if (e == cudaSuccess)
      e = cudaStreamSynchronize (c->stream);
  } else {
    size_t off = 0;
    int w = c->stage_next;
    while (off < nbytes && e == cudaSuccess) {
      size_t len = MIN (c->stage_size, nbytes - off);
      e = cudaEventSynchronize (c->stage_ev[w]);   /* the DMA out of this buffer is done */
      if (e != cudaSuccess)
        break;
      memcpy (c->stage[w], (const char *) src + off, len);
      e = cudaMemcpyAsync ((char *) dst + off, c->stage[w], len, cudaMemcpyHostToDevice, c->stream);
      if (e == cudaSuccess)
        e = cudaEventRecord (c->stage_ev[w], c->stream);
      w ^= 1;
      off += len;
    }
    c->stage_next = w;
  }
  g_mutex_unlock (&c->stage_lock);
  if (e != cudaSuccess)
    return dcu_fail (error, e, "upload");
  return TRUE;
}

static gboolean
cuda_upload (DiffuseDevice *dev, gpointer dst, const void *src, size_t nbytes, GError **error)
{
  return dcu_upload (dcu_ctx (dev), dst, src, nbytes, error);
}

static gboolean
cuda_download (DiffuseDevice *dev, void *dst, gconstpointer src, size_t nbytes, GError **error)
{
  CudaCtx *c = dcu_ctx (dev);
  if (nbytes == 0)
    return TRUE;
  if (c->capturing) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                 "%s: device-to-host copy inside a CUDA graph capture", diffuse_device_name (dev));
    return FALSE;
  }
  if (!dcu_enter (c, error))
    return FALSE;
  DCU_PROF (c, "download");
  DCU_TRY (cudaMemcpyAsync (dst, src, nbytes, cudaMemcpyDeviceToHost, c->stream), "download");
  /* also where an earlier asynchronous kernel failure surfaces */
  DCU_TRY (cudaStreamSynchronize (c->stream), "download (an earlier kernel may have failed)");
  return TRUE;
}

/* ---- public extras (diffuse-cuda.h) ------------------------------------------ */

gboolean
diffuse_device_is_cuda (DiffuseDevice *dev)
{
  return dev && diffuse_device_ops (dev) == cuda_ops ();
}

gboolean
diffuse_cuda_synchronize (DiffuseDevice *dev, GError **error)
{
  if (!diffuse_device_is_cuda (dev))
    return TRUE;
  CudaCtx *c = dcu_ctx (dev);
  if (!dcu_enter (c, error))
    return FALSE;
  DCU_TRY (cudaStreamSynchronize (c->stream), "synchronize");
  return TRUE;
}

const char *
diffuse_cuda_device_name (DiffuseDevice *dev)
{
  if (!diffuse_device_is_cuda (dev))
    return diffuse_device_name (dev);
  return dcu_ctx (dev)->name;
}

/* ---- discovery ------------------------------------------------------------------ */

static int
cuda_count (void)
{
  const char *off = g_getenv ("DIFFUSE_DISABLE_CUDA");
  if (off && *off && strcmp (off, "0") != 0)
    return 0;
  int n = 0;
  cudaError_t e = cudaGetDeviceCount (&n);
  if (e != cudaSuccess) {
    cudaGetLastError ();
    return 0;
  }
  return n;
}

/* Frees c and whatever of it exists (a failed open's part, or a whole device at close). */
static void
ctx_release (CudaCtx *c)
{
  dcu_pool_destroy (c);
  for (int i = 0; i < 2; i++) {
    if (c->stage[i])
      cudaFreeHost (c->stage[i]);
    if (c->stage_ev[i])
      cudaEventDestroy (c->stage_ev[i]);
  }
  if (c->blas)
    cublasDestroy (c->blas);
  if (c->blas_ws)
    cudaFree (c->blas_ws);
  if (c->stream)
    cudaStreamDestroy (c->stream);
  cudaGetLastError ();
  g_mutex_clear (&c->stage_lock);
  g_mutex_clear (&c->blas_lock);
  g_free (c);
}

static DiffuseDevice *
cuda_open (int index, GError **error)
{
  int n = cuda_count ();
  if (index < 0 || index >= n) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_DEVICE, "Device \"cuda:%d\" does not exist (%d CUDA device%s)",
                 index, n, n == 1 ? "" : "s");
    return NULL;
  }
  CudaCtx *c = g_new0 (CudaCtx, 1);
  c->index = index;
  g_mutex_init (&c->stage_lock);
  g_mutex_init (&c->blas_lock);
  cudaError_t e;
  cublasStatus_t bs;
  cudaDeviceProp prop;
  const char *tf32;
#define OPEN_TRY(call, what)                        \
  if ((e = (call)) != cudaSuccess) {                \
    dcu_fail (error, e, what);                      \
    goto fail;                                      \
  }
  OPEN_TRY (cudaSetDevice (index), "cudaSetDevice");
  OPEN_TRY (cudaFree (NULL), "context creation");
  OPEN_TRY (cudaGetDeviceProperties (&prop, index), "cudaGetDeviceProperties");
  c->sm_count = prop.multiProcessorCount;
  c->smem_optin = MAX (prop.sharedMemPerBlockOptin, prop.sharedMemPerBlock);
  g_strlcpy (c->name, prop.name, sizeof c->name);
  OPEN_TRY (cudaStreamCreateWithFlags (&c->stream, cudaStreamNonBlocking), "cudaStreamCreate");
  if ((bs = cublasCreate (&c->blas)) != CUBLAS_STATUS_SUCCESS) {
    dcu_fail_blas (error, bs, "cublasCreate");
    goto fail;
  }
  cublasSetStream (c->blas, c->stream);
  c->blas_ws_size = BLAS_WS_SIZE;
  OPEN_TRY (cudaMalloc (&c->blas_ws, c->blas_ws_size), "cuBLAS workspace");
  /* a fixed workspace: cuBLAS allocates nothing itself, so GEMMs can be captured */
  cublasSetWorkspace (c->blas, c->blas_ws, c->blas_ws_size);
  tf32 = g_getenv ("DIFFUSE_CUDA_TF32");
  cublasSetMathMode (c->blas, tf32 && strcmp (tf32, "1") == 0 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH);
  dcu_pool_init (c, NULL);
  {
    const char *prof = g_getenv ("DIFFUSE_CUDA_PROFILE");
    dcu_profile_on = prof && strcmp (prof, "0") != 0;
  }
  {
    char *name = g_strdup_printf ("cuda:%d", index);
    c->dev = diffuse_device_new (cuda_ops (), name, index, c);
    g_free (name);
  }
  g_message ("cuda:%d: %s, %d SMs, %.1f GiB, compute capability %d.%d", index, c->name, c->sm_count,
             prop.totalGlobalMem / (double) (1 << 30), prop.major, prop.minor);
  return c->dev;

fail:
#undef OPEN_TRY
  cudaGetLastError ();
  ctx_release (c);
  return NULL;
}

/* ops.close: every resource of the device back to the driver (no tensor is alive) */
static void
cuda_close (DiffuseDevice *dev)
{
  CudaCtx *c = dcu_ctx (dev);
  cudaSetDevice (c->index);
  if (c->stream)
    cudaStreamSynchronize (c->stream);
  ctx_release (c);
}

/* ---- the table -------------------------------------------------------------------- */

static const DiffuseBackendOps *
cuda_ops (void)
{
  static DiffuseBackendOps ops;
  static gsize init;
  if (g_once_init_enter (&init)) {
    ops.name = "cuda";
    ops.alloc = cuda_alloc;
    ops.free = cuda_free;
    ops.copy = dcu_copy;
    ops.upload = cuda_upload;
    ops.download = cuda_download;
    ops.fill_zero = dcu_fill_zero;
    ops.binary = dcu_binary;
    ops.scale = dcu_scale;
    ops.axpy = dcu_axpy;
    ops.activation = dcu_activation;
    ops.geglu = dcu_geglu;
    ops.matmul = dcu_matmul;
    ops.linear = dcu_linear;
    ops.conv2d = dcu_conv2d;
    ops.pad2d = dcu_pad2d;
    ops.upsample_nearest = dcu_upsample_nearest;
    ops.avg_pool2d = dcu_avg_pool2d;
    ops.group_norm = dcu_group_norm;
    ops.layer_norm = dcu_layer_norm;
    ops.softmax = dcu_softmax;
    ops.sdpa = dcu_sdpa;
    ops.timestep_embedding = dcu_timestep_embedding;
    ops.embedding = dcu_embedding;
    ops.close = cuda_close;
    g_once_init_leave (&init, 1);
  }
  return &ops;
}

void
_diffuse_cuda_register (void)
{
  diffuse_backend_register ("cuda", cuda_open, cuda_count);
}
