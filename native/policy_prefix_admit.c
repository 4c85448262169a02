/* prefix_admit: prefix-aware admission with class-valued GreedyDual eviction.
 * Reference: kvactors/policy/prefix_admit.py (PrefixAdmitPolicy); the
 * arithmetic is done in the same order on the same doubles, so the two agree
 * bit for bit (the differential tests compare order_state()).
 *
 * Per slot: its class, its priority H and its place in its class's list
 * (arrival order). Per class: births and uses (value = uses / births). One
 * ghost list (evicted or declined keys, oldest first) with each ghost's tag
 * (the class it was evicted from, or -1 - class if declined) and `stored`
 * when it left: ghosts older than one capacity of stores are dropped as new
 * ones come, and at most GHOSTS capacities are kept. admit() keeps the class
 * of each key it admits (`chosen`, until the next admit), which the
 * insert_many of the same prepare_store reads; insert alone (restore) takes
 * a chosen class too, else class 0. touch() keeps the keys it found as ghosts
 * within the window with the class each would have moved to (`returning`,
 * until a later touch finds any): admit gives such a key that class when it is worth
 * more than its new class (not for a call's last key); a ghost of any age right
 * behind a reused block (held, or admitted by the same call) then takes that
 * block's class when it is worth more (not for a call's last key either). */
#include "manager_core.h"

#include <math.h>

#define NEW_CLASSES 16
#define CLASSES 19 /* NEW_CLASSES + 3 reused classes */
#define PRIOR_BIRTHS 1.0
#define PRIOR_USES 0.5
#define WINDOW 4.0
#define GHOSTS 4 /* at most this many capacities of ghosts, kept this many capacities of stores */
#define DUEL_SAMPLE 32  /* the miniatures see one key in at most this many */
#define DUEL_BLOCKS 1024 /* ...and hold at least this many blocks each */
#define RET_STALE 0xFF   /* ret_cls of a key whose ghost was older than the window */

typedef struct Mini Mini;

/* A slot's entry: one cache line serves the walk of a list (next, H). */
typedef struct {
    double prio;          /* H */
    int32_t prev, next;   /* its class list, -1 ends it */
    uint8_t cls;          /* class | RESTORED */
} Node;

/* A ghost: 32 bytes, two to a cache line. */
typedef struct {
    PyObject *key;       /* owned; NULL when the entry is free */
    long long since;     /* `stored` when it left */
    int32_t prev, next;  /* the ghost list (a free entry: the next free one) */
    uint32_t hash;       /* kt_mix of the key's hash: dropping it hashes nothing */
    int8_t tag;          /* class evicted from, or -1 - class declined in */
} Ghost;

typedef struct {
    double clock, evictions, regrets, window;
    long long stored; /* blocks inserted so far: the ghost window's clock */
    double births[CLASSES], uses[CLASSES];
    int32_t head[CLASSES], tail[CLASSES];
    double head_prio[CLASSES]; /* H of each list's head, so evict reads no slot to start */
    Py_ssize_t len[CLASSES];
    Node *node;           /* per slot */
    /* the keys the last admit admitted (owned), in call order, and their
     * classes; insert_many takes them all */
    PyObject **chosen_keys;
    uint8_t *chosen;
    Py_ssize_t chosen_cap, nchosen;
    int32_t cursor[CLASSES]; /* evict's scratch: each class's next candidate */
    double cursor_prio[CLASSES];
    int active[CLASSES];
    /* ghosts: gmap key -> entry of `ghosts`; one list, oldest first */
    KeyTable gmap;
    Ghost *ghosts;
    Py_ssize_t gcap, glen;
    int32_t ghead, gtail, gfree; /* gfree: first free entry, -1 none */
    unsigned long long gadds;    /* ghosts added so far */
    /* The keys the last touch found absent (owned, in call order): none of
     * them is a ghost while no ghost was added since (gadds == probed_at),
     * so admit, which a handshake calls next on the same keys, need not look
     * them up again. */
    PyObject **probed;
    Py_ssize_t nprobed, probed_cap;
    unsigned long long probed_at;
    /* The keys the last touch that found any found as ghosts within the window
     * (owned), their hashes, and the class each would have moved to had it
     * stayed. */
    PyObject **ret_keys;
    Py_hash_t *ret_hash;
    uint8_t *ret_cls;
    Py_ssize_t nret, ret_cap;
    /* The seen cut (a new key that is no ghost is declined, with the keys
     * after it) and the duel that sets it: two miniatures of this policy (no
     * duel of their own) on the keys whose mixed hash is below sample_below,
     * one never cutting, one always; their leading hits, halved every WINDOW
     * miniature capacities of sampled keys. */
    int cut;
    Mini *minis[2];
    uint64_t sample_below;
    double duel_hits[2], duel_keys;
    PyObject **sampled; /* touch's scratch: its sampled keys (borrowed), their hashes */
    uint32_t *sampled_hash;
    Py_ssize_t sampled_cap;
} PrefixAdmit;

/* A miniature: a core of its own (only the fields a policy reads: n, used,
 * keys, ref, stamp, map, epoch), its free slots and a request's scratch. */
