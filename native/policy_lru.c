/* lru: one recency list over slots, least recent at the head.
 * Reference: kvactors/policy/lru.py (LRUPolicy). */
#include "manager_core.h"

typedef struct {
    int32_t *prev, *next;
    int32_t head, tail;
    Py_ssize_t len;
} Lru;

#define LRU(core) ((Lru *)(core)->pstate)

static int
lru_init(Core *core, PyObject *options)
{
    Lru *p = PyMem_Calloc(1, sizeof(Lru));
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    p->head = p->tail = -1;
    core->pstate = p;
    return 0;
}

static void
lru_dealloc(Core *core)
{
    Lru *p = LRU(core);
    if (p == NULL)
        return;
    PyMem_Free(p->prev);
    PyMem_Free(p->next);
    PyMem_Free(p);
    core->pstate = NULL;
}

static int
lru_grow(Core *core, Py_ssize_t old_cap, Py_ssize_t new_cap)
{
    Lru *p = LRU(core);
    GROW(p->prev, new_cap);
    GROW(p->next, new_cap);
    return 0;
}

static int
lru_insert(Core *core, PyObject *key, int32_t s)
{
    Lru *p = LRU(core);
    list_push(p->prev, p->next, &p->head, &p->tail, s);
    p->len++;
    return 0;
}

/* Bulk insert (restore_index): the slots come in random order, so each
 * one's prev/next lines are fetched a few slots ahead. */
static Py_ssize_t
lru_insert_slots(Core *core, const int32_t *slots, Py_ssize_t n)
{
    enum { AHEAD = 16 };
    Lru *p = LRU(core);
    int32_t *prev = p->prev, *next = p->next, last = p->tail;
    for (Py_ssize_t k = 0; k < n; k++) {
        if (k + AHEAD < n) {
            __builtin_prefetch(&prev[slots[k + AHEAD]], 1);
            __builtin_prefetch(&next[slots[k + AHEAD]], 1);
        }
        int32_t s = slots[k];
        prev[s] = last;
        if (last >= 0)
            next[last] = s;
        else
            p->head = s;
        last = s;
    }
    if (n > 0) {
        next[last] = -1;
        p->tail = last;
    }
    p->len += n;
    return n;
}

static int
lru_remove(Core *core, PyObject *key, int32_t s)
{
    Lru *p = LRU(core);
    list_unlink(p->prev, p->next, &p->head, &p->tail, s);
    p->len--;
    return 0;
}

static int
lru_touch(Core *core, PyObject *const *keys, Py_ssize_t n)
{
    Lru *p = LRU(core);
    for (Py_ssize_t k = n - 1; k >= 0; k--) {
        int32_t s = core_slot(core, keys[k]);
        if (s == -2)
            return -1;
        if (s >= 0 && s != p->tail) {
            list_unlink(p->prev, p->next, &p->head, &p->tail, s);
            list_push(p->prev, p->next, &p->head, &p->tail, s);
        }
    }
    return 0;
}

static Py_ssize_t
lru_evict(Core *core, Py_ssize_t n, uint32_t epoch, PyObject *const *call, Py_ssize_t ncall,
          int32_t *out)
{
    Lru *p = LRU(core);
    Py_ssize_t found = 0;
    for (int32_t i = p->head; i >= 0 && found < n; i = p->next[i])
        if (core_evictable(core, i, epoch))
            out[found++] = i;
    if (found < n)
        return 0;
    for (Py_ssize_t k = 0; k < n; k++)
        list_unlink(p->prev, p->next, &p->head, &p->tail, out[k]);
    p->len -= n;
    return n;
}

static PyObject *
lru_keys(Core *core)
{
    Lru *p = LRU(core);
    return core_list_slots(core, p->next, p->head, p->len);
}

/* ("lru", [keys, least recent first]) */
static PyObject *
lru_state(Core *core)
{
    return Py_BuildValue("(sN)", "lru", lru_keys(core));
}

const PolicyOps lru_ops = {
    .name = "lru",
    .init = lru_init,
    .dealloc = lru_dealloc,
    .grow = lru_grow,
    .insert = lru_insert,
    .insert_many = policy_insert_each,
    .insert_slots = lru_insert_slots,
    .remove = lru_remove,
    .touch = lru_touch,
    .evict = lru_evict,
    .keys = lru_keys,
    .state = lru_state,
};
