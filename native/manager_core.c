/* kvactors._manager_core: one tier's metadata and eviction order, in C.
 *
 * The same state machine as kvactors.manager.OffloadingManager with the
 * built-in policies (the Python manager and kvactors.policy are the reference;
 * the tests run both cores against one model and against each other):
 *
 *   lru           one recency list
 *   arc           resident lists T1/T2 and ghost lists B1/B2 (keys only, each
 *                 trimmed to the capacity), a float target size for T1
 *   weighted_lru  GreedyDual-Size-Frequency: an indexed min-heap of slots by
 *                 (priority, push sequence), priority = clock + freq^fw / size^sw
 *
 * Slot ids index flat arrays: the key held, the ref count (-1 being written,
 * 0 idle, n pinned by n readers) and the policy's order data. A dict maps
 * key -> slot id. Lists run from head (least recent) to tail.
 *
 * Errors are plain Python exceptions carrying the offending key; the Python
 * manager turns them into kvactors.errors types:
 *   KeyError(key)    the key is not held
 *   ValueError(key)  wrong state (not ready for a load, not pinned for an unpin)
 *   TypeError(key)   a new key that is not exactly int or bytes
 *   IndexError(key)  a new key named twice in one prepare_store
 * Every method validates before it mutates: on an exception nothing changed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include <math.h>

enum { LRU, ARC, GDSF };
enum { T1 = 0, T2 = 1 }; /* resident lists; LRU uses T1 only */

typedef struct {
    PyObject_HEAD
    int policy;
    Py_ssize_t n;          /* capacity in blocks */
    PyObject *map;         /* dict: key -> slot id (an item of slot_objs) */
    PyObject *slot_objs;   /* tuple of the ints 0..n-1 */
    PyObject **keys;       /* key held by each slot (owned), NULL when free */
    int32_t *ref;
    int32_t *prev;
    int32_t *next;
    uint8_t *where;        /* T1 or T2 */
    uint32_t *stamp;       /* == epoch: named in the current prepare_store */
    int32_t *scratch;      /* victims of one prepare_store */
    int32_t *scratch2;     /* heap entries set aside while choosing them */
    int32_t *free_stack;   /* freed slot ids, last freed on top */
    Py_ssize_t nfree;
    Py_ssize_t next_fresh; /* fresh ids are handed out in order first */
    uint32_t epoch;
    int32_t head[2], tail[2];
    Py_ssize_t len[2];
    /* arc: ghosts live in a pool of 2n+2 entries, gmap: key -> entry */
    double target;
    PyObject *gmap, *gidx_objs;
    PyObject **gkeys;
    int32_t *gprev, *gnext, *gfree;
    uint8_t *gwhich;
    Py_ssize_t ngfree, gsize;
    int32_t ghead[2], gtail[2];
    Py_ssize_t glen[2];
    /* weighted_lru */
    double clock, fw, sw;
    uint64_t seq;
    double *prio;
    uint64_t *pseq;
    int64_t *freq;
    int32_t *heap, *hpos;
    Py_ssize_t hlen;
    Py_ssize_t used, writing, pinned;
    long long lookups, lookup_keys, hits, stores, evictions, failed_prepares;
} Core;

/* -- helpers ------------------------------------------------------------- */

/* The slot of key: >= 0, -1 when absent, -2 with an exception set. */
static inline int32_t
slot_of(Core *self, PyObject *key)
{
    PyObject *v = PyDict_GetItemWithError(self->map, key);
    if (v == NULL)
        return PyErr_Occurred() ? -2 : -1;
    return (int32_t)PyLong_AsLong(v);
}

/* Doubly linked lists over index arrays; one function pair serves the
 * resident lists (slots) and the ghost lists (ghost entries). */
static inline void
list_unlink(int32_t *prev, int32_t *next, int32_t *head, int32_t *tail, int32_t i)
{
    int32_t p = prev[i], nx = next[i];
    if (p >= 0)
        next[p] = nx;
    else
        *head = nx;
    if (nx >= 0)
        prev[nx] = p;
    else
        *tail = p;
}

static inline void
list_push(int32_t *prev, int32_t *next, int32_t *head, int32_t *tail, int32_t i)
{
    prev[i] = *tail;
    next[i] = -1;
    if (*tail >= 0)
        next[*tail] = i;
    else
        *head = i;
    *tail = i;
}

static inline void
unlink_slot(Core *self, int32_t i)
{
    int w = self->where[i];
    list_unlink(self->prev, self->next, &self->head[w], &self->tail[w], i);
    self->len[w]--;
}

static inline void
push_tail(Core *self, int32_t i, int w)
{
    self->where[i] = (uint8_t)w;
    list_push(self->prev, self->next, &self->head[w], &self->tail[w], i);
    self->len[w]++;
}

/* -- weighted_lru: an indexed min-heap of slots ----------------------------- */

static inline int
hless(Core *self, int32_t a, int32_t b)
{
    return self->prio[a] < self->prio[b] ||
           (self->prio[a] == self->prio[b] && self->pseq[a] < self->pseq[b]);
}

