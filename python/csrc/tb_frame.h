/* TensorBridge frame parsing in C (spec/protocol.md §3, §6.1, §6.3).
 *
 * Pure C over byte buffers: no Python, no allocation, so the same code runs inside the
 * extension module and inside the sanitizer harness (fuzz_frames.c). Every length and offset
 * is checked before it is used; a rejected frame returns TB_BAD and the caller asks the
 * Python decoder for the exact message (errors are the rare path, messages live once). */
#ifndef TB_FRAME_H
#define TB_FRAME_H

#include <stddef.h>
#include <stdint.h>

#define TB_OK 0
#define TB_BAD -1

#define TB_HEADER_SIZE 24
#define TB_MAGIC 0x31524254u
#define TB_VERSION 1
#define TB_FLAG_CRC 0x0001
#define TB_MAX_BODY (16u * 1024u * 1024u)
#define TB_MAX_DIMS 8
#define TB_MAX_INPUTS 64
#define TB_MAX_NAME 255
#define TB_LOCATION_REGION 0
#define TB_LOCATION_INLINE 1
#define TB_OPT_VERSION 0x01
#define TB_OPT_ROUTING_KEY 0x02
#define TB_DTYPE_BYTES 11
#define TB_DTYPE_BOOL 1
#define TB_DTYPE_BF16 10
#define TB_ALIGN 64

typedef struct {
    uint8_t type;
    uint16_t flags;
    uint64_t request_id;
    uint32_t body_len;
    uint32_t crc;
} tb_header;

typedef struct {
    const uint8_t *name; /* points into the body */
    uint8_t name_len;
    uint8_t dtype;
    uint8_t ndim;
    uint8_t location;
    uint64_t shape[TB_MAX_DIMS];
    uint64_t count; /* product of shape */
    uint64_t offset;
    uint64_t nbytes;
    uint32_t crc32c;
} tb_tensor;

typedef struct {
    uint32_t timeout_us;
    const uint8_t *model;
    uint16_t model_len;
    uint8_t n_inputs;
    uint8_t options;
    uint64_t out_offset;
    uint64_t out_capacity;
    uint32_t version;      /* 0 = not pinned */
    const uint8_t *key;    /* NULL = no routing key */
    uint8_t key_len;
    tb_tensor inputs[TB_MAX_INPUTS];
    size_t inline_start;   /* offset of the inline data in the body */
    size_t inline_len;
} tb_infer;

/* Item size of a dtype code (§2); 0 for BYTES; -1 for an unknown code. */
int tb_itemsize(uint8_t code);
/* 1 when buf[0..len) is valid UTF-8 as Python's strict decoder sees it, else 0. */
int tb_utf8_valid(const uint8_t *buf, size_t len);
/* Parse and validate a 24-byte header (§3). */
int tb_parse_header(const uint8_t *buf, size_t len, tb_header *out);
/* Parse and validate an INFER body (§6.1, §6.3); region offsets are checked by the server. */
int tb_parse_infer(const uint8_t *body, size_t len, tb_infer *out);
/* Whether a parsed INFER may take the compiled fast path: no checksums, every input a
 * non-BYTES, non-BF16 tensor in the region, aligned (§5.2) and inside region[0..size), BOOL
 * items 0 or 1, and the output area aligned and inside it. TB_BAD sends the frame to the
 * Python path, which answers the exact error (or serves the unusual request). */
int tb_fast_infer(const tb_infer *req, uint16_t frame_flags, const uint8_t *region,
                  uint64_t region_size);

#endif
