/* The table entry that calls back into a Python CachePolicy object, so a
 * user's own policy runs on the compiled core. The core keeps the slots, ref
 * counts and key map; the object is told what enters, leaves and is used,
 * exactly as the Python manager tells it (kvactors/manager/_reference.py),
 * and keeps one BlockStatus per block whose ref_cnt the core keeps current.
 * evict's answer is checked against the contract (exactly n idle,
 * unprotected, distinct, held keys), and so is admit's, when the object has
 * one (a leading part of the new keys): PolicyError otherwise. */
#include "manager_core.h"

typedef struct {
    PyObject *block_type; /* kvactors.policy.BlockStatus */
    PyObject *m_insert, *m_insert_many, *m_remove, *m_touch, *m_evict;
    PyObject *m_admit;    /* NULL: the object decides no admission */
    int has_admit;
    PyObject **blocks;    /* per slot: the BlockStatus the object holds */
} PyPolicy;

#define PYP(core) ((PyPolicy *)(core)->pstate)

extern PyObject *KVPolicyError; /* kvactors.errors.PolicyError */

static int
pyp_init(Core *core, PyObject *options)
{
    PyObject *policy, *block_type;
    if (!PyArg_ParseTuple(options, "OO", &policy, &block_type))
        return -1;
    PyPolicy *p = PyMem_Calloc(1, sizeof(PyPolicy));
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    core->pstate = p;
    Py_INCREF(policy);
    core->policy_obj = policy;
    Py_INCREF(block_type);
    p->block_type = block_type;
    if ((p->m_insert = PyObject_GetAttrString(policy, "insert")) == NULL ||
        (p->m_insert_many = PyObject_GetAttrString(policy, "insert_many")) == NULL ||
        (p->m_remove = PyObject_GetAttrString(policy, "remove")) == NULL ||
        (p->m_touch = PyObject_GetAttrString(policy, "touch")) == NULL ||
        (p->m_evict = PyObject_GetAttrString(policy, "evict")) == NULL)
        return -1;
    /* admit is optional, looked up as the Python manager does (getattr) */
    if ((p->m_admit = PyObject_GetAttrString(policy, "admit")) == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return -1;
        PyErr_Clear();
    }
    p->has_admit = p->m_admit != NULL;
    return 0;
}

static void
pyp_clear_refs(Core *core)
{
    PyPolicy *p = PYP(core);
    Py_CLEAR(core->policy_obj);
    Py_CLEAR(p->block_type);
    Py_CLEAR(p->m_insert);
    Py_CLEAR(p->m_insert_many);
    Py_CLEAR(p->m_remove);
    Py_CLEAR(p->m_touch);
    Py_CLEAR(p->m_evict);
    Py_CLEAR(p->m_admit);
}

static void
pyp_dealloc(Core *core)
{
    PyPolicy *p = PYP(core);
    if (p == NULL)
        return;
    pyp_clear_refs(core);
    if (p->blocks != NULL)
        for (Py_ssize_t i = 0; i < core->cap; i++)
            Py_XDECREF(p->blocks[i]);
    PyMem_Free(p->blocks);
    PyMem_Free(p);
    core->pstate = NULL;
}

static int
pyp_traverse(Core *core, visitproc visit, void *arg)
{
    PyPolicy *p = PYP(core);
    if (p == NULL)
        return 0;
    Py_VISIT(core->policy_obj);
    Py_VISIT(p->block_type);
    Py_VISIT(p->m_insert);
    Py_VISIT(p->m_insert_many);
    Py_VISIT(p->m_remove);
    Py_VISIT(p->m_touch);
    Py_VISIT(p->m_evict);
    Py_VISIT(p->m_admit);
    return 0;
}

static int
pyp_grow(Core *core, Py_ssize_t old_cap, Py_ssize_t new_cap)
{
    PyPolicy *p = PYP(core);
    GROW(p->blocks, new_cap);
    for (Py_ssize_t i = old_cap; i < new_cap; i++)
        p->blocks[i] = NULL;
    return 0;
}

static PyObject *
method(PyObject *m)
{
    if (m == NULL)
        PyErr_SetString(PyExc_RuntimeError, "the manager's policy was cleared");
    return m;
}

/* A new BlockStatus(slot, ref, size) for slot s, also kept in blocks[s]. */
static PyObject *
new_block(Core *core, int32_t s)
{
    PyPolicy *p = PYP(core);
    if (method(p->block_type) == NULL)
        return NULL;
    PyObject *block = PyObject_CallFunction(p->block_type, "iin", (int)s, (int)core->ref[s],
                                            (Py_ssize_t)core->block_size);
    if (block == NULL)
        return NULL;
    Py_XSETREF(p->blocks[s], block);
    Py_INCREF(block);
    return block;
}

