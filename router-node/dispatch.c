/* dispatch.c — the router's ROUTER socket, replica table and expert runner
 * (see dispatch.h).
 *
 * Threads and locking. The dispatch thread (s_thread) owns the ZeroMQ
 * sockets: nothing else touches them after mm_dispatch_new. Everything below
 * the sockets (replicas, the current layer's batches, counters) is guarded by
 * d->mu; the dispatch thread holds it except while it polls. The engine
 * thread (the runner's start/finish) reads and writes tensors outside the
 * lock, installs or collects a layer under it, and wakes the poll by writing
 * a byte to d->wake. It waits on d->cv, which the dispatch thread broadcasts
 * after every round (a layer settled, a replica joined).
 *
 * Sections: state, small helpers, metrics, replica health (estimates,
 * quarantine, probes), sending, receiving, ZAP, the periodic work, the
 * thread, the runner, the public calls, life cycle, statistics.
 *
 * Why one file of ~1600 lines: every section reads and writes the same
 * replica table and layer state under one lock, and the correctness of the
 * in-flight accounting (each send counted once, closed once) is easiest to
 * check where every path that opens or closes a send is in one place.
 * Splitting it would turn that state into an internal header shared by
 * files that must all follow the same locking rules.
 */
#include "dispatch.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "peer_tally.h"
#include "wire.h"

#define S_DEAD_AFTER 3             /* heartbeats of silence that make a peer dead        */
#define S_MAX_SENDS 8              /* sends of one batch (hedges, re-sends) at most      */
#define S_LATE_RING 256            /* settled sends remembered: late answers are no errors */
#define S_TIMEOUT_MULT 4.0         /* a send times out after this many estimated trips   */
#define S_TIMEOUT_FLOOR_MS 250.0   /* ... and never sooner                               */
#define S_COLD_TIMEOUT_MS 10000.0  /* before any round trip of the expert was seen       */
#define S_EWMA_NEW 0.2             /* weight of a new round-trip sample                  */
#define S_BACKOFF_MIN_MS 250.0     /* first quarantine: one heartbeat, at least this     */
#define S_BACKOFF_FIRST_MAX 5000.0 /* ... and at most this                               */
#define S_BACKOFF_MAX_MS 60000.0   /* doubling stops here                                */
#define S_RECOVERED_AFTER 8        /* answers in a row that forget past quarantines      */
#define S_TICK_MS 100              /* longest poll while idle                            */
#define S_ZAP_ENDPOINT "inproc://zeromq.zap.01"
#define S_TALLY_PEERS 64 /* (peer, kind) entries of refusals kept, overflow included */

/* ---- state ----------------------------------------------------------------- */

typedef enum s_health {
    S_HEALTHY,     /* takes work                                                  */
    S_QUARANTINED, /* no work until until_ms, then a probe                        */
    S_PROBING,     /* a probe is out; its answer in time makes it healthy         */
} s_health;

typedef struct s_replica {
    uint8_t id[MM_WIRE_MAX_ID]; /* ZeroMQ routing id of the connection          */
    size_t idlen;
    char name[32];        /* "e2-r1": expert 2, its first replica                   */
    char node[128];       /* "host:pid" from the Hello                              */
    char backend[128];    /* backend the node reported                              */
    int expert;           /* expert index served                                    */
    unsigned capacity;    /* rows per Work it accepts (0 = any)                     */
    int alive;            /* 0 once removed (kept for the statistics)               */
    int draining;         /* it answered DRAINING: send it nothing new              */
    uint64_t seq;         /* join order (ties of the least-loaded choice)           */
    double last_seen_ms;  /* last message received from it                          */
    double last_sent_ms;  /* last message sent to it                                */
    size_t inflight_rows; /* rows of its open sends                                 */
    size_t inflight;      /* its open sends (case batches sent, not settled)        */
    uint64_t batches;     /* answers used                                           */
    uint64_t rows;        /* rows of the answers used                               */
    s_health health;      /* see s_health                                           */
    double until_ms;      /* S_QUARANTINED: the probe goes out from then on         */
    double backoff_ms;    /* length of the last quarantine (0: none to remember)    */
    int ok_streak;        /* valid answers in a row                                 */
    uint64_t probe_id;    /* S_PROBING: the probe's batch id                        */
    double probe_sent_ms; /* ... when it went out                                   */
    double probe_end_ms;  /* ... when it times out                                  */
    double est_ms;        /* EWMA of the round trip of a batch (ms)                 */
    double est_row_ms;    /* EWMA of the round trip per row (ms)                    */
    uint64_t n_est;       /* samples in the EWMAs                                   */
    uint64_t sent;        /* case batches sent to it                                */
    uint64_t timeouts;    /* sends (and probes) it did not answer in time           */
    uint64_t errors;      /* error answers (not BUSY/DRAINING/EXPIRED)              */
    uint64_t late;        /* answers that came after their batch was settled        */
    uint64_t quarantines; /* times quarantined                                      */
    uint64_t probes;      /* probes sent                                            */
} s_replica;

/* One copy of a batch sent to one replica. Open until answered, until the
 * batch is settled, or until the replica is removed; a timed-out send stays
 * open (its late answer still wins if nothing else came). */
typedef struct s_copy {
    long replica;   /* index into reps                                          */
    double sent_ms; /* when it went out                                         */
    double end_ms;  /* it times out then                                        */
    int open;       /* counted in the replica's inflight                        */
    int timed_out;  /* its timeout was handled (the batch went elsewhere)       */
} s_copy;

typedef struct s_batch {
    uint64_t id;               /* batch_id on the wire (unique per router)         */
    int layer, moe, expert;    /* the job's indices                                */
    size_t n;                  /* rows                                             */
    mm_wire_buf *buf;          /* x [n, hidden], host copy (also for re-sends)     */
    s_copy sends[S_MAX_SENDS]; /* every send so far                                */
    int nsends;                /* entries used in sends                            */
    long avoid;                /* replica that answered BUSY/DRAINING (-1: none)   */
    double wait_since_ms;      /* no open usable send, no replica: since (0: no)   */
    int done;                  /* an answer is in y                                */
    zmq_msg_t y;               /* the answer's tensor frame (when done)            */
} s_batch;

/* A settled send: an answer for it later is late, not an error. */
typedef struct s_late {
    uint64_t batch; /* batch id (or probe id)                                   */
    long replica;   /* index into reps                                          */
    double sent_ms; /* when it went out                                         */
    size_t rows;    /* its rows                                                 */
} s_late;

struct mm_dispatch {
    mm_dispatch_options o;
    char (*fp)[MM_FINGERPRINT_HEX]; /* [n_experts] expected fingerprints             */
    char (*allow)[41];              /* [n_allow] Z85 public keys                     */
    void *zctx;                     /* ZeroMQ context                                */
    void *sock;                     /* the ROUTER socket (dispatch thread only)      */
    void *zap;                      /* ZAP handler (REP), curve mode only (ditto)    */
    char endpoint[256];             /* bound endpoint (constant after new)           */
    mm_wire_buf *probe_buf;         /* one row of zeros [1, hidden] for probes       */
    pthread_t thread;               /* the dispatch thread                           */
    int thread_started;             /* joined by destroy                             */
    int wake[2];                    /* pipe: a byte wakes the thread's poll          */
    pthread_mutex_t mu;             /* guards everything below                       */
    pthread_cond_t cv;              /* broadcast after each round of the thread      */
    int quit;                       /* destroy asks the thread to end                */
    int dead;                       /* the thread ended on a socket failure          */
    s_replica *reps;                /* every replica ever welcomed                   */
    size_t nreps, capreps;
    uint64_t next_seq, next_batch;
    int named[MM_CONFIG_MAX_EXPERTS];       /* replicas named so far, per expert           */
    int probe_layer[MM_CONFIG_MAX_EXPERTS]; /* decoder layer a probe of e uses (-1) */
    int probe_moe[MM_CONFIG_MAX_EXPERTS];   /* its MoE ordinal                      */
    /* the current MoE layer (one at a time) */
    s_batch b[MM_CONFIG_MAX_EXPERTS]; /* its batches, one per expert with rows       */
    size_t nb;                        /* batches in b                                */
    size_t open;                      /* batches not done                            */
    int active;                       /* handed over by start(), not yet finished    */
    double deadline_ms;               /* the step's deadline (0: none)               */
    int layer_rc;                     /* the layer failed: why                       */
    char layer_err[512];
    int queue_full;            /* a send met a full queue: poll briefly       */
    s_late late[S_LATE_RING];  /* ring of settled sends                       */
    size_t late_at;            /* next slot in late                           */
    mm_peer_tally *tally;      /* refused and malformed peers, per address    */
    double insecure_warned_ms; /* plaintext: when the WARNING was last logged  */
    uint64_t dropped;          /* malformed / unexpected / unknown messages   */
    uint64_t resent;           /* sends after a batch's first                 */
    uint64_t late_results;     /* answers after their batch was settled       */
    uint64_t expired;          /* EXPIRED answers                             */
    uint64_t acct_errors;      /* in-flight counts that would have underflowed */
    /* timing of the runner (microseconds) */
    uint64_t n_rtt;                   /* batches answered                            */
    double rtt_sum, rtt_min, rtt_max; /* send -> result received, per batch          */
    double compute_sum;               /* compute_us reported by the experts          */
    uint64_t n_layers;                /* MoE layers dispatched (steps with jobs)     */
    double layer_sum;                 /* start() entry -> all answers, per layer     */
    double wait_sum;                  /* time blocked in finish(), per layer         */
    double layer_t0;                  /* start() entry of the current layer          */
    /* metrics (NULL families when o.metrics is NULL: updates are no-ops) */
    mm_metric *m_routed, *m_batch_s, *m_live, *m_queue, *m_faults;
    int queue_shown[MM_CONFIG_MAX_EXPERTS]; /* last medmoe_expert_queue_depth set   */
};

