/* kvactors._io_core: many vectored file reads or writes in one call, GIL released.
 *
 * The NVMe store plans a request as batches: runs of blocks adjacent in one
 * file, each one preadv/pwritev of several block buffers. Issued from Python,
 * every batch costs a round of interpreter work under the GIL, which the I/O
 * threads then contend for. Here one call takes a whole stretch of batches:
 * it pins the buffers, releases the GIL, and loops over the system calls.
 *
 *   vectored(write, fds, offsets, counts, buffers, faults=None) -> list[int]
 *
 * Batch i reads (or writes) the next counts[i] buffers at offsets[i] of file
 * descriptor fds[i]. The result holds, per batch, the bytes done (less than
 * asked for on a short transfer) or -errno when the system call failed; the
 * caller decides what a short or failed batch means. EINTR is retried.
 *
 * faults (fault injection on this same loop): per batch, 0 runs it, -errno
 * fails it with that error without a system call, n > 0 transfers only its
 * first n bytes (a short call).
 *
 * align > 0: the descriptors are O_DIRECT with that alignment; a batch whose
 * buffers are all aligned goes straight to the device, any other through an
 * aligned bounce buffer (offsets and lengths must be aligned either way).
 *
 * depth > 1: up to that many batches in flight at once (depth - 1 helper
 * threads beside the caller's, each taking the next batch not yet started);
 * the results are the same as one at a time, batch by batch. Direct I/O
 * reaches the device's queue only this way: one synchronous request at a
 * time leaves it idle between requests.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

/* One batch: all its buffers, IOV_MAX at a time; stops at a short transfer. */
static long long
raw_batch(int write, int fd, struct iovec *iov, Py_ssize_t n, long long offset)
{
    long long done = 0;
    while (n > 0) {
        int chunk = n > IOV_MAX ? IOV_MAX : (int)n;
        long long want = 0;
        for (int k = 0; k < chunk; k++)
            want += (long long)iov[k].iov_len;
        ssize_t got;
        do {
            got = write ? pwritev(fd, iov, chunk, (off_t)(offset + done))
                        : preadv(fd, iov, chunk, (off_t)(offset + done));
        } while (got < 0 && errno == EINTR);
        if (got < 0)
            return done ? done : -(long long)errno;
        done += got;
        if (got != want)
            return done; /* short: the caller names what is missing */
        iov += chunk;
        n -= chunk;
    }
    return done;
}

#define BOUNCE_BYTES (4 << 20)

typedef struct {
    size_t align; /* 0: buffered descriptors; else O_DIRECT, this alignment */
    uint8_t *bounce; /* allocated on first need, freed by the caller */
} direct_t;

static int
is_aligned(const struct iovec *iov, Py_ssize_t n, size_t align)
{
    for (Py_ssize_t k = 0; k < n; k++)
        if ((uintptr_t)iov[k].iov_base % align || iov[k].iov_len % align)
            return 0;
    return 1;
}

/* O_DIRECT with buffers that are not aligned: through an aligned bounce buffer,
 * BOUNCE_BYTES at a time (the file offset and total length must be aligned). */
static long long
bounced_batch(int write, int fd, struct iovec *iov, Py_ssize_t n, long long offset, direct_t *d)
{
    long long total = 0;
    for (Py_ssize_t k = 0; k < n; k++)
        total += (long long)iov[k].iov_len;
    if (total % (long long)d->align || offset % (long long)d->align)
        return -(long long)EINVAL;
    if (d->bounce == NULL) {
        void *p = NULL;
        if (posix_memalign(&p, d->align < 4096 ? 4096 : d->align, BOUNCE_BYTES) != 0)
            return -(long long)ENOMEM;
        d->bounce = p;
    }
    long long done = 0;
    Py_ssize_t k = 0;
    size_t within = 0; /* bytes of iov[k] already moved */
    while (done < total) {
        size_t chunk = total - done > BOUNCE_BYTES ? BOUNCE_BYTES : (size_t)(total - done);
        if (write) {
            size_t filled = 0;
            Py_ssize_t kk = k;
            size_t w = within;
            while (filled < chunk) {
                size_t take = iov[kk].iov_len - w;
                if (take > chunk - filled)
                    take = chunk - filled;
                memcpy(d->bounce + filled, (uint8_t *)iov[kk].iov_base + w, take);
                filled += take;
                w += take;
                if (w == iov[kk].iov_len) {
                    kk++;
                    w = 0;
                }
            }
        }
        ssize_t got;
        do {
            got = write ? pwrite(fd, d->bounce, chunk, (off_t)(offset + done))
                        : pread(fd, d->bounce, chunk, (off_t)(offset + done));
        } while (got < 0 && errno == EINTR);
        if (got < 0)
            return done ? done : -(long long)errno;
        /* Move the cursor over the bytes done (scattering them on a read). */
        size_t moved = 0;
        while (moved < (size_t)got) {
            size_t take = iov[k].iov_len - within;
            if (take > (size_t)got - moved)
                take = (size_t)got - moved;
            if (!write)
                memcpy((uint8_t *)iov[k].iov_base + within, d->bounce + moved, take);
            moved += take;
            within += take;
            if (within == iov[k].iov_len) {
                k++;
                within = 0;
            }
        }
        done += got;
        if ((size_t)got != chunk)
            return done;
    }
    return done;
}