static int
call_done(PyObject *result)
{
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

static int
pyp_insert(Core *core, PyObject *key, int32_t s)
{
    PyPolicy *p = PYP(core);
    if (method(p->m_insert) == NULL)
        return -1;
    PyObject *block = new_block(core, s);
    if (block == NULL)
        return -1;
    int rc = call_done(PyObject_CallFunctionObjArgs(p->m_insert, key, block, NULL));
    Py_DECREF(block);
    return rc;
}

static int
pyp_insert_many(Core *core, PyObject *const *keys, const int32_t *slots, Py_ssize_t n)
{
    PyPolicy *p = PYP(core);
    if (method(p->m_insert_many) == NULL)
        return -1;
    PyObject *items = PyList_New(n);
    if (items == NULL)
        return -1;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *block = new_block(core, slots[k]);
        if (block == NULL) {
            Py_DECREF(items);
            return -1;
        }
        PyObject *pair = PyTuple_Pack(2, keys[k], block);
        Py_DECREF(block);
        if (pair == NULL) {
            Py_DECREF(items);
            return -1;
        }
        PyList_SET_ITEM(items, k, pair);
    }
    int rc = call_done(PyObject_CallOneArg(p->m_insert_many, items));
    Py_DECREF(items);
    return rc;
}

static int
pyp_remove(Core *core, PyObject *key, int32_t s)
{
    PyPolicy *p = PYP(core);
    if (method(p->m_remove) == NULL)
        return -1;
    if (call_done(PyObject_CallOneArg(p->m_remove, key)) < 0)
        return -1;
    Py_CLEAR(p->blocks[s]);
    return 0;
}

static int
pyp_touch(Core *core, PyObject *const *keys, Py_ssize_t n)
{
    PyPolicy *p = PYP(core);
    if (method(p->m_touch) == NULL)
        return -1;
    PyObject *list = PyList_New(n);
    if (list == NULL)
        return -1;
    for (Py_ssize_t k = 0; k < n; k++) {
        Py_INCREF(keys[k]);
        PyList_SET_ITEM(list, k, keys[k]);
    }
    int rc = call_done(PyObject_CallOneArg(p->m_touch, list));
    Py_DECREF(list);
    return rc;
}

static Py_ssize_t
broken(Core *core, Py_ssize_t n, const char *what, PyObject *key)
{
    PyObject *name = core->policy_obj ? PyObject_Repr(core->policy_obj) : NULL;
    if (key != NULL)
        PyErr_Format(KVPolicyError,
                     "policy %S broke the CachePolicy contract: evict(%zd) returned %R, %s",
                     name ? name : Py_None, n, key, what);
    else
        PyErr_Format(KVPolicyError, "policy %S broke the CachePolicy contract: evict(%zd) %s",
                     name ? name : Py_None, n, what);
    Py_XDECREF(name);
    return -1;
}

static Py_ssize_t
pyp_evict(Core *core, Py_ssize_t n, uint32_t epoch, PyObject *const *call, Py_ssize_t ncall,
          int32_t *out)
{
    PyPolicy *p = PYP(core);
    if (method(p->m_evict) == NULL)
        return -1;
    PyObject *protected = PySet_New(NULL);
    if (protected == NULL)
        return -1;
    for (Py_ssize_t k = 0; k < ncall; k++)
        if (PySet_Add(protected, call[k]) < 0) {
            Py_DECREF(protected);
            return -1;
        }
    PyObject *nobj = PyLong_FromSsize_t(n);
    PyObject *res = nobj ? PyObject_CallFunctionObjArgs(p->m_evict, nobj, protected, NULL) : NULL;
    Py_XDECREF(nobj);
    Py_DECREF(protected);
    if (res == NULL)
        return -1;
    if (res == Py_None) {
        Py_DECREF(res);
        return 0;
    }
    PyObject *seq = PySequence_Tuple(res);
    Py_DECREF(res);
    if (seq == NULL)
        return -1;
    Py_ssize_t got = PyTuple_GET_SIZE(seq);
    Py_ssize_t rc = n;
    if (got != n) {
        PyObject *count = PyLong_FromSsize_t(got);
        rc = broken(core, n, "victims, not exactly n", count);
        Py_XDECREF(count);
        goto done;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *pair = PyTuple_GET_ITEM(seq, k);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            rc = broken(core, n, "not a (key, block) pair", pair);
            goto done;
        }
        PyObject *key = PyTuple_GET_ITEM(pair, 0);
        int32_t s = core_slot(core, key);
        if (s == -2) {
            rc = -1;
            goto done;
        }
        if (s < 0) {
            rc = broken(core, n, "a key the manager does not hold", key);
            goto done;
        }
        if (!core_evictable(core, s, epoch)) {
            const char *why = core->ref[s] != 0 ? "a block that is not idle (ref_cnt != 0)"
                                                : "a key that is protected or named twice";
            rc = broken(core, n, why, key);
            goto done;
        }
        core->stamp[s] = epoch; /* a second mention is caught above */
        out[k] = s;
    }
    for (Py_ssize_t k = 0; k < n; k++)
        Py_CLEAR(p->blocks[out[k]]);
