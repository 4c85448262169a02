/* kvactors._nvme_index: the NVMe index's live table in compact native arrays.
 *
 * One 48-byte record per slot (sequence number, block CRC-32, key kind and
 * length, a hash tag, the key inline when it has at most 32 bytes, else a
 * pointer to its own copy) and an open-addressing hash of keys to slots
 * (u32 per bucket: the slot and spare bits of the key's hash; linear probing
 * with backward-shift deletion, at most 3/4 full). No Python object per block: keys become Python objects only when
 * asked for (get, entries).
 *
 * Records on disk (snapshot and log, see kvactors/media/nvme_index.py) are
 * parsed and applied here straight from the file's bytes:
 *   u32 crc32(rest) | u8 op | u8 kind | u16 klen | u32 slot | u32 crc | u64 seq | key | pad to 8
 * An update older (by sequence number) than what the table holds for its
 * slot or key is ignored, so replay order across a snapshot does not matter.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

#include "index_api.h"

#define INLINE 32
#define HEAD 24
#define OP_PUT 1
#define OP_DEL 2
#define KIND_INT 0
#define KIND_BYTES 1
#define KIND_BIGINT 2

/* Two CRC-32 functions, both reflected and sliced by 8 (for 56-byte records
 * several times faster than calling zlib per record):
 * - CRC-32 (zlib's polynomial, so Python checks log records with zlib.crc32);
 * - CRC-32C (Castagnoli) of the snapshot's chunks: the SSE4.2 instruction where
 *   the CPU has it (several GB/s), else the same table code. */
typedef uint32_t CrcTable[8][256];
static CrcTable crc_table, crc32c_table;
static int crc32c_hw_ok;

static void
crc_table_init(CrcTable t, uint32_t poly)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? poly ^ (c >> 1) : c >> 1;
        t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int j = 1; j < 8; j++)
            t[j][i] = (t[j - 1][i] >> 8) ^ t[0][t[j - 1][i] & 0xff];
}

static uint32_t
crc_sliced(const uint32_t (*t)[256], const uint8_t *p, size_t n)
{
    uint32_t c = 0xffffffffu;
    while (n >= 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + 4, 4);
        lo ^= c;
        c = t[7][lo & 0xff] ^ t[6][(lo >> 8) & 0xff] ^ t[5][(lo >> 16) & 0xff] ^ t[4][lo >> 24] ^
            t[3][hi & 0xff] ^ t[2][(hi >> 8) & 0xff] ^ t[1][(hi >> 16) & 0xff] ^ t[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--)
        c = t[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return c ^ 0xffffffffu;
}

static void
crc_init(void)
{
    crc_table_init(crc_table, 0xedb88320u);
}

static uint32_t
crc32_of(const uint8_t *p, size_t n)
{
    return crc_sliced((const uint32_t (*)[256])crc_table, p, n);
}

static void
crc32c_init(void)
{
    crc_table_init(crc32c_table, 0x82f63b78u);
#if defined(__x86_64__)
    __builtin_cpu_init();
    crc32c_hw_ok = __builtin_cpu_supports("sse4.2");
#endif
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t
crc32c_hw(const uint8_t *p, size_t n)
{
    uint64_t c = 0xffffffffu;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--)
        c32 = _mm_crc32_u8(c32, *p++);
    return c32 ^ 0xffffffffu;
}
#endif

static uint32_t
crc32c_of(const uint8_t *p, size_t n)
{
#if defined(__x86_64__)
    if (crc32c_hw_ok)
        return crc32c_hw(p, n);
#endif
    return crc_sliced((const uint32_t (*)[256])crc32c_table, p, n);
}

/* A snapshot is the table's own two arrays, written as they sit in memory in
 * checksummed chunks. It is taken at one instant (the log rotation) without
 * stopping stores: from snap_begin on, a chunk is written out (and its CRC
 * kept) before the first update that would change it, and a background
 * thread writes the chunks nobody touched; each chunk is saved once.
 *
 * The background thread copies chunks with neither the index lock nor the GIL
 * (snap_copy), so no store ever waits for it. A chunk's state byte says who
 * saves it: UNSAVED, COPYING (the background thread is copying it), SAVED.
 * Updates run one at a time (the index lock) and are the only writers of the
 * arrays, so a chunk not yet SAVED still holds its bytes as of snap_begin:
 * - an update about to change chunk c swaps its state to SAVED; unless it was
 *   SAVED already, the update copies the chunk itself, then changes it;
 * - the background thread takes an UNSAVED chunk (compare-and-swap to COPYING),
 *   copies it and then swaps COPYING -> SAVED; if an update took the chunk in
 *   the meantime (the swap fails), the copy (possibly of bytes being changed)
 *   is dropped. A successful swap is ordered before the update's check (release
 *   / acquire), so the copy was complete before any byte of the chunk changed.
 * Exactly one of the two keeps a copy and sets the chunk's CRC. Record chunks
 * holding a key kept out of line (whose memory an update may free) are given
 * back UNSAVED and saved under the index lock (snap_step). */
#define REC_CHUNK 128u  /* slots per chunk of the record array (6 KiB) */
#define HT_CHUNK 1024u  /* buckets per chunk of the hash array (4 KiB): small chunks keep
                         * what one store copies while a snapshot is taken small */
#define UNSAVED 0
#define COPYING 1
#define SAVED 2

typedef struct {
    int active;
    int fd;
    int err; /* errno of a failed write or allocation: the snapshot is abandoned */
    uint64_t recs_off, ht_off;
    uint32_t n_rc, n_hc, next, cnext;
    uint8_t *saved; /* per chunk: UNSAVED, COPYING or SAVED (atomic) */
    int cerr;       /* errno of a failed write by the background copy */
    uint32_t *crcs;
    uint64_t live, max_seq;
    uint8_t *lk; /* keys stored out of line: (u32 slot, u16 len, u16 0, key, pad to 8) */
    size_t lk_len, lk_cap;
    uint64_t lk_count;
    /* Chunks copied but not yet written: entries (u64 offset, u64 length, bytes).
     * The background thread writes one buffer out with neither the GIL nor the
     * index lock held while updates copy chunks into the other, so no update
     * waits for the disk (or the kernel's write-back throttling); a full buffer
     * is written in place. stage_mu guards cur and the current buffer's length
     * (an update appends, the background thread swaps). */
    uint8_t *stage[2];
    size_t stage_len[2];
    int cur, flushing;
    uint8_t *cbuf; /* the background copy's own buffer: COPY_BYTES */
    uint64_t by_updates, by_copy; /* chunks saved by updates, by the background copy */
    uint64_t taken; /* chunks an update took while the background copy was copying them */
} snap_t;

#define STAGE_BYTES (8u << 20)
#define COPY_BYTES (4u << 20)

typedef struct {
    uint64_t seq; /* 0: empty slot */
    uint32_t crc;
    uint16_t klen;
    uint8_t kind;
    uint8_t tag;
    union {
        uint8_t in[INLINE];
        uint8_t *out;
    } key;
} rec_t;

typedef struct {
    PyObject_HEAD
    uint32_t num_blocks;
    rec_t *recs;
    uint32_t *ht; /* slot + 1, 0 empty */
    uint64_t mask;
    unsigned slot_bits; /* bits of a bucket holding slot + 1 */
    size_t recs_bytes, ht_bytes;
    Py_ssize_t live;
    uint64_t max_seq;
    size_t out_bytes; /* keys stored out of line */
    void *listener;   /* the manager sharing this table's keys, or NULL */
    kv_on_change on_change;
    uint64_t seed; /* of the key hash: the bucket array's layout depends on it */
    uint32_t dist_cap; /* the largest distance a bucket records (saturated above) */
    snap_t snap;
    uint64_t last_by_updates, last_by_copy, last_taken; /* the last snapshot's snap_counts */
    pthread_mutex_t stage_mu;
    int mu_ready;
} Table;

static void snap_save(Table *t, uint32_t c);

/* Called before recs[s] or ht[i] changes while a snapshot is being taken. */
static inline int
chunk_saved(const snap_t *sn, uint32_t c)
{
    return __atomic_load_n(&sn->saved[c], __ATOMIC_ACQUIRE) == SAVED;
}

static inline void
cow_rec(Table *t, uint64_t s)
{
    if (t->snap.active && !chunk_saved(&t->snap, (uint32_t)(s / REC_CHUNK)))
        snap_save(t, (uint32_t)(s / REC_CHUNK));
}

static inline void
cow_ht(Table *t, uint64_t i)
{
    if (t->snap.active && !chunk_saved(&t->snap, t->snap.n_rc + (uint32_t)(i / HT_CHUNK)))
        snap_save(t, t->snap.n_rc + (uint32_t)(i / HT_CHUNK));
}

/* Slot s's record is about to change: the listener copies a key it shares. */
static int
notify(Table *t, uint32_t s)
{
    return t->listener != NULL && t->recs[s].seq ? t->on_change(t->listener, s) : 0;
}

static uint64_t
mix(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

static uint64_t
key_hash(const Table *t, uint8_t kind, const uint8_t *data, size_t len)
{
    uint64_t h = mix(((uint64_t)kind << 32) ^ len ^ 0x9e3779b97f4a7c15ULL ^ t->seed);
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, data + i, 8);
        h = mix(h ^ w) + 0x9e3779b97f4a7c15ULL;
    }
    if (i < len) {
        uint64_t w = 0;
        memcpy(&w, data + i, len - i);
        h = mix(h ^ w ^ ((uint64_t)(len - i) << 56));
    }
    return h;
}