static inline void
hset(Core *self, Py_ssize_t pos, int32_t s)
{
    self->heap[pos] = s;
    self->hpos[s] = (int32_t)pos;
}

static void
sift_up(Core *self, Py_ssize_t pos)
{
    int32_t s = self->heap[pos];
    while (pos > 0) {
        Py_ssize_t parent = (pos - 1) / 2;
        if (!hless(self, s, self->heap[parent]))
            break;
        hset(self, pos, self->heap[parent]);
        pos = parent;
    }
    hset(self, pos, s);
}

static void
sift_down(Core *self, Py_ssize_t pos)
{
    int32_t s = self->heap[pos];
    for (;;) {
        Py_ssize_t child = 2 * pos + 1;
        if (child >= self->hlen)
            break;
        if (child + 1 < self->hlen && hless(self, self->heap[child + 1], self->heap[child]))
            child++;
        if (!hless(self, self->heap[child], s))
            break;
        hset(self, pos, self->heap[child]);
        pos = child;
    }
    hset(self, pos, s);
}

static void
heap_push(Core *self, int32_t s)
{
    hset(self, self->hlen++, s);
    sift_up(self, self->hlen - 1);
}

static void
heap_remove(Core *self, int32_t s)
{
    Py_ssize_t pos = self->hpos[s];
    if (pos < 0)
        return;
    self->hpos[s] = -1;
    int32_t last = self->heap[--self->hlen];
    if (pos < self->hlen) {
        hset(self, pos, last);
        sift_up(self, pos);
        sift_down(self, self->hpos[last]);
    }
}

static int32_t
heap_pop(Core *self)
{
    int32_t s = self->heap[0];
    heap_remove(self, s);
    return s;
}

/* A new priority for slot s: clock + freq^fw / size^sw (blocks have size 1). */
static void
gdsf_push(Core *self, int32_t s)
{
    self->prio[s] = self->clock + pow((double)self->freq[s], self->fw) / pow(1.0, self->sw);
    self->pseq[s] = self->seq++;
    if (self->hpos[s] >= 0) {
        sift_up(self, self->hpos[s]);
        sift_down(self, self->hpos[s]);
    }
    else
        heap_push(self, s);
}

/* -- arc: ghost lists -------------------------------------------------------- */

/* The ghost entry of key: >= 0, -1 when none, -2 with an exception set. */
static inline int32_t
ghost_of(Core *self, PyObject *key)
{
    PyObject *v = PyDict_GetItemWithError(self->gmap, key);
    if (v == NULL)
        return PyErr_Occurred() ? -2 : -1;
    return (int32_t)PyLong_AsLong(v);
}

static int
ghost_drop(Core *self, int32_t g)
{
    PyObject *key = self->gkeys[g];
    if (PyDict_DelItem(self->gmap, key) < 0)
        return -1;
    int w = self->gwhich[g];
    list_unlink(self->gprev, self->gnext, &self->ghead[w], &self->gtail[w], g);
    self->glen[w]--;
    self->gkeys[g] = NULL;
    Py_DECREF(key);
    self->gfree[self->ngfree++] = g;
    return 0;
}

/* Append key to ghost list w, then trim w to the capacity, oldest first. */
static int
ghost_add(Core *self, PyObject *key, int w)
{
    int32_t g = self->gfree[--self->ngfree];
    if (PyDict_SetItem(self->gmap, key, PyTuple_GET_ITEM(self->gidx_objs, g)) < 0) {
        self->ngfree++;
        return -1;
    }
    Py_INCREF(key);
    self->gkeys[g] = key;
    self->gwhich[g] = (uint8_t)w;
    list_push(self->gprev, self->gnext, &self->ghead[w], &self->gtail[w], g);
    self->glen[w]++;
    while (self->glen[w] > self->n)
        if (ghost_drop(self, self->ghead[w]) < 0)
            return -1;
    return 0;
}

/* -- the policy's side of insert / remove ------------------------------------ */

static int
order_insert(Core *self, PyObject *key, int32_t i)
{
    switch (self->policy) {
    case ARC: {
        int32_t g = ghost_of(self, key);
        if (g == -2 || (g >= 0 && ghost_drop(self, g) < 0))
            return -1;
        push_tail(self, i, T1);
        break;
    }
    case GDSF:
        self->freq[i] = 1;
        gdsf_push(self, i);
        break;
    default:
        push_tail(self, i, T1);
    }
    return 0;
}

static inline void
order_remove(Core *self, int32_t i)
{
    if (self->policy == GDSF)
        heap_remove(self, i);
    else
        unlink_slot(self, i);
}

/* Insert key at slot i as most recent with ref count r. */
static int
hold(Core *self, PyObject *key, int32_t i, int32_t r)
{
    if (order_insert(self, key, i) < 0)
        return -1;
    if (PyDict_SetItem(self->map, key, PyTuple_GET_ITEM(self->slot_objs, i)) < 0) {
        order_remove(self, i);
        return -1;
    }
    Py_INCREF(key);
    self->keys[i] = key;
    self->ref[i] = r;
    self->used++;
    return 0;
}

/* Drop slot i (its key leaves the map) and push it on the free stack.
 * Returns the key (a new reference) or NULL with an exception set. */
