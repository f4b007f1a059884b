/* dispatch.h — the router's side of the expert wire: a ZeroMQ ROUTER socket,
 * the table of expert replicas (joins, refusals, heartbeats, deaths) and an
 * mm_expert_runner that sends each MoE layer's jobs to replicas and collects
 * the results.
 *
 * One thread owns everything here (the router's main thread): while a
 * forward step waits in the runner's finish() the socket is polled; between
 * cases the caller calls mm_dispatch_service(). Every wait has a deadline:
 * a replica silent for 3 heartbeats, or one that does not answer a batch
 * within batch_timeout_ms, is removed and its batches re-sent; a job whose
 * expert has no live replica waits expert_wait_ms for one, then the step
 * fails with MM_ETIMEOUT naming the expert.
 *
 *     mm_dispatch_options o;  mm_dispatch_options_default(&o);
 *     o.bind = "tcp://127.0.0.1:*";  o.n_experts = 4;  o.hidden = 2048; ...
 *     mm_dispatch *d;
 *     if (mm_dispatch_new(&o, &d, err, sizeof err)) {...}
 *     mm_expert_runner r;  mm_dispatch_runner(d, &r);
 *     mm_model_set_expert_runner(m, &r);
 *     while (!stop) mm_dispatch_service(d, 1000, -1, NULL);
 *     mm_dispatch_destroy(&d);
 */
#ifndef MM_DISPATCH_H
#define MM_DISPATCH_H

#include <jansson.h>
#include <signal.h>
#include <stddef.h>

#include "fingerprint.h"
#include "log.h"
#include "medmoe.h"
#include "metrics.h"

typedef struct mm_dispatch mm_dispatch;

typedef struct mm_dispatch_options {
    const char *bind;     /* ROUTER endpoint, e.g. "tcp://127.0.0.1:*"                */
    int heartbeat_ms;     /* heartbeat interval (default 1000); dead after 3 silent   */
    int expert_wait_ms;   /* wait for a replica of a needed expert (default 5000)     */
    int batch_timeout_ms; /* a batch unanswered this long: its replica is dropped
                             (default 60000)                                          */
    int n_experts;        /* experts per MoE layer (max over the layers)              */
    int hidden;           /* row width (hidden_size)                                  */
    const mm_config *cfg; /* layer / MoE indices of Work and Result are checked      */
    const char (*fingerprints)[MM_FINGERPRINT_HEX]; /* [n_experts] expected per expert   */
    const char *curve_secret;       /* Z85 secret key (40 chars): CURVE server; NULL: plain     */
    const char *const *curve_allow; /* [n_allow] Z85 public keys ZAP accepts             */
    size_t n_allow;
    int hwm;                     /* send/receive high-water mark, messages (default 1000)    */
    volatile sig_atomic_t *stop; /* set by a signal: waits end with MM_ERR (may be NULL)  */
    mm_log *log;                 /* event lines (NULL: text on stderr)                    */
    /* Prometheus registry (NULL: none). Registers and keeps up to date:
     * medmoe_tokens_routed_total{layer,expert} (rows sent, per decoder layer),
     * medmoe_replica_batch_seconds{expert,replica} (send -> result),
     * medmoe_live_replicas{expert}, and medmoe_expert_queue_depth{expert}
     * (batches of the current MoE layer in flight to or waiting for expert K:
     * the HorizontalPodAutoscaler's metric). */
    mm_metrics *metrics;
} mm_dispatch_options;

void mm_dispatch_options_default(mm_dispatch_options *o);

/* Bind the socket (and the ZAP handler in curve mode). */
int mm_dispatch_new(const mm_dispatch_options *o, mm_dispatch **out, char *err, size_t errlen);
void mm_dispatch_destroy(mm_dispatch **d);

/* The endpoint really bound (ZMQ_LAST_ENDPOINT: the port chosen for '*'). */
const char *mm_dispatch_endpoint(const mm_dispatch *d);

/* Poll once for up to timeout_ms and handle what arrived (hellos, heartbeats,
 * byes, late results), then heartbeats and expiry. When fd >= 0 it is polled
 * too and *fd_ready says whether it became readable. Returns MM_OK or MM_EIO. */
int mm_dispatch_service(mm_dispatch *d, int timeout_ms, int fd, int *fd_ready);

/* Live replicas of expert e. */
int mm_dispatch_live(const mm_dispatch *d, int e);

/* Service the socket until every expert has a live replica or ms pass.
 * Returns 1 when all are present, 0 otherwise. */
int mm_dispatch_wait_experts(mm_dispatch *d, int ms);

/* The runner to install with mm_model_set_expert_runner (ctx = d). */
void mm_dispatch_runner(mm_dispatch *d, mm_expert_runner *r);

/* {"replicas": [{expert, id, node, batches, rows, alive}], "refused": [{reason}],
 *  "dropped_messages": n, "resent_batches": n, "layer_rtt_us": {...}} — new reference. */
json_t *mm_dispatch_stats(const mm_dispatch *d);

#endif
