/* tensorbridge._tbcore: the C frame parser (tb_frame.c) as a CPython extension.
 *
 * Each function returns plain tuples for a valid frame and None for a rejected one; the
 * Python decoder (_wire.py) then raises the ProtocolError with its message. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "tb_frame.h"
#include "tb_loop.h"

static PyObject *parse_header(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    tb_header h;
    int rc = tb_parse_header(view.buf, (size_t)view.len, &h);
    PyBuffer_Release(&view);
    if (rc != TB_OK) Py_RETURN_NONE;
    return Py_BuildValue("(iiKkk)", h.type, h.flags, (unsigned long long)h.request_id,
                         (unsigned long)h.body_len, (unsigned long)h.crc);
}

static PyObject *tensor_tuple(const tb_tensor *t) {
    PyObject *shape = PyTuple_New(t->ndim);
    if (shape == NULL) return NULL;
    for (uint8_t k = 0; k < t->ndim; k++) {
        PyObject *dim = PyLong_FromUnsignedLongLong(t->shape[k]);
        if (dim == NULL) {
            Py_DECREF(shape);
            return NULL;
        }
        PyTuple_SET_ITEM(shape, k, dim);
    }
    return Py_BuildValue("(s#iNiKKk)", (const char *)t->name, (Py_ssize_t)t->name_len,
                         t->dtype, shape, t->location, (unsigned long long)t->offset,
                         (unsigned long long)t->nbytes, (unsigned long)t->crc32c);
}

static PyObject *parse_infer(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    tb_infer *req = PyMem_Malloc(sizeof(tb_infer));
    if (req == NULL) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    PyObject *result = NULL, *inputs = NULL;
    if (tb_parse_infer(view.buf, (size_t)view.len, req) != TB_OK) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    inputs = PyList_New(req->n_inputs);
    if (inputs == NULL) goto done;
    for (uint8_t i = 0; i < req->n_inputs; i++) {
        PyObject *t = tensor_tuple(&req->inputs[i]);
        if (t == NULL) goto done;
        PyList_SET_ITEM(inputs, i, t);
    }
    PyObject *version = req->version ? PyLong_FromUnsignedLong(req->version)
                                     : Py_NewRef(Py_None);
    if (version == NULL) goto done;
    PyObject *key = req->key ? PyBytes_FromStringAndSize((const char *)req->key, req->key_len)
                             : Py_NewRef(Py_None);
    if (key == NULL) {
        Py_DECREF(version);
        goto done;
    }
    result = Py_BuildValue("(ks#KKOnNN)", (unsigned long)req->timeout_us,
                           (const char *)req->model, (Py_ssize_t)req->model_len,
                           (unsigned long long)req->out_offset,
                           (unsigned long long)req->out_capacity, inputs,
                           (Py_ssize_t)req->inline_start, version, key);
done:
    Py_XDECREF(inputs);
    PyMem_Free(req);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"parse_header", parse_header, METH_O,
     "24 header bytes -> (type, flags, request_id, body_len, crc), or None if invalid."},
    {"parse_infer", parse_infer, METH_O,
     "INFER body -> (timeout_us, model, out_offset, out_capacity, [(name, dtype_code, shape, "
     "location, offset, nbytes, crc32c)], inline_start, version, routing_key), or None if "
     "invalid."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "tensorbridge._tbcore",
    "The compiled frame parser and event loop of the TensorBridge server.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tbcore(void) {
    if (PyType_Ready(&LoopType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Loop", (PyObject *)&LoopType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
