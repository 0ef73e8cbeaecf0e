/* Fuzzing the C loops of frames.h under AddressSanitizer and UndefinedBehaviorSanitizer
 * (make fuzz-native): the frame scan fed hostile byte streams, the data headers written
 * for any fields and sizes and read back by the scan, and the pump fed data frames (most of
 * them ones it may carry, then bytes changed) with each packet it writes checked again
 * against the rules by code of its own.
 *
 *   fuzz_frames [inputs] [seed]
 *
 * Each input is built from the seed's stream of random numbers: frames end to end with sizes
 * that fit, lie, or overflow, bytes flipped, the tail cut, a random start and limit. The buffer
 * is a heap block of exactly its length, so a read one byte past it is a sanitizer report. A
 * finding (a broken invariant, a sanitizer report) ends the run with status 1 and the input's
 * number; a clean run prints its count. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "frames.h"

static uint64_t rng_state;

static uint64_t next(void)
{
    /* xorshift64*: fast and enough to spread inputs */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}

static uint64_t below(uint64_t n) { return n ? next() % n : 0; }

static unsigned long long input_no;

#define CHECK(cond)                                                                          \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "finding at input %llu: %s (line %d)\n", input_no, #cond,          \
                    __LINE__);                                                               \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

typedef struct {
    const unsigned char *buf;
    uint64_t max_payload;
    size_t len;
    size_t expect; /* where the next frame's payload must start */
    unsigned long frames;
} scan_check;

static int on_frame(void *arg, unsigned type, size_t start, size_t stop)
{
    scan_check *c = arg;
    CHECK(type <= 255);
    CHECK(start == c->expect);
    CHECK(start <= stop && stop <= c->len);
    /* only a frame with the whole signature and an allowed size is taken */
    const unsigned char *h = c->buf + start - CVPN_FRAME_HEADER;
    CHECK(memcmp(h, cvpn_signature, 8) == 0);
    CHECK(cvpn_get32(h + 8) == stop - start && stop - start <= c->max_payload);
    c->expect = stop + CVPN_FRAME_HEADER;
    c->frames++;
    return 0;
}

static void fuzz_scan(void)
{
    size_t cap = 1 + below(4096);
    unsigned char *tmp = malloc(cap);
    CHECK(tmp != NULL);
    size_t len = 0;
    while (len < cap) {
        if (below(8) == 0) { /* garbage */
            size_t n = 1 + below(64);
            for (size_t i = 0; i < n && len < cap; i++)
                tmp[len++] = (unsigned char)next();
            continue;
        }
        unsigned char header[CVPN_FRAME_HEADER];
        for (size_t i = 0; i < sizeof header; i++)
            header[i] = (unsigned char)next();
        memcpy(header, cvpn_signature, 8);
        uint64_t payload = below(4) ? below(200) : below(5000);
        uint32_t size = below(6) ? (uint32_t)payload : (uint32_t)next();
        cvpn_put32(header + 8, size);
        for (size_t i = 0; i < sizeof header && len < cap; i++)
            tmp[len++] = header[i];
        for (uint64_t i = 0; i < payload && len < cap; i++)
            tmp[len++] = (unsigned char)next();
    }
    for (uint64_t flips = below(4); flips > 0; flips--)
        tmp[below(len)] ^= (unsigned char)(1u << below(8));
    if (below(2))
        len -= below(len);
    /* exactly len bytes on the heap: one byte past is outside the block */
    unsigned char *buf = malloc(len ? len : 1);
    CHECK(buf != NULL);
    memcpy(buf, tmp, len);
    free(tmp);
    size_t pos = below(3) ? 0 : below(len + 1);
    static const uint64_t limits[] = {0, 1, 36, 37, 200, 4096, 262144, UINT32_MAX, UINT64_MAX};
    uint64_t max_payload = limits[below(sizeof limits / sizeof limits[0])];
    scan_check c = {buf, max_payload, len, pos + CVPN_FRAME_HEADER, 0};
    cvpn_scan_result r;
    int stopped = cvpn_scan(buf, pos, len, max_payload, on_frame, &c, &r);
    CHECK(r.pos <= len && r.pos >= pos);
    CHECK(r.pos + CVPN_FRAME_HEADER == c.expect);
    if (!stopped) {
        if (r.bad) {
            CHECK(len - r.pos >= CVPN_FRAME_HEADER);
            CHECK(memcmp(buf + r.pos, cvpn_signature, 8) != 0 ||
                  cvpn_get32(buf + r.pos + 8) > max_payload);
        } else {
            CHECK(r.need >= CVPN_FRAME_HEADER);
            CHECK(len - r.pos < r.need); /* what is left is not a whole frame */
        }
    }
    free(buf);
}

