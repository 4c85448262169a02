/* kvactors._manager_core: what the manager core and its policies share.
 *
 * The core (manager_core.c) owns one tier's state: key -> slot id, the key
 * and ref count of each slot, the free slots and the counters. A policy only
 * orders the slots it is told about, through a table of functions (PolicyOps)
 * that mirrors kvactors.policy.CachePolicy:
 *
 *   CachePolicy           PolicyOps
 *   insert(key, block)    insert(core, key, slot)
 *   insert_many(items)    insert_many(core, keys, slots, n)
 *   remove(key)           remove(core, key, slot)
 *   touch(keys)           touch(core, keys, n)
 *   evict(n, protected)   evict(core, n, epoch, call, ncall, out)
 *   keys()                keys(core)
 *   admit(keys, new)      admit(core, call, ncall, fresh, m)   (optional)
 *   get / len / in        answered by the core's own key map
 *
 * Each built-in policy is one file (policy_lru.c, policy_arc.c,
 * policy_weighted_lru.c, policy_prefix_admit.c) defining one `const PolicyOps`; policy_python.c is
 * the entry that calls back into a Python CachePolicy object, so a user's own
 * policy runs on this same core. The table of policies is POLICY_TABLE in
 * manager_core.c.
 *
 * Slot ids are int32 (so num_blocks <= 2**31 - 1). Per-slot arrays, the
 * core's and each policy's, are grown as slots are first used (`grow`), never
 * allocated for the whole capacity up front.
 */
#ifndef KVACTORS_MANAGER_CORE_H
#define KVACTORS_MANAGER_CORE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <sys/mman.h>

#include "index_api.h"
#include "key_table.h"

typedef struct Core Core;

typedef struct PolicyOps {
    const char *name;
    /* Make the policy's state (core->pstate). `options` is the CachePolicy
     * object for the Python entry, else a dict of keyword options (may be
     * empty). The core's arrays are not allocated yet (cap 0). */
    int (*init)(Core *core, PyObject *options);
    void (*dealloc)(Core *core);
    /* GC support for policies that hold Python objects (may be NULL). */
    int (*traverse)(Core *core, visitproc visit, void *arg);
    /* Per-slot arrays must now hold new_cap slots (old_cap before). May be
     * called again with the same sizes after a failure: idempotent. */
    int (*grow)(Core *core, Py_ssize_t old_cap, Py_ssize_t new_cap);
    /* key (already in the core's map, ref set) enters at slot s. */
    int (*insert)(Core *core, PyObject *key, int32_t s);
    int (*insert_many)(Core *core, PyObject *const *keys, const int32_t *slots, Py_ssize_t n);
    /* key leaves at slot s (not an eviction: a failed store or a remove). */
    int (*remove)(Core *core, PyObject *key, int32_t s);
    /* keys were used, the first most recently (walk them in reverse). Keys
     * may be absent (ghost lists care) and were checked hashable. */
    int (*touch)(Core *core, PyObject *const *keys, Py_ssize_t n);
    /* Pick exactly n victims among evictable slots (core_evictable), write
     * them to out in eviction order and drop them from the policy's order
     * (the core then frees them). Returns n; 0 when fewer than n exist, with
     * nothing changed; -1 with an exception set. `call` are the keys named
     * in the prepare_store (all protected; their slots carry `epoch`). */
    Py_ssize_t (*evict)(Core *core, Py_ssize_t n, uint32_t epoch, PyObject *const *call,
                        Py_ssize_t ncall, int32_t *out);
    /* A slot's ref count changed (NULL: the policy reads core->ref itself). */
    int (*ref_changed)(Core *core, int32_t s);
    /* The keys held, in the policy's order (a new list). */
    PyObject *(*keys)(Core *core);
    /* The policy's order data, in the shape its Python reference's
     * order_state() returns (for the differential tests). */
    PyObject *(*state)(Core *core);
    /* Admission (NULL: every new key is stored), CachePolicy.admit: which of
     * a prepare_store's new keys to store at all. `call` are the call's keys
     * in order, `fresh` its m new keys (not held, exact int/bytes, distinct),
     * in call order. Called after the call is checked, before any eviction,
     * only when m > 0. Returns how many LEADING keys of fresh to store
     * (0..m); -1 with an exception set. It may change the policy's learning
     * state (also when the store then fails for lack of idle blocks), never
     * the core's. */
    Py_ssize_t (*admit)(Core *core, PyObject *const *call, Py_ssize_t ncall,
                        PyObject *const *fresh, Py_ssize_t m);
    /* n held slots (keys through core_key) enter in this order, as n insert
     * calls would: restore_index's bulk load. Returns how many (leading) did:
     * n, or fewer with an exception set. NULL: the core calls insert once per
     * slot. */
    Py_ssize_t (*insert_slots)(Core *core, const int32_t *slots, Py_ssize_t n);
} PolicyOps;

