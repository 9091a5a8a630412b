/* The range allocator under the CUDA pool (diffuse-core/tensor/range-pool.h),
 * on host memory: best fit, merging of freed neighbours, reuse of one
 * phase's memory by the next, segments sized and trimmed, bad frees refused,
 * and a random alloc/free run checked against a model of the bytes in use
 * (every live block inside a segment, no two overlapping). */
#include <string.h>
#include "tensor/range-pool.h"

#define MiB ((size_t) 1 << 20)

typedef struct {
  int n_alloc, n_free;
  size_t last_size;
  gboolean fail;
} Segs;

static void *
seg_alloc (size_t size, gpointer user)
{
  Segs *s = (Segs *) user;
  if (s->fail)
    return NULL;
  s->n_alloc++;
  s->last_size = size;
  return g_malloc (size);
}

static void
seg_free (void *base, gpointer user)
{
  ((Segs *) user)->n_free++;
  g_free (base);
}

static void
test_best_fit_and_merge (void)
{
  Segs segs = { 0 };
  DiffuseRangePool *p = _diffuse_range_pool_new (8 * MiB, 512, seg_alloc, seg_free, &segs);
  g_assert_null (_diffuse_range_pool_alloc (p, 100, FALSE));   /* no segment yet, no growth */
  guint8 *a = _diffuse_range_pool_alloc (p, 2 * MiB, TRUE);
  guint8 *b = _diffuse_range_pool_alloc (p, 1 * MiB, TRUE);
  guint8 *c = _diffuse_range_pool_alloc (p, 3 * MiB, TRUE);
  guint8 *d = _diffuse_range_pool_alloc (p, 1 * MiB, TRUE);
  g_assert_cmpint (segs.n_alloc, ==, 1);
  g_assert_cmpuint (segs.last_size, ==, 8 * MiB);
  /* carved in order from the segment's start; 1 MiB left at the end */
  g_assert_true (b == a + 2 * MiB && c == b + MiB && d == c + 3 * MiB);
  g_assert_cmpuint (_diffuse_range_pool_live (p), ==, 7 * MiB);
  g_assert_cmpuint (_diffuse_range_pool_largest_free (p), ==, 1 * MiB);

  /* holes of 2 MiB (a), 3 MiB (c) and the 1 MiB tail: best fit */
  _diffuse_range_pool_free (p, a);
  _diffuse_range_pool_free (p, c);
  guint8 *e = _diffuse_range_pool_alloc (p, MiB + MiB / 2, FALSE);
  g_assert_true (e == a);
  guint8 *f = _diffuse_range_pool_alloc (p, 2 * MiB + MiB / 2, FALSE);
  g_assert_true (f == c);
  guint8 *g = _diffuse_range_pool_alloc (p, MiB, FALSE);   /* the tail, an exact fit */
  g_assert_true (g == d + MiB);
  g_assert_null (_diffuse_range_pool_alloc (p, MiB, FALSE));   /* two 512 KiB rests only */
  g_assert_cmpuint (_diffuse_range_pool_largest_free (p), ==, MiB / 2);
  _diffuse_range_pool_free (p, e);
  _diffuse_range_pool_free (p, f);
  _diffuse_range_pool_free (p, g);
  /* free: [0, 2) b [3, 6) d [7, 8) (MiB): freeing b merges both sides */
  g_assert_cmpuint (_diffuse_range_pool_largest_free (p), ==, 3 * MiB);
  _diffuse_range_pool_free (p, b);
  g_assert_cmpuint (_diffuse_range_pool_largest_free (p), ==, 6 * MiB);
  _diffuse_range_pool_free (p, d);   /* and d joins that with the tail: one range */
  g_assert_cmpuint (_diffuse_range_pool_largest_free (p), ==, 8 * MiB);
  g_assert_cmpuint (_diffuse_range_pool_live (p), ==, 0);

  /* requests round up to the alignment */
  guint8 *h = _diffuse_range_pool_alloc (p, 1, FALSE);
  guint8 *i = _diffuse_range_pool_alloc (p, 513, FALSE);
  g_assert_true (i == h + 512);
  g_assert_cmpuint (_diffuse_range_pool_live (p), ==, 512 + 1024);
  _diffuse_range_pool_free (p, h);
  _diffuse_range_pool_free (p, i);
  _diffuse_range_pool_destroy (p);
  g_assert_cmpint (segs.n_free, ==, 1);
}

