/* gst-diffuse — errors of the core.
 *
 * Every failure the core reports to a caller is a GError in DIFFUSE_ERROR
 * with one of the codes below.  Messages name the file, tensor, component or
 * repository involved.  Assertions (g_return_val_if_fail) are kept for
 * programmer errors only. */
#pragma once

#include <glib.h>

G_BEGIN_DECLS

#define DIFFUSE_ERROR (diffuse_error_quark ())
GQuark diffuse_error_quark (void);

typedef enum {
  DIFFUSE_ERROR_FAILED,            /* anything not listed below */
  DIFFUSE_ERROR_IO,                /* open/read/write/mmap failed */
  DIFFUSE_ERROR_NOT_FOUND,         /* a folder, file, component or tensor is missing */
  DIFFUSE_ERROR_CORRUPT,           /* a file is malformed (header, JSON, sizes) */
  DIFFUSE_ERROR_UNSUPPORTED,       /* valid input we do not handle (e.g. a pickle-only checkpoint) */
  DIFFUSE_ERROR_INVALID_ARGUMENT,  /* a parameter or option out of range */
  DIFFUSE_ERROR_VARIANT,           /* a requested variant is not present */
  DIFFUSE_ERROR_CONFIG,            /* a config.json / model_index.json that does not fit */
  DIFFUSE_ERROR_OUT_OF_MEMORY,     /* an allocation failed (host or device) */
  DIFFUSE_ERROR_DEVICE,            /* a backend/device could not be used */
  DIFFUSE_ERROR_CANCELLED,         /* the caller cancelled */
  DIFFUSE_ERROR_NETWORK,           /* could not reach the server */
  DIFFUSE_ERROR_REPO_NOT_FOUND,    /* the Hub says the repository does not exist */
  DIFFUSE_ERROR_REVISION_NOT_FOUND,
  DIFFUSE_ERROR_ENTRY_NOT_FOUND,   /* a file not in the repo (or not in the cache, offline) */
  DIFFUSE_ERROR_GATED,             /* 401/403: token needed or access not granted */
  DIFFUSE_ERROR_SERVER,            /* 5xx / 429 after the retries */
  DIFFUSE_ERROR_DISK_FULL,
  DIFFUSE_ERROR_CHECKSUM,          /* size or hash mismatch of a download */
  DIFFUSE_ERROR_OFFLINE,           /* offline mode and the file is not cached */
} DiffuseErrorCode;

G_END_DECLS
