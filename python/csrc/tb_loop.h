/* The compiled event loop (tb_loop.c) and its Python face (tb_pyloop.c). */
#ifndef TB_LOOP_H
#define TB_LOOP_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>

#include "tb_conn.h"

typedef struct {
    PyObject_HEAD
    int ep, stopfd;
    int stopping;
    PyObject *handler;
    pthread_mutex_t tmu; /* guards the table below */
    tb_conn **slots;
    uint32_t *gens; /* a slot's generation is the high half of its connections' ids */
    uint32_t nslots;
    uint32_t open;
    pthread_mutex_t cmu; /* guards the three below */
    int combining;       /* a loop thread is running Python for everyone */
    double busy_since;   /* when its current call began */
    struct tb_deposit *deposits, **dep_tail;
} LoopObject;

int tb_loop_init(LoopObject *lp);
void tb_loop_free(LoopObject *lp);
void tb_loop_stop(LoopObject *lp);
PyObject *tb_loop_run(LoopObject *lp, PyObject *unused);
int tb_loop_add(LoopObject *lp, int fd, uint64_t *cid_out);
/* Start delivering a connection's events (after Python has filed it under its id). */
int tb_loop_start(LoopObject *lp, uint64_t cid);
int tb_loop_close(LoopObject *lp, uint64_t cid);
tb_conn *tb_loop_lookup(LoopObject *lp, uint64_t cid);
int tb_loop_deliver(LoopObject *lp, tb_conn *c, uint64_t seq, uint8_t *data, size_t len,
                    int fd, int hangup, int gil_held);
/* The records of a turn as the handler's list of tuples (GIL held); NULL on error. */
PyObject *tb_records_to_list(const tb_record *records, size_t n, tb_infer *scratch,
                             double arrived);
extern PyTypeObject LoopType;

#endif