/* the run's shape: many mid-sized blocks of phase 1 freed, then phase 2 asks
 * for blocks larger than any of them; they must come from the merged space */
static void
test_phase_reuse (void)
{
  Segs segs = { 0 };
  DiffuseRangePool *p = _diffuse_range_pool_new (64 * MiB, 512, seg_alloc, seg_free, &segs);
  void *blk[40];
  for (int i = 0; i < 40; i++)
    blk[i] = _diffuse_range_pool_alloc (p, (size_t) (1 + i % 3) * MiB + 4096 * i, TRUE);
  /* 82 MiB of blocks: two 64 MiB segments */
  const size_t reserved = _diffuse_range_pool_reserved (p);
  g_assert_cmpuint (reserved, ==, 128 * MiB);
  for (int i = 0; i < 40; i++)
    _diffuse_range_pool_free (p, blk[i]);
  void *big[2];
  for (int i = 0; i < 2; i++)
    big[i] = _diffuse_range_pool_alloc (p, 30 * MiB, FALSE);
  g_assert_nonnull (big[0]);
  g_assert_nonnull (big[1]);
  g_assert_cmpuint (_diffuse_range_pool_reserved (p), ==, reserved);
  for (int i = 0; i < 2; i++)
    _diffuse_range_pool_free (p, big[i]);
  _diffuse_range_pool_destroy (p);
}

static void
test_segments_and_trim (void)
{
  Segs segs = { 0 };
  DiffuseRangePool *p = _diffuse_range_pool_new (4 * MiB, 512, seg_alloc, seg_free, &segs);
  void *a = _diffuse_range_pool_alloc (p, 3 * MiB, TRUE);
  void *b = _diffuse_range_pool_alloc (p, 3 * MiB, TRUE);   /* does not fit the first: a second segment */
  void *c = _diffuse_range_pool_alloc (p, 9 * MiB + 1, TRUE);   /* bigger than the minimum: rounded to 2 MiB */
  g_assert_cmpint (segs.n_alloc, ==, 3);
  g_assert_cmpuint (segs.last_size, ==, 10 * MiB);
  g_assert_cmpuint (_diffuse_range_pool_n_segments (p), ==, 3);
  g_assert_cmpuint (_diffuse_range_pool_reserved (p), ==, 18 * MiB);
  /* 1 MiB left in each of the first two: a 1 MiB request takes the oldest */
  void *d = _diffuse_range_pool_alloc (p, MiB, FALSE);
  g_assert_true ((guint8 *) d == (guint8 *) a + 3 * MiB);
  /* trim hands back only empty segments */
  _diffuse_range_pool_free (p, b);
  g_assert_cmpuint (_diffuse_range_pool_trim (p), ==, 4 * MiB);
  g_assert_cmpuint (_diffuse_range_pool_n_segments (p), ==, 2);
  g_assert_cmpuint (_diffuse_range_pool_reserved (p), ==, 14 * MiB);
  /* the segment allocator failing: NULL, nothing changes */
  segs.fail = TRUE;
  g_assert_null (_diffuse_range_pool_alloc (p, 20 * MiB, TRUE));
  g_assert_cmpuint (_diffuse_range_pool_reserved (p), ==, 14 * MiB);
  segs.fail = FALSE;
  /* absurd sizes: NULL, no overflow */
  g_assert_null (_diffuse_range_pool_alloc (p, G_MAXSIZE - 10, TRUE));
  /* bad frees: refused with a critical, state unchanged */
  const size_t live = _diffuse_range_pool_live (p);
  g_test_expect_message ("diffuse", G_LOG_LEVEL_CRITICAL, "*not a live block*");
  _diffuse_range_pool_free (p, (guint8 *) a + 512);   /* inside a block */
  g_test_assert_expected_messages ();
  g_test_expect_message ("diffuse", G_LOG_LEVEL_CRITICAL, "*not a live block*");
  _diffuse_range_pool_free (p, b);   /* its segment is gone */
  g_test_assert_expected_messages ();
  _diffuse_range_pool_free (p, a);
  g_test_expect_message ("diffuse", G_LOG_LEVEL_CRITICAL, "*not a live block*");
  _diffuse_range_pool_free (p, a);   /* twice */
  g_test_assert_expected_messages ();
  g_assert_cmpuint (_diffuse_range_pool_live (p), ==, live - 3 * MiB);
  _diffuse_range_pool_free (p, c);
  _diffuse_range_pool_free (p, d);
  g_assert_cmpuint (_diffuse_range_pool_live (p), ==, 0);
  g_assert_cmpuint (_diffuse_range_pool_trim (p), ==, 14 * MiB);
  g_assert_cmpuint (_diffuse_range_pool_reserved (p), ==, 0);
  g_assert_cmpint (segs.n_free, ==, 3);
  _diffuse_range_pool_destroy (p);
}

