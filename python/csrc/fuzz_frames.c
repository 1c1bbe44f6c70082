/* Sanitizer harness for the frame parser: feeds every recorded frame to tb_frame.c, built with
 * -fsanitize=address,undefined (python/tests/test_fuzz.py writes the corpus and builds this).
 * The compiled loop's connection code (tb_conn.c) gets the same frames as byte streams: each
 * INFER body behind a valid header, each header as it is, cut into reads of random sizes,
 * split into records, checked against a region (tb_fast_infer) and answered out of order
 * through a socket pair. Prints the stream figures too ("streams S stream_frames F").
 *
 * Corpus: records of [u8 kind (0 header, 1 INFER body)][u8 python_accepts][u32 len][bytes].
 * Each record is copied into a buffer of exactly its length, so a read one byte past the end
 * is an ASan finding. A record the C parser judges differently from the Python decoder is a
 * mismatch. Prints "records N headers H bodies B accepted A mismatches M"; exit 1 on a
 * mismatch (sanitizer findings abort on their own). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "tb_conn.h"
#include "tb_frame.h"

static unsigned checksum; /* every parsed field feeds it, so nothing is optimized away */

static void touch_infer(const tb_infer *r) {
    checksum += r->timeout_us + r->model[0] + r->model[r->model_len - 1] + r->version;
    if (r->key) checksum += r->key[0] + r->key[r->key_len - 1];
    for (unsigned i = 0; i < r->n_inputs; i++) {
        const tb_tensor *t = &r->inputs[i];
        checksum += t->name[0] + t->name[t->name_len - 1] + (unsigned)t->count;
    }
}

#define REGION_SIZE 65536
#define STREAM_CAP (1u << 20)

static uint8_t *stream;
static size_t stream_len;
static unsigned long streams, stream_frames, fast_frames;
static unsigned seed = 12345;

static unsigned next_rand(void) {
    seed = seed * 1103515245u + 12345u;
    return (seed >> 8) & 0xFFFFFF;
}

static void wr32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* Answer the records of one parse, last first (replies must still leave in order). */
static void answer(tb_conn *c, tb_record *recs, size_t n, int peer) {
    for (size_t k = n; k-- > 0;) {
        tb_record *r = &recs[k];
        const uint8_t *frame = tb_record_frame(r);
        checksum += frame[0] + frame[r->len - 1] + r->kind;
        stream_frames++;
        fast_frames += r->kind == TB_K_FAST;
        uint8_t *reply = malloc(32);
        memset(reply, (int)r->seq, 32);
        int resume;
        pthread_mutex_lock(&c->mu);
        tb_conn_deliver_locked(c, r->seq, reply, 32, -1, r->kind == TB_K_BAD, &resume);
        tb_conn_flush_locked(c);
        pthread_mutex_unlock(&c->mu);
        tb_conn_put(r->conn);
    }
    uint8_t sink[65536];
    while (recv(peer, sink, sizeof sink, MSG_DONTWAIT) > 0) {
    }
}

/* Feed the stream to a connection in reads of random sizes, as tb_conn_read would. */
static void feed_stream(uint8_t *region) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0) {
        perror("socketpair");
        exit(2);
    }
    tb_conn *c = tb_conn_new(sv[0], 1);
    c->map = region;
    c->map_size = REGION_SIZE;
    static tb_record recs[64];
    static tb_infer scratch;
    size_t pos = 0;
    while (pos < stream_len && !c->broken && !c->eof) {
        size_t chunk = 1 + next_rand() % 3000;
        if (chunk > stream_len - pos) chunk = stream_len - pos;
        if (c->rcap - c->rlen < chunk) {
            c->rcap = c->rlen + chunk;
            c->rbuf = realloc(c->rbuf, c->rcap);
        }
        memcpy(c->rbuf + c->rlen, stream + pos, chunk);
        c->rlen += chunk;
        pos += chunk;
        for (;;) {
            size_t n = 0;
            int st = tb_conn_parse(c, recs, &n, 64, &scratch);
            answer(c, recs, n, sv[1]);
            tb_conn_compact(c);
            if (st != TB_FULL && (st != TB_STOP || !c->paused)) break;
            c->paused = 0; /* every record was answered: go on, as a resume would */
        }
    }
    c->map = NULL; /* malloc'd here, not mapped */
    tb_conn_put(c);
    close(sv[1]);
    streams++;
    stream_len = 0;
}

static void add_to_stream(unsigned kind, const uint8_t *buf, size_t len, uint8_t *region) {
    size_t need = (kind == 0 ? 0 : TB_HEADER_SIZE) + len;
    if (stream_len + need > STREAM_CAP) feed_stream(region);
    if (need > STREAM_CAP) return;
    if (kind == 1) { /* a valid INFER header, then the body */
        uint8_t *h = stream + stream_len;
        memset(h, 0, TB_HEADER_SIZE);
        wr32(h, TB_MAGIC);
        h[4] = TB_VERSION;
        h[5] = 0x04;
        h[8] = (uint8_t)stream_frames;
        wr32(h + 16, (uint32_t)len);
        stream_len += TB_HEADER_SIZE;
    }
    memcpy(stream + stream_len, buf, len);
    stream_len += len;
    if (kind == 0 || next_rand() % 32 == 0) feed_stream(region); /* a bad header ends it */
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s CORPUS\n", argv[0]);
        return 2;
    }
    FILE *f = fopen(argv[1], "rb");
    if (!f) {
        perror(argv[1]);
        return 2;
    }
    static tb_infer req;
    stream = malloc(STREAM_CAP);
    uint8_t *region = malloc(REGION_SIZE);
    for (size_t i = 0; i < REGION_SIZE; i++) region[i] = (uint8_t)(i % 3); /* BOOL: 0, 1, 2 */
    unsigned long records = 0, headers = 0, bodies = 0, accepted = 0, mismatches = 0;
    unsigned char meta[6];
    while (fread(meta, 1, sizeof meta, f) == sizeof meta) {
        unsigned kind = meta[0], expect = meta[1];
        size_t len = (size_t)meta[2] | ((size_t)meta[3] << 8) | ((size_t)meta[4] << 16) |
                     ((size_t)meta[5] << 24);
        unsigned char *buf = malloc(len ? len : 1);
        if (!buf || fread(buf, 1, len, f) != len) {
            fprintf(stderr, "truncated corpus at record %lu\n", records);
            return 2;
        }
        int ok;
        if (kind == 0) {
            tb_header h;
            ok = tb_parse_header(buf, len, &h) == TB_OK;
            headers++;
            if (ok) checksum += h.type + h.body_len;
        } else {
            ok = tb_parse_infer(buf, len, &req) == TB_OK;
            bodies++;
            if (ok) {
                touch_infer(&req);
                checksum += tb_fast_infer(&req, 0, region, REGION_SIZE) == TB_OK;
            }
        }
        accepted += ok;
        if (ok != (int)expect) {
            mismatches++;
            if (mismatches <= 5)
                fprintf(stderr, "record %lu (kind %u, %zu bytes): C %s, Python %s\n", records,
                        kind, len, ok ? "accepts" : "rejects", expect ? "accepts" : "rejects");
        }
        add_to_stream(kind, buf, len, region);
        free(buf);
        records++;
    }
    if (stream_len) feed_stream(region);
    fclose(f);
    free(stream);
    free(region);
    printf("records %lu headers %lu bodies %lu accepted %lu mismatches %lu streams %lu "
           "stream_frames %lu fast %lu (checksum %u)\n", records, headers, bodies, accepted,
           mismatches, streams, stream_frames, fast_frames, checksum);
    return mismatches ? 1 : 0;
}
