/* dispatch.h — the router's side of the expert wire: a ZeroMQ ROUTER socket,
 * the table of expert replicas (joins, refusals, heartbeats, deaths, health)
 * and an mm_expert_runner that sends each MoE layer's jobs to replicas and
 * collects the results.
 *
 * Threads (docs/ARCHITECTURE.md, "Threads in the router"). mm_dispatch_new starts
 * a dispatch thread that owns the sockets: hellos, ZAP, heartbeats, byes,
 * work out, results in. It never waits on the engine, so a long vision
 * encode or a slow step never makes a replica look dead, nor the router look
 * dead to the experts. The runner's start() (engine thread) reads the jobs'
 * rows into host buffers and hands the layer over; finish() waits until the
 * dispatch thread has every answer (or has failed the layer) and writes the
 * rows back into the jobs' tensors. mm_dispatch_live, _stats and
 * _wait_experts may be called from any thread.
 *
 * Peers that have not authenticated cost no memory per peer or per message:
 * with CURVE the ZAP handler refuses unlisted keys before any message gets
 * through; refused Hellos, ZAP refusals and malformed messages are counted
 * in a fixed table (common/peer_tally.h) and logged once per peer address
 * and kind per refusal_log_ms, with a count; ZMQ_MAXMSGSIZE (the largest
 * legitimate batch, mm_wire_max_frame) makes ZeroMQ drop a connection that
 * announces a larger frame before allocating it.
 *
 * Every wait has a deadline, and one replica's fault costs a re-send, not a
 * step:
 *   - a batch sent to a replica must be answered within a timeout derived
 *     from that replica's observed round trips (4 x an EWMA estimate, at
 *     least 250 ms, at most batch_timeout_ms, never past the step's
 *     deadline; 10 s capped by batch_timeout_ms before anything was
 *     observed for the expert);
 *   - a timeout or an error answer (INTERNAL, BAD_REQUEST, ...) sends the
 *     batch at once to another healthy replica of the same expert (the first
 *     valid answer wins; later ones are discarded and not counted as errors)
 *     and quarantines the replica: it stays connected but gets no work for
 *     a back-off (one heartbeat interval, doubling per failure up to 60 s),
 *     then one probe batch (Work.probe, one synthetic row); only a valid
 *     answer to the probe in time puts it back in service. The quarantine
 *     survives a Hello again (same connection, or same node "host:pid");
 *   - BUSY / DRAINING answers re-send elsewhere without a quarantine;
 *     EXPIRED (the step's deadline passed at the expert) fails the step;
 *   - a replica silent for 3 heartbeats is removed and its batches re-sent;
 *   - a batch with no healthy replica to go to waits expert_wait_ms for one
 *     (or a late answer), then the step fails with MM_ETIMEOUT naming the
 *     expert; a step past its deadline (mm_expert_job.deadline_ms) fails
 *     with MM_ETIMEOUT "deadline exceeded". Work.deadline_ms carries the time
 *     left to the expert (batch_timeout_ms when the step has no deadline).
 *
 *     mm_dispatch_options o;  mm_dispatch_options_default(&o);
 *     o.bind = "tcp://127.0.0.1:*";  o.n_experts = 4;  o.hidden = 2048; ...
 *     mm_dispatch *d;
 *     if (mm_dispatch_new(&o, &d, err, sizeof err)) {...}   // the thread runs
 *     mm_expert_runner r;  mm_dispatch_runner(d, &r);
 *     mm_model_set_expert_runner(m, &r);
 *     while (!stop) mm_dispatch_service(d, 1000, fd, &ready);  // only waits on fd
 *     mm_dispatch_destroy(&d);                                 // stops the thread
 */
#ifndef MM_DISPATCH_H
#define MM_DISPATCH_H

#include <jansson.h>
#include <signal.h>
#include <stddef.h>

#include "clock.h"
#include "fingerprint.h"
#include "log.h"
#include "medmoe.h"
#include "metrics.h"

typedef struct mm_dispatch mm_dispatch;