static long long
one_batch(int write, int fd, struct iovec *iov, Py_ssize_t n, long long offset, direct_t *d)
{
    if (d->align && !is_aligned(iov, n, d->align))
        return bounced_batch(write, fd, iov, n, offset, d);
    return raw_batch(write, fd, iov, n, offset);
}

/* A batch limited to its first `limit` bytes (limit > 0), as an injected short call
 * (rounded down to the alignment of O_DIRECT descriptors). */
static long long
short_batch(int write, int fd, struct iovec *iov, Py_ssize_t n, long long offset, long long limit,
            direct_t *d)
{
    if (d->align)
        limit -= limit % (long long)d->align;
    if (limit <= 0)
        return 0;
    Py_ssize_t k = 0;
    long long left = limit;
    while (k < n && (long long)iov[k].iov_len < left) {
        left -= (long long)iov[k].iov_len;
        k++;
    }
    if (k == n)
        return one_batch(write, fd, iov, n, offset, d);
    size_t keep = iov[k].iov_len;
    iov[k].iov_len = (size_t)left;
    long long got = one_batch(write, fd, iov, k + 1, offset, d);
    iov[k].iov_len = keep;
    return got;
}

#define MAX_DEPTH 64

/* One call's batches, shared by the threads that run them. */
typedef struct {
    int write;
    Py_ssize_t nb;
    const int *fd;
    const long long *off;
    const Py_ssize_t *cnt;
    const Py_ssize_t *first; /* index of each batch's first buffer */
    const long long *plan;
    struct iovec *iov;
    long long *res;
    size_t align;
    Py_ssize_t next; /* the next batch to start (atomic) */
} work_t;

static void
run_batches(work_t *w)
{
    direct_t direct = {w->align, NULL};
    for (;;) {
        Py_ssize_t i = __atomic_fetch_add(&w->next, 1, __ATOMIC_RELAXED);
        if (i >= w->nb)
            break;
        struct iovec *iov = w->iov + w->first[i];
        if (w->plan[i] < 0)
            w->res[i] = w->plan[i];
        else if (w->plan[i] > 0)
            w->res[i] = short_batch(w->write, w->fd[i], iov, w->cnt[i], w->off[i], w->plan[i],
                                    &direct);
        else
            w->res[i] = one_batch(w->write, w->fd[i], iov, w->cnt[i], w->off[i], &direct);
    }
    free(direct.bounce);
}

static void *
helper(void *arg)
{
    run_batches(arg);
    return NULL;
}

