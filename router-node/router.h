/* router.h — medmoe-router as an object: everything the process owns, from
 * the options main() parsed to a clean exit.
 *
 * Offers new / run / destroy over the router's parts: compute backend,
 * model trunk and tokenizer, the expert dispatcher (ZeroMQ, its own
 * thread), the scheduler (engine thread + image workers), and at the edges
 * either the gRPC front door (tenants, audit log, TLS) or the --cases JSON
 * lines; metrics and logs throughout.
 *
 * Threads (docs/ARCHITECTURE.md, "Threads in the router"): mm_router_run's
 * caller is the gRPC completion-queue thread (or, with --cases, the thread
 * that reads case lines and prints answers); the scheduler's engine thread
 * runs the step loop, its image workers decode and encode images, the
 * dispatcher's thread owns the expert socket, the metrics server has its
 * own. None waits on another's work.
 *
 * Every file an option names that is not the model (tenants, audit log, TLS
 * certificates, the metrics address) is read and checked first, so a typo
 * is reported at once rather than after the model has loaded.
 *
 *     mm_router_options o;  mm_router_options_default(&o);
 *     o.model = "ckpt";  o.bind = "tcp://127.0.0.1:*";
 *     o.grpc_listen = "0.0.0.0:50051";  o.tenants = "tenants.json";
 *     o.stop = &stop_flag;                      // set by SIGTERM
 *     mm_router *r;  char err[1024];
 *     if (mm_router_new(&o, &r, err, sizeof err)) {...}   // also logged
 *     int rc = mm_router_run(r);                // until *o.stop
 *     mm_router_destroy(&r);
 */
#ifndef MM_ROUTER_H
#define MM_ROUTER_H

#include <signal.h>
#include <stddef.h>

#include "log.h"

typedef struct mm_router mm_router;

typedef struct mm_router_options {
    /* the model and its experts */
    const char *model;              /* checkpoint dir (required)                        */
    const char *vision;             /* CLIP vision tower dir; NULL: none / in the model */
    const char *backend;            /* "cpu" (default) or "vulkan"                      */
    const char *bind;               /* ROUTER endpoint experts connect to (required)    */
    const char *endpoint_file;      /* write the bound endpoint there; NULL: no         */
    unsigned fp_flags;              /* expert fingerprint mode (fingerprint.h)           */
    int weights;                    /* mm_weights: stored (default), f32, int8          */
    int wait_experts_ms;            /* before the first case, wait this long for every
                                       expert to have a live replica (default 0)       */
    int expert_wait_ms;             /* a step waits this long for a replica (5000)      */
    int batch_timeout_ms;           /* unanswered batch -> replica dropped (60000)      */
    int heartbeat_ms;               /* heartbeat interval (1000)                        */
    const char *curve_secret;       /* CurveZMQ secret key file; NULL: plaintext, only
                                       with insecure_experts                            */
    const char *const *curve_allow; /* [n_curve_allow] files of allowed expert keys    */
    size_t n_curve_allow;
    int insecure_experts;   /* 1: plaintext expert socket on purpose (logged as
                               a WARNING at start and every insecure_warn_ms)   */
    int insecure_warn_ms;   /* 0: the default (60000)                           */
    const char *stats_file; /* on exit, replica statistics as JSON; NULL: no   */
    /* cases as JSON lines (not with grpc_listen) */
    const char *cases; /* a file, or "-" for stdin; NULL: none           */
    int serve;         /* 1: go on serving experts after the cases end     */
    /* the gRPC front door */
    const char *grpc_listen;    /* HOST:PORT; NULL: no gRPC                       */
    const char *grpc_port_file; /* write the bound port there                     */
    const char *tenants;        /* tenant file (required with grpc_listen)         */
    const char *audit_log;      /* append one JSON line per case; NULL: none      */
    int audit_fsync;            /* fsync the audit log after every record         */
    const char *audit_salt;     /* file whose bytes salt the audit's hashes (DICOM
                                   SOP Instance UIDs); NULL: random per process   */
    const char *tls_cert, *tls_key, *tls_client_ca; /* PEM files; NULL: plaintext */
    size_t max_image_bytes;    /* default 20 MiB                                */
    size_t max_question_bytes; /* default 4096                                  */
    int max_tokens_default;    /* default 64                                    */
    int max_tokens_limit;      /* default 512                                   */
    size_t grpc_max_message;   /* default 32 MiB                                */
    /* 0: mm_grpc_options_default's (see grpc_server.h) */
    int grpc_max_streams;      /* HTTP/2 streams at once per connection         */
    int grpc_idle_ms;          /* close connections idle this long              */
    int grpc_max_age_ms;       /* close connections this old (GOAWAY)           */
    int grpc_write_timeout_ms; /* cancel a call whose client reads nothing this long; -1: never */
    /* the engine */
    int slots;                    /* KV-cache slots with gRPC (default 8)            */
    int context;                  /* positions per slot; 0: the model's maximum.
                                     Each slot's KV cache is sized for it, so it
                                     bounds the router's memory (slots x context) */
    int image_workers;            /* image threads (default 1)                       */
    size_t pixel_budget;          /* decoded pixels in the image stage; 0: the
                                     scheduler's default                            */
    int jpeg_downscale;           /* see mm_sched_options (default 0)                */
    double debug_vision_delay_ms; /* tests: sleep this long in each vision encode    */
    /* observability */
    const char *metrics_listen;    /* HOST:PORT for /metrics and /healthz; NULL: none */
    const char *metrics_port_file; /* write the bound metrics port there              */
    mm_log_format log_format;      /* default text                                    */
    mm_log_level log_level;        /* default info                                    */
    const char *version;           /* GetServerInfo.version                            */
    /* set (by a signal handler) to stop: run returns, waits in progress end */
    volatile sig_atomic_t *stop;
} mm_router_options;

void mm_router_options_default(mm_router_options *o);

/* Check the options and the files they name, then load the model, bind the
 * expert socket, start the scheduler's threads and (with grpc_listen) the
 * front door. On failure everything made so far is freed and the error is
 * logged as well as written to err. MM_EINVAL: an option, or a file it
 * names, is wrong (the exit status of a usage error); other codes: loading
 * or binding failed. */
int mm_router_new(const mm_router_options *o, mm_router **out, char *err, size_t errlen);

/* Serve: the gRPC front door until *stop, or the cases until they end (then
 * until *stop with serve). Returns MM_OK, or the status of what made it stop
 * early (logged). */
int mm_router_run(mm_router *r);

/* Stop taking calls, end the cases left (gRPC: UNAVAILABLE "shutting
 * down"), write the stats file, stop every thread, free everything, set *r
 * to NULL. NULL and *r == NULL are fine. */
void mm_router_destroy(mm_router **r);

#endif