/* ---- small helpers ---------------------------------------------------------- */

static double s_now(const mm_dispatch *d) { return mm_clock_now(&d->o.clock); }

static void s_log(const mm_dispatch *d, mm_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void s_log(const mm_dispatch *d, mm_log_level level, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    mm_vlogf(d->o.log, level, NULL, fmt, ap);
    va_end(ap);
}

static const char *s_health_str(s_health h) {
    return h == S_HEALTHY ? "healthy" : h == S_QUARANTINED ? "quarantined" : "probing";
}

/* Replicas of expert e that may be given work (lock held). */
static int s_live(const mm_dispatch *d, int e) {
    int n = 0;
    for (size_t i = 0; i < d->nreps; i++) {
        const s_replica *r = &d->reps[i];
        n += r->alive && !r->draining && r->health == S_HEALTHY && r->expert == e;
    }
    return n;
}

/* Fail the current layer (the first reason stays). */
static void s_fail(mm_dispatch *d, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void s_fail(mm_dispatch *d, int rc, const char *fmt, ...) {
    if (!d->active || d->layer_rc != MM_OK)
        return;
    va_list ap;
    va_start(ap, fmt);
    mm_verrorf(d->layer_err, sizeof d->layer_err, rc, fmt, ap);
    va_end(ap);
    d->layer_rc = rc;
    s_log(d, MM_LOG_WARN, "MoE layer step failed: %s", d->layer_err);
}

/* ---- metrics ---------------------------------------------------------------- */

static void s_show_live(mm_dispatch *d, int e) {
    char k[16];
    snprintf(k, sizeof k, "%d", e);
    mm_metric_set(d->m_live, s_live(d, e), k);
}

/* medmoe_expert_queue_depth{expert}: the current MoE layer's batches not yet
 * answered, per expert (sent or waiting for a replica). Only changed values
 * are set. */
static void s_show_queue(mm_dispatch *d) {
    if (!d->m_queue)
        return;
    int q[MM_CONFIG_MAX_EXPERTS] = {0};
    for (size_t i = 0; d->active && i < d->nb; i++)
        if (!d->b[i].done)
            q[d->b[i].expert]++;
    for (int e = 0; e < d->o.n_experts; e++)
        if (q[e] != d->queue_shown[e]) {
            char k[16];
            snprintf(k, sizeof k, "%d", e);
            mm_metric_set(d->m_queue, q[e], k);
            d->queue_shown[e] = q[e];
        }
}

static void s_count_fault(mm_dispatch *d, int e, const char *kind) {
    char k[16];
    snprintf(k, sizeof k, "%d", e);
    mm_metric_add(d->m_faults, 1, k, kind);
}

static int s_metrics_init(mm_dispatch *d, char *err, size_t errlen) {
    /* a batch's round trip: a few rows on loopback take ~100 us, a prefill
     * of a large image on a busy node seconds */
    static const double b[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                               0.025,  0.05,    0.1,    0.25,  0.5,    1,     2.5};
    mm_metrics *reg = d->o.metrics;
    d->m_routed = mm_metrics_counter(reg, "medmoe_tokens_routed_total",
                                     "Token rows sent to a routed expert, per decoder layer "
                                     "(re-sends and hedges not counted).",
                                     "layer,expert");
    d->m_batch_s = mm_metrics_histogram(reg, "medmoe_replica_batch_seconds",
                                        "Round trip of one batch to an expert replica: sent to "
                                        "result received.",
                                        "expert,replica", b, sizeof b / sizeof *b);
    d->m_live = mm_metrics_gauge(reg, "medmoe_live_replicas",
                                 "Replicas in service per expert (welcomed, not silent, not "
                                 "draining, not quarantined).",
                                 "expert");
    d->m_queue = mm_metrics_gauge(reg, "medmoe_expert_queue_depth",
                                  "Batches of the current MoE layer not yet answered by expert K "
                                  "(in flight or waiting for a replica).",
                                  "expert");
    d->m_faults = mm_metrics_counter(reg, "medmoe_replica_faults_total",
                                     "Replica faults that cost a re-send and a quarantine: "
                                     "kind=timeout (no answer in time) or error (an error answer).",
                                     "expert,kind");
    if (!d->m_routed || !d->m_batch_s || !d->m_live || !d->m_queue || !d->m_faults)
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
    o->insecure_warn_ms = 60000;
    o->refusal_log_ms = 10000;
    o->max_rows = 512;
    o->hwm = 1000;
}

const char *mm_dispatch_endpoint(const mm_dispatch *d) { return d->endpoint; }

/* An event caused by a peer that is not (or is no longer) a replica in
 * service: a refusal, a malformed or unexpected message. It is counted per
 * peer address and kind; the first of each per refusal_log_ms is logged at
 * once, the rest as one summary line per interval (s_tally_emit), so a flood
 * costs neither memory nor log volume in proportion to its size. */
static void s_peer_event(mm_dispatch *d, const char *peer, const char *kind, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void s_peer_event(mm_dispatch *d, const char *peer, const char *kind, const char *fmt, ...) {
    char text[MM_PEER_TALLY_DETAIL];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    if (mm_peer_tally_note(d->tally, peer, kind, text, s_now(d)))
        s_log(d, MM_LOG_WARN, "%s", text);
}

static void s_tally_emit(void *ctx, const mm_peer_tally_entry *e, uint64_t n, double span_ms) {
    s_log(ctx, MM_LOG_WARN,
          "%llu more %s event(s) from %s in the last %.1f s (%llu in all); the latest: %s",
          (unsigned long long)n, e->kind, e->peer, span_ms / 1000, (unsigned long long)e->total,
          e->detail);
}

/* Who sent m, for the tally: its address, else its routing id. */
static const char *s_peer_of(const mm_wire_msg *m, char *buf, size_t len) {
    if (*m->peer)
        return m->peer;
    return mm_wire_id_str(m->id, m->idlen, buf, len);
}

/* ---- sends and their accounting ------------------------------------------- */

static void s_remember_late(mm_dispatch *d, uint64_t batch, long ri, double sent_ms, size_t rows) {
    d->late[d->late_at] = (s_late){.batch = batch, .replica = ri, .sent_ms = sent_ms, .rows = rows};
    d->late_at = (d->late_at + 1) % S_LATE_RING;
}

/* Close an open send: its replica's in-flight counts drop by exactly it.
 * remember: an answer may still come and is then late, not unknown. */
static void s_close_send(mm_dispatch *d, s_batch *b, s_copy *s, int remember) {
    if (!s->open)
        return;
    s_replica *r = &d->reps[s->replica];
    if (r->inflight < 1 || r->inflight_rows < b->n) {
        d->acct_errors++; /* a bug: reported by the statistics, never hidden */
        r->inflight = 0;
        r->inflight_rows = 0;
    } else {
        r->inflight--;
        r->inflight_rows -= b->n;
    }
    s->open = 0;
    if (remember)
        s_remember_late(d, b->id, s->replica, s->sent_ms, b->n);
}

/* An open send of b to replica ri, or NULL. */
static s_copy *s_open_send(s_batch *b, long ri) {
    for (int i = 0; i < b->nsends; i++)
        if (b->sends[i].open && b->sends[i].replica == ri)
            return &b->sends[i];
    return NULL;
}

/* b has an open send whose timeout has not run out (no re-send needed). */
static int s_usable(const s_batch *b) {
    for (int i = 0; i < b->nsends; i++)
        if (b->sends[i].open && !b->sends[i].timed_out)
            return 1;
    return 0;
}

/* End the current layer: settle every send, free the buffers (lock held). */
static void s_layer_end(mm_dispatch *d) {
    for (size_t i = 0; i < d->nb; i++) {
        s_batch *b = &d->b[i];
        for (int k = 0; k < b->nsends; k++)
            s_close_send(d, b, &b->sends[k], 1);
        if (b->done)
            zmq_msg_close(&b->y);
        b->done = 0;
        mm_wire_buf_unref(&b->buf);
    }
    d->nb = 0;
    d->open = 0;
    d->active = 0;
    d->deadline_ms = 0;
    d->layer_rc = MM_OK;
    d->layer_err[0] = 0;
    s_show_queue(d);
}

/* ---- replica health --------------------------------------------------------- */

/* Estimated round trip of n rows at r (ms); < 0 when nothing was observed. */
static double s_est(const s_replica *r, size_t n) {
    if (!r->n_est)
        return -1;
    double per = r->est_row_ms * (double)n;
    return per > r->est_ms ? per : r->est_ms;
}

/* Timeout of a send of n rows to r (ms): S_TIMEOUT_MULT round trips as r
 * (or, before r was observed, the slowest observed replica of its expert)
 * does them, at least S_TIMEOUT_FLOOR_MS, at most batch_timeout_ms. */
static double s_timeout_ms(const mm_dispatch *d, const s_replica *r, size_t n) {
    double p = s_est(r, n);
    if (p < 0)
        for (size_t i = 0; i < d->nreps; i++)
            if (d->reps[i].alive && d->reps[i].expert == r->expert) {
                double q = s_est(&d->reps[i], n);
                p = q > p ? q : p;
            }
    double t = p < 0 ? S_COLD_TIMEOUT_MS : S_TIMEOUT_MULT * p;
    if (t < S_TIMEOUT_FLOOR_MS)
        t = S_TIMEOUT_FLOOR_MS;
    if (d->o.batch_timeout_ms > 0 && t > d->o.batch_timeout_ms)
        t = d->o.batch_timeout_ms;
    return t;
}

static void s_sample(s_replica *r, double rtt_ms, size_t n) {
    double row = rtt_ms / (double)(n ? n : 1);
    if (!r->n_est) {
        r->est_ms = rtt_ms;
        r->est_row_ms = row;
    } else {
        r->est_ms += S_EWMA_NEW * (rtt_ms - r->est_ms);
        r->est_row_ms += S_EWMA_NEW * (row - r->est_row_ms);
    }
    r->n_est++;
}

static double s_first_backoff(const mm_dispatch *d) {
    double b = d->o.heartbeat_ms;
    return b < S_BACKOFF_MIN_MS      ? S_BACKOFF_MIN_MS
           : b > S_BACKOFF_FIRST_MAX ? S_BACKOFF_FIRST_MAX
                                     : b;
}

/* Take replica ri out of service for a back-off (doubling per fault): it
 * stays connected, gets no work, then a probe. Its other usable sends are
 * re-sent now (they stay open: a late answer still counts). */
static void s_quarantine(mm_dispatch *d, size_t ri, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void s_quarantine(mm_dispatch *d, size_t ri, const char *fmt, ...) {
    s_replica *r = &d->reps[ri];
    char why[300];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    double now = s_now(d);
    if (r->probe_id) {
        s_remember_late(d, r->probe_id, (long)ri, r->probe_sent_ms, 1);
        r->probe_id = 0;
    }
    r->backoff_ms = r->backoff_ms > 0 ? 2 * r->backoff_ms : s_first_backoff(d);
    if (r->backoff_ms > S_BACKOFF_MAX_MS)
        r->backoff_ms = S_BACKOFF_MAX_MS;
    r->health = S_QUARANTINED;
    r->until_ms = now + r->backoff_ms;
    r->ok_streak = 0;
    r->quarantines++;
    for (size_t i = 0; d->active && i < d->nb; i++) {
        s_copy *s = s_open_send(&d->b[i], (long)ri);
        if (s)
            s->timed_out = 1;
    }
    s_show_live(d, r->expert);
    s_log(d, MM_LOG_WARN,
          "replica %s (expert %d, %s) quarantined for %.0f ms: %s; expert %d has %d replica(s) "
          "in service",
          r->name, r->expert, r->node, r->backoff_ms, why, r->expert, s_live(d, r->expert));
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
        r->last_sent_ms = s_now(d);
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
    /* A refused peer that is gone or reads nothing is no news: the refusal
     * itself is counted and logged (s_peer_event). */
    if (mm_wire_send(d->sock, id, idlen, env, NULL, err, sizeof err) != MM_OK)
        s_log(d, MM_LOG_DEBUG, "reply to an unregistered peer failed: %s", err);
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
    r->probe_id = 0;
    size_t moved = 0;
    for (size_t i = 0; d->active && i < d->nb; i++) {
        s_batch *b = &d->b[i];
        s_copy *s = s_open_send(b, (long)ri);
        if (s) {
            s_close_send(d, b, s, 0);
            moved += !b->done;
        }
    }
    if (r->inflight || r->inflight_rows) { /* every open send was in the layer */
        d->acct_errors++;
        r->inflight = 0;
        r->inflight_rows = 0;
    }
    s_show_live(d, r->expert);
    if (d->m_batch_s) { /* replica names are not reused: keep the series count bounded */
        char k[16];
        snprintf(k, sizeof k, "%d", r->expert);
        mm_metric_remove(d->m_batch_s, k, r->name);
    }
    s_log(d, MM_LOG_INFO,
          "replica %s (expert %d, %s) left: %s; %zu in-flight batch(es) to re-send; expert %d "
          "has %d replica(s) in service",
          r->name, r->expert, r->node, why, moved, r->expert, s_live(d, r->expert));
}

/* Least-loaded healthy replica of b's expert that takes its rows and has no
 * copy of it yet (fewest rows in flight, then fewest served, then the first
 * joined); b->avoid only when nothing else is there. -1: none. */
static long s_choose(const mm_dispatch *d, s_batch *b) {
    long best = -1, fallback = -1;
    for (size_t i = 0; i < d->nreps; i++) {
        const s_replica *r = &d->reps[i];
        if (!r->alive || r->draining || r->health != S_HEALTHY || r->expert != b->expert ||
            (r->capacity && r->capacity < b->n) || s_open_send(b, (long)i))
            continue;
        if ((long)i == b->avoid) {
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

/* Work.deadline_ms for a send now: the time left to the step's deadline
 * (rounded up, at least 1), or batch_timeout_ms without one. 0: past. */
static uint32_t s_wire_deadline(const mm_dispatch *d, double now) {
    if (d->deadline_ms <= 0)
        return d->o.batch_timeout_ms > 0 ? (uint32_t)d->o.batch_timeout_ms : 0;
    double left = ceil(d->deadline_ms - now);
    if (left <= 0)
        return 0;
    return left > UINT32_MAX ? UINT32_MAX : (uint32_t)left;
}

/* Send batch b to replica ri. */
static int s_send_work(mm_dispatch *d, s_batch *b, long ri) {
    s_replica *r = &d->reps[ri];
    double now = s_now(d);
    Medmoe__Wire__Work w = MEDMOE__WIRE__WORK__INIT;
    w.batch_id = b->id;
    w.layer = b->layer;
    w.moe = b->moe;
    w.expert = b->expert;
    w.rows = (uint32_t)b->n;
    w.width = (uint32_t)d->o.hidden;
    w.dtype = MEDMOE__WIRE__DTYPE__DTYPE_F32;
    w.deadline_ms = s_wire_deadline(d, now);
    if (d->deadline_ms > 0 && w.deadline_ms == 0) {
        s_fail(d, MM_ETIMEOUT,
               "deadline exceeded before batch %llu (expert %d of MoE layer %d) "
               "was sent",
               (unsigned long long)b->id, b->expert, b->moe);
        return MM_ETIMEOUT;
    }
    Medmoe__Wire__Envelope env = MEDMOE__WIRE__ENVELOPE__INIT;
    env.body_case = MM_WIRE_WORK;
    env.work = &w;
    double timeout = s_timeout_ms(d, r, b->n);
    int rc = s_send(d, (size_t)ri, &env, b->buf);
    if (rc != MM_OK)
        return rc;
    s_copy *s = &b->sends[b->nsends++];
    *s = (s_copy){.replica = ri, .sent_ms = now, .end_ms = now + timeout, .open = 1};
    if (d->deadline_ms > 0 && s->end_ms > d->deadline_ms)
        s->end_ms = d->deadline_ms;
    r->inflight++;
    r->inflight_rows += b->n;
    r->sent++;
    if (b->nsends > 1) {
        d->resent++;
    } else if (d->m_routed) { /* re-sends are not routed rows */
        char layer[16], k[16];
        snprintf(layer, sizeof layer, "%d", b->layer);
        snprintf(k, sizeof k, "%d", b->expert);
        mm_metric_add(d->m_routed, (double)b->n, layer, k);
    }
    b->wait_since_ms = 0;
    return MM_OK;
}

/* Send every batch of the layer that has no usable send to the best replica
 * available; a batch with none starts waiting. */
static void s_pump(mm_dispatch *d) {
    d->queue_full = 0;
    if (!d->active || d->layer_rc != MM_OK)
        return;
    for (size_t i = 0; i < d->nb && d->layer_rc == MM_OK; i++) {
        s_batch *b = &d->b[i];
        while (!b->done && !s_usable(b)) {
            long ri = s_choose(d, b);
            if (ri < 0) {
                if (!b->wait_since_ms)
                    b->wait_since_ms = s_now(d);
                break;
            }
            if (b->nsends >= S_MAX_SENDS) {
                s_fail(d, MM_ETIMEOUT,
                       "expert %d of MoE layer %d: batch %llu sent %d times without an answer",
                       b->expert, b->moe, (unsigned long long)b->id, b->nsends);
                return;
            }
            int rc = s_send_work(d, b, ri);
            if (rc == MM_OK || rc == MM_ETIMEOUT)
                break;
            if (rc == MM_EAGAIN || d->reps[ri].alive) {
                d->queue_full = 1; /* queue full or a local failure: again on the next round */
                break;
            }
            /* else the replica was just removed: choose again */
        }
    }
}

/* A probe to quarantined replica ri, whose back-off is over: one row of
 * zeros for a MoE layer it serves. */
static void s_probe(mm_dispatch *d, size_t ri) {
    s_replica *r = &d->reps[ri];
    int e = r->expert;
    if (d->probe_layer[e] < 0)
        return; /* never happens: a quarantine follows a batch of expert e */
    double now = s_now(d), timeout = s_timeout_ms(d, r, 1);
    Medmoe__Wire__Work w = MEDMOE__WIRE__WORK__INIT;
    w.batch_id = ++d->next_batch;
    w.layer = d->probe_layer[e];
    w.moe = d->probe_moe[e];
    w.expert = e;
    w.rows = 1;
    w.width = (uint32_t)d->o.hidden;
    w.dtype = MEDMOE__WIRE__DTYPE__DTYPE_F32;
    w.deadline_ms = (uint32_t)timeout;
    w.probe = 1;
    Medmoe__Wire__Envelope env = MEDMOE__WIRE__ENVELOPE__INIT;
    env.body_case = MM_WIRE_WORK;
    env.work = &w;
    if (s_send(d, ri, &env, d->probe_buf) != MM_OK)
        return; /* a full queue: next round; a gone peer was removed */
    r->health = S_PROBING;
    r->probe_id = w.batch_id;
    r->probe_sent_ms = now;
    r->probe_end_ms = now + timeout;
    r->probes++;
    s_log(d, MM_LOG_INFO,
          "probing quarantined replica %s (expert %d): batch %llu, %.0f ms to answer", r->name, e,
          (unsigned long long)w.batch_id, timeout);
}

/* ---- receiving ------------------------------------------------------------ */

static long s_find(const mm_dispatch *d, const uint8_t *id, size_t idlen) {
    for (size_t i = 0; i < d->nreps; i++)
        if (d->reps[i].alive && d->reps[i].idlen == idlen && !memcmp(d->reps[i].id, id, idlen))
            return (long)i;
    return -1;
}

/* Refuse a Hello (kind: "version", "expert", "fingerprint", ...). The
 * peer is told why; nothing about it is kept but a count in the tally. */
static void s_refuse(mm_dispatch *d, const mm_wire_msg *m, const char *node, int expert,
                     const char *kind, const char *reason) {
    Medmoe__Wire__Refuse rf = MEDMOE__WIRE__REFUSE__INIT;
    rf.reason = (char *)reason;
    Medmoe__Wire__Envelope env = MEDMOE__WIRE__ENVELOPE__INIT;
    env.body_case = MM_WIRE_REFUSE;
    env.refuse = &rf;
    s_send_to_id(d, m->id, m->idlen, &env);
    char idbuf[2 * MM_WIRE_MAX_ID + 1];
    s_peer_event(d, s_peer_of(m, idbuf, sizeof idbuf), kind, "refused %.64s (expert %d): %s",
                 node && *node ? node : "a peer", expert, reason);
}

/* The latest earlier record of the same process serving expert e: the same
 * connection, or the same node ("host:pid"). -1: none. */
static long s_predecessor(const mm_dispatch *d, const mm_wire_msg *m, int e, const char *node) {
    for (size_t i = d->nreps; i-- > 0;) {
        const s_replica *r = &d->reps[i];
        if (r->expert != e)
            continue;
        if ((r->idlen == m->idlen && !memcmp(r->id, m->id, m->idlen)) ||
            (*node && !strcmp(r->node, node)))
            return (long)i;
    }
    return -1;
}

static void s_hello(mm_dispatch *d, const mm_wire_msg *m) {
    const Medmoe__Wire__Hello *h = m->env->hello;
    char reason[400];
    const char *node = h->node ? h->node : "";
    if (mm_wire_check_hello(h, d->o.n_experts, d->fp[0], sizeof d->fp[0], reason, sizeof reason) !=
        MM_OK) {
        const char *kind = h->version != MM_WIRE_VERSION                  ? "version"
                           : h->expert < 0 || h->expert >= d->o.n_experts ? "expert"
                                                                          : "fingerprint";
        s_refuse(d, m, node, h->expert, kind, reason);
        return;
    }
    long old = s_find(d, m->id, m->idlen);
    if (old >= 0)
        s_drop(d, (size_t)old, "said Hello again on the same connection");
    if (d->nreps == d->capreps) {
        size_t cap = d->capreps ? 2 * d->capreps : 16;
        s_replica *nr = realloc(d->reps, cap * sizeof *nr);
        if (!nr) {
            s_refuse(d, m, node, h->expert, "memory", "router out of memory");
            return;
        }
        d->reps = nr;
        d->capreps = cap;
    }
    long prev = s_predecessor(d, m, h->expert, node);
    size_t ri = d->nreps++;
    s_replica *r = &d->reps[ri];
    memset(r, 0, sizeof *r);
    memcpy(r->id, m->id, m->idlen);
    r->idlen = m->idlen;
    r->expert = h->expert;
    r->capacity = h->capacity;
    r->alive = 1;
    r->seq = d->next_seq++;
    r->last_seen_ms = s_now(d);
    snprintf(r->name, sizeof r->name, "e%d-r%d", h->expert, ++d->named[h->expert]);
    snprintf(r->node, sizeof r->node, "%s", node);
    snprintf(r->backend, sizeof r->backend, "%s", h->backend ? h->backend : "");
    char inherited[200] = "";
    if (prev >= 0) {
        /* The same process again: what was learnt about it still holds, and
         * a quarantine is not lifted by saying Hello. */
        const s_replica *p = &d->reps[prev];
        r->est_ms = p->est_ms;
        r->est_row_ms = p->est_row_ms;
        r->n_est = p->n_est;
        r->backoff_ms = p->backoff_ms;
        if (p->health != S_HEALTHY) {
            r->health = S_QUARANTINED;
            r->until_ms = p->until_ms;
            if (p->health == S_PROBING) { /* its probe was lost with the connection */
                r->backoff_ms = fmin(2 * r->backoff_ms, S_BACKOFF_MAX_MS);
                r->until_ms = r->last_seen_ms + r->backoff_ms;
            }
            snprintf(inherited, sizeof inherited, "; still quarantined (as %s) for %.0f ms",
                     p->name, fmax(0, r->until_ms - r->last_seen_ms));
        }
    }
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
              "replica %s joined: expert %d, node %s, backend %s, capacity %u%s; expert %d has %d "
              "replica(s) in service",
              r->name, r->expert, r->node, r->backend, r->capacity, inherited, r->expert,
              s_live(d, r->expert));
}

static s_batch *s_batch_by_id(mm_dispatch *d, uint64_t id) {
    for (size_t i = 0; d->active && i < d->nb; i++)
        if (d->b[i].id == id)
            return &d->b[i];
    return NULL;
}

static const s_late *s_late_find(const mm_dispatch *d, uint64_t id, long ri) {
    for (size_t i = 0; i < S_LATE_RING; i++)
        if (d->late[i].batch == id && d->late[i].replica == ri)
            return &d->late[i];
    return NULL;
}

/* A Result's header and tensor agree with a Work of n rows (layer, moe,
 * expert) as this router sent it. */
static int s_result_fits(const mm_dispatch *d, const mm_wire_msg *m, int layer, int moe, int expert,
                         size_t n) {
    return mm_wire_result_fits(m->env->result, m->tensor_len, layer, moe, expert, n,
                               (size_t)d->o.hidden);
}

/* The answer to replica ri's probe. */
static void s_probe_result(mm_dispatch *d, size_t ri, const mm_wire_msg *m) {
    s_replica *r = &d->reps[ri];
    const Medmoe__Wire__Result *res = m->env->result;
    int e = r->expert;
    if (!s_result_fits(d, m, d->probe_layer[e], d->probe_moe[e], e, 1)) {
        d->dropped++;
        s_drop(d, ri, "malformed answer to probe %llu", (unsigned long long)res->batch_id);
        return;
    }
    double rtt = s_now(d) - r->probe_sent_ms;
    r->probe_id = 0;
    if (res->error != MEDMOE__WIRE__ERROR_CODE__ERROR_OK) {
        r->errors++;
        s_count_fault(d, e, "error");
        s_quarantine(d, ri, "probe answered %s: %s", mm_wire_error_str(res->error),
                     res->message ? res->message : "");
        return;
    }
    s_sample(r, rtt, 1);
    r->health = S_HEALTHY;
    s_show_live(d, e);
    s_log(d, MM_LOG_INFO,
          "replica %s (expert %d) answered its probe in %.1f ms: back in service; expert %d has "
          "%d replica(s) in service",
          r->name, e, rtt, e, s_live(d, e));
}

static void s_result(mm_dispatch *d, long ri, mm_wire_msg *m) {
    const Medmoe__Wire__Result *res = m->env->result;
    char idbuf[2 * MM_WIRE_MAX_ID + 1];
    if (ri < 0) {
        d->dropped++;
        s_peer_event(d, s_peer_of(m, idbuf, sizeof idbuf), "unregistered",
                     "discarded result for batch %llu from an unregistered or removed peer %s",
                     (unsigned long long)res->batch_id,
                     mm_wire_id_str(m->id, m->idlen, idbuf, sizeof idbuf));
        return;
    }
    s_replica *r = &d->reps[ri];
    if (r->probe_id && res->batch_id == r->probe_id) {
        s_probe_result(d, (size_t)ri, m);
        return;
    }
    s_batch *b = s_batch_by_id(d, res->batch_id);
    s_copy *s = b ? s_open_send(b, ri) : NULL;
    if (!s) {
        const s_late *l = s_late_find(d, res->batch_id, ri);
        if (l) {
            /* Sent to this replica and settled since (answered elsewhere,
             * timed-out probe, step over): late, not an error. A valid
             * answer still teaches the round-trip estimate. */
            r->late++;
            d->late_results++;
            if (res->error == MEDMOE__WIRE__ERROR_CODE__ERROR_OK && res->rows == l->rows &&
                m->tensor_len == l->rows * (size_t)d->o.hidden * sizeof(float))
                s_sample(r, s_now(d) - l->sent_ms, l->rows);
            s_log(d, MM_LOG_DEBUG, "late answer from %s for batch %llu (%s): discarded", r->name,
                  (unsigned long long)res->batch_id, mm_wire_error_str(res->error));
            return;
        }
        d->dropped++;
        s_log(d, MM_LOG_WARN, "discarded result from %s for %s batch %llu", r->name,
              !b        ? "unknown"
              : b->done ? "already answered"
                        : "another replica's",
              (unsigned long long)res->batch_id);
        return;
    }
    /* The replica answered a batch it holds: anything wrong now is its fault. */
    if (!s_result_fits(d, m, b->layer, b->moe, b->expert, b->n)) {
        d->dropped++;
        s_drop(d, (size_t)ri,
               "malformed result for batch %llu (layer %d moe %d expert %d rows %u width %u, "
               "%zu tensor bytes; expected layer %d moe %d expert %d rows %zu width %d)",
               (unsigned long long)res->batch_id, res->layer, res->moe, res->expert, res->rows,
               res->width, m->tensor_len, b->layer, b->moe, b->expert, b->n, d->o.hidden);
        return;
    }
    double now = s_now(d), rtt_ms = now - s->sent_ms;
    s_close_send(d, b, s, 0);
    if (res->error != MEDMOE__WIRE__ERROR_CODE__ERROR_OK) {
        const char *msg = res->message ? res->message : "";
        switch (res->error) {
        case MEDMOE__WIRE__ERROR_CODE__ERROR_BUSY:
        case MEDMOE__WIRE__ERROR_CODE__ERROR_DRAINING:
            if (res->error == MEDMOE__WIRE__ERROR_CODE__ERROR_DRAINING) {
                r->draining = 1;
                s_show_live(d, r->expert);
            }
            s_log(d, MM_LOG_WARN,
                  "replica %s answered %s for batch %llu (%s): sending it elsewhere", r->name,
                  mm_wire_error_str(res->error), (unsigned long long)b->id, msg);
            b->avoid = ri;
            return;
        case MEDMOE__WIRE__ERROR_CODE__ERROR_EXPERT_NOT_LOADED:
            s_drop(d, (size_t)ri, "EXPERT_NOT_LOADED for batch %llu: %s", (unsigned long long)b->id,
                   msg);
            return;
        case MEDMOE__WIRE__ERROR_CODE__ERROR_EXPIRED:
            d->expired++;
            if (d->deadline_ms > 0) {
                s_fail(d, MM_ETIMEOUT,
                       "deadline exceeded: expert %d of MoE layer %d (replica %s) had no time "
                       "left for batch %llu: %s",
                       b->expert, b->moe, r->name, (unsigned long long)b->id, msg);
            } else { /* our batch_timeout_ms ran out in its queue: not the cases' deadline */
                s_log(d, MM_LOG_WARN,
                      "replica %s answered EXPIRED for batch %llu (%s): sending "
                      "it elsewhere",
                      r->name, (unsigned long long)b->id, msg);
                b->avoid = ri;
            }
            return;
        default:
            r->errors++;
            s_count_fault(d, r->expert, "error");
            s_quarantine(d, (size_t)ri, "answered %s for batch %llu: %s",
                         mm_wire_error_str(res->error), (unsigned long long)b->id, msg);
            return;
        }
    }
    /* The first valid answer wins: keep its frame, settle the other copies. */
    zmq_msg_init(&b->y);
    zmq_msg_move(&b->y, &m->tensor_msg);
    b->done = 1;
    d->open--;
    for (int k = 0; k < b->nsends; k++)
        s_close_send(d, b, &b->sends[k], 1);
    s_sample(r, rtt_ms, b->n);
    if (++r->ok_streak >= S_RECOVERED_AFTER && r->health == S_HEALTHY)
        r->backoff_ms = 0;
    double rtt = rtt_ms * 1e3;
    d->n_rtt++;
    d->rtt_sum += rtt;
    d->compute_sum += (double)res->compute_us;
    if (d->n_rtt == 1 || rtt < d->rtt_min)
        d->rtt_min = rtt;
    if (rtt > d->rtt_max)
        d->rtt_max = rtt;
    r->batches++;
    r->rows += b->n;
    if (d->m_batch_s) {
        char k[16];
        snprintf(k, sizeof k, "%d", r->expert);
        mm_metric_observe(d->m_batch_s, rtt / 1e6, k, r->name);
    }
}

/* One message off the socket. MM_EAGAIN: none queued. */
static int s_handle_one(mm_dispatch *d) {
    mm_wire_msg m;
    char err[256], idbuf[2 * MM_WIRE_MAX_ID + 1];
    int rc = mm_wire_recv(d->sock, 1, &m, err, sizeof err);
    if (rc == MM_EAGAIN || rc == MM_EIO)
        return rc;
    long ri = s_find(d, m.id, m.idlen);
    char peer[MM_PEER_TALLY_PEER];
    snprintf(peer, sizeof peer, "%s",
             ri >= 0 ? d->reps[ri].name : s_peer_of(&m, idbuf, sizeof idbuf));
    if (rc == MM_EPROTO) {
        d->dropped++;
        s_peer_event(
            d, peer, "malformed", "dropped a malformed message from %s: %s",
            ri >= 0 ? d->reps[ri].name : mm_wire_id_str(m.id, m.idlen, idbuf, sizeof idbuf), err);
        return MM_OK;
    }
    if (ri >= 0)
        d->reps[ri].last_seen_ms = s_now(d);
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
        s_peer_event(d, peer, "unexpected", "dropped an unexpected message (body %d) from %s",
                     (int)m.env->body_case,
                     ri >= 0 ? d->reps[ri].name
                             : mm_wire_id_str(m.id, m.idlen, idbuf, sizeof idbuf));
        break;
    }
    mm_wire_msg_clear(&m);
    return MM_OK;
}

/* ---- ZAP (RFC 27): accept CURVE clients whose public key is allowed -------- */

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
    if (!ok)
        s_peer_event(d, addr, "curve",
                     "refused a connection: curve key %s from %s is not in --curve-allow",
                     *key ? key : "(none)", addr);
}

/* ---- the periodic work ------------------------------------------------------ */

/* Heartbeats to quiet replicas; removal of silent ones; probes of
 * quarantined ones whose back-off is over; probes unanswered in time. */
static void s_warn_insecure(mm_dispatch *d, double now) {
    int n = 0;
    for (size_t i = 0; i < d->nreps; i++)
        n += d->reps[i].alive;
    s_log(d, MM_LOG_WARN,
          "WARNING: the expert socket %s is plaintext (--insecure-experts): any peer that reaches "
          "it and knows the model's fingerprints joins as an expert and its answers are used; "
          "%d replica(s) connected (repeated every %d s)",
          d->endpoint, n, d->o.insecure_warn_ms / 1000);
    d->insecure_warned_ms = now;
}

static void s_tick(mm_dispatch *d) {
    double now = s_now(d), hb = d->o.heartbeat_ms;
    mm_peer_tally_flush(d->tally, now, s_tally_emit, d);
    if (d->o.insecure && now - d->insecure_warned_ms >= d->o.insecure_warn_ms)
        s_warn_insecure(d, now);
    for (size_t i = 0; i < d->nreps; i++) {
        s_replica *r = &d->reps[i];
        if (!r->alive)
            continue;
        if (now - r->last_seen_ms >= S_DEAD_AFTER * hb) {
            s_drop(d, i, "silent for %.0f ms (%d heartbeats)", now - r->last_seen_ms, S_DEAD_AFTER);
            continue;
        }
        if (r->health == S_PROBING && now >= r->probe_end_ms) {
            r->timeouts++;
            s_count_fault(d, r->expert, "timeout");
            s_quarantine(d, i, "probe %llu unanswered after %.0f ms",
                         (unsigned long long)r->probe_id, now - r->probe_sent_ms);
        } else if (r->health == S_QUARANTINED && now >= r->until_ms && !r->draining) {
            s_probe(d, i);
            if (!r->alive)
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

/* The layer's clocks: sends past their timeout (the replica is quarantined,
 * the batch goes elsewhere), batches that waited too long for a replica,
 * the step's deadline, a stop signal. */
static void s_check(mm_dispatch *d) {
    if (!d->active || d->layer_rc != MM_OK || !d->open)
        return;
    if (d->o.stop && *d->o.stop) {
        s_fail(d, MM_ERR, "router shutting down");
        return;
    }
    double now = s_now(d);
    for (size_t i = 0; i < d->nb; i++) {
        s_batch *b = &d->b[i];
        if (b->done)
            continue;
        if (d->deadline_ms > 0 && now >= d->deadline_ms) {
            s_fail(d, MM_ETIMEOUT,
                   "deadline exceeded: expert %d of MoE layer %d had not answered batch %llu "
                   "(%d send(s))",
                   b->expert, b->moe, (unsigned long long)b->id, b->nsends);
            return;
        }
        for (int k = 0; k < b->nsends; k++) {
            s_copy *s = &b->sends[k];
            if (!s->open || s->timed_out || now < s->end_ms)
                continue;
            s_replica *r = &d->reps[s->replica];
            s->timed_out = 1;
            r->timeouts++;
            s_count_fault(d, r->expert, "timeout");
            s_quarantine(d, (size_t)s->replica, "batch %llu (%zu rows) unanswered after %.0f ms",
                         (unsigned long long)b->id, b->n, now - s->sent_ms);
        }
        if (b->wait_since_ms > 0 && !s_usable(b) && now - b->wait_since_ms >= d->o.expert_wait_ms) {
            int quarantined = 0;
            for (size_t k = 0; k < d->nreps; k++)
                quarantined += d->reps[k].alive && d->reps[k].expert == b->expert &&
                               d->reps[k].health != S_HEALTHY;
            s_fail(d, MM_ETIMEOUT,
                   "expert %d of MoE layer %d has no live replica (waited %d ms; %d connected "
                   "replica(s) quarantined)",
                   b->expert, b->moe, d->o.expert_wait_ms, quarantined);
            return;
        }
    }
}

/* How long the next poll may wait (ms). */
static int s_poll_ms(const mm_dispatch *d) {
    double now = s_now(d), next = now + S_TICK_MS;
    double hb = d->o.heartbeat_ms / 2.0;
    if (now + hb < next)
        next = now + hb;
    if (d->queue_full)
        next = fmin(next, now + 5);
    if (d->active && d->layer_rc == MM_OK && d->open) {
        if (d->deadline_ms > 0)
            next = fmin(next, d->deadline_ms);
        for (size_t i = 0; i < d->nb; i++) {
            const s_batch *b = &d->b[i];
            if (b->done)
                continue;
            for (int k = 0; k < b->nsends; k++)
                if (b->sends[k].open && !b->sends[k].timed_out)
                    next = fmin(next, b->sends[k].end_ms);
            if (b->wait_since_ms > 0)
                next = fmin(next, b->wait_since_ms + d->o.expert_wait_ms);
        }
    }
    for (size_t i = 0; i < d->nreps; i++) {
        const s_replica *r = &d->reps[i];
        if (r->alive && r->health == S_QUARANTINED)
            next = fmin(next, r->until_ms);
        else if (r->alive && r->health == S_PROBING)
            next = fmin(next, r->probe_end_ms);
    }
    double t = ceil(next - now);
    return t < 0 ? 0 : (int)t;
}

/* ---- the thread -------------------------------------------------------------- */

static void s_wake(mm_dispatch *d) {
    char one = 1;
    if (write(d->wake[1], &one, 1) < 0) {
        /* the pipe is full: the thread has wake-ups pending anyway */
    }
}

static void *s_thread(void *arg) {
    mm_dispatch *d = arg;
    pthread_mutex_lock(&d->mu);
    while (!d->quit) {
        zmq_pollitem_t it[3];
        int n = 0, izap = -1;
        it[n++] = (zmq_pollitem_t){.socket = d->sock, .events = ZMQ_POLLIN};
        it[n++] = (zmq_pollitem_t){.fd = d->wake[0], .events = ZMQ_POLLIN};
        if (d->zap) {
            izap = n;
            it[n++] = (zmq_pollitem_t){.socket = d->zap, .events = ZMQ_POLLIN};
        }
        int t = s_poll_ms(d);
        pthread_mutex_unlock(&d->mu);
        int rc = zmq_poll(it, n, t);
        int perr = rc < 0 ? zmq_errno() : 0;
        if (rc > 0 && (it[1].revents & ZMQ_POLLIN)) {
            char buf[64];
            while (read(d->wake[0], buf, sizeof buf) > 0) {
            }
        }
        pthread_mutex_lock(&d->mu);
        if (rc < 0 && perr != EINTR) {
            s_log(d, MM_LOG_ERROR, "dispatch: poll failed: %s; the expert socket is closed",
                  zmq_strerror(perr));
            s_fail(d, MM_EIO, "dispatch: the expert socket failed (%s)", zmq_strerror(perr));
            d->dead = 1;
            break;
        }
        if (rc > 0 && izap >= 0 && (it[izap].revents & ZMQ_POLLIN))
            s_zap_one(d);
        if (rc > 0 && (it[0].revents & ZMQ_POLLIN)) {
            /* bounded: a flood cannot starve the rest of the loop */
            for (int i = 0; i < 1000 && s_handle_one(d) == MM_OK; i++) {
            }
        }
        s_tick(d);
        s_check(d);
        s_pump(d);
        s_show_queue(d);
        pthread_cond_broadcast(&d->cv);
    }
    pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->mu);
    return NULL;
}

/* ---- the runner (engine thread) ---------------------------------------------- */

static int s_start(void *ctx, mm_model *m, mm_expert_job *jobs, size_t n, char *err,
                   size_t errlen) {
    mm_dispatch *d = ctx;
    (void)m;
    double t0 = s_now(d);
    if (n > MM_CONFIG_MAX_EXPERTS)
        return mm_errorf(err, errlen, MM_EINVAL, "dispatch: %zu jobs in one layer (at most %d)", n,
                         MM_CONFIG_MAX_EXPERTS);
    /* The rows are read here, outside the lock: the thread keeps running. */
    mm_wire_buf *bufs[MM_CONFIG_MAX_EXPERTS] = {0};
    int rc = MM_OK;
    for (size_t i = 0; i < n && rc == MM_OK; i++) {
        mm_expert_job *j = &jobs[i];
        size_t bytes;
        if (j->n < 1 || !mm_size_mul(j->n, (size_t)d->o.hidden * sizeof(float), &bytes) ||
            j->n > d->o.max_rows || j->expert < 0 || j->expert >= d->o.n_experts) {
            rc = mm_errorf(err, errlen, MM_EINVAL,
                           "dispatch: job of %zu rows for expert %d (at most %zu rows)", j->n,
                           j->expert, d->o.max_rows);
        } else if (!(bufs[i] = mm_wire_buf_new(bytes))) {
            rc = mm_errorf(err, errlen, MM_ENOMEM, "dispatch: out of memory for %zu bytes", bytes);
        } else if ((rc = mm_tensor_get(j->x, bufs[i]->data)) != MM_OK) {
            mm_errorf(err, errlen, rc, "dispatch: reading rows of expert %d, MoE layer %d: %s",
                      j->expert, j->moe, mm_backend_error(j->x->be));
        }
    }
    if (rc != MM_OK) {
        for (size_t i = 0; i < n; i++)
            mm_wire_buf_unref(&bufs[i]);
        return rc;
    }
    pthread_mutex_lock(&d->mu);
    s_layer_end(d); /* a layer whose finish() never came: the step failed in between */
    if (d->dead) {
        pthread_mutex_unlock(&d->mu);
        for (size_t i = 0; i < n; i++)
            mm_wire_buf_unref(&bufs[i]);
        return mm_errorf(err, errlen, MM_EIO, "dispatch: the expert socket failed");
    }
    double deadline = 0;
    for (size_t i = 0; i < n; i++) {
        mm_expert_job *j = &jobs[i];
        s_batch *b = &d->b[i];
        memset(b, 0, sizeof *b);
        b->id = ++d->next_batch;
        b->layer = j->layer;
        b->moe = j->moe;
        b->expert = j->expert;
        b->n = j->n;
        b->buf = bufs[i];
        b->avoid = -1;
        d->probe_layer[j->expert] = j->layer;
        d->probe_moe[j->expert] = j->moe;
        if (j->deadline_ms > 0 && (deadline <= 0 || j->deadline_ms < deadline))
            deadline = j->deadline_ms;
    }
    d->nb = n;
    d->open = n;
    d->active = 1;
    d->deadline_ms = deadline;
    d->layer_rc = MM_OK;
    d->layer_t0 = t0;
    pthread_mutex_unlock(&d->mu);
    s_wake(d);
    return MM_OK;
}

static int s_finish(void *ctx, mm_model *m, mm_expert_job *jobs, size_t n, char *err,
                    size_t errlen) {
    mm_dispatch *d = ctx;
    (void)m;
    double t_wait = s_now(d);
    zmq_msg_t ys[MM_CONFIG_MAX_EXPERTS];
    int rc = MM_OK;
    pthread_mutex_lock(&d->mu);
    if (!d->active || d->nb != n) {
        pthread_mutex_unlock(&d->mu);
        return mm_errorf(err, errlen, MM_EINVAL, "dispatch: finish() of %zu jobs without start()",
                         n);
    }
    while (d->open > 0 && d->layer_rc == MM_OK && !d->dead)
        pthread_cond_wait(&d->cv, &d->mu);
    if (d->layer_rc != MM_OK) {
        rc = mm_errorf(err, errlen, d->layer_rc, "%s", d->layer_err);
    } else if (d->open > 0) {
        rc = mm_errorf(err, errlen, MM_EIO, "dispatch: the expert socket failed");
    } else {
        for (size_t i = 0; i < n; i++) {
            zmq_msg_init(&ys[i]);
            zmq_msg_move(&ys[i], &d->b[i].y);
        }
        if (n) {
            double now = s_now(d);
            d->n_layers++;
            d->layer_sum += (now - d->layer_t0) * 1e3;
            d->wait_sum += (now - t_wait) * 1e3;
        }
    }
    s_layer_end(d);
    pthread_mutex_unlock(&d->mu);
    if (rc != MM_OK)
        return rc;
    /* The answers go into the tensors here, outside the lock. */
    float *tmp = NULL;
    for (size_t i = 0; i < n; i++) {
        const void *src = zmq_msg_data(&ys[i]);
        if (rc == MM_OK && (uintptr_t)src % _Alignof(float)) { /* frames are not promised aligned */
            size_t bytes = zmq_msg_size(&ys[i]);
            float *t2 = realloc(tmp, bytes);
            if (!t2) {
                rc =
                    mm_errorf(err, errlen, MM_ENOMEM, "out of memory for a %zu-byte result", bytes);
            } else {
                tmp = t2;
                memcpy(tmp, src, bytes);
                src = tmp;
            }
        }
        if (rc == MM_OK && (rc = mm_tensor_set(jobs[i].y, src, MM_F32)) != MM_OK)
            mm_errorf(err, errlen, rc, "expert %d of MoE layer %d: writing the result: %s",
                      jobs[i].expert, jobs[i].moe, mm_backend_error(jobs[i].y->be));
        zmq_msg_close(&ys[i]);
    }
    free(tmp);
    return rc;
}

void mm_dispatch_runner(mm_dispatch *d, mm_expert_runner *r) {
    r->ctx = d;
    r->start = s_start;
    r->finish = s_finish;
}

/* ---- the public calls ---------------------------------------------------------- */

int mm_dispatch_live(const mm_dispatch *cd, int e) {
    mm_dispatch *d = (mm_dispatch *)cd; /* the lock is not part of the value */
    pthread_mutex_lock(&d->mu);
    int n = s_live(d, e);
    pthread_mutex_unlock(&d->mu);
    return n;
}

int mm_dispatch_service(mm_dispatch *d, int timeout_ms, int fd, int *fd_ready) {
    if (fd_ready)
        *fd_ready = 0;
    if (timeout_ms > d->o.heartbeat_ms)
        timeout_ms = d->o.heartbeat_ms;
    if (timeout_ms < 0)
        timeout_ms = 0;
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int rc = poll(&p, fd >= 0 ? 1 : 0, timeout_ms);
    if (rc < 0 && errno != EINTR)
        return MM_EIO;
    if (rc > 0 && fd_ready)
        *fd_ready = (p.revents & (POLLIN | POLLERR | POLLHUP)) != 0;
    pthread_mutex_lock(&d->mu);
    int dead = d->dead;
    pthread_mutex_unlock(&d->mu);
    return dead ? MM_EIO : MM_OK;
}

/* Wait on d->cv for at most ms (lock held). */
static void s_cond_wait_ms(mm_dispatch *d, double ms) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    long long ns = (long long)ts.tv_nsec + (long long)(ms * 1e6);
    ts.tv_sec += (time_t)(ns / 1000000000LL);
    ts.tv_nsec = (long)(ns % 1000000000LL);
    pthread_cond_timedwait(&d->cv, &d->mu, &ts);
}

int mm_dispatch_wait_experts(mm_dispatch *d, int ms) {
    double end = mm_now_ms() + ms;
    pthread_mutex_lock(&d->mu);
    int all = 0;
    for (;;) {
        all = 1;
        for (int e = 0; e < d->o.n_experts && all; e++)
            all = s_live(d, e) > 0;
        double left = end - mm_now_ms();
        if (all || left <= 0 || d->dead || (d->o.stop && *d->o.stop))
            break;
        s_cond_wait_ms(d, left < 50 ? left : 50);
    }
    pthread_mutex_unlock(&d->mu);
    return all;
}

/* ---- life cycle ------------------------------------------------------------ */

static int s_setopt_int(void *s, int opt, int v) { return zmq_setsockopt(s, opt, &v, sizeof v); }

int mm_dispatch_new(const mm_dispatch_options *o, mm_dispatch **out, char *err, size_t errlen) {
    *out = NULL;
    if (!o->bind || o->n_experts < 1 || o->n_experts > MM_CONFIG_MAX_EXPERTS || o->hidden < 1 ||
        !o->fingerprints || o->heartbeat_ms < 1 || o->expert_wait_ms < 0 ||
        o->insecure_warn_ms < 1 || o->refusal_log_ms < 1)
        return mm_errorf(err, errlen, MM_EINVAL, "dispatch: incomplete options");
    /* Secure by default (docs/ARCHITECTURE.md, "Router <-> expert wire"):
     * plaintext only when asked for by name. */
    if (!o->curve_secret && !o->insecure)
        return mm_errorf(err, errlen, MM_EINVAL,
                         "no CurveZMQ key for the expert socket: give --curve-secret-key and "
                         "--curve-allow (medmoe-keygen makes them), or --insecure-experts to "
                         "accept any expert in plaintext");
    if (o->curve_secret && (o->insecure || o->n_allow < 1))
        return mm_errorf(err, errlen, MM_EINVAL,
                         o->insecure ? "--insecure-experts and a CurveZMQ key do not go together"
                                     : "a CurveZMQ key needs at least one allowed expert key");
    int64_t maxmsg;
    int mrc = mm_wire_max_frame(o->max_rows, (size_t)o->hidden, &maxmsg, err, errlen);
    if (mrc != MM_OK)
        return mrc;
    mm_dispatch *d = calloc(1, sizeof *d);
    if (!d)
        return mm_errorf(err, errlen, MM_ENOMEM, "dispatch: out of memory");
    d->o = *o;
    d->wake[0] = d->wake[1] = -1;
    pthread_mutex_init(&d->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&d->cv, &ca);
    pthread_condattr_destroy(&ca);
    for (int e = 0; e < MM_CONFIG_MAX_EXPERTS; e++)
        d->probe_layer[e] = d->probe_moe[e] = -1;
    d->fp = calloc((size_t)o->n_experts, sizeof *d->fp);
    d->allow = calloc(o->n_allow ? o->n_allow : 1, sizeof *d->allow);
    mm_peer_tally_new(S_TALLY_PEERS, o->refusal_log_ms, &d->tally);
    d->probe_buf = mm_wire_buf_new((size_t)o->hidden * sizeof(float));
    int rc = MM_OK;
    if (!d->fp || !d->allow || !d->tally || !d->probe_buf) {
        rc = mm_errorf(err, errlen, MM_ENOMEM, "dispatch: out of memory");
        goto fail;
    }
    memset(d->probe_buf->data, 0, d->probe_buf->len);
    memcpy(d->fp, o->fingerprints, (size_t)o->n_experts * sizeof *d->fp);
    if (o->metrics && (rc = s_metrics_init(d, err, errlen)) != MM_OK)
        goto fail;
    for (size_t i = 0; i < o->n_allow; i++)
        snprintf(d->allow[i], sizeof d->allow[i], "%s", o->curve_allow[i]);
    if (pipe2(d->wake, O_NONBLOCK | O_CLOEXEC) != 0) {
        d->wake[0] = d->wake[1] = -1;
        rc = mm_errorf(err, errlen, MM_EIO, "dispatch: pipe: %s", strerror(errno));
        goto fail;
    }
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
     * instead of being dropped silently; a full queue fails with EAGAIN.
     * ZMQ_MAXMSGSIZE: a frame announced larger than the largest batch
     * closes the connection before anything is allocated for it. */
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
    s_log(d, MM_LOG_INFO, "expert socket %s: %s, frames of at most %lld bytes (%zu rows x %d)",
          d->endpoint, o->curve_secret ? "CurveZMQ, allowed keys only" : "plaintext",
          (long long)maxmsg, o->max_rows, o->hidden);
    if (o->insecure)
        s_warn_insecure(d, s_now(d));
    /* From here on only the thread touches the sockets (pthread_create is the
     * memory barrier ZeroMQ asks for when a socket changes threads). Signals
     * go to the other threads: the caller's waits see EINTR. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int tc = pthread_create(&d->thread, NULL, s_thread, d);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (tc != 0) {
        rc = mm_errorf(err, errlen, MM_ERR, "dispatch: cannot start the thread: %s", strerror(tc));
        goto fail;
    }
    d->thread_started = 1;
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
    if (d->thread_started) {
        pthread_mutex_lock(&d->mu);
        d->quit = 1;
        pthread_mutex_unlock(&d->mu);
        s_wake(d);
        pthread_join(d->thread, NULL); /* the sockets are this thread's again */
    }
    s_layer_end(d);
    if (d->sock)
        zmq_close(d->sock);
    if (d->zap)
        zmq_close(d->zap);
    if (d->zctx)
        zmq_ctx_term(d->zctx); /* linger 0: returns at once; runs pending free callbacks */
    if (d->wake[0] >= 0) {
        close(d->wake[0]);
        close(d->wake[1]);
    }
    mm_wire_buf_unref(&d->probe_buf);
    mm_peer_tally_destroy(&d->tally);
    pthread_cond_destroy(&d->cv);
    pthread_mutex_destroy(&d->mu);
    free(d->reps);
    free(d->fp);
    free(d->allow);
    free(d);
    *dp = NULL;
}

/* ---- statistics ---------------------------------------------------------------- */

json_t *mm_dispatch_stats(const mm_dispatch *cd) {
    mm_dispatch *d = (mm_dispatch *)cd; /* the lock is not part of the value */
    pthread_mutex_lock(&d->mu);
    /* The in-flight counts must equal the open sends, replica by replica. */
    int exact = d->acct_errors == 0;
    json_t *reps = json_array();
    for (size_t i = 0; i < d->nreps; i++) {
        const s_replica *r = &d->reps[i];
        size_t open = 0, open_rows = 0;
        for (size_t k = 0; d->active && k < d->nb; k++) {
            const s_copy *s = s_open_send(&d->b[k], (long)i);
            if (s) {
                open++;
                open_rows += d->b[k].n;
            }
        }
        exact &= open == r->inflight && open_rows == r->inflight_rows;
        json_t *o =
            json_pack("{s:i,s:s,s:s,s:b,s:s,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:f}", "expert",
                      r->expert, "id", r->name, "node", r->node, "alive", r->alive, "health",
                      s_health_str(r->health), "batches", (json_int_t)r->batches, "rows",
                      (json_int_t)r->rows, "sent", (json_int_t)r->sent, "timeouts",
                      (json_int_t)r->timeouts, "errors", (json_int_t)r->errors, "late",
                      (json_int_t)r->late, "quarantines", (json_int_t)r->quarantines, "probes",
                      (json_int_t)r->probes, "inflight", (json_int_t)r->inflight, "inflight_rows",
                      (json_int_t)r->inflight_rows, "rtt_est_ms", r->n_est ? r->est_ms : 0);
        json_array_append_new(reps, o);
    }
    double nr = d->n_rtt ? (double)d->n_rtt : 1, nl = d->n_layers ? (double)d->n_layers : 1;
    json_t *timing = json_pack(
        "{s:I,s:f,s:f,s:f,s:f,s:I,s:f,s:f}", "batches", (json_int_t)d->n_rtt, "batch_rtt_us_mean",
        d->rtt_sum / nr, "batch_rtt_us_min", d->rtt_min, "batch_rtt_us_max", d->rtt_max,
        "expert_compute_us_mean", d->compute_sum / nr, "moe_layers", (json_int_t)d->n_layers,
        "layer_dispatch_us_mean", d->layer_sum / nl, "layer_wait_us_mean", d->wait_sum / nl);
    json_t *refused = json_array();
    for (size_t i = 0; i < mm_peer_tally_size(d->tally); i++) {
        const mm_peer_tally_entry *e = mm_peer_tally_at(d->tally, i);
        if (e)
            json_array_append_new(refused,
                                  json_pack("{s:s,s:s,s:s,s:I}", "peer", e->peer, "kind", e->kind,
                                            "reason", e->detail, "count", (json_int_t)e->total));
    }
    json_t *st =
        json_pack("{s:o,s:o,s:I,s:I,s:I,s:I,s:I,s:b,s:o}", "replicas", reps, "refused", refused,
                  "refused_total", (json_int_t)mm_peer_tally_events(d->tally), "dropped_messages",
                  (json_int_t)d->dropped, "resent_batches", (json_int_t)d->resent, "late_results",
                  (json_int_t)d->late_results, "expired", (json_int_t)d->expired, "inflight_exact",
                  exact, "dispatch", timing);
    pthread_mutex_unlock(&d->mu);
    return st;
}