static void fuzz_headers(void)
{
    cvpn_data_run run = {next(), next(), next(), (unsigned)below(256), (unsigned)below(256),
                         (uint32_t)next(), (uint32_t)next()};
    uint64_t index = below(1000);
    uint64_t size = below(4) ? below(3000) : next() >> below(64);
    unsigned char *out = malloc(CVPN_DATA_HEADERS); /* exactly the headers' size */
    CHECK(out != NULL);
    if (cvpn_data_headers(out, &run, index, size) != 0) {
        CHECK(size > UINT32_MAX - (CVPN_CHANNEL_HEADER + CVPN_VPN_HEADER));
        free(out);
        return;
    }
    CHECK(size <= UINT32_MAX - (CVPN_CHANNEL_HEADER + CVPN_VPN_HEADER));
    /* read back: one frame, its payload the channel packet announcing the rest */
    if (size <= 3000) {
        size_t len = CVPN_DATA_HEADERS + (size_t)size;
        unsigned char *frame = malloc(len);
        CHECK(frame != NULL);
        memcpy(frame, out, CVPN_DATA_HEADERS);
        memset(frame + CVPN_DATA_HEADERS, 0xab, (size_t)size);
        scan_check c = {frame, UINT32_MAX, len, CVPN_FRAME_HEADER, 0};
        cvpn_scan_result r;
        CHECK(cvpn_scan(frame, 0, len, UINT32_MAX, on_frame, &c, &r) == 0);
        CHECK(!r.bad && r.pos == len && c.frames == 1);
        const unsigned char *ch = frame + CVPN_FRAME_HEADER;
        CHECK(frame[20] == 0 && ch[0] == run.channel && ch[2] == run.ptype);
        CHECK(cvpn_get32(ch + 12) == size + CVPN_VPN_HEADER);
        uint64_t seq = cvpn_get32(ch + 4) | (uint64_t)cvpn_get32(ch + 8) << 32;
        CHECK(seq == run.seq + index);
        const unsigned char *v = ch + CVPN_CHANNEL_HEADER;
        CHECK(cvpn_get32(v + 4) == run.op && cvpn_get32(v + 8) == run.usage_id);
        CHECK(cvpn_get32(v + 12) == size);
        free(frame);
    }
    free(out);
}


typedef struct {
    const unsigned char *buf;
    size_t len, next_frame; /* where the frame of the next packet written must start */
    const cvpn_pump_cfg *cfg;
    uint64_t seq;
    int64_t allowance;
    unsigned long written;
} pump_check;

static int in_list(const uint32_t *list, size_t n, uint32_t v)
{
    for (size_t i = 0; i < n; i++)
        if (list[i] == v)
            return 1;
    return 0;
}

