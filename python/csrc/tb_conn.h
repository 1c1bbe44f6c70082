/* The compiled event loop's connections (tb_loop.c): reading, framing, reply order, sending.
 *
 * Pure C with pthreads: no Python here, so the sanitizer harness can drive it too. A
 * connection's socket belongs to the loop once the server adopted it; its frames are split
 * and classified here, and replies are put back in request order (spec §5.2) and sent. */
#ifndef TB_CONN_H
#define TB_CONN_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "tb_frame.h"

/* What a record hands to Python. */
enum { TB_K_FAST = 0, TB_K_FRAME = 1, TB_K_BAD = 2, TB_K_CLOSED = 3 };

/* INFERs one connection may have waiting at once; more are read when some finish. */
#define TB_MAX_PENDING 256

typedef struct tb_out {
    struct tb_out *next;
    uint64_t seq;
    uint8_t *data;
    size_t len;
    int fd;     /* a descriptor passed after the frame (ATTACH_OK's memfd), or -1 */
    int hangup; /* shut our side after this frame (a connection-level ERROR, spec §3) */
} tb_out;

typedef struct tb_conn {
    uint64_t cid;
    int fd;
    int refs; /* atomic: the loop's table, and each thread using it */
    pthread_mutex_t mu;
    /* Reader side: only the thread that owns the connection's one-shot event. */
    uint8_t *rbuf;
    size_t rlen, rcap, rpos; /* rpos: bytes already handed out as records */
    /* Under mu. */
    uint64_t next_seq, send_seq;
    tb_out *held; /* replies waiting for an earlier one, by seq */
    uint8_t *wbuf; /* replies in order, not sent yet */
    size_t wlen, wcap;
    int pending;   /* frames handed out and not answered */
    int owned;     /* a loop thread is reading or parsing it */
    int paused;    /* the next frame waits until pending <= paused_need */
    int paused_need;
    int barrier;   /* a non-INFER frame is out: nothing more until it is answered */
    int eof;       /* peer gone or a send failed: close once nothing is pending */
    int broken;    /* the framing is lost: read nothing more */
    int closed;
    int dirty;     /* on a loop thread's list of connections to flush */
    uint8_t *map;  /* our own mapping of the region */
    uint64_t map_size;
    int use_crc;   /* checksums on (ATTACH option): every frame takes the Python path */
} tb_conn;

/* One frame handed to Python: [start, start + len) of the connection's rbuf, or its own copy
 * once handed to another loop thread. */
typedef struct {
    tb_conn *conn;
    uint8_t kind;
    uint64_t seq;
    size_t start, len;
    uint8_t *copy;
} tb_record;

static inline const uint8_t *tb_record_frame(const tb_record *r) {
    return r->copy ? r->copy : r->conn->rbuf + r->start;
}

/* Parse status. */
enum { TB_NEED_MORE = 0, TB_STOP = 1, TB_FULL = 2 };

tb_conn *tb_conn_new(int fd, uint64_t cid);
void tb_conn_ref(tb_conn *c);
/* Drop a reference; the last one closes the socket, unmaps the region and frees. */
void tb_conn_put(tb_conn *c);
/* Split complete frames out of rbuf into records (at most *room); sets pending, seq, pauses. */
int tb_conn_parse(tb_conn *c, tb_record *out, size_t *n, size_t room, tb_infer *scratch);
/* Read what the socket holds (without blocking). 1: read some; 0: nothing yet; -1: EOF. */
int tb_conn_read(tb_conn *c);
/* Whether rbuf holds a complete frame (or a bad header) not handed out yet. */
int tb_conn_has_frame(const tb_conn *c);
/* Drop the bytes of records already converted. */
void tb_conn_compact(tb_conn *c);
/* Queue the reply to frame seq (takes data); under mu. Returns 1 when the connection should
 * be finished (EOF and nothing pending). *resume is set when a paused connection may go on. */
int tb_conn_deliver_locked(tb_conn *c, uint64_t seq, uint8_t *data, size_t len, int fd,
                           int hangup, int *resume);
/* Send what wbuf holds (blocking, the socket's send timeout applies); under mu. */
void tb_conn_flush_locked(tb_conn *c);
/* Map the region's memfd (replacing the old mapping); under mu. 0 or an errno. */
int tb_conn_map_locked(tb_conn *c, int memfd, uint64_t size, int use_crc);

#endif
