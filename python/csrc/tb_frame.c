/* TensorBridge frame parsing in C; see tb_frame.h. */
#include "tb_frame.h"

#include <string.h>

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | ((uint64_t)rd32(p + 4) << 32); }

int tb_itemsize(uint8_t code) {
    static const int sizes[] = {-1, 1, 1, 1, 2, 4, 8, 2, 4, 8, 2, 0};
    return code < sizeof(sizes) / sizeof(sizes[0]) ? sizes[code] : -1;
}

int tb_utf8_valid(const uint8_t *s, size_t len) {
    size_t i = 0;
    while (i < len) {
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t need;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) {
            need = 1;
            cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            need = 2;
            cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            need = 3;
            cp = c & 0x07;
        } else {
            return 0;
        }
        if (len - i <= need) return 0;
        for (size_t k = 1; k <= need; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if ((need == 2 && cp < 0x800) || (need == 3 && (cp < 0x10000 || cp > 0x10FFFF)) ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            return 0; /* overlong, out of range, or a surrogate */
        i += need + 1;
    }
    return 1;
}

int tb_parse_header(const uint8_t *buf, size_t len, tb_header *out) {
    if (len != TB_HEADER_SIZE) return TB_BAD;
    if (rd32(buf) != TB_MAGIC || buf[4] != TB_VERSION) return TB_BAD;
    uint8_t type = buf[5];
    switch (type) {
    case 0x01: case 0x81: case 0x02: case 0x82: case 0x03: case 0x83:
    case 0x04: case 0x84: case 0x05: case 0x85: case 0xFF:
        break;
    default:
        return TB_BAD;
    }
    uint16_t flags = rd16(buf + 6);
    if (flags & ~TB_FLAG_CRC) return TB_BAD;
    uint32_t body_len = rd32(buf + 16);
    if (body_len > TB_MAX_BODY) return TB_BAD;
    out->type = type;
    out->flags = flags;
    out->request_id = rd64(buf + 8);
    out->body_len = body_len;
    out->crc = rd32(buf + 20);
    return TB_OK;
}

/* Multiply with overflow detection; Python's integers never overflow, so a product past
 * 2^64 can only mean a size the descriptor cannot match: rejected. */
static int mul_ok(uint64_t a, uint64_t b, uint64_t *out) {
    if (a && b > UINT64_MAX / a) return 0;
    *out = a * b;
    return 1;
}

static int parse_tensor(const uint8_t *body, size_t len, size_t *pos, tb_tensor *t) {
    size_t p = *pos;
    if (len - p < 32) return TB_BAD;
    const uint8_t *d = body + p;
    t->dtype = d[0];
    t->ndim = d[1];
    t->location = d[2];
    uint8_t res1 = d[3];
    uint16_t name_len = rd16(d + 4);
    uint16_t res2 = rd16(d + 6);
    t->offset = rd64(d + 8);
    t->nbytes = rd64(d + 16);
    t->crc32c = rd32(d + 24);
    uint32_t res3 = rd32(d + 28);
    p += 32;
    int itemsize = tb_itemsize(t->dtype);
    if (itemsize < 0 || t->ndim > TB_MAX_DIMS) return TB_BAD;
    if (t->location != TB_LOCATION_REGION && t->location != TB_LOCATION_INLINE) return TB_BAD;
    if (res1 || res2 || res3) return TB_BAD;
    if (name_len == 0 || name_len > TB_MAX_NAME) return TB_BAD;
    if ((len - p) / 8 < t->ndim) return TB_BAD;
    uint64_t count = 1;
    int overflow = 0;
    for (uint8_t k = 0; k < t->ndim; k++) {
        t->shape[k] = rd64(body + p);
        p += 8;
        if (!mul_ok(count, t->shape[k], &count)) overflow = 1;
    }
    if (len - p < name_len) return TB_BAD;
    t->name = body + p;
    t->name_len = (uint8_t)name_len;
    if (!tb_utf8_valid(t->name, name_len)) return TB_BAD;
    p += name_len;
    /* A zero dim makes the product 0 whatever overflowed before it. */
    for (uint8_t k = 0; k < t->ndim; k++)
        if (t->shape[k] == 0) overflow = 0, count = 0;
    if (overflow) return TB_BAD;
    t->count = count;
    if (itemsize) {
        uint64_t expected;
        if (!mul_ok(count, (uint64_t)itemsize, &expected) || expected != t->nbytes) return TB_BAD;
    } else {
        uint64_t least;
        if (!mul_ok(count, 4, &least) || t->nbytes < least) return TB_BAD;
    }
    *pos = p;
    return TB_OK;
}

int tb_parse_infer(const uint8_t *body, size_t len, tb_infer *out) {
    if (len < 24) return TB_BAD;
    out->timeout_us = rd32(body);
    out->model_len = rd16(body + 4);
    out->n_inputs = body[6];
    out->options = body[7];
    out->out_offset = rd64(body + 8);
    out->out_capacity = rd64(body + 16);
    size_t p = 24;
    if (out->options & ~(TB_OPT_VERSION | TB_OPT_ROUTING_KEY)) return TB_BAD;
    if (out->model_len == 0 || out->model_len > TB_MAX_NAME) return TB_BAD;
    if (out->n_inputs == 0 || out->n_inputs > TB_MAX_INPUTS) return TB_BAD;
    if (len - p < out->model_len) return TB_BAD;
    out->model = body + p;
    if (!tb_utf8_valid(out->model, out->model_len)) return TB_BAD;
    p += out->model_len;
    out->version = 0;
    out->key = NULL;
    out->key_len = 0;
    if (out->options & TB_OPT_VERSION) {
        if (len - p < 4) return TB_BAD;
        out->version = rd32(body + p);
        p += 4;
        if (out->version == 0) return TB_BAD;
    }
    if (out->options & TB_OPT_ROUTING_KEY) {
        if (len - p < 1) return TB_BAD;
        out->key_len = body[p++];
        if (out->key_len == 0 || len - p < out->key_len) return TB_BAD;
        out->key = body + p;
        p += out->key_len;
    }
    for (uint8_t i = 0; i < out->n_inputs; i++)
        if (parse_tensor(body, len, &p, &out->inputs[i]) != TB_OK) return TB_BAD;
    out->inline_start = p;
    out->inline_len = len - p;
    for (uint8_t i = 0; i < out->n_inputs; i++) {
        const tb_tensor *t = &out->inputs[i];
        for (uint8_t j = 0; j < i; j++) {
            const tb_tensor *u = &out->inputs[j];
            if (u->name_len == t->name_len && memcmp(u->name, t->name, t->name_len) == 0)
                return TB_BAD; /* a name appears twice */
        }
        if (t->location == TB_LOCATION_INLINE &&
            (t->offset > out->inline_len || t->nbytes > out->inline_len - t->offset))
            return TB_BAD;
    }
    return TB_OK;
}

/* [offset, offset + nbytes) aligned and inside [0, size), without overflow. */
static int in_region(uint64_t offset, uint64_t nbytes, uint64_t size) {
    return offset % TB_ALIGN == 0 && offset <= size && nbytes <= size - offset;
}

int tb_fast_infer(const tb_infer *req, uint16_t frame_flags, const uint8_t *region,
                  uint64_t region_size) {
    if ((frame_flags & TB_FLAG_CRC) || region == NULL || region_size == 0) return TB_BAD;
    if (req->out_capacity && !in_region(req->out_offset, req->out_capacity, region_size))
        return TB_BAD;
    for (uint8_t i = 0; i < req->n_inputs; i++) {
        const tb_tensor *t = &req->inputs[i];
        if (t->location != TB_LOCATION_REGION || t->dtype == TB_DTYPE_BYTES ||
            t->dtype == TB_DTYPE_BF16 || !in_region(t->offset, t->nbytes, region_size))
            return TB_BAD;
        if (t->dtype == TB_DTYPE_BOOL)
            for (uint64_t k = 0; k < t->nbytes; k++)
                if (region[t->offset + k] > 1) return TB_BAD;
    }
    return TB_OK;
}
