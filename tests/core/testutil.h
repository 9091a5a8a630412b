/* Helpers shared by the core tests. */
#pragma once
#include <diffuse/diffuse.h>

/* $DIFFUSE_FIXTURES/rel (static buffer per call site is not used: g_free it). */
char *tu_fixture (const char *rel);
/* Skips the current GTest (g_test_skip) and returns FALSE when the fixture is absent. */
gboolean tu_have_fixture (const char *rel);
/* For main (): FALSE, after saying which script makes it, when fixture rel
 * is missing (the program then exits 77: skipped). */
gboolean tu_require_fixture (const char *rel, const char *script);
/* Opens a safetensors fixture (aborts the test on failure). */
DiffuseSafetensors *tu_open (const char *rel);
/* An f32 CPU copy of a named tensor of the file (aborts when missing). */
DiffuseTensor *tu_get (DiffuseSafetensors *st, const char *name);
/* Asserts max|got - want| <= atol + rtol * max|want|; prints the figures. */
void tu_assert_close (DiffuseTensor *got, DiffuseTensor *want, double atol, double rtol, const char *what);
/* A temporary directory removed (recursively) by tu_rm_rf. */
/* The [H, W, 3] u8 entry `name` of st as an image (asserts it exists). */
DiffuseImage *tu_st_image (DiffuseSafetensors *st, const char *name);
/* The largest difference in 8-bit levels between img (as diffusers'
 * numpy_to_pil rounds it) and an 8-bit [H, W, 3] fixture entry of its size. */
int tu_max_level_diff (const DiffuseImage *img, const DiffuseStEntry *want);
char *tu_mkdtemp (void);
void tu_rm_rf (const char *path);
