/* expert.c — the medmoe-expert object (expert.h): one routed expert of
 * Med-MoE computing batches of token rows for a medmoe-router over ZeroMQ
 * (proto/expert_wire.proto; docs/ARCHITECTURE.md, "Router ↔ expert wire").
 *
 * The session (Paranoid Pirate shape): connect a DEALER, Hello, Welcome;
 * then Work -> Result; heartbeats while idle; the router silent for 3
 * intervals -> a new socket after a back-off and Hello again.
 *
 * Deadlines: a Work's deadline_ms counts from its receipt; a batch whose
 * deadline passed while it waited for the compute thread is answered
 * ERROR_EXPIRED without compute (its cases are out of time; the router fails
 * them and does not blame this replica). A probe Work (a quarantined
 * replica's test, one synthetic row) is computed like any other.
 *
 * Observability (docs/ARCHITECTURE.md, "Observability"): one log line per
 * event (common/log.h) and, with metrics_listen, a Prometheus endpoint
 * (common/metrics.h) with the medmoe_expert_* series listed in
 * s_metrics_init.
 */
#include "expert.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "clock.h"
#include "fingerprint.h"
#include "medmoe.h"
#include "metrics.h"
#include "status.h"
#include "wire.h"

#define S_DEAD_AFTER 3        /* silent heartbeats before the router counts as gone */
#define S_BACKOFF_MAX_MS 8000 /* longest pause between reconnections                */
#define S_QUEUE_MAX 64        /* batches queued for the compute thread; more: BUSY  */
#define S_DRAIN_MS 10000      /* on stop, finish queued batches for at most this    */
#define S_MAX_EXPERTS 64      /* mm_model_options.experts_mask has 64 bits          */

/* One Work message on its way through the compute thread. */
typedef struct s_job {
    struct s_job *next; /* queue link                                         */
    mm_wire_msg msg;    /* the Work and its tensor frame (owned)              */
    unsigned gen;       /* connection it arrived on: replies to older ones die */
    double t0;          /* receipt time (ms)                                  */
    double deadline;    /* t0 + Work.deadline_ms: not computed after (0: none) */
    int code;           /* ErrorCode of the reply                             */
    char text[512];     /* message when code != OK                            */
    mm_wire_buf *out;   /* y rows when code == OK                             */
} s_job;

struct mm_expert {
    mm_expert_options o;           /* as given (the strings are the caller's)         */
    volatile sig_atomic_t *stop;   /* o.stop, or &no_stop                              */
    volatile sig_atomic_t no_stop; /* never set: the stop flag when o.stop is NULL     */
    mm_backend *be;                /* the compute backend (owns device memory)         */
    mm_model *m;                   /* this expert's tensors only (compute thread)      */
    const mm_config *cfg;          /* m's config                                       */
    char fp[MM_FINGERPRINT_HEX];   /* model fingerprint sent in the Hello              */
    char node[160];                /* host:pid                                         */
    char backend[200];             /* backend description sent in the Hello            */
    char server_key[1][41];        /* CurveZMQ: the router's public key (z85)          */
    char secret[1][41];            /* CurveZMQ: our secret key (z85)                   */
    char public_key[41];           /* CurveZMQ: our public key, derived from secret    */
    void *zctx, *sock;             /* ZeroMQ context and the DEALER (NULL: none now)   */
    int hb_ms;                     /* heartbeat interval (the router's, once welcomed) */
    int welcomed;                  /* 1 after Welcome on this socket                   */
    double last_recv_ms;           /* last message from the router (or connect time)   */
    double last_send_ms;           /* last message sent                                */
    double lost_since_ms;          /* since when no router has welcomed us             */
    unsigned gen;                  /* connection generation (bumped per new socket)    */
    /* The compute thread owns the model; the run thread owns the socket, so
     * heartbeats go on while a long batch computes. */
    pthread_t worker;
    int worker_started;             /* worker is running (join it in destroy)           */
    int sync_ready;                 /* mu and cv are initialised                        */
    pthread_mutex_t mu;             /* guards todo, done, n_todo, quit, busy            */
    pthread_cond_t cv;              /* todo non-empty or quit                           */
    s_job *todo, *todo_tail;        /* validated Work waiting for the compute thread    */
    s_job *done, *done_tail;        /* computed, waiting for the run thread to reply    */
    int n_todo;                     /* length of todo                                   */
    int quit;                       /* 1: the compute thread returns                    */
    int busy;                       /* the compute thread holds a job                   */
    int wake[2];                    /* pipe: the worker writes a byte per finished job  */
    mm_tensor *x, *y;               /* [rows_cached, hidden] reused while rows repeat   */
    size_t rows_cached;             /* rows of x and y (compute thread)                 */
    uint64_t batches, rows, errors; /* answered OK, their rows, error answers           */
    /* Observability: the logger and the metrics (families owned by reg; the
     * server's thread renders them, any thread updates them). */
    mm_log *log;
    mm_metrics *reg;
    mm_metrics_server *srv;
    mm_metric *m_batches, *m_rows, *m_compute, *m_queue, *m_memory, *m_errors;
};

