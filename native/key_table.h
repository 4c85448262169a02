/* A compact open-addressing table from block keys to indices (slot ids, or
 * ARC's ghost entries): one uint64 per bucket, (32 bits of the key's mixed hash
 * << 32) | (index + 1), 0 for an empty bucket; linear probing, at most 70 %
 * full, deletion by backward shift (no tombstones). The keys themselves live
 * in the owner's array (keys[index]); equality is Python's (identity first,
 * exact bytes by memcmp, else PyObject_RichCompareBool(stored, key)), as a
 * dict compares. 8-11 bytes per key held, where a dict with int values takes
 * about 70. */
#ifndef KVACTORS_KEY_TABLE_H
#define KVACTORS_KEY_TABLE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

typedef struct {
    uint64_t *tab;
    uint64_t mask; /* buckets - 1; 0 with tab NULL before the first insert */
    Py_ssize_t used;
} KeyTable;

#define KT_INDEX(e) ((int32_t)((uint32_t)(e) - 1u))
#define KT_HASH(e) ((uint32_t)((e) >> 32))
#define KT_ENTRY(h, i) (((uint64_t)(h) << 32) | (uint64_t)((uint32_t)(i) + 1u))

/* Tables of KT_MAPPED bytes or more are anonymous maps with huge pages asked
 * for: a lookup is one random access, and with 4 KiB pages most of them also
 * miss the TLB once the table is large. */
#define KT_MAPPED ((size_t)4 << 20)

static inline uint64_t *
kt_alloc(uint64_t buckets)
{
    size_t bytes = (size_t)buckets * sizeof(uint64_t);
    if (bytes < KT_MAPPED)
        return PyMem_Calloc((size_t)buckets, sizeof(uint64_t));
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);
#endif
    return p;
}

static inline void
kt_release(uint64_t *tab, uint64_t buckets)
{
    size_t bytes = (size_t)buckets * sizeof(uint64_t);
    if (tab == NULL)
        return;
    if (bytes < KT_MAPPED)
        PyMem_Free(tab);
    else
        munmap(tab, bytes);
}

static inline void
kt_free(KeyTable *t)
{
    kt_release(t->tab, t->tab == NULL ? 0 : t->mask + 1);
    t->tab = NULL;
    t->mask = 0;
    t->used = 0;
}

/* The bucket hash of a key's Python hash: mixed (murmur3's finalizer), since
 * ints hash to themselves and runs of them would make long probe runs. */
static inline uint32_t
kt_mix(Py_hash_t full)
{
    uint64_t x = (uint64_t)full;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return (uint32_t)x;
}

static inline int
kt_same(PyObject *stored, PyObject *key)
{
    if (stored == key)
        return 1;
    if (PyBytes_CheckExact(stored) && PyBytes_CheckExact(key)) {
        Py_ssize_t n = PyBytes_GET_SIZE(stored);
        return n == PyBytes_GET_SIZE(key) &&
               memcmp(PyBytes_AS_STRING(stored), PyBytes_AS_STRING(key), (size_t)n) == 0;
    }
    if (PyBytes_CheckExact(stored) && PyLong_CheckExact(key))
        return 0;
    if (PyLong_CheckExact(stored) && PyBytes_CheckExact(key))
        return 0;
    return PyObject_RichCompareBool(stored, key, Py_EQ);
}

/* Whether the key stored at index is key: 1 equal, 0 not, -1 with an
 * exception set. */
typedef int (*kt_same_fn)(void *ctx, int32_t index, PyObject *key);

/* The index of key, whose mixed hash (kt_mix of its Python hash) is h, among
 * entries whose stored key same(ctx, index, key) compares: >= 0, -1 when
 * absent, -2 with an exception set (its __eq__ raised). */
static inline int32_t
kt_find_mixed(const KeyTable *t, uint32_t h, PyObject *key, kt_same_fn same, void *ctx)
{
    if (t->tab == NULL)
        return -1;
    for (uint64_t i = h & t->mask;; i = (i + 1) & t->mask) {
        uint64_t e = t->tab[i];
        if (e == 0)
            return -1;
        if (KT_HASH(e) == h) {
            int32_t idx = KT_INDEX(e);
            int eq = same(ctx, idx, key);
            if (eq < 0)
                return -2;
            if (eq)
                return idx;
        }
    }
}

