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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <sys/uio.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

/* One batch: all its buffers, IOV_MAX at a time; stops at a short transfer. */
static long long
one_batch(int write, int fd, struct iovec *iov, Py_ssize_t n, long long offset)
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

/* A batch limited to its first `limit` bytes (limit > 0), as an injected short call. */
static long long
short_batch(int write, int fd, struct iovec *iov, Py_ssize_t n, long long offset, long long limit)
{
    Py_ssize_t k = 0;
    long long left = limit;
    while (k < n && (long long)iov[k].iov_len < left) {
        left -= (long long)iov[k].iov_len;
        k++;
    }
    if (k == n)
        return one_batch(write, fd, iov, n, offset);
    size_t keep = iov[k].iov_len;
    iov[k].iov_len = (size_t)left;
    long long got = one_batch(write, fd, iov, k + 1, offset);
    iov[k].iov_len = keep;
    return got;
}

static PyObject *
vectored(PyObject *Py_UNUSED(module), PyObject *args)
{
    int write;
    PyObject *fds, *offsets, *counts, *bufs, *faults = Py_None;
    if (!PyArg_ParseTuple(args, "pO!O!O!O!|O", &write, &PyList_Type, &fds, &PyList_Type, &offsets,
                          &PyList_Type, &counts, &PyList_Type, &bufs, &faults))
        return NULL;
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
    Py_buffer *views = PyMem_Calloc((size_t)(nbuf ? nbuf : 1), sizeof(Py_buffer));
    struct iovec *iov = PyMem_Malloc((size_t)(nbuf ? nbuf : 1) * sizeof(struct iovec));
    Py_ssize_t held = 0;
    PyObject *out = NULL;
    if (!fd || !off || !cnt || !res || !plan || !views || !iov) {
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
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t at = 0;
    for (Py_ssize_t i = 0; i < nb; i++) {
        if (plan[i] < 0)
            res[i] = plan[i];
        else if (plan[i] > 0)
            res[i] = short_batch(write, fd[i], iov + at, cnt[i], off[i], plan[i]);
        else
            res[i] = one_batch(write, fd[i], iov + at, cnt[i], off[i]);
        at += cnt[i];
    }
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
    PyMem_Free(views);
    PyMem_Free(iov);
    return out;
}

static PyMethodDef methods[] = {
    {"vectored", (PyCFunction)vectored, METH_VARARGS,
     "vectored(write, fds, offsets, counts, buffers, faults=None) -> bytes done (or -errno) "
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
