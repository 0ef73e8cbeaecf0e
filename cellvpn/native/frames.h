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

static inline uint64_t cvpn_get64(const unsigned char *p)
{
    return (uint64_t)cvpn_get32(p) | (uint64_t)cvpn_get32(p + 4) << 32;
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

/* --- the pump: client to TUN ----------------------------------------------------------- */

#define CVPN_MAX_KEEP 16
#define CVPN_MAX_HOSTS 16
#define CVPN_HOST_ICMP 1u /* to_host icmp: echo requests to a host address pass */
#define CVPN_HOST_ALL 2u  /* to_host all: everything to a host address passes */

/* What one session's pump may carry. Addresses are as the packet has them (network order),
 * read with cvpn_get32, so no byte swapping is needed to compare. */
typedef struct {
    unsigned channel;  /* the VPN channel ('S') */
    uint32_t op;       /* VPN_SEND */
    uint32_t op_gso;   /* VPN_SEND_GSO if the session agreed to offload, else 0 (none) */
    int vnet;          /* the TUN takes a vnet header before each packet */
    uint64_t seq_next; /* the seq the next data frame must carry (the last accepted + 1) */
    int64_t allowance; /* IP bytes billing lets pass; a packet that would use it up is left */
    uint32_t lease;    /* the session's IPv4 address: every source must be it */
    /* destinations Python decides: other clients (the pool), addresses of the host that a
     * client could also hold */
    uint32_t keep_addr[CVPN_MAX_KEEP], keep_mask[CVPN_MAX_KEEP];
    size_t n_keep;
    /* the host's own addresses and what to_host lets reach them */
    uint32_t host_addr[CVPN_MAX_HOSTS];
    size_t n_host;
    uint16_t host_udp[CVPN_MAX_HOSTS]; /* UDP ports, as numbers */
    size_t n_host_udp;
    unsigned host_flags;
} cvpn_pump_cfg;

typedef struct {
    size_t pos;         /* first byte not carried: the frame there (if any) is Python's */
    uint64_t packets;   /* packets written */
    uint64_t ip_bytes;  /* their IP bytes (what counters and billing count) */
    uint64_t written;   /* bytes the writes reported (with a vnet header each, if any) */
} cvpn_pump_result;

/* Write one IP packet to the TUN, after the vnet header `vnet` (NULL: an all-zero one, if the
 * TUN takes headers at all); store the bytes written. Nonzero: not written (the frame is left
 * to Python, which counts the failure as it always does). */
typedef int (*cvpn_write_fn)(void *ctx, const unsigned char *vnet, const unsigned char *pkt,
                             size_t size, size_t *written);

/* The header Python's rebuild_header makes for a UDP packet whose checksum the device finishes:
 * NEEDS_CSUM, GSO_NONE, the checksum at 20 + 6. */
static const unsigned char cvpn_vnet_udp_csum[10] = {1, 0, 0, 0, 0, 0, 20, 0, 6, 0};

/* A VPN_SEND_GSO packet's vnet header, as rebuild_header judges it, for the packets C carries
 * (plain IPv4, not TCP): *out is the header to write (NULL: a plain one). 0 leaves the frame
 * to Python: a super-packet, an unknown flag, checksum fields that do not match the packet, a
 * checksum to finish without a vnet TUN (Python finishes it), a fragment with a checksum. */
static inline int cvpn_pump_vnet(const cvpn_pump_cfg *cfg, const unsigned char *vh,
                                 const unsigned char *pkt, size_t size,
                                 const unsigned char **out)
{
    if ((vh[0] & ~3u) || (vh[1] & 0x7fu))
        return 0;
    if (!(vh[0] & 1)) {
        *out = NULL;
        return 1;
    }
    if (!cfg->vnet || (pkt[6] & 0x3f) || pkt[7] || pkt[9] != 17 || size < 28)
        return 0;
    if ((vh[6] | vh[7] << 8) != 20 || (vh[8] | vh[9] << 8) != 6)
        return 0;
    *out = cvpn_vnet_udp_csum;
    return 1;
}

/* Whether to_host lets this packet (to a host address) pass, for what C knows of the rules;
 * 0 leaves it to Python, which knows them all (dns, tcp ports) and drops what they refuse. */
static inline int cvpn_pump_host_ok(const cvpn_pump_cfg *cfg, const unsigned char *pkt,
                                    size_t size)
{
    if (cfg->host_flags & CVPN_HOST_ALL)
        return 1;
    if ((pkt[6] & 0x3f) || pkt[7]) /* a fragment names no port */
        return 0;
    if (pkt[9] == 1) /* ICMP: an echo request */
        return (cfg->host_flags & CVPN_HOST_ICMP) && size >= 28 && pkt[20] == 8;
    if (pkt[9] == 17 && size >= 24) {
        unsigned port = (unsigned)pkt[22] << 8 | pkt[23];
        for (size_t i = 0; i < cfg->n_host_udp; i++)
            if (cfg->host_udp[i] == port)
                return 1;
    }
    return 0;
}

/* Whether C carries this VPN_SEND packet to the TUN: a plain IPv4 packet (no options, its
 * total length the size) from the lease, not TCP (Python clamps its MSS and joins segments),
 * to an address Python need not decide. */
static inline int cvpn_pump_packet_ok(const cvpn_pump_cfg *cfg, const unsigned char *pkt,
                                      size_t size)
{
    if (size < 20 || pkt[0] != 0x45)
        return 0;
    if (((size_t)pkt[2] << 8 | pkt[3]) != size || pkt[9] == 6)
        return 0;
    if (cvpn_get32(pkt + 12) != cfg->lease)
        return 0;
    uint32_t dst = cvpn_get32(pkt + 16);
    for (size_t i = 0; i < cfg->n_host; i++)
        if (cfg->host_addr[i] == dst)
            return cvpn_pump_host_ok(cfg, pkt, size);
    for (size_t i = 0; i < cfg->n_keep; i++)
        if ((dst & cfg->keep_mask[i]) == cfg->keep_addr[i])
            return 0;
    return 1;
}

/* Carry the VPN_SEND (and VPN_SEND_GSO) packets at the start of buf[pos:end] to the TUN, frame
 * by frame, and
 * stop at the first frame that is not whole, not one C may carry, or not written. A frame
 * header anywhere in the buffer that the reader would refuse stops it before it starts, since
 * then Python closes the session without carrying any of the read. */
static inline void cvpn_pump_up(const unsigned char *buf, size_t pos, size_t end,
                                uint64_t max_payload, const cvpn_pump_cfg *cfg,
                                cvpn_write_fn write, void *ctx, cvpn_pump_result *out)
{
    out->pos = pos;
    out->packets = out->ip_bytes = out->written = 0;
    for (size_t p = pos; end - p >= CVPN_FRAME_HEADER;) {
        uint64_t size = cvpn_get32(buf + p + 8);
        if (memcmp(buf + p, cvpn_signature, 8) != 0 || size > max_payload)
            return;
        if (size > end - p - CVPN_FRAME_HEADER)
            break;
        p += CVPN_FRAME_HEADER + (size_t)size;
    }
    uint64_t seq = cfg->seq_next;
    int64_t allowance = cfg->allowance;
    while (end - pos >= CVPN_FRAME_HEADER) {
        const unsigned char *h = buf + pos;
        size_t size = cvpn_get32(h + 8);
        if (size > end - pos - CVPN_FRAME_HEADER)
            break;
        const unsigned char *c = h + CVPN_FRAME_HEADER, *v = c + CVPN_CHANNEL_HEADER;
        if (h[20] != 0 || size < CVPN_CHANNEL_HEADER + CVPN_VPN_HEADER || c[0] != cfg->channel)
            break;
        if (seq == UINT64_MAX || cvpn_get64(c + 4) != seq ||
            cvpn_get32(c + 12) != size - CVPN_CHANNEL_HEADER)
            break;
        size_t ip = size - CVPN_CHANNEL_HEADER - CVPN_VPN_HEADER;
        uint32_t op = cvpn_get32(v + 4);
        if (cvpn_get32(v + 12) != ip)
            break;
        const unsigned char *pkt = v + CVPN_VPN_HEADER, *vh = NULL, *header = NULL;
        if (op == cfg->op_gso && cfg->op_gso != 0 && op != cfg->op) {
            if (ip < 10)
                break;
            vh = pkt; /* VPN_SEND_GSO: a vnet header, then the packet */
            pkt += 10;
            ip -= 10;
        } else if (op != cfg->op) {
            break;
        }
        if (!cvpn_pump_packet_ok(cfg, pkt, ip) || (int64_t)ip >= allowance)
            break;
        if (vh != NULL && !cvpn_pump_vnet(cfg, vh, pkt, ip, &header))
            break;
        size_t written = 0;
        if (write(ctx, header, pkt, ip, &written) != 0)
            break;
        allowance -= (int64_t)ip;
        seq++;
        out->packets++;
        out->ip_bytes += ip;
        out->written += written;
        pos += CVPN_FRAME_HEADER + size;
    }
    out->pos = pos;
}

#endif
