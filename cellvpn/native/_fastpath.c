/* cellvpn's native fast path: the stream's per-frame loops (frames.h) for CPython.
 *
 * scan_frames is FrameReader.feed's loop and pack_data is StreamConnection.send_data_packets'
 * loop, with the same results byte for byte (tests/native holds the differential tests); the
 * Python code around them keeps every decision that is not per frame. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "frames.h"

typedef struct {
    PyObject *frames; /* list of (type, memoryview) */
    PyObject *view;   /* memoryview of the whole buffer, sliced per frame */
} scan_ctx;

static int scan_one(void *arg, unsigned type, size_t start, size_t stop)
{
    scan_ctx *ctx = arg;
    PyObject *lo = PyLong_FromSize_t(start), *hi = PyLong_FromSize_t(stop);
    if (lo == NULL || hi == NULL) {
        Py_XDECREF(lo);
        Py_XDECREF(hi);
        return 1;
    }
    PyObject *slice = PySlice_New(lo, hi, NULL);
    Py_DECREF(lo);
    Py_DECREF(hi);
    if (slice == NULL)
        return 1;
    PyObject *payload = PyObject_GetItem(ctx->view, slice);
    Py_DECREF(slice);
    if (payload == NULL)
        return 1;
    PyObject *item = Py_BuildValue("(IN)", type, payload);
    if (item == NULL)
        return 1;
    int failed = PyList_Append(ctx->frames, item);
    Py_DECREF(item);
    return failed;
}

PyDoc_STRVAR(scan_frames_doc,
"scan_frames(view, pos, max_payload) -> (frames, pos, need, bad)\n\n"
"The whole frames in view[pos:] as (type, payload view) pairs; the first byte not consumed;\n"
"the bytes from there the next frame needs; and 1 if the header there is wrong.");

static PyObject *scan_frames(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *view;
    Py_ssize_t pos;
    unsigned long long max_payload;
    if (!PyArg_ParseTuple(args, "O!nK:scan_frames", &PyMemoryView_Type, &view, &pos,
                          &max_payload))
        return NULL;
    Py_buffer buf;
    if (PyObject_GetBuffer(view, &buf, PyBUF_SIMPLE) != 0)
        return NULL;
    if (pos < 0 || pos > buf.len) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "scan_frames: pos outside the buffer");
        return NULL;
    }
    scan_ctx ctx = {PyList_New(0), view};
    if (ctx.frames == NULL) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    cvpn_scan_result result;
    int stopped = cvpn_scan(buf.buf, (size_t)pos, (size_t)buf.len, max_payload, scan_one, &ctx,
                            &result);
    PyBuffer_Release(&buf);
    if (stopped) {
        Py_DECREF(ctx.frames);
        return NULL;
    }
    return Py_BuildValue("(Nnni)", ctx.frames, (Py_ssize_t)result.pos, (Py_ssize_t)result.need,
                         result.bad);
}

/* An unsigned int argument no larger than `limit` (struct's own range check, as pack does). */
static int get_field(PyObject *obj, unsigned long long limit, unsigned long long *out)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (v > limit) {
        PyErr_SetString(PyExc_OverflowError, "pack_data: a field is out of its range");
        return -1;
    }
    *out = v;
    return 0;
}

PyDoc_STRVAR(pack_data_doc,
"pack_data(out, packets, start, stamp, node, channel, ptype, seq, op, usage_id, large)\n"
"    -> (stop, count, size)\n\n"
"Append to the bytearray out the headers and bytes of packets[start:], one data packet each,\n"
"numbered from seq. It stops after the headers of the first packet of at least large bytes,\n"
"whose bytes the caller queues as they are: stop is its index (len(packets) if none), count\n"
"and size the packets headed and their bytes, that one included.");

static PyObject *pack_data(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *out, *packets, *f[7];
    Py_ssize_t start, large;
    if (!PyArg_ParseTuple(args, "O!OnOOOOOOOn:pack_data", &PyByteArray_Type, &out, &packets,
                          &start, &f[0], &f[1], &f[2], &f[3], &f[4], &f[5], &f[6], &large))
        return NULL;
    unsigned long long v[7];
    static const unsigned long long limits[7] = {UINT64_MAX, UINT64_MAX, 255, 255, UINT64_MAX,
                                                 UINT32_MAX, UINT32_MAX};
    for (int i = 0; i < 7; i++)
        if (get_field(f[i], limits[i], &v[i]) != 0)
            return NULL;
    cvpn_data_run run = {v[0], v[1], v[4], (unsigned)v[2], (unsigned)v[3], (uint32_t)v[5],
                         (uint32_t)v[6]};
    PyObject *seq = PySequence_Fast(packets, "pack_data: packets must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    if (start < 0)
        start = 0;
    Py_ssize_t count = 0, total = 0, i = start;
    for (; i < n; i++) {
        Py_buffer pkt;
        if (PyObject_GetBuffer(items[i], &pkt, PyBUF_SIMPLE) != 0)
            goto fail;
        Py_ssize_t size = pkt.len;
        int is_large = size >= large;
        Py_ssize_t old = PyByteArray_GET_SIZE(out);
        Py_ssize_t grow = CVPN_DATA_HEADERS + (is_large ? 0 : size);
        if (PyByteArray_Resize(out, old + grow) != 0) {
            PyBuffer_Release(&pkt);
            goto fail;
        }
        unsigned char *dst = (unsigned char *)PyByteArray_AS_STRING(out) + old;
        if (cvpn_data_headers(dst, &run, (uint64_t)count, (uint64_t)size) != 0) {
            PyByteArray_Resize(out, old);
            PyBuffer_Release(&pkt);
            PyErr_SetString(PyExc_OverflowError, "pack_data: a packet too large for a frame");
            goto fail;
        }
        if (!is_large)
            memcpy(dst + CVPN_DATA_HEADERS, pkt.buf, (size_t)size);
        PyBuffer_Release(&pkt);
        count++;
        total += size;
        if (is_large)
            break;
    }
    Py_DECREF(seq);
    return Py_BuildValue("(nnn)", i, count, total);
fail:
    Py_DECREF(seq);
    return NULL;
}

static PyMethodDef methods[] = {
    {"scan_frames", scan_frames, METH_VARARGS, scan_frames_doc},
    {"pack_data", pack_data, METH_VARARGS, pack_data_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "cellvpn.native._fastpath",
    "The stream's per-frame loops in C (see frames.h).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    return PyModule_Create(&module);
}
