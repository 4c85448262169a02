/* kvactors._lru_core: one tier's metadata with LRU order, in C.
 *
 * The same state machine as kvactors.manager.OffloadingManager with the "lru"
 * policy (the Python code is the reference; the tests run both against one
 * model). Slot ids index flat arrays: the key held, the ref count (-1 being
 * written, 0 idle, n pinned by n readers) and the links of one recency list
 * (head = least recent). A dict maps key -> slot id.
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

typedef struct {
    PyObject_HEAD
    Py_ssize_t n;          /* capacity in blocks */
    PyObject *map;         /* dict: key -> slot id (an item of slot_objs) */
    PyObject *slot_objs;   /* tuple of the ints 0..n-1 */
    PyObject **keys;       /* key held by each slot (owned), NULL when free */
    int32_t *ref;
    int32_t *prev;
    int32_t *next;
    uint32_t *stamp;       /* == epoch: named in the current prepare_store */
    int32_t *scratch;      /* victims of one prepare_store */
    int32_t *free_stack;   /* freed slot ids, last freed on top */
    Py_ssize_t nfree;
    Py_ssize_t next_fresh; /* fresh ids are handed out in order first */
    uint32_t epoch;
    int32_t head, tail;
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

static inline void
unlink_slot(Core *self, int32_t i)
{
    int32_t p = self->prev[i], nx = self->next[i];
    if (p >= 0)
        self->next[p] = nx;
    else
        self->head = nx;
    if (nx >= 0)
        self->prev[nx] = p;
    else
        self->tail = p;
}

static inline void
push_tail(Core *self, int32_t i)
{
    self->prev[i] = self->tail;
    self->next[i] = -1;
    if (self->tail >= 0)
        self->next[self->tail] = i;
    else
        self->head = i;
    self->tail = i;
}

/* Insert key at slot i as most recent with ref count r. */
static int
hold(Core *self, PyObject *key, int32_t i, int32_t r)
{
    if (PyDict_SetItem(self->map, key, PyTuple_GET_ITEM(self->slot_objs, i)) < 0)
        return -1;
    Py_INCREF(key);
    self->keys[i] = key;
    self->ref[i] = r;
    push_tail(self, i);
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
    unlink_slot(self, i);
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
    static char *kwlist[] = {"num_blocks", NULL};
    Py_ssize_t n;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n", kwlist, &n))
        return -1;
    if (self->map != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "LRUCore is already initialised");
        return -1;
    }
    if (n <= 0 || n > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "num_blocks must be in 1..2**31-1");
        return -1;
    }
    self->n = n;
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
    self->stamp = PyMem_Calloc((size_t)n, sizeof(uint32_t));
    self->scratch = PyMem_Calloc((size_t)n, sizeof(int32_t));
    self->free_stack = PyMem_Calloc((size_t)n, sizeof(int32_t));
    if (!self->keys || !self->ref || !self->prev || !self->next || !self->stamp ||
        !self->scratch || !self->free_stack) {
        PyErr_NoMemory();
        return -1;
    }
    self->head = self->tail = -1;
    self->epoch = 1;
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
    PyMem_Free(self->stamp);
    PyMem_Free(self->scratch);
    PyMem_Free(self->free_stack);
    Py_XDECREF(self->map);
    Py_XDECREF(self->slot_objs);
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

static PyObject *
Core_touch(Core *self, PyObject *arg)
{
    FAST(seq, arg);
    /* In reverse, so the first key ends most recent. */
    for (Py_ssize_t k = len_seq - 1; k >= 0; k--) {
        int32_t s = slot_of(self, items_seq[k]);
        if (s == -2) {
            Py_DECREF(seq);
            return NULL;
        }
        if (s >= 0 && s != self->tail) {
            unlink_slot(self, s);
            push_tail(self, s);
        }
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
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
    for (int32_t i = self->head; i >= 0; i = self->next[i]) {
        Py_INCREF(self->keys[i]);
        PyList_SET_ITEM(out, k++, self->keys[i]);
    }
    return out;
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
        Py_ssize_t found = 0;
        for (int32_t i = self->head; i >= 0 && found < need; i = self->next[i])
            if (self->ref[i] == 0 && self->stamp[i] != epoch)
                self->scratch[found++] = i;
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
        PyObject *key = release(self, i);
        if (key == NULL)
            goto fail;
        PyList_SET_ITEM(evicted, v, key);
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
    .tp_name = "kvactors._lru_core.LRUCore",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One tier's block metadata in LRU order (see kvactors.manager).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
    .tp_as_sequence = &Core_as_sequence,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvactors._lru_core",
    "One tier's block metadata in LRU order, in C.", -1, NULL,
};

PyMODINIT_FUNC
PyInit__lru_core(void)
{
    if (PyType_Ready(&CoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "LRUCore", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