static PyObject *
release(Core *self, int32_t i)
{
    PyObject *key = self->keys[i];
    if (PyDict_DelItem(self->map, key) < 0)
        return NULL;
    order_remove(self, i);
    self->keys[i] = NULL;
    self->free_stack[self->nfree++] = i;
    self->used--;
    return key; /* the reference keys[i] owned */
}

static int
key_error(PyObject *type, PyObject *key)
{
    PyObject *args = PyTuple_Pack(1, key);
    if (args != NULL) {
        PyErr_SetObject(type, args);
        Py_DECREF(args);
    }
    return -1;
}

#define FAST(seq, arg)                                                        \
    PyObject *seq = PySequence_Fast((arg), "keys must be an iterable");       \
    if (seq == NULL)                                                          \
        return NULL;                                                          \
    Py_ssize_t len_##seq = PySequence_Fast_GET_SIZE(seq);                     \
    PyObject **items_##seq = PySequence_Fast_ITEMS(seq)

/* -- object life --------------------------------------------------------- */

static int
Core_init(Core *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"num_blocks", "policy", "frequency_weight", "size_weight", NULL};
    Py_ssize_t n;
    const char *policy = "lru";
    double fw = 1.0, sw = 1.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n|sdd", kwlist, &n, &policy, &fw, &sw))
        return -1;
    if (self->map != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "ManagerCore is already initialised");
        return -1;
    }
    if (n <= 0 || n > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "num_blocks must be in 1..2**31-1");
        return -1;
    }
    if (strcmp(policy, "lru") == 0)
        self->policy = LRU;
    else if (strcmp(policy, "arc") == 0)
        self->policy = ARC;
    else if (strcmp(policy, "weighted_lru") == 0)
        self->policy = GDSF;
    else {
        PyErr_Format(PyExc_ValueError, "unknown policy %s", policy);
        return -1;
    }
    self->n = n;
    self->fw = fw;
    self->sw = sw;
    self->map = PyDict_New();
    self->slot_objs = PyTuple_New(n);
    if (self->map == NULL || self->slot_objs == NULL)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromSsize_t(i);
        if (v == NULL)
            return -1;
        PyTuple_SET_ITEM(self->slot_objs, i, v);
    }
    self->keys = PyMem_Calloc((size_t)n, sizeof(PyObject *));
    self->ref = PyMem_Calloc((size_t)n, sizeof(int32_t));
    self->prev = PyMem_Calloc((size_t)n, sizeof(int32_t));
    self->next = PyMem_Calloc((size_t)n, sizeof(int32_t));
    self->where = PyMem_Calloc((size_t)n, 1);
    self->stamp = PyMem_Calloc((size_t)n, sizeof(uint32_t));
    self->scratch = PyMem_Calloc((size_t)n, sizeof(int32_t));
    self->scratch2 = PyMem_Calloc((size_t)n, sizeof(int32_t));
    self->free_stack = PyMem_Calloc((size_t)n, sizeof(int32_t));
    if (!self->keys || !self->ref || !self->prev || !self->next || !self->where ||
        !self->stamp || !self->scratch || !self->scratch2 || !self->free_stack) {
        PyErr_NoMemory();
        return -1;
    }
    self->head[T1] = self->tail[T1] = self->head[T2] = self->tail[T2] = -1;
    self->ghead[T1] = self->gtail[T1] = self->ghead[T2] = self->gtail[T2] = -1;
    self->epoch = 1;
    if (self->policy == ARC) {
        /* Each ghost list holds at most n keys, n + 1 for a moment while trimming. */
        Py_ssize_t g = 2 * n + 2;
        self->gsize = g;
        self->gmap = PyDict_New();
        self->gidx_objs = PyTuple_New(g);
        if (self->gmap == NULL || self->gidx_objs == NULL)
            return -1;
        for (Py_ssize_t i = 0; i < g; i++) {
            PyObject *v = PyLong_FromSsize_t(i);
            if (v == NULL)
                return -1;
            PyTuple_SET_ITEM(self->gidx_objs, i, v);
        }
        self->gkeys = PyMem_Calloc((size_t)g, sizeof(PyObject *));
        self->gprev = PyMem_Calloc((size_t)g, sizeof(int32_t));
        self->gnext = PyMem_Calloc((size_t)g, sizeof(int32_t));
        self->gfree = PyMem_Calloc((size_t)g, sizeof(int32_t));
        self->gwhich = PyMem_Calloc((size_t)g, 1);
        if (!self->gkeys || !self->gprev || !self->gnext || !self->gfree || !self->gwhich) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < g; i++)
            self->gfree[i] = (int32_t)(g - 1 - i);
        self->ngfree = g;
    }
    if (self->policy == GDSF) {
        self->prio = PyMem_Calloc((size_t)n, sizeof(double));
        self->pseq = PyMem_Calloc((size_t)n, sizeof(uint64_t));
        self->freq = PyMem_Calloc((size_t)n, sizeof(int64_t));
        self->heap = PyMem_Calloc((size_t)n, sizeof(int32_t));
        self->hpos = PyMem_Malloc((size_t)n * sizeof(int32_t));
        if (!self->prio || !self->pseq || !self->freq || !self->heap || !self->hpos) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < n; i++)
            self->hpos[i] = -1;
    }
    return 0;
}

