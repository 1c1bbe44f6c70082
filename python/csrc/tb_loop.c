/* tensorbridge._tbcore.Loop: the compiled event loop that owns the established connections.
 *
 * Loop threads (Python threads inside Loop.run) wait on one epoll without the GIL. A
 * connection is registered one-shot, so its event reaches one thread, which reads what the
 * socket holds, splits it into frames and classifies them (tb_conn.c): a common tensor INFER
 * whose inputs lie in the region is a fast record (its descriptors parsed and bounds-checked
 * here), anything else goes to the Python path whole. Every record of the wake-up goes to the
 * Python handler in one call (the GIL taken once); the replies it produces are queued in
 * request order and sent after the handler returns, the GIL released. Replies from other
 * threads (model instances) are sent at once, also without the GIL. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "tb_conn.h"
#include "tb_loop.h"

#define MAX_EVENTS 64
#define MAX_RECORDS 320 /* at most MAX_RECORDS - MAX_EVENTS frames a turn */
#define RETRIES 16
/* How long a loop thread hands its frames to the thread running Python rather than queueing
 * for the GIL itself: a quick call is over by then, a slow one must not hold everyone. Longer
 * than a scheduler time slice on a loaded machine: a combiner that is merely preempted holds
 * the GIL, and queueing for it then only adds hand-overs (2 CPUs, 64 PHP processes, no
 * client spin: 1 ms cost 43-54 us of server CPU and 1.3-1.5 wake-ups a request at 12k req/s,
 * 5 ms 25-30 us and 0.7-0.8 at 23k req/s; bench/probe.py, 2026-12-01 13:45 UTC, load 8-12). */
#define COMBINE_WAIT_S 0.005

/* A loop thread's scratch: its records, the connections it owns this turn, those to flush. */
typedef struct {
    tb_record records[MAX_RECORDS];
    size_t n;
    tb_conn *mine[MAX_EVENTS];
    size_t n_mine;
    tb_conn **dirty;
    size_t n_dirty, dirty_cap;
    tb_infer infer;
} tb_turn;

static __thread tb_turn *in_handler; /* set while this loop thread runs the handler */

static tb_conn *lookup(LoopObject *lp, uint64_t cid) {
    uint32_t slot = (uint32_t)cid;
    tb_conn *c = NULL;
    pthread_mutex_lock(&lp->tmu);
    if (slot < lp->nslots && lp->slots[slot] && lp->slots[slot]->cid == cid) {
        c = lp->slots[slot];
        tb_conn_ref(c);
    }
    pthread_mutex_unlock(&lp->tmu);
    return c;
}

