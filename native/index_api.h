/* The NVMe index table's C interface to the manager core (kvactors._nvme_index
 * exports it as the capsule "kvactors._nvme_index._C_API"), so the NVMe tier's
 * manager holds no copy of the keys the index already holds inline: a slot the
 * manager *shares* reads its key from the index record of the same slot.
 *
 * The contract: the index calls the attached listener's on_change(slot)
 * before it changes or clears the record of a live slot (a Put over it, the
 * key moving to another slot, a Del), while that record still holds its old
 * key; the manager then makes its own copy of a key it shares there. All calls
 * run with the GIL held. */
#ifndef KVACTORS_INDEX_API_H
#define KVACTORS_INDEX_API_H

#include <Python.h>
#include <stdint.h>

#define KV_KIND_INT 0    /* 8 bytes, signed little-endian */
#define KV_KIND_BYTES 1  /* the bytes */
#define KV_KIND_BIGINT 2 /* signed little-endian, any length */

typedef int (*kv_on_change)(void *listener, uint32_t slot);

typedef struct {
    /* The key recorded at slot: 1 (kind, data, len set), 0 if the slot holds none. */
    int (*key_at)(PyObject *table, uint32_t slot, uint8_t *kind, const uint8_t **data,
                  size_t *len);
    /* Attach the one listener (-1 with RuntimeError if another is attached). */
    int (*attach)(PyObject *table, void *listener, kv_on_change on_change);
    void (*detach)(PyObject *table, void *listener);
    /* The live slots, oldest (lowest sequence number) first: a PyMem_RawMalloc'd
     * array of *n slots (the caller frees it); NULL with MemoryError. */
    uint32_t *(*oldest_first)(PyObject *table, Py_ssize_t *n);
    /* The slots the table has room for. */
    uint32_t (*num_blocks)(PyObject *table);
    PyTypeObject *type;
    /* The slot whose record holds the key (kind, data, len: as key_at gives
     * them), -1 if none. Reads only; makes no object. */
    int64_t (*find)(PyObject *table, uint8_t kind, const uint8_t *data, size_t len);
} KVIndexAPI;

#define KV_INDEX_CAPSULE "kvactors._nvme_index._C_API"

#endif