static void
Core_dealloc(Core *self)
{
    if (self->keys != NULL) {
        for (Py_ssize_t i = 0; i < self->n; i++)
            Py_XDECREF(self->keys[i]);
    }
    PyMem_Free(self->keys);
    PyMem_Free(self->ref);
    PyMem_Free(self->prev);
    PyMem_Free(self->next);
    PyMem_Free(self->where);
    PyMem_Free(self->stamp);
    PyMem_Free(self->scratch);
    PyMem_Free(self->scratch2);
    PyMem_Free(self->free_stack);
    if (self->gkeys != NULL) {
        for (Py_ssize_t i = 0; i < self->gsize; i++)
            Py_XDECREF(self->gkeys[i]);
    }
    PyMem_Free(self->gkeys);
    PyMem_Free(self->gprev);
    PyMem_Free(self->gnext);
    PyMem_Free(self->gfree);
    PyMem_Free(self->gwhich);
    PyMem_Free(self->prio);
    PyMem_Free(self->pseq);
    PyMem_Free(self->freq);
    PyMem_Free(self->heap);
    PyMem_Free(self->hpos);
    Py_XDECREF(self->map);
    Py_XDECREF(self->slot_objs);
    Py_XDECREF(self->gmap);
    Py_XDECREF(self->gidx_objs);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* -- queries ------------------------------------------------------------- */

static PyObject *
Core_lookup(Core *self, PyObject *arg)
{
    FAST(seq, arg);
    Py_ssize_t hits = 0;
    for (; hits < len_seq; hits++) {
        int32_t s = slot_of(self, items_seq[hits]);
        if (s == -2) {
            Py_DECREF(seq);
            return NULL;
        }
        if (s < 0 || self->ref[s] < 0)
            break;
    }
    self->lookups++;
    self->lookup_keys += len_seq;
    self->hits += hits;
    Py_DECREF(seq);
    return PyLong_FromSsize_t(hits);
}

/* arc: a touch of a key that is not resident. */
static int
arc_touch_ghost(Core *self, PyObject *key)
{
    int32_t g = ghost_of(self, key);
    if (g < 0)
        return g == -2 ? -1 : 0;
    int w = self->gwhich[g];
    double mine = (double)self->glen[w], other = (double)self->glen[1 - w];
    double delta = other / mine > 1.0 ? other / mine : 1.0;
    if (w == T1) { /* B1 hit: T1 was too small */
        self->target = self->target + delta;
        if (self->target > (double)self->n)
            self->target = (double)self->n;
    }
    else {
        self->target = self->target - delta;
        if (self->target < 0.0)
            self->target = 0.0;
    }
    list_unlink(self->gprev, self->gnext, &self->ghead[w], &self->gtail[w], g);
    list_push(self->gprev, self->gnext, &self->ghead[w], &self->gtail[w], g);
    return 0;
}

static PyObject *
Core_touch(Core *self, PyObject *arg)
{
    FAST(seq, arg);
    /* In reverse, so the first key ends most recent. */
    for (Py_ssize_t k = len_seq - 1; k >= 0; k--) {
        int32_t s = slot_of(self, items_seq[k]);
        if (s == -2)
            goto fail;
        switch (self->policy) {
        case LRU:
            if (s >= 0 && s != self->tail[T1]) {
                unlink_slot(self, s);
                push_tail(self, s, T1);
            }
            break;
        case ARC:
            if (s < 0) {
                if (arc_touch_ghost(self, items_seq[k]) < 0)
                    goto fail;
            }
            /* T1 -> T2 once ready (a block being written was only just
             * inserted: not a second use); T2 -> its recent end. */
            else if (self->where[s] == T2 || self->ref[s] >= 0) {
                unlink_slot(self, s);
                push_tail(self, s, T2);
            }
            break;
        default:
            if (s >= 0) {
                self->freq[s]++;
                gdsf_push(self, s);
            }
        }
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
fail:
    Py_DECREF(seq);
    return NULL;
}

static PyObject *
Core_get(Core *self, PyObject *key)
{
    int32_t s = slot_of(self, key);
    if (s == -2)
        return NULL;
    if (s < 0)
        Py_RETURN_NONE;
    return Py_BuildValue("(ii)", (int)s, (int)self->ref[s]);
}

static PyObject *
Core_keys(Core *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New(self->used);
    if (out == NULL)
        return NULL;
    Py_ssize_t k = 0;
    if (self->policy == GDSF) { /* slot order */
        for (Py_ssize_t i = 0; i < self->n; i++)
            if (self->keys[i] != NULL) {
                Py_INCREF(self->keys[i]);
                PyList_SET_ITEM(out, k++, self->keys[i]);
            }
        return out;
    }
    for (int w = T1; w <= T2; w++) /* least recent first; arc: T1 then T2 */
        for (int32_t i = self->head[w]; i >= 0; i = self->next[i]) {
            Py_INCREF(self->keys[i]);
            PyList_SET_ITEM(out, k++, self->keys[i]);
        }
    return out;
}

static PyObject *
list_keys(PyObject **keys, int32_t *next, int32_t head, Py_ssize_t len)
{
    PyObject *out = PyList_New(len);
    if (out == NULL)
        return NULL;
    Py_ssize_t k = 0;
    for (int32_t i = head; i >= 0 && k < len; i = next[i]) {
        Py_INCREF(keys[i]);
        PyList_SET_ITEM(out, k++, keys[i]);
    }
    return out;
}

/* The policy's order data, for tests and debugging:
 *   lru           ("lru", [keys, least recent first])
 *   arc           ("arc", target, T1, T2, B1, B2)   lists least recent first
 *   weighted_lru  ("weighted_lru", clock, {key: (priority, frequency)}) */
static PyObject *
Core_policy_state(Core *self, PyObject *Py_UNUSED(ignored))
{
    if (self->policy == LRU)
        return Py_BuildValue("(sN)", "lru",
                             list_keys(self->keys, self->next, self->head[T1], self->len[T1]));
    if (self->policy == ARC)
        return Py_BuildValue(
            "(sdNNNN)", "arc", self->target,
            list_keys(self->keys, self->next, self->head[T1], self->len[T1]),
            list_keys(self->keys, self->next, self->head[T2], self->len[T2]),
            list_keys(self->gkeys, self->gnext, self->ghead[T1], self->glen[T1]),
            list_keys(self->gkeys, self->gnext, self->ghead[T2], self->glen[T2]));
    PyObject *prio = PyDict_New();
    if (prio == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < self->n; i++) {
        if (self->keys[i] == NULL)
            continue;
        PyObject *v = Py_BuildValue("(dL)", self->prio[i], (long long)self->freq[i]);
        if (v == NULL || PyDict_SetItem(prio, self->keys[i], v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(prio);
            return NULL;
        }
        Py_DECREF(v);
    }
    return Py_BuildValue("(sdN)", "weighted_lru", self->clock, prio);
}

static PyObject *
Core_counters(Core *self, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("(nnnnLLLLLL)", self->used, self->n - self->next_fresh + self->nfree,
                         self->pinned, self->writing, self->lookups, self->lookup_keys,
                         self->hits, self->stores, self->evictions, self->failed_prepares);
}

static Py_ssize_t
Core_len(Core *self)
{
    return self->used;
}

static int
Core_contains(Core *self, PyObject *key)
{
    int32_t s = slot_of(self, key);
    return s == -2 ? -1 : s >= 0;
}

/* -- store --------------------------------------------------------------- */

static inline int
evictable(Core *self, int32_t i, uint32_t epoch)
{
    return self->ref[i] == 0 && self->stamp[i] != epoch;
}

/* The next evictable slot from *cursor on in its list (-1: none left). */
static int32_t
next_evictable(Core *self, int32_t *cursor, uint32_t epoch)
{
    while (*cursor >= 0) {
        int32_t i = *cursor;
        *cursor = self->next[i];
        if (evictable(self, i, epoch))
            return i;
    }
    return -1;
}

/* Put up to need victims in scratch, in eviction order, changing nothing the
 * caller can see; returns how many were found. */
static Py_ssize_t
choose_victims(Core *self, Py_ssize_t need, uint32_t epoch)
{
    Py_ssize_t found = 0;
    if (self->policy == LRU) {
        int32_t cursor = self->head[T1];
        int32_t i;
        while (found < need && (i = next_evictable(self, &cursor, epoch)) >= 0)
            self->scratch[found++] = i;
        return found;
    }
    if (self->policy == ARC) {
        /* From T1 while it holds at least int(target) blocks, else from T2;
         * from the other list when one has no evictable block left. */
        int32_t cursor[2] = {self->head[T1], self->head[T2]};
        Py_ssize_t t1_left = self->len[T1];
        Py_ssize_t target = (Py_ssize_t)self->target;
        for (; found < need; found++) {
            int first = t1_left >= target ? T1 : T2;
            int32_t i = next_evictable(self, &cursor[first], epoch);
            if (i < 0 && (i = next_evictable(self, &cursor[1 - first], epoch)) < 0)
                break;
            if (self->where[i] == T1)
                t1_left--;
            self->scratch[found] = i;
        }
        return found;
    }
    /* weighted_lru: lowest (priority, sequence) first; set aside the rest. */
    Py_ssize_t kept = 0;
    while (found < need && self->hlen > 0) {
        int32_t i = heap_pop(self);
        if (evictable(self, i, epoch))
            self->scratch[found++] = i;
        else
            self->scratch2[kept++] = i;
    }
    for (Py_ssize_t k = 0; k < kept; k++)
        heap_push(self, self->scratch2[k]);
    if (found < need)
        for (Py_ssize_t k = 0; k < found; k++)
            heap_push(self, self->scratch[k]);
    return found;
}

/* prepare_store(keys) -> (to_store, ids, evicted, evicted_ids) or None. */
static PyObject *
Core_prepare_store(Core *self, PyObject *arg)
{
    FAST(seq, arg);
    PyObject *to_store = NULL, *ids = NULL, *evicted = NULL, *evicted_ids = NULL;
    if (++self->epoch == 0) { /* wrapped: old stamps could collide */
        memset(self->stamp, 0, (size_t)self->n * sizeof(uint32_t));
        self->epoch = 1;
    }
    uint32_t epoch = self->epoch;
    to_store = PyList_New(0);
    if (to_store == NULL)
        goto fail;
    for (Py_ssize_t k = 0; k < len_seq; k++) {
        PyObject *key = items_seq[k];
        int32_t s = slot_of(self, key);
        if (s == -2)
            goto fail;
        if (s >= 0) {
            self->stamp[s] = epoch; /* named in this call: never a victim */
            continue;
        }
        if (!PyLong_CheckExact(key) && !PyBytes_CheckExact(key)) {
            key_error(PyExc_TypeError, key);
            goto fail;
        }
        if (PyList_Append(to_store, key) < 0)
            goto fail;
    }
    Py_ssize_t m = PyList_GET_SIZE(to_store);
    if (m > 1) {
        PyObject *set = PySet_New(to_store);
        if (set == NULL)
            goto fail;
        Py_ssize_t distinct = PySet_GET_SIZE(set);
        Py_DECREF(set);
        if (distinct != m) {
            PyObject **items = PySequence_Fast_ITEMS(to_store);
            for (Py_ssize_t a = 1; a < m; a++)
                for (Py_ssize_t b = 0; b < a; b++) {
                    int eq = PyObject_RichCompareBool(items[a], items[b], Py_EQ);
                    if (eq < 0)
                        goto fail;
                    if (eq) {
                        key_error(PyExc_IndexError, items[a]);
                        goto fail;
                    }
                }
        }
    }
    Py_ssize_t need = m - (self->n - self->next_fresh + self->nfree);
    if (need < 0)
        need = 0;
    if (need > 0) {
        Py_ssize_t found = choose_victims(self, need, epoch);
        if (found < need) {
            self->failed_prepares++;
            Py_DECREF(to_store);
            Py_DECREF(seq);
            Py_RETURN_NONE;
        }
    }
    evicted = PyList_New(need);
    evicted_ids = PyList_New(need);
    ids = PyList_New(m);
    if (evicted == NULL || evicted_ids == NULL || ids == NULL)
        goto fail;
    /* From here on nothing can fail but the dict's own allocation. */
    for (Py_ssize_t v = 0; v < need; v++) {
        int32_t i = self->scratch[v];
        int w = self->where[i];
        if (self->policy == GDSF && self->prio[i] > self->clock)
            self->clock = self->prio[i]; /* the clock rises to each victim's priority */
        PyObject *key = release(self, i);
        if (key == NULL)
            goto fail;
        PyList_SET_ITEM(evicted, v, key);
        if (self->policy == ARC && ghost_add(self, key, w) < 0) /* T1 -> B1, T2 -> B2 */
            goto fail;
        PyObject *id = PyTuple_GET_ITEM(self->slot_objs, i);
        Py_INCREF(id);
        PyList_SET_ITEM(evicted_ids, v, id);
    }
    self->evictions += need;
    PyObject **new_keys = PySequence_Fast_ITEMS(to_store);
    for (Py_ssize_t k = 0; k < m; k++) {
        int32_t i = self->next_fresh < self->n ? (int32_t)self->next_fresh++
                                               : self->free_stack[--self->nfree];
        if (hold(self, new_keys[k], i, -1) < 0)
            goto fail;
        PyObject *id = PyTuple_GET_ITEM(self->slot_objs, i);
        Py_INCREF(id);
        PyList_SET_ITEM(ids, k, id);
    }
    self->writing += m;
    Py_DECREF(seq);
    return Py_BuildValue("(NNNN)", to_store, ids, evicted, evicted_ids);
fail:
    Py_XDECREF(to_store);
    Py_XDECREF(ids);
    Py_XDECREF(evicted);
    Py_XDECREF(evicted_ids);
    Py_DECREF(seq);
    return NULL;
}

/* complete_store(keys, success) -> the keys that were being written (once each). */
static PyObject *
Core_complete_store(Core *self, PyObject *args)
{
    PyObject *arg;
    int success;
    if (!PyArg_ParseTuple(args, "Op", &arg, &success))
        return NULL;
    FAST(seq, arg);
    for (Py_ssize_t k = 0; k < len_seq; k++) {
        int32_t s = slot_of(self, items_seq[k]);
        if (s < 0) {
            if (s == -1)
                key_error(PyExc_KeyError, items_seq[k]);
            Py_DECREF(seq);
            return NULL;
        }
    }
    PyObject *done = PyList_New(0);
    if (done == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    for (Py_ssize_t k = 0; k < len_seq; k++) {
        PyObject *key = items_seq[k];
        int32_t s = slot_of(self, key);
        if (s == -2)
            goto fail;
        if (s < 0 || self->ref[s] != -1) /* removed by a failure above, or ready */
            continue;
        if (PyList_Append(done, key) < 0)
            goto fail;
        self->writing--;
        if (success) {
            self->ref[s] = 0;
            self->stores++;
        }
        else {
            PyObject *gone = release(self, s);
            if (gone == NULL)
                goto fail;
            Py_DECREF(gone);
        }
    }
    Py_DECREF(seq);
    return done;
fail:
    Py_DECREF(done);
    Py_DECREF(seq);
    return NULL;
}

/* -- load ---------------------------------------------------------------- */

static PyObject *
Core_prepare_load(Core *self, PyObject *arg)
{
    FAST(seq, arg);
    PyObject *ids = PyList_New(len_seq);
    if (ids == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    for (Py_ssize_t k = 0; k < len_seq; k++) {
        int32_t s = slot_of(self, items_seq[k]);
        if (s < 0 || self->ref[s] < 0) {
            if (s != -2)
                key_error(s == -1 ? PyExc_KeyError : PyExc_ValueError, items_seq[k]);
            Py_DECREF(ids);
            Py_DECREF(seq);
            return NULL;
        }
        PyObject *id = PyTuple_GET_ITEM(self->slot_objs, s);
        Py_INCREF(id);
        PyList_SET_ITEM(ids, k, id);
    }
    for (Py_ssize_t k = 0; k < len_seq; k++) {
        int32_t s = (int32_t)PyLong_AsLong(PyList_GET_ITEM(ids, k));
        if (self->ref[s]++ == 0)
            self->pinned++;
    }
    Py_DECREF(seq);
    return ids;
}

static PyObject *
Core_complete_load(Core *self, PyObject *arg)
{
    FAST(seq, arg);
    int32_t *slots = PyMem_Malloc((size_t)(len_seq ? len_seq : 1) * sizeof(int32_t));
    if (slots == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t k = 0; k < len_seq; k++) {
        if ((slots[k] = slot_of(self, items_seq[k])) == -2)
            goto fail;
    }
    /* One at a time with undo, so a key named twice but pinned once fails. */
    for (Py_ssize_t k = 0; k < len_seq; k++) {
        int32_t s = slots[k];
        if (s < 0 || self->ref[s] <= 0) {
            for (Py_ssize_t j = 0; j < k; j++)
                if (self->ref[slots[j]]++ == 0)
                    self->pinned++;
            key_error(s == -1 ? PyExc_KeyError : PyExc_ValueError, items_seq[k]);
            goto fail;
        }
        if (--self->ref[s] == 0)
            self->pinned--;
    }
    PyMem_Free(slots);
    Py_DECREF(seq);
    Py_RETURN_NONE;
fail:
    PyMem_Free(slots);
    Py_DECREF(seq);
    return NULL;
}

/* -- removal and restore ------------------------------------------------- */

static PyObject *
Core_remove(Core *self, PyObject *arg)
{
    FAST(seq, arg);
    PyObject *removed = PyList_New(0);
    if (removed == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    for (Py_ssize_t k = 0; k < len_seq; k++) {
        int32_t s = slot_of(self, items_seq[k]);
        if (s == -2)
            goto fail;
        if (s < 0 || self->ref[s] != 0)
            continue;
        PyObject *key = release(self, s);
        if (key == NULL)
            goto fail;
        int rc = PyList_Append(removed, key);
        Py_DECREF(key);
        if (rc < 0)
            goto fail;
    }
    Py_DECREF(seq);
    return removed;
fail:
    Py_DECREF(removed);
    Py_DECREF(seq);
    return NULL;
}

/* restore(pairs) -> keys restored: (key, slot id) pairs found on disk, oldest first. */
static PyObject *
Core_restore(Core *self, PyObject *arg)
{
    if (self->used || self->next_fresh) {
        PyErr_SetString(PyExc_ValueError, "restore needs an empty core");
        return NULL;
    }
    PyObject *it = PyObject_GetIter(arg);
    if (it == NULL)
        return NULL;
    PyObject *restored = PyList_New(0);
    char *taken = PyMem_Calloc((size_t)self->n, 1);
    PyObject *pair;
    if (restored == NULL || taken == NULL)
        goto fail;
    while ((pair = PyIter_Next(it)) != NULL) {
        PyObject *key;
        Py_ssize_t id;
        if (!PyArg_ParseTuple(pair, "On", &key, &id)) {
            Py_DECREF(pair);
            goto fail;
        }
        int ok = (PyLong_CheckExact(key) || PyBytes_CheckExact(key)) && id >= 0 &&
                 id < self->n && !taken[id];
        if (ok) {
            int32_t s = slot_of(self, key);
            if (s == -2) {
                Py_DECREF(pair);
                goto fail;
            }
            ok = s == -1;
        }
        if (ok) {
            if (hold(self, key, (int32_t)id, 0) < 0 || PyList_Append(restored, key) < 0) {
                Py_DECREF(pair);
                goto fail;
            }
            taken[id] = 1;
        }
        Py_DECREF(pair);
    }
    if (PyErr_Occurred())
        goto fail;
    /* Free slots are handed out lowest first: push them highest first. */
    self->next_fresh = self->n;
    self->nfree = 0;
    for (Py_ssize_t i = self->n - 1; i >= 0; i--)
        if (!taken[i])
            self->free_stack[self->nfree++] = (int32_t)i;
    PyMem_Free(taken);
    Py_DECREF(it);
    return restored;
fail:
    PyMem_Free(taken);
    Py_XDECREF(restored);
    Py_DECREF(it);
    return NULL;
}

/* -- type ---------------------------------------------------------------- */

static PyMethodDef Core_methods[] = {
    {"lookup", (PyCFunction)Core_lookup, METH_O, "Leading keys present and ready."},
    {"touch", (PyCFunction)Core_touch, METH_O, "Move present keys to the recent end, in reverse."},
    {"get", (PyCFunction)Core_get, METH_O, "(slot id, ref count) of a key, or None."},
    {"keys", (PyCFunction)Core_keys, METH_NOARGS, "Keys held, least recent first."},
    {"policy_state", (PyCFunction)Core_policy_state, METH_NOARGS,
     "The policy's order data (lists, ghosts, target, priorities), for tests."},
    {"counters", (PyCFunction)Core_counters, METH_NOARGS,
     "(used, free, pinned, writing, lookups, lookup_keys, hits, stores, evictions, "
     "failed_prepares)"},
    {"prepare_store", (PyCFunction)Core_prepare_store, METH_O,
     "(to_store, ids, evicted, evicted_ids), or None when too few idle blocks."},
    {"complete_store", (PyCFunction)Core_complete_store, METH_VARARGS,
     "Ready (or drop) the keys being written; returns them."},
    {"prepare_load", (PyCFunction)Core_prepare_load, METH_O, "Pin keys; their slot ids."},
    {"complete_load", (PyCFunction)Core_complete_load, METH_O, "Unpin keys."},
    {"remove", (PyCFunction)Core_remove, METH_O, "Drop idle keys; returns those removed."},
    {"restore", (PyCFunction)Core_restore, METH_O, "Load (key, slot id) pairs as ready."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods Core_as_sequence = {
    .sq_length = (lenfunc)Core_len,
    .sq_contains = (objobjproc)Core_contains,
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvactors._manager_core.ManagerCore",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One tier's block metadata and eviction order (see kvactors.manager).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
    .tp_as_sequence = &Core_as_sequence,
};

/* -- argument checks of the async API, one pass each -------------------------- */

/* first_bad_key(keys) -> -1 when every key is exactly int or bytes and none is
 * named twice, else the index of the first key that is not. */
static PyObject *
first_bad_key(PyObject *Py_UNUSED(module), PyObject *arg)
{
    FAST(seq, arg);
    Py_ssize_t bad = -1;
    PyObject *seen = NULL;
    for (Py_ssize_t k = 0; k < len_seq && bad < 0; k++)
        if (!PyLong_CheckExact(items_seq[k]) && !PyBytes_CheckExact(items_seq[k]))
            bad = k;
    if (bad < 0 && len_seq > 1) {
        seen = PySet_New(NULL);
        if (seen == NULL)
            goto fail;
        for (Py_ssize_t k = 0; k < len_seq; k++) {
            int had = PySet_Contains(seen, items_seq[k]);
            if (had < 0 || (!had && PySet_Add(seen, items_seq[k]) < 0))
                goto fail;
            if (had) {
                bad = k;
                break;
            }
        }
        Py_DECREF(seen);
    }
    Py_DECREF(seq);
    return PyLong_FromSsize_t(bad);
fail:
    Py_XDECREF(seen);
    Py_DECREF(seq);
    return NULL;
}

/* first_bad_slot(ids, limit) -> -1 when ids is a list of distinct plain ints
 * in 0..limit-1, else the index of the first id that is not. */
static PyObject *
first_bad_slot(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *ids;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "O!n", &PyList_Type, &ids, &limit))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(ids);
    if (limit <= 0)
        return PyLong_FromSsize_t(n ? 0 : -1);
    uint8_t *seen = PyMem_Calloc((size_t)limit, 1);
    if (seen == NULL)
        return PyErr_NoMemory();
    Py_ssize_t bad = -1;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = PyList_GET_ITEM(ids, k);
        Py_ssize_t v = PyLong_CheckExact(item) ? PyLong_AsSsize_t(item) : -1;
        if (v == -1 && PyErr_Occurred())
            PyErr_Clear(); /* too large for a slot id: bad */
        if (v < 0 || v >= limit || seen[v]) {
            bad = k;
            break;
        }
        seen[v] = 1;
    }
    PyMem_Free(seen);
    return PyLong_FromSsize_t(bad);
}

static PyMethodDef module_methods[] = {
    {"first_bad_key", (PyCFunction)first_bad_key, METH_O,
     "Index of the first key that is not exactly int/bytes or is named twice; -1: none."},
    {"first_bad_slot", (PyCFunction)first_bad_slot, METH_VARARGS,
     "Index of the first id of a list that is not a distinct int in 0..limit-1; -1: none."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvactors._manager_core",
    "One tier's block metadata and eviction order, in C.", -1, module_methods,
};

PyMODINIT_FUNC
PyInit__manager_core(void)
{
    if (PyType_Ready(&CoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "ManagerCore", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
