/* The stream frame's hot loops in plain C, with no Python in them: the reader's cut of a
 * byte stream into frames, and the writer's headers for a run of VPN data packets.
 *
 * Both the extension (_fastpath.c) and the sanitizer fuzz driver (fuzz_frames.c) include
 * this file, so what is fuzzed is what runs. The layout is cellvpn/wire/frame.py's, channel.py's
 * and vpn.py's: all little-endian, packed.
 *
 *   frame   0 signature[8]  8 size u32  12 timestamp u64  20 type u8  21 src u64  29 dst u64
 *   channel 0 id u8  1 enc u8  2 type u8  3 pad  4 seq u64  12 size u32
 *   vpn     0 sock_id i32  4 op u32  8 usage_id u32  12 size u32  16 pad[4]
 */
#ifndef CELLVPN_FRAMES_H
#define CELLVPN_FRAMES_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define CVPN_FRAME_HEADER 37
#define CVPN_CHANNEL_HEADER 16
#define CVPN_VPN_HEADER 20
#define CVPN_DATA_HEADERS (CVPN_FRAME_HEADER + CVPN_CHANNEL_HEADER + CVPN_VPN_HEADER) /* 73 */

static const unsigned char cvpn_signature[8] = {0xa0, 0x95, 0x96, 0xa9, 0x9e, 0x5c, 0xfb, 0xfa};

static inline uint32_t cvpn_get32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void cvpn_put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static inline void cvpn_put64(unsigned char *p, uint64_t v)
{
    cvpn_put32(p, (uint32_t)v);
    cvpn_put32(p + 4, (uint32_t)(v >> 32));
}

/* What a scan found. */
typedef struct {
    size_t pos;  /* first byte not consumed */
    size_t need; /* bytes from pos the next frame needs before it is whole */
    int bad;     /* 1: the header at pos has a wrong signature or too large a size */
} cvpn_scan_result;

/* Called once per whole frame: its type and where its payload lies in the buffer. Returns
 * nonzero to stop the scan (the caller ran out of memory). */
typedef int (*cvpn_frame_fn)(void *ctx, unsigned type, size_t start, size_t stop);

/* Cut buf[pos:end] into frames, as FrameReader.feed does: a header that is wrong stops the
 * scan with bad = 1 at its position; a frame that is not whole yet stops it with need set.
 * Returns nonzero when frame() asked to stop. */
static inline int cvpn_scan(const unsigned char *buf, size_t pos, size_t end,
                            uint64_t max_payload, cvpn_frame_fn frame, void *ctx,
                            cvpn_scan_result *out)
{
    out->bad = 0;
    out->need = CVPN_FRAME_HEADER;
    while (end - pos >= CVPN_FRAME_HEADER) {
        const unsigned char *h = buf + pos;
        uint64_t size = cvpn_get32(h + 8);
        if (memcmp(h, cvpn_signature, 8) != 0 || size > max_payload) {
            out->bad = 1;
            break;
        }
        /* size < 2^32 and pos <= end: no overflow on a 64-bit size_t */
        size_t stop = pos + CVPN_FRAME_HEADER + (size_t)size;
        if (stop > end) {
            out->need = stop - pos;
            break;
        }
        if (frame(ctx, h[20], pos + CVPN_FRAME_HEADER, stop) != 0) {
            out->pos = pos;
            return 1;
        }
        pos = stop;
    }
    out->pos = pos;
    return 0;
}

/* The fields every data packet of one run shares. */
typedef struct {
    uint64_t stamp;
    uint64_t node;
    uint64_t seq; /* the first packet's; each next one is +1 */
    unsigned channel;
    unsigned ptype;
    uint32_t op;
    uint32_t usage_id;
} cvpn_data_run;

/* Write the three headers of one data packet of `size` bytes (the packet itself follows them:
 * the caller copies it). `out` holds CVPN_DATA_HEADERS bytes; `index` is the packet's place in
 * the run. Returns nonzero when the sizes do not fit their fields. */
static inline int cvpn_data_headers(unsigned char *out, const cvpn_data_run *run, uint64_t index,
                                    uint64_t size)
{
    if (size > UINT32_MAX - (CVPN_CHANNEL_HEADER + CVPN_VPN_HEADER))
        return 1;
    memcpy(out, cvpn_signature, 8);
    cvpn_put32(out + 8, (uint32_t)size + CVPN_CHANNEL_HEADER + CVPN_VPN_HEADER);
    cvpn_put64(out + 12, run->stamp);
    out[20] = 0; /* FrameType.DATA */
    cvpn_put64(out + 21, run->node);
    cvpn_put64(out + 29, 0);
    unsigned char *c = out + CVPN_FRAME_HEADER;
    c[0] = (unsigned char)run->channel;
    c[1] = 0;
    c[2] = (unsigned char)run->ptype;
    c[3] = 0;
    cvpn_put64(c + 4, run->seq + index);
    cvpn_put32(c + 12, (uint32_t)size + CVPN_VPN_HEADER);
    unsigned char *v = c + CVPN_CHANNEL_HEADER;
    cvpn_put32(v, 0);
    cvpn_put32(v + 4, run->op);
    cvpn_put32(v + 8, run->usage_id);
    cvpn_put32(v + 12, (uint32_t)size);
    cvpn_put32(v + 16, 0);
    return 0;
}

#endif
