/* kvactors._manager_core: one tier's metadata on one state machine, in C.
 *
 * The same state machine as the Python reference manager
 * (kvactors/manager/_reference.py); the tests run both against one model and
 * against each other. The core owns the key map, the slots, ref counts (-1
 * being written, 0 idle, n pinned by n readers), the free slots and the
 * counters; the eviction order is the policy's, behind the table of functions
 * in manager_core.h (POLICY_TABLE below lists the built-in ones; any other
 * policy is a Python CachePolicy object reached through python_policy_ops).
 *
 * Every method first snapshots its keys into a tuple (so a key's __hash__ or
 * __eq__ that mutates the caller's list frees nothing we use), then checks
 * the whole call, then changes state: an error leaves nothing changed. Errors
 * are kvactors.errors types with the messages the Python manager raises.
 * A method that is re-entered (from a key's __hash__/__eq__ or the policy)
 * raises ManagerBusyError.
 */
#include "manager_core.h"

#include <string.h>

static const PolicyOps *const POLICY_TABLE[] = {&lru_ops, &arc_ops, &weighted_lru_ops,
                                                 &prefix_admit_ops, NULL};

/* Slot ids are int32 and fresh slots are handed out in order. */
#define MAX_BLOCKS ((Py_ssize_t)INT32_MAX)
#define MIN_GROWTH 64

static PyObject *KVInvalidKey, *KVNotFound, *KVNotReady, *KVNotPinned, *KVState, *KVConfig,
    *KVUnknownPolicy, *KVBusy;
PyObject *KVPolicyError;

/* -- shared helpers ------------------------------------------------------ */

PyObject *
core_list_keys(PyObject **keys, const int32_t *next, int32_t head, Py_ssize_t len)
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

PyObject *
core_list_slots(Core *core, const int32_t *next, int32_t head, Py_ssize_t len)
{
    if (core->kstate == NULL)
        return core_list_keys(core->keys, next, head, len);
    PyObject *out = PyList_New(len);
    if (out == NULL)
        return NULL;
    Py_ssize_t k = 0;
    for (int32_t i = head; i >= 0 && k < len; i = next[i]) {
        PyObject *key = core_key(core, i);
        if (key == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, k++, key);
    }
    for (; k < len; k++) /* never reached: the list holds len slots */
        PyList_SET_ITEM(out, k, Py_NewRef(Py_None));
    return out;
}

int
policy_insert_each(Core *core, PyObject *const *keys, const int32_t *slots, Py_ssize_t n)
{
    for (Py_ssize_t k = 0; k < n; k++)
        if (core->ops->insert(core, keys[k], slots[k]) < 0)
            return -1;
    return 0;
}

static inline int
exact_key(PyObject *key)
{
    return PyLong_CheckExact(key) || PyBytes_CheckExact(key);
}

/* The exception being raised (a lookup of a key failed) becomes the cause of
 * InvalidKeyError("METHOD: block key of type T is not usable (E: msg)"). */
int
core_key_fault(const char *method, PyObject *key)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value == NULL) {
        Py_XDECREF(type);
        Py_XDECREF(tb);
        return -1;
    }
    if (tb != NULL)
        PyException_SetTraceback(value, tb);
    PyErr_Format(KVInvalidKey, "%s: block key of type %s is not usable (%s: %S)", method,
                 _PyType_Name(Py_TYPE(key)), _PyType_Name(Py_TYPE(value)), value);
    PyObject *t2, *v2, *tb2;
    PyErr_Fetch(&t2, &v2, &tb2);
    PyErr_NormalizeException(&t2, &v2, &tb2);
    if (v2 != NULL) {
        Py_INCREF(value);
        PyException_SetCause(v2, value);
        PyException_SetContext(v2, value);
    }
    else
        Py_DECREF(value);
    PyErr_Restore(t2, v2, tb2);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return -1;
}

static int
state_error(PyObject *type, const char *method, PyObject *key, const char *what, PyObject *medium)
{
    if (medium != NULL)
        PyErr_Format(type, "%s: block %R %s %U", method, key, what, medium);
    else
        PyErr_Format(type, "%s: block %R %s", method, key, what);
    return -1;
}


/* -- keys shared with an NVMe index table (see Core.keys) ------------------ */

static uint64_t
le64(const uint8_t *p)
{
    uint64_t u = 0;
    for (int i = 0; i < 8; i++)
        u |= (uint64_t)p[i] << (8 * i);
    return u;
}

/* A key object from an index record's bytes. */
static PyObject *
key_object(uint8_t kind, const uint8_t *data, size_t len)
{
    if (kind == KV_KIND_BYTES)
        return PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)len);
    if (kind == KV_KIND_INT && len == 8)
        return PyLong_FromLongLong((long long)le64(data));
    return _PyLong_FromByteArray(data, len, 1, 1);
}

/* Python's hash of an int that fits in 64 bits (as long_hash computes it). */
static Py_hash_t
int_hash(long long v)
{
    const uint64_t modulus = ((uint64_t)1 << 61) - 1; /* _PyHASH_MODULUS */
    uint64_t a = v < 0 ? -(uint64_t)v : (uint64_t)v;
    Py_hash_t h = (Py_hash_t)(a % modulus);
    if (v < 0)
        h = -h;
    return h == -1 ? -2 : h;
}

static PyObject *
own_get(Core *core, int32_t s)
{
    PyObject *id = PyLong_FromLong(s);
    if (id == NULL)
        return NULL;
    PyObject *key = PyDict_GetItemWithError(core->own, id); /* borrowed */
    Py_DECREF(id);
    if (key == NULL && !PyErr_Occurred())
        PyErr_Format(PyExc_SystemError, "manager core: slot %d has no key", (int)s);
    return key;
}

static int
own_set(Core *core, int32_t s, PyObject *key)
{
    PyObject *id = PyLong_FromLong(s);
    if (id == NULL)
        return -1;
    int rc = PyDict_SetItem(core->own, id, key);
    Py_DECREF(id);
    return rc;
}

static void
own_del(Core *core, int32_t s)
{
    PyObject *id = PyLong_FromLong(s);
    if (id == NULL || PyDict_DelItem(core->own, id) < 0)
        PyErr_Clear(); /* not there: nothing to drop */
    Py_XDECREF(id);
}

PyObject *
core_key(Core *core, int32_t s)
{
    if (core->kstate == NULL)
        return Py_NewRef(core->keys[s]);
    if (core->kstate[s] == KS_OWN) {
        PyObject *key = own_get(core, s);
        return key == NULL ? NULL : Py_NewRef(key);
    }
    uint8_t kind;
    const uint8_t *data;
    size_t len;
    if (core->kstate[s] != KS_SHARED ||
        !core->iapi->key_at(core->index, (uint32_t)s, &kind, &data, &len)) {
        PyErr_Format(PyExc_SystemError, "manager core: slot %d has no key", (int)s);
        return NULL;
    }
    return key_object(kind, data, len);
}

