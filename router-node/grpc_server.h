/* grpc_server.h — the front door: medmoe.v1.CaseService and grpc.health.v1
 * over the gRPC C core, feeding the continuous-batching scheduler.
 *
 * Every grpc_* call of the project is in grpc_server.c (the C core API is
 * private and changes between minor versions: a new version touches one
 * file).
 *
 * Threads: the server owns a completion queue, driven by one thread — the
 * CQ thread, whoever calls mm_grpc_server_poll (the router's main thread).
 * It does admission, validation and streaming out, and never computes: the
 * scheduler runs cases on its own engine thread and image workers. The
 * scheduler's callbacks (tokens, done) arrive on those threads; they only
 * append an event (a token's text and time; the status and a deep copy of
 * the typed result) to a mutex-protected queue, which the CQ thread drains
 * between completion-queue waits. Only the CQ thread reads or writes call
 * state and starts gRPC batches. While cases are in the scheduler the wait
 * is at most 2 ms, which bounds what the hand-over adds to a token.
 *
 * Per call: parse (protobuf-c; malformed bytes -> INVALID_ARGUMENT), API key
 * from `authorization: Bearer KEY` (-> UNAUTHENTICATED), tenant quotas (->
 * RESOURCE_EXHAUSTED), validation (sizes, media type, question, options,
 * candidates -> INVALID_ARGUMENT naming the field), then mm_sched_submit
 * with the call's deadline. A client that cancels or disconnects has its
 * case cancelled at once (mm_sched_cancel: the slot is free by the next
 * step) and gets its status; the call's state lives on until the
 * scheduler's on_done for it has been drained, so both sides are done with
 * it before it is freed. AskStream sends one AnswerChunk per drain's new
 * text (pieces that pile up while a send is in flight go out together: one
 * SEND_MESSAGE at a time), then the final chunk with the whole CaseAnswer,
 * then the status (the pieces concatenate to the final answer exactly).
 * Each admitted case leaves an "admitted" audit record (tenant, case id,
 * method, client address) as it is admitted and an "end" record and one log
 * line (status, tokens, ms) when it ends; at start the audit log's tail is
 * scanned for cases a killed run never ended. Unauthenticated calls are
 * counted per client address and written out as one record and one log line
 * per address every 10 s. A call's state is freed in one place.
 *
 * Limits: the request's strings are checked first (request_check.h), then
 * the quota is taken (a case refused later gives its cases_per_minute unit
 * back); HTTP/2 streams per connection, idle and old connections are bounded
 * by channel args; a send that makes no progress for write_timeout_ms
 * cancels its call (a client that does not read frees its tenant's slot);
 * after a burst of calls the freed heap goes back to the system.
 *
 *     mm_grpc_options o;  mm_grpc_options_default(&o);
 *     o.listen = "127.0.0.1:0";  o.sched = sched;  o.tenants = tenants;
 *     o.model = m;  o.live_replicas = live_fn;  o.live_ctx = dispatch;
 *     mm_grpc_server *g;
 *     if (mm_grpc_server_new(&o, &g, err, sizeof err)) {...}
 *     printf("port %d\n", mm_grpc_server_port(g));
 *     while (!stop)
 *         mm_grpc_server_poll(g, 100);   // the CQ thread (sched has mm_sched_start'ed)
 *     mm_grpc_server_shutdown(g);   // stop accepting
 *     mm_sched_destroy(&sched);     // in-flight cases end UNAVAILABLE "shutting down"
 *     mm_grpc_server_destroy(&g);   // send those statuses, cancel the rest, free
 */
#ifndef MM_GRPC_SERVER_H
#define MM_GRPC_SERVER_H

#include <stddef.h>

#include "audit.h"
#include "fingerprint.h"
#include "log.h"
#include "medmoe.h"
#include "metrics.h"
#include "scheduler.h"
#include "tenants.h"

typedef struct mm_grpc_server mm_grpc_server;

