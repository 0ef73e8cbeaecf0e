/* cellvpn's native fast path: the stream's per-frame loops (frames.h) for CPython.
 *
 * scan_frames is FrameReader.feed's loop and pack_data is StreamConnection.send_data_packets'
 * loop, with the same results byte for byte (tests/native holds the differential tests); the
 * Python code around them keeps every decision that is not per frame. pump_up carries a
 * session's VPN_SEND packets to the TUN (cvpn_pump_up) and hands the rest back. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <sys/uio.h>
#include <unistd.h>

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


typedef struct {
    int fd;
    int vnet; /* the TUN takes a vnet header before each packet: an all-zero one */
} pump_ctx;

static const unsigned char plain_vnet[10];

static int pump_write(void *arg, const unsigned char *vnet, const unsigned char *pkt, size_t size,
                      size_t *written)
{
    pump_ctx *ctx = arg;
    ssize_t n;
    do {
        if (ctx->vnet) {
            struct iovec iov[2] = {{(void *)(vnet ? vnet : plain_vnet), sizeof plain_vnet},
                                   {(void *)pkt, size}};
            n = writev(ctx->fd, iov, 2);
        } else {
            n = write(ctx->fd, pkt, size);
        }
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return 1;
    *written = (size_t)n;
    return 0;
}

PyDoc_STRVAR(pump_up_doc,
"pump_up(view, pos, max_payload, fd, vnet, lease, keep, hosts, host_udp, host_flags,\n"
"        seq_next, allowance, channel, op, op_gso) -> (pos, packets, ip_bytes, written)\n\n"
"Write to the TUN fd the VPN_SEND packets (and VPN_SEND_GSO ones if op_gso is not 0) of the\n"
"data frames at the start of view[pos:] (frames.h says which), each as one write (after a\n"
"vnet header if vnet). lease is the\n"
"4-byte source every packet must have; keep holds up to 16 (address, mask) pairs of 4 bytes\n"
"each, destinations left to Python; hosts up to 16 host addresses of 4 bytes, host_udp up to\n"
"16 UDP ports of 2 bytes (big-endian) that to_host lets reach them, host_flags 1 for echo\n"
"requests and 2 for everything. Returns the first byte not carried, the packets and their\n"
"IP bytes, and the bytes written.");

static PyObject *pump_up(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *view;
    Py_ssize_t pos;
    unsigned long long max_payload, seq_next;
    int fd, vnet;
    Py_buffer lease, keep, hosts, udp;
    unsigned host_flags, channel, op, op_gso;
    long long allowance;
    if (!PyArg_ParseTuple(args, "O!nKipy*y*y*y*IKLIII:pump_up", &PyMemoryView_Type, &view, &pos,
                          &max_payload, &fd, &vnet, &lease, &keep, &hosts, &udp, &host_flags,
                          &seq_next, &allowance, &channel, &op, &op_gso))
        return NULL;
    PyObject *result = NULL;
    cvpn_pump_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    if (fd < 0 || channel > 255) {
        PyErr_SetString(PyExc_ValueError, "pump_up: fd or channel out of range");
        goto done;
    }
    if (lease.len != 4 || keep.len % 8 || keep.len > 8 * CVPN_MAX_KEEP) {
        PyErr_SetString(PyExc_ValueError,
                        "pump_up: lease must be 4 bytes, keep at most 16 pairs of 8");
        goto done;
    }
    if (hosts.len % 4 || hosts.len > 4 * CVPN_MAX_HOSTS || udp.len % 2 ||
        udp.len > 2 * CVPN_MAX_HOSTS || host_flags > 3) {
        PyErr_SetString(PyExc_ValueError,
                        "pump_up: hosts at most 16 addresses of 4 bytes, host_udp at most 16 "
                        "ports of 2, host_flags 0 to 3");
        goto done;
    }
    cfg.channel = channel;
    cfg.op = op;
    cfg.op_gso = op_gso;
    cfg.vnet = vnet;
    cfg.seq_next = seq_next;
    cfg.allowance = allowance;
    cfg.lease = cvpn_get32(lease.buf);
    const unsigned char *k = keep.buf, *hs = hosts.buf, *u = udp.buf;
    cfg.n_keep = (size_t)keep.len / 8;
    for (size_t i = 0; i < cfg.n_keep; i++) {
        cfg.keep_mask[i] = cvpn_get32(k + 8 * i + 4);
        cfg.keep_addr[i] = cvpn_get32(k + 8 * i) & cfg.keep_mask[i];
    }
    cfg.n_host = (size_t)hosts.len / 4;
    for (size_t i = 0; i < cfg.n_host; i++)
        cfg.host_addr[i] = cvpn_get32(hs + 4 * i);
    cfg.n_host_udp = (size_t)udp.len / 2;
    for (size_t i = 0; i < cfg.n_host_udp; i++)
        cfg.host_udp[i] = (uint16_t)(u[2 * i] << 8 | u[2 * i + 1]);
    cfg.host_flags = host_flags;
    Py_buffer buf;
    if (PyObject_GetBuffer(view, &buf, PyBUF_SIMPLE) != 0)
        goto done;
    if (pos < 0 || pos > buf.len) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "pump_up: pos outside the buffer");
        goto done;
    }
    pump_ctx ctx = {fd, vnet};
    cvpn_pump_result r;
    cvpn_pump_up(buf.buf, (size_t)pos, (size_t)buf.len, max_payload, &cfg, pump_write, &ctx, &r);
    PyBuffer_Release(&buf);
    result = Py_BuildValue("(nKKK)", (Py_ssize_t)r.pos, (unsigned long long)r.packets,
                           (unsigned long long)r.ip_bytes, (unsigned long long)r.written);
done:
    PyBuffer_Release(&lease);
    PyBuffer_Release(&keep);
    PyBuffer_Release(&hosts);
    PyBuffer_Release(&udp);
    return result;
}

static PyMethodDef methods[] = {
    {"scan_frames", scan_frames, METH_VARARGS, scan_frames_doc},
    {"pack_data", pack_data, METH_VARARGS, pack_data_doc},
    {"pump_up", pump_up, METH_VARARGS, pump_up_doc},
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
