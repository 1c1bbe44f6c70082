/* tensorbridge._tbcore.Loop as Python sees it: records in, replies out (see tb_loop.c).
 *
 * Records reach the handler as tuples:
 *   (0, cid, seq, request_id, arrived, timeout_us, model, version, key, out_offset,
 *    out_capacity, ((name, dtype_code, shape, offset, count), ...))   a fast INFER
 *   (1, cid, seq, header, body, arrived)                                 any other frame
 *   (2, cid, seq, header)                                                a bad header
 *   (3, cid)                                                             closed by the peer
 * INFER_OK replies are encoded here (reply_ok); every other reply comes encoded (reply). */
#include "tb_loop.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>

#define INFER_OK 0x84
#define ALIGN 64

static void wr16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8); }
static void wr32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void wr64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static PyObject *fast_tuple(const tb_record *r, const tb_header *h, tb_infer *q, double at) {
    const uint8_t *body = tb_record_frame(r) + TB_HEADER_SIZE;
    if (tb_parse_infer(body, h->body_len, q) != TB_OK) { /* parsed before: cannot happen */
        PyErr_SetString(PyExc_RuntimeError, "fast record no longer parses");
        return NULL;
    }
    PyObject *inputs = PyTuple_New(q->n_inputs);
    if (inputs == NULL) return NULL;
    for (uint8_t i = 0; i < q->n_inputs; i++) {
        const tb_tensor *t = &q->inputs[i];
        PyObject *shape = PyTuple_New(t->ndim);
        if (shape == NULL) goto fail;
        for (uint8_t k = 0; k < t->ndim; k++) {
            PyObject *d = PyLong_FromUnsignedLongLong(t->shape[k]);
            if (d == NULL) {
                Py_DECREF(shape);
                goto fail;
            }
            PyTuple_SET_ITEM(shape, k, d);
        }
        PyObject *it = Py_BuildValue("(s#iNKK)", (const char *)t->name, (Py_ssize_t)t->name_len,
                                     t->dtype, shape, (unsigned long long)t->offset,
                                     (unsigned long long)t->count);
        if (it == NULL) goto fail;
        PyTuple_SET_ITEM(inputs, i, it);
    }
    PyObject *version = q->version ? PyLong_FromUnsignedLong(q->version) : Py_NewRef(Py_None);
    PyObject *key = q->key ? PyBytes_FromStringAndSize((const char *)q->key, q->key_len)
                           : Py_NewRef(Py_None);
    if (version == NULL || key == NULL) {
        Py_XDECREF(version);
        Py_XDECREF(key);
        goto fail;
    }
    return Py_BuildValue("(iKKKdks#NNKKN)", TB_K_FAST, (unsigned long long)r->conn->cid,
                         (unsigned long long)r->seq, (unsigned long long)h->request_id, at,
                         (unsigned long)q->timeout_us, (const char *)q->model,
                         (Py_ssize_t)q->model_len, version, key,
                         (unsigned long long)q->out_offset, (unsigned long long)q->out_capacity,
                         inputs);
fail:
    Py_DECREF(inputs);
    return NULL;
}