/* A /proc/self/status field in MiB (VmRSS, RssAnon...), -1 if unknown.
 * RssAnon is what this process owns; the rest of VmRSS is mapped checkpoint
 * pages (page cache, shared, reclaimable). */
static double s_status_mib(const char *field) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f)
        return -1;
    char line[256];
    double kib = -1;
    size_t n = strlen(field);
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, field, n) && line[n] == ':') {
            kib = strtod(line + n + 1, NULL);
            break;
        }
    fclose(f);
    return kib < 0 ? -1 : kib / 1024.0;
}

/* Sleep up to ms, waking early on a signal. */
static void s_nap(const mm_expert *e, int ms) {
    while (ms > 0 && !*e->stop) {
        int step = ms < 50 ? ms : 50;
        struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)step * 1000000L};
        nanosleep(&ts, NULL);
        ms -= step;
    }
}

static void s_log(mm_expert *e, mm_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void s_log(mm_expert *e, mm_log_level level, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    mm_vlogf(e->log, level, NULL, fmt, ap);
    va_end(ap);
}

/* The RSS, sampled at each scrape (from the metrics thread: reads /proc). */
static void s_collect(mm_metrics *reg, void *ctx) {
    mm_expert *e = ctx;
    (void)reg;
    double rss = mm_metrics_process_rss_bytes();
    if (rss >= 0)
        mm_metric_set(e->m_memory, rss);
}

/* The expert's series. No "expert" label on purpose: the router exports
 * medmoe_expert_queue_depth{expert="K"} (batches in flight to expert K) for
 * the HorizontalPodAutoscaler, and a selector expert="K" must not also sum
 * these per-pod series; Prometheus adds pod/instance labels to tell pods
 * apart. */
static int s_metrics_init(mm_expert *e, char *err, size_t errlen) {
    static const double compute_b[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                       0.05,   0.1,   0.25,   0.5,   1,    2.5};
    int rc = mm_metrics_new(&e->reg);
    if (rc != MM_OK)
        return mm_errorf(err, errlen, rc, "metrics registry: out of memory");
    e->m_batches = mm_metrics_counter(e->reg, "medmoe_expert_batches_total",
                                      "Batches computed and answered.", NULL);
    e->m_rows = mm_metrics_counter(e->reg, "medmoe_expert_rows_total",
                                   "Token rows computed in answered batches.", NULL);
    e->m_compute = mm_metrics_histogram(e->reg, "medmoe_expert_compute_seconds",
                                        "Compute time of one batch (upload, expert FFN in one "
                                        "MoE layer, download).",
                                        NULL, compute_b, sizeof compute_b / sizeof *compute_b);
    e->m_queue = mm_metrics_gauge(e->reg, "medmoe_expert_queue_depth",
                                  "Batches received and waiting for the compute thread.", NULL);
    e->m_memory = mm_metrics_gauge(e->reg, "medmoe_expert_memory_bytes",
                                   "Resident set size of this process (includes mapped "
                                   "checkpoint pages).",
                                   NULL);
    e->m_errors = mm_metrics_counter(e->reg, "medmoe_expert_errors_total",
                                     "Batches answered with an error, by wire error code.", "code");
    if (!e->m_batches || !e->m_rows || !e->m_compute || !e->m_queue || !e->m_memory || !e->m_errors)
        return mm_errorf(err, errlen, MM_ERR, "metrics: %s", mm_metrics_error(e->reg));
    mm_metrics_on_collect(e->reg, s_collect, e);
    if ((rc = mm_metrics_serve(e->reg, e->o.metrics_listen, &e->srv, err, errlen)) != MM_OK)
        return rc;
    if (e->o.metrics_port_file &&
        (rc = mm_metrics_server_write_port(e->srv, e->o.metrics_port_file, err, errlen)) != MM_OK)
        return rc;
    s_log(e, MM_LOG_INFO, "metrics on http://%s/metrics (port %d)", e->o.metrics_listen,
          mm_metrics_server_port(e->srv));
    return MM_OK;
}

static int s_send(mm_expert *e, const Medmoe__Wire__Envelope *env, mm_wire_buf *t) {
    char err[256];
    int rc = mm_wire_send(e->sock, NULL, 0, env, t, err, sizeof err);
    if (rc == MM_OK)
        e->last_send_ms = mm_now_ms();
    else
        s_log(e, MM_LOG_WARN, "send failed: %s", err);
    return rc;
}

static void s_close(mm_expert *e) {
    if (e->sock)
        zmq_close(e->sock);
    e->sock = NULL;
    e->welcomed = 0;
    e->gen++;
}

/* A fresh DEALER, connected, with a Hello queued. */
static int s_connect(mm_expert *e, char *err, size_t errlen) {
    s_close(e);
    e->sock = zmq_socket(e->zctx, ZMQ_DEALER);
    if (!e->sock)
        return mm_errorf(err, errlen, MM_EIO, "zmq_socket: %s", zmq_strerror(zmq_errno()));
    int zero = 0, hwm = 1000;
    /* ZMQ_MAXMSGSIZE: a frame larger than the largest Work this expert takes
     * (--capacity rows, else MM_WIRE_MAX_ROWS, of hidden_size f32) closes
     * the connection before anything is allocated for it. */
    int64_t maxmsg;
    size_t rows = e->o.capacity > 0 && e->o.capacity < MM_WIRE_MAX_ROWS ? (size_t)e->o.capacity
                                                                        : MM_WIRE_MAX_ROWS;
    int rc0 = mm_wire_max_frame(rows, (size_t)e->cfg->hidden_size, &maxmsg, err, errlen);
    if (rc0 != MM_OK)
        return rc0;
    zmq_setsockopt(e->sock, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(e->sock, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(e->sock, ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(e->sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    if (e->o.curve_server_key) {
        zmq_setsockopt(e->sock, ZMQ_CURVE_SERVERKEY, e->server_key[0], 40);
        zmq_setsockopt(e->sock, ZMQ_CURVE_PUBLICKEY, e->public_key, 40);
        zmq_setsockopt(e->sock, ZMQ_CURVE_SECRETKEY, e->secret[0], 40);
    }
    if (zmq_connect(e->sock, e->o.router) != 0)
        return mm_errorf(err, errlen, MM_EIO, "connect %s: %s", e->o.router,
                         zmq_strerror(zmq_errno()));
    Medmoe__Wire__Hello h = MEDMOE__WIRE__HELLO__INIT;
    h.version = MM_WIRE_VERSION;
    h.expert = e->o.expert;
    h.fingerprint = e->fp;
    h.backend = e->backend;
    h.capacity = (uint32_t)e->o.capacity;
    h.node = e->node;
    Medmoe__Wire__Envelope env = MEDMOE__WIRE__ENVELOPE__INIT;
    env.body_case = MM_WIRE_HELLO;
    env.hello = &h;
    e->last_recv_ms = mm_now_ms(); /* the silence clock starts now */
    int rc = s_send(e, &env, NULL);
    return rc == MM_OK ? MM_OK : mm_errorf(err, errlen, rc, "sending the Hello failed (logged)");
}

static void s_job_free(s_job *j) {
    if (!j)
        return;
    mm_wire_msg_clear(&j->msg);
    mm_wire_buf_unref(&j->out);
    free(j);
}

/* Check every field of a Work before it is queued. 0: fine, else the
 * ErrorCode to answer with (text says why). */
static int s_validate(mm_expert *e, const mm_wire_msg *msg, char *text, size_t len) {
    const mm_config *c = e->cfg;
    mm_wire_work_rules rules = {.n_moe_layers = c->n_moe_layers,
                                .moe_layers_idx = c->moe_layers_idx,
                                .hidden = (size_t)c->hidden_size,
                                .expert = e->o.expert,
                                .capacity = e->o.capacity};
    int code = mm_wire_check_work(msg->env->work, msg->tensor_len, &rules, text, len);
    if (code)
        return code;
    if (*e->stop) {
        snprintf(text, len, "shutting down");
        return MEDMOE__WIRE__ERROR_CODE__ERROR_DRAINING;
    }
    return 0;
}

/* Compute one validated job (compute thread): j->out or j->code/j->text. */
static void s_compute(mm_expert *e, s_job *j) {
    const Medmoe__Wire__Work *w = j->msg.env->work;
    double now = mm_now_ms();
    if (j->deadline > 0 && now >= j->deadline) {
        /* The cases it serves are out of time: computing it helps nobody. */
        snprintf(j->text, sizeof j->text,
                 "deadline of %u ms passed before compute (%.0f ms in the queue)", w->deadline_ms,
                 now - j->t0);
        j->code = MEDMOE__WIRE__ERROR_CODE__ERROR_EXPIRED;
        return;
    }
    if (e->o.debug_fail) {
        snprintf(j->text, sizeof j->text, "--debug-fail-batches");
        j->code = MEDMOE__WIRE__ERROR_CODE__ERROR_INTERNAL;
        return;
    }
    mm_backend *be = mm_model_backend(e->m);
    size_t H = (size_t)e->cfg->hidden_size, want = j->msg.tensor_len;
    int rc = MM_OK;
    char *err = j->text;
    size_t errlen = sizeof j->text;
    if (e->rows_cached != w->rows) {
        mm_tensor_destroy(&e->x);
        mm_tensor_destroy(&e->y);
        e->rows_cached = 0;
        if ((rc = mm_tensor_new_2d(be, MM_F32, w->rows, H, &e->x)) ||
            (rc = mm_tensor_new_2d(be, MM_F32, w->rows, H, &e->y))) {
            snprintf(err, errlen, "tensors of %u x %zu: %s", w->rows, H, mm_backend_error(be));
            mm_tensor_destroy(&e->x);
        } else {
            e->rows_cached = w->rows;
        }
    }
    if (rc == MM_OK) {
        const void *src = j->msg.tensor;
        float *tmp = NULL;
        if ((uintptr_t)src % _Alignof(float)) { /* ZeroMQ frames are not promised aligned */
            tmp = malloc(want);
            if (tmp)
                memcpy(tmp, src, want);
            src = tmp;
        }
        if (!src) {
            rc = MM_ENOMEM;
            snprintf(err, errlen, "out of memory");
        } else if ((rc = mm_tensor_set(e->x, src, MM_F32)) != MM_OK) {
            snprintf(err, errlen, "upload: %s", mm_backend_error(be));
        }
        free(tmp);
    }
    if (rc == MM_OK)
        rc = mm_model_expert_forward(e->m, w->moe, w->expert, e->x, e->y, err, errlen);
    if (rc == MM_OK && !(j->out = mm_wire_buf_new(want))) {
        rc = MM_ENOMEM;
        snprintf(err, errlen, "out of memory for %zu bytes", want);
    }
    if (rc == MM_OK && (rc = mm_tensor_get(e->y, j->out->data)) != MM_OK)
        snprintf(err, errlen, "download: %s", mm_backend_error(be));
    if (rc != MM_OK) {
        mm_wire_buf_unref(&j->out);
        j->code = MEDMOE__WIRE__ERROR_CODE__ERROR_INTERNAL;
        return;
    }
    if (e->o.debug_delay_ms)
        s_nap(e, e->o.debug_delay_ms);
    j->code = MEDMOE__WIRE__ERROR_CODE__ERROR_OK;
}

static void *s_worker(void *arg) {
    mm_expert *e = arg;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        while (!e->todo && !e->quit)
            pthread_cond_wait(&e->cv, &e->mu);
        s_job *j = e->todo;
        if (e->quit) { /* queued jobs are freed by main; the router re-sends them */
            pthread_mutex_unlock(&e->mu);
            return NULL;
        }
        e->todo = j->next;
        if (!e->todo)
            e->todo_tail = NULL;
        e->n_todo--;
        e->busy = 1;
        mm_metric_set(e->m_queue, e->n_todo);
        pthread_mutex_unlock(&e->mu);

        double t = mm_now_ms();
        s_compute(e, j);
        mm_metric_observe(e->m_compute, (mm_now_ms() - t) / 1e3);

        pthread_mutex_lock(&e->mu);
        j->next = NULL;
        if (e->done_tail)
            e->done_tail->next = j;
        else
            e->done = j;
        e->done_tail = j;
        e->busy = 0;
        pthread_mutex_unlock(&e->mu);
        char one = 1;
        if (write(e->wake[1], &one, 1) < 0) {
            /* the pipe is full: the run thread has wake-ups pending anyway */
        }
    }
}

/* The reply to j (run thread). */
static void s_reply(mm_expert *e, s_job *j) {
    const Medmoe__Wire__Work *w = j->msg.env->work;
    Medmoe__Wire__Result r = MEDMOE__WIRE__RESULT__INIT;
    r.batch_id = w->batch_id;
    r.layer = w->layer;
    r.moe = w->moe;
    r.expert = w->expert;
    r.rows = w->rows;
    r.width = w->width;
    r.dtype = w->dtype;
    r.error = j->code;
    r.compute_us = (uint64_t)((mm_now_ms() - j->t0) * 1e3);
    Medmoe__Wire__Envelope env = MEDMOE__WIRE__ENVELOPE__INIT;
    env.body_case = MM_WIRE_RESULT;
    env.result = &r;
    if (j->code != MEDMOE__WIRE__ERROR_CODE__ERROR_OK) {
        r.message = j->text;
        e->errors++;
        mm_metric_add(e->m_errors, 1, mm_wire_error_str(j->code));
        s_log(e, MM_LOG_WARN, "batch %llu: %s: %s", (unsigned long long)w->batch_id,
              mm_wire_error_str(j->code), j->text);
        s_send(e, &env, NULL);
        return;
    }
    if (s_send(e, &env, j->out) == MM_OK) {
        e->batches++;
        mm_metric_add(e->m_batches, 1);
        mm_metric_add(e->m_rows, w->rows);
        e->rows += w->rows;
    }
}

/* Send the replies of finished jobs that belong to the current connection. */
static void s_flush_done(mm_expert *e) {
    char buf[256];
    while (read(e->wake[0], buf, sizeof buf) > 0) {
    }
    pthread_mutex_lock(&e->mu);
    s_job *j = e->done;
    e->done = e->done_tail = NULL;
    pthread_mutex_unlock(&e->mu);
    while (j) {
        s_job *next = j->next;
        if (j->gen == e->gen && e->sock)
            s_reply(e, j);
        else
            s_log(e, MM_LOG_WARN, "dropped the reply to batch %llu: its connection is gone",
                  (unsigned long long)j->msg.env->work->batch_id);
        s_job_free(j);
        j = next;
    }
}

/* Validate a Work and queue it for the compute thread (takes j). */
static void s_work(mm_expert *e, s_job *j) {
    j->gen = e->gen;
    j->t0 = mm_now_ms();
    const Medmoe__Wire__Work *w = j->msg.env->work;
    j->deadline = w->deadline_ms ? j->t0 + w->deadline_ms : 0;
    if (e->o.debug_no_answer) {
        s_log(e, MM_LOG_INFO, "--debug-never-answer: ignoring %s %llu (layer %d, %u rows)",
              w->probe ? "probe" : "batch", (unsigned long long)w->batch_id, w->layer, w->rows);
        s_job_free(j);
        return;
    }
    int code = s_validate(e, &j->msg, j->text, sizeof j->text);
    pthread_mutex_lock(&e->mu);
    if (!code && e->n_todo >= S_QUEUE_MAX) {
        snprintf(j->text, sizeof j->text, "%d batches queued", e->n_todo);
        code = MEDMOE__WIRE__ERROR_CODE__ERROR_BUSY;
    }
    if (!code) {
        j->next = NULL;
        if (e->todo_tail)
            e->todo_tail->next = j;
        else
            e->todo = j;
        e->todo_tail = j;
        e->n_todo++;
        mm_metric_set(e->m_queue, e->n_todo);
        pthread_cond_signal(&e->cv);
    }
    pthread_mutex_unlock(&e->mu);
    if (code) {
        j->code = code;
        s_reply(e, j);
        s_job_free(j);
    }
}

/* Handle one message. MM_OK: handled (or dropped as malformed), MM_EAGAIN:
 * none waiting, MM_EPROTO: the router refused us, MM_EIO / MM_ENOMEM: the
 * socket or memory failed (logged). */
static int s_handle(mm_expert *e) {
    char err[256];
    s_job *j = calloc(1, sizeof *j); /* received in place: the frame is not moved */
    if (!j) {
        s_log(e, MM_LOG_ERROR, "out of memory");
        return MM_ENOMEM;
    }
    int rc = mm_wire_recv(e->sock, 0, &j->msg, err, sizeof err);
    if (rc != MM_OK)
        free(j);
    if (rc == MM_EAGAIN || rc == MM_EIO)
        return rc;
    if (rc == MM_EPROTO) {
        s_log(e, MM_LOG_WARN, "dropped a malformed message: %s", err);
        return MM_OK;
    }
    mm_wire_msg msg = j->msg; /* a view for the non-Work cases below */
    e->last_recv_ms = mm_now_ms();
    int out = MM_OK;
    switch (msg.env->body_case) {
    case MM_WIRE_WELCOME: {
        const Medmoe__Wire__Welcome *w = msg.env->welcome;
        if (w->version != MM_WIRE_VERSION) {
            s_log(e, MM_LOG_WARN, "dropped a Welcome of protocol version %u (we speak %u)",
                  w->version, MM_WIRE_VERSION);
            break;
        }
        e->welcomed = 1;
        e->lost_since_ms = 0;
        if (w->heartbeat_ms >= 1 && w->heartbeat_ms <= 600000)
            e->hb_ms = (int)w->heartbeat_ms;
        s_log(e, MM_LOG_INFO, "connected to %s as replica %s (expert %d, heartbeat %d ms)",
              e->o.router, w->replica_id ? w->replica_id : "?", e->o.expert, e->hb_ms);
        break;
    }
    case MM_WIRE_REFUSE:
        s_log(e, MM_LOG_ERROR, "refused by router: %s",
              msg.env->refuse->reason ? msg.env->refuse->reason : "(no reason)");
        out = MM_EPROTO;
        break;
    case MM_WIRE_WORK:
        if (!e->welcomed) {
            s_log(e, MM_LOG_WARN, "dropped Work before Welcome");
            break;
        }
        s_work(e, j);
        return MM_OK;
    case MM_WIRE_HEARTBEAT: break;
    default:
        s_log(e, MM_LOG_WARN, "dropped an unexpected message (body %d)", (int)msg.env->body_case);
        break;
    }
    s_job_free(j);
    return out;
}

static void s_heartbeat_if_due(mm_expert *e, double now) {
    if (e->welcomed && now - e->last_send_ms >= e->hb_ms) {
        Medmoe__Wire__Heartbeat hb = MEDMOE__WIRE__HEARTBEAT__INIT;
        Medmoe__Wire__Envelope env = MEDMOE__WIRE__ENVELOPE__INIT;
        env.body_case = MM_WIRE_HEARTBEAT;
        env.heartbeat = &hb;
        s_send(e, &env, NULL);
    }
}

/* After *stop (SIGTERM): reply to the batches already queued or being computed
 * (new Work is answered DRAINING by s_work's validation, so the router
 * sends it elsewhere), for at most S_DRAIN_MS; then the caller says Bye.
 * Scaling down then costs no recomputation. */
static void s_drain(mm_expert *e) {
    double until = mm_now_ms() + S_DRAIN_MS;
    int n_left = 0;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        int idle = !e->todo && !e->busy;
        n_left = e->n_todo + e->busy;
        pthread_mutex_unlock(&e->mu);
        s_flush_done(e);
        if (idle || mm_now_ms() >= until)
            break;
        zmq_pollitem_t it[2] = {{.socket = e->sock, .events = ZMQ_POLLIN},
                                {.fd = e->wake[0], .events = ZMQ_POLLIN}};
        if (zmq_poll(it, 2, 50) > 0 && (it[0].revents & ZMQ_POLLIN)) {
            for (int i = 0; i < 100; i++)
                if (s_handle(e) != MM_OK)
                    break;
        }
        s_heartbeat_if_due(e, mm_now_ms());
    }
    if (n_left)
        s_log(e, MM_LOG_WARN,
              "drain: %d batch(es) still unanswered after %d ms; the router re-sends them", n_left,
              S_DRAIN_MS);
    else
        s_log(e, MM_LOG_INFO, "drained: every queued batch answered");
}

/* Serve until *stop: MM_OK, or why it stopped early (logged). */
static int s_serve(mm_expert *e) {
    char err[512];
    int backoff = e->o.heartbeat_ms;
    while (!*e->stop) {
        zmq_pollitem_t it[2] = {{.socket = e->sock, .events = ZMQ_POLLIN},
                                {.fd = e->wake[0], .events = ZMQ_POLLIN}};
        int rc = zmq_poll(it, 2, e->hb_ms);
        if (rc < 0 && zmq_errno() != EINTR) {
            s_log(e, MM_LOG_ERROR, "poll: %s", zmq_strerror(zmq_errno()));
            return MM_EIO;
        }
        if (rc > 0 && (it[1].revents & ZMQ_POLLIN))
            s_flush_done(e);
        if (rc > 0 && (it[0].revents & ZMQ_POLLIN)) {
            for (int i = 0; i < 100 && !*e->stop; i++) {
                int h = s_handle(e);
                if (h == MM_EAGAIN)
                    break;
                if (h != MM_OK)
                    return h; /* refused (MM_EPROTO), or the socket failed */
            }
        }
        double now = mm_now_ms();
        if (e->welcomed)
            backoff = e->hb_ms;
        if (now - e->last_recv_ms >= S_DEAD_AFTER * e->hb_ms) {
            if (e->o.give_up_ms && e->lost_since_ms && now - e->lost_since_ms >= e->o.give_up_ms) {
                s_log(e, MM_LOG_ERROR, "no router welcomed us for %d ms: giving up",
                      e->o.give_up_ms);
                return MM_ETIMEOUT;
            }
            if (!e->lost_since_ms)
                e->lost_since_ms = now;
            s_log(e, MM_LOG_WARN, "%s silent for %.0f ms (%s): reconnecting in %d ms", e->o.router,
                  now - e->last_recv_ms, e->welcomed ? "connection lost" : "no Welcome yet",
                  backoff);
            s_close(e);
            s_nap(e, backoff);
            backoff = backoff * 2 > S_BACKOFF_MAX_MS ? S_BACKOFF_MAX_MS : backoff * 2;
            if (*e->stop)
                break;
            if ((rc = s_connect(e, err, sizeof err)) != MM_OK) {
                s_log(e, MM_LOG_ERROR, "%s", err);
                return rc;
            }
            continue;
        }
        s_heartbeat_if_due(e, now);
    }
    /* Stopped: drain, then say Bye so the router re-routes at once instead of
     * after 3 beats. */
    if (e->sock && e->welcomed) {
        s_drain(e);
        Medmoe__Wire__Bye bye = MEDMOE__WIRE__BYE__INIT;
        bye.reason = "shutting down (signal)";
        Medmoe__Wire__Envelope env = MEDMOE__WIRE__ENVELOPE__INIT;
        env.body_case = MM_WIRE_BYE;
        env.bye = &bye;
        s_send(e, &env, NULL);
        int linger = 500; /* give the Bye a moment to leave (zmq_ctx_term waits for it) */
        zmq_setsockopt(e->sock, ZMQ_LINGER, &linger, sizeof linger);
    }
    return MM_OK;
}

int mm_expert_run(mm_expert *e) {
    int rc = s_serve(e);
    s_log(e, MM_LOG_INFO, "served %llu batch(es), %llu row(s), %llu error repl%s; exiting",
          (unsigned long long)e->batches, (unsigned long long)e->rows,
          (unsigned long long)e->errors, e->errors == 1 ? "y" : "ies");
    return rc;
}

/* ---- new / destroy ----------------------------------------------------------- */

void mm_expert_options_default(mm_expert_options *o) {
    memset(o, 0, sizeof *o);
    o->expert = -1;
    o->backend = "cpu";
    o->heartbeat_ms = 1000;
    o->log_format = MM_LOG_TEXT;
    o->log_level = MM_LOG_INFO;
}

/* Options that are wrong in themselves, before anything is loaded. */
static int s_check_options(const mm_expert_options *o, char *err, size_t errlen) {
    if (!o->model || !o->router || o->expert < 0)
        return mm_errorf(err, errlen, MM_EINVAL, "the model, the expert and the router are needed");
    /* worded with the flag's name: medmoe-expert's user reads this line */
    if (o->expert >= S_MAX_EXPERTS)
        return mm_errorf(err, errlen, MM_EINVAL, "--expert %d: at most %d experts", o->expert,
                         S_MAX_EXPERTS);
    if (!o->curve_server_key != !o->curve_key)
        return mm_errorf(err, errlen, MM_EINVAL,
                         "the router's public key and our secret key go together");
    if (o->heartbeat_ms < 1 || o->capacity < 0 || o->give_up_ms < 0 || o->debug_delay_ms < 0)
        return mm_errorf(err, errlen, MM_EINVAL,
                         "heartbeat %d ms, capacity %d, give-up %d ms, delay %d ms: out of range",
                         o->heartbeat_ms, o->capacity, o->give_up_ms, o->debug_delay_ms);
    if (o->metrics_port_file && !o->metrics_listen)
        return mm_errorf(err, errlen, MM_EINVAL, "a metrics port file needs a metrics address");
    return MM_OK;
}

/* Everything mm_expert_new makes, in order; the caller frees on failure.
 * *usage = 1 when an option itself is wrong: the loaders' own MM_EINVAL (an
 * unusable checkpoint, key file or backend name) is not a usage error. */
static int s_open(mm_expert *e, int *usage, char *err, size_t errlen) {
    const mm_expert_options *o = &e->o;
    int rc;
    *usage = 1;
    if ((rc = s_check_options(o, err, errlen)) != MM_OK)
        return rc;
    *usage = 0;
    if (o->curve_server_key) {
        size_t k = 0, s = 0;
        if ((rc = mm_wire_read_keys(o->curve_server_key, e->server_key, 1, &k, err, errlen)) ||
            (rc = mm_wire_read_keys(o->curve_key, e->secret, 1, &s, err, errlen)))
            return rc;
        if (zmq_curve_public(e->public_key, e->secret[0]) != 0)
            return mm_errorf(err, errlen, MM_EINVAL, "%s: not a CURVE secret key", o->curve_key);
    }
    /* The endpoint comes up before the (possibly long) load, so a liveness
     * probe on /healthz passes while the checkpoint maps. Its MM_EINVAL (a
     * bad address) is a usage error. */
    if (o->metrics_listen && (rc = s_metrics_init(e, err, errlen)) != MM_OK) {
        *usage = rc == MM_EINVAL;
        return rc;
    }
    double t0 = mm_now_ms();
    if ((rc = mm_backend_new(o->backend, &e->be, err, errlen)) != MM_OK)
        return rc;
    mm_model_options mo;
    mm_model_options_default(&mo);
    mo.load_trunk = 0;
    mo.experts_mask = 1ull << o->expert;
    mo.weights = (mm_weights)o->weights;
    if ((rc = mm_model_load(o->model, e->be, &mo, &e->m, err, errlen)) != MM_OK)
        return rc;
    e->cfg = mm_model_config(e->m);
    int in_some = 0;
    for (int i = 0; i < e->cfg->n_moe_layers; i++)
        in_some |= o->expert < e->cfg->num_experts[i];
    if (!in_some) {
        *usage = 1;
        return mm_errorf(err, errlen, MM_EINVAL, "--expert %d: no MoE layer has that expert",
                         o->expert);
    }
    double t_fp = mm_now_ms();
    char cfg_path[4096];
    if (snprintf(cfg_path, sizeof cfg_path, "%s/config.json", o->model) >= (int)sizeof cfg_path)
        return mm_errorf(err, errlen, MM_EINVAL, "%s: path too long", o->model);
    if ((rc = mm_fingerprint_expert(cfg_path, mm_model_checkpoint(e->m), e->cfg, o->expert,
                                    o->fp_flags | MM_FINGERPRINT_WEIGHTS(o->weights), e->fp, err,
                                    errlen)) != MM_OK)
        return rc;
    snprintf(e->backend, sizeof e->backend, "%s", mm_backend_describe(e->be));
    s_log(e, MM_LOG_INFO,
          "expert %d of %s loaded in %.0f ms, fingerprint (%s) %.16s... in %.0f ms, RSS %.1f MiB "
          "(anonymous %.1f MiB), backend %s",
          o->expert, o->model, t_fp - t0, o->fp_flags ? "headers" : "full", e->fp,
          mm_now_ms() - t_fp, s_status_mib("VmRSS"), s_status_mib("RssAnon"), e->backend);
    if (!(e->zctx = zmq_ctx_new()))
        return mm_errorf(err, errlen, MM_EIO, "zmq_ctx_new failed");
    if (pipe2(e->wake, O_NONBLOCK | O_CLOEXEC) != 0)
        return mm_errorf(err, errlen, MM_EIO, "pipe: %s", strerror(errno));
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    e->sync_ready = 1;
    if (pthread_create(&e->worker, NULL, s_worker, e) != 0)
        return mm_errorf(err, errlen, MM_ERR, "cannot start the compute thread");
    e->worker_started = 1;
    e->lost_since_ms = mm_now_ms(); /* the give-up clock starts with the first connect */
    return s_connect(e, err, errlen);
}

int mm_expert_new(const mm_expert_options *o, mm_expert **out, char *err, size_t errlen) {
    *out = NULL;
    mm_expert *e = calloc(1, sizeof *e);
    if (!e)
        return mm_errorf(err, errlen, MM_ENOMEM, "out of memory");
    e->o = *o;
    e->stop = o->stop ? o->stop : &e->no_stop;
    e->wake[0] = e->wake[1] = -1;
    e->hb_ms = o->heartbeat_ms;
    /* a NULL logger (out of memory) still logs, as text to stderr */
    mm_log_new("medmoe-expert", stderr, o->log_format, o->log_level, &e->log);
    char host[128] = "?";
    gethostname(host, sizeof host);
    host[sizeof host - 1] = 0;
    snprintf(e->node, sizeof e->node, "%s:%ld", host, (long)getpid());
    int usage = 0, rc = s_open(e, &usage, err, errlen);
    if (rc != MM_OK) {
        s_log(e, MM_LOG_ERROR, "%s: %s", mm_status_str(rc), err);
        mm_expert_destroy(&e);
        return usage ? MM_EINVAL : rc == MM_EINVAL ? MM_EPROTO : rc;
    }
    *out = e;
    return MM_OK;
}

static void s_job_list_free(s_job *j) {
    while (j) {
        s_job *next = j->next;
        s_job_free(j);
        j = next;
    }
}

void mm_expert_destroy(mm_expert **ep) {
    if (!ep || !*ep)
        return;
    mm_expert *e = *ep;
    if (e->worker_started) {
        pthread_mutex_lock(&e->mu);
        e->quit = 1;
        pthread_cond_signal(&e->cv);
        pthread_mutex_unlock(&e->mu);
        pthread_join(e->worker, NULL); /* waits for the batch in progress, if any */
    }
    /* jobs left unanswered: the router re-sends them */
    s_job_list_free(e->todo);
    s_job_list_free(e->done);
    if (e->sync_ready) {
        pthread_cond_destroy(&e->cv);
        pthread_mutex_destroy(&e->mu);
    }
    s_close(e);
    if (e->wake[0] >= 0) {
        close(e->wake[0]);
        close(e->wake[1]);
    }
    if (e->zctx)
        zmq_ctx_term(e->zctx); /* lingers for a Bye still queued (500 ms at most) */
    mm_tensor_destroy(&e->x);
    mm_tensor_destroy(&e->y);
    mm_model_destroy(&e->m);
    mm_backend_destroy(&e->be);
    mm_metrics_server_stop(&e->srv); /* before the registry it renders */
    mm_metrics_destroy(&e->reg);
    mm_log_destroy(&e->log);
    free(e);
    *ep = NULL;
}