struct Core {
    PyObject_HEAD
    const PolicyOps *ops;
    void *pstate;           /* the policy's own state */
    PyObject *policy_obj;   /* the Python CachePolicy (python entry), else NULL */
    Py_ssize_t n;           /* capacity in slots */
    Py_ssize_t cap;         /* slots the per-slot arrays hold now (<= n) */
    double block_size;      /* every block's size, for size-aware policies */
    PyObject *medium;       /* the tier's name, for error messages */
    KeyTable map;           /* key -> slot id */
    /* The keys. Alone, one object per slot: keys[s] (owned), NULL when free.
     * Attached to an NVMe index table (attach_index; keys is then NULL), a
     * byte per slot instead: kstate[s] is KS_FREE, KS_OWN (the key object is
     * own[s], a dict by slot id: keys being written, or not indexed) or
     * KS_SHARED (the key is the one the index records at slot s, read from
     * its table: no object, no copy). Read them through core_used/core_key. */
    PyObject **keys;
    uint8_t *kstate;
    PyObject *own;
    PyObject *index;        /* the attached index table (owned), or NULL */
    const KVIndexAPI *iapi;
    /* Attached, the map holds only the KS_OWN slots: an exact int/bytes key is
     * looked up in the index's own hash first (its record's slot, if this core
     * shares it), so restore_index inserts nothing per key. The first lookup
     * of any other key (dict semantics need its Python hash against every
     * key held) puts the shared slots in the map too, for good: map_all. */
    int map_all;
    int32_t *ref;           /* -1 being written, 0 idle, n > 0 pinned n times */
    uint32_t *stamp;        /* == epoch: named in the current prepare_store */
    int32_t *free_stack;    /* freed slot ids, last freed on top */
    int32_t *scratch;       /* victims of one prepare_store */
    Py_ssize_t scratch_len;
    Py_ssize_t nfree;
    Py_ssize_t next_fresh;  /* ids next_fresh..n-1 have never been handed out */
    int stack_first;        /* after restore: free stack before fresh ids */
    int busy;               /* a method is running (re-entry is refused) */
    uint32_t epoch;
    Py_ssize_t used, writing, pinned;
    long long lookups, lookup_keys, hits, stores, evictions, failed_prepares;
};

#define KS_FREE 0
#define KS_OWN 1
#define KS_SHARED 2

/* The slot of key in a core attached to an index (manager_core.c). */
int32_t core_slot_shared(Core *core, PyObject *key);

/* The slot of key: >= 0, -1 when absent, -2 with an exception set. */
static inline int32_t
core_slot(Core *core, PyObject *key)
{
    if (core->kstate != NULL)
        return core_slot_shared(core, key);
    return kt_find(&core->map, core->keys, key);
}

/* The same for a key whose mixed hash (kt_mix of its Python hash) is h. */
static inline int32_t
core_slot_mixed(Core *core, PyObject *key, uint32_t h)
{
    if (core->kstate != NULL)
        return core_slot_shared(core, key);
    return kt_find_mixed(&core->map, h, key, kt_same_in, core->keys);
}