static PyObject *
vectored(PyObject *Py_UNUSED(module), PyObject *args)
{
    int write;
    PyObject *fds, *offsets, *counts, *bufs, *faults = Py_None;
    Py_ssize_t align = 0, depth = 1;
    if (!PyArg_ParseTuple(args, "pO!O!O!O!|Onn", &write, &PyList_Type, &fds, &PyList_Type,
                          &offsets, &PyList_Type, &counts, &PyList_Type, &bufs, &faults, &align,
                          &depth))
        return NULL;
    if (align < 0) {
        PyErr_SetString(PyExc_ValueError, "align must be 0 (buffered) or positive");
        return NULL;
    }
    if (depth < 1 || depth > MAX_DEPTH) {
        PyErr_Format(PyExc_ValueError, "depth must be in 1..%d", MAX_DEPTH);
        return NULL;
    }
    Py_ssize_t nb = PyList_GET_SIZE(fds), nbuf = PyList_GET_SIZE(bufs);
    if (PyList_GET_SIZE(offsets) != nb || PyList_GET_SIZE(counts) != nb) {
        PyErr_SetString(PyExc_ValueError, "fds, offsets and counts differ in length");
        return NULL;
    }
    if (faults != Py_None && (!PyList_Check(faults) || PyList_GET_SIZE(faults) != nb)) {
        PyErr_SetString(PyExc_ValueError, "faults must be None or one int per batch");
        return NULL;
    }
    int *fd = PyMem_Malloc((size_t)(nb ? nb : 1) * sizeof(int));
    long long *off = PyMem_Malloc((size_t)(nb ? nb : 1) * sizeof(long long));
    Py_ssize_t *cnt = PyMem_Malloc((size_t)(nb ? nb : 1) * sizeof(Py_ssize_t));
    long long *res = PyMem_Malloc((size_t)(nb ? nb : 1) * sizeof(long long));
    long long *plan = PyMem_Calloc((size_t)(nb ? nb : 1), sizeof(long long));
    Py_ssize_t *first = PyMem_Malloc((size_t)(nb ? nb : 1) * sizeof(Py_ssize_t));
    Py_buffer *views = PyMem_Calloc((size_t)(nbuf ? nbuf : 1), sizeof(Py_buffer));
    struct iovec *iov = PyMem_Malloc((size_t)(nbuf ? nbuf : 1) * sizeof(struct iovec));
    Py_ssize_t held = 0;
    PyObject *out = NULL;
    if (!fd || !off || !cnt || !res || !plan || !first || !views || !iov) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < nb; i++) {
        fd[i] = (int)PyLong_AsLong(PyList_GET_ITEM(fds, i));
        off[i] = PyLong_AsLongLong(PyList_GET_ITEM(offsets, i));
        cnt[i] = PyLong_AsSsize_t(PyList_GET_ITEM(counts, i));
        if (faults != Py_None)
            plan[i] = PyLong_AsLongLong(PyList_GET_ITEM(faults, i));
        if (PyErr_Occurred())
            goto done;
        if (cnt[i] < 0 || off[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "negative count or offset");
            goto done;
        }
        first[i] = total;
        total += cnt[i];
    }
    if (total != nbuf) {
        PyErr_SetString(PyExc_ValueError, "counts do not add up to the buffers given");
        goto done;
    }
    for (; held < nbuf; held++) {
        int flags = write ? PyBUF_SIMPLE : PyBUF_WRITABLE;
        if (PyObject_GetBuffer(PyList_GET_ITEM(bufs, held), &views[held], flags) < 0)
            goto done;
        iov[held].iov_base = views[held].buf;
        iov[held].iov_len = (size_t)views[held].len;
    }
    /* The buffers stay pinned (their exports held) while the GIL is released. */
    work_t work = {write, nb, fd, off, cnt, first, plan, iov, res, (size_t)align, 0};
    Py_BEGIN_ALLOW_THREADS
    pthread_t threads[MAX_DEPTH];
    int started = 0;
    for (Py_ssize_t t = 1; t < depth && t < nb; t++) {
        if (pthread_create(&threads[started], NULL, helper, &work) != 0)
            break; /* fewer in flight: the batches still all run */
        started++;
    }
    run_batches(&work);
    for (int t = 0; t < started; t++)
        pthread_join(threads[t], NULL);
    Py_END_ALLOW_THREADS
    out = PyList_New(nb);
    if (out == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < nb; i++) {
        PyObject *v = PyLong_FromLongLong(res[i]);
        if (v == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, v);
    }
done:
    for (Py_ssize_t k = 0; k < held; k++)
        PyBuffer_Release(&views[k]);
    PyMem_Free(fd);
    PyMem_Free(off);
    PyMem_Free(cnt);
    PyMem_Free(res);
    PyMem_Free(plan);
    PyMem_Free(first);
    PyMem_Free(views);
    PyMem_Free(iov);
    return out;
}

static PyMethodDef methods[] = {
    {"vectored", (PyCFunction)vectored, METH_VARARGS,
     "vectored(write, fds, offsets, counts, buffers, faults=None, align=0, depth=1) -> bytes done "
     "(or -errno) "
     "per batch"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvactors._io_core",
    "Many vectored file reads or writes in one call, with the GIL released.", -1, methods,
};

PyMODINIT_FUNC
PyInit__io_core(void)
{
    return PyModule_Create(&module);
}
