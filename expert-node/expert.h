/* expert.h — medmoe-expert as an object: one routed expert of Med-MoE (its
 * FFN in every MoE layer) served to a medmoe-router over ZeroMQ
 * (docs/ARCHITECTURE.md, "Router ↔ expert wire").
 *
 * Offers new / run / destroy. mm_expert_new loads the compute backend and
 * only that expert's tensors (memory proportional to one expert), computes
 * the model fingerprint the Hello carries, starts the compute thread and
 * connects a DEALER (CurveZMQ when the key files are given) with a Hello
 * queued. mm_expert_run serves until *stop, a Refuse, or giving up; on *stop
 * it drains the batches already queued and says Bye, so the router re-sends
 * nothing it need not.
 *
 * Threads: mm_expert_run's caller owns the socket (Welcome, Work, Result,
 * heartbeats), so heartbeats go on however long a batch computes; the
 * compute thread owns the model and the tensors; with metrics_listen the
 * metrics server has its own (docs/ARCHITECTURE.md, "Observability").
 *
 *     mm_expert_options o;  mm_expert_options_default(&o);
 *     o.model = "ckpt";  o.expert = 2;  o.router = "tcp://10.0.0.5:5555";
 *     o.stop = &stop_flag;                      // set by SIGTERM
 *     mm_expert *e;  char err[1024];
 *     if (mm_expert_new(&o, &e, err, sizeof err)) {...}   // also logged
 *     int rc = mm_expert_run(e);                // until *o.stop: drain, Bye
 *     mm_expert_destroy(&e);
 */
#ifndef MM_EXPERT_H
#define MM_EXPERT_H

#include <signal.h>
#include <stddef.h>

#include "log.h"

typedef struct mm_expert mm_expert;

typedef struct mm_expert_options {
    const char *model;             /* checkpoint dir (required)                          */
    int expert;                    /* expert index to host, 0..63 (required)              */
    const char *router;            /* the router's endpoint, e.g. tcp://10.0.0.5:5555     */
    const char *backend;           /* "cpu" (default) or "vulkan"                         */
    int heartbeat_ms;              /* until the router's Welcome sets it (1000)           */
    int capacity;                  /* rows per batch accepted, more get BUSY; 0: no limit */
    unsigned fp_flags;             /* fingerprint mode (fingerprint.h), as the router's   */
    int weights;                   /* mm_weights, as the router's (default stored)        */
    const char *curve_server_key;  /* CurveZMQ: file with the router's public key; NULL:
                                      plaintext (then curve_key is NULL too)             */
    const char *curve_key;         /* CurveZMQ: file with this expert's secret key        */
    int give_up_ms;                /* run returns MM_ETIMEOUT when no router welcomed us
                                      for this long; 0: keep trying                      */
    const char *metrics_listen;    /* HOST:PORT for /metrics and /healthz; NULL: none     */
    const char *metrics_port_file; /* write the bound metrics port there; NULL: no        */
    mm_log_format log_format;      /* default text                                        */
    mm_log_level log_level;        /* default info                                        */
    /* fault injection for tests */
    int debug_delay_ms;  /* sleep this long before each batch reply                     */
    int debug_fail;      /* 1: every batch is answered ERROR_INTERNAL                   */
    int debug_no_answer; /* 1: Work is swallowed, heartbeats go on                      */
    /* set (by a signal handler) to stop: run drains, says Bye and returns; NULL:
       run stops only on a Refuse or on giving up */
    volatile sig_atomic_t *stop;
} mm_expert_options;

void mm_expert_options_default(mm_expert_options *o);

/* Check the options, then (metrics endpoint first, so a liveness probe
 * passes during a long load) load the backend, the expert's tensors and its
 * fingerprint, start the compute thread and connect to the router. On
 * failure everything made so far is freed and the error is logged as well
 * as written to err. MM_EINVAL: an option is wrong in itself (the expert
 * index, an expert no MoE layer has, the metrics address); a checkpoint,
 * key file or backend that cannot be used gives another code (MM_EPROTO
 * where the loader said MM_EINVAL; the log line keeps the loader's code),
 * so callers can tell usage from environment. The option strings are
 * borrowed: they must outlive the expert. */
int mm_expert_new(const mm_expert_options *o, mm_expert **out, char *err, size_t errlen);

/* Serve the router until *stop (then drain the queued batches for at most
 * 10 s and say Bye), reconnecting with a back-off whenever the router is
 * silent for 3 heartbeats. Returns MM_OK after *stop, MM_EPROTO when the
 * router refused us (wrong model or protocol version; the reason is
 * logged), MM_ETIMEOUT when give_up_ms passed without a Welcome, another
 * code when the socket failed (logged). Logs what it served on return. */
int mm_expert_run(mm_expert *e);

/* Stop the compute thread (after the batch in progress), free the queued
 * batches, close the socket, the metrics server and everything else; set
 * *e to NULL. NULL and *e == NULL are fine. */
void mm_expert_destroy(mm_expert **e);

#endif
