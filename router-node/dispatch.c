/* dispatch.c — the router's ROUTER socket, replica table and expert runner
 * (see dispatch.h). Everything runs on the thread that calls in: no locks. */
#include "dispatch.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#include "wire.h"

#define S_DEAD_AFTER 3   /* heartbeats of silence that make a peer dead          */
#define S_MAX_ATTEMPTS 8 /* sends of one batch (re-sends, BUSY) before failing   */
#define S_ZAP_ENDPOINT "inproc://zeromq.zap.01"

/* ---- state ----------------------------------------------------------------- */

typedef struct s_replica {
    uint8_t id[MM_WIRE_MAX_ID]; /* ZeroMQ routing id of the connection         */
    size_t idlen;
    char name[32];        /* "e2-r1": expert 2, its first replica                 */
    char node[128];       /* "host:pid" from the Hello                            */
    char backend[128];    /* backend the node reported                            */
    int expert;           /* expert index served                                  */
    unsigned capacity;    /* rows per Work it accepts (0 = any)                   */
    int alive;            /* 0 once removed (kept for the statistics)             */
    int draining;         /* it answered DRAINING: send it nothing new            */
    uint64_t seq;         /* join order (ties of the least-loaded choice)         */
    double last_seen_ms;  /* last message received from it                        */
    double last_sent_ms;  /* last message sent to it                              */
    size_t inflight_rows; /* rows sent and not yet answered                       */
    size_t inflight;      /* batches sent and not yet answered                    */
    uint64_t batches;     /* batches answered                                     */
    uint64_t rows;        /* rows answered                                        */
} s_replica;

typedef struct s_batch {
    uint64_t id;          /* batch_id on the wire (unique per router process)    */
    mm_expert_job *job;   /* the model's job (x read, y to fill)                 */
    mm_wire_buf *buf;     /* host copy of x [n, hidden]: kept for re-sends       */
    long replica;         /* index into reps, -1 while waiting for one           */
    double sent_ms;       /* when sent to `replica`                              */
    double wait_since_ms; /* when it started waiting for a replica               */
    long avoid;           /* replica that answered BUSY/DRAINING (-1: none)      */
    int attempts;         /* sends so far                                        */
    int done;             /* y written                                           */
} s_batch;

struct mm_dispatch {
    mm_dispatch_options o;
    char (*fp)[MM_FINGERPRINT_HEX]; /* [n_experts] expected fingerprints           */
    char (*allow)[41];              /* [n_allow] Z85 public keys                   */
    void *zctx;                     /* ZeroMQ context                              */
    void *sock;                     /* the ROUTER socket                           */
    void *zap;                      /* ZAP handler (REP), curve mode only          */
    char endpoint[256];             /* bound endpoint                              */
    s_replica *reps;                /* every replica ever welcomed                 */
    size_t nreps, capreps;
    uint64_t next_seq, next_batch;
    int named[MM_CONFIG_MAX_EXPERTS]; /* replicas named so far, per expert          */
    s_batch *b;                       /* the current MoE layer's batches             */
    size_t nb, capb;
    int step_rc; /* a fatal error of the current step           */
    char step_err[512];
    json_t *refused;  /* [{reason, expert?, node?}]                  */
    uint64_t dropped; /* malformed / unexpected / late messages      */
    uint64_t resent;  /* batches re-sent after a replica left        */
    /* timing of the runner (microseconds) */
    uint64_t n_rtt;                   /* batches answered                            */
    double rtt_sum, rtt_min, rtt_max; /* send -> result received, per batch        */
    double compute_sum;               /* compute_us reported by the experts          */
    uint64_t n_layers;                /* MoE layers dispatched (steps with jobs)     */
    double layer_sum;                 /* start() entry -> last result, per layer     */
    double wait_sum;                  /* time blocked in finish(), per layer         */
    double layer_t0;
    /* metrics (NULL families when o.metrics is NULL: updates are no-ops) */
    mm_metric *m_routed, *m_batch_s, *m_live, *m_queue;
    int queue_shown[MM_CONFIG_MAX_EXPERTS]; /* last medmoe_expert_queue_depth set    */
};