typedef struct mm_dispatch_options {
    const char *bind;     /* ROUTER endpoint, e.g. "tcp://127.0.0.1:*"                */
    int heartbeat_ms;     /* heartbeat interval (default 1000); dead after 3 silent   */
    int expert_wait_ms;   /* wait for a replica of a needed expert (default 5000)     */
    int batch_timeout_ms; /* ceiling of one send's timeout; also Work.deadline_ms
                             when the step has none (default 60000)                   */
    int n_experts;        /* experts per MoE layer (max over the layers)              */
    int hidden;           /* row width (hidden_size)                                  */
    const mm_config *cfg; /* layer / MoE indices of Work and Result are checked      */
    const char (*fingerprints)[MM_FINGERPRINT_HEX]; /* [n_experts] expected per expert   */
    const char *curve_secret;       /* Z85 secret key (40 chars): CURVE server; NULL: plain     */
    const char *const *curve_allow; /* [n_allow] Z85 public keys ZAP accepts (>= 1)      */
    size_t n_allow;
    int insecure;                /* 1: no curve_secret, plaintext accepted on purpose
                                    (--insecure-experts); without a key and without it,
                                    mm_dispatch_new refuses to start                      */
    int insecure_warn_ms;        /* insecure: the WARNING is repeated this often (60000)   */
    int refusal_log_ms;          /* refused / malformed peers: one log line per peer and
                                    kind per this many ms, with a count (10000)           */
    size_t max_rows;             /* rows of one batch at most (the scheduler's rows per
                                    step; default 512, at most MM_WIRE_MAX_ROWS): sets
                                    ZMQ_MAXMSGSIZE (mm_wire_max_frame)                   */
    int hwm;                     /* send/receive high-water mark, messages (default 1000)    */
    volatile sig_atomic_t *stop; /* set by a signal: waits end with MM_ERR (may be NULL)  */
    mm_clock clock;              /* time of the timeouts ({0}: mm_now_ms; deadlines in
                                    the jobs are on this clock)                          */
    mm_log *log;                 /* event lines (NULL: text on stderr)                    */
    /* Prometheus registry (NULL: none). Registers and keeps up to date:
     * medmoe_tokens_routed_total{layer,expert} (rows sent, per decoder layer),
     * medmoe_replica_batch_seconds{expert,replica} (send -> result),
     * medmoe_live_replicas{expert} (replicas in service: connected, not
     * draining, not quarantined), medmoe_replica_faults_total{expert,kind}
     * (kind: timeout, error), and medmoe_expert_queue_depth{expert}
     * (batches of the current MoE layer in flight to or waiting for expert K:
     * the HorizontalPodAutoscaler's metric). */
    mm_metrics *metrics;
} mm_dispatch_options;

void mm_dispatch_options_default(mm_dispatch_options *o);

/* Bind the socket (and the ZAP handler in curve mode) and start the dispatch
 * thread (signals are blocked in it). */
int mm_dispatch_new(const mm_dispatch_options *o, mm_dispatch **out, char *err, size_t errlen);
/* Stops the thread, closes the sockets, frees; NULL fine; clears *d. */
void mm_dispatch_destroy(mm_dispatch **d);

/* The endpoint really bound (ZMQ_LAST_ENDPOINT: the port chosen for '*'). */
const char *mm_dispatch_endpoint(const mm_dispatch *d);

/* Wait up to timeout_ms (at most heartbeat_ms) for fd (when >= 0) to become
 * readable; *fd_ready (may be NULL) says whether it did. The socket is the
 * dispatch thread's: this only waits, for loops that used to service it.
 * Returns MM_OK, or MM_EIO once the dispatch thread has stopped on a socket
 * failure (or poll failed). */
int mm_dispatch_service(mm_dispatch *d, int timeout_ms, int fd, int *fd_ready);

/* Replicas of expert e in service (connected, not draining, not
 * quarantined). Thread-safe. */
int mm_dispatch_live(const mm_dispatch *d, int e);

/* Wait until every expert has a replica in service or ms pass (or *stop).
 * Returns 1 when all are present, 0 otherwise. Thread-safe. */
int mm_dispatch_wait_experts(mm_dispatch *d, int ms);

/* The runner to install with mm_model_set_expert_runner (ctx = d). One layer
 * at a time, from one engine thread: a start() whose previous layer never
 * reached finish() (the step failed in between) discards that layer. */
void mm_dispatch_runner(mm_dispatch *d, mm_expert_runner *r);

/* A snapshot, new reference (thread-safe):
 * {"replicas": [{expert, id, node, alive, health ("healthy" | "quarantined" |
 *    "probing"), batches, rows (answers used), sent (case batches sent),
 *    timeouts, errors (error answers), late (answers after the batch was
 *    settled), quarantines, probes, inflight, inflight_rows, rtt_est_ms}],
 *  "refused": [{peer, kind, reason (the latest), count}] (at most 64 entries:
 *  refusals are tallied per peer address and kind, never listed one by one),
 *  "refused_total": n, "dropped_messages": n (malformed,
 *  unexpected, unknown), "resent_batches": n (sends after a batch's first),
 *  "late_results": n, "expired": n, "inflight_exact": bool (each replica's
 *  in-flight counts equal its open sends), "dispatch": {batches,
 *  batch_rtt_us_mean/min/max, expert_compute_us_mean, moe_layers,
 *  layer_dispatch_us_mean, layer_wait_us_mean}}. */
json_t *mm_dispatch_stats(const mm_dispatch *d);

#endif
