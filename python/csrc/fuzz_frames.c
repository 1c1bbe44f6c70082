/* Sanitizer harness for the frame parser: feeds every recorded frame to tb_frame.c, built with
 * -fsanitize=address,undefined (python/tests/test_fuzz.py writes the corpus and builds this).
 *
 * Corpus: records of [u8 kind (0 header, 1 INFER body)][u8 python_accepts][u32 len][bytes].
 * Each record is copied into a buffer of exactly its length, so a read one byte past the end
 * is an ASan finding. A record the C parser judges differently from the Python decoder is a
 * mismatch. Prints "records N headers H bodies B accepted A mismatches M"; exit 1 on a
 * mismatch (sanitizer findings abort on their own). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
            if (ok) touch_infer(&req);
        }
        accepted += ok;
        if (ok != (int)expect) {
            mismatches++;
            if (mismatches <= 5)
                fprintf(stderr, "record %lu (kind %u, %zu bytes): C %s, Python %s\n", records,
                        kind, len, ok ? "accepts" : "rejects", expect ? "accepts" : "rejects");
        }
        free(buf);
        records++;
    }
    fclose(f);
    printf("records %lu headers %lu bodies %lu accepted %lu mismatches %lu (checksum %u)\n",
           records, headers, bodies, accepted, mismatches, checksum);
    return mismatches ? 1 : 0;
}