struct Mini {
    Core core;
    int32_t *free_slots; /* freed slots, then next_fresh.. never used (nothing up front) */
    Py_ssize_t nfree, next_fresh;
    PyObject **fresh;
    int32_t *slots, *out;
    Py_ssize_t scratch_cap;
};

#define PA(core) ((PrefixAdmit *)(core)->pstate)

/* A slot's key entered through insert (restore): it may also be a ghost.
 * A key stored through admit + insert_many never is (admit forgot its ghost),
 * so evicting it adds a ghost without looking for one. */
#define RESTORED 0x80
#define CLASS(p, s) ((p)->node[s].cls & ~RESTORED)

static int pa_setup(Core *core, int duel);
static void pa_dealloc(Core *core);
static int pa_grow(Core *core, Py_ssize_t old_cap, Py_ssize_t new_cap);

static void
mini_free(Mini *m)
{
    if (m == NULL)
        return;
    Core *c = &m->core;
    pa_dealloc(c);
    if (c->keys != NULL)
        for (Py_ssize_t s = 0; s < m->next_fresh; s++)
            Py_XDECREF(c->keys[s]);
    kt_free(&c->map);
    PyMem_Free(c->keys);
    PyMem_Free(c->ref);
    PyMem_Free(c->stamp);
    PyMem_Free(m->free_slots);
    PyMem_Free(m->fresh);
    PyMem_Free(m->slots);
    PyMem_Free(m->out);
    PyMem_Free(m);
}

