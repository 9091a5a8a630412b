/* Private to the tensor layer: device and storage records. */
#pragma once

#include <diffuse/backend.h>
#include <diffuse/error.h>

struct _DiffuseDevice {
  const DiffuseBackendOps *ops;
  char *name;
  int index;
  gpointer backend_data;
  /* counters, updated atomically */
  gint64 resident;
  gint64 peak;
  gint64 borrowed;
  gint64 n_allocs;
};

struct _DiffuseStorage {
  gint ref_count;
  DiffuseDevice *dev;
  void *data;
  size_t nbytes;
  gboolean borrowed;
  DiffuseReleaseFunc release;
  gpointer user_data;
};

/* A tensor record viewing st (ref taken) with the given geometry. */
DiffuseTensor *_diffuse_tensor_view (DiffuseStorage *st, DiffuseDType dt, int ndim, const int64_t *shape,
                                     const int64_t *stride, size_t offset);
void _diffuse_contiguous_strides (int ndim, const int64_t *shape, int64_t *stride);

const DiffuseBackendOps *_diffuse_cpu_backend_ops (void);