PyObject *tb_records_to_list(const tb_record *records, size_t n, tb_infer *scratch,
                             double arrived) {
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (list == NULL) return NULL;
    for (size_t i = 0; i < n; i++) {
        const tb_record *r = &records[i];
        const char *frame = (const char *)tb_record_frame(r);
        unsigned long long cid = r->conn->cid, seq = r->seq;
        PyObject *item = NULL;
        tb_header h;
        switch (r->kind) {
        case TB_K_FAST:
            tb_parse_header((const uint8_t *)frame, TB_HEADER_SIZE, &h);
            item = fast_tuple(r, &h, scratch, arrived);
            break;
        case TB_K_FRAME:
            item = Py_BuildValue("(iKKy#y#d)", TB_K_FRAME, cid, seq, frame,
                                 (Py_ssize_t)TB_HEADER_SIZE, frame + TB_HEADER_SIZE,
                                 (Py_ssize_t)(r->len - TB_HEADER_SIZE), arrived);
            break;
        case TB_K_BAD:
            item = Py_BuildValue("(iKKy#)", TB_K_BAD, cid, seq, frame,
                                 (Py_ssize_t)TB_HEADER_SIZE);
            break;
        default:
            item = Py_BuildValue("(iK)", TB_K_CLOSED, cid);
        }
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    return list;
}

static int Loop_init(LoopObject *self, PyObject *args, PyObject *kwds) {
    static char *kw[] = {"handler", NULL};
    PyObject *handler;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", kw, &handler)) return -1;
    if (self->handler != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Loop already initialised");
        return -1;
    }
    self->ep = self->stopfd = -1;
    int err = tb_loop_init(self);
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->handler = Py_NewRef(handler);
    return 0;
}

static void Loop_dealloc(LoopObject *self) {
    if (self->handler != NULL) tb_loop_free(self);
    Py_XDECREF(self->handler);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Loop_add(LoopObject *self, PyObject *arg) {
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    uint64_t cid;
    int err = tb_loop_add(self, (int)fd, &cid);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromUnsignedLongLong(cid);
}

static PyObject *Loop_start(LoopObject *self, PyObject *arg) {
    unsigned long long cid = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    int err = tb_loop_start(self, cid);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *Loop_set_region(LoopObject *self, PyObject *args) {
    unsigned long long cid, size;
    int memfd, use_crc;
    if (!PyArg_ParseTuple(args, "KiKp", &cid, &memfd, &size, &use_crc)) return NULL;
    tb_conn *c = tb_loop_lookup(self, cid);
    if (c == NULL) Py_RETURN_NONE;
    pthread_mutex_lock(&c->mu);
    int err = c->closed ? 0 : tb_conn_map_locked(c, memfd, size, use_crc);
    pthread_mutex_unlock(&c->mu);
    tb_conn_put(c);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *Loop_reply(LoopObject *self, PyObject *args) {
    unsigned long long cid, seq;
    Py_buffer frame;
    int fd = -1, hangup = 0;
    if (!PyArg_ParseTuple(args, "KKy*|ip", &cid, &seq, &frame, &fd, &hangup)) return NULL;
    tb_conn *c = tb_loop_lookup(self, cid);
    if (c == NULL) {
        PyBuffer_Release(&frame);
        Py_RETURN_FALSE;
    }
    uint8_t *data = malloc(frame.len ? (size_t)frame.len : 1);
    int dup_fd = fd >= 0 ? fcntl(fd, F_DUPFD_CLOEXEC, 0) : -1;
    if (data == NULL || (fd >= 0 && dup_fd < 0)) {
        free(data);
        PyBuffer_Release(&frame);
        tb_conn_put(c);
        return PyErr_NoMemory();
    }
    memcpy(data, frame.buf, (size_t)frame.len);
    size_t len = (size_t)frame.len;
    PyBuffer_Release(&frame);
    int closed = tb_loop_deliver(self, c, seq, data, len, dup_fd, hangup, 1);
    tb_conn_put(c);
    return PyBool_FromLong(closed);
}

typedef struct {
    Py_buffer view;
    const char *name;
    Py_ssize_t name_len;
    int code;
    uint64_t offset;
    int inline_;
} out_desc;

/* reply_ok(cid, seq, request_id, out_offset, out_capacity, [(name, dtype_code, array)],
 *          queue_us, compute_us, preprocess_us, batch_size, version) -> -1 | 0 | 1 */
static PyObject *Loop_reply_ok(LoopObject *self, PyObject *args) {
    unsigned long long cid, seq, rid, out_offset, out_capacity;
    unsigned long queue_us, compute_us, pre_us, batch, version;
    PyObject *outputs;
    if (!PyArg_ParseTuple(args, "KKKKKO!kkkkk", &cid, &seq, &rid, &out_offset, &out_capacity,
                          &PyList_Type, &outputs, &queue_us, &compute_us, &pre_us, &batch,
                          &version))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(outputs);
    if (n > 0xFFFF) return PyLong_FromLong(-1);
    tb_conn *c = tb_loop_lookup(self, cid);
    if (c == NULL) return PyLong_FromLong(0); /* closed meanwhile: nobody to answer */
    out_desc *d = PyMem_Calloc(n ? (size_t)n : 1, sizeof *d);
    Py_ssize_t got = 0;
    long result = -1;
    if (d == NULL) goto done;
    uint64_t end = out_offset + out_capacity, cursor = out_offset, inline_len = 0;
    size_t body = 20, region_bytes = 0;
    for (; got < n; got++) {
        PyObject *item = PyList_GET_ITEM(outputs, got);
        PyObject *array;
        if (!PyArg_ParseTuple(item, "s#iO", &d[got].name, &d[got].name_len, &d[got].code,
                              &array))
            goto done;
        int itemsize = d[got].code >= 0 && d[got].code < 256 ? tb_itemsize((uint8_t)d[got].code)
                                                              : -1;
        if (itemsize <= 0 || d[got].code == TB_DTYPE_BF16 || d[got].name_len == 0 ||
            d[got].name_len > TB_MAX_NAME)
            goto done;
        if (PyObject_GetBuffer(array, &d[got].view, PyBUF_C_CONTIGUOUS) < 0) {
            PyErr_Clear();
            goto done;
        }
        Py_buffer *v = &d[got].view;
        if (v->ndim > TB_MAX_DIMS || v->itemsize != itemsize) {
            PyBuffer_Release(v);
            goto done;
        }
        uint64_t nbytes = (uint64_t)v->len;
        uint64_t off = (cursor + ALIGN - 1) / ALIGN * ALIGN;
        if (c->map && out_capacity && off <= end && nbytes <= end - off) {
            d[got].offset = off;
            cursor = off + nbytes;
            region_bytes += nbytes;
        } else {
            d[got].inline_ = 1;
            d[got].offset = inline_len;
            inline_len += nbytes;
            if (inline_len > TB_MAX_BODY - 4096) {
                got++;
                goto done; /* the Python path answers PAYLOAD_TOO_LARGE with its message */
            }
        }
        body += 32 + 8 * (size_t)v->ndim + (size_t)d[got].name_len;
    }
    body += inline_len;
    uint8_t *frame = malloc(TB_HEADER_SIZE + body);
    if (frame == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    wr32(frame, TB_MAGIC);
    frame[4] = TB_VERSION;
    frame[5] = INFER_OK;
    wr16(frame + 6, 0);
    wr64(frame + 8, rid);
    wr32(frame + 16, (uint32_t)body);
    wr32(frame + 20, 0);
    uint8_t *p = frame + TB_HEADER_SIZE;
    wr16(p, (uint16_t)n);
    wr16(p + 2, (uint16_t)(batch > 0xFFFF ? 0xFFFF : batch));
    wr32(p + 4, (uint32_t)queue_us);
    wr32(p + 8, (uint32_t)compute_us);
    wr32(p + 12, (uint32_t)pre_us);
    wr32(p + 16, (uint32_t)version);
    p += 20;
    uint8_t *inl = frame + TB_HEADER_SIZE + body - inline_len;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_buffer *v = &d[i].view;
        memset(p, 0, 32);
        p[0] = (uint8_t)d[i].code;
        p[1] = (uint8_t)v->ndim;
        p[2] = d[i].inline_ ? TB_LOCATION_INLINE : TB_LOCATION_REGION;
        wr16(p + 4, (uint16_t)d[i].name_len);
        wr64(p + 8, d[i].offset);
        wr64(p + 16, (uint64_t)v->len);
        p += 32;
        for (int k = 0; k < v->ndim; k++, p += 8) wr64(p, (uint64_t)v->shape[k]);
        memcpy(p, d[i].name, (size_t)d[i].name_len);
        p += d[i].name_len;
        if (d[i].inline_) memcpy(inl + d[i].offset, v->buf, (size_t)v->len);
    }
    /* Outputs into the region: the mapping stays while this request is pending. Large
     * copies run without the GIL (the buffers stay exported until released below). */
    PyThreadState *save = region_bytes > (1 << 16) ? PyEval_SaveThread() : NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        if (!d[i].inline_ && d[i].view.len)
            memmove(c->map + d[i].offset, d[i].view.buf, (size_t)d[i].view.len);
    if (save) PyEval_RestoreThread(save);
    result = tb_loop_deliver(self, c, seq, frame, TB_HEADER_SIZE + body, -1, 0, 1);
done:
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&d[i].view);
    PyMem_Free(d);
    tb_conn_put(c);
    if (PyErr_Occurred()) return NULL;
    return PyLong_FromLong(result);
}

static PyObject *Loop_close(LoopObject *self, PyObject *arg) {
    unsigned long long cid = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    return PyBool_FromLong(tb_loop_close(self, cid));
}

static PyObject *Loop_pending(LoopObject *self, PyObject *arg) {
    unsigned long long cid = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    tb_conn *c = tb_loop_lookup(self, cid);
    if (c == NULL) return PyLong_FromLong(0);
    pthread_mutex_lock(&c->mu);
    int pending = c->closed ? 0 : c->pending;
    pthread_mutex_unlock(&c->mu);
    tb_conn_put(c);
    return PyLong_FromLong(pending);
}

static PyObject *Loop_stop(LoopObject *self, PyObject *unused) {
    (void)unused;
    tb_loop_stop(self);
    Py_RETURN_NONE;
}

static PyObject *Loop_run(LoopObject *self, PyObject *unused) { return tb_loop_run(self, unused); }

static PyMethodDef loop_methods[] = {
    {"add", (PyCFunction)Loop_add, METH_O,
     "Adopt a connected socket (its fd, closed by the loop from now on); its id."},
    {"start", (PyCFunction)Loop_start, METH_O, "Start serving a connection's frames."},
    {"set_region", (PyCFunction)Loop_set_region, METH_VARARGS,
     "(cid, memfd, size, use_crc): map the connection's region."},
    {"reply", (PyCFunction)Loop_reply, METH_VARARGS,
     "(cid, seq, frame, fd=-1, hangup=False): send a reply in order; True if now closed."},
    {"reply_ok", (PyCFunction)Loop_reply_ok, METH_VARARGS,
     "Place outputs and send INFER_OK: 1 closed, 0 sent, -1 not here (use the Python path)."},
    {"close", (PyCFunction)Loop_close, METH_O, "Close a connection; True if it was open."},
    {"pending", (PyCFunction)Loop_pending, METH_O, "Frames of a connection not answered."},
    {"run", (PyCFunction)Loop_run, METH_NOARGS, "Serve events until stop()."},
    {"stop", (PyCFunction)Loop_stop, METH_NOARGS, "Make every run() return."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject LoopType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tensorbridge._tbcore.Loop",
    .tp_basicsize = sizeof(LoopObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The compiled event loop of the established connections.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Loop_init,
    .tp_dealloc = (destructor)Loop_dealloc,
    .tp_methods = loop_methods,
};