/* Python's hash of slot s's key; -1 with an exception set. */
static Py_hash_t
slot_hash(Core *core, int32_t s)
{
    uint8_t kind;
    const uint8_t *data;
    size_t len;
    if (core->kstate[s] == KS_SHARED &&
        core->iapi->key_at(core->index, (uint32_t)s, &kind, &data, &len)) {
        if (kind == KV_KIND_BYTES)
#if PY_VERSION_HEX >= 0x030E0000
            return Py_HashBuffer(data, (Py_ssize_t)len);
#else
            return _Py_HashBytes(data, (Py_ssize_t)len);
#endif
        if (kind == KV_KIND_INT && len == 8)
            return int_hash((long long)le64(data));
    }
    PyObject *key = core_key(core, s);
    if (key == NULL)
        return -1;
    Py_hash_t h = PyObject_Hash(key);
    Py_DECREF(key);
    return h;
}

/* Whether slot s's key equals key, as a dict compares (kt_same). */
static int
slot_same(void *ctx, int32_t s, PyObject *key)
{
    Core *core = ctx;
    uint8_t kind;
    const uint8_t *data;
    size_t len;
    if (core->kstate[s] == KS_OWN) {
        PyObject *stored = own_get(core, s);
        return stored == NULL ? -1 : kt_same(stored, key);
    }
    if (!core->iapi->key_at(core->index, (uint32_t)s, &kind, &data, &len))
        return 0;
    if (PyBytes_CheckExact(key))
        return kind == KV_KIND_BYTES && (size_t)PyBytes_GET_SIZE(key) == len &&
               memcmp(PyBytes_AS_STRING(key), data, len) == 0;
    if (PyLong_CheckExact(key) && kind == KV_KIND_INT && len == 8) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(key, &overflow);
        return !overflow && (uint64_t)v == le64(data);
    }
    if (PyLong_CheckExact(key) && kind == KV_KIND_BYTES)
        return 0;
    /* a big int, or a key of another type: compared as objects, stored key first */
    PyObject *stored = key_object(kind, data, len);
    if (stored == NULL)
        return -1;
    int same = kt_same(stored, key);
    Py_DECREF(stored);
    return same;
}

/* The slot of an exact int/bytes key if it is one this core shares with the
 * index (the index's record of it is at a slot in KS_SHARED): >= 0, -1 if
 * not, -2 with MemoryError. Makes no object. */
static int32_t
shared_slot(Core *core, PyObject *key)
{
    uint8_t kind, small[64], *heap = NULL;
    const uint8_t *data = small;
    size_t len = 8;
    if (PyBytes_CheckExact(key)) {
        kind = KV_KIND_BYTES;
        data = (const uint8_t *)PyBytes_AS_STRING(key);
        len = (size_t)PyBytes_GET_SIZE(key);
    }
    else {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(key, &overflow);
        kind = KV_KIND_INT;
        for (int i = 0; i < 8; i++)
            small[i] = (uint8_t)((uint64_t)v >> (8 * i));
        if (overflow) { /* as the index writes it: int.to_bytes(bit_length // 8 + 1, signed) */
            kind = KV_KIND_BIGINT;
            len = _PyLong_NumBits(key) / 8 + 1;
            uint8_t *buf = len <= sizeof(small) ? small : (heap = PyMem_Malloc(len));
            if (buf == NULL) {
                PyErr_NoMemory();
                return -2;
            }
#if PY_VERSION_HEX >= 0x030D0000
            int rc = _PyLong_AsByteArray((PyLongObject *)key, buf, len, 1, 1, 1);
#else
            int rc = _PyLong_AsByteArray((PyLongObject *)key, buf, len, 1, 1);
#endif
            if (rc < 0) {
                PyMem_Free(heap);
                return -2;
            }
            data = buf;
        }
    }
    int64_t s = core->iapi->find(core->index, kind, data, len);
    PyMem_Free(heap);
    return s >= 0 && s < core->cap && core->kstate[s] == KS_SHARED ? (int32_t)s : -1;
}

/* The map gets the shared slots too (see Core.map_all). Nothing changes on
 * failure (-1 with an exception set). */
static int
map_all_slots(Core *core)
{
    Py_ssize_t shared = core->used - core->map.used, k = 0;
    Py_hash_t *hash = PyMem_Malloc((size_t)(shared ? shared : 1) * sizeof(Py_hash_t));
    int32_t *slot = PyMem_Malloc((size_t)(shared ? shared : 1) * sizeof(int32_t));
    int rc = -1;
    if (hash == NULL || slot == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t s = 0; s < core->cap && k < shared; s++)
        if (core->kstate[s] == KS_SHARED) {
            if ((hash[k] = slot_hash(core, (int32_t)s)) == -1 && PyErr_Occurred())
                goto done;
            slot[k++] = (int32_t)s;
        }
    if (kt_reserve(&core->map, core->map.used + k) < 0)
        goto done;
    for (Py_ssize_t i = 0; i < k; i++)
        kt_insert_hash(&core->map, hash[i], slot[i]); /* reserved: cannot fail */
    core->map_all = 1;
    rc = 0;
done:
    PyMem_Free(hash);
    PyMem_Free(slot);
    return rc;
}

int32_t
core_slot_shared(Core *core, PyObject *key)
{
    if (!core->map_all) {
        if (exact_key(key)) {
            int32_t s = shared_slot(core, key);
            if (s != -1 || core->map.used == 0)
                return s;
        }
        else if (core->used > core->map.used && map_all_slots(core) < 0)
            return -2;
    }
    return kt_find_by(&core->map, key, slot_same, core);
}

/* The index is about to change slot s's record: a key shared there becomes
 * the core's own object first. */
static int
index_changes(void *listener, uint32_t s)
{
    Core *core = listener;
    if ((Py_ssize_t)s >= core->cap || core->kstate[s] != KS_SHARED)
        return 0;
    PyObject *key = core_key(core, (int32_t)s);
    if (key == NULL)
        return -1;
    Py_hash_t h = PyObject_Hash(key); /* an exact int/bytes: cannot fail */
    int rc = core->map_all ? 0 : kt_insert_hash(&core->map, h, (int32_t)s);
    if (rc == 0 && (rc = own_set(core, (int32_t)s, key)) < 0 && !core->map_all)
        kt_delete_hash(&core->map, h, (int32_t)s);
    Py_DECREF(key);
    if (rc == 0)
        core->kstate[s] = KS_OWN;
    return rc;
}