static const uint8_t *
rec_key(const rec_t *r)
{
    return r->klen > INLINE ? r->key.out : r->key.in;
}

static int
rec_is(const rec_t *r, uint8_t kind, const uint8_t *data, size_t len, uint8_t tag)
{
    return r->tag == tag && r->kind == kind && r->klen == len && memcmp(rec_key(r), data, len) == 0;
}

/* A bucket holds slot + 1 in its low slot_bits and, above them (as many bits
 * as are left), its distance from the key's home bucket, saturated at the
 * largest value the bits hold. A probe reads the record behind a bucket only
 * where that distance is the probe's own (the same home), and a deletion's
 * backward shift knows each follower's home without reading its record (so
 * without a random memory access per follower): only a saturated distance
 * sends it to the record. */
static uint32_t
dist_max(const Table *t)
{
    return t->slot_bits >= 32 ? 0 : t->dist_cap;
}

static uint32_t
bucket_dist(const Table *t, uint32_t v)
{
    return t->slot_bits >= 32 ? 0 : v >> t->slot_bits;
}

static uint32_t
bucket_slot(const Table *t, uint32_t v)
{
    return (t->slot_bits >= 32 ? v : v & ((1u << t->slot_bits) - 1)) - 1;
}

static uint32_t
bucket_of(const Table *t, uint64_t dist, uint32_t slot)
{
    if (t->slot_bits >= 32)
        return slot + 1;
    uint64_t cap = dist_max(t);
    return ((uint32_t)(dist < cap ? dist : cap) << t->slot_bits) | (slot + 1);
}

/* The bucket holding the key, or the empty bucket where it would go. */
static uint64_t
probe(Table *t, uint8_t kind, const uint8_t *data, size_t len, uint64_t h, int *found)
{
    uint8_t tag = (uint8_t)(h >> 56);
    uint32_t dmax = dist_max(t);
    uint64_t i = h & t->mask;
    for (uint64_t dist = 0;; dist++) {
        uint32_t v = t->ht[i];
        if (v == 0) {
            *found = 0;
            return i;
        }
        uint32_t d = bucket_dist(t, v);
        if ((d == dist || (d == dmax && dist >= dmax)) &&
            rec_is(&t->recs[bucket_slot(t, v)], kind, data, len, tag)) {
            *found = 1;
            return i;
        }
        i = (i + 1) & t->mask;
    }
}

static int64_t
find_slot(Table *t, uint8_t kind, const uint8_t *data, size_t len)
{
    int found;
    uint64_t i = probe(t, kind, data, len, key_hash(t, kind, data, len), &found);
    return found ? (int64_t)bucket_slot(t, t->ht[i]) : -1;
}

/* Remove slot s's record (live) from the hash and the array. */
static void
remove_slot(Table *t, uint32_t s)
{
    rec_t *r = &t->recs[s];
    uint32_t dmax = dist_max(t);
    /* Its bucket: the one from its key's home on that holds slot s. */
    uint64_t i = key_hash(t, r->kind, rec_key(r), r->klen) & t->mask;
    int found = 0;
    for (;;) {
        uint32_t v = t->ht[i];
        if (v == 0)
            break;
        if (bucket_slot(t, v) == s) {
            found = 1;
            break;
        }
        i = (i + 1) & t->mask;
    }
    if (found) {
        /* Backward-shift deletion keeps every probe chain unbroken: a follower at
         * distance d from its home moves back to the hole at i when d >= j - i. */
        uint64_t j = i;
        for (;;) {
            j = (j + 1) & t->mask;
            uint32_t v = t->ht[j];
            if (v == 0)
                break;
            uint64_t d = bucket_dist(t, v);
            if (d >= dmax) {
                rec_t *o = &t->recs[bucket_slot(t, v)];
                d = (j - key_hash(t, o->kind, rec_key(o), o->klen)) & t->mask;
            }
            uint64_t gap = (j - i) & t->mask;
            if (d >= gap) {
                cow_ht(t, i);
                t->ht[i] = bucket_of(t, d - gap, bucket_slot(t, v));
                i = j;
            }
        }
        cow_ht(t, i);
        t->ht[i] = 0;
    }
    cow_rec(t, s);
    if (r->klen > INLINE) {
        t->out_bytes -= r->klen;
        PyMem_RawFree(r->key.out);
    }
    memset(r, 0, sizeof(*r));
    t->live--;
}

static int
put_hashed(Table *t, uint8_t kind, const uint8_t *data, size_t len, uint64_t slot, uint32_t crc,
           uint64_t seq, uint64_t h)
{
    if (seq > t->max_seq)
        t->max_seq = seq;
    if (slot >= t->num_blocks)
        return 0;
    int found;
    uint64_t bucket = probe(t, kind, data, len, h, &found);
    int64_t old = found ? (int64_t)bucket_slot(t, t->ht[bucket]) : -1;
    if (old >= 0 && t->recs[old].seq >= seq)
        return 0; /* the key was written again later (or this very record again) */
    rec_t *r = &t->recs[slot];
    if (r->seq && r->seq >= seq)
        return 0; /* the slot was reused later */
    if (old >= 0 || r->seq) {
        if ((old >= 0 && notify(t, (uint32_t)old) < 0) || notify(t, (uint32_t)slot) < 0)
            return -1;
        if (old >= 0)
            remove_slot(t, (uint32_t)old);
        if (r->seq)
            remove_slot(t, (uint32_t)slot); /* its earlier key is gone */
        bucket = probe(t, kind, data, len, h, &found); /* buckets moved */
    }
    uint8_t *copy = NULL;
    if (len > INLINE) {
        copy = PyMem_RawMalloc(len);
        if (copy == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(copy, data, len);
        t->out_bytes += len;
    }
    cow_rec(t, slot);
    cow_ht(t, bucket);
    r->seq = seq;
    r->crc = crc;
    r->klen = (uint16_t)len;
    r->kind = kind;
    r->tag = (uint8_t)(h >> 56);
    if (copy)
        r->key.out = copy;
    else
        memcpy(r->key.in, data, len);
    t->ht[bucket] = bucket_of(t, (bucket - h) & t->mask, (uint32_t)slot);
    t->live++;
    return 0;
}

static int
do_put(Table *t, uint8_t kind, const uint8_t *data, size_t len, uint64_t slot, uint32_t crc,
       uint64_t seq)
{
    return put_hashed(t, kind, data, len, slot, crc, seq, key_hash(t, kind, data, len));
}

static int
do_delete(Table *t, uint8_t kind, const uint8_t *data, size_t len, uint64_t seq)
{
    if (seq > t->max_seq)
        t->max_seq = seq;
    int64_t s = find_slot(t, kind, data, len);
    if (s < 0 || t->recs[s].seq > seq)
        return 0;
    if (notify(t, (uint32_t)s) < 0)
        return -1;
    remove_slot(t, (uint32_t)s);
    return 1;
}

/* -- keys between Python and records ---------------------------------------------- */

typedef struct {
    uint8_t kind;
    const uint8_t *data;
    size_t len;
    uint8_t small[8];
    PyObject *hold; /* a bytes object to release, or NULL */
} key_t_;

/* The longest key a record holds (its length is a u16), as index_format.MAX_KEY_BYTES. */
#define MAX_KEY_BYTES 65535

/* key_in's ValueError for a key longer than MAX_KEY_BYTES, index_format.encode's words. */
static int
key_too_long(void)
{
    PyErr_SetString(PyExc_ValueError, "keys of the NVMe index are at most 65535 bytes");
    return -2;
}

/* The record form of key ``o``: 0; -1 with an exception set (TypeError: not bytes
 * or int); -2 with ValueError set: longer than MAX_KEY_BYTES (a bytes key's
 * length, an int's signed little-endian bytes), which no record holds. */
static int
key_in(PyObject *o, key_t_ *k)
{
    k->hold = NULL;
    if (PyBytes_Check(o)) {
        k->kind = KIND_BYTES;
        k->data = (const uint8_t *)PyBytes_AS_STRING(o);
        k->len = (size_t)PyBytes_GET_SIZE(o);
        if (k->len > MAX_KEY_BYTES)
            return key_too_long();
        return 0;
    }
    if (!PyLong_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "a key is bytes or int");
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (!overflow) {
        uint64_t u = (uint64_t)v;
        for (int i = 0; i < 8; i++)
            k->small[i] = (uint8_t)(u >> (8 * i));
        k->kind = KIND_INT;
        k->data = k->small;
        k->len = 8;
        return 0;
    }
    PyObject *bits = PyObject_CallMethod(o, "bit_length", NULL);
    if (bits == NULL)
        return -1;
    long long nbits = PyLong_AsLongLong(bits);
    Py_DECREF(bits);
    if (nbits < 0 && PyErr_Occurred())
        return -1;
    if ((nbits + 8) / 8 > MAX_KEY_BYTES) /* bit_length >= 8 * MAX_KEY_BYTES */
        return key_too_long();
    /* signed=True is keyword-only: call through the method object. */
    PyObject *meth = PyObject_GetAttrString(o, "to_bytes");
    if (meth == NULL)
        return -1;
    PyObject *args = Py_BuildValue("(Ls)", (nbits + 8) / 8, "little");
    PyObject *kw = Py_BuildValue("{s:O}", "signed", Py_True);
    PyObject *raw = args && kw ? PyObject_Call(meth, args, kw) : NULL;
    Py_XDECREF(args);
    Py_XDECREF(kw);
    Py_DECREF(meth);
    if (raw == NULL)
        return -1;
    k->hold = raw;
    k->kind = KIND_BIGINT;
    k->data = (const uint8_t *)PyBytes_AS_STRING(raw);
    k->len = (size_t)PyBytes_GET_SIZE(raw);
    return 0;
}

static PyObject *
key_out(uint8_t kind, const uint8_t *data, size_t len)
{
    if (kind == KIND_BYTES)
        return PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)len);
    if (kind == KIND_INT && len == 8) {
        uint64_t u = 0;
        for (int i = 0; i < 8; i++)
            u |= (uint64_t)data[i] << (8 * i);
        return PyLong_FromLongLong((long long)u);
    }
    PyObject *raw = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)len);
    if (raw == NULL)
        return NULL;
    PyObject *meth = PyObject_GetAttrString((PyObject *)&PyLong_Type, "from_bytes");
    PyObject *args = meth ? Py_BuildValue("(Os)", raw, "little") : NULL;
    PyObject *kw = args ? Py_BuildValue("{s:O}", "signed", Py_True) : NULL;
    PyObject *out = kw ? PyObject_Call(meth, args, kw) : NULL;
    Py_XDECREF(kw);
    Py_XDECREF(args);
    Py_XDECREF(meth);
    Py_DECREF(raw);
    return out;
}