done:
    Py_DECREF(seq);
    return rc;
}

/* A new list of n keys. */
static PyObject *
key_list(PyObject *const *keys, Py_ssize_t n)
{
    PyObject *list = PyList_New(n);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < n; k++) {
        Py_INCREF(keys[k]);
        PyList_SET_ITEM(list, k, keys[k]);
    }
    return list;
}

/* admit(list(call), list(fresh)): its answer must be a leading part of fresh
 * (each key the same type and value, in order), as the Python manager checks. */
static Py_ssize_t
pyp_admit(Core *core, PyObject *const *call, Py_ssize_t ncall, PyObject *const *fresh,
          Py_ssize_t m)
{
    PyPolicy *p = PYP(core);
    if (!p->has_admit)
        return m;
    if (method(p->m_admit) == NULL)
        return -1;
    PyObject *keys = key_list(call, ncall);
    PyObject *new = keys ? key_list(fresh, m) : NULL;
    PyObject *answer = new ? PyObject_CallFunctionObjArgs(p->m_admit, keys, new, NULL) : NULL;
    Py_XDECREF(keys);
    if (answer == NULL) {
        Py_XDECREF(new);
        return -1;
    }
    PyObject *admitted = PySequence_List(answer);
    Py_ssize_t n = -1;
    if (admitted == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError))
            goto done;
        PyErr_Clear();
    }
    else if (PyList_GET_SIZE(admitted) <= m) {
        n = PyList_GET_SIZE(admitted);
        for (Py_ssize_t k = 0; k < n && n >= 0; k++) {
            PyObject *a = PyList_GET_ITEM(admitted, k);
            /* fresh keys are exact int/bytes: comparing them runs no Python code */
            int same = Py_TYPE(a) == Py_TYPE(fresh[k]) ? kt_same(fresh[k], a) : 0;
            if (same < 0) {
                n = -2;
                goto done;
            }
            if (!same)
                n = -1;
        }
    }
    if (n == -1) {
        PyObject *name = PyObject_Repr(core->policy_obj);
        if (name != NULL)
            PyErr_Format(KVPolicyError,
                         "policy %U broke the CachePolicy contract: admit returned %R, not a "
                         "leading part of the new keys %R",
                         name, answer, new);
        Py_XDECREF(name);
        n = -2;
    }
done:
    Py_XDECREF(admitted);
    Py_DECREF(answer);
    Py_DECREF(new);
    return n < 0 ? -1 : n;
}

static int
pyp_ref_changed(Core *core, int32_t s)
{
    PyPolicy *p = PYP(core);
    PyObject *block = p->blocks[s];
    if (block == NULL)
        return 0;
    PyObject *v = PyLong_FromLong(core->ref[s]);
    if (v == NULL)
        return -1;
    int rc = PyObject_SetAttrString(block, "ref_cnt", v);
    Py_DECREF(v);
    return rc;
}

static PyObject *
pyp_keys(Core *core)
{
    if (method(core->policy_obj) == NULL)
        return NULL;
    PyObject *it = PyObject_CallMethod(core->policy_obj, "keys", NULL);
    if (it == NULL)
        return NULL;
    PyObject *out = PySequence_List(it);
    Py_DECREF(it);
    return out;
}

static PyObject *
pyp_state(Core *core)
{
    Py_RETURN_NONE;
}

const PolicyOps python_policy_ops = {
    .name = "python",
    .init = pyp_init,
    .dealloc = pyp_dealloc,
    .traverse = pyp_traverse,
    .grow = pyp_grow,
    .insert = pyp_insert,
    .insert_many = pyp_insert_many,
    .remove = pyp_remove,
    .touch = pyp_touch,
    .evict = pyp_evict,
    .ref_changed = pyp_ref_changed,
    .keys = pyp_keys,
    .state = pyp_state,
    .admit = pyp_admit,
};
