/* weighted_lru: GreedyDual-Size-Frequency. An indexed min-heap of slots by
 * (priority, push sequence), priority = clock + freq^fw / size^sw, where the
 * clock rises to the priority of each victim and size is the tier's block
 * size. Pops in exactly the order of the reference's lazily invalidated heap.
 * Reference: kvactors/policy/weighted_lru.py (WeightedLRUPolicy). */
#include "manager_core.h"

#include <math.h>

typedef struct {
    double clock, fw, sw, size_term;
    uint64_t seq;
    double *prio;   /* per slot */
    uint64_t *pseq; /* per slot */
    int64_t *freq;  /* per slot */
    int32_t *hpos;  /* per slot: position in heap, -1 when not in it */
    int32_t *heap;  /* slots, heap-ordered */
    Py_ssize_t hlen;
    int32_t *kept;  /* entries set aside while choosing victims */
    Py_ssize_t kept_cap;
} Gdsf;

#define GDSF(core) ((Gdsf *)(core)->pstate)

static int
option(PyObject *options, const char *name, double *out)
{
    if (options == NULL || !PyDict_Check(options))
        return 0;
    PyObject *v = PyDict_GetItemString(options, name);
    if (v == NULL)
        return 0;
    double d = PyFloat_AsDouble(v);
    if (d == -1.0 && PyErr_Occurred())
        return -1;
    *out = d;
    return 0;
}

static int
gdsf_init(Core *core, PyObject *options)
{
    Gdsf *p = PyMem_Calloc(1, sizeof(Gdsf));
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    core->pstate = p;
    p->fw = p->sw = 1.0;
    if (option(options, "frequency_weight", &p->fw) < 0 ||
        option(options, "size_weight", &p->sw) < 0)
        return -1;
    double size = core->block_size > 1.0 ? core->block_size : 1.0;
    p->size_term = pow(size, p->sw);
    return 0;
}

static void
gdsf_dealloc(Core *core)
{
    Gdsf *p = GDSF(core);
    if (p == NULL)
        return;
    PyMem_Free(p->prio);
    PyMem_Free(p->pseq);
    PyMem_Free(p->freq);
    PyMem_Free(p->hpos);
    PyMem_Free(p->heap);
    PyMem_Free(p->kept);
    PyMem_Free(p);
    core->pstate = NULL;
}

static int
gdsf_grow(Core *core, Py_ssize_t old_cap, Py_ssize_t new_cap)
{
    Gdsf *p = GDSF(core);
    GROW(p->prio, new_cap);
    GROW(p->pseq, new_cap);
    GROW(p->freq, new_cap);
    GROW(p->hpos, new_cap);
    GROW(p->heap, new_cap);
    for (Py_ssize_t i = old_cap; i < new_cap; i++)
        p->hpos[i] = -1;
    return 0;
}

static inline int
hless(const Gdsf *p, int32_t a, int32_t b)
{
    return p->prio[a] < p->prio[b] || (p->prio[a] == p->prio[b] && p->pseq[a] < p->pseq[b]);
}

static inline void
hset(Gdsf *p, Py_ssize_t pos, int32_t s)
{
    p->heap[pos] = s;
    p->hpos[s] = (int32_t)pos;
}

static void
sift_up(Gdsf *p, Py_ssize_t pos)
{
    int32_t s = p->heap[pos];
    while (pos > 0) {
        Py_ssize_t parent = (pos - 1) / 2;
        if (!hless(p, s, p->heap[parent]))
            break;
        hset(p, pos, p->heap[parent]);
        pos = parent;
    }
    hset(p, pos, s);
}

static void
sift_down(Gdsf *p, Py_ssize_t pos)
{
    int32_t s = p->heap[pos];
    for (;;) {
        Py_ssize_t child = 2 * pos + 1;
        if (child >= p->hlen)
            break;
        if (child + 1 < p->hlen && hless(p, p->heap[child + 1], p->heap[child]))
            child++;
        if (!hless(p, p->heap[child], s))
            break;
        hset(p, pos, p->heap[child]);
        pos = child;
    }
    hset(p, pos, s);
}

static void
heap_push(Gdsf *p, int32_t s)
{
    hset(p, p->hlen++, s);
    sift_up(p, p->hlen - 1);
}

static void
heap_remove(Gdsf *p, int32_t s)
{
    Py_ssize_t pos = p->hpos[s];
    if (pos < 0)
        return;
    p->hpos[s] = -1;
    int32_t last = p->heap[--p->hlen];
    if (pos < p->hlen) {
        hset(p, pos, last);
        sift_up(p, pos);
        sift_down(p, p->hpos[last]);
    }
}