/* -- the type ------------------------------------------------------------------------ */

static void *
zeroed(size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
#ifdef MADV_HUGEPAGE
    if (bytes >= (2u << 20))
        madvise(p, bytes, MADV_HUGEPAGE);
#endif
    return p;
}

static int
Table_init(Table *self, PyObject *args, PyObject *kwds)
{
    unsigned long long n, seed = 0;
    unsigned int dist_cap = 0;
    if (!PyArg_ParseTuple(args, "K|KI", &n, &seed, &dist_cap))
        return -1;
    if (n == 0 || n >= (1ULL << 32) - 1) {
        PyErr_SetString(PyExc_ValueError, "num_blocks must be in 1 .. 2**32 - 2");
        return -1;
    }
    if (self->recs != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Table is initialised once");
        return -1;
    }
    uint64_t cap = 16;
    while (cap < n + n / 3 + 1)
        cap <<= 1;
    /* Anonymous maps: pages of untouched slots and buckets cost no memory until
     * used, and huge pages (where the kernel gives them) cut the page faults of
     * filling a large table by 512. */
    self->recs_bytes = (size_t)n * sizeof(rec_t);
    self->ht_bytes = (size_t)cap * sizeof(uint32_t);
    self->recs = zeroed(self->recs_bytes);
    self->ht = zeroed(self->ht_bytes);
    if (self->recs == NULL || self->ht == NULL) {
        if (self->recs)
            munmap(self->recs, self->recs_bytes);
        if (self->ht)
            munmap(self->ht, self->ht_bytes);
        self->recs = NULL;
        self->ht = NULL;
        PyErr_NoMemory();
        return -1;
    }
    if (pthread_mutex_init(&self->stage_mu, NULL) != 0) {
        munmap(self->recs, self->recs_bytes);
        munmap(self->ht, self->ht_bytes);
        self->recs = NULL;
        self->ht = NULL;
        PyErr_NoMemory();
        return -1;
    }
    self->mu_ready = 1;
    self->num_blocks = (uint32_t)n;
    self->seed = seed;
    self->mask = cap - 1;
    self->slot_bits = 1;
    while (self->slot_bits < 32 && (1ULL << self->slot_bits) <= n)
        self->slot_bits++;
    /* dist_cap (tests: 1 sends nearly every deletion to the records) below what the
     * bucket's spare bits hold. */
    uint32_t natural = self->slot_bits >= 32 ? 0 : (uint32_t)((1ULL << (32 - self->slot_bits)) - 1);
    self->dist_cap = dist_cap && dist_cap < natural ? dist_cap : natural;
    return 0;
}

static void snap_release(snap_t *sn);