static void arm(LoopObject *lp, tb_conn *c, uint32_t events) {
    struct epoll_event ev = {.events = events | EPOLLONESHOT, .data.u64 = c->cid};
    epoll_ctl(lp->ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Close a connection for good (under c->mu): out of epoll and the table; the socket closes
 * with the last reference. The caller tells Python. */
static void finish_locked(LoopObject *lp, tb_conn *c) {
    if (c->closed) return;
    c->closed = 1;
    epoll_ctl(lp->ep, EPOLL_CTL_DEL, c->fd, NULL);
    shutdown(c->fd, SHUT_RDWR);
    int drop = 0;
    pthread_mutex_lock(&lp->tmu);
    uint32_t slot = (uint32_t)c->cid;
    if (slot < lp->nslots && lp->slots[slot] == c) {
        lp->slots[slot] = NULL;
        lp->gens[slot]++;
        lp->open--;
        drop = 1;
    }
    pthread_mutex_unlock(&lp->tmu);
    if (drop) tb_conn_put(c); /* the table's reference; the caller still holds one */
}

static void add_record_closed(tb_turn *t, tb_conn *c) {
    if (t->n >= MAX_RECORDS) return; /* cannot happen: a turn stops parsing before full */
    tb_record *r = &t->records[t->n++];
    r->conn = c;
    r->kind = TB_K_CLOSED;
    r->seq = 0;
    r->start = r->len = 0;
    r->copy = NULL;
    tb_conn_ref(c);
}

/* Serve one owned connection: parse what is buffered, read, parse again. Returns whether it
 * stays owned by this turn (it may have more to read). */
static int serve(LoopObject *lp, tb_turn *t, tb_conn *c, int may_read) {
    /* Room is kept for a CLOSED record of every connection this turn owns. */
    size_t room = MAX_RECORDS - MAX_EVENTS;
    int st = tb_conn_parse(c, t->records, &t->n, room, &t->infer);
    if (st == TB_NEED_MORE && may_read) {
        int got = tb_conn_read(c);
        if (got < 0) {
            pthread_mutex_lock(&c->mu);
            c->eof = 1;
            if (c->pending == 0 && !c->closed) {
                finish_locked(lp, c);
                add_record_closed(t, c);
            }
            pthread_mutex_unlock(&c->mu);
            return 0;
        }
        if (got == 0) return -1; /* nothing yet: re-arm */
        st = tb_conn_parse(c, t->records, &t->n, room, &t->infer);
    }
    return st == TB_STOP ? 0 : 1;
}

/* Let go of a connection at the end of a turn: re-arm it, or leave it paused / closed. */
static void release(LoopObject *lp, tb_conn *c) {
    pthread_mutex_lock(&c->mu);
    c->owned = 0;
    if (!c->closed && !c->eof && !c->broken) {
        int waiting = c->paused || tb_conn_has_frame(c);
        if (c->paused && c->pending <= c->paused_need) c->paused = 0;
        /* Frames already buffered: armed writable, so that a loop thread comes at once. */
        if (!c->paused) arm(lp, c, EPOLLIN | (waiting ? EPOLLOUT : 0));
    }
    pthread_mutex_unlock(&c->mu);
}

/* Send what the handler queued. A send that fails (peer gone) may leave a connection with
 * nothing pending: it is closed here and Python told (a CLOSED record). */
static void flush_dirty(LoopObject *lp, tb_turn *t) {
    for (size_t i = 0; i < t->n_dirty; i++) {
        tb_conn *c = t->dirty[i];
        pthread_mutex_lock(&c->mu);
        c->dirty = 0;
        if (!c->closed) {
            tb_conn_flush_locked(c);
            if (c->eof && c->pending == 0) {
                finish_locked(lp, c);
                add_record_closed(t, c);
            }
        }
        pthread_mutex_unlock(&c->mu);
        tb_conn_put(c);
    }
    t->n_dirty = 0;
}

static void call_handler(LoopObject *lp, tb_turn *t, double arrived);

/* flush_dirty, then hand any CLOSED records to Python (GIL taken), until nothing is left. */
static void flush_all(LoopObject *lp, tb_turn *t) {
    flush_dirty(lp, t);
    while (t->n) {
        PyGILState_STATE g = PyGILState_Ensure();
        call_handler(lp, t, 0.0);
        PyGILState_Release(g);
        flush_dirty(lp, t);
    }
}

static void handle_records(LoopObject *lp, tb_turn *t, tb_record *records, size_t n,
                           double arrived);

/* Hand the turn's records to Python (GIL held); drops their references. */
static void call_handler(LoopObject *lp, tb_turn *t, double arrived) {
    handle_records(lp, t, t->records, t->n, arrived);
    t->n = 0;
}

static void handle_records(LoopObject *lp, tb_turn *t, tb_record *records, size_t n,
                           double arrived) {
    PyObject *items = tb_records_to_list(records, n, &t->infer, arrived);
    for (size_t i = 0; i < n; i++) {
        free(records[i].copy);
        tb_conn_put(records[i].conn);
    }
    if (items == NULL) {
        PyErr_WriteUnraisable(lp->handler);
        return;
    }
    in_handler = t;
    PyObject *res = PyObject_CallOneArg(lp->handler, items);
    in_handler = NULL;
    Py_DECREF(items);
    if (res == NULL) PyErr_WriteUnraisable(lp->handler);
    Py_XDECREF(res);
}


static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Records another loop thread handed over, with their frames copied (its connections are
 * let go at once). */
typedef struct tb_deposit {
    struct tb_deposit *next;
    double arrived, handed;
    size_t n;
    tb_record records[];
} tb_deposit;

/* One loop thread at a time runs Python (the combiner); the others hand it their records and
 * go back to epoll, so that loop threads never queue for the GIL: a hand-over of the GIL is a
 * wake-up. Returns 1 when the caller is now the combiner, 0 when its records were handed
 * over (or, out of memory, -1: the caller runs them itself, waiting for the GIL). */
static int combine_or_deposit(LoopObject *lp, tb_turn *t, double arrived) {
    pthread_mutex_lock(&lp->cmu);
    if (!lp->combining) {
        lp->combining = 1;
        lp->busy_since = arrived;
        pthread_mutex_unlock(&lp->cmu);
        return 1;
    }
    /* The combiner has been in one call for long (a slow model run inline): do not wait for
     * it; run these here, taking the GIL when the model lets go of it. */
    int stuck = now_s() - lp->busy_since > COMBINE_WAIT_S;
    pthread_mutex_unlock(&lp->cmu);
    if (stuck) return -1;
    tb_deposit *d = malloc(sizeof *d + t->n * sizeof(tb_record));
    if (d == NULL) return -1;
    for (size_t i = 0; i < t->n; i++) {
        tb_record *r = &t->records[i];
        r->copy = malloc(r->len ? r->len : 1);
        if (r->copy == NULL) {
            for (size_t k = 0; k < i; k++) free(t->records[k].copy), t->records[k].copy = NULL;
            r->copy = NULL;
            free(d);
            return -1;
        }
        memcpy(r->copy, r->conn->rbuf + r->start, r->len);
    }
    memcpy(d->records, t->records, t->n * sizeof(tb_record));
    d->n = t->n;
    d->arrived = arrived;
    d->handed = now_s();
    d->next = NULL;
    pthread_mutex_lock(&lp->cmu);
    if (!lp->combining) { /* the combiner left meanwhile: run them here */
        lp->combining = 1;
        pthread_mutex_unlock(&lp->cmu);
        for (size_t i = 0; i < t->n; i++) free(t->records[i].copy), t->records[i].copy = NULL;
        free(d);
        return 1;
    }
    *lp->dep_tail = d;
    lp->dep_tail = &d->next;
    pthread_mutex_unlock(&lp->cmu);
    t->n = 0;
    return 0;
}

/* The combiner's next handed-over batch, or NULL (and it is no longer the combiner). */
static tb_deposit *take_deposit(LoopObject *lp) {
    pthread_mutex_lock(&lp->cmu);
    tb_deposit *d = lp->deposits;
    if (d) {
        lp->busy_since = now_s();
        lp->deposits = d->next;
        if (lp->deposits == NULL) lp->dep_tail = &lp->deposits;
    } else {
        lp->combining = 0;
    }
    pthread_mutex_unlock(&lp->cmu);
    return d;
}

/* Hand-overs the combiner has not taken within COMBINE_WAIT_S (it is in a slow call): all of
 * them, to be run by the calling thread; NULL if none. */
static tb_deposit *steal_stale(LoopObject *lp) {
    pthread_mutex_lock(&lp->cmu);
    tb_deposit *d = lp->deposits;
    if (d && now_s() - d->handed > COMBINE_WAIT_S) {
        lp->deposits = NULL;
        lp->dep_tail = &lp->deposits;
    } else {
        d = NULL;
    }
    pthread_mutex_unlock(&lp->cmu);
    return d;
}

static int has_deposits(LoopObject *lp) {
    pthread_mutex_lock(&lp->cmu);
    int any = lp->deposits != NULL;
    pthread_mutex_unlock(&lp->cmu);
    return any;
}

PyObject *tb_loop_run(LoopObject *lp, PyObject *unused) {
    (void)unused;
    tb_turn *t = calloc(1, sizeof *t);
    if (t == NULL) return PyErr_NoMemory();
    struct epoll_event events[MAX_EVENTS];
    Py_BEGIN_ALLOW_THREADS
    while (!__atomic_load_n(&lp->stopping, __ATOMIC_ACQUIRE)) {
        /* While hand-overs wait, wake within COMBINE_WAIT_S to take them if still waiting. */
        int n = epoll_wait(lp->ep, events, MAX_EVENTS,
                           has_deposits(lp) ? (int)(COMBINE_WAIT_S * 1000) + 1 : -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            break;
        }
        for (tb_deposit *d = steal_stale(lp), *next; d; d = next) {
            next = d->next;
            Py_BLOCK_THREADS
            handle_records(lp, t, d->records, d->n, d->arrived);
            Py_UNBLOCK_THREADS
            free(d);
            flush_all(lp, t);
        }
        double arrived = now_s();
        t->n_mine = 0;
        for (int i = 0; i < n; i++) {
            if (events[i].data.u64 == UINT64_MAX) continue; /* the stop event */
            tb_conn *c = lookup(lp, events[i].data.u64);
            if (c == NULL) continue;
            pthread_mutex_lock(&c->mu);
            int mine = !c->owned && !c->closed;
            c->owned = mine;
            pthread_mutex_unlock(&c->mu);
            if (!mine) {
                tb_conn_put(c);
                continue;
            }
            t->mine[t->n_mine++] = c;
        }
        /* Serve, hand to Python, send; then look once more at the same sockets (the peer's
         * next frame is often there by now: no epoll round, no wake-up). A connection is let
         * go only after the handler: its records point into its read buffer until then. */
        int st[MAX_EVENTS];
        for (int round = 0; round < RETRIES && t->n_mine; round++) {
            for (size_t i = 0; i < t->n_mine; i++) st[i] = serve(lp, t, t->mine[i], 1);
            int handed = t->n > 0;
            if (handed) {
                int role = combine_or_deposit(lp, t, arrived);
                if (role != 0) {
                    Py_BLOCK_THREADS
                    call_handler(lp, t, arrived);
                    Py_UNBLOCK_THREADS
                }
                for (size_t i = 0; i < t->n_mine; i++) tb_conn_compact(t->mine[i]);
                flush_all(lp, t);
                if (role == 1) {
                    tb_deposit *d;
                    while ((d = take_deposit(lp)) != NULL) {
                        Py_BLOCK_THREADS
                        handle_records(lp, t, d->records, d->n, d->arrived);
                        Py_UNBLOCK_THREADS
                        free(d);
                        flush_all(lp, t);
                    }
                } else if (role == 0) {
                    handed = 0; /* no second look: the combiner answers these later */
                }
                arrived = now_s();
            }
            size_t keep = 0;
            for (size_t i = 0; i < t->n_mine; i++) {
                tb_conn *c = t->mine[i];
                if (st[i] == 1 || (st[i] == -1 && round == 0 && handed)) {
                    t->mine[keep++] = c; /* more may come, or the peer answers quickly */
                } else {
                    release(lp, c);
                    tb_conn_put(c);
                }
            }
            t->n_mine = keep;
            if (!handed) break;
        }
        for (size_t i = 0; i < t->n_mine; i++) {
            release(lp, t->mine[i]);
            tb_conn_put(t->mine[i]);
        }
        t->n_mine = 0;
    }
    Py_END_ALLOW_THREADS
    free(t->dirty);
    free(t);
    Py_RETURN_NONE;
}

/* Queue a reply (data is taken) and send it now, or after the handler returns when called
 * from a loop thread's handler. Returns 1 when the connection closed (tell Python). */
int tb_loop_deliver(LoopObject *lp, tb_conn *c, uint64_t seq, uint8_t *data, size_t len,
                    int fd, int hangup, int gil_held) {
    tb_turn *t = in_handler;
    int defer = t != NULL && fd < 0 && !hangup;
    int resume, closed = 0;
    PyThreadState *save = NULL;
    if (gil_held && !defer) save = PyEval_SaveThread();
    pthread_mutex_lock(&c->mu);
    int fin = tb_conn_deliver_locked(c, seq, data, len, fd, hangup, &resume);
    if (!defer) tb_conn_flush_locked(c);
    if (!fin && c->eof && c->pending == 0 && !c->closed) fin = 1;
    if (fin) {
        finish_locked(lp, c);
        closed = 1;
    } else if (resume) {
        arm(lp, c, EPOLLIN | EPOLLOUT); /* writable at once: a loop thread parses what waits */
    } else if (defer && c->wlen && !c->dirty) {
        if (t->n_dirty == t->dirty_cap) {
            size_t cap = t->dirty_cap ? 2 * t->dirty_cap : 64;
            tb_conn **d = realloc(t->dirty, cap * sizeof *d);
            if (d == NULL) {
                tb_conn_flush_locked(c);
                goto out;
            }
            t->dirty = d;
            t->dirty_cap = cap;
        }
        c->dirty = 1;
        tb_conn_ref(c);
        t->dirty[t->n_dirty++] = c;
    }
out:
    pthread_mutex_unlock(&c->mu);
    if (save) PyEval_RestoreThread(save);
    return closed;
}

tb_conn *tb_loop_lookup(LoopObject *lp, uint64_t cid) { return lookup(lp, cid); }

int tb_loop_add(LoopObject *lp, int fd, uint64_t *cid_out) {
    pthread_mutex_lock(&lp->tmu);
    uint32_t slot = 0;
    while (slot < lp->nslots && lp->slots[slot]) slot++;
    if (slot == lp->nslots) {
        uint32_t n = lp->nslots ? 2 * lp->nslots : 64;
        tb_conn **s = realloc(lp->slots, n * sizeof *s);
        if (s == NULL) goto nomem;
        lp->slots = s;
        uint32_t *g = realloc(lp->gens, n * sizeof *g);
        if (g == NULL) goto nomem;
        lp->gens = g;
        for (uint32_t i = lp->nslots; i < n; i++) lp->slots[i] = NULL, lp->gens[i] = 1;
        lp->nslots = n;
    }
    uint64_t cid = ((uint64_t)lp->gens[slot] << 32) | slot;
    tb_conn *c = tb_conn_new(fd, cid);
    if (c == NULL) goto nomem;
    lp->slots[slot] = c;
    lp->open++;
    pthread_mutex_unlock(&lp->tmu);
    *cid_out = cid;
    return 0;
nomem:
    pthread_mutex_unlock(&lp->tmu);
    return ENOMEM;
}

int tb_loop_start(LoopObject *lp, uint64_t cid) {
    tb_conn *c = lookup(lp, cid);
    if (c == NULL) return EBADF;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLONESHOT, .data.u64 = cid};
    int err = epoll_ctl(lp->ep, EPOLL_CTL_ADD, c->fd, &ev) < 0 ? errno : 0;
    tb_conn_put(c);
    return err;
}

int tb_loop_close(LoopObject *lp, uint64_t cid) {
    tb_conn *c = lookup(lp, cid);
    if (c == NULL) return 0;
    pthread_mutex_lock(&c->mu);
    int was_open = !c->closed;
    finish_locked(lp, c);
    pthread_mutex_unlock(&c->mu);
    tb_conn_put(c);
    return was_open;
}

int tb_loop_init(LoopObject *lp) {
    pthread_mutex_init(&lp->tmu, NULL);
    pthread_mutex_init(&lp->cmu, NULL);
    lp->deposits = NULL;
    lp->dep_tail = &lp->deposits;
    lp->ep = epoll_create1(EPOLL_CLOEXEC);
    if (lp->ep < 0) return errno;
    lp->stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (lp->stopfd < 0) return errno;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = UINT64_MAX};
    if (epoll_ctl(lp->ep, EPOLL_CTL_ADD, lp->stopfd, &ev) < 0) return errno;
    return 0;
}

void tb_loop_stop(LoopObject *lp) {

    __atomic_store_n(&lp->stopping, 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    ssize_t n = write(lp->stopfd, &one, sizeof one); /* never read: wakes every thread */
    (void)n;
}

void tb_loop_free(LoopObject *lp) {
    for (uint32_t i = 0; i < lp->nslots; i++)
        if (lp->slots[i]) tb_conn_put(lp->slots[i]);
    free(lp->slots);
    free(lp->gens);
    if (lp->ep >= 0) close(lp->ep);
    if (lp->stopfd >= 0) close(lp->stopfd);
    for (tb_deposit *d = lp->deposits, *next; d; d = next) {
        next = d->next;
        for (size_t i = 0; i < d->n; i++) {
            free(d->records[i].copy);
            tb_conn_put(d->records[i].conn);
        }
        free(d);
    }
    pthread_mutex_destroy(&lp->tmu);
    pthread_mutex_destroy(&lp->cmu);
}