/* Every packet the pump writes, checked against the rules again, from its bytes alone. */
static int pump_write_check(void *arg, const unsigned char *vnet, const unsigned char *pkt,
                            size_t size, size_t *written)
{
    pump_check *c = arg;
    const cvpn_pump_cfg *cfg = c->cfg;
    const unsigned char *h = c->buf + c->next_frame;
    int gso = cvpn_get32(h + 57) != cfg->op;
    size_t extra = gso ? 10 : 0; /* VPN_SEND_GSO: a vnet header before the packet */
    CHECK(pkt == h + CVPN_DATA_HEADERS + extra);
    CHECK(c->next_frame + CVPN_DATA_HEADERS + extra + size <= c->len);
    CHECK(memcmp(h, cvpn_signature, 8) == 0 && h[20] == 0);
    CHECK(cvpn_get32(h + 8) == size + extra + 36 && h[37] == cfg->channel);
    CHECK(cvpn_get64(h + 41) == c->seq && c->seq != UINT64_MAX);
    CHECK(cvpn_get32(h + 49) == size + extra + 20);
    CHECK(cvpn_get32(h + 57) == cfg->op || (cfg->op_gso && cvpn_get32(h + 57) == cfg->op_gso));
    CHECK(cvpn_get32(h + 65) == size + extra);
    if (gso) {
        const unsigned char *vh = pkt - 10;
        CHECK(vh[0] <= 3 && (vh[1] == 0 || vh[1] == 0x80));
        if (vh[0] & 1) { /* a checksum for the device: UDP, not a fragment, to a vnet TUN */
            CHECK(cfg->vnet && vnet != NULL && memcmp(vnet, "\1\0\0\0\0\0\24\0\6\0", 10) == 0);
            CHECK(pkt[9] == 17 && size >= 28 && pkt[6] % 64 == 0 && pkt[7] == 0);
            CHECK(vh[6] == 20 && vh[7] == 0 && vh[8] == 6 && vh[9] == 0);
        } else {
            CHECK(vnet == NULL);
        }
    } else {
        CHECK(vnet == NULL);
    }
    CHECK(size >= 20 && pkt[0] == 0x45 && (size_t)(pkt[2] * 256 + pkt[3]) == size);
    CHECK(pkt[9] != 6 && memcmp(pkt + 12, &cfg->lease, 4) == 0);
    CHECK((int64_t)size < c->allowance);
    uint32_t dst;
    memcpy(&dst, pkt + 16, 4);
    if (in_list(cfg->host_addr, cfg->n_host, dst)) {
        if (!(cfg->host_flags & CVPN_HOST_ALL)) {
            CHECK(pkt[6] % 64 == 0 && pkt[7] == 0);
            if (pkt[9] == 1) {
                CHECK((cfg->host_flags & CVPN_HOST_ICMP) && size >= 28 && pkt[20] == 8);
            } else {
                CHECK(pkt[9] == 17 && size >= 24);
                int listed = 0;
                for (size_t i = 0; i < cfg->n_host_udp; i++)
                    listed |= cfg->host_udp[i] == pkt[22] * 256 + pkt[23];
                CHECK(listed);
            }
        }
    } else {
        for (size_t i = 0; i < cfg->n_keep; i++)
            CHECK((dst & cfg->keep_mask[i]) != cfg->keep_addr[i]);
    }
    c->allowance -= (int64_t)size;
    c->seq++;
    c->next_frame += CVPN_DATA_HEADERS + extra + size;
    c->written++;
    if (below(50) == 0)
        return 1; /* a write that fails: the pump must stop at this frame */
    *written = size;
    return 0;
}

static unsigned long long pumped;