/* A new priority for slot s: clock + freq^fw / size^sw. */
static void
reprioritise(Gdsf *p, int32_t s)
{
    p->prio[s] = p->clock + pow((double)p->freq[s], p->fw) / p->size_term;
    p->pseq[s] = p->seq++;
    if (p->hpos[s] >= 0) {
        sift_up(p, p->hpos[s]);
        sift_down(p, p->hpos[s]);
    }
    else
        heap_push(p, s);
}

static int
gdsf_insert(Core *core, PyObject *key, int32_t s)
{
    Gdsf *p = GDSF(core);
    p->freq[s] = 1;
    reprioritise(p, s);
    return 0;
}

/* Bulk insert (restore_index): insert reads no key. */
static Py_ssize_t
gdsf_insert_slots(Core *core, const int32_t *slots, Py_ssize_t n)
{
    for (Py_ssize_t k = 0; k < n; k++)
        gdsf_insert(core, NULL, slots[k]);
    return n;
}

static int
gdsf_remove(Core *core, PyObject *key, int32_t s)
{
    heap_remove(GDSF(core), s);
    return 0;
}

static int
gdsf_touch(Core *core, PyObject *const *keys, Py_ssize_t n)
{
    Gdsf *p = GDSF(core);
    for (Py_ssize_t k = n - 1; k >= 0; k--) {
        int32_t s = core_slot(core, keys[k]);
        if (s == -2)
            return -1;
        if (s >= 0) {
            p->freq[s]++;
            reprioritise(p, s);
        }
    }
    return 0;
}

static Py_ssize_t
gdsf_evict(Core *core, Py_ssize_t n, uint32_t epoch, PyObject *const *call, Py_ssize_t ncall,
           int32_t *out)
{
    Gdsf *p = GDSF(core);
    if (p->kept_cap < p->hlen) {
        int32_t *kept = PyMem_Realloc(p->kept, (size_t)p->hlen * sizeof(int32_t));
        if (kept == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        p->kept = kept;
        p->kept_cap = p->hlen;
    }
    /* Lowest (priority, sequence) first; set aside the rest. */
    Py_ssize_t found = 0, kept = 0;
    while (found < n && p->hlen > 0) {
        int32_t i = p->heap[0];
        heap_remove(p, i);
        if (core_evictable(core, i, epoch))
            out[found++] = i;
        else
            p->kept[kept++] = i;
    }
    for (Py_ssize_t k = 0; k < kept; k++)
        heap_push(p, p->kept[k]);
    if (found < n) {
        for (Py_ssize_t k = 0; k < found; k++)
            heap_push(p, out[k]);
        return 0;
    }
    for (Py_ssize_t k = 0; k < n; k++) /* the clock rises to each victim's priority */
        if (p->prio[out[k]] > p->clock)
            p->clock = p->prio[out[k]];
    return n;
}

static PyObject *
gdsf_keys(Core *core)
{
    PyObject *out = PyList_New(core->used);
    if (out == NULL)
        return NULL;
    Py_ssize_t k = 0; /* slot order */
    for (Py_ssize_t i = 0; i < core->cap && k < core->used; i++)
        if (core_used(core, (int32_t)i)) {
            PyObject *key = core_key(core, (int32_t)i);
            if (key == NULL) {
                Py_DECREF(out);
                return NULL;
            }
            PyList_SET_ITEM(out, k++, key);
        }
    return out;
}

/* ("weighted_lru", clock, {key: (priority, frequency)}) */
static PyObject *
gdsf_state(Core *core)
{
    Gdsf *p = GDSF(core);
    PyObject *prio = PyDict_New();
    if (prio == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < core->cap; i++) {
        if (!core_used(core, (int32_t)i))
            continue;
        PyObject *key = core_key(core, (int32_t)i);
        PyObject *v = key ? Py_BuildValue("(dL)", p->prio[i], (long long)p->freq[i]) : NULL;
        if (v == NULL || PyDict_SetItem(prio, key, v) < 0) {
            Py_XDECREF(v);
            Py_XDECREF(key);
            Py_DECREF(prio);
            return NULL;
        }
        Py_DECREF(key);
        Py_DECREF(v);
    }
    return Py_BuildValue("(sdN)", "weighted_lru", p->clock, prio);
}

const PolicyOps weighted_lru_ops = {
    .name = "weighted_lru",
    .init = gdsf_init,
    .dealloc = gdsf_dealloc,
    .grow = gdsf_grow,
    .insert = gdsf_insert,
    .insert_slots = gdsf_insert_slots,
    .insert_many = policy_insert_each,
    .remove = gdsf_remove,
    .touch = gdsf_touch,
    .evict = gdsf_evict,
    .keys = gdsf_keys,
    .state = gdsf_state,
};
