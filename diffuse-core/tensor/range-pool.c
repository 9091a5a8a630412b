/* gst-diffuse — a best-fit range allocator over large segments (range-pool.h).
 *
 * Each segment keeps its ranges in an array sorted by offset that covers the
 * segment exactly: used and free ranges alternate with no two free ones
 * adjacent (they are merged on free).  Allocation scans every free range for
 * the best fit: the pool sits under exact-size caches, so it sees only the
 * misses (a phase change of a run, the first step of a loop), and a run has
 * a few dozen segments of a few hundred ranges. */
#include "range-pool.h"

#define SEGMENT_STEP ((size_t) 2 << 20)   /* big requests: segments rounded to 2 MiB */

typedef struct {
  size_t off, size;
  gboolean used;
} Range;

typedef struct {
  guint8 *base;
  size_t size, live;
  GArray *ranges;   /* Range, sorted by off */
} Segment;

struct _DiffuseRangePool {
  size_t segment_min, align;
  DiffuseRangeSegAlloc seg_alloc;
  DiffuseRangeSegFree seg_free;
  gpointer user;
  GPtrArray *segs;  /* Segment*, oldest first */
  size_t reserved, live;
};

static size_t
round_up (size_t n, size_t a)
{
  return (n + a - 1) / a * a;
}

DiffuseRangePool *
_diffuse_range_pool_new (size_t segment_min, size_t align, DiffuseRangeSegAlloc seg_alloc,
                         DiffuseRangeSegFree seg_free, gpointer user)
{
  g_return_val_if_fail (align > 0 && seg_alloc && seg_free, NULL);
  DiffuseRangePool *p = g_new0 (DiffuseRangePool, 1);
  p->align = align;
  p->segment_min = round_up (MAX (segment_min, align), align);
  p->seg_alloc = seg_alloc;
  p->seg_free = seg_free;
  p->user = user;
  p->segs = g_ptr_array_new ();
  return p;
}

/* range j of segment s becomes a used block of `size` bytes (its head) */
static void *
carve (DiffuseRangePool *p, Segment *s, guint j, size_t size)
{
  Range *r = &g_array_index (s->ranges, Range, j);
  if (r->size > size) {
    Range rest = { r->off + size, r->size - size, FALSE };
    r->size = size;
    g_array_insert_val (s->ranges, j + 1, rest);
    r = &g_array_index (s->ranges, Range, j);
  }
  r->used = TRUE;
  s->live += size;
  p->live += size;
  return s->base + r->off;
}

void *
_diffuse_range_pool_alloc (DiffuseRangePool *p, size_t size, gboolean grow)
{
  g_return_val_if_fail (p != NULL, NULL);
  if (size > G_MAXSIZE - SEGMENT_STEP - p->align)
    return NULL;
  size = round_up (MAX (size, (size_t) 1), p->align);
  Segment *best = NULL;
  guint best_j = 0;
  size_t best_size = G_MAXSIZE;
  for (guint i = 0; i < p->segs->len && best_size != size; i++) {
    Segment *s = (Segment *) g_ptr_array_index (p->segs, i);
    if (s->size - s->live < size)
      continue;
    for (guint j = 0; j < s->ranges->len && best_size != size; j++) {
      const Range *r = &g_array_index (s->ranges, Range, j);
      if (!r->used && r->size >= size && r->size < best_size) {
        best = s;
        best_j = j;
        best_size = r->size;   /* an exact fit ends the search */
      }
    }
  }
  if (best)
    return carve (p, best, best_j, size);
  if (!grow)
    return NULL;
  const size_t seg_size = MAX (p->segment_min, round_up (size, SEGMENT_STEP));
  void *base = p->seg_alloc (seg_size, p->user);
  if (!base)
    return NULL;
  Segment *s = g_new0 (Segment, 1);
  s->base = (guint8 *) base;
  s->size = seg_size;
  s->ranges = g_array_new (FALSE, FALSE, sizeof (Range));
  Range all = { 0, seg_size, FALSE };
  g_array_append_val (s->ranges, all);
  g_ptr_array_add (p->segs, s);
  p->reserved += seg_size;
  return carve (p, s, 0, size);
}

void
_diffuse_range_pool_free (DiffuseRangePool *p, void *ptr)
{
  g_return_if_fail (p != NULL);
  if (!ptr)
    return;
  const guint8 *q = (const guint8 *) ptr;
  for (guint i = 0; i < p->segs->len; i++) {
    Segment *s = (Segment *) g_ptr_array_index (p->segs, i);
    if (q < s->base || q >= s->base + s->size)
      continue;
    const size_t off = (size_t) (q - s->base);
    guint lo = 0, hi = s->ranges->len;   /* the range starting at off */
    while (lo < hi) {
      guint mid = lo + (hi - lo) / 2;
      if (g_array_index (s->ranges, Range, mid).off < off)
        lo = mid + 1;
      else
        hi = mid;
    }
    Range *r = lo < s->ranges->len ? &g_array_index (s->ranges, Range, lo) : NULL;
    if (!r || r->off != off || !r->used)
      break;
    r->used = FALSE;
    s->live -= r->size;
    p->live -= r->size;
    if (lo + 1 < s->ranges->len && !g_array_index (s->ranges, Range, lo + 1).used) {
      r->size += g_array_index (s->ranges, Range, lo + 1).size;
      g_array_remove_index (s->ranges, lo + 1);
    }
    if (lo > 0 && !g_array_index (s->ranges, Range, lo - 1).used) {
      g_array_index (s->ranges, Range, lo - 1).size += g_array_index (s->ranges, Range, lo).size;
      g_array_remove_index (s->ranges, lo);
    }
    return;
  }
  g_critical ("range pool: free of %p, which is not a live block", ptr);
}

static void
segment_free (DiffuseRangePool *p, Segment *s)
{
  p->seg_free (s->base, p->user);
  p->reserved -= s->size;
  p->live -= s->live;
  g_array_unref (s->ranges);
  g_free (s);
}

size_t
_diffuse_range_pool_trim (DiffuseRangePool *p)
{
  g_return_val_if_fail (p != NULL, 0);
  size_t released = 0;
  for (guint i = p->segs->len; i-- > 0;) {
    Segment *s = (Segment *) g_ptr_array_index (p->segs, i);
    if (s->live == 0) {
      released += s->size;
      g_ptr_array_remove_index (p->segs, i);
      segment_free (p, s);
    }
  }
  return released;
}

size_t
_diffuse_range_pool_reserved (const DiffuseRangePool *p)
{
  return p ? p->reserved : 0;
}

size_t
_diffuse_range_pool_live (const DiffuseRangePool *p)
{
  return p ? p->live : 0;
}

size_t
_diffuse_range_pool_largest_free (const DiffuseRangePool *p)
{
  size_t best = 0;
  for (guint i = 0; p && i < p->segs->len; i++) {
    const Segment *s = (const Segment *) g_ptr_array_index (p->segs, i);
    for (guint j = 0; j < s->ranges->len; j++) {
      const Range *r = &g_array_index (s->ranges, Range, j);
      if (!r->used && r->size > best)
        best = r->size;
    }
  }
  return best;
}

guint
_diffuse_range_pool_n_segments (const DiffuseRangePool *p)
{
  return p ? p->segs->len : 0;
}

void
_diffuse_range_pool_destroy (DiffuseRangePool *p)
{
  if (!p)
    return;
  for (guint i = 0; i < p->segs->len; i++)
    segment_free (p, (Segment *) g_ptr_array_index (p->segs, i));
  g_ptr_array_unref (p->segs);
  g_free (p);
}