static void
Table_dealloc(Table *self)
{
    snap_release(&self->snap);
    if (self->recs != NULL && self->out_bytes) {
        for (uint32_t s = 0; s < self->num_blocks; s++)
            if (self->recs[s].seq && self->recs[s].klen > INLINE)
                PyMem_RawFree(self->recs[s].key.out);
    }
    if (self->recs)
        munmap(self->recs, self->recs_bytes);
    if (self->ht)
        munmap(self->ht, self->ht_bytes);
    if (self->mu_ready)
        pthread_mutex_destroy(&self->stage_mu);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Table_put(Table *self, PyObject *args)
{
    PyObject *key;
    unsigned long long slot, crc, seq;
    if (!PyArg_ParseTuple(args, "OKKK", &key, &slot, &crc, &seq))
        return NULL;
    key_t_ k;
    if (key_in(key, &k) < 0)
        return NULL;
    int rc = do_put(self, k.kind, k.data, k.len, slot, (uint32_t)crc, seq);
    Py_XDECREF(k.hold);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Table_delete(Table *self, PyObject *args)
{
    PyObject *key;
    unsigned long long seq;
    if (!PyArg_ParseTuple(args, "OK", &key, &seq))
        return NULL;
    key_t_ k;
    int got = key_in(key, &k);
    if (got == -2) { /* too long to be held: nothing to delete (the sequence counts) */
        PyErr_Clear();
        if (seq > self->max_seq)
            self->max_seq = seq;
        Py_RETURN_FALSE;
    }
    if (got < 0)
        return NULL;
    int gone = do_delete(self, k.kind, k.data, k.len, seq);
    Py_XDECREF(k.hold);
    return gone < 0 ? NULL : PyBool_FromLong(gone);
}

static PyObject *
Table_get(Table *self, PyObject *arg)
{
    long long slot = PyLong_AsLongLong(arg);
    if (slot == -1 && PyErr_Occurred())
        return NULL;
    if (slot < 0 || slot >= self->num_blocks || self->recs[slot].seq == 0)
        Py_RETURN_NONE;
    rec_t *r = &self->recs[slot];
    PyObject *key = key_out(r->kind, rec_key(r), r->klen);
    if (key == NULL)
        return NULL;
    return Py_BuildValue("(NI)", key, (unsigned int)r->crc);
}

static PyObject *
Table_find(Table *self, PyObject *arg)
{
    key_t_ k;
    int got = key_in(arg, &k);
    if (got < 0) {
        /* Not a key, or one too long to be held: in no slot. */
        if (got == -2 || PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            return PyLong_FromLong(-1);
        }
        return NULL;
    }
    int64_t s = find_slot(self, k.kind, k.data, k.len);
    Py_XDECREF(k.hold);
    return PyLong_FromLongLong(s);
}

#define WINDOW 16

/* Records are parsed and checked a window at a time, their hash buckets
 * prefetched, then applied: the random bucket reads overlap instead of each
 * waiting for memory in turn. */
static PyObject *
Table_apply(Table *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t offset;
    if (!PyArg_ParseTuple(args, "y*n", &view, &offset))
        return NULL;
    const uint8_t *data = view.buf;
    Py_ssize_t size = view.len, n = 0;
    int ok = 1;
    const uint8_t *win[WINDOW];
    uint64_t hash[WINDOW];
    while (ok == 1 && offset < size) {
        int w = 0;
        while (w < WINDOW && offset < size) {
            if (offset + HEAD > size) {
                ok = 2; /* the buffer ends inside a record */
                break;
            }
            const uint8_t *p = data + offset;
            uint32_t crc;
            uint16_t klen;
            memcpy(&crc, p, 4);
            memcpy(&klen, p + 6, 2);
            Py_ssize_t total = HEAD + klen + ((8 - (HEAD + klen) % 8) % 8);
            if (offset + total > size) {
                ok = 2;
                break;
            }
            if (crc32_of(p + 4, (size_t)(total - 4)) != crc ||
                (p[4] != OP_PUT && p[4] != OP_DEL) || p[5] > KIND_BIGINT) {
                ok = 0;
                break;
            }
            hash[w] = key_hash(self, p[5], p + HEAD, klen);
            __builtin_prefetch(&self->ht[hash[w] & self->mask]);
            uint32_t at;
            memcpy(&at, p + 8, 4);
            if (at < self->num_blocks)
                __builtin_prefetch(&self->recs[at]); /* a log's slots are random */
            win[w++] = p;
            offset += total;
        }
        for (int k = 0; k < w; k++) {
            const uint8_t *p = win[k];
            uint32_t bcrc, slot;
            uint16_t klen;
            uint64_t seq;
            memcpy(&klen, p + 6, 2);
            memcpy(&slot, p + 8, 4);
            memcpy(&bcrc, p + 12, 4);
            memcpy(&seq, p + 16, 8);
            int rc = p[4] == OP_PUT
                         ? put_hashed(self, p[5], p + HEAD, klen, slot, bcrc, seq, hash[k])
                         : do_delete(self, p[5], p + HEAD, klen, seq);
            /* A failed update changed nothing: the caller retries from here. */
            if (rc < 0) {
                PyBuffer_Release(&view);
                return NULL;
            }
            n++;
        }
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(nni)", n, offset, ok);
}

static Py_ssize_t
frame_size(const rec_t *r)
{
    return HEAD + r->klen + ((8 - (HEAD + r->klen) % 8) % 8);
}

static PyObject *
Table_dump(Table *self, PyObject *args)
{
    unsigned long long lo, hi;
    if (!PyArg_ParseTuple(args, "KK", &lo, &hi))
        return NULL;
    if (hi > self->num_blocks)
        hi = self->num_blocks;
    Py_ssize_t size = 0, n = 0;
    for (uint64_t s = lo; s < hi; s++)
        if (self->recs[s].seq) {
            size += frame_size(&self->recs[s]);
            n++;
        }
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL)
        return NULL;
    uint8_t *p = (uint8_t *)PyBytes_AS_STRING(out);
    memset(p, 0, (size_t)size);
    for (uint64_t s = lo; s < hi; s++) {
        rec_t *r = &self->recs[s];
        if (!r->seq)
            continue;
        Py_ssize_t total = frame_size(r);
        uint32_t slot = (uint32_t)s;
        p[4] = OP_PUT;
        p[5] = r->kind;
        memcpy(p + 6, &r->klen, 2);
        memcpy(p + 8, &slot, 4);
        memcpy(p + 12, &r->crc, 4);
        memcpy(p + 16, &r->seq, 8);
        memcpy(p + HEAD, rec_key(r), r->klen);
        uint32_t crc = crc32_of(p + 4, (size_t)(total - 4));
        memcpy(p, &crc, 4);
        p += total;
    }
    return Py_BuildValue("(Nn)", out, n);
}

/* -- the snapshot: the arrays as they sit in memory --------------------------------- */

static size_t
round_page(size_t n)
{
    return (n + 4095) & ~(size_t)4095;
}

/* The state of a snapshot, freed when it ends; its staging buffers are kept for the
 * next one (their pages already faulted in) unless the table goes. */
static void
snap_free(snap_t *sn)
{
    uint8_t *stage0 = sn->stage[0], *stage1 = sn->stage[1], *cbuf = sn->cbuf;
    PyMem_RawFree(sn->saved);
    PyMem_RawFree(sn->crcs);
    PyMem_RawFree(sn->lk);
    memset(sn, 0, sizeof(*sn));
    sn->stage[0] = stage0;
    sn->stage[1] = stage1;
    sn->cbuf = cbuf;
}

static void
snap_release(snap_t *sn)
{
    snap_free(sn);
    PyMem_RawFree(sn->stage[0]);
    PyMem_RawFree(sn->stage[1]);
    PyMem_RawFree(sn->cbuf);
    sn->stage[0] = sn->stage[1] = sn->cbuf = NULL;
}

static int
lk_append(snap_t *sn, uint32_t slot, const rec_t *r)
{
    size_t need = (8 + r->klen + 7) & ~(size_t)7;
    if (sn->lk_len + need > sn->lk_cap) {
        size_t cap = sn->lk_cap ? sn->lk_cap : 4096;
        while (cap < sn->lk_len + need)
            cap *= 2;
        uint8_t *grown = PyMem_RawRealloc(sn->lk, cap);
        if (grown == NULL)
            return -1;
        sn->lk = grown;
        sn->lk_cap = cap;
    }
    uint8_t *p = sn->lk + sn->lk_len;
    memset(p, 0, need);
    memcpy(p, &slot, 4);
    memcpy(p + 4, &r->klen, 2);
    memcpy(p + 8, r->key.out, r->klen);
    sn->lk_len += need;
    sn->lk_count++;
    return 0;
}

static int
all_zero(const uint8_t *p, size_t len)
{
    uint64_t acc = 0;
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        acc |= w;
        if ((i & 4095) == 4088 && acc)
            return 0;
    }
    for (; i < len; i++)
        acc |= p[i];
    return acc == 0;
}

static int
write_at(int fd, const uint8_t *p, size_t len, uint64_t off)
{
    while (len) {
        ssize_t w = pwrite(fd, p, len, (off_t)off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        len -= (size_t)w;
        off += (uint64_t)w;
    }
    return 0;
}

/* Where chunk c sits in memory and in the snapshot file. */
static void
chunk_span(const Table *t, uint32_t c, const uint8_t **p, size_t *len, uint64_t *off)
{
    const snap_t *sn = &t->snap;
    if (c < sn->n_rc) {
        size_t at = (size_t)c * REC_CHUNK * sizeof(rec_t);
        *p = (const uint8_t *)t->recs + at;
        *len = t->recs_bytes - at < REC_CHUNK * sizeof(rec_t) ? t->recs_bytes - at
                                                             : REC_CHUNK * sizeof(rec_t);
        *off = sn->recs_off + at;
    } else {
        size_t at = (size_t)(c - sn->n_rc) * HT_CHUNK * sizeof(uint32_t);
        *p = (const uint8_t *)t->ht + at;
        *len = t->ht_bytes - at < HT_CHUNK * sizeof(uint32_t) ? t->ht_bytes - at
                                                              : HT_CHUNK * sizeof(uint32_t);
        *off = sn->ht_off + at;
    }
}

/* Save chunk c (its bytes as they are now, before this update changes them), once:
 * called by updates (the index lock and the GIL held). */
static void
snap_save(Table *t, uint32_t c)
{
    snap_t *sn = &t->snap;
    if (__atomic_exchange_n(&sn->saved[c], SAVED, __ATOMIC_ACQ_REL) == SAVED)
        return; /* the background copy saved it (or this update did, a moment ago) */
    sn->by_updates++;
    const uint8_t *p;
    size_t len;
    uint64_t off;
    chunk_span(t, c, &p, &len, &off);
    if (c < sn->n_rc && t->out_bytes && !sn->err) {
        uint64_t hi = (uint64_t)c * REC_CHUNK + REC_CHUNK;
        if (hi > t->num_blocks)
            hi = t->num_blocks;
        for (uint64_t s = (uint64_t)c * REC_CHUNK; s < hi; s++)
            if (t->recs[s].seq && t->recs[s].klen > INLINE &&
                lk_append(sn, (uint32_t)s, &t->recs[s]) < 0)
                sn->err = ENOMEM;
    }
    if (sn->err)
        return;
    sn->crcs[c] = crc32c_of(p, len);
    if (all_zero(p, len))
        return; /* never written (or emptied): a hole in the file reads back as zeros */
    pthread_mutex_lock(&t->stage_mu);
    int k = sn->cur;
    uint8_t *st = sn->stage[k];
    if (st != NULL && sn->stage_len[k] + 16 + len <= STAGE_BYTES) {
        uint64_t l64 = len;
        memcpy(st + sn->stage_len[k], &off, 8);
        memcpy(st + sn->stage_len[k] + 8, &l64, 8);
        memcpy(st + sn->stage_len[k] + 16, p, len);
        sn->stage_len[k] += 16 + len;
        pthread_mutex_unlock(&t->stage_mu);
        return;
    }
    pthread_mutex_unlock(&t->stage_mu);
    if (write_at(sn->fd, p, len, off) < 0)
        sn->err = errno;
}

/* Write out the staged chunks of buffer k; 0 or an errno. */
static int
stage_write(int fd, const uint8_t *st, size_t len)
{
    size_t at = 0;
    while (at + 16 <= len) {
        uint64_t off, n;
        memcpy(&off, st + at, 8);
        memcpy(&n, st + at + 8, 8);
        if (write_at(fd, st + at + 16, (size_t)n, off) < 0)
            return errno;
        at += 16 + (size_t)n;
    }
    return 0;
}

/* Write the chunks updates staged so far: the current buffer becomes the one
 * updates fill next (the other is empty: every flush empties its own). Called
 * by the background thread only, without the GIL; 0 or an errno. */
static int
stage_flush(Table *t)
{
    snap_t *sn = &t->snap;
    pthread_mutex_lock(&t->stage_mu);
    int k = sn->cur;
    size_t len = sn->stage_len[k];
    if (len)
        sn->cur = 1 - k;
    pthread_mutex_unlock(&t->stage_mu);
    if (len == 0)
        return 0;
    int err = stage_write(sn->fd, sn->stage[k], len);
    sn->stage_len[k] = 0; /* only the next swap (this thread's) makes it current again */
    return err;
}

static PyObject *
Table_snap_begin(Table *self, PyObject *args)
{
    int fd;
    unsigned long long recs_off, ht_off;
    if (!PyArg_ParseTuple(args, "iKK", &fd, &recs_off, &ht_off))
        return NULL;
    if (self->snap.active) {
        PyErr_SetString(PyExc_RuntimeError, "a snapshot of this table is already being taken");
        return NULL;
    }
    snap_t *sn = &self->snap;
    snap_free(sn); /* keeps the staging buffers of an earlier snapshot */
    sn->n_rc = (uint32_t)((self->num_blocks + REC_CHUNK - 1) / REC_CHUNK);
    sn->n_hc = (uint32_t)((self->mask + 1 + HT_CHUNK - 1) / HT_CHUNK);
    sn->saved = PyMem_RawCalloc(sn->n_rc + sn->n_hc, 1);
    sn->crcs = PyMem_RawCalloc(sn->n_rc + sn->n_hc, sizeof(uint32_t));
    if (sn->saved == NULL || sn->crcs == NULL) {
        snap_free(sn);
        return PyErr_NoMemory();
    }
    for (int k = 0; k < 2; k++)
        if (sn->stage[k] == NULL && (sn->stage[k] = PyMem_RawMalloc(STAGE_BYTES)) == NULL) {
            snap_free(sn);
            return PyErr_NoMemory();
        }
    if (sn->cbuf == NULL && (sn->cbuf = PyMem_RawMalloc(COPY_BYTES)) == NULL) {
        snap_free(sn);
        return PyErr_NoMemory();
    }
    sn->fd = fd;
    sn->recs_off = recs_off;
    sn->ht_off = ht_off;
    sn->live = (uint64_t)self->live;
    sn->max_seq = self->max_seq;
    sn->active = 1;
    Py_RETURN_NONE;
}

/* Does this copy of a record chunk hold a key stored out of line? */
static int
has_long_key(const uint8_t *p, size_t len)
{
    for (size_t at = 0; at + sizeof(rec_t) <= len; at += sizeof(rec_t)) {
        rec_t r;
        memcpy(&r, p + at, sizeof(r));
        if (r.seq && r.klen > INLINE)
            return 1;
    }
    return 0;
}

/* Write the chunks copied into cbuf (offsets and lengths in spans): adjacent ones
 * in one write. 0 or an errno. */
static int
copy_write(int fd, const uint8_t *buf, const uint64_t (*spans)[2], size_t n)
{
    size_t at = 0;
    for (size_t i = 0; i < n;) {
        uint64_t off = spans[i][0], len = spans[i][1];
        size_t j = i + 1;
        while (j < n && spans[j][0] == off + len)
            len += spans[j++][1];
        if (write_at(fd, buf + at, (size_t)len, off) < 0)
            return errno;
        at += (size_t)len;
        i = j;
    }
    return 0;
}

#define COPY_SPANS (COPY_BYTES / (HT_CHUNK * sizeof(uint32_t)))

/* snap_copy(hold_us=0) -> True: save every chunk no update has saved, in this
 * thread, with neither the GIL nor the index lock (see the comment above snap_t),
 * and write what updates staged meanwhile. Record chunks with out-of-line keys are
 * left to snap_step. Call it from one thread, the only one that ends the snapshot.
 * hold_us (tests) pauses in the middle of each chunk's copy: the window in which
 * an update takes a chunk over, widened. */
static PyObject *
Table_snap_copy(Table *self, PyObject *args)
{
    unsigned int hold_us = 0;
    if (!PyArg_ParseTuple(args, "|I", &hold_us))
        return NULL;
    snap_t *sn = &self->snap;
    if (!sn->active || sn->flushing) {
        PyErr_SetString(PyExc_RuntimeError, "no snapshot is being taken, or it is being written");
        return NULL;
    }
    uint64_t(*spans)[2] = PyMem_RawMalloc(COPY_SPANS * sizeof(*spans));
    if (spans == NULL)
        return PyErr_NoMemory();
    sn->flushing = 1;
    uint32_t total = sn->n_rc + sn->n_hc;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS;
    size_t used = 0, n = 0;
    while (sn->cnext < total && !err) {
        uint32_t c = sn->cnext++;
        uint8_t expect = UNSAVED;
        if (!__atomic_compare_exchange_n(&sn->saved[c], &expect, COPYING, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE))
            continue; /* an update saved it */
        const uint8_t *p;
        size_t len;
        uint64_t off;
        chunk_span(self, c, &p, &len, &off);
        uint8_t *mine = sn->cbuf + used;
        if (hold_us) {
            memcpy(mine, p, len / 2);
            usleep(hold_us);
            memcpy(mine + len / 2, p + len / 2, len - len / 2);
        } else {
            memcpy(mine, p, len);
        }
        expect = COPYING;
        if (c < sn->n_rc && has_long_key(mine, len)) {
            /* Given back: snap_step saves it under the index lock. */
            __atomic_compare_exchange_n(&sn->saved[c], &expect, UNSAVED, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_RELAXED);
            continue;
        }
        if (!__atomic_compare_exchange_n(&sn->saved[c], &expect, SAVED, 0, __ATOMIC_RELEASE,
                                         __ATOMIC_RELAXED)) {
            sn->taken++; /* an update took it while it was copied: its copy counts */
            continue;
        }
        sn->by_copy++;
        sn->crcs[c] = crc32c_of(mine, len);
        if (all_zero(mine, len))
            continue;
        spans[n][0] = off;
        spans[n][1] = len;
        n++;
        used += len;
        if (used + REC_CHUNK * sizeof(rec_t) > COPY_BYTES || n == COPY_SPANS) {
            err = copy_write(sn->fd, sn->cbuf, (const uint64_t(*)[2])spans, n);
            used = n = 0;
            if (!err)
                err = stage_flush(self);
        }
    }
    if (!err && n)
        err = copy_write(sn->fd, sn->cbuf, (const uint64_t(*)[2])spans, n);
    if (!err)
        err = stage_flush(self);
    Py_END_ALLOW_THREADS;
    sn->flushing = 0;
    PyMem_RawFree(spans);
    if (err && !sn->cerr)
        sn->cerr = err;
    Py_RETURN_TRUE;
}

/* Save up to n chunks no update has saved yet (the index lock held); True when
 * every chunk is saved. */
static PyObject *
Table_snap_step(Table *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    snap_t *sn = &self->snap;
    if (!sn->active || sn->flushing) {
        PyErr_SetString(PyExc_RuntimeError, "no snapshot is being taken, or it is being written");
        return NULL;
    }
    uint32_t total = sn->n_rc + sn->n_hc;
    while (n > 0 && sn->next < total && !sn->err) {
        if (!chunk_saved(sn, sn->next)) {
            snap_save(self, sn->next);
            n--;
        }
        sn->next++;
    }
    while (sn->next < total && chunk_saved(sn, sn->next))
        sn->next++;
    return PyBool_FromLong(sn->next >= total || sn->err);
}

/* Write the chunks staged so far, the GIL released (call it without the index
 * lock, from the one thread that ends the snapshot). */
static PyObject *
Table_snap_flush(Table *self, PyObject *Py_UNUSED(ignored))
{
    snap_t *sn = &self->snap;
    if (!sn->active || sn->flushing)
        Py_RETURN_NONE;
    int err;
    sn->flushing = 1;
    Py_BEGIN_ALLOW_THREADS;
    err = stage_flush(self);
    Py_END_ALLOW_THREADS;
    sn->flushing = 0;
    if (err && !sn->err)
        sn->err = err;
    Py_RETURN_NONE;
}

/* Stop taking the snapshot: (live, max_seq, chunk crcs, out-of-line keys, their
 * count, errno or 0) as of snap_begin. Chunks still staged are written first. */
static PyObject *
Table_snap_end(Table *self, PyObject *Py_UNUSED(ignored))
{
    snap_t *sn = &self->snap;
    if (!sn->active)
        Py_RETURN_NONE;
    if (sn->flushing) {
        PyErr_SetString(PyExc_RuntimeError, "the snapshot is being flushed");
        return NULL;
    }
    uint32_t total = sn->n_rc + sn->n_hc;
    for (int k = 0; k < 2 && !sn->err; k++)
        if (sn->stage_len[k]) {
            int e = stage_write(sn->fd, sn->stage[k], sn->stage_len[k]);
            if (e)
                sn->err = e;
            sn->stage_len[k] = 0;
        }
    int err = sn->err ? sn->err : sn->cerr;
    if (!err && sn->next < total)
        err = EINTR; /* abandoned before every chunk was written */
    PyObject *out = Py_BuildValue(
        "(KKy#y#Ki)", (unsigned long long)sn->live, (unsigned long long)sn->max_seq,
        (const char *)sn->crcs, (Py_ssize_t)(total * sizeof(uint32_t)),
        (const char *)(sn->lk ? sn->lk : (uint8_t *)""), (Py_ssize_t)sn->lk_len,
        (unsigned long long)sn->lk_count, err);
    self->last_by_updates = sn->by_updates;
    self->last_by_copy = sn->by_copy;
    self->last_taken = sn->taken;
    snap_free(sn);
    return out;
}

static int
read_full(int fd, uint8_t *p, size_t len, uint64_t off)
{
    while (len) {
        ssize_t got = pread(fd, p, len, (off_t)off);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (got == 0)
            return 0; /* the file ends early: the rest stays zero and fails its checksum */
        p += got;
        len -= (size_t)got;
        off += (uint64_t)got;
    }
    return 0;
}

/* Put rec s's key back in the hash (the table being rebuilt): a key found twice
 * keeps its newer record. */
static void
rebuild_insert(Table *t, uint32_t s)
{
    rec_t *r = &t->recs[s];
    int found;
    uint64_t h = key_hash(t, r->kind, rec_key(r), r->klen);
    uint64_t b = probe(t, r->kind, rec_key(r), r->klen, h, &found);
    if (found) {
        rec_t *o = &t->recs[bucket_slot(t, t->ht[b])];
        rec_t *drop = o->seq > r->seq ? r : o;
        if (drop == o)
            t->ht[b] = bucket_of(t, (b - h) & t->mask, s);
        if (drop->klen > INLINE)
            PyMem_RawFree(drop->key.out);
        memset(drop, 0, sizeof(*drop));
        return;
    }
    t->ht[b] = bucket_of(t, (b - h) & t->mask, s);
    t->live++;
    if (r->klen > INLINE)
        t->out_bytes += r->klen;
}

/* load(fd, how, recs_off, ht_off, seed, live, max_seq, crcs, long_keys, long_count)
 *   -> (chunks that failed their checksum, entries dropped with them or for want of
 *       their out-of-line key)
 * how: 0 read into fresh anonymous memory, 1 the same from an O_DIRECT descriptor,
 * 2 mmap MAP_PRIVATE | MAP_POPULATE. Where a chunk fails, its records are dropped
 * and the hash rebuilt from the records kept. The table must be empty. */
static PyObject *
Table_load(Table *self, PyObject *args)
{
    int fd, how;
    unsigned long long recs_off, ht_off, seed, live, max_seq, long_count;
    Py_buffer crcs, lk;
    if (!PyArg_ParseTuple(args, "iiKKKKKy*y*K", &fd, &how, &recs_off, &ht_off, &seed, &live,
                          &max_seq, &crcs, &lk, &long_count))
        return NULL;
    PyObject *result = NULL;
    uint32_t n_rc = (uint32_t)((self->num_blocks + REC_CHUNK - 1) / REC_CHUNK);
    uint32_t n_hc = (uint32_t)((self->mask + 1 + HT_CHUNK - 1) / HT_CHUNK);
    if (self->live || self->snap.active || self->max_seq) {
        PyErr_SetString(PyExc_RuntimeError, "a snapshot loads into an empty table");
        goto done;
    }
    if ((size_t)crcs.len != (size_t)(n_rc + n_hc) * sizeof(uint32_t)) {
        PyErr_SetString(PyExc_ValueError, "the snapshot's chunk count is not this table's");
        goto done;
    }
    size_t rb = round_page(self->recs_bytes), hb = round_page(self->ht_bytes);
    uint8_t *recs = NULL, *ht = NULL;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS;
    if (how == 2) {
        recs = mmap(NULL, rb, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_POPULATE, fd,
                    (off_t)recs_off);
        ht = mmap(NULL, hb, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_POPULATE, fd,
                  (off_t)ht_off);
        if (recs == MAP_FAILED || ht == MAP_FAILED)
            err = errno;
    } else {
        recs = zeroed(rb);
        ht = zeroed(hb);
        if (recs == NULL || ht == NULL)
            err = ENOMEM;
        else if (read_full(fd, recs, rb, recs_off) < 0 || read_full(fd, ht, hb, ht_off) < 0)
            err = errno;
    }
    Py_END_ALLOW_THREADS;
    if (err) {
        if (recs != NULL && recs != MAP_FAILED)
            munmap(recs, rb);
        if (ht != NULL && ht != MAP_FAILED)
            munmap(ht, hb);
        errno = err;
        PyErr_SetFromErrno(err == ENOMEM ? PyExc_MemoryError : PyExc_OSError);
        goto done;
    }
    munmap(self->recs, self->recs_bytes);
    munmap(self->ht, self->ht_bytes);
    self->recs = (rec_t *)recs;
    self->ht = (uint32_t *)ht;
    self->seed = seed;
    self->max_seq = max_seq;
    self->live = (Py_ssize_t)live;

    /* Every chunk against its checksum. */
    const uint32_t *want = crcs.buf;
    uint8_t *bad = PyMem_RawCalloc(n_rc + n_hc, 1);
    if (bad == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    uint32_t n_bad = 0;
    Py_BEGIN_ALLOW_THREADS;
    for (uint32_t c = 0; c < n_rc + n_hc; c++) {
        const uint8_t *p;
        size_t len;
        if (c < n_rc) {
            size_t at = (size_t)c * REC_CHUNK * sizeof(rec_t);
            p = recs + at;
            len = self->recs_bytes - at < REC_CHUNK * sizeof(rec_t) ? self->recs_bytes - at
                                                                    : REC_CHUNK * sizeof(rec_t);
        } else {
            size_t at = (size_t)(c - n_rc) * HT_CHUNK * sizeof(uint32_t);
            p = ht + at;
            len = self->ht_bytes - at < HT_CHUNK * sizeof(uint32_t) ? self->ht_bytes - at
                                                                    : HT_CHUNK * sizeof(uint32_t);
        }
        if (crc32c_of(p, len) != want[c]) {
            bad[c] = 1;
            n_bad++;
        }
    }
    Py_END_ALLOW_THREADS;
    uint64_t dropped = 0;
    int rebuild = n_bad != 0;
    for (uint32_t c = 0; c < n_rc; c++)
        if (bad[c]) {
            size_t at = (size_t)c * REC_CHUNK;
            size_t cnt = self->num_blocks - at < REC_CHUNK ? self->num_blocks - at : REC_CHUNK;
            for (size_t s = at; s < at + cnt; s++)
                dropped += self->recs[s].seq != 0;
            memset(&self->recs[at], 0, cnt * sizeof(rec_t));
        }
    if (long_count) {
        /* Out-of-line keys: the pointers on disk mean nothing; set them from the list. */
        for (uint32_t s = 0; s < self->num_blocks; s++)
            if (self->recs[s].klen > INLINE)
                self->recs[s].key.out = NULL;
        const uint8_t *p = lk.buf, *end = p + lk.len;
        while (p + 8 <= end) {
            uint32_t s;
            uint16_t klen;
            memcpy(&s, p, 4);
            memcpy(&klen, p + 4, 2);
            size_t need = (8 + (size_t)klen + 7) & ~(size_t)7;
            if (p + need > end)
                break;
            rec_t *r = s < self->num_blocks ? &self->recs[s] : NULL;
            if (r != NULL && r->seq && r->klen == klen && klen > INLINE && r->key.out == NULL) {
                r->key.out = PyMem_RawMalloc(klen);
                if (r->key.out == NULL) {
                    PyErr_NoMemory();
                    PyMem_RawFree(bad);
                    goto done; /* Python drops this table */
                }
                memcpy(r->key.out, p + 8, klen);
                self->out_bytes += klen;
            }
            p += need;
        }
        for (uint32_t s = 0; s < self->num_blocks; s++) {
            rec_t *r = &self->recs[s];
            if (r->seq && r->klen > INLINE && r->key.out == NULL) {
                memset(r, 0, sizeof(*r));
                dropped++;
                rebuild = 1;
            } else if (!r->seq && r->klen > INLINE) {
                r->klen = 0;
            }
        }
    }
    if (rebuild) {
        /* Damaged: the hash is rebuilt from the records that verified. */
        memset(self->ht, 0, self->ht_bytes);
        self->live = 0;
        self->out_bytes = 0;
        for (uint32_t s = 0; s < self->num_blocks; s++)
            if (self->recs[s].seq)
                rebuild_insert(self, s);
    }
    PyMem_RawFree(bad);
    result = Py_BuildValue("(IK)", n_bad, (unsigned long long)dropped);
done:
    PyBuffer_Release(&crcs);
    PyBuffer_Release(&lk);
    return result;
}

static PyObject *
Table_layout(Table *self, void *Py_UNUSED(closure))
{
    uint32_t n_rc = (uint32_t)((self->num_blocks + REC_CHUNK - 1) / REC_CHUNK);
    uint32_t n_hc = (uint32_t)((self->mask + 1 + HT_CHUNK - 1) / HT_CHUNK);
    return Py_BuildValue("{s:I,s:K,s:I,s:I,s:I,s:K,s:K,s:I,s:I}", "dist_max", self->dist_cap,
                         "rec_bytes",
                         (unsigned)sizeof(rec_t), "buckets",
                         (unsigned long long)(self->mask + 1), "slot_bits", self->slot_bits,
                         "rec_chunk", REC_CHUNK, "ht_chunk", HT_CHUNK, "recs_bytes",
                         (unsigned long long)self->recs_bytes, "ht_bytes",
                         (unsigned long long)self->ht_bytes, "chunks", n_rc + n_hc);
}

static PyObject *
Table_snap_counts(Table *self, void *Py_UNUSED(closure))
{
    return Py_BuildValue("(KKK)", (unsigned long long)self->last_by_updates,
                         (unsigned long long)self->last_by_copy,
                         (unsigned long long)self->last_taken);
}

static PyObject *
Table_seed(Table *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->seed);
}

typedef struct {
    uint64_t seq;
    uint32_t slot;
} order_t;

static int
by_seq(const void *a, const void *b)
{
    uint64_t x = ((const order_t *)a)->seq, y = ((const order_t *)b)->seq;
    return x < y ? -1 : x > y;
}

static PyObject *
Table_entries(Table *self, PyObject *Py_UNUSED(ignored))
{
    order_t *order = PyMem_RawMalloc((size_t)(self->live ? self->live : 1) * sizeof(order_t));
    if (order == NULL)
        return PyErr_NoMemory();
    Py_ssize_t n = 0;
    for (uint32_t s = 0; s < self->num_blocks && n < self->live; s++)
        if (self->recs[s].seq)
            order[n++] = (order_t){self->recs[s].seq, s};
    qsort(order, (size_t)n, sizeof(order_t), by_seq);
    PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        if (i + 8 < n)
            __builtin_prefetch(&self->recs[order[i + 8].slot]);
        rec_t *r = &self->recs[order[i].slot];
        PyObject *item = PyTuple_New(3);
        PyObject *key = item ? key_out(r->kind, rec_key(r), r->klen) : NULL;
        PyObject *slot = key ? PyLong_FromUnsignedLong(order[i].slot) : NULL;
        PyObject *crc = slot ? PyLong_FromUnsignedLong(r->crc) : NULL;
        if (crc == NULL) {
            Py_XDECREF(key);
            Py_XDECREF(slot);
            Py_XDECREF(item);
            Py_CLEAR(out);
            break;
        }
        PyTuple_SET_ITEM(item, 0, key);
        PyTuple_SET_ITEM(item, 1, slot);
        PyTuple_SET_ITEM(item, 2, crc);
        PyList_SET_ITEM(out, i, item);
    }
    PyMem_RawFree(order);
    return out;
}

static Py_ssize_t
Table_len(Table *self)
{
    return self->live;
}

static PyObject *
Table_max_seq(Table *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->max_seq);
}