/* Slot s (own key, just stored) is shared if the index records that key there. */
static void
share_if_indexed(Core *core, int32_t s)
{
    uint8_t kind;
    const uint8_t *data;
    size_t len;
    if (core->kstate[s] != KS_OWN ||
        !core->iapi->key_at(core->index, (uint32_t)s, &kind, &data, &len))
        return;
    PyObject *key = own_get(core, s);
    if (key == NULL) {
        PyErr_Clear();
        return;
    }
    int same;
    if (PyBytes_CheckExact(key))
        same = kind == KV_KIND_BYTES && (size_t)PyBytes_GET_SIZE(key) == len &&
               memcmp(PyBytes_AS_STRING(key), data, len) == 0;
    else {
        PyObject *stored = key_object(kind, data, len);
        if (stored == NULL) {
            PyErr_Clear();
            return;
        }
        same = PyLong_CheckExact(stored) && PyLong_CheckExact(key) &&
               PyObject_RichCompareBool(stored, key, Py_EQ) == 1;
        Py_DECREF(stored);
    }
    if (same) {
        if (!core->map_all)
            kt_delete(&core->map, key, s);
        core->kstate[s] = KS_SHARED;
        own_del(core, s);
    }
}

/* A method starts: refuse re-entry, snapshot the keys (a new tuple). */
static PyObject *
enter(Core *self, const char *method, PyObject *arg)
{
    if (self->ops == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "ManagerCore is not initialised");
        return NULL;
    }
    if (self->busy) {
        PyErr_Format(KVBusy,
                     "%s: the %U manager is already running a call (a key's __hash__/__eq__ "
                     "or its policy called back into it)",
                     method, self->medium);
        return NULL;
    }
    PyObject *seq;
    if (arg == NULL) {
        seq = PyTuple_New(0);
    }
    else if (PyBytes_Check(arg) || PyByteArray_Check(arg) || PyUnicode_Check(arg) ||
             PyMemoryView_Check(arg)) {
        /* One key where a call takes many: iterated, its items (ints, characters)
         * would be taken for keys. */
        PyErr_Format(KVInvalidKey,
                     "%s: keys must be an iterable of keys, got one %s (for a single key, "
                     "pass [key])",
                     method, _PyType_Name(Py_TYPE(arg)));
        seq = NULL;
    }
    else {
        seq = PySequence_Tuple(arg);
        if (seq == NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(KVInvalidKey, "%s: keys must be an iterable of keys, got %s", method,
                         _PyType_Name(Py_TYPE(arg)));
        }
    }
    if (seq != NULL)
        self->busy = 1;
    return seq;
}

static inline PyObject *
leave(Core *self, PyObject *seq, PyObject *result)
{
    self->busy = 0;
    Py_XDECREF(seq);
    return result;
}

/* Every key of items can be looked up (exact int/bytes always can; others
 * are looked up once, running their __hash__ and maybe __eq__). */
static int
check_usable(Core *self, const char *method, PyObject *const *items, Py_ssize_t n)
{
    for (Py_ssize_t k = 0; k < n; k++)
        if (!exact_key(items[k]) && core_slot(self, items[k]) == -2)
            return core_key_fault(method, items[k]);
    return 0;
}

/* The slot of each key (-1: absent) into slots[]. */
static int
slots_of(Core *self, const char *method, PyObject *const *items, Py_ssize_t n, int32_t *slots)
{
    for (Py_ssize_t k = 0; k < n; k++)
        if ((slots[k] = core_slot(self, items[k])) == -2)
            return core_key_fault(method, items[k]);
    return 0;
}

/* A slot per key of a call: the small buffer when it fits, else PyMem. */
#define SMALL 64
static int32_t *
new_slots(Py_ssize_t n, int32_t *small)
{
    if (n <= SMALL)
        return small;
    int32_t *slots = PyMem_Malloc((size_t)n * sizeof(int32_t));
    if (slots == NULL)
        PyErr_NoMemory();
    return slots;
}

static inline void
free_slots(int32_t *slots, int32_t *small)
{
    if (slots != small)
        PyMem_Free(slots);
}

/* The per-slot arrays hold at least `need` slots (need <= n). */
static int
reserve(Core *self, Py_ssize_t need)
{
    if (need <= self->cap)
        return 0;
    Py_ssize_t cap = self->cap ? self->cap : MIN_GROWTH;
    while (cap < need)
        cap *= 2;
    if (cap > self->n)
        cap = self->n;
    /* new slots: KS_FREE / no key object, ref 0, stamp 0 (never an epoch) */
    if (self->kstate != NULL)
        GROW_ZEROED(self->kstate, self->cap, cap);
    else
        GROW_ZEROED(self->keys, self->cap, cap);
    GROW_ZEROED(self->ref, self->cap, cap);
    GROW_ZEROED(self->stamp, self->cap, cap);
    GROW(self->free_stack, cap);
    if (self->ops->grow(self, self->cap, cap) < 0)
        return -1;
    self->cap = cap;
    return 0;
}

static inline int
set_ref(Core *self, int32_t s, int32_t r)
{
    self->ref[s] = r;
    return self->ops->ref_changed ? self->ops->ref_changed(self, s) : 0;
}

/* key (absent, exact int or bytes) enters the map at slot s with ref r.
 * Returns the slot id as a new int, or NULL. The policy is told by the caller. */
static PyObject *
hold(Core *self, PyObject *key, int32_t s, int32_t r)
{
    PyObject *id = PyLong_FromLong(s);
    if (id == NULL)
        return NULL;
    if (self->kstate != NULL && own_set(self, s, key) < 0) {
        Py_DECREF(id);
        return NULL;
    }
    if (kt_insert(&self->map, key, s) < 0) {
        if (self->kstate != NULL)
            own_del(self, s);
        Py_DECREF(id);
        return NULL;
    }
    if (self->kstate != NULL)
        self->kstate[s] = KS_OWN;
    else
        self->keys[s] = Py_NewRef(key);
    self->ref[s] = r;
    self->used++;
    return id;
}

/* Slot s leaves the map and goes on the free stack. Returns its key (new
 * reference) and, in *id, its slot id (a new int). */