/* A miniature of n blocks, cutting or not: NULL with an exception set. */
static Mini *
mini_new(Py_ssize_t n, int cut)
{
    Mini *m = PyMem_Calloc(1, sizeof(Mini));
    if (m == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    Core *c = &m->core;
    c->ops = &prefix_admit_ops;
    c->n = c->cap = n;
    c->block_size = 1.0;
    c->epoch = 1;
    c->keys = PyMem_Calloc((size_t)n, sizeof(PyObject *));
    c->ref = PyMem_Calloc((size_t)n, sizeof(int32_t));
    c->stamp = PyMem_Calloc((size_t)n, sizeof(uint32_t));
    m->free_slots = PyMem_Malloc((size_t)n * sizeof(int32_t));
    if (c->keys == NULL || c->ref == NULL || c->stamp == NULL || m->free_slots == NULL) {
        PyErr_NoMemory();
        mini_free(m);
        return NULL;
    }
    if (pa_setup(c, 0) < 0 || pa_grow(c, 0, n) < 0) {
        mini_free(m);
        return NULL;
    }
    PA(c)->cut = cut;
    return m;
}

static int
pa_setup(Core *core, int duel)
{
    PrefixAdmit *p = PyMem_Calloc(1, sizeof(PrefixAdmit));
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    core->pstate = p;
    for (int c = 0; c < CLASSES; c++) {
        p->births[c] = PRIOR_BIRTHS;
        p->uses[c] = PRIOR_USES;
        p->head[c] = p->tail[c] = -1;
    }
    p->evictions = PRIOR_BIRTHS;
    p->window = WINDOW * (double)core->n;
    p->ghead = p->gtail = p->gfree = -1;
    if (duel) {
        Py_ssize_t sample = DUEL_SAMPLE;
        while (sample > 1 && core->n / sample < DUEL_BLOCKS)
            sample /= 2;
        Py_ssize_t n = core->n / sample > 1 ? core->n / sample : 1;
        p->sample_below = ((uint64_t)1 << 32) / (uint64_t)sample;
        for (int side = 0; side < 2; side++)
            if ((p->minis[side] = mini_new(n, side)) == NULL)
                return -1; /* the core deallocs what was made */
    }
    return 0;
}

static int
pa_init(Core *core, PyObject *options)
{
    return pa_setup(core, 1);
}

static void
pa_dealloc(Core *core)
{
    PrefixAdmit *p = PA(core);
    if (p == NULL)
        return;
    mini_free(p->minis[0]);
    mini_free(p->minis[1]);
    PyMem_Free(p->sampled);
    PyMem_Free(p->sampled_hash);
    for (Py_ssize_t g = 0; g < p->gcap; g++)
        Py_XDECREF(p->ghosts[g].key);
    for (Py_ssize_t k = 0; k < p->nchosen; k++)
        Py_DECREF(p->chosen_keys[k]);
    PyMem_Free(p->chosen_keys);
    for (Py_ssize_t k = 0; k < p->nprobed; k++)
        Py_DECREF(p->probed[k]);
    PyMem_Free(p->probed);
    for (Py_ssize_t k = 0; k < p->nret; k++)
        Py_DECREF(p->ret_keys[k]);
    PyMem_Free(p->ret_keys);
    PyMem_Free(p->ret_hash);
    PyMem_Free(p->ret_cls);
    kt_free(&p->gmap);
    PyMem_Free(p->node);
    PyMem_Free(p->chosen);
    PyMem_Free(p->ghosts);
    PyMem_Free(p);
    core->pstate = NULL;
}

static int
pa_grow(Core *core, Py_ssize_t old_cap, Py_ssize_t new_cap)
{
    PrefixAdmit *p = PA(core);
    GROW(p->node, new_cap);
    return 0;
}

/* -- what is learned ------------------------------------------------------ */

static inline double
value(const PrefixAdmit *p, int c)
{
    return p->uses[c] / p->births[c];
}

static inline void
born(PrefixAdmit *p, int c)
{
    double births = p->births[c] + 1.0;
    if (births > p->window) {
        births *= 0.5;
        p->uses[c] *= 0.5;
    }
    p->births[c] = births;
}

static inline int
new_class(Py_ssize_t position, Py_ssize_t length, int extends)
{
    int bits = 0; /* length.bit_length() */
    for (Py_ssize_t v = length; v > 0; v >>= 1)
        bits++;
    int bucket = bits / 2 < 3 ? bits / 2 : 3; /* 1 | 2-7 | 8-31 | 32+ keys */
    return (position != length - 1) | (extends << 1) | (bucket << 2);
}

static inline int
promoted(int c)
{
    return c < NEW_CLASSES ? NEW_CLASSES : (c + 1 < CLASSES ? c + 1 : CLASSES - 1);
}

/* -- ghosts --------------------------------------------------------------- */

/* Room for one more ghost entry: grow the pool (doubling) when none is free. */
static int
ghost_reserve(PrefixAdmit *p)
{
    if (p->gfree >= 0)
        return 0;
    Py_ssize_t cap = p->gcap ? 2 * p->gcap : 64;
    GROW(p->ghosts, cap);
    for (Py_ssize_t g = cap - 1; g >= p->gcap; g--) {
        p->ghosts[g].key = NULL;
        p->ghosts[g].next = p->gfree;
        p->gfree = (int32_t)g;
    }
    p->gcap = cap;
    return 0;
}

static int
ghost_same(void *ctx, int32_t g, PyObject *key)
{
    return kt_same(((PrefixAdmit *)ctx)->ghosts[g].key, key);
}

/* The ghost entry of key, whose mixed hash is h: >= 0, -1 when none, -2
 * with an exception set. */
static int32_t
ghost_of(PrefixAdmit *p, PyObject *key, uint32_t h)
{
    return kt_find_mixed(&p->gmap, h, key, ghost_same, p);
}

/* kt_mix of key's Python hash into *h: 0, or -1 with an exception set. */
static inline int
mixed_hash(PyObject *key, uint32_t *h)
{
    Py_hash_t full = PyObject_Hash(key);
    if (full == -1 && PyErr_Occurred())
        return -1;
    *h = kt_mix(full);
    return 0;
}

static inline void
ghost_unlink(PrefixAdmit *p, int32_t g)
{
    Ghost *e = &p->ghosts[g];
    if (e->prev >= 0)
        p->ghosts[e->prev].next = e->next;
    else
        p->ghead = e->next;
    if (e->next >= 0)
        p->ghosts[e->next].prev = e->prev;
    else
        p->gtail = e->prev;
}

static inline void
ghost_push(PrefixAdmit *p, int32_t g)
{
    Ghost *e = &p->ghosts[g];
    e->prev = p->gtail;
    e->next = -1;
    if (p->gtail >= 0)
        p->ghosts[p->gtail].next = g;
    else
        p->ghead = g;
    p->gtail = g;
}

static void
ghost_drop(PrefixAdmit *p, int32_t g)
{
    Ghost *e = &p->ghosts[g];
    PyObject *key = e->key;
    kt_delete_mixed(&p->gmap, e->hash, g);
    ghost_unlink(p, g);
    p->glen--;
    e->key = NULL;
    e->next = p->gfree;
    p->gfree = g;
    Py_DECREF(key);
}

/* ghosts[key] = (tag, stored), key's mixed hash h, at the newest end (moved
 * there when key is a ghost already, which only a key restored can be while
 * held: maybe_ghost), then the oldest leave while they left before the
 * window (one capacity of stores) or there are more than GHOSTS capacities
 * of them. */
static int
ghost(Core *core, PrefixAdmit *p, PyObject *key, uint32_t h, int tag, int maybe_ghost)
{
    int32_t g = maybe_ghost ? ghost_of(p, key, h) : -1;
    if (g == -2)
        return -1;
    if (g >= 0) {
        ghost_unlink(p, g);
        ghost_push(p, g);
    }
    else {
        if (ghost_reserve(p) < 0)
            return -1;
        g = p->gfree;
        if (kt_insert_mixed(&p->gmap, h, g) < 0)
            return -1;
        p->gfree = p->ghosts[g].next;
        p->ghosts[g].key = Py_NewRef(key);
        p->ghosts[g].hash = h;
        ghost_push(p, g);
        p->glen++;
        p->gadds++;
    }
    p->ghosts[g].tag = (int8_t)tag;
    p->ghosts[g].since = p->stored;
    long long horizon = p->stored - GHOSTS * (long long)core->n;
    Py_ssize_t limit = GHOSTS * core->n;
    while (p->glen > limit || p->ghosts[p->ghead].since < horizon)
        ghost_drop(p, p->ghead);
    return 0;
}

/* A use of a key (mixed hash h) that is a ghost: the ghost is forgotten and,
 * when it left within the window, its class counts a use (an evicted one also
 * a regret) and *back is the class the use would have moved it to; an older
 * ghost: *back = -2 (seen; its class counts n / age of a use, no regret, while
 * age is within GHOSTS capacities); no ghost: *back = -1. */
static int
ghost_hit(Core *core, PrefixAdmit *p, PyObject *key, uint32_t h, int *back)
{
    *back = -1;
    int32_t g = ghost_of(p, key, h);
    if (g < 0)
        return g == -2 ? -1 : 0;
    int tag = p->ghosts[g].tag;
    long long since = p->ghosts[g].since;
    ghost_drop(p, g);
    long long age = p->stored - since;
    if (age > (long long)core->n) { /* left more than a turnover of the tier ago */
        if (age <= (long long)GHOSTS * (long long)core->n)
            p->uses[tag < 0 ? -1 - tag : tag] += (double)core->n / (double)age;
        *back = -2;
        return 0;
    }
    if (tag < 0)
        tag = -1 - tag;
    else
        p->regrets += 1.0;
    p->uses[tag] += 1.0;
    *back = promoted(tag);
    return 0;
}

static inline int
ret_back(const PrefixAdmit *p, Py_ssize_t k)
{
    return p->ret_cls[k] == RET_STALE ? -2 : p->ret_cls[k];
}

/* *back: the class the last touch found key's ghost (key's Python hash: full)
 * would move it to, -2 an older ghost, -1 none. 0, or -1 with an exception set. */
static int
returning_of(PrefixAdmit *p, PyObject *key, Py_hash_t full, int *back)
{
    *back = -1;
    for (Py_ssize_t k = 0; k < p->nret; k++) /* the same object, as in a handshake */
        if (p->ret_keys[k] == key) {
            *back = ret_back(p, k);
            return 0;
        }
    for (Py_ssize_t k = 0; k < p->nret; k++) { /* as a dict: equal hashes, then == */
        if (p->ret_hash[k] != full)
            continue;
        int same = kt_same(p->ret_keys[k], key);
        if (same < 0)
            return -1;
        if (same) {
            *back = ret_back(p, k);
            return 0;
        }
    }
    return 0;
}

/* -- the table entry ------------------------------------------------------- */

static void
forget_chosen(PrefixAdmit *p)
{
    for (Py_ssize_t k = 0; k < p->nchosen; k++)
        Py_DECREF(p->chosen_keys[k]);
    p->nchosen = 0;
}

/* Slot s enters class c's list (flags: RESTORED or 0). */
static inline void
put(PrefixAdmit *p, int32_t s, int c, int flags)
{
    Node *node = &p->node[s];
    node->cls = (uint8_t)(c | flags);
    node->prio = p->clock + value(p, c);
    node->prev = p->tail[c];
    node->next = -1;
    if (p->tail[c] >= 0)
        p->node[p->tail[c]].next = s;
    else {
        p->head[c] = s;
        p->head_prio[c] = node->prio;
    }
    p->tail[c] = s;
    p->len[c]++;
}

static inline void
unlink_slot(PrefixAdmit *p, int32_t s)
{
    int c = CLASS(p, s);
    Node *node = &p->node[s];
    if (node->next >= 0)
        p->node[node->next].prev = node->prev;
    else
        p->tail[c] = node->prev;
    if (node->prev >= 0)
        p->node[node->prev].next = node->next;
    else if ((p->head[c] = node->next) >= 0)
        p->head_prio[c] = p->node[node->next].prio;
    p->len[c]--;
}

/* The leading new keys worth storing: a new key whose class is worth less
 * than regret**2, or while the seen cut is on a key that is no ghost, is
 * declined, with every new key after it, only when storing them all would
 * evict. */
static int duel_call(PrefixAdmit *p, PyObject *const *keys, Py_ssize_t n);

static Py_ssize_t
pa_admit(Core *core, PyObject *const *call, Py_ssize_t ncall, PyObject *const *fresh,
         Py_ssize_t m)
{
    PrefixAdmit *p = PA(core);
    forget_chosen(p); /* only this call's admitted keys wait for insert_many */
    if (p->minis[0] != NULL && duel_call(p, call, ncall) < 0) /* the miniatures see it first */
        return -1;
    if (m > p->chosen_cap) {
        uint8_t *chosen = PyMem_Realloc(p->chosen, (size_t)m);
        if (chosen == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        p->chosen = chosen;
        PyObject **keys = PyMem_Realloc(p->chosen_keys, (size_t)m * sizeof(PyObject *));
        if (keys == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        p->chosen_keys = keys;
        p->chosen_cap = m;
    }
    int extends = 0;
    if (ncall > 0) {
        int32_t s = core_slot(core, call[0]);
        if (s == -2)
            return -1;
        extends = s >= 0;
    }
    int full = core->used + m > core->n;
    double regret = p->regrets / p->evictions, bar = regret * regret; /* as pow(regret, 2) */
    Py_ssize_t admitted = 0, j = 0;
    Py_ssize_t probe = 0, nprobe = p->probed_at == p->gadds ? p->nprobed : 0;
    int declined = 0;
    /* fresh are the call's keys not held, in order: the same objects */
    for (Py_ssize_t pos = 0; pos < ncall && j < m; pos++) {
        PyObject *key = call[pos];
        if (key != fresh[j])
            continue;
        int c = new_class(pos, ncall, extends), back = -1;
        Py_hash_t hash = PyObject_Hash(key); /* exact int or bytes: cannot fail */
        uint32_t h = kt_mix(hash);
        /* the last touch looked it up (and no ghost came since), or look now */
        while (probe < nprobe && p->probed[probe] != key)
            probe++;
        if (probe < nprobe)
            probe++;
        else if (ghost_hit(core, p, key, h, &back) < 0)
            return -1;
        if (back == -1 && p->nret > 0 && returning_of(p, key, hash, &back) < 0)
            return -1;
        /* a key back within the window re-enters as the reused block it would
         * have been, if that class is worth more (not a call's last key) */
        if (back >= 0 && pos != ncall - 1 && value(p, back) > value(p, c))
            c = back;
        /* a ghost (of any age) right behind a reused block, held or admitted by
         * this call, takes that block's class if it is worth more (not a call's
         * last key): the chain it continues is in use again */
        if (back != -1 && pos > 0 && pos != ncall - 1) {
            int above = -1;
            if (j > 0 && fresh[j - 1] == call[pos - 1]) { /* new in this call */
                if (!declined) /* so admitted: the last one chosen */
                    above = p->chosen[admitted - 1];
            }
            else {
                int32_t s = core_slot(core, call[pos - 1]);
                if (s == -2)
                    return -1;
                if (s >= 0)
                    above = CLASS(p, s);
            }
            if (above >= NEW_CLASSES && value(p, above) > value(p, c))
                c = above;
        }
        born(p, c);
        if (!declined && full && (value(p, c) < bar || (p->cut && back == -1)))
            declined = 1;
        if (declined) {
            if (ghost(core, p, key, h, -1 - c, 0) < 0) /* ghost_hit just forgot it */
                return -1;
        }
        else {
            p->chosen_keys[admitted] = Py_NewRef(key);
            p->chosen[admitted++] = (uint8_t)c;
            p->nchosen = admitted;
        }
        j++;
    }
    return admitted;
}

/* A key restored: the class admit chose for it if it is waiting (a call
 * that admitted it found no idle blocks), else class 0. */
static int
pa_insert(Core *core, PyObject *key, int32_t s)
{
    PrefixAdmit *p = PA(core);
    int c = 0;
    for (Py_ssize_t k = 0; k < p->nchosen; k++) {
        int same = kt_same(p->chosen_keys[k], key);
        if (same < 0)
            return -1;
        if (same) {
            c = p->chosen[k];
            Py_DECREF(p->chosen_keys[k]);
            p->nchosen--;
            memmove(&p->chosen_keys[k], &p->chosen_keys[k + 1],
                    (size_t)(p->nchosen - k) * sizeof(PyObject *));
            memmove(&p->chosen[k], &p->chosen[k + 1], (size_t)(p->nchosen - k));
            break;
        }
    }
    p->stored++;
    put(p, s, c, RESTORED);
    return 0;
}

/* One call's admitted keys (those admit just chose, in chain order): the
 * tail enters its class list first, so within a class a chain loses its
 * leaves before its head. */
static int
pa_insert_many(Core *core, PyObject *const *keys, const int32_t *slots, Py_ssize_t n)
{
    PrefixAdmit *p = PA(core);
    for (Py_ssize_t k = n - 1; k >= 0; k--)
        put(p, slots[k], p->chosen[k], 0);
    p->stored += n;
    forget_chosen(p);
    return 0;
}

static int
pa_remove(Core *core, PyObject *key, int32_t s)
{
    unlink_slot(PA(core), s);
    return 0;
}

static int pa_touch(Core *core, PyObject *const *keys, Py_ssize_t n);
static Py_ssize_t pa_evict(Core *core, Py_ssize_t n, uint32_t epoch, PyObject *const *call,
                           Py_ssize_t ncall, int32_t *out);

/* A bare manager's handshake for one request of k distinct keys on a
 * miniature: *hits gains its leading keys held; then touch, admit, evict and
 * insert_many of what is stored, ready at once (PrefixAdmitPolicy.request). */
static int
mini_request(Mini *m, PyObject *const *keys, Py_ssize_t k, double *hits)
{
    Core *c = &m->core;
    if (k > m->scratch_cap) {
        PyObject **fresh = PyMem_Realloc(m->fresh, (size_t)k * sizeof(PyObject *));
        if (fresh == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        m->fresh = fresh;
        int32_t *slots = PyMem_Realloc(m->slots, (size_t)k * sizeof(int32_t));
        if (slots == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        m->slots = slots;
        int32_t *out = PyMem_Realloc(m->out, (size_t)k * sizeof(int32_t));
        if (out == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        m->out = out;
        m->scratch_cap = k;
    }
    /* touch moves no key in or out: one look-up per key serves it all */
    Py_ssize_t lead = -1, nfresh = 0;
    for (Py_ssize_t i = 0; i < k; i++) {
        int32_t s = core_slot(c, keys[i]);
        if (s == -2)
            return -1;
        m->slots[i] = s;
        if (s < 0) {
            if (lead < 0)
                lead = i;
            m->fresh[nfresh++] = keys[i];
        }
    }
    *hits += (double)(lead < 0 ? k : lead);
    if (pa_touch(c, keys, k) < 0)
        return -1;
    if (nfresh == 0)
        return 0;
    Py_ssize_t admitted = pa_admit(c, keys, k, m->fresh, nfresh);
    if (admitted <= 0)
        return admitted < 0 ? -1 : 0;
    Py_ssize_t need = c->used + admitted - c->n;
    if (need > 0) {
        uint32_t epoch = ++c->epoch;
        for (Py_ssize_t i = 0; i < k; i++) /* the call's keys are protected */
            if (m->slots[i] >= 0)
                c->stamp[m->slots[i]] = epoch;
        Py_ssize_t got = pa_evict(c, need, epoch, keys, k, m->out);
        if (got <= 0)
            return got < 0 ? -1 : 0;
        for (Py_ssize_t v = 0; v < need; v++) {
            int32_t s = m->out[v];
            PyObject *key = c->keys[s];
            kt_delete(&c->map, key, s);
            c->keys[s] = NULL;
            Py_DECREF(key);
            c->used--;
            m->free_slots[m->nfree++] = s;
        }
    }
    for (Py_ssize_t j = 0; j < admitted; j++) {
        int32_t s = m->nfree > 0 ? m->free_slots[--m->nfree] : (int32_t)m->next_fresh++;
        if (kt_insert(&c->map, m->fresh[j], s) < 0)
            return -1;
        c->keys[s] = Py_NewRef(m->fresh[j]);
        c->ref[s] = 0;
        c->stamp[s] = 0;
        c->used++;
        m->slots[j] = s;
    }
    return pa_insert_many(c, m->fresh, m->slots, admitted);
}

/* Room for a touch of n keys to collect its sampled keys. */
static int
sampled_reserve(PrefixAdmit *p, Py_ssize_t n)
{
    if (n > p->sampled_cap) {
        PyObject **sampled = PyMem_Realloc(p->sampled, (size_t)n * sizeof(PyObject *));
        if (sampled == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        p->sampled = sampled;
        uint32_t *hashes = PyMem_Realloc(p->sampled_hash, (size_t)n * sizeof(uint32_t));
        if (hashes == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        p->sampled_hash = hashes;
        p->sampled_cap = n;
    }
    return 0;
}

/* The k sampled keys of a prepare_store (p->sampled, in call order) run through both
 * miniatures as a request (not when one is named twice), and the cut follows
 * the one with more leading hits, by more than one standard deviation
 * (gain**2 > the hits' sum). */
static int
duel(PrefixAdmit *p, Py_ssize_t k)
{
    if (k == 0)
        return 0;
    for (Py_ssize_t a = 0; a < k; a++)
        for (Py_ssize_t b = a + 1; b < k; b++) {
            if (p->sampled_hash[a] != p->sampled_hash[b])
                continue;
            int same = kt_same(p->sampled[a], p->sampled[b]);
            if (same < 0)
                return -1;
            if (same)
                return 0; /* a key named twice is no request */
        }
    for (int side = 0; side < 2; side++)
        if (mini_request(p->minis[side], p->sampled, k, &p->duel_hits[side]) < 0)
            return -1;
    p->duel_keys += (double)k;
    if (p->duel_keys > WINDOW * (double)p->minis[0]->core.n) {
        p->duel_keys *= 0.5;
        p->duel_hits[0] *= 0.5;
        p->duel_hits[1] *= 0.5;
    }
    double gain = p->duel_hits[1] - p->duel_hits[0];
    p->cut = gain > 0.0 && gain * gain > p->duel_hits[0] + p->duel_hits[1];
    return 0;
}

/* The duel on one prepare_store's keys: its sampled keys, in call order. */
static int
duel_call(PrefixAdmit *p, PyObject *const *keys, Py_ssize_t n)
{
    if (sampled_reserve(p, n) < 0)
        return -1;
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_hash_t full = PyObject_Hash(keys[i]); /* checked usable: cannot fail */
        if (full == -1 && PyErr_Occurred())
            return -1;
        uint32_t h = kt_mix(full);
        if ((uint64_t)h < p->sample_below) {
            p->sampled[k] = keys[i];
            p->sampled_hash[k++] = h;
        }
    }
    return duel(p, k);
}

static int
pa_touch(Core *core, PyObject *const *keys, Py_ssize_t n)
{
    PrefixAdmit *p = PA(core);
    for (Py_ssize_t k = 0; k < p->nprobed; k++)
        Py_DECREF(p->probed[k]);
    p->nprobed = 0;
    int kept = 1; /* the last returning keys, until this call finds its own */
    if (n > p->probed_cap) {
        PyObject **probed = PyMem_Realloc(p->probed, (size_t)n * sizeof(PyObject *));
        if (probed == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        p->probed = probed;
        p->probed_cap = n;
    }
    if (n > p->ret_cap) {
        PyObject **keys = PyMem_Realloc(p->ret_keys, (size_t)n * sizeof(PyObject *));
        if (keys == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        p->ret_keys = keys;
        Py_hash_t *hashes = PyMem_Realloc(p->ret_hash, (size_t)n * sizeof(Py_hash_t));
        if (hashes == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        p->ret_hash = hashes;
        uint8_t *cls = PyMem_Realloc(p->ret_cls, (size_t)n);
        if (cls == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        p->ret_cls = cls;
        p->ret_cap = n;
    }
    for (Py_ssize_t k = n - 1; k >= 0; k--) {
        Py_hash_t full = PyObject_Hash(keys[k]);
        if (full == -1 && PyErr_Occurred())
            return -1;
        uint32_t h = kt_mix(full);
        int32_t s = core_slot_mixed(core, keys[k], h);
        if (s == -2)
            return -1;
        if (s < 0) {
            int back = -1;
            if (p->glen > 0 && ghost_hit(core, p, keys[k], h, &back) < 0)
                return -1;
            if (back != -1) {
                if (kept) { /* this call's keys replace the last ones */
                    for (Py_ssize_t r = 0; r < p->nret; r++)
                        Py_DECREF(p->ret_keys[r]);
                    p->nret = 0;
                    kept = 0;
                }
                p->ret_keys[p->nret] = Py_NewRef(keys[k]);
                p->ret_hash[p->nret] = full;
                p->ret_cls[p->nret++] = back >= 0 ? (uint8_t)back : RET_STALE;
            }
            p->probed[p->nprobed++] = Py_NewRef(keys[k]); /* not a ghost now */
            continue;
        }
        if (core->ref[s] < 0)
            continue; /* just stored, not yet written: not a use */
        int c = CLASS(p, s), flags = p->node[s].cls & RESTORED;
        unlink_slot(p, s);
        p->uses[c] += 1.0;
        c = promoted(c);
        born(p, c);
        put(p, s, c, flags);
    }
    for (Py_ssize_t a = 0, b = p->nprobed - 1; a < b; a++, b--) { /* into call order */
        PyObject *t = p->probed[a];
        p->probed[a] = p->probed[b];
        p->probed[b] = t;
    }
    p->probed_at = p->gadds;
    return 0;
}

/* The first evictable slot of a class list from s on, or -1. */
static inline int32_t
next_evictable(Core *core, PrefixAdmit *p, int32_t s, uint32_t epoch)
{
    while (s >= 0 && !core_evictable(core, s, epoch))
        s = p->node[s].next;
    return s;
}

/* Slot s is a class's candidate: fetch what deciding on the one after it
 * reads (a hint only). */
static inline void
fetch_after(Core *core, PrefixAdmit *p, int32_t s)
{
    int32_t t = p->node[s].next;
    if (t >= 0) {
        __builtin_prefetch(&p->node[t]);
        __builtin_prefetch(&core->ref[t]);
        __builtin_prefetch(&core->stamp[t]);
    }
}

/* The class lists merged by H, lowest first (on equal H the lower class),
 * each list in its own order, as heapq.merge of the lists does. */
static Py_ssize_t
pa_evict(Core *core, Py_ssize_t n, uint32_t epoch, PyObject *const *call, Py_ssize_t ncall,
         int32_t *out)
{
    PrefixAdmit *p = PA(core);
    int32_t *cursor = p->cursor;
    double *cursor_prio = p->cursor_prio;
    int *active = p->active, nactive = 0; /* classes with a candidate, ascending */
    /* Each class's candidate is its first evictable block (the lists are in
     * arrival order, not in H order, so none can be passed over unseen). */
    for (int c = 0; c < CLASSES; c++) {
        int32_t s = p->head[c];
        if (s < 0)
            continue;
        if (core_evictable(core, s, epoch))
            cursor_prio[c] = p->head_prio[c];
        else if ((s = next_evictable(core, p, p->node[s].next, epoch)) >= 0)
            cursor_prio[c] = p->node[s].prio;
        else
            continue;
        cursor[c] = s;
        fetch_after(core, p, s);
        active[nactive++] = c;
    }
    for (Py_ssize_t found = 0; found < n; found++) {
        if (nactive == 0)
            return 0; /* nothing changed yet */
        int at = 0;
        for (int a = 1; a < nactive; a++)
            if (cursor_prio[active[a]] < cursor_prio[active[at]])
                at = a;
        int best = active[at];
        int32_t s = cursor[best];
        out[found] = s;
        if ((s = next_evictable(core, p, p->node[s].next, epoch)) >= 0) {
            cursor[best] = s;
            cursor_prio[best] = p->node[s].prio;
            fetch_after(core, p, s);
        }
        else {
            for (int a = at + 1; a < nactive; a++)
                active[a - 1] = active[a];
            nactive--;
        }
    }
    enum { AHEAD = 4 };
    for (Py_ssize_t k = 0; k < n; k++) {
        int32_t s = out[k];
        if (k + AHEAD < n && core->keys != NULL) /* the victim's key, a few ahead */
            __builtin_prefetch(core->keys[out[k + AHEAD]], 1);
        unlink_slot(p, s);
        if (p->node[s].prio > p->clock)
            p->clock = p->node[s].prio;
        /* the key is read in place when the core holds its object */
        PyObject *key = core->keys != NULL ? Py_NewRef(core->keys[s]) : core_key(core, s);
        uint32_t h;
        int rc = key == NULL || mixed_hash(key, &h) < 0
                     ? -1
                     : ghost(core, p, key, h, CLASS(p, s), p->node[s].cls & RESTORED);
        Py_XDECREF(key);
        if (rc < 0)
            return -1;
    }
    p->evictions += (double)n;
    if (p->evictions > p->window) {
        p->evictions *= 0.5;
        p->regrets *= 0.5;
    }
    return n;
}

static PyObject *
pa_keys(Core *core)
{
    PrefixAdmit *p = PA(core);
    PyObject *out = PyList_New(core->used);
    Py_ssize_t k = 0;
    for (int c = 0; c < CLASSES && out != NULL; c++)
        for (int32_t s = p->head[c]; out != NULL && s >= 0 && k < core->used; s = p->node[s].next) {
            PyObject *key = core_key(core, s);
            if (key == NULL)
                Py_CLEAR(out);
            else
                PyList_SET_ITEM(out, k++, key);
        }
    return out;
}

/* A tuple of the doubles xs[0..n). */
static PyObject *
floats(const double *xs, int n)
{
    PyObject *out = PyTuple_New(n);
    for (int i = 0; i < n && out != NULL; i++) {
        PyObject *x = PyFloat_FromDouble(xs[i]);
        if (x == NULL)
            Py_CLEAR(out);
        else
            PyTuple_SET_ITEM(out, i, x);
    }
    return out;
}

/* ((key, H) per slot) of class c's list, oldest first. */
static PyObject *
class_state(Core *core, PrefixAdmit *p, int c)
{
    PyObject *out = PyTuple_New(p->len[c]);
    Py_ssize_t k = 0;
    for (int32_t s = p->head[c]; out != NULL && s >= 0; s = p->node[s].next) {
        PyObject *key = core_key(core, s);
        PyObject *pair = key ? Py_BuildValue("(Nd)", key, p->node[s].prio) : NULL;
        if (pair == NULL)
            Py_CLEAR(out);
        else
            PyTuple_SET_ITEM(out, k++, pair);
    }
    return out;
}

/* ((key, tag, stored then) per ghost), oldest first. */
static PyObject *
ghost_state(PrefixAdmit *p)
{
    PyObject *out = PyTuple_New(p->glen);
    Py_ssize_t k = 0;
    for (int32_t g = p->ghead; out != NULL && g >= 0; g = p->ghosts[g].next) {
        Ghost *e = &p->ghosts[g];
        PyObject *entry = Py_BuildValue("(OiL)", e->key, (int)e->tag, e->since);
        if (entry == NULL)
            Py_CLEAR(out);
        else
            PyTuple_SET_ITEM(out, k++, entry);
    }
    return out;
}

/* {key: class} of n keys and their classes (RET_STALE: -1). */
static PyObject *
class_map(PyObject **keys, const uint8_t *cls, Py_ssize_t n)
{
    PyObject *out = PyDict_New();
    for (Py_ssize_t k = 0; out != NULL && k < n; k++) {
        PyObject *c = PyLong_FromLong(cls[k] == RET_STALE ? -1 : cls[k]);
        if (c == NULL || PyDict_SetItem(out, keys[k], c) < 0)
            Py_CLEAR(out);
        Py_XDECREF(c);
    }
    return out;
}

/* ("prefix_admit", clock, stored, evictions, regrets, births, uses,
 *  ((key, H) per class list, oldest first), ((key, tag, stored then) per
 *  ghost, oldest first), {key: class} chosen, {key: class} returning), as
 *  order_state() */
static PyObject *
pa_state(Core *core)
{
    PrefixAdmit *p = PA(core);
    PyObject *lists = PyTuple_New(CLASSES);
    for (int c = 0; c < CLASSES && lists != NULL; c++) {
        PyObject *part = class_state(core, p, c);
        if (part == NULL)
            Py_CLEAR(lists);
        else
            PyTuple_SET_ITEM(lists, c, part);
    }
    if (lists == NULL)
        return NULL;
    PyObject *duel_state = Py_NewRef(Py_None);
    if (p->minis[0] != NULL) {
        Py_DECREF(duel_state);
        duel_state = Py_BuildValue("(dddNN)", p->duel_hits[0], p->duel_hits[1], p->duel_keys,
                                   pa_state(&p->minis[0]->core), pa_state(&p->minis[1]->core));
        if (duel_state == NULL) {
            Py_DECREF(lists);
            return NULL;
        }
    }
    return Py_BuildValue("(sdLddNNNNNNON)", "prefix_admit", p->clock, p->stored, p->evictions,
                         p->regrets, floats(p->births, CLASSES), floats(p->uses, CLASSES), lists,
                         ghost_state(p),
                         /* admitted, not inserted yet; found returning by the last touch */
                         class_map(p->chosen_keys, p->chosen, p->nchosen),
                         class_map(p->ret_keys, p->ret_cls, p->nret),
                         p->cut ? Py_True : Py_False, duel_state);
}

const PolicyOps prefix_admit_ops = {
    .name = "prefix_admit",
    .init = pa_init,
    .dealloc = pa_dealloc,
    .grow = pa_grow,
    .insert = pa_insert,
    .insert_many = pa_insert_many,
    .remove = pa_remove,
    .touch = pa_touch,
    .evict = pa_evict,
    .keys = pa_keys,
    .state = pa_state,
    .admit = pa_admit,
};
