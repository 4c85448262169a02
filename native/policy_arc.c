/* arc: resident lists T1 (seen once) and T2 (seen again) over slots, ghost
 * lists B1/B2 of recently evicted keys (a pool of linked entries, grown as
 * needed, each list trimmed to the capacity), a float target size for T1.
 * Reference: kvactors/policy/arc.py (ARCPolicy). */
#include "manager_core.h"

enum { T1 = 0, T2 = 1 };

typedef struct {
    int32_t *prev, *next; /* per slot */
    uint8_t *where;       /* per slot: T1 or T2 */
    int32_t head[2], tail[2];
    Py_ssize_t len[2];
    double target;
    /* ghosts: gmap key -> entry index; entries gkeys/gprev/gnext/gwhich */
    KeyTable gmap;
    PyObject **gkeys;
    int32_t *gprev, *gnext, *gfree;
    uint8_t *gwhich;
    Py_ssize_t gcap, ngfree;
    int32_t ghead[2], gtail[2];
    Py_ssize_t glen[2];
} Arc;

#define ARC(core) ((Arc *)(core)->pstate)

static int
arc_init(Core *core, PyObject *options)
{
    Arc *p = PyMem_Calloc(1, sizeof(Arc));
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    core->pstate = p;
    for (int w = T1; w <= T2; w++)
        p->head[w] = p->tail[w] = p->ghead[w] = p->gtail[w] = -1;
    return 0;
}

static void
arc_dealloc(Core *core)
{
    Arc *p = ARC(core);
    if (p == NULL)
        return;
    if (p->gkeys != NULL)
        for (Py_ssize_t g = 0; g < p->gcap; g++)
            Py_XDECREF(p->gkeys[g]);
    kt_free(&p->gmap);
    PyMem_Free(p->prev);
    PyMem_Free(p->next);
    PyMem_Free(p->where);
    PyMem_Free(p->gkeys);
    PyMem_Free(p->gprev);
    PyMem_Free(p->gnext);
    PyMem_Free(p->gfree);
    PyMem_Free(p->gwhich);
    PyMem_Free(p);
    core->pstate = NULL;
}

static int
arc_grow(Core *core, Py_ssize_t old_cap, Py_ssize_t new_cap)
{
    Arc *p = ARC(core);
    GROW(p->prev, new_cap);
    GROW(p->next, new_cap);
    GROW(p->where, new_cap);
    return 0;
}

/* Room for one more ghost entry: grow the pool (doubling) when none is free. */
static int
ghost_reserve(Arc *p)
{
    if (p->ngfree > 0)
        return 0;
    Py_ssize_t cap = p->gcap ? 2 * p->gcap : 64;
    GROW(p->gprev, cap);
    GROW(p->gnext, cap);
    GROW(p->gwhich, cap);
    GROW(p->gfree, cap);
    PyObject **keys = PyMem_Realloc(p->gkeys, (size_t)cap * sizeof(PyObject *));
    if (keys == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t g = p->gcap; g < cap; g++)
        keys[g] = NULL;
    p->gkeys = keys;
    for (Py_ssize_t g = cap - 1; g >= p->gcap; g--)
        p->gfree[p->ngfree++] = (int32_t)g;
    p->gcap = cap;
    return 0;
}

/* The ghost entry of key: >= 0, -1 when none, -2 with an exception set. */
static inline int32_t
ghost_of(Arc *p, PyObject *key)
{
    return kt_find(&p->gmap, p->gkeys, key);
}

static int
ghost_drop(Arc *p, int32_t g)
{
    PyObject *key = p->gkeys[g];
    kt_delete(&p->gmap, key, g);
    int w = p->gwhich[g];
    list_unlink(p->gprev, p->gnext, &p->ghead[w], &p->gtail[w], g);
    p->glen[w]--;
    p->gkeys[g] = NULL;
    Py_DECREF(key);
    p->gfree[p->ngfree++] = g;
    return 0;
}

/* Append key to ghost list w, then trim w to the capacity, oldest first. */
static int
ghost_add(Core *core, Arc *p, PyObject *key, int w)
{
    if (ghost_reserve(p) < 0)
        return -1;
    int32_t g = p->gfree[p->ngfree - 1];
    if (kt_insert(&p->gmap, key, g) < 0)
        return -1;
    p->ngfree--;
    Py_INCREF(key);
    p->gkeys[g] = key;
    p->gwhich[g] = (uint8_t)w;
    list_push(p->gprev, p->gnext, &p->ghead[w], &p->gtail[w], g);
    p->glen[w]++;
    while (p->glen[w] > core->n)
        if (ghost_drop(p, p->ghead[w]) < 0)
            return -1;
    return 0;
}

static inline void
unlink_slot(Arc *p, int32_t s)
{
    int w = p->where[s];
    list_unlink(p->prev, p->next, &p->head[w], &p->tail[w], s);
    p->len[w]--;
}

static inline void
push_slot(Arc *p, int32_t s, int w)
{
    p->where[s] = (uint8_t)w;
    list_push(p->prev, p->next, &p->head[w], &p->tail[w], s);
    p->len[w]++;
}

static int
arc_insert(Core *core, PyObject *key, int32_t s)
{
    Arc *p = ARC(core);
    int32_t g = ghost_of(p, key);
    if (g == -2 || (g >= 0 && ghost_drop(p, g) < 0))
        return -1;
    push_slot(p, s, T1);
    return 0;
}

/* Bulk insert (restore_index): with no ghosts (a fresh manager) no key is
 * needed, each slot joins T1; the slots are random, so their lines are
 * fetched a few ahead. */