static PyObject *
release(Core *self, int32_t s, PyObject **id)
{
    if (self->kstate != NULL) {
        PyObject *key = core_key(self, s);
        if (key == NULL)
            return NULL;
        if (id != NULL && (*id = PyLong_FromLong(s)) == NULL) {
            Py_DECREF(key);
            return NULL;
        }
        if (self->kstate[s] == KS_OWN || self->map_all)
            kt_delete(&self->map, key, s);
        if (self->kstate[s] == KS_OWN)
            own_del(self, s);
        self->kstate[s] = KS_FREE;
        self->free_stack[self->nfree++] = s;
        self->used--;
        return key;
    }
    PyObject *key = self->keys[s];
    if (id != NULL && (*id = PyLong_FromLong(s)) == NULL)
        return NULL;
    kt_delete(&self->map, key, s);
    self->keys[s] = NULL;
    self->free_stack[self->nfree++] = s;
    self->used--;
    return key; /* the reference keys[s] owned */
}

static inline int32_t
take_slot(Core *self)
{
    if (self->stack_first ? self->nfree > 0 : self->next_fresh >= self->n)
        return self->free_stack[--self->nfree];
    return (int32_t)self->next_fresh++;
}

/* -- object life --------------------------------------------------------- */

static int
Core_init(Core *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"num_blocks", "policy", "block_size", "options", "medium",
                             "block_type", NULL};
    PyObject *nobj, *policy = NULL, *options = NULL, *medium = NULL, *block_type = Py_None;
    Py_ssize_t block_size = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OnOUO", kwlist, &nobj, &policy, &block_size,
                                     &options, &medium, &block_type))
        return -1;
    if (self->ops != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "ManagerCore is already initialised");
        return -1;
    }
    Py_ssize_t n = PyLong_Check(nobj) ? PyLong_AsSsize_t(nobj) : -1;
    if (n == -1 && PyErr_Occurred())
        PyErr_Clear();
    if (!PyLong_CheckExact(nobj) || n <= 0 || n > MAX_BLOCKS) {
        PyErr_Format(KVConfig, "num_blocks must be an int in 1..%zd, got %R", MAX_BLOCKS, nobj);
        return -1;
    }
    if (block_size <= 0) {
        PyErr_Format(KVConfig, "block_size must be a positive int, got %zd", block_size);
        return -1;
    }
    const PolicyOps *ops = NULL;
    if (policy == NULL || PyUnicode_Check(policy)) {
        const char *name = policy == NULL ? "lru" : PyUnicode_AsUTF8(policy);
        if (name == NULL)
            return -1;
        for (const PolicyOps *const *p = POLICY_TABLE; *p != NULL; p++)
            if (strcmp((*p)->name, name) == 0)
                ops = *p;
        if (ops == NULL) {
            PyErr_Format(KVUnknownPolicy, "unknown policy %R for the compiled core", policy);
            return -1;
        }
    }
    else {
        ops = &python_policy_ops;
        options = PyTuple_Pack(2, policy, block_type);
        if (options == NULL)
            return -1;
    }
    self->n = n;
    self->block_size = (double)block_size;
    self->epoch = 1;
    self->medium = medium ? medium : PyUnicode_FromString("CPU");
    if (medium != NULL)
        Py_INCREF(medium);
    if (self->medium == NULL) {
        if (ops == &python_policy_ops)
            Py_DECREF(options);
        return -1;
    }
    self->ops = ops;
    int rc = ops->init(self, options);
    if (ops == &python_policy_ops)
        Py_DECREF(options);
    return rc;
}

static int
Core_traverse(Core *self, visitproc visit, void *arg)
{
    if (self->ops != NULL && self->ops->traverse != NULL)
        return self->ops->traverse(self, visit, arg);
    return 0;
}

