/* The compiled event loop's connections; see tb_conn.h. */
#define _GNU_SOURCE
#include "tb_conn.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#define READ_MIN 65536
#define FD_CARRIER 0xFD /* spec §5.1: the byte that carries a passed descriptor */

tb_conn *tb_conn_new(int fd, uint64_t cid) {
    tb_conn *c = calloc(1, sizeof *c);
    if (c == NULL) return NULL;
    c->fd = fd;
    c->cid = cid;
    c->refs = 1;
    pthread_mutex_init(&c->mu, NULL);
    return c;
}

void tb_conn_ref(tb_conn *c) { __atomic_add_fetch(&c->refs, 1, __ATOMIC_ACQ_REL); }

void tb_conn_put(tb_conn *c) {
    if (__atomic_sub_fetch(&c->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
    if (c->fd >= 0) close(c->fd);
    if (c->map) munmap(c->map, c->map_size);
    for (tb_out *o = c->held, *next; o; o = next) {
        next = o->next;
        if (o->fd >= 0) close(o->fd);
        free(o->data);
        free(o);
    }
    free(c->rbuf);
    free(c->wbuf);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

int tb_conn_has_frame(const tb_conn *c) {
    size_t have = c->rlen - c->rpos;
    if (have < TB_HEADER_SIZE) return 0;
    tb_header h;
    if (tb_parse_header(c->rbuf + c->rpos, TB_HEADER_SIZE, &h) != TB_OK) return 1;
    return have - TB_HEADER_SIZE >= h.body_len;
}

void tb_conn_compact(tb_conn *c) {
    if (c->rpos == 0) return;
    memmove(c->rbuf, c->rbuf + c->rpos, c->rlen - c->rpos);
    c->rlen -= c->rpos;
    c->rpos = 0;
    if (c->rlen == 0 && c->rcap > 4 * READ_MIN) { /* a large frame is done: give it back */
        free(c->rbuf);
        c->rbuf = NULL;
        c->rcap = 0;
    }
}

int tb_conn_read(tb_conn *c) {
    int got = 0;
    for (;;) {
        size_t want = READ_MIN;
        size_t have = c->rlen - c->rpos;
        if (have >= TB_HEADER_SIZE) { /* room for the whole frame being read */
            size_t frame = TB_HEADER_SIZE + (size_t)rd32(c->rbuf + c->rpos + 16);
            if (frame <= TB_HEADER_SIZE + TB_MAX_BODY && frame > have && frame - have > want)
                want = frame - have;
        }
        if (c->rcap - c->rlen < want) {
            size_t cap = c->rlen + want;
            uint8_t *buf = realloc(c->rbuf, cap);
            if (buf == NULL) return got ? 1 : -1; /* out of memory: treat as a failed peer */
            c->rbuf = buf;
            c->rcap = cap;
        }
        size_t space = c->rcap - c->rlen;
        ssize_t n = recv(c->fd, c->rbuf + c->rlen, space, MSG_DONTWAIT);
        if (n > 0) {
            c->rlen += (size_t)n;
            got = 1;
            if ((size_t)n < space) return 1; /* drained */
            continue;
        }
        if (n == 0) return got ? 1 : -1;
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return got;
        return got ? 1 : -1;
    }
}

int tb_conn_parse(tb_conn *c, tb_record *out, size_t *n, size_t room, tb_infer *scratch) {
    while (c->rlen - c->rpos >= TB_HEADER_SIZE) {
        if (*n >= room) return TB_FULL;
        const uint8_t *head = c->rbuf + c->rpos;
        tb_header h;
        int good = tb_parse_header(head, TB_HEADER_SIZE, &h) == TB_OK;
        size_t flen = TB_HEADER_SIZE + (good ? h.body_len : 0);
        if (good && c->rlen - c->rpos < flen) return TB_NEED_MORE;
        pthread_mutex_lock(&c->mu);
        if (c->eof || c->closed) {
            pthread_mutex_unlock(&c->mu);
            return TB_STOP;
        }
        int is_infer = good && h.type == 0x04;
        int need = -1;
        if (c->barrier && c->pending > 0) need = 0;
        else if (is_infer && c->pending >= TB_MAX_PENDING) need = TB_MAX_PENDING - 1;
        else if (!is_infer && c->pending > 0) need = 0;
        if (need >= 0) {
            c->paused = 1;
            c->paused_need = need;
            pthread_mutex_unlock(&c->mu);
            return TB_STOP;
        }
        c->barrier = !is_infer;
        c->pending++;
        tb_record *r = &out[(*n)++];
        r->conn = c;
        r->seq = c->next_seq++;
        r->start = c->rpos;
        r->len = flen;
        r->copy = NULL;
        if (!good) {
            r->kind = TB_K_BAD;
            c->broken = 1; /* the framing is lost (spec §3): nothing after it is read */
        } else if (is_infer && !c->use_crc &&
                   tb_parse_infer(head + TB_HEADER_SIZE, h.body_len, scratch) == TB_OK &&
                   tb_fast_infer(scratch, h.flags, c->map, c->map_size) == TB_OK) {
            r->kind = TB_K_FAST;
        } else {
            r->kind = TB_K_FRAME;
        }
        pthread_mutex_unlock(&c->mu);
        tb_conn_ref(c);
        c->rpos += flen;
        if (!good) return TB_STOP;
    }
    return TB_NEED_MORE;
}

static int append(tb_conn *c, const uint8_t *data, size_t len) {
    if (c->wcap - c->wlen < len) {
        size_t cap = c->wcap ? c->wcap : 4096;
        while (cap - c->wlen < len) cap *= 2;
        uint8_t *buf = realloc(c->wbuf, cap);
        if (buf == NULL) return -1;
        c->wbuf = buf;
        c->wcap = cap;
    }
    memcpy(c->wbuf + c->wlen, data, len);
    c->wlen += len;
    return 0;
}

void tb_conn_flush_locked(tb_conn *c) {
    size_t done = 0;
    while (done < c->wlen && !c->eof) {
        ssize_t n = send(c->fd, c->wbuf + done, c->wlen - done, MSG_NOSIGNAL);
        if (n > 0) {
            done += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else {
            c->eof = 1; /* a peer gone, or one that stopped reading for the send timeout */
            shutdown(c->fd, SHUT_RDWR);
        }
    }
    c->wlen = 0;
}

static void send_fd(tb_conn *c, int fd) {
    uint8_t carrier = FD_CARRIER;
    struct iovec iov = {&carrier, 1};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    memset(&u, 0, sizeof u);
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = u.buf;
    msg.msg_controllen = sizeof u.buf;
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &fd, sizeof(int));
    ssize_t n;
    do n = sendmsg(c->fd, &msg, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n != 1) {
        c->eof = 1;
        shutdown(c->fd, SHUT_RDWR);
    }
}

static void hang_up(tb_conn *c) {
    /* Shut our side, then discard what the peer already sent, so that closing with unread
     * data does not reset the connection before the peer has read our ERROR. */
    shutdown(c->fd, SHUT_WR);
    uint8_t sink[4096];
    while (recv(c->fd, sink, sizeof sink, MSG_DONTWAIT) > 0) {
    }
    c->eof = 1;
}

/* Move the replies that are next in order from held to wbuf; frames with a descriptor or a
 * hang-up are sent at once (rare: ATTACH_OK, a connection-level ERROR). */
static void release_in_order(tb_conn *c) {
    while (c->held && c->held->seq == c->send_seq) {
        tb_out *o = c->held;
        c->held = o->next;
        c->send_seq++;
        if (!c->eof && !c->closed) {
            if (append(c, o->data, o->len) < 0) c->eof = 1;
            if (o->fd >= 0 || o->hangup) {
                tb_conn_flush_locked(c);
                if (o->fd >= 0 && !c->eof) send_fd(c, o->fd);
                if (o->hangup && !c->eof) hang_up(c);
            }
        }
        if (o->fd >= 0) close(o->fd);
        free(o->data);
        free(o);
    }
}

int tb_conn_deliver_locked(tb_conn *c, uint64_t seq, uint8_t *data, size_t len, int fd,
                           int hangup, int *resume) {
    *resume = 0;
    int known = seq >= c->send_seq && seq < c->next_seq;
    for (tb_out *h = c->held; known && h; h = h->next) known = h->seq != seq;
    if (!known) { /* answered already, or never asked: a caller's bug, not the peer's */
        free(data);
        if (fd >= 0) close(fd);
        return 0;
    }
    tb_out *o = malloc(sizeof *o);
    if (o == NULL) {
        free(data);
        if (fd >= 0) close(fd);
        c->eof = 1; /* the reply is lost: the peer must not wait for it */
        shutdown(c->fd, SHUT_RDWR);
    } else {
        o->seq = seq;
        o->data = data;
        o->len = len;
        o->fd = fd;
        o->hangup = hangup;
        tb_out **at = &c->held;
        while (*at && (*at)->seq < seq) at = &(*at)->next;
        o->next = *at;
        *at = o;
        release_in_order(c);
    }
    c->pending--;
    if (c->closed) return 0;
    if (c->eof && c->pending == 0) return 1;
    if (c->paused && !c->owned && c->pending <= c->paused_need) {
        c->paused = 0;
        *resume = 1;
    }
    return 0;
}

int tb_conn_map_locked(tb_conn *c, int memfd, uint64_t size, int use_crc) {
    c->use_crc = use_crc;
    uint8_t *map = NULL;
    if (size) {
        map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
        if (map == MAP_FAILED) return errno;
    }
    if (c->map) munmap(c->map, c->map_size);
    c->map = map;
    c->map_size = size;
    return 0;
}