static Py_ssize_t
arc_insert_slots(Core *core, const int32_t *slots, Py_ssize_t n)
{
    enum { AHEAD = 16 };
    Arc *p = ARC(core);
    if (p->gmap.used > 0)
        for (Py_ssize_t k = 0; k < n; k++) {
            PyObject *key = core_key(core, slots[k]);
            int rc = key == NULL ? -1 : arc_insert(core, key, slots[k]);
            Py_XDECREF(key);
            if (rc < 0)
                return k;
        }
    else
        for (Py_ssize_t k = 0; k < n; k++) {
            if (k + AHEAD < n) {
                __builtin_prefetch(&p->prev[slots[k + AHEAD]], 1);
                __builtin_prefetch(&p->next[slots[k + AHEAD]], 1);
                __builtin_prefetch(&p->where[slots[k + AHEAD]], 1);
            }
            push_slot(p, slots[k], T1);
        }
    return n;
}

static int
arc_remove(Core *core, PyObject *key, int32_t s)
{
    unlink_slot(ARC(core), s);
    return 0;
}

/* A touch of a key that is not resident: a ghost hit moves the target. */
static int
touch_ghost(Core *core, Arc *p, PyObject *key)
{
    int32_t g = ghost_of(p, key);
    if (g < 0)
        return g == -2 ? -1 : 0;
    int w = p->gwhich[g];
    double mine = (double)p->glen[w], other = (double)p->glen[1 - w];
    double delta = other / mine > 1.0 ? other / mine : 1.0;
    if (w == T1) { /* B1 hit: T1 was too small */
        p->target = p->target + delta;
        if (p->target > (double)core->n)
            p->target = (double)core->n;
    }
    else {
        p->target = p->target - delta;
        if (p->target < 0.0)
            p->target = 0.0;
    }
    list_unlink(p->gprev, p->gnext, &p->ghead[w], &p->gtail[w], g);
    list_push(p->gprev, p->gnext, &p->ghead[w], &p->gtail[w], g);
    return 0;
}

static int
arc_touch(Core *core, PyObject *const *keys, Py_ssize_t n)
{
    Arc *p = ARC(core);
    for (Py_ssize_t k = n - 1; k >= 0; k--) {
        int32_t s = core_slot(core, keys[k]);
        if (s == -2)
            return -1;
        if (s < 0) {
            if (touch_ghost(core, p, keys[k]) < 0)
                return -1;
        }
        /* T1 -> T2 once ready; T2 -> its recent end. A block being written
         * was only just inserted, not used twice: it stays in T1, at its
         * recent end (as vLLM's ARC does). */
        else {
            int to = (p->where[s] == T2 || core->ref[s] >= 0) ? T2 : T1;
            unlink_slot(p, s);
            push_slot(p, s, to);
        }
    }
    return 0;
}

static int32_t
next_evictable(Core *core, Arc *p, int32_t *cursor, uint32_t epoch)
{
    while (*cursor >= 0) {
        int32_t i = *cursor;
        *cursor = p->next[i];
        if (core_evictable(core, i, epoch))
            return i;
    }
    return -1;
}

static Py_ssize_t
arc_evict(Core *core, Py_ssize_t n, uint32_t epoch, PyObject *const *call, Py_ssize_t ncall,
          int32_t *out)
{
    Arc *p = ARC(core);
    /* From T1 while it holds at least int(target) blocks, else from T2; from
     * the other list when one has no evictable block left. */
    int32_t cursor[2] = {p->head[T1], p->head[T2]};
    Py_ssize_t t1_left = p->len[T1];
    Py_ssize_t target = (Py_ssize_t)p->target;
    for (Py_ssize_t found = 0; found < n; found++) {
        int first = t1_left >= target ? T1 : T2;
        int32_t i = next_evictable(core, p, &cursor[first], epoch);
        if (i < 0 && (i = next_evictable(core, p, &cursor[1 - first], epoch)) < 0)
            return 0;
        if (p->where[i] == T1)
            t1_left--;
        out[found] = i;
    }
    /* Victims leave T1 for B1, T2 for B2. */
    for (Py_ssize_t k = 0; k < n; k++) {
        int32_t i = out[k];
        int w = p->where[i];
        unlink_slot(p, i);
        PyObject *key = core_key(core, i);
        int rc = key == NULL ? -1 : ghost_add(core, p, key, w);
        Py_XDECREF(key);
        if (rc < 0)
            return -1;
    }
    return n;
}

static PyObject *
arc_keys(Core *core)
{
    Arc *p = ARC(core);
    PyObject *t1 = core_list_slots(core, p->next, p->head[T1], p->len[T1]);
    PyObject *t2 = core_list_slots(core, p->next, p->head[T2], p->len[T2]);
    PyObject *out = NULL;
    if (t1 != NULL && t2 != NULL)
        out = PySequence_Concat(t1, t2);
    Py_XDECREF(t1);
    Py_XDECREF(t2);
    return out;
}

/* ("arc", target, T1, T2, B1, B2), each list least recent first */
static PyObject *
arc_state(Core *core)
{
    Arc *p = ARC(core);
    return Py_BuildValue("(sdNNNN)", "arc", p->target,
                         core_list_slots(core, p->next, p->head[T1], p->len[T1]),
                         core_list_slots(core, p->next, p->head[T2], p->len[T2]),
                         core_list_keys(p->gkeys, p->gnext, p->ghead[T1], p->glen[T1]),
                         core_list_keys(p->gkeys, p->gnext, p->ghead[T2], p->glen[T2]));
}

const PolicyOps arc_ops = {
    .name = "arc",
    .init = arc_init,
    .dealloc = arc_dealloc,
    .grow = arc_grow,
    .insert = arc_insert,
    .insert_slots = arc_insert_slots,
    .insert_many = policy_insert_each,
    .remove = arc_remove,
    .touch = arc_touch,
    .evict = arc_evict,
    .keys = arc_keys,
    .state = arc_state,
};