static double s_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void s_log(const mm_dispatch *d, mm_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void s_log(const mm_dispatch *d, mm_log_level level, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    mm_vlogf(d->o.log, level, NULL, fmt, ap);
    va_end(ap);
}

/* ---- metrics ---------------------------------------------------------------- */

static void s_show_live(mm_dispatch *d, int e) {
    char k[16];
    snprintf(k, sizeof k, "%d", e);
    mm_metric_set(d->m_live, mm_dispatch_live(d, e), k);
}

/* medmoe_expert_queue_depth{expert}: the current MoE layer's batches not yet
 * answered, per expert (sent or waiting for a replica). Only changed values
 * are set: this runs on every result. */
static void s_show_queue(mm_dispatch *d) {
    if (!d->m_queue)
        return;
    int q[MM_CONFIG_MAX_EXPERTS] = {0};
    for (size_t i = 0; i < d->nb; i++)
        if (!d->b[i].done && d->b[i].job->expert >= 0 && d->b[i].job->expert < d->o.n_experts)
            q[d->b[i].job->expert]++;
    for (int e = 0; e < d->o.n_experts; e++)
        if (q[e] != d->queue_shown[e]) {
            char k[16];
            snprintf(k, sizeof k, "%d", e);
            mm_metric_set(d->m_queue, q[e], k);
            d->queue_shown[e] = q[e];
        }
}

static int s_metrics_init(mm_dispatch *d, char *err, size_t errlen) {
    /* a batch's round trip: a few rows on loopback take ~100 us, a prefill
     * of a large image on a busy node seconds */
    static const double b[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                               0.025,  0.05,    0.1,    0.25,  0.5,    1,     2.5};
    mm_metrics *reg = d->o.metrics;
    d->m_routed = mm_metrics_counter(reg, "medmoe_tokens_routed_total",
                                     "Token rows sent to a routed expert, per decoder layer "
                                     "(re-sends not counted).",
                                     "layer,expert");
    d->m_batch_s = mm_metrics_histogram(reg, "medmoe_replica_batch_seconds",
                                        "Round trip of one batch to an expert replica: sent to "
                                        "result received.",
                                        "expert,replica", b, sizeof b / sizeof *b);
    d->m_live = mm_metrics_gauge(reg, "medmoe_live_replicas",
                                 "Live (welcomed, not silent) replicas per expert.", "expert");
    d->m_queue = mm_metrics_gauge(reg, "medmoe_expert_queue_depth",
                                  "Batches of the current MoE layer not yet answered by expert K "
                                  "(in flight or waiting for a replica).",
                                  "expert");
    if (!d->m_routed || !d->m_batch_s || !d->m_live || !d->m_queue)
        return mm_errorf(err, errlen, MM_EINVAL, "dispatch metrics: %s", mm_metrics_error(reg));
    for (int e = 0; e < d->o.n_experts; e++) { /* 0 is a value: the HPA must see it */
        char k[16];
        snprintf(k, sizeof k, "%d", e);
        mm_metric_set(d->m_live, 0, k);
        mm_metric_set(d->m_queue, 0, k);
    }
    return MM_OK;
}

void mm_dispatch_options_default(mm_dispatch_options *o) {
    memset(o, 0, sizeof *o);
    o->heartbeat_ms = 1000;
    o->expert_wait_ms = 5000;
    o->batch_timeout_ms = 60000;
    o->hwm = 1000;
}

const char *mm_dispatch_endpoint(const mm_dispatch *d) { return d->endpoint; }

int mm_dispatch_live(const mm_dispatch *d, int e) {
    int n = 0;
    for (size_t i = 0; i < d->nreps; i++)
        n += d->reps[i].alive && d->reps[i].expert == e;
    return n;
}

static void s_refused(mm_dispatch *d, const char *reason, int expert, const char *node) {
    json_t *r = json_pack("{s:s}", "reason", reason);
    if (r && expert >= 0)
        json_object_set_new(r, "expert", json_integer(expert));
    if (r && node && *node)
        json_object_set_new(r, "node", json_string(node));
    if (r)
        json_array_append_new(d->refused, r);
}

/* ---- sending ------------------------------------------------------------- */

static void s_drop(mm_dispatch *d, size_t ri, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Send env (+t) to replica ri; an unreachable peer is removed. */
static int s_send(mm_dispatch *d, size_t ri, const Medmoe__Wire__Envelope *env, mm_wire_buf *t) {
    s_replica *r = &d->reps[ri];
    char err[256];
    int rc = mm_wire_send(d->sock, r->id, r->idlen, env, t, err, sizeof err);
    if (rc == MM_OK) {
        r->last_sent_ms = s_now_ms();
    } else if (rc == MM_EIO && errno == EHOSTUNREACH) {
        s_drop(d, ri, "connection gone (EHOSTUNREACH on send)");
    } else if (rc != MM_EAGAIN) {
        s_log(d, MM_LOG_WARN, "send to replica %s failed: %s", r->name, err);
    }
    return rc;
}

/* Reply to a peer that is not (or no longer) in the table. */
static void s_send_to_id(mm_dispatch *d, const uint8_t *id, size_t idlen,
                         const Medmoe__Wire__Envelope *env) {
    char err[256];
    if (mm_wire_send(d->sock, id, idlen, env, NULL, err, sizeof err) != MM_OK)
        s_log(d, MM_LOG_WARN, "reply to an unregistered peer failed: %s", err);
}

static void s_drop(mm_dispatch *d, size_t ri, const char *fmt, ...) {
    s_replica *r = &d->reps[ri];
    if (!r->alive)
        return;
    char why[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    r->alive = 0;
    size_t moved = 0;
    double now = s_now_ms();
    for (size_t i = 0; i < d->nb; i++) {
        s_batch *b = &d->b[i];
        if (!b->done && b->replica == (long)ri) {
            b->replica = -1;
            b->wait_since_ms = now;
            moved++;
        }
    }
    d->resent += moved;
    r->inflight = 0;
    r->inflight_rows = 0;
    s_show_live(d, r->expert);
    if (d->m_batch_s) { /* replica names are not reused: keep the series count bounded */
        char k[16];
        snprintf(k, sizeof k, "%d", r->expert);
        mm_metric_remove(d->m_batch_s, k, r->name);
    }
    s_log(d, MM_LOG_INFO,
          "replica %s (expert %d, %s) left: %s; %zu in-flight batch(es) to re-send; expert %d "
          "has %d live replica(s)",
          r->name, r->expert, r->node, why, moved, r->expert, mm_dispatch_live(d, r->expert));
}

/* Least-loaded live replica of expert e that takes `rows` (fewest rows in
 * flight); `avoid` is used only when nothing else is there. -1: none. */
static long s_choose(const mm_dispatch *d, int e, size_t rows, long avoid) {
    long best = -1, fallback = -1;
    for (size_t i = 0; i < d->nreps; i++) {
        const s_replica *r = &d->reps[i];
        if (!r->alive || r->draining || r->expert != e || (r->capacity && r->capacity < rows))
            continue;
        if ((long)i == avoid) {
            fallback = (long)i;
            continue;
        }
        /* Ties (common: one case's steps are sequential, so nothing is in
         * flight at each choice) go to the replica that has served fewer rows,
         * then to the one that joined first: replicas share the load. */
        const s_replica *o = best >= 0 ? &d->reps[best] : NULL;
        if (!o || r->inflight_rows < o->inflight_rows ||
            (r->inflight_rows == o->inflight_rows &&
             (r->rows < o->rows || (r->rows == o->rows && r->seq < o->seq))))
            best = (long)i;
    }
    return best >= 0 ? best : fallback;
}

/* Send every batch that waits for a replica to the best one available. */
static void s_pump(mm_dispatch *d) {
    for (size_t i = 0; i < d->nb && d->step_rc == MM_OK; i++) {
        s_batch *b = &d->b[i];
        while (!b->done && b->replica < 0) {
            long ri = s_choose(d, b->job->expert, b->job->n, b->avoid);
            if (ri < 0)
                break;
            if (b->attempts >= S_MAX_ATTEMPTS) {
                d->step_rc =
                    mm_errorf(d->step_err, sizeof d->step_err, MM_ETIMEOUT,
                              "expert %d of MoE layer %d: batch %llu sent %d times "
                              "without an answer",
                              b->job->expert, b->job->moe, (unsigned long long)b->id, b->attempts);
                return;
            }
            Medmoe__Wire__Work w = MEDMOE__WIRE__WORK__INIT;
            w.batch_id = b->id;
            w.layer = b->job->layer;
            w.moe = b->job->moe;
            w.expert = b->job->expert;
            w.rows = (uint32_t)b->job->n;
            w.width = (uint32_t)d->o.hidden;
            w.dtype = MEDMOE__WIRE__DTYPE__DTYPE_F32;
            w.deadline_ms = (uint32_t)d->o.batch_timeout_ms;
            Medmoe__Wire__Envelope env = MEDMOE__WIRE__ENVELOPE__INIT;
            env.body_case = MM_WIRE_WORK;
            env.work = &w;
            double t_send = s_now_ms(); /* before: the send may yield the CPU to the peer */
            int rc = s_send(d, (size_t)ri, &env, b->buf);
            if (rc == MM_OK) {
                b->replica = ri;
                b->sent_ms = t_send;
                b->attempts++;
                d->reps[ri].inflight++;
                d->reps[ri].inflight_rows += b->job->n;
            } else if (rc == MM_EAGAIN || d->reps[ri].alive) {
                break; /* queue full or a local failure: try again on the next pass */
            }
            /* else the replica was just removed: choose again */
        }
    }
}

/* ---- receiving ------------------------------------------------------------ */

static long s_find(const mm_dispatch *d, const uint8_t *id, size_t idlen) {
    for (size_t i = 0; i < d->nreps; i++)
        if (d->reps[i].alive && d->reps[i].idlen == idlen && !memcmp(d->reps[i].id, id, idlen))
            return (long)i;
    return -1;
}

static void s_refuse(mm_dispatch *d, const mm_wire_msg *m, const char *node, int expert,
                     const char *reason) {
    Medmoe__Wire__Refuse rf = MEDMOE__WIRE__REFUSE__INIT;
    rf.reason = (char *)reason;
    Medmoe__Wire__Envelope env = MEDMOE__WIRE__ENVELOPE__INIT;
    env.body_case = MM_WIRE_REFUSE;
    env.refuse = &rf;
    s_send_to_id(d, m->id, m->idlen, &env);
    s_log(d, MM_LOG_WARN, "refused %s (expert %d): %s", node && *node ? node : "a peer", expert,
          reason);
    s_refused(d, reason, expert, node);
}

static void s_hello(mm_dispatch *d, const mm_wire_msg *m) {
    const Medmoe__Wire__Hello *h = m->env->hello;
    char reason[400];
    const char *node = h->node ? h->node : "";
    if (h->version != MM_WIRE_VERSION) {
        snprintf(reason, sizeof reason, "protocol version %u, this router speaks %u", h->version,
                 MM_WIRE_VERSION);
        s_refuse(d, m, node, h->expert, reason);
        return;
    }
    if (h->expert < 0 || h->expert >= d->o.n_experts) {
        snprintf(reason, sizeof reason, "expert %d does not exist (the model has %d experts)",
                 h->expert, d->o.n_experts);
        s_refuse(d, m, node, h->expert, reason);
        return;
    }
    const char *fp = h->fingerprint ? h->fingerprint : "";
    if (strcmp(fp, d->fp[h->expert]) != 0) {
        snprintf(reason, sizeof reason,
                 "model fingerprint mismatch for expert %d: router has %.16s..., expert sent "
                 "%.16s... (another checkpoint or fingerprint mode)",
                 h->expert, d->fp[h->expert], *fp ? fp : "(none)");
        s_refuse(d, m, node, h->expert, reason);
        return;
    }
    long old = s_find(d, m->id, m->idlen);
    if (old >= 0)
        s_drop(d, (size_t)old, "said Hello again on the same connection");
    if (d->nreps == d->capreps) {
        size_t cap = d->capreps ? 2 * d->capreps : 16;
        s_replica *nr = realloc(d->reps, cap * sizeof *nr);
        if (!nr) {
            s_refuse(d, m, node, h->expert, "router out of memory");
            return;
        }
        d->reps = nr;
        d->capreps = cap;
    }
    size_t ri = d->nreps++;
    s_replica *r = &d->reps[ri];
    memset(r, 0, sizeof *r);
    memcpy(r->id, m->id, m->idlen);
    r->idlen = m->idlen;
    r->expert = h->expert;
    r->capacity = h->capacity;
    r->alive = 1;
    r->seq = d->next_seq++;
    r->last_seen_ms = s_now_ms();
    snprintf(r->name, sizeof r->name, "e%d-r%d", h->expert, ++d->named[h->expert]);
    snprintf(r->node, sizeof r->node, "%s", node);
    snprintf(r->backend, sizeof r->backend, "%s", h->backend ? h->backend : "");
    Medmoe__Wire__Welcome w = MEDMOE__WIRE__WELCOME__INIT;
    w.version = MM_WIRE_VERSION;
    w.heartbeat_ms = (uint32_t)d->o.heartbeat_ms;
    w.replica_id = r->name;
    Medmoe__Wire__Envelope env = MEDMOE__WIRE__ENVELOPE__INIT;
    env.body_case = MM_WIRE_WELCOME;
    env.welcome = &w;
    s_show_live(d, r->expert);
    if (s_send(d, ri, &env, NULL) == MM_OK)
        s_log(d, MM_LOG_INFO,
              "replica %s joined: expert %d, node %s, backend %s, capacity %u; expert %d has %d "
              "live replica(s)",
              r->name, r->expert, r->node, r->backend, r->capacity, r->expert,
              mm_dispatch_live(d, r->expert));
}

static s_batch *s_batch_by_id(mm_dispatch *d, uint64_t id) {
    for (size_t i = 0; i < d->nb; i++)
        if (d->b[i].id == id)
            return &d->b[i];
    return NULL;
}

static void s_result(mm_dispatch *d, long ri, const mm_wire_msg *m) {
    const Medmoe__Wire__Result *res = m->env->result;
    char idbuf[2 * MM_WIRE_MAX_ID + 1];
    if (ri < 0) {
        d->dropped++;
        s_log(d, MM_LOG_WARN,
              "discarded result for batch %llu from an unregistered or removed peer %s",
              (unsigned long long)res->batch_id,
              mm_wire_id_str(m->id, m->idlen, idbuf, sizeof idbuf));
        return;
    }
    s_replica *r = &d->reps[ri];
    s_batch *b = s_batch_by_id(d, res->batch_id);
    if (!b || b->done || b->replica != ri) {
        d->dropped++;
        s_log(d, MM_LOG_WARN, "discarded result from %s for %s batch %llu", r->name,
              !b        ? "unknown"
              : b->done ? "already answered"
                        : "another replica's",
              (unsigned long long)res->batch_id);
        return;
    }
    const mm_expert_job *j = b->job;
    /* The assigned replica answered: anything wrong now is its fault. */
    size_t want = 0;
    mm_size_mul(j->n, (size_t)d->o.hidden * sizeof(float), &want);
    if (res->layer != j->layer || res->moe != j->moe || res->expert != j->expert ||
        res->rows != j->n || res->width != (uint32_t)d->o.hidden ||
        (res->error == MEDMOE__WIRE__ERROR_CODE__ERROR_OK &&
         (res->dtype != MEDMOE__WIRE__DTYPE__DTYPE_F32 || m->tensor_len != want))) {
        d->dropped++;
        s_drop(d, (size_t)ri,
               "malformed result for batch %llu (layer %d moe %d expert %d rows %u width %u, "
               "%zu tensor bytes; expected layer %d moe %d expert %d rows %zu width %d, %zu bytes)",
               (unsigned long long)res->batch_id, res->layer, res->moe, res->expert, res->rows,
               res->width, m->tensor_len, j->layer, j->moe, j->expert, j->n, d->o.hidden, want);
        return;
    }
    r->inflight--;
    r->inflight_rows -= j->n;
    if (res->error != MEDMOE__WIRE__ERROR_CODE__ERROR_OK) {
        const char *msg = res->message ? res->message : "";
        if (res->error == MEDMOE__WIRE__ERROR_CODE__ERROR_BUSY ||
            res->error == MEDMOE__WIRE__ERROR_CODE__ERROR_DRAINING) {
            if (res->error == MEDMOE__WIRE__ERROR_CODE__ERROR_DRAINING)
                r->draining = 1;
            s_log(d, MM_LOG_WARN,
                  "replica %s answered %s for batch %llu (%s): sending it elsewhere", r->name,
                  mm_wire_error_str(res->error), (unsigned long long)b->id, msg);
            b->replica = -1;
            b->avoid = ri;
            b->wait_since_ms = s_now_ms();
            return;
        }
        if (res->error == MEDMOE__WIRE__ERROR_CODE__ERROR_EXPERT_NOT_LOADED) {
            s_drop(d, (size_t)ri, "EXPERT_NOT_LOADED for batch %llu: %s", (unsigned long long)b->id,
                   msg);
            return;
        }
        d->step_rc = mm_errorf(d->step_err, sizeof d->step_err, MM_ERR,
                               "expert %d of MoE layer %d: replica %s failed batch %llu: %s: %s",
                               j->expert, j->moe, r->name, (unsigned long long)b->id,
                               mm_wire_error_str(res->error), msg);
        return;
    }
    int rc;
    if ((uintptr_t)m->tensor % _Alignof(float) == 0) {
        rc = mm_tensor_set(j->y, m->tensor, MM_F32);
    } else {
        float *tmp = malloc(want);
        if (!tmp) {
            d->step_rc = mm_errorf(d->step_err, sizeof d->step_err, MM_ENOMEM,
                                   "out of memory for a %zu-byte result", want);
            return;
        }
        memcpy(tmp, m->tensor, want);
        rc = mm_tensor_set(j->y, tmp, MM_F32);
        free(tmp);
    }
    if (rc != MM_OK) {
        d->step_rc = mm_errorf(d->step_err, sizeof d->step_err, rc,
                               "expert %d of MoE layer %d: writing the result: %s", j->expert,
                               j->moe, mm_backend_error(j->y->be));
        return;
    }
    double rtt = (s_now_ms() - b->sent_ms) * 1e3;
    d->n_rtt++;
    d->rtt_sum += rtt;
    d->compute_sum += (double)res->compute_us;
    if (d->n_rtt == 1 || rtt < d->rtt_min)
        d->rtt_min = rtt;
    if (rtt > d->rtt_max)
        d->rtt_max = rtt;
    r->batches++;
    r->rows += j->n;
    b->done = 1;
    mm_wire_buf_unref(&b->buf);
    if (d->m_batch_s) {
        char k[16];
        snprintf(k, sizeof k, "%d", r->expert);
        mm_metric_observe(d->m_batch_s, rtt / 1e6, k, r->name);
    }
    s_show_queue(d);
}

/* One message off the socket. MM_EAGAIN: none queued. */
static int s_handle_one(mm_dispatch *d) {
    mm_wire_msg m;
    char err[256], idbuf[2 * MM_WIRE_MAX_ID + 1];
    int rc = mm_wire_recv(d->sock, 1, &m, err, sizeof err);
    if (rc == MM_EAGAIN || rc == MM_EIO)
        return rc;
    long ri = s_find(d, m.id, m.idlen);
    if (rc == MM_EPROTO) {
        d->dropped++;
        s_log(d, MM_LOG_WARN, "dropped a malformed message from %s: %s",
              ri >= 0 ? d->reps[ri].name : mm_wire_id_str(m.id, m.idlen, idbuf, sizeof idbuf), err);
        return MM_OK;
    }
    if (ri >= 0)
        d->reps[ri].last_seen_ms = s_now_ms();
    switch (m.env->body_case) {
    case MM_WIRE_HELLO: s_hello(d, &m); break;
    case MM_WIRE_HEARTBEAT:
        if (ri < 0) {
            /* A removed replica: it will notice our silence and say Hello again. */
            d->dropped++;
        }
        break;
    case MM_WIRE_BYE:
        if (ri >= 0)
            s_drop(d, (size_t)ri, "said Bye (%s)",
                   m.env->bye->reason && *m.env->bye->reason ? m.env->bye->reason : "no reason");
        break;
    case MM_WIRE_RESULT: s_result(d, ri, &m); break;
    default:
        d->dropped++;
        s_log(d, MM_LOG_WARN, "dropped an unexpected message (body %d) from %s",
              (int)m.env->body_case,
              ri >= 0 ? d->reps[ri].name : mm_wire_id_str(m.id, m.idlen, idbuf, sizeof idbuf));
        break;
    }
    mm_wire_msg_clear(&m);
    return MM_OK;
}

/* ZAP (RFC 27): accept CURVE clients whose public key is allowed. */
static void s_zap_one(mm_dispatch *d) {
    zmq_msg_t f[8];
    int n = 0, more = 1;
    while (more && n < 8) {
        zmq_msg_init(&f[n]);
        if (zmq_msg_recv(&f[n], d->zap, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&f[n]);
            break;
        }
        more = zmq_msg_more(&f[n]);
        n++;
    }
    while (more) { /* more frames than any ZAP request has */
        zmq_msg_t x;
        zmq_msg_init(&x);
        if (zmq_msg_recv(&x, d->zap, 0) < 0) {
            zmq_msg_close(&x);
            break;
        }
        more = zmq_msg_more(&x);
        zmq_msg_close(&x);
    }
    if (n < 6) {
        for (int i = 0; i < n; i++)
            zmq_msg_close(&f[i]);
        return;
    }
    char key[41] = "", addr[64] = "";
    size_t alen = zmq_msg_size(&f[3]) < sizeof addr - 1 ? zmq_msg_size(&f[3]) : sizeof addr - 1;
    memcpy(addr, zmq_msg_data(&f[3]), alen);
    int ok = 0;
    if (n >= 7 && zmq_msg_size(&f[5]) == 5 && !memcmp(zmq_msg_data(&f[5]), "CURVE", 5) &&
        zmq_msg_size(&f[6]) == 32) {
        zmq_z85_encode(key, zmq_msg_data(&f[6]), 32);
        for (size_t i = 0; i < d->o.n_allow && !ok; i++)
            ok = strcmp(key, d->allow[i]) == 0;
    }
    const char *code = ok ? "200" : "400", *text = ok ? "OK" : "key not allowed";
    zmq_send(d->zap, "1.0", 3, ZMQ_SNDMORE);
    zmq_send(d->zap, zmq_msg_data(&f[1]), zmq_msg_size(&f[1]), ZMQ_SNDMORE);
    zmq_send(d->zap, code, 3, ZMQ_SNDMORE);
    zmq_send(d->zap, text, strlen(text), ZMQ_SNDMORE);
    zmq_send(d->zap, key, ok ? strlen(key) : 0, ZMQ_SNDMORE);
    zmq_send(d->zap, "", 0, 0);
    for (int i = 0; i < n; i++)
        zmq_msg_close(&f[i]);
    if (!ok) {
        char reason[200];
        snprintf(reason, sizeof reason, "curve key %s from %s is not in --curve-allow",
                 *key ? key : "(none)", addr);
        s_log(d, MM_LOG_WARN, "refused a connection: %s", reason);
        s_refused(d, reason, -1, addr);
    }
}

/* Heartbeats to quiet replicas; removal of silent ones. */
static void s_tick(mm_dispatch *d) {
    double now = s_now_ms(), hb = d->o.heartbeat_ms;
    for (size_t i = 0; i < d->nreps; i++) {
        s_replica *r = &d->reps[i];
        if (!r->alive)
            continue;
        if (now - r->last_seen_ms >= S_DEAD_AFTER * hb) {
            s_drop(d, i, "silent for %.0f ms (%d heartbeats)", now - r->last_seen_ms, S_DEAD_AFTER);
            continue;
        }
        if (now - r->last_sent_ms >= hb) {
            Medmoe__Wire__Heartbeat h = MEDMOE__WIRE__HEARTBEAT__INIT;
            Medmoe__Wire__Envelope env = MEDMOE__WIRE__ENVELOPE__INIT;
            env.body_case = MM_WIRE_HEARTBEAT;
            env.heartbeat = &h;
            s_send(d, i, &env, NULL);
        }
    }
}

/* Poll once (≤ timeout_ms), drain what arrived, then heartbeats/expiry. */
static int s_service(mm_dispatch *d, int timeout_ms, int fd, int *fd_ready) {
    zmq_pollitem_t it[3];
    int n = 0, ifd = -1, izap = -1;
    it[n++] = (zmq_pollitem_t){.socket = d->sock, .events = ZMQ_POLLIN};
    if (d->zap) {
        izap = n;
        it[n++] = (zmq_pollitem_t){.socket = d->zap, .events = ZMQ_POLLIN};
    }
    if (fd >= 0) {
        ifd = n;
        it[n++] = (zmq_pollitem_t){.fd = fd, .events = ZMQ_POLLIN};
    }
    if (fd_ready)
        *fd_ready = 0;
    if (timeout_ms < 0)
        timeout_ms = 0;
    int rc = zmq_poll(it, n, timeout_ms);
    if (rc < 0 && zmq_errno() != EINTR) {
        s_log(d, MM_LOG_ERROR, "poll failed: %s", zmq_strerror(zmq_errno()));
        return MM_EIO;
    }
    if (rc > 0) {
        if (izap >= 0 && (it[izap].revents & ZMQ_POLLIN))
            s_zap_one(d);
        if (it[0].revents & ZMQ_POLLIN) {
            /* bounded: a flood cannot starve the rest of the loop */
            for (int i = 0; i < 1000 && s_handle_one(d) == MM_OK; i++) {
            }
        }
        if (ifd >= 0 && fd_ready)
            *fd_ready = (it[ifd].revents & (ZMQ_POLLIN | ZMQ_POLLERR)) != 0;
    }
    s_tick(d);
    return MM_OK;
}

int mm_dispatch_service(mm_dispatch *d, int timeout_ms, int fd, int *fd_ready) {
    if (timeout_ms > d->o.heartbeat_ms)
        timeout_ms = d->o.heartbeat_ms;
    return s_service(d, timeout_ms, fd, fd_ready);
}

int mm_dispatch_wait_experts(mm_dispatch *d, int ms) {
    double end = s_now_ms() + ms;
    for (;;) {
        int all = 1;
        for (int e = 0; e < d->o.n_experts && all; e++)
            all = mm_dispatch_live(d, e) > 0;
        if (all)
            return 1;
        double left = end - s_now_ms();
        if (left <= 0 || (d->o.stop && *d->o.stop))
            return 0;
        int t = left < 50 ? (int)left + 1 : 50;
        if (mm_dispatch_service(d, t, -1, NULL) != MM_OK)
            return 0;
    }
}

/* ---- the runner ----------------------------------------------------------- */

/* Forget the current step's batches (answered or not): late replies for them
 * are then discarded as unknown. */
static void s_step_reset(mm_dispatch *d) {
    for (size_t i = 0; i < d->nb; i++) {
        s_batch *b = &d->b[i];
        if (!b->done && b->replica >= 0 && d->reps[b->replica].alive) {
            d->reps[b->replica].inflight--;
            d->reps[b->replica].inflight_rows -= b->job->n;
        }
        mm_wire_buf_unref(&b->buf);
    }
    d->nb = 0;
    d->step_rc = MM_OK;
    d->step_err[0] = 0;
    s_show_queue(d);
}

static int s_start(void *ctx, mm_model *m, mm_expert_job *jobs, size_t n, char *err,
                   size_t errlen) {
    mm_dispatch *d = ctx;
    s_step_reset(d);
    d->layer_t0 = s_now_ms();
    if (n > d->capb) {
        s_batch *nb = realloc(d->b, n * sizeof *nb);
        if (!nb)
            return mm_errorf(err, errlen, MM_ENOMEM, "dispatch: out of memory for %zu batches", n);
        d->b = nb;
        d->capb = n;
    }
    double now = s_now_ms();
    for (size_t i = 0; i < n; i++) {
        mm_expert_job *j = &jobs[i];
        size_t bytes;
        if (!mm_size_mul(j->n, (size_t)d->o.hidden * sizeof(float), &bytes) || j->n > UINT32_MAX ||
            j->expert < 0 || j->expert >= d->o.n_experts) {
            s_step_reset(d);
            return mm_errorf(err, errlen, MM_EINVAL, "dispatch: job of %zu rows for expert %d",
                             j->n, j->expert);
        }
        s_batch *b = &d->b[d->nb];
        memset(b, 0, sizeof *b);
        b->job = j;
        b->replica = -1;
        b->avoid = -1;
        b->wait_since_ms = now;
        b->id = ++d->next_batch;
        b->buf = mm_wire_buf_new(bytes);
        if (!b->buf) {
            s_step_reset(d);
            return mm_errorf(err, errlen, MM_ENOMEM, "dispatch: out of memory for %zu bytes",
                             bytes);
        }
        d->nb++;
        if (d->m_routed) {
            char layer[16], k[16];
            snprintf(layer, sizeof layer, "%d", j->layer);
            snprintf(k, sizeof k, "%d", j->expert);
            mm_metric_add(d->m_routed, (double)j->n, layer, k);
        }
        int rc = mm_tensor_get(j->x, b->buf->data);
        if (rc != MM_OK) {
            mm_errorf(err, errlen, rc, "dispatch: reading rows of expert %d, MoE layer %d: %s",
                      j->expert, j->moe, mm_backend_error(j->x->be));
            s_step_reset(d);
            return rc;
        }
    }
    s_pump(d);
    if (d->step_rc != MM_OK) {
        int rc = mm_errorf(err, errlen, d->step_rc, "%s", d->step_err);
        s_step_reset(d);
        return rc;
    }
    s_show_queue(d);
    return MM_OK;
}

static int s_finish(void *ctx, mm_model *m, mm_expert_job *jobs, size_t n, char *err,
                    size_t errlen) {
    mm_dispatch *d = ctx;
    double t_wait = s_now_ms();
    int rc = MM_OK;
    for (;;) {
        s_pump(d);
        if (d->step_rc != MM_OK) {
            rc = mm_errorf(err, errlen, d->step_rc, "%s", d->step_err);
            break;
        }
        double now = s_now_ms(), next = now + d->o.heartbeat_ms;
        size_t open = 0;
        int queue_full = 0;
        for (size_t i = 0; i < d->nb && rc == MM_OK; i++) {
            s_batch *b = &d->b[i];
            if (b->done)
                continue;
            open++;
            if (b->replica < 0) {
                double end = b->wait_since_ms + d->o.expert_wait_ms;
                if (now >= end) {
                    rc = mm_errorf(err, errlen, MM_ETIMEOUT,
                                   "expert %d of MoE layer %d has no live replica (waited %d ms)",
                                   b->job->expert, b->job->moe, d->o.expert_wait_ms);
                } else {
                    next = end < next ? end : next;
                    queue_full |= mm_dispatch_live(d, b->job->expert) > 0;
                }
            } else {
                double end = b->sent_ms + d->o.batch_timeout_ms;
                if (now >= end)
                    s_drop(d, (size_t)b->replica, "batch %llu unanswered for %d ms",
                           (unsigned long long)b->id, d->o.batch_timeout_ms);
                else
                    next = end < next ? end : next;
            }
        }
        if (rc != MM_OK || open == 0)
            break;
        if (d->o.stop && *d->o.stop) {
            rc = mm_errorf(err, errlen, MM_ERR, "router shutting down");
            break;
        }
        int t = (int)(next - now) + 1;
        if (queue_full && t > 5)
            t = 5; /* a replica exists but its queue was full: retry soon */
        if (s_service(d, t, -1, NULL) != MM_OK) {
            rc = mm_errorf(err, errlen, MM_EIO, "dispatch: the expert socket failed");
            break;
        }
    }
    if (rc == MM_OK && n) {
        double now = s_now_ms();
        d->n_layers++;
        d->layer_sum += (now - d->layer_t0) * 1e3;
        d->wait_sum += (now - t_wait) * 1e3;
    }
    s_step_reset(d);
    return rc;
}

void mm_dispatch_runner(mm_dispatch *d, mm_expert_runner *r) {
    r->ctx = d;
    r->start = s_start;
    r->finish = s_finish;
}

/* ---- life cycle ------------------------------------------------------------ */

static int s_setopt_int(void *s, int opt, int v) { return zmq_setsockopt(s, opt, &v, sizeof v); }

int mm_dispatch_new(const mm_dispatch_options *o, mm_dispatch **out, char *err, size_t errlen) {
    *out = NULL;
    if (!o->bind || o->n_experts < 1 || o->n_experts > MM_CONFIG_MAX_EXPERTS || o->hidden < 1 ||
        !o->fingerprints || o->heartbeat_ms < 1 || o->expert_wait_ms < 0)
        return mm_errorf(err, errlen, MM_EINVAL, "dispatch: incomplete options");
    mm_dispatch *d = calloc(1, sizeof *d);
    if (!d)
        return mm_errorf(err, errlen, MM_ENOMEM, "dispatch: out of memory");
    d->o = *o;
    d->fp = calloc((size_t)o->n_experts, sizeof *d->fp);
    d->allow = calloc(o->n_allow ? o->n_allow : 1, sizeof *d->allow);
    d->refused = json_array();
    int rc = MM_OK;
    if (!d->fp || !d->allow || !d->refused) {
        rc = mm_errorf(err, errlen, MM_ENOMEM, "dispatch: out of memory");
        goto fail;
    }
    memcpy(d->fp, o->fingerprints, (size_t)o->n_experts * sizeof *d->fp);
    if (o->metrics && (rc = s_metrics_init(d, err, errlen)) != MM_OK)
        goto fail;
    for (size_t i = 0; i < o->n_allow; i++)
        snprintf(d->allow[i], sizeof d->allow[i], "%s", o->curve_allow[i]);
    d->zctx = zmq_ctx_new();
    if (!d->zctx) {
        rc = mm_errorf(err, errlen, MM_EIO, "zmq_ctx_new: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    if (o->curve_secret) {
        /* The ZAP handler must exist before the first handshake. */
        d->zap = zmq_socket(d->zctx, ZMQ_REP);
        if (!d->zap || s_setopt_int(d->zap, ZMQ_LINGER, 0) ||
            zmq_bind(d->zap, S_ZAP_ENDPOINT) != 0) {
            rc = mm_errorf(err, errlen, MM_EIO, "ZAP handler: %s", zmq_strerror(zmq_errno()));
            goto fail;
        }
    }
    d->sock = zmq_socket(d->zctx, ZMQ_ROUTER);
    if (!d->sock) {
        rc = mm_errorf(err, errlen, MM_EIO, "zmq_socket: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    /* Mandatory routing: a send to a vanished peer fails (EHOSTUNREACH)
     * instead of being dropped silently; a full queue fails with EAGAIN. */
    int64_t maxmsg = (int64_t)1 << 30;
    if (s_setopt_int(d->sock, ZMQ_ROUTER_MANDATORY, 1) || s_setopt_int(d->sock, ZMQ_LINGER, 0) ||
        s_setopt_int(d->sock, ZMQ_SNDHWM, o->hwm) || s_setopt_int(d->sock, ZMQ_RCVHWM, o->hwm) ||
        zmq_setsockopt(d->sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg)) {
        rc = mm_errorf(err, errlen, MM_EIO, "socket options: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    if (o->curve_secret) {
        if (strlen(o->curve_secret) != 40 || s_setopt_int(d->sock, ZMQ_CURVE_SERVER, 1) ||
            zmq_setsockopt(d->sock, ZMQ_CURVE_SECRETKEY, o->curve_secret, 40) ||
            zmq_setsockopt(d->sock, ZMQ_ZAP_DOMAIN, "medmoe", 6)) {
            rc = mm_errorf(err, errlen, MM_EINVAL, "curve secret key: %s",
                           zmq_strerror(zmq_errno()));
            goto fail;
        }
    }
    if (zmq_bind(d->sock, o->bind) != 0) {
        rc = mm_errorf(err, errlen, MM_EIO, "bind %s: %s", o->bind, zmq_strerror(zmq_errno()));
        goto fail;
    }
    size_t len = sizeof d->endpoint;
    zmq_getsockopt(d->sock, ZMQ_LAST_ENDPOINT, d->endpoint, &len);
    *out = d;
    return MM_OK;
fail:
    mm_dispatch_destroy(&d);
    return rc;
}

void mm_dispatch_destroy(mm_dispatch **dp) {
    if (!dp || !*dp)
        return;
    mm_dispatch *d = *dp;
    s_step_reset(d);
    if (d->sock)
        zmq_close(d->sock);
    if (d->zap)
        zmq_close(d->zap);
    if (d->zctx)
        zmq_ctx_term(d->zctx); /* linger 0: returns at once; runs pending free callbacks */
    json_decref(d->refused);
    free(d->reps);
    free(d->b);
    free(d->fp);
    free(d->allow);
    free(d);
    *dp = NULL;
}

json_t *mm_dispatch_stats(const mm_dispatch *d) {
    json_t *reps = json_array();
    for (size_t i = 0; i < d->nreps; i++) {
        const s_replica *r = &d->reps[i];
        json_array_append_new(reps,
                              json_pack("{s:i,s:s,s:s,s:I,s:I,s:b}", "expert", r->expert, "id",
                                        r->name, "node", r->node, "batches", (json_int_t)r->batches,
                                        "rows", (json_int_t)r->rows, "alive", r->alive));
    }
    double nr = d->n_rtt ? (double)d->n_rtt : 1, nl = d->n_layers ? (double)d->n_layers : 1;
    json_t *timing = json_pack(
        "{s:I,s:f,s:f,s:f,s:f,s:I,s:f,s:f}", "batches", (json_int_t)d->n_rtt, "batch_rtt_us_mean",
        d->rtt_sum / nr, "batch_rtt_us_min", d->rtt_min, "batch_rtt_us_max", d->rtt_max,
        "expert_compute_us_mean", d->compute_sum / nr, "moe_layers", (json_int_t)d->n_layers,
        "layer_dispatch_us_mean", d->layer_sum / nl, "layer_wait_us_mean", d->wait_sum / nl);
    return json_pack("{s:o,s:O,s:I,s:I,s:o}", "replicas", reps, "refused", d->refused,
                     "dropped_messages", (json_int_t)d->dropped, "resent_batches",
                     (json_int_t)d->resent, "dispatch", timing);
}