/* Whether slot s (< cap) holds a key. */
static inline int
core_used(const Core *core, int32_t s)
{
    return core->kstate != NULL ? core->kstate[s] != KS_FREE : core->keys[s] != NULL;
}

/* The key held at slot s, a new reference (NULL with an exception set: only
 * when a key read from the index cannot be made, out of memory). */
PyObject *core_key(Core *core, int32_t s);

static inline int
core_evictable(const Core *core, int32_t s, uint32_t epoch)
{
    return core->ref[s] == 0 && core->stamp[s] != epoch;
}

/* p (bytes long) just allocated: NULL sets MemoryError. */
static inline void *
advise_huge(void *p, size_t bytes)
{
#ifdef MADV_HUGEPAGE
    if (p != NULL && bytes >= ((size_t)4 << 20)) {
        /* Huge pages for the large arrays (their whole 2 MiB pages): random
         * slots touch them at random, and 4 KiB pages miss the TLB each time. */
        uintptr_t lo = ((uintptr_t)p + ((1u << 21) - 1)) & ~(uintptr_t)((1u << 21) - 1);
        uintptr_t hi = ((uintptr_t)p + bytes) & ~(uintptr_t)((1u << 21) - 1);
        if (hi > lo)
            madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
    }
#endif
    if (p == NULL)
        PyErr_NoMemory();
    return p;
}

/* Grow a per-slot array to new_cap items (NULL with MemoryError on failure,
 * the old array kept). */
static inline void *
grow_array(void *old, Py_ssize_t new_cap, size_t item)
{
    size_t bytes = (size_t)(new_cap ? new_cap : 1) * item;
    return advise_huge(PyMem_Realloc(old, bytes), bytes);
}

/* The same for an array whose new items must read as zero: a first
 * allocation comes zeroed from calloc (a fresh large one is never written
 * twice: the kernel's pages are zero already). */
static inline void *
grow_zeroed(void *old, Py_ssize_t old_cap, Py_ssize_t new_cap, size_t item)
{
    if (old != NULL) {
        char *p = grow_array(old, new_cap, item);
        if (p != NULL && new_cap > old_cap)
            memset(p + (size_t)old_cap * item, 0, (size_t)(new_cap - old_cap) * item);
        return p;
    }
    size_t bytes = (size_t)(new_cap ? new_cap : 1) * item;
    return advise_huge(PyMem_Calloc(1, bytes), bytes);
}

#define GROW_ZEROED(ptr, old_cap, new_cap)                                    \
    do {                                                                      \
        void *p_ = grow_zeroed((ptr), (old_cap), (new_cap), sizeof(*(ptr)));  \
        if (p_ == NULL)                                                       \
            return -1;                                                        \
        (ptr) = p_;                                                           \
    } while (0)

#define GROW(ptr, new_cap)                                                    \
    do {                                                                      \
        void *p_ = grow_array((ptr), (new_cap), sizeof(*(ptr)));              \
        if (p_ == NULL)                                                       \
            return -1;                                                        \
        (ptr) = p_;                                                           \
    } while (0)

/* Doubly linked lists over index arrays (-1 ends a list). */
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

/* The lookup of key for METHOD failed (its __hash__ or __eq__ raised): turn
 * the exception into InvalidKeyError, as the Python manager does. Returns -1. */
int core_key_fault(const char *method, PyObject *key);

/* The keys of a linked list from head, as a new list of len items. */
PyObject *core_list_keys(PyObject **keys, const int32_t *next, int32_t head, Py_ssize_t len);

/* The same for a list of the core's slots (their keys through core_key). */
PyObject *core_list_slots(Core *core, const int32_t *next, int32_t head, Py_ssize_t len);

/* insert_many for policies whose insert does all the work. */
int policy_insert_each(Core *core, PyObject *const *keys, const int32_t *slots, Py_ssize_t n);

extern const PolicyOps lru_ops;
extern const PolicyOps arc_ops;
extern const PolicyOps weighted_lru_ops;
extern const PolicyOps prefix_admit_ops;
extern const PolicyOps python_policy_ops;

#endif
