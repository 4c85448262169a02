/* kvactors._key_checks: the async API's argument checks, one C pass each.
 * Python fallbacks and the typed errors: kvactors/keys.py. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* first_bad_key(keys) -> -1 when every key is exactly int or bytes and none is
 * named twice, else the index of the first key that is not. Only exact
 * int/bytes are hashed, so no Python code runs while the items are used. */
static PyObject *
first_bad_key(PyObject *Py_UNUSED(module), PyObject *arg)
{
    PyObject *seq = PySequence_Tuple(arg);
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    Py_ssize_t bad = -1;
    PyObject *seen = NULL;
    for (Py_ssize_t k = 0; k < n && bad < 0; k++) {
        PyObject *key = PyTuple_GET_ITEM(seq, k);
        if (!PyLong_CheckExact(key) && !PyBytes_CheckExact(key))
            bad = k;
    }
    if (bad < 0 && n > 1) {
        seen = PySet_New(NULL);
        if (seen == NULL)
            goto fail;
        for (Py_ssize_t k = 0; k < n; k++) {
            PyObject *key = PyTuple_GET_ITEM(seq, k);
            int had = PySet_Contains(seen, key);
            if (had < 0 || (!had && PySet_Add(seen, key) < 0))
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
    PyModuleDef_HEAD_INIT, "kvactors._key_checks",
    "The async API's key and slot-id checks, in C.", -1, module_methods,
};

PyMODINIT_FUNC
PyInit__key_checks(void)
{
    return PyModule_Create(&module);
}