typedef struct mm_grpc_options {
    const char *listen;        /* HOST:PORT; port 0 = ephemeral (see _port)        */
    const char *tls_cert;      /* PEM server certificate chain file; NULL: plain   */
    const char *tls_key;       /* PEM private key file (with tls_cert)             */
    const char *tls_client_ca; /* PEM CA file: require and verify client certs     */
    size_t max_image_bytes;    /* image.data at most (default 20 MiB)              */
    size_t max_question_bytes; /* question at most (default 4096)                  */
    int max_tokens_default;    /* options.max_tokens 0 means this (default 64)     */
    int max_tokens_limit;      /* options.max_tokens at most (default 512)         */
    size_t max_message;        /* gRPC receive limit, bytes (default 32 MiB)       */
    size_t max_candidates;     /* ClassifyRequest.candidates at most (default 64)  */
    /* Resource limits against hostile or broken clients (docs/ARCHITECTURE.md,
     * "The gRPC front door"): */
    int max_streams;               /* HTTP/2 streams at once per connection (default 100)   */
    int idle_ms;                   /* close a connection idle this long (default 300000)     */
    int max_age_ms;                /* close (GOAWAY) a connection this old (default 3600000) */
    int age_grace_ms;              /* ... after its calls had this long to end (default 600000) */
    int write_timeout_ms;          /* a send (answer, chunk, status) that makes no progress this
                                      long: the client is not reading; its call is cancelled and
                                      its tenant's slot freed (default 20000; 0: never)     */
    mm_sched *sched;               /* borrowed, started; must outlive every call (see top) */
    mm_tenants *tenants;           /* borrowed; quotas are taken and released here     */
    mm_audit *audit;               /* borrowed; NULL: no audit log                     */
    mm_model *model;               /* borrowed; GetServerInfo                          */
    const char *version;           /* GetServerInfo.version                            */
    int n_experts;                 /* experts per MoE layer (GetServerInfo, health)    */
    const char *model_fingerprint; /* GetServerInfo.model_fingerprint; NULL: ""    */
    const char (*expert_fingerprints)[MM_FINGERPRINT_HEX]; /* [n_experts]; NULL: "" */
    int eos_token; /* the tokenizer's EOS id (finish_reason); -1: unknown */
    int (*live_replicas)(void *ctx, int expert); /* NULL: every expert local (1)  */
    void *live_ctx;
    int log_calls; /* 1 (default): one line per call on stderr         */
    mm_log *log;   /* event lines (NULL: text on stderr)                */
    /* Prometheus registry (NULL: none): medmoe_cases_total{tenant,status},
     * medmoe_ttft_seconds, medmoe_token_latency_seconds (router_metrics.h). */
    mm_metrics *metrics;
} mm_grpc_options;

void mm_grpc_options_default(mm_grpc_options *o);

/* Check what can be checked without the server: the listen address is
 * set, max_message in range, the TLS files (when given) readable PEM. For
 * start-up, before the model loads. MM_OK or MM_EINVAL naming the file. */
int mm_grpc_check_options(const mm_grpc_options *o, char *err, size_t errlen);

/* grpc_init, bind, start. Errors: MM_EINVAL (options, unreadable PEM files),
 * MM_EIO (cannot bind). */
int mm_grpc_server_new(const mm_grpc_options *o, mm_grpc_server **out, char *err, size_t errlen);

/* The port bound (the ephemeral one when listen asked for 0). */
int mm_grpc_server_port(const mm_grpc_server *g);

/* CQ thread: handle the scheduler's queued events and completion-queue
 * events: wait up to timeout_ms (2 ms while cases are in the scheduler) for
 * the first, then take what is ready without waiting (at most a few
 * hundred). Returns the number handled. */
int mm_grpc_server_poll(mm_grpc_server *g, int timeout_ms);

/* Calls in progress (arrived, not yet freed). */
size_t mm_grpc_server_calls(const mm_grpc_server *g);

/* Stop accepting new calls; calls in progress go on. Idempotent. */
void mm_grpc_server_shutdown(mm_grpc_server *g);

/* Shut down (if not yet), give in-flight sends up to 2 s, cancel what is left
 * (their cases must no longer be in the scheduler: destroy it first, so that
 * every on_done has been queued), free everything, grpc_shutdown. CQ thread.
 * NULL and *g == NULL are fine. */
void mm_grpc_server_destroy(mm_grpc_server **g);

#endif
