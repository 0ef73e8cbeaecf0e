/* Fuzzing the C loops of frames.h under AddressSanitizer and UndefinedBehaviorSanitizer
 * (make fuzz-native): the frame scan fed hostile byte streams, and the data headers written
 * for any fields and sizes and read back by the scan.
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

int main(int argc, char **argv)
{
    unsigned long long inputs = argc > 1 ? strtoull(argv[1], NULL, 10) : 1000000ULL;
    rng_state = argc > 2 ? strtoull(argv[2], NULL, 10) : 20261204ULL;
    if (rng_state == 0)
        rng_state = 1;
    for (input_no = 0; input_no < inputs; input_no++) {
        if (input_no % 4 == 3)
            fuzz_headers();
        else
            fuzz_scan();
    }
    printf("fuzz_frames: %llu inputs (scan %llu, headers %llu), 0 findings, seed %s\n", inputs,
           inputs - inputs / 4, inputs / 4, argc > 2 ? argv[2] : "20261204");
    return 0;
}