/* The same, hashing key first: -2 also when its __hash__ raised. */
static inline int32_t
kt_find_by(const KeyTable *t, PyObject *key, kt_same_fn same, void *ctx)
{
    Py_hash_t full = PyObject_Hash(key);
    if (full == -1 && PyErr_Occurred())
        return -2;
    return kt_find_mixed(t, kt_mix(full), key, same, ctx);
}

static inline int
kt_same_in(void *keys, int32_t index, PyObject *key)
{
    return kt_same(((PyObject *const *)keys)[index], key);
}

/* The index of key, the stored keys read from keys[index]: >= 0, -1 when
 * absent, -2 with an exception set (its __hash__ or __eq__ raised). */
static inline int32_t
kt_find(const KeyTable *t, PyObject *const *keys, PyObject *key)
{
    return kt_find_by(t, key, kt_same_in, (void *)keys);
}

static inline int
kt_resize(KeyTable *t, uint64_t buckets)
{
    uint64_t *tab = kt_alloc(buckets);
    if (tab == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    uint64_t mask = buckets - 1;
    if (t->tab != NULL)
        for (uint64_t j = 0; j <= t->mask; j++) {
            uint64_t e = t->tab[j];
            if (e == 0)
                continue;
            uint64_t i = KT_HASH(e) & mask;
            while (tab[i] != 0)
                i = (i + 1) & mask;
            tab[i] = e;
        }
    kt_release(t->tab, t->tab == NULL ? 0 : t->mask + 1);
    t->tab = tab;
    t->mask = mask;
    return 0;
}

/* Room for n entries without a resize. */
static inline int
kt_reserve(KeyTable *t, Py_ssize_t n)
{
    uint64_t buckets = t->tab == NULL ? 0 : t->mask + 1, want = buckets ? buckets : 16;
    while ((uint64_t)n * 10 > want * 7)
        want *= 2;
    return want == buckets ? 0 : kt_resize(t, want);
}

/* An absent key whose mixed hash (kt_mix of its Python hash) is h enters at index. */
static inline int
kt_insert_mixed(KeyTable *t, uint32_t h, int32_t index)
{
    uint64_t buckets = t->tab == NULL ? 0 : t->mask + 1;
    if ((uint64_t)(t->used + 1) * 10 > buckets * 7 &&
        kt_resize(t, buckets ? 2 * buckets : 16) < 0)
        return -1;
    uint64_t i = h & t->mask;
    while (t->tab[i] != 0)
        i = (i + 1) & t->mask;
    t->tab[i] = KT_ENTRY(h, index);
    t->used++;
    return 0;
}

/* An absent key whose Python hash is full enters at index. */
static inline int
kt_insert_hash(KeyTable *t, Py_hash_t full, int32_t index)
{
    return kt_insert_mixed(t, kt_mix(full), index);
}

/* key (absent, exact int or bytes: hashing it cannot fail) enters at index. */
static inline int
kt_insert(KeyTable *t, PyObject *key, int32_t index)
{
    Py_hash_t full = PyObject_Hash(key);
    if (full == -1 && PyErr_Occurred())
        return -1;
    return kt_insert_hash(t, full, index);
}

/* The entry of index, whose key's mixed hash is h, leaves. */
static inline void
kt_delete_mixed(KeyTable *t, uint32_t h, int32_t index)
{
    uint64_t want = KT_ENTRY(h, index), mask = t->mask;
    uint64_t i = h & mask;
    while (t->tab[i] != want) {
        if (t->tab[i] == 0)
            return; /* not held: nothing to do */
        i = (i + 1) & mask;
    }
    /* Backward shift: move up each later entry of the run that may sit at i. */
    for (uint64_t j = (i + 1) & mask;; j = (j + 1) & mask) {
        uint64_t e = t->tab[j];
        if (e == 0)
            break;
        uint64_t home = KT_HASH(e) & mask;
        /* e stays if its home lies cyclically in (i, j] */
        int stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            t->tab[i] = e;
            i = j;
        }
    }
    t->tab[i] = 0;
    t->used--;
}

/* The entry of index, whose key's Python hash is full, leaves. */
static inline void
kt_delete_hash(KeyTable *t, Py_hash_t full, int32_t index)
{
    kt_delete_mixed(t, kt_mix(full), index);
}

/* The entry of index (whose key is key, already held) leaves. */
static inline void
kt_delete(KeyTable *t, PyObject *key, int32_t index)
{
    kt_delete_hash(t, PyObject_Hash(key), index); /* exact int/bytes: cannot fail */
}

#endif