static PyObject *
Table_nbytes(Table *self, void *Py_UNUSED(closure))
{
    size_t n = self->recs_bytes + self->ht_bytes + self->out_bytes;
    return PyLong_FromSize_t(n);
}

static PyMethodDef Table_methods[] = {
    {"put", (PyCFunction)Table_put, METH_VARARGS, "put(key, slot, crc, seq)"},
    {"delete", (PyCFunction)Table_delete, METH_VARARGS, "delete(key, seq) -> removed"},
    {"get", (PyCFunction)Table_get, METH_O, "get(slot) -> (key, crc) or None"},
    {"find", (PyCFunction)Table_find, METH_O, "find(key) -> slot or -1"},
    {"apply", (PyCFunction)Table_apply, METH_VARARGS,
     "apply(data, offset) -> (records applied, end offset, 1 | 0 bad record | 2 cut short)"},
    {"dump", (PyCFunction)Table_dump, METH_VARARGS, "dump(lo, hi) -> (records, count)"},
    {"entries", (PyCFunction)Table_entries, METH_NOARGS,
     "entries() -> [(key, slot, crc)] oldest first"},
    {"snap_begin", (PyCFunction)Table_snap_begin, METH_VARARGS,
     "snap_begin(fd, recs_offset, ht_offset): take a snapshot as of now"},
    {"snap_copy", (PyCFunction)Table_snap_copy, METH_VARARGS,
     "snap_copy(hold_us=0) -> True: save the chunks no update saved, without the GIL or the "
     "index lock"},
    {"snap_step", (PyCFunction)Table_snap_step, METH_O,
     "snap_step(n) -> done: write up to n chunks no update has written"},
    {"snap_flush", (PyCFunction)Table_snap_flush, METH_NOARGS,
     "snap_flush(): write the chunks copied so far (without the index lock)"},
    {"snap_end", (PyCFunction)Table_snap_end, METH_NOARGS,
     "snap_end() -> (live, max_seq, crcs, long_keys, long_count, errno) or None"},
    {"load", (PyCFunction)Table_load, METH_VARARGS,
     "load(fd, how, recs_off, ht_off, seed, live, max_seq, crcs, long_keys, long_count)"
     " -> (bad chunks, entries dropped)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Table_getset[] = {
    {"max_seq", (getter)Table_max_seq, NULL, "the largest sequence number seen", NULL},
    {"nbytes", (getter)Table_nbytes, NULL, "bytes the table's arrays and keys take", NULL},
    {"layout", (getter)Table_layout, NULL, "the arrays' geometry, as a snapshot records it",
     NULL},
    {"seed", (getter)Table_seed, NULL, "the key hash's seed", NULL},
    {"snap_counts", (getter)Table_snap_counts, NULL,
     "(chunks saved by updates, by the background copy, taken over from it by updates) "
     "in the last snapshot",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods Table_seq = {.sq_length = (lenfunc)Table_len};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvactors._nvme_index.Table",
    .tp_basicsize = sizeof(Table),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The NVMe index's live entries: one record per slot, keys inline.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Table_init,
    .tp_dealloc = (destructor)Table_dealloc,
    .tp_methods = Table_methods,
    .tp_getset = Table_getset,
    .tp_as_sequence = &Table_seq,
};


/* -- the C interface of index_api.h ------------------------------------------------- */

static int
api_key_at(PyObject *table, uint32_t slot, uint8_t *kind, const uint8_t **data, size_t *len)
{
    Table *t = (Table *)table;
    if (slot >= t->num_blocks || t->recs[slot].seq == 0)
        return 0;
    const rec_t *r = &t->recs[slot];
    *kind = r->kind;
    *data = rec_key(r);
    *len = r->klen;
    return 1;
}

static int
api_attach(PyObject *table, void *listener, kv_on_change on_change)
{
    Table *t = (Table *)table;
    if (t->listener != NULL && t->listener != listener) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this NVMe index table already serves another manager");
        return -1;
    }
    t->listener = listener;
    t->on_change = on_change;
    return 0;
}

static void
api_detach(PyObject *table, void *listener)
{
    Table *t = (Table *)table;
    if (t->listener == listener) {
        t->listener = NULL;
        t->on_change = NULL;
    }
}

/* Live slots by sequence number. Sequence numbers are distinct, so while the
 * live ones span at most 4x their count (a tier whose writes since its oldest
 * live record are a few times its size) each is put in its own place of an
 * array over that span, which is then read in order: one pass of (mostly
 * near-sequential) writes instead of a sort. Otherwise (seq << 32 | slot)
 * sorted by a least significant digit radix sort on the sequence bits only
 * (16 bits a pass; two passes while sequence numbers stay below 2**32), with
 * (seq, slot) pairs sorted by qsort past that. */
static uint32_t *
api_oldest_first(PyObject *table, Py_ssize_t *count)
{
    Table *t = (Table *)table;
    size_t n = (size_t)t->live;
    uint32_t *out = PyMem_RawMalloc((n ? n : 1) * sizeof(uint32_t));
    if (out == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    if (t->max_seq >= (1ULL << 32)) {
        order_t *order = PyMem_RawMalloc((n ? n : 1) * sizeof(order_t));
        if (order == NULL) {
            PyMem_RawFree(out);
            PyErr_NoMemory();
            return NULL;
        }
        size_t k = 0;
        for (uint32_t s = 0; s < t->num_blocks && k < n; s++)
            if (t->recs[s].seq)
                order[k++] = (order_t){t->recs[s].seq, s};
        qsort(order, k, sizeof(order_t), by_seq);
        for (size_t i = 0; i < k; i++)
            out[i] = order[i].slot;
        PyMem_RawFree(order);
        *count = (Py_ssize_t)k;
        return out;
    }
    uint64_t *a = PyMem_RawMalloc((n ? n : 1) * sizeof(uint64_t));
    uint64_t *b = PyMem_RawMalloc((n ? n : 1) * sizeof(uint64_t));
    size_t *counts = PyMem_RawMalloc(65536 * sizeof(size_t));
    if (a == NULL || b == NULL || counts == NULL) {
        PyMem_RawFree(a);
        PyMem_RawFree(b);
        PyMem_RawFree(counts);
        PyMem_RawFree(out);
        PyErr_NoMemory();
        return NULL;
    }
    size_t k = 0;
    uint64_t lo = UINT64_MAX;
    for (uint32_t s = 0; s < t->num_blocks && k < n; s++)
        if (t->recs[s].seq) {
            uint64_t q = t->recs[s].seq;
            a[k++] = (q << 32) | s;
            if (q < lo)
                lo = q;
        }
    uint64_t range = k ? t->max_seq - lo + 1 : 0;
    uint32_t *pos = k && range <= 4 * (uint64_t)k ? PyMem_RawCalloc(range, sizeof(uint32_t)) : NULL;
    if (pos != NULL) {
        /* sequence numbers are distinct: each live one has its own place */
        for (size_t i = 0; i < k; i++)
            pos[(a[i] >> 32) - lo] = (uint32_t)a[i] + 1;
        size_t j = 0;
        for (uint64_t r = 0; r < range; r++)
            if (pos[r])
                out[j++] = pos[r] - 1;
        PyMem_RawFree(pos);
        if (j == k) { /* else two records share a number: sorted below */
            PyMem_RawFree(a);
            PyMem_RawFree(b);
            PyMem_RawFree(counts);
            *count = (Py_ssize_t)k;
            return out;
        }
    }
    for (unsigned shift = 32; shift < 64 && (t->max_seq >> (shift - 32)) != 0; shift += 16) {
        memset(counts, 0, 65536 * sizeof(size_t));
        for (size_t i = 0; i < k; i++)
            counts[(a[i] >> shift) & 0xffff]++;
        size_t sum = 0;
        for (size_t d = 0; d < 65536; d++) {
            size_t c = counts[d];
            counts[d] = sum;
            sum += c;
        }
        for (size_t i = 0; i < k; i++)
            b[counts[(a[i] >> shift) & 0xffff]++] = a[i];
        uint64_t *swap = a;
        a = b;
        b = swap;
    }
    for (size_t i = 0; i < k; i++)
        out[i] = (uint32_t)a[i];
    PyMem_RawFree(a);
    PyMem_RawFree(b);
    PyMem_RawFree(counts);
    *count = (Py_ssize_t)k;
    return out;
}

static uint32_t
api_num_blocks(PyObject *table)
{
    return ((Table *)table)->num_blocks;
}

static int64_t
api_find(PyObject *table, uint8_t kind, const uint8_t *data, size_t len)
{
    return find_slot((Table *)table, kind, data, len);
}

static KVIndexAPI index_api = {
    api_key_at, api_attach, api_detach, api_oldest_first, api_num_blocks, NULL, api_find,
};

/* encode(op, keys, slots, crcs, first_seq) -> bytes: records numbered from first_seq. */
static PyObject *
encode(PyObject *Py_UNUSED(module), PyObject *args)
{
    int op;
    PyObject *keys, *slots, *crcs;
    unsigned long long seq;
    if (!PyArg_ParseTuple(args, "iO!O!O!K", &op, &PyList_Type, &keys, &PyList_Type, &slots,
                          &PyList_Type, &crcs, &seq))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(keys);
    if (PyList_GET_SIZE(slots) != n || PyList_GET_SIZE(crcs) != n) {
        PyErr_SetString(PyExc_ValueError, "keys, slots and crcs differ in length");
        return NULL;
    }
    key_t_ *ks = PyMem_Calloc((size_t)(n ? n : 1), sizeof(key_t_));
    if (ks == NULL)
        return PyErr_NoMemory();
    PyObject *out = NULL;
    Py_ssize_t got = 0, size = 0;
    for (; got < n; got++) {
        if (key_in(PyList_GET_ITEM(keys, got), &ks[got]) < 0)
            goto done;
        size += HEAD + (Py_ssize_t)ks[got].len + ((8 - (HEAD + ks[got].len) % 8) % 8);
    }
    out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL)
        goto done;
    uint8_t *p = (uint8_t *)PyBytes_AS_STRING(out);
    memset(p, 0, (size_t)size);
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long slot = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(slots, i));
        unsigned long long crc = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(crcs, i));
        if (PyErr_Occurred() || slot > UINT32_MAX || crc > UINT32_MAX) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_OverflowError, "slot and crc are u32");
            Py_CLEAR(out);
            goto done;
        }
        uint32_t s32 = (uint32_t)slot, c32 = (uint32_t)crc;
        uint16_t klen = (uint16_t)ks[i].len;
        uint64_t sq = seq + (uint64_t)i;
        Py_ssize_t total = HEAD + klen + ((8 - (HEAD + klen) % 8) % 8);
        p[4] = (uint8_t)op;
        p[5] = ks[i].kind;
        memcpy(p + 6, &klen, 2);
        memcpy(p + 8, &s32, 4);
        memcpy(p + 12, &c32, 4);
        memcpy(p + 16, &sq, 8);
        memcpy(p + HEAD, ks[i].data, klen);
        uint32_t fc = crc32_of(p + 4, (size_t)(total - 4));
        memcpy(p, &fc, 4);
        p += total;
    }
done:
    for (Py_ssize_t i = 0; i < got; i++)
        Py_XDECREF(ks[i].hold);
    PyMem_Free(ks);
    return out;
}

static PyMethodDef module_methods[] = {
    {"encode", (PyCFunction)encode, METH_VARARGS,
     "encode(op, keys, slots, crcs, first_seq) -> framed records"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvactors._nvme_index",
    "The NVMe index's live table in compact native arrays.", -1, module_methods,
};

PyMODINIT_FUNC
PyInit__nvme_index(void)
{
    crc_init();
    crc32c_init();
    if (PyType_Ready(&TableType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&TableType);
    if (PyModule_AddObject(m, "Table", (PyObject *)&TableType) < 0) {
        Py_DECREF(&TableType);
        Py_DECREF(m);
        return NULL;
    }
    index_api.type = &TableType;
    PyObject *capsule = PyCapsule_New(&index_api, KV_INDEX_CAPSULE, NULL);
    if (capsule == NULL || PyModule_AddObject(m, "_C_API", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