/* random allocs and frees; every live block is filled with its own byte
 * pattern and checked when freed (an overlap would overwrite one) */
static void
test_random (void)
{
  Segs segs = { 0 };
  DiffuseRangePool *p = _diffuse_range_pool_new (2 * MiB, 512, seg_alloc, seg_free, &segs);
  GRand *rng = g_rand_new_with_seed (7);
  enum { N = 300 };
  guint8 *ptr[N] = { 0 };
  size_t len[N] = { 0 };
  size_t model_live = 0;
  for (int step = 0; step < 20000; step++) {
    int i = g_rand_int_range (rng, 0, N);
    if (ptr[i]) {
      for (size_t k = 0; k < len[i]; k += 97)
        g_assert_cmpuint (ptr[i][k], ==, (guint8) i);
      _diffuse_range_pool_free (p, ptr[i]);
      model_live -= (len[i] + 511) / 512 * 512;
      ptr[i] = NULL;
    } else {
      len[i] = g_rand_int_range (rng, 1, g_rand_boolean (rng) ? 4096 : 3 * 1024 * 1024);
      ptr[i] = _diffuse_range_pool_alloc (p, len[i], TRUE);
      g_assert_nonnull (ptr[i]);
      g_assert_cmpuint (((guintptr) ptr[i]) % 16, ==, 0);
      memset (ptr[i], i, len[i]);
      model_live += (len[i] + 511) / 512 * 512;
    }
    g_assert_cmpuint (_diffuse_range_pool_live (p), ==, model_live);
  }
  for (int i = 0; i < N; i++)
    if (ptr[i]) {
      for (size_t k = 0; k < len[i]; k += 97)
        g_assert_cmpuint (ptr[i][k], ==, (guint8) i);
      _diffuse_range_pool_free (p, ptr[i]);
    }
  g_assert_cmpuint (_diffuse_range_pool_live (p), ==, 0);
  /* everything merged back: every segment empty, all handed back */
  const size_t reserved = _diffuse_range_pool_reserved (p);
  g_assert_cmpuint (reserved, >, 0);
  g_assert_cmpuint (_diffuse_range_pool_trim (p), ==, reserved);
  g_assert_cmpuint (_diffuse_range_pool_reserved (p), ==, 0);
  g_test_message ("%d segments taken over the run", segs.n_alloc);
  g_rand_free (rng);
  _diffuse_range_pool_destroy (p);
  g_assert_cmpint (segs.n_alloc, ==, segs.n_free);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  g_test_add_func ("/range-pool/best-fit-and-merge", test_best_fit_and_merge);
  g_test_add_func ("/range-pool/phase-reuse", test_phase_reuse);
  g_test_add_func ("/range-pool/segments-and-trim", test_segments_and_trim);
  g_test_add_func ("/range-pool/random", test_random);
  return g_test_run ();
}