static void
Core_dealloc(Core *self)
{
    PyObject_GC_UnTrack(self);
    if (self->ops != NULL)
        self->ops->dealloc(self);
    if (self->keys != NULL)
        for (Py_ssize_t i = 0; i < self->cap; i++)
            Py_XDECREF(self->keys[i]);
    PyMem_Free(self->keys);
    if (self->index != NULL) {
        self->iapi->detach(self->index, self);
        Py_DECREF(self->index);
    }
    PyMem_Free(self->kstate);
    Py_XDECREF(self->own);
    kt_free(&self->map);
    PyMem_Free(self->ref);
    PyMem_Free(self->stamp);
    PyMem_Free(self->free_stack);
    PyMem_Free(self->scratch);
    Py_XDECREF(self->medium);
    Py_XDECREF(self->policy_obj);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* -- queries ------------------------------------------------------------- */

/* The fast start of lookup, touch and prepare_store with a built-in policy:
 * a list whose keys are all exact int/bytes is used in place, since no Python
 * code runs while its items are read (exact keys hash and compare in C; those
 * calls make no object until they are done reading, except prepare_store's
 * first list, made before). Anything else is snapshotted by enter(). Returns
 * a new reference to the list or tuple; *items, *n its keys. */
static PyObject *
enter_in_place(Core *self, const char *method, PyObject *arg, PyObject ***items, Py_ssize_t *n)
{
    if (PyList_CheckExact(arg) && self->ops != &python_policy_ops && self->ops != NULL &&
        !self->busy) {
        Py_ssize_t len = PyList_GET_SIZE(arg);
        PyObject **keys = PySequence_Fast_ITEMS(arg);
        Py_ssize_t k = 0;
        while (k < len && exact_key(keys[k]))
            k++;
        if (k == len) {
            self->busy = 1;
            *items = keys;
            *n = len;
            return Py_NewRef(arg);
        }
    }
    PyObject *seq = enter(self, method, arg);
    if (seq != NULL) {
        *items = &PyTuple_GET_ITEM(seq, 0);
        *n = PyTuple_GET_SIZE(seq);
    }
    return seq;
}

static PyObject *
lookup(Core *self, PyObject *const *items, Py_ssize_t n)
{
    Py_ssize_t hits = 0;
    for (; hits < n; hits++) {
        int32_t s = core_slot(self, items[hits]);
        if (s == -2)
            return core_key_fault("lookup", items[hits]), NULL;
        if (s < 0 || self->ref[s] < 0)
            break;
    }
    if (check_usable(self, "lookup", items + hits, n - hits) < 0)
        return NULL;
    self->lookups++;
    self->lookup_keys += n;
    self->hits += hits;
    return PyLong_FromSsize_t(hits);
}

static PyObject *
Core_lookup(Core *self, PyObject *arg)
{
    PyObject **items;
    Py_ssize_t n;
    PyObject *seq = enter_in_place(self, "lookup", arg, &items, &n);
    return seq == NULL ? NULL : leave(self, seq, lookup(self, items, n));
}

static PyObject *
touch(Core *self, PyObject *const *items, Py_ssize_t n)
{
    if (check_usable(self, "touch", items, n) < 0 || self->ops->touch(self, items, n) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Core_touch(Core *self, PyObject *arg)
{
    PyObject **items;
    Py_ssize_t n;
    PyObject *seq = enter_in_place(self, "touch", arg, &items, &n);
    return seq == NULL ? NULL : leave(self, seq, touch(self, items, n));
}

static PyObject *
Core_get(Core *self, PyObject *key)
{
    PyObject *seq = enter(self, "get", NULL);
    if (seq == NULL)
        return NULL;
    int32_t s = core_slot(self, key);
    PyObject *out;
    if (s == -2)
        out = (core_key_fault("get", key), NULL);
    else if (s < 0)
        out = Py_NewRef(Py_None);
    else
        out = Py_BuildValue("(ii)", (int)s, (int)self->ref[s]);
    return leave(self, seq, out);
}

static int
Core_contains(Core *self, PyObject *key)
{
    PyObject *seq = enter(self, "__contains__", NULL);
    if (seq == NULL)
        return -1;
    int32_t s = core_slot(self, key);
    if (s == -2)
        core_key_fault("__contains__", key);
    leave(self, seq, NULL);
    return s == -2 ? -1 : s >= 0;
}

static Py_ssize_t
Core_len(Core *self)
{
    return self->used;
}

static PyObject *
Core_keys(Core *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *seq = enter(self, "keys", NULL);
    return seq == NULL ? NULL : leave(self, seq, self->ops->keys(self));
}

static PyObject *
Core_policy_state(Core *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *seq = enter(self, "policy_state", NULL);
    return seq == NULL ? NULL : leave(self, seq, self->ops->state(self));
}

static PyObject *
Core_counters(Core *self, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("(nnnnLLLLLL)", self->used, self->n - self->next_fresh + self->nfree,
                         self->pinned, self->writing, self->lookups, self->lookup_keys,
                         self->hits, self->stores, self->evictions, self->failed_prepares);
}

/* (slots the per-slot arrays hold, bytes they take): grown as used. */
static PyObject *
Core_allocated(Core *self, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("n", self->cap);
}

/* -- store --------------------------------------------------------------- */

static PyObject *
prepare_store(Core *self, PyObject *seq)
{
    /* to_store is made before the keys are read: making a list may run the
     * garbage collector, whose finalizers could change a list used in place. */
    PyObject *to_store = PyList_New(0);
    if (to_store == NULL)
        return NULL;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *ids = NULL, *evicted = NULL, *evicted_ids = NULL, *out = NULL;
    int32_t small[SMALL];
    int32_t *slots = new_slots(len, small);
    if (slots == NULL)
        return NULL;
    if (++self->epoch == 0) { /* wrapped: old stamps could collide */
        memset(self->stamp, 0, (size_t)self->cap * sizeof(uint32_t));
        self->epoch = 1;
    }
    uint32_t epoch = self->epoch;
    /* 1. every key looked up (a key that cannot be is an error first) */
    if (slots_of(self, "prepare_store", items, len, slots) < 0)
        goto done;
    Py_ssize_t m = 0;
    for (Py_ssize_t k = 0; k < len; k++) {
        if (slots[k] >= 0)
            self->stamp[slots[k]] = epoch; /* named in this call: never a victim */
        else
            m++;
    }
    for (Py_ssize_t k = 0; k < len; k++) /* no object is made: the keys stay put */
        if (slots[k] < 0 && PyList_Append(to_store, items[k]) < 0)
            goto done;
    if (m == 0) { /* nothing to store: the policy is not called */
        out = Py_BuildValue("(O[][][])", to_store);
        goto done;
    }
    /* From here on only the keys to_store holds are read (and, by the
     * policy's admit and evict, the call's keys: built-in policies run no
     * Python code while reading them, the Python entry always gets a
     * snapshot). */
    PyObject **new_keys = &PyList_GET_ITEM(to_store, 0);
    /* 2. new keys are exactly int or bytes, 3. each named once */
    for (Py_ssize_t k = 0; k < m; k++)
        if (!exact_key(new_keys[k])) {
            PyErr_Format(KVInvalidKey,
                         "prepare_store: block key %R has type %s; keys must be bytes or int",
                         new_keys[k], _PyType_Name(Py_TYPE(new_keys[k])));
            goto done;
        }
    if (m > 1) {
        PyObject *seen = PySet_New(NULL);
        if (seen == NULL)
            goto done;
        for (Py_ssize_t k = 0; k < m; k++) {
            int had = PySet_Contains(seen, new_keys[k]);
            if (had == 0)
                had = PySet_Add(seen, new_keys[k]) < 0 ? -1 : 0;
            if (had != 0) {
                Py_DECREF(seen);
                if (had > 0)
                    PyErr_Format(KVInvalidKey,
                                 "prepare_store: block key %R is named twice in one call",
                                 new_keys[k]);
                goto done;
            }
        }
        Py_DECREF(seen);
    }
    /* 4. an admission policy may store only a leading part of them */
    if (self->ops->admit != NULL) {
        Py_ssize_t admitted = self->ops->admit(self, items, len, new_keys, m);
        if (admitted < 0)
            goto done;
        if (admitted < m) {
            if (PyList_SetSlice(to_store, admitted, m, NULL) < 0)
                goto done;
            m = admitted;
            if (m == 0) {
                out = Py_BuildValue("(O[][][])", to_store);
                goto done;
            }
            new_keys = &PyList_GET_ITEM(to_store, 0);
        }
    }
    Py_ssize_t room = self->n - self->next_fresh + self->nfree;
    Py_ssize_t need = m > room ? m - room : 0;
    Py_ssize_t fresh = self->n - self->next_fresh;
    if (reserve(self, self->next_fresh + (m < fresh ? m : fresh)) < 0)
        goto done;
    if (need > self->scratch_len) {
        int32_t *scratch = PyMem_Realloc(self->scratch, (size_t)need * sizeof(int32_t));
        if (scratch == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        self->scratch = scratch;
        self->scratch_len = need;
    }
    ids = PyList_New(m);
    evicted = PyList_New(need);
    evicted_ids = PyList_New(need);
    if (ids == NULL || evicted == NULL || evicted_ids == NULL)
        goto done;
    if (need > 0) {
        Py_ssize_t got = self->ops->evict(self, need, epoch, items, len, self->scratch);
        if (got < 0)
            goto done;
        if (got < need) {
            self->failed_prepares++;
            out = Py_NewRef(Py_None);
            goto done;
        }
        for (Py_ssize_t v = 0; v < need; v++) {
            PyObject *id;
            PyObject *key = release(self, self->scratch[v], &id);
            if (key == NULL)
                goto done;
            PyList_SET_ITEM(evicted, v, key);
            PyList_SET_ITEM(evicted_ids, v, id);
        }
        self->evictions += need;
    }
    for (Py_ssize_t k = 0; k < m; k++) {
        int32_t s = take_slot(self);
        PyObject *id = hold(self, new_keys[k], s, -1);
        if (id == NULL)
            goto done;
        PyList_SET_ITEM(ids, k, id);
        slots[k] = s;
    }
    self->writing += m;
    if (self->ops->insert_many(self, new_keys, slots, m) < 0)
        goto done;
    out = PyTuple_Pack(4, to_store, ids, evicted, evicted_ids);
done:
    free_slots(slots, small);
    Py_XDECREF(to_store);
    Py_XDECREF(ids);
    Py_XDECREF(evicted);
    Py_XDECREF(evicted_ids);
    return out;
}

/* prepare_store(keys) -> (to_store, ids, evicted, evicted_ids) or None. */
static PyObject *
Core_prepare_store(Core *self, PyObject *arg)
{
    PyObject **items;
    Py_ssize_t n;
    PyObject *seq = enter_in_place(self, "prepare_store", arg, &items, &n);
    return seq == NULL ? NULL : leave(self, seq, prepare_store(self, seq));
}

/* The policy forgets slot s (its key passed as an object). */
static int
remove_from_policy(Core *self, int32_t s)
{
    if (self->kstate == NULL)
        return self->ops->remove(self, self->keys[s], s);
    PyObject *key = core_key(self, s);
    if (key == NULL)
        return -1;
    int rc = self->ops->remove(self, key, s);
    Py_DECREF(key);
    return rc;
}

/* -- calls that name held keys: complete_store, prepare_load, complete_load,
 * remove ----------------------------------------------------------------- */

/* The part of such a call that differs: the keys, the slot of each (-1
 * absent), already looked up; `flag` is complete_store's success. */
typedef PyObject *(*KeyedBody)(Core *self, PyObject *const *items, const int32_t *slots,
                               Py_ssize_t n, int flag);

/* The shape every such call shares, written once: enter (refuse re-entry,
 * snapshot the keys), look every key up first (a key whose lookup fails is
 * the call's InvalidKeyError, before anything changes), run body, leave. */
static PyObject *
keyed_call(Core *self, const char *method, PyObject *arg, KeyedBody body, int flag)
{
    PyObject *seq = enter(self, method, arg);
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    PyObject **items = &PyTuple_GET_ITEM(seq, 0);
    PyObject *out = NULL;
    int32_t small[SMALL];
    int32_t *slots = new_slots(n, small);
    if (slots != NULL) {
        if (slots_of(self, method, items, n, slots) == 0)
            out = body(self, items, slots, n, flag);
        free_slots(slots, small);
    }
    return leave(self, seq, out);
}

/* BlockNotFoundError naming the first absent key (-1 then), else 0. */
static int
all_held(Core *self, const char *method, PyObject *const *items, const int32_t *slots,
         Py_ssize_t n)
{
    for (Py_ssize_t k = 0; k < n; k++)
        if (slots[k] < 0)
            return state_error(KVNotFound, method, items[k], "is not in", self->medium);
    return 0;
}

static PyObject *
complete_store(Core *self, PyObject *const *items, const int32_t *slots, Py_ssize_t n,
               int success)
{
    if (all_held(self, "complete_store", items, slots, n) < 0)
        return NULL;
    PyObject *done = PyList_New(0);
    if (done == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < n; k++) {
        int32_t s = slots[k];
        /* removed by a failure above, or ready (also: named twice) */
        if (!core_used(self, s) || self->ref[s] != -1)
            continue;
        if (PyList_Append(done, items[k]) < 0)
            goto fail;
        self->writing--;
        if (success) {
            self->stores++;
            if (set_ref(self, s, 0) < 0)
                goto fail;
            if (self->kstate != NULL)
                share_if_indexed(self, s);
        }
        else {
            if (remove_from_policy(self, s) < 0)
                goto fail;
            PyObject *gone = release(self, s, NULL);
            if (gone == NULL)
                goto fail;
            Py_DECREF(gone);
        }
    }
    return done;
fail:
    Py_DECREF(done);
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
    return keyed_call(self, "complete_store", arg, complete_store, success);
}

static PyObject *
prepare_load(Core *self, PyObject *const *items, const int32_t *slots, Py_ssize_t n, int flag)
{
    for (Py_ssize_t k = 0; k < n; k++) {
        if (slots[k] < 0) {
            state_error(KVNotFound, "prepare_load", items[k], "is not in", self->medium);
            return NULL;
        }
        if (self->ref[slots[k]] < 0) {
            state_error(KVNotReady, "prepare_load", items[k], "is still being written", NULL);
            return NULL;
        }
    }
    PyObject *ids = PyList_New(n);
    if (ids == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *id = PyLong_FromLong(slots[k]);
        if (id == NULL) {
            Py_DECREF(ids);
            return NULL;
        }
        PyList_SET_ITEM(ids, k, id);
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        int32_t s = slots[k];
        if (self->ref[s] == 0)
            self->pinned++;
        if (set_ref(self, s, self->ref[s] + 1) < 0) {
            Py_DECREF(ids);
            return NULL;
        }
    }
    return ids;
}

static PyObject *
Core_prepare_load(Core *self, PyObject *arg)
{
    return keyed_call(self, "prepare_load", arg, prepare_load, 0);
}

static PyObject *
complete_load(Core *self, PyObject *const *items, const int32_t *slots, Py_ssize_t n, int flag)
{
    /* One at a time with undo, so a key named twice but pinned once fails. */
    for (Py_ssize_t k = 0; k < n; k++) {
        int32_t s = slots[k];
        if (s < 0 || self->ref[s] <= 0) {
            for (Py_ssize_t j = 0; j < k; j++)
                if (self->ref[slots[j]]++ == 0)
                    self->pinned++;
            if (s < 0)
                state_error(KVNotFound, "complete_load", items[k], "is not in", self->medium);
            else
                state_error(KVNotPinned, "complete_load", items[k], "is not pinned", NULL);
            return NULL;
        }
        if (--self->ref[s] == 0)
            self->pinned--;
    }
    if (self->ops->ref_changed != NULL)
        for (Py_ssize_t k = 0; k < n; k++)
            if (self->ops->ref_changed(self, slots[k]) < 0)
                return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Core_complete_load(Core *self, PyObject *arg)
{
    return keyed_call(self, "complete_load", arg, complete_load, 0);
}

/* -- removal and restore ------------------------------------------------- */

static PyObject *
remove_keys(Core *self, PyObject *const *items, const int32_t *slots, Py_ssize_t n, int flag)
{
    PyObject *removed = PyList_New(0);
    if (removed == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < n; k++) {
        int32_t s = slots[k];
        if (s < 0 || !core_used(self, s) || self->ref[s] != 0)
            continue; /* absent (or named twice), pinned or being written */
        if (remove_from_policy(self, s) < 0)
            goto fail;
        PyObject *key = release(self, s, NULL);
        if (key == NULL)
            goto fail;
        int rc = PyList_Append(removed, key);
        Py_DECREF(key);
        if (rc < 0)
            goto fail;
    }
    return removed;
fail:
    Py_DECREF(removed);
    return NULL;
}

static PyObject *
Core_remove(Core *self, PyObject *arg)
{
    return keyed_call(self, "remove", arg, remove_keys, 0);
}

static PyObject *
restore(Core *self, PyObject *seq)
{
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    if (self->used || self->next_fresh || self->nfree) {
        PyErr_Format(KVState, "restore: the %U manager is not empty", self->medium);
        return NULL;
    }
    /* 1. check every pair: (key, slot id) with an int slot id */
    Py_ssize_t top = -1; /* the highest slot id that may be restored */
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *pair = PyTuple_GET_ITEM(seq, k);
        if (!(PyTuple_Check(pair) || PyList_Check(pair)) || PySequence_Fast_GET_SIZE(pair) != 2) {
            PyErr_Format(KVInvalidKey, "restore: item %zd is not a (key, slot id) pair: %R", k,
                         pair);
            return NULL;
        }
        PyObject *key = PySequence_Fast_GET_ITEM(pair, 0);
        PyObject *id = PySequence_Fast_GET_ITEM(pair, 1);
        if (!PyLong_CheckExact(id)) {
            PyErr_Format(KVInvalidKey, "restore: slot id %R of key %R is not an int", id, key);
            return NULL;
        }
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(id, &overflow);
        if (exact_key(key) && !overflow && v >= 0 && v < self->n && v > top)
            top = (Py_ssize_t)v;
    }
    if (reserve(self, top + 1) < 0)
        return NULL;
    /* 2. restore them: bad key types, out-of-range and taken slots, keys
     * already restored are skipped */
    PyObject *restored = PyList_New(0);
    if (restored == NULL)
        return NULL;
    Py_ssize_t high = -1;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *pair = PyTuple_GET_ITEM(seq, k);
        PyObject *key = PySequence_Fast_GET_ITEM(pair, 0);
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(PySequence_Fast_GET_ITEM(pair, 1), &overflow);
        if (!exact_key(key) || overflow || v < 0 || v >= self->n || core_used(self, (int32_t)v))
            continue;
        int32_t s = core_slot(self, key);
        if (s == -2)
            goto fail;
        if (s >= 0)
            continue;
        PyObject *id = hold(self, key, (int32_t)v, 0);
        if (id == NULL)
            goto fail;
        Py_DECREF(id);
        if (self->kstate != NULL)
            share_if_indexed(self, (int32_t)v);
        if (self->ops->insert(self, key, (int32_t)v) < 0 || PyList_Append(restored, key) < 0)
            goto fail;
        if (v > high)
            high = (Py_ssize_t)v;
    }
    /* Free slots are then handed out lowest first: the holes below the
     * highest restored slot (on the stack, lowest on top), then the fresh ids
     * above it in order. */
    self->next_fresh = high + 1;
    self->nfree = 0;
    for (Py_ssize_t i = high; i >= 0; i--)
        if (!core_used(self, (int32_t)i))
            self->free_stack[self->nfree++] = (int32_t)i;
    self->stack_first = 1;
    return restored;
fail:
    Py_DECREF(restored);
    return NULL;
}

/* restore(pairs) -> keys restored: (key, slot id) pairs found on disk, oldest first. */
static PyObject *
Core_restore(Core *self, PyObject *arg)
{
    PyObject *seq = enter(self, "restore", arg);
    return seq == NULL ? NULL : leave(self, seq, restore(self, seq));
}


/* attach_index(table): from now on the keys the NVMe index table records at
 * the slots this core holds are read from it, not copied (see Core.keys).
 * The core must be empty. */
static PyObject *
Core_attach_index(Core *self, PyObject *table)
{
    PyObject *seq = enter(self, "attach_index", NULL);
    if (seq == NULL)
        return NULL;
    PyObject *out = NULL;
    if (self->used || self->next_fresh || self->nfree) {
        PyErr_Format(KVState, "attach_index: the %U manager is not empty", self->medium);
        goto done;
    }
    if (self->index != NULL) {
        if (self->index == table)
            out = Py_NewRef(Py_None);
        else
            PyErr_SetString(PyExc_RuntimeError, "attach_index: already attached to a table");
        goto done;
    }
    const KVIndexAPI *api = PyCapsule_Import(KV_INDEX_CAPSULE, 0);
    if (api == NULL)
        goto done;
    if (!PyObject_TypeCheck(table, api->type)) {
        PyErr_Format(PyExc_TypeError, "attach_index: expected a %s, got %s", api->type->tp_name,
                     _PyType_Name(Py_TYPE(table)));
        goto done;
    }
    PyObject *own = PyDict_New();
    uint8_t *kstate = PyMem_Calloc((size_t)(self->cap ? self->cap : 1), 1);
    if (own == NULL || kstate == NULL || api->attach(table, self, index_changes) < 0) {
        Py_XDECREF(own);
        PyMem_Free(kstate);
        if (kstate == NULL)
            PyErr_NoMemory();
        goto done;
    }
    PyMem_Free(self->keys); /* empty: every entry NULL */
    self->keys = NULL;
    self->kstate = kstate;
    self->own = own;
    self->iapi = api;
    self->index = Py_NewRef(table);
    out = Py_NewRef(Py_None);
done:
    return leave(self, seq, out);
}

/* restore_index() -> entries restored: every entry of the attached table, as
 * restore() takes (key, slot id) pairs oldest first, with no object per key
 * (the keys stay in the table, shared). */
static PyObject *
Core_restore_index(Core *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *seq = enter(self, "restore_index", NULL);
    if (seq == NULL)
        return NULL;
    PyObject *out = NULL;
    uint32_t *order = NULL;
    if (self->index == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "restore_index: no index attached");
        goto done;
    }
    if (self->used || self->next_fresh || self->nfree) {
        PyErr_Format(KVState, "restore: the %U manager is not empty", self->medium);
        goto done;
    }
    Py_ssize_t n;
    order = self->iapi->oldest_first(self->index, &n);
    if (order == NULL)
        goto done;
    /* the slots this core has, oldest first (in place) */
    Py_ssize_t m = 0, top = -1;
    for (Py_ssize_t k = 0; k < n; k++)
        if ((Py_ssize_t)order[k] < self->n) {
            order[m++] = order[k];
            if ((Py_ssize_t)order[k] > top)
                top = (Py_ssize_t)order[k];
        }
    if (reserve(self, top + 1) < 0)
        goto done;
    /* 1. every slot shared, found through the index's hash: nothing enters
     * the map (empty, as the core is); ref 0 already (no slot was ever used) */
    self->map_all = 0;
    for (Py_ssize_t k = 0; k < m; k++)
        self->kstate[order[k]] = KS_SHARED;
    /* 2. the policy, oldest first */
    const int32_t *slots = (const int32_t *)order; /* each < n <= INT32_MAX */
    Py_ssize_t count = 0;
    if (self->ops->insert_slots != NULL)
        count = self->ops->insert_slots(self, slots, m);
    else {
        int with_keys = self->ops != &lru_ops; /* lru orders slots only */
        for (; count < m; count++) {
            PyObject *key = with_keys ? core_key(self, slots[count]) : NULL;
            int stop = (with_keys && key == NULL) || self->ops->insert(self, key, slots[count]) < 0;
            Py_XDECREF(key);
            if (stop)
                break;
        }
    }
    /* A failure (out of memory) leaves the oldest `count` restored. */
    int failed = count < m;
    for (Py_ssize_t k = count; k < m; k++)
        self->kstate[order[k]] = KS_FREE;
    /* 3. the free slots, handed out lowest first: the holes below the
     * highest restored slot (on the stack, lowest on top), then the fresh ids
     * above it in order */
    self->nfree = 0;
    for (Py_ssize_t i = top; i >= 0; i--)
        if (self->kstate[i] == KS_FREE)
            self->free_stack[self->nfree++] = (int32_t)i;
    self->used = count;
    self->next_fresh = top + 1;
    self->stack_first = 1;
    out = failed ? NULL : PyLong_FromSsize_t(count);
done:
    PyMem_RawFree(order);
    return leave(self, seq, out);
}

/* -- type ---------------------------------------------------------------- */

static PyObject *
Core_get_policy(Core *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->policy_obj ? self->policy_obj : Py_None);
}

static PyObject *
Core_get_policy_name(Core *self, void *Py_UNUSED(closure))
{
    if (self->ops == NULL)
        Py_RETURN_NONE;
    if (self->policy_obj != NULL)
        return PyObject_GetAttrString(self->policy_obj, "name");
    return PyUnicode_FromString(self->ops->name);
}

static PyGetSetDef Core_getset[] = {
    {"policy", (getter)Core_get_policy, NULL, "The CachePolicy object called back, or None.", NULL},
    {"policy_name", (getter)Core_get_policy_name, NULL, "The policy's name.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Core_methods[] = {
    {"lookup", (PyCFunction)Core_lookup, METH_O, "Leading keys present and ready."},
    {"touch", (PyCFunction)Core_touch, METH_O, "Mark keys used, the first most recently."},
    {"get", (PyCFunction)Core_get, METH_O, "(slot id, ref count) of a key, or None."},
    {"keys", (PyCFunction)Core_keys, METH_NOARGS, "Keys held, in the policy's order."},
    {"policy_state", (PyCFunction)Core_policy_state, METH_NOARGS,
     "The policy's order data (lists, ghosts, target, priorities), for tests."},
    {"counters", (PyCFunction)Core_counters, METH_NOARGS,
     "(used, free, pinned, writing, lookups, lookup_keys, hits, stores, evictions, "
     "failed_prepares)"},
    {"allocated", (PyCFunction)Core_allocated, METH_NOARGS,
     "Slots the per-slot arrays hold now (grown as slots are first used)."},
    {"prepare_store", (PyCFunction)Core_prepare_store, METH_O,
     "(to_store, ids, evicted, evicted_ids), or None when too few idle blocks."},
    {"complete_store", (PyCFunction)Core_complete_store, METH_VARARGS,
     "Ready (or drop) the keys being written; returns them."},
    {"prepare_load", (PyCFunction)Core_prepare_load, METH_O, "Pin keys; their slot ids."},
    {"complete_load", (PyCFunction)Core_complete_load, METH_O, "Unpin keys."},
    {"remove", (PyCFunction)Core_remove, METH_O, "Drop idle keys; returns those removed."},
    {"restore", (PyCFunction)Core_restore, METH_O, "Load (key, slot id) pairs as ready."},
    {"attach_index", (PyCFunction)Core_attach_index, METH_O,
     "Read the keys an NVMe index table records from it (no copy); the core must be empty."},
    {"restore_index", (PyCFunction)Core_restore_index, METH_NOARGS,
     "Restore every entry of the attached index table, oldest first; returns how many."},
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
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One tier's block metadata and eviction order (see kvactors.manager).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_traverse = (traverseproc)Core_traverse,
    .tp_methods = Core_methods,
    .tp_getset = Core_getset,
    .tp_as_sequence = &Core_as_sequence,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvactors._manager_core",
    "One tier's block metadata and eviction order, in C.", -1, NULL,
};

static int
import_errors(void)
{
    PyObject *errors = PyImport_ImportModule("kvactors.errors");
    if (errors == NULL)
        return -1;
    struct {
        PyObject **slot;
        const char *name;
    } wanted[] = {
        {&KVInvalidKey, "InvalidKeyError"},   {&KVNotFound, "BlockNotFoundError"},
        {&KVNotReady, "BlockNotReadyError"},  {&KVNotPinned, "BlockNotPinnedError"},
        {&KVState, "BlockStateError"},        {&KVConfig, "ConfigError"},
        {&KVUnknownPolicy, "UnknownPolicyError"}, {&KVBusy, "ManagerBusyError"},
        {&KVPolicyError, "PolicyError"},
    };
    for (size_t i = 0; i < sizeof(wanted) / sizeof(wanted[0]); i++)
        if ((*wanted[i].slot = PyObject_GetAttrString(errors, wanted[i].name)) == NULL) {
            Py_DECREF(errors);
            return -1;
        }
    Py_DECREF(errors);
    return 0;
}

PyMODINIT_FUNC
PyInit__manager_core(void)
{
    if (import_errors() < 0 || PyType_Ready(&CoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_ssize_t count = 0;
    while (POLICY_TABLE[count] != NULL)
        count++;
    PyObject *names = PyTuple_New(count);
    if (names == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *name = PyUnicode_FromString(POLICY_TABLE[i]->name);
        if (name == NULL) {
            Py_DECREF(names);
            goto fail;
        }
        PyTuple_SET_ITEM(names, i, name);
    }
    if (PyModule_AddObject(m, "POLICIES", names) < 0) {
        Py_DECREF(names);
        goto fail;
    }
    if (PyModule_AddIntConstant(m, "MAX_BLOCKS", (long)MAX_BLOCKS) < 0)
        goto fail;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "ManagerCore", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