static void fuzz_pump(void)
{
    cvpn_pump_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    static const unsigned char pool[4] = {198, 18, 5, 0}, other[4] = {198, 19, 7, 0};
    unsigned char lease[4] = {198, 18, 5, (unsigned char)(2 + below(2))};
    cfg.lease = cvpn_get32(lease);
    cfg.channel = 0x53;
    cfg.op = 0xbc;
    cfg.op_gso = below(3) ? 0xc8 : 0;
    cfg.vnet = (int)below(2);
    cfg.seq_next = below(4) ? below(1000) : UINT64_MAX - below(3);
    cfg.allowance = below(3) ? INT64_MAX / 2 : (int64_t)below(4000);
    cfg.n_keep = below(3);
    for (size_t i = 0; i < cfg.n_keep; i++) {
        cfg.keep_mask[i] = below(2) ? cvpn_get32((const unsigned char[]){255, 255, 255, 0})
                                    : (uint32_t)next();
        cfg.keep_addr[i] = (below(2) ? cvpn_get32(pool) : (uint32_t)next()) & cfg.keep_mask[i];
    }
    cfg.n_host = below(3);
    for (size_t i = 0; i < cfg.n_host; i++) {
        unsigned char a[4] = {198, 18 + (unsigned char)below(2), 5, (unsigned char)below(3)};
        cfg.host_addr[i] = cvpn_get32(a);
    }
    static const uint16_t ports[3] = {5201, 53, 7};
    cfg.n_host_udp = below(4);
    for (size_t i = 0; i < cfg.n_host_udp; i++)
        cfg.host_udp[i] = ports[below(3)];
    cfg.host_flags = (unsigned)below(4);

    size_t cap = 1 + below(6000);
    unsigned char *tmp = malloc(cap);
    CHECK(tmp != NULL);
    size_t len = 0;
    for (uint64_t n = 0; len + CVPN_DATA_HEADERS + 30 < cap; n++) {
        size_t body = below(3) ? below(64) : below(1500);
        size_t size = 20 + body;
        int gso = below(3) == 0;
        size_t extra = gso ? 10 : 0;
        if (len + CVPN_DATA_HEADERS + extra + size > cap)
            break;
        cvpn_data_run run = {5, 0, cfg.seq_next + n, cfg.channel, 2, gso ? 0xc8 : cfg.op, 0};
        cvpn_data_headers(tmp + len, &run, 0, extra + size);
        unsigned char *p = tmp + len + CVPN_DATA_HEADERS;
        if (gso) { /* a vnet header: mostly plain or a UDP checksum, sometimes anything */
            static const unsigned char csum[10] = {1, 0, 0, 0, 0, 0, 20, 0, 6, 0};
            memset(p, 0, 10);
            if (below(2))
                memcpy(p, csum, 10);
            if (below(4) == 0)
                p[below(10)] = (unsigned char)next();
            p += 10;
        }
        for (size_t i = 0; i < size; i++)
            p[i] = (unsigned char)next();
        p[0] = below(10) ? 0x45 : (unsigned char)next();
        size_t total = size + (below(10) ? 0 : below(3) - 1);
        p[2] = (unsigned char)(total >> 8);
        p[3] = (unsigned char)total;
        if (below(6))
            p[6] = p[7] = 0;
        static const unsigned char protos[5] = {17, 17, 1, 6, 47};
        p[9] = protos[below(5)];
        memcpy(p + 12, below(8) ? lease : pool, 4);
        const unsigned char *d = below(3) ? other : pool;
        memcpy(p + 16, d, 3);
        p[19] = (unsigned char)below(4);
        if (below(3) == 0)
            memcpy(p + 16, &cfg.host_addr[below(cfg.n_host + 1) % (cfg.n_host ? cfg.n_host : 1)],
                   4);
        if (p[9] == 17 && size >= 24) {
            p[22] = (unsigned char)(ports[below(3)] >> 8);
            p[23] = (unsigned char)ports[below(3)];
        }
        if (p[9] == 1 && size > 20)
            p[20] = below(2) ? 8 : 0;
        len += CVPN_DATA_HEADERS + extra + size;
    }
    for (uint64_t flips = below(3); flips > 0 && len; flips--)
        tmp[below(len)] ^= (unsigned char)(1u << below(8));
    if (len && below(3) == 0)
        len -= below(len);
    unsigned char *buf = malloc(len ? len : 1);
    CHECK(buf != NULL);
    memcpy(buf, tmp, len);
    free(tmp);
    static const uint64_t limits[] = {0, 100, 1600, 262144, UINT32_MAX};
    uint64_t max_payload = limits[below(sizeof limits / sizeof limits[0])];
    pump_check c = {buf, len, 0, &cfg, cfg.seq_next, cfg.allowance, 0};
    cvpn_pump_result r;
    cvpn_pump_up(buf, 0, len, max_payload, &cfg, pump_write_check, &c, &r);
    /* it stopped at a frame boundary: the one after the last packet written */
    CHECK(r.pos <= len && r.packets <= c.written && c.written <= r.packets + 1);
    size_t at = 0;
    uint64_t ip = 0;
    for (uint64_t i = 0; i < r.packets; i++) {
        size_t size = cvpn_get32(buf + at + 8);
        ip += size - 36 - (cvpn_get32(buf + at + 57) == cfg.op ? 0 : 10);
        at += CVPN_FRAME_HEADER + size;
    }
    CHECK(at == r.pos && ip == r.ip_bytes && r.written == r.ip_bytes);
    pumped += r.packets;
    free(buf);
}

int main(int argc, char **argv)
{
    unsigned long long inputs = argc > 1 ? strtoull(argv[1], NULL, 10) : 1000000ULL;
    rng_state = argc > 2 ? strtoull(argv[2], NULL, 10) : 20261204ULL;
    if (rng_state == 0)
        rng_state = 1;
    for (input_no = 0; input_no < inputs; input_no++) {
        if (input_no % 4 == 3)
            fuzz_headers();
        else if (input_no % 4 == 1)
            fuzz_pump();
        else
            fuzz_scan();
    }
    unsigned long long pumps = inputs / 4 + (inputs % 4 > 1), headers = inputs / 4;
    printf("fuzz_frames: %llu inputs (scan %llu, pump %llu with %llu packets written, headers "
           "%llu), 0 findings, seed %s\n",
           inputs, inputs - pumps - headers, pumps, pumped, headers,
           argc > 2 ? argv[2] : "20261204");
    return 0;
}
