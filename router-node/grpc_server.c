/* grpc_server.c — medmoe.v1.CaseService + grpc.health.v1 on the gRPC C core
 * (see grpc_server.h). The only file of the project that calls grpc_*.
 *
 * Why one file of ~1650 lines: gRPC's C core API is private and changes
 * between minor versions (docs/ARCHITECTURE.md, "Lessons from peers"), so
 * every grpc_* call stays here and a version change touches one file.
 *
 * Threads: everything here runs on the completion-queue thread (the caller
 * of mm_grpc_server_poll) except the two scheduler callbacks, which only
 * append an s_event to the server's queue under g->mu. The CQ thread drains
 * that queue between grpc_completion_queue_next calls; it alone reads and
 * writes s_call state and starts batches.
 *
 * Sections: call state; sending (one batch in flight per call); results ->
 * messages; scheduler callbacks and their queue; arrival, admission and
 * validation; events; server life.
 */
#include "grpc_server.h"
#include "router_metrics.h"

#include <errno.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <jansson.h>
#include <malloc.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "config.h"
#include "health.pb-c.h"
#include "medmoe.pb-c.h"
#include "request_check.h"

/* ---- call state ------------------------------------------------------------ */

enum { M_ASK, M_STREAM, M_CLASSIFY, M_INFO, M_HEALTH, M_UNKNOWN, M_COUNT };
static const char *const s_method_path[M_UNKNOWN] = {
    "/medmoe.v1.CaseService/Ask", "/medmoe.v1.CaseService/AskStream",
    "/medmoe.v1.CaseService/Classify", "/medmoe.v1.CaseService/GetServerInfo",
    "/grpc.health.v1.Health/Check"};
static const char *const s_method_name[M_COUNT] = {"Ask",           "AskStream",    "Classify",
                                                   "GetServerInfo", "Health.Check", "unknown"};

enum { T_NEW, T_CLOSE, T_SEND, T_SHUTDOWN };
typedef struct s_tag {
    int kind;  /* T_*                          */
    void *obj; /* s_listener or s_call or NULL */
} s_tag;

/* Requests for new calls kept outstanding per method: gRPC matches arriving
 * calls to them on its own threads, also while a scheduler step holds the
 * engine thread; unmatched calls would wait in gRPC (and be CANCELLED by a
 * shutdown instead of getting our UNAVAILABLE). */
#define S_LISTENERS 16

/* One outstanding grpc_server_request_(registered_)call. */
typedef struct s_listener {
    mm_grpc_server *g;
    int method;                /* M_*; M_UNKNOWN = unregistered catch-all   */
    void *rm;                  /* registered method handle; NULL: catch-all */
    grpc_call *call;           /* filled on arrival                         */
    gpr_timespec deadline;     /* registered calls                          */
    grpc_call_details details; /* catch-all: method, deadline               */
    grpc_metadata_array md;    /* request metadata                          */
    grpc_byte_buffer *payload; /* the request message (registered calls)    */
    s_tag tag;
} s_listener;

/* What a scheduler callback tells the CQ thread (see the top). */
enum { E_TOKEN, E_DONE };
typedef struct s_event {
    struct s_event *next; /* the server's queue, oldest first                */
    struct s_call *c;     /* the call the case belongs to                    */
    int kind;             /* E_*                                             */
    double t_ms;          /* mm_now_ms() in the callback (token timing)      */
    int32_t token;        /* E_TOKEN: the id; -1: held-back bytes at the end  */
    int status;           /* E_DONE: the scheduler's status                  */
    char message[512];    /* E_DONE: its message                             */
    mm_case_result res;   /* E_DONE with MM_OK: a deep copy (owned)          */
    size_t len;           /* E_TOKEN: bytes at piece (streams only)          */
    char piece[];         /* E_TOKEN                                         */
} s_event;

typedef struct s_call {
    mm_grpc_server *g;
    int method;                /* M_*                                              */
    grpc_call *call;           /* owned: unref'ed when freed                       */
    grpc_metadata_array md;    /* owned request metadata                           */
    grpc_call_details details; /* owned (catch-all calls only; zeroed otherwise)   */
    int has_details;
    double t_arrival;   /* mm_now_ms() at arrival                              */
    double deadline_ms; /* on mm_now_ms()'s clock; 0 = none                    */
    double t_submit;    /* mm_now_ms() when handed to the scheduler            */
    int tenant;         /* tenants index; -1 = not authenticated               */
    int admitted;       /* a quota unit is held (released when freed)          */
    char *client_case_id;
    uint64_t sched_id; /* the scheduler's case id                             */
    /* submitted and its E_DONE not yet drained: the scheduler may still call
     * back with this call as user, so the call must not be freed. Cancel is
     * asynchronous: the call lives on after the client went until E_DONE. */
    int in_sched;
    /* E_DONE, allocated before submit so that on_done never has to allocate
     * (it cannot report a failure); filled by on_done, owned by the call
     * until then, by the queue after */
    s_event *done_ev;
    int aborted;        /* the client cancelled / went away, or a send failed */
    int recv_cancelled; /* GRPC_OP_RECV_CLOSE_ON_SERVER's output            */
    char peer[128];     /* the client's address (grpc_call_get_peer)         */
    uint64_t seq;       /* the audit log's case number once admitted; 0: not */
    int ops;            /* batches started and not yet completed             */
    int send_busy;      /* a send batch is in flight                         */
    double t_send_ms;   /* mm_now_ms() when it started (the write timeout)   */
    int md_sent;        /* initial metadata went out                         */
    int status_set;     /* code/msg are final                                */
    int status_started; /* SEND_STATUS_FROM_SERVER is in a started batch     */
    grpc_status_code code;
    char msg[1024];
    grpc_slice status_slice; /* details of the status in flight (has_slice)  */
    int has_slice;
    grpc_byte_buffer *reply;   /* unary: the response; stream: the final chunk */
    grpc_byte_buffer *sending; /* the message of the batch in flight            */
    /* AskStream: answer pieces not yet sent. The answer is stripped of
     * leading and trailing whitespace (mm_case_strip); so that the pieces
     * concatenate to it exactly (medmoe.proto), whitespace before the first
     * other character is dropped and whitespace at the end of acc is held
     * back (acc_hold bytes) until something else follows it. */
    char *acc;
    size_t acc_len, acc_cap;
    size_t acc_hold; /* trailing whitespace bytes of acc, not sent yet   */
    int acc_started; /* a non-whitespace byte of the answer has come     */
    int32_t *acc_tok;
    size_t acc_n, acc_tcap;
    /* for the audit record */
    mm_case_result res; /* the answer (MM_OK), kept for the audit's experts   */
    int has_res;
    int is_dicom;                  /* the image was DICOM: the audit says which */
    char dicom_sop[MM_SHA256_HEX]; /* salted SHA-256 of its SOP Instance UID    */
    char dicom_modality[20];       /* e.g. "CT" (not patient data)              */
    mm_dicom_options dicom;        /* the window and frame asked for            */
    unsigned prompt_tokens, generated_tokens;
    double queue_ms, ttft_ms;
    double t_last_token; /* mm_now_ms() of the last generated token (0: none yet) */
    s_tag t_close, t_send;
    struct s_call *prev, *next; /* the server's list of live calls */
} s_call;

struct mm_grpc_server {
    mm_grpc_options o;
    grpc_server *server;
    grpc_completion_queue *cq;
    int port;
    s_listener lis[M_COUNT][S_LISTENERS];
    s_call *calls; /* live calls, newest first */
    size_t n_calls;
    size_t n_in_sched; /* calls with in_sched set: scheduler events may come */
    int draining;      /* new calls get UNAVAILABLE "shutting down"          */
    int shutting_down; /* grpc_server_shutdown_and_notify called             */
    int shutdown_done; /* ... and its tag came back                          */
    s_tag t_shutdown;
    /* refused unauthenticated calls since the last flush, by client address
     * ({"ipv4:10.0.0.7": {"calls": n, "methods": {"Ask": n}}}): one audit
     * record and one log line per address per S_UNAUTH_INTERVAL_MS, not one
     * per call (a flood must not flood the audit log) */
    json_t *unauth;
    double t_unauth_flush;     /* mm_now_ms() of the next flush */
    double t_write_check;      /* mm_now_ms() of the next write-timeout scan */
    int n_write_timeouts;      /* calls cancelled so (for tests, logs)       */
    size_t calls_since_trim;   /* calls arrived since the last malloc_trim  */
    double t_trim;             /* mm_now_ms() of the last malloc_trim       */
    int trim_due;              /* a burst was seen: trim when a second is up */
    mm_router_case_metrics cm; /* NULL handles without o.metrics */
    /* the one thing shared with the scheduler's threads: its callbacks append
     * here, the CQ thread takes the whole list (never calling out while
     * holding mu) */
    pthread_mutex_t mu;
    s_event *ev_head, *ev_tail;
};

void mm_grpc_options_default(mm_grpc_options *o) {
    memset(o, 0, sizeof *o);
    o->max_image_bytes = 20u << 20;
    o->max_question_bytes = 4096;
    o->max_tokens_default = 64;
    o->max_tokens_limit = 512;
    o->max_message = 32u << 20;
    o->max_candidates = 64;
    o->max_streams = 100;
    o->idle_ms = 300000;
    o->max_age_ms = 3600000;
    o->age_grace_ms = 600000;
    o->write_timeout_ms = 20000;
    o->version = "";
    o->eos_token = -1;
    o->log_calls = 1;
}

static const char *s_code_name(grpc_status_code c) {
    static const char *const names[] = {"OK",
                                        "CANCELLED",
                                        "UNKNOWN",
                                        "INVALID_ARGUMENT",
                                        "DEADLINE_EXCEEDED",
                                        "NOT_FOUND",
                                        "ALREADY_EXISTS",
                                        "PERMISSION_DENIED",
                                        "RESOURCE_EXHAUSTED",
                                        "FAILED_PRECONDITION",
                                        "ABORTED",
                                        "OUT_OF_RANGE",
                                        "UNIMPLEMENTED",
                                        "INTERNAL",
                                        "UNAVAILABLE",
                                        "DATA_LOSS",
                                        "UNAUTHENTICATED"};
    return (unsigned)c < sizeof names / sizeof *names ? names[c] : "UNKNOWN";
}

static int s_is_case_method(int m) { return m == M_ASK || m == M_STREAM || m == M_CLASSIFY; }

/* The audit record's "experts": the answer's expert_summary, [{layer,
 * image_tokens_per_expert, text_tokens_per_expert}]; [] without an answer. */
static json_t *s_experts_json(const s_call *c) {
    json_t *js = json_array();
    const mm_case_result *r = &c->res;
    for (size_t l = 0; js && c->has_res && l < r->n_moe; l++) {
        json_t *ic = json_array(), *tc = json_array();
        for (size_t e = 0; ic && tc && e < r->n_experts; e++) {
            json_array_append_new(ic, json_integer(r->image_count[l * r->n_experts + e]));
            json_array_append_new(tc, json_integer(r->text_count[l * r->n_experts + e]));
        }
        json_array_append_new(js, json_pack("{s:i, s:o*, s:o*}", "layer", r->moe_layer[l],
                                            "image_tokens_per_expert", ic, "text_tokens_per_expert",
                                            tc));
    }
    return js;
}

/* Whether an admitted case counts against its tenant's cases_per_minute:
 * it was served (answered, or it held a slot until the client cancelled or
 * its deadline passed). A case refused after admission (the image does not
 * decode, no live expert, server busy or failing) gives its unit back. */
static int s_served(grpc_status_code code) {
    return code == GRPC_STATUS_OK || code == GRPC_STATUS_CANCELLED ||
           code == GRPC_STATUS_DEADLINE_EXCEEDED;
}

/* Calls that make a burst worth a malloc_trim (s_trim). */
#define S_TRIM_CALLS 256

/* How often refused unauthenticated calls are written out, per client
 * address: one audit record and one log line each. */
#define S_UNAUTH_INTERVAL_MS 10000.0
/* Addresses counted apart per interval; the rest are counted as "other" (a
 * flood from many addresses must not grow the table without bound). */
#define S_UNAUTH_MAX_PEERS 1024

/* The client's host without its port ("ipv4:10.0.0.7:51234" -> "ipv4:10.0.0.7"):
 * a flood opens many connections from one host. */
static void s_peer_host(const char *peer, char *out, size_t n) {
    snprintf(out, n, "%s", peer);
    char *colon = strrchr(out, ':');
    if (!colon || colon == out || !colon[1])
        return;
    for (const char *p = colon + 1; *p; p++)
        if (*p < '0' || *p > '9')
            return;
    if (strncmp(out, "ipv4:", 5) && strncmp(out, "ipv6:", 5))
        return;
    *colon = 0;
}

/* Count a refused unauthenticated call under its client's address. */
static void s_unauth_note(mm_grpc_server *g, const s_call *c) {
    if (!g->unauth && !(g->unauth = json_object()))
        return;
    char host[128];
    s_peer_host(c->peer, host, sizeof host);
    json_t *e = json_object_get(g->unauth, host);
    if (!e && json_object_size(g->unauth) >= S_UNAUTH_MAX_PEERS)
        e = json_object_get(g->unauth, (snprintf(host, sizeof host, "other"), host));
    if (!e) {
        e = json_pack("{s:I, s:{}}", "calls", (json_int_t)0, "methods");
        if (!e || json_object_set_new(g->unauth, host, e))
            return;
    }
    json_object_set_new(e, "calls",
                        json_integer(json_integer_value(json_object_get(e, "calls")) + 1));
    json_t *m = json_object_get(e, "methods");
    const char *name = s_method_name[c->method];
    json_object_set_new(m, name, json_integer(json_integer_value(json_object_get(m, name)) + 1));
}

/* Write out what s_unauth_note counted: one audit record and one log line per
 * address. */
static void s_unauth_flush(mm_grpc_server *g) {
    g->t_unauth_flush = mm_now_ms() + S_UNAUTH_INTERVAL_MS;
    if (!g->unauth || !json_object_size(g->unauth))
        return;
    const char *host;
    json_t *e;
    json_object_foreach(g->unauth, host, e) {
        json_int_t n = json_integer_value(json_object_get(e, "calls"));
        mm_logf(g->o.log, MM_LOG_WARN, NULL,
                "grpc: refused %lld unauthenticated call(s) from %s (no or unknown API key) in the "
                "last %.0f s",
                (long long)n, host, S_UNAUTH_INTERVAL_MS / 1000.0);
        if (!g->o.audit)
            continue;
        json_t *r = json_pack("{s:s, s:s, s:I, s:O, s:f}", "event", "unauthenticated", "peer", host,
                              "calls", n, "methods", json_object_get(e, "methods"), "interval_s",
                              S_UNAUTH_INTERVAL_MS / 1000.0);
        char err[512];
        if (r && mm_audit_write(g->o.audit, r, err, sizeof err) != MM_OK)
            mm_logf(g->o.log, MM_LOG_ERROR, NULL, "%s", err);
        json_decref(r);
    }
    json_object_clear(g->unauth);
}

/* The "admitted" audit record, written (one write(2), in the kernel: it
 * survives the router being killed) as the case is admitted; the "end"
 * record with the same run and seq follows when it ends. */
static void s_audit_admitted(s_call *c) {
    mm_grpc_server *g = c->g;
    if (!g->o.audit)
        return;
    c->seq = mm_audit_next_seq(g->o.audit);
    json_t *r = json_pack("{s:s, s:s, s:I, s:s, s:s, s:s, s:s}", "event", "admitted", "run",
                          mm_audit_run(g->o.audit), "seq", (json_int_t)c->seq, "tenant",
                          mm_tenants_id(g->o.tenants, c->tenant), "case_id",
                          c->client_case_id ? c->client_case_id : "", "method",
                          s_method_name[c->method], "peer", c->peer);
    char err[512];
    if (!r || mm_audit_write(g->o.audit, r, err, sizeof err) != MM_OK)
        mm_logf(g->o.log, MM_LOG_ERROR, c->client_case_id, "%s", r ? err : "audit: out of memory");
    json_decref(r);
}

/* The audit record and the log line: the one place a call ends. */
static void s_call_free(s_call *c) {
    mm_grpc_server *g = c->g;
    double ms = mm_now_ms() - c->t_arrival;
    const char *tenant = c->tenant >= 0 ? mm_tenants_id(g->o.tenants, c->tenant) : "";
    int unauth = c->tenant < 0 && c->code == GRPC_STATUS_UNAUTHENTICATED;
    if (unauth)
        s_unauth_note(g, c);
    if (s_is_case_method(c->method) && g->o.audit && !unauth) {
        json_t *r = json_object();
        json_object_set_new(r, "event", json_string("end"));
        if (c->seq) {
            json_object_set_new(r, "run", json_string(mm_audit_run(g->o.audit)));
            json_object_set_new(r, "seq", json_integer((json_int_t)c->seq));
        }
        json_object_set_new(r, "tenant", json_string(tenant));
        json_object_set_new(r, "case_id", json_string(c->client_case_id ? c->client_case_id : ""));
        json_object_set_new(r, "method", json_string(s_method_name[c->method]));
        json_object_set_new(r, "peer", json_string(c->peer));
        json_object_set_new(r, "status", json_string(s_code_name(c->code)));
        json_object_set_new(r, "experts", s_experts_json(c));
        json_object_set_new(r, "prompt_tokens", json_integer(c->prompt_tokens));
        json_object_set_new(r, "generated_tokens", json_integer(c->generated_tokens));
        json_object_set_new(r, "queue_ms", json_real(c->queue_ms));
        json_object_set_new(r, "ttft_ms", json_real(c->ttft_ms));
        json_object_set_new(r, "total_ms", json_real(ms));
        if (c->is_dicom) /* never a patient attribute; the instance only as a salted hash */
            json_object_set_new(r, "dicom",
                                json_pack("{s:s, s:s, s:s, s:i}", "sop_instance_uid_sha256",
                                          c->dicom_sop, "modality", c->dicom_modality, "window",
                                          mm_dicom_window_name(c->dicom.window), "frame",
                                          (json_int_t)c->dicom.frame));
        char err[512];
        if (mm_audit_write(g->o.audit, r, err, sizeof err) != MM_OK)
            mm_logf(g->o.log, MM_LOG_ERROR, c->client_case_id, "%s", err);
        json_decref(r);
    }
    if (s_is_case_method(c->method))
        mm_metric_add(g->cm.cases, 1, *tenant ? tenant : "-", s_code_name(c->code));
    if (g->o.log_calls && !unauth) {
        const char *cid = c->client_case_id && *c->client_case_id ? c->client_case_id : NULL;
        mm_logf(g->o.log, c->code == GRPC_STATUS_OK ? MM_LOG_INFO : MM_LOG_WARN, cid,
                "grpc %s tenant=%s case=%s status=%s%s %.1f ms", s_method_name[c->method],
                *tenant ? tenant : "-", cid ? cid : "-", s_code_name(c->code),
                c->aborted && c->code != GRPC_STATUS_OK ? " (client gone)" : "", ms);
    }
    if (c->admitted) {
        if (!s_served(c->code))
            mm_tenants_refund(g->o.tenants, c->tenant);
        mm_tenants_release(g->o.tenants, c->tenant);
    }
    if (c->prev)
        c->prev->next = c->next;
    else
        g->calls = c->next;
    if (c->next)
        c->next->prev = c->prev;
    g->n_calls--;
    if (c->call)
        grpc_call_unref(c->call);
    grpc_metadata_array_destroy(&c->md);
    if (c->has_details)
        grpc_call_details_destroy(&c->details);
    if (c->has_slice)
        grpc_slice_unref(c->status_slice);
    if (c->reply)
        grpc_byte_buffer_destroy(c->reply);
    if (c->sending)
        grpc_byte_buffer_destroy(c->sending);
    mm_case_result_clear(&c->res);
    free(c->done_ev); /* set only when never submitted or refused */
    free(c->client_case_id);
    free(c->acc);
    free(c->acc_tok);
    free(c);
}

/* Free once nothing refers to the call any more: no batch in flight, not in
 * the scheduler, and its status sent (or the client gone). */
static void s_call_maybe_free(s_call *c) {
    if (c->ops == 0 && !c->in_sched && (c->status_started || c->aborted))
        s_call_free(c);
}

/* ---- sending ---------------------------------------------------------------- */

static grpc_byte_buffer *s_pack(const ProtobufCMessage *m) {
    size_t n = protobuf_c_message_get_packed_size(m);
    grpc_slice s = grpc_slice_malloc(n);
    protobuf_c_message_pack(m, GRPC_SLICE_START_PTR(s));
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

/* Whole message bytes of a received buffer (NULL on failure; free()). */
static uint8_t *s_read_all(grpc_byte_buffer *bb, size_t *len) {
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, bb))
        return NULL;
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    *len = GRPC_SLICE_LENGTH(s);
    uint8_t *p = malloc(*len ? *len : 1);
    if (p)
        memcpy(p, GRPC_SLICE_START_PTR(s), *len);
    grpc_slice_unref(s);
    return p;
}

/* Start the next batch this call can send: pieces of a stream, or the final
 * message with the status. One batch in flight at a time. */
static void s_flush(s_call *c) {
    if (c->send_busy || c->aborted || c->status_started)
        return;
    grpc_op ops[3];
    memset(ops, 0, sizeof ops);
    size_t n = 0;
    grpc_byte_buffer *msg = NULL;
    int with_status = 0;
    if (c->method == M_STREAM && (c->acc_len > c->acc_hold || c->acc_n) &&
        (!c->status_set || c->code == GRPC_STATUS_OK)) {
        Medmoe__V1__AnswerChunk ch = MEDMOE__V1__ANSWER_CHUNK__INIT;
        c->acc = c->acc ? c->acc : calloc(1, 1);
        if (!c->acc)
            return;
        size_t send = c->acc_len - c->acc_hold;
        char keep = c->acc[send];
        c->acc[send] = 0; /* acc_cap keeps a byte for this */
        ch.text = c->acc;
        ch.tokens = c->acc_tok;
        ch.n_tokens = c->acc_n;
        msg = s_pack(&ch.base);
        c->acc[send] = keep;
        memmove(c->acc, c->acc + send, c->acc_hold); /* the held whitespace stays */
        c->acc_len = c->acc_hold;
        c->acc_n = 0;
    } else if (c->status_set) {
        if (c->code == GRPC_STATUS_OK && c->reply) {
            msg = c->reply;
            c->reply = NULL;
        }
        with_status = 1;
    } else {
        return;
    }
    if (!c->md_sent) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        n++;
    }
    if (msg) {
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = msg;
        n++;
    }
    if (with_status) {
        c->status_slice = grpc_slice_from_copied_string(c->msg);
        c->has_slice = 1;
        ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
        ops[n].data.send_status_from_server.status = c->code;
        ops[n].data.send_status_from_server.status_details = &c->status_slice;
        n++;
    }
    grpc_call_error e = grpc_call_start_batch(c->call, ops, n, &c->t_send, NULL);
    if (e != GRPC_CALL_OK) {
        mm_logf(c->g->o.log, MM_LOG_ERROR, c->client_case_id,
                "grpc_call_start_batch (%s): error %d", s_method_name[c->method], (int)e);
        if (msg)
            grpc_byte_buffer_destroy(msg);
        c->aborted = 1;
        return;
    }
    c->md_sent = 1;
    c->sending = msg;
    c->send_busy = 1;
    c->t_send_ms = mm_now_ms();
    c->ops++;
    if (with_status)
        c->status_started = 1;
}

/* Decide the call's status (the first decision wins) and send what can go. */
static void s_finish(s_call *c, grpc_status_code code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void s_finish(s_call *c, grpc_status_code code, const char *fmt, ...) {
    if (c->status_set)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->msg, sizeof c->msg, fmt, ap);
    va_end(ap);
    c->code = code;
    c->status_set = 1;
    s_flush(c);
}

/* ---- results -> messages ---------------------------------------------------- */

/* LayerRouting[] from the result's per-layer counts (freed by
 * s_routing_free); the arrays point into r, which must outlive the message. */
static Medmoe__V1__LayerRouting **s_routing(const mm_case_result *r, size_t *n) {
    *n = 0;
    if (!r->n_moe)
        return NULL;
    Medmoe__V1__LayerRouting **v = calloc(r->n_moe, sizeof *v);
    Medmoe__V1__LayerRouting *lr = calloc(r->n_moe, sizeof *lr);
    if (!v || !lr) {
        free(v);
        free(lr);
        return NULL;
    }
    for (size_t l = 0; l < r->n_moe; l++) {
        medmoe__v1__layer_routing__init(&lr[l]);
        lr[l].layer = (uint32_t)r->moe_layer[l];
        lr[l].image_tokens_per_expert = r->image_count + l * r->n_experts;
        lr[l].n_image_tokens_per_expert = r->n_experts;
        lr[l].text_tokens_per_expert = r->text_count + l * r->n_experts;
        lr[l].n_text_tokens_per_expert = r->n_experts;
        v[l] = &lr[l];
    }
    *n = r->n_moe;
    return v;
}

static void s_routing_free(Medmoe__V1__LayerRouting **v) {
    if (v)
        free(v[0]); /* the one array of layers */
    free(v);
}

/* Timings of a result; the scheduler measures from submission, the client
 * from arrival: add what parsing and validation took. */
static void s_timings(s_call *c, const mm_case_result *r, Medmoe__V1__Timings *t) {
    double pre = c->t_submit - c->t_arrival;
    t->queue_ms = r->queue_ms + pre;
    t->vision_ms = r->image_ms + r->vision_ms; /* the proto's: decode + tower + projector */
    t->ttft_ms = r->ttft_ms > 0 ? r->ttft_ms + pre : 0.0;
    t->total_ms = mm_now_ms() - c->t_arrival;
    t->decode_ms_per_token = r->decode_ms_per_token;
    c->queue_ms = t->queue_ms;
    c->ttft_ms = t->ttft_ms;
    c->prompt_tokens = (unsigned)r->prompt_len;
    c->generated_tokens = (unsigned)r->n_tokens;
}

/* The CaseAnswer of a result, packed (for Ask, or inside the final chunk). */
static grpc_byte_buffer *s_answer(s_call *c, const mm_case_result *r) {
    Medmoe__V1__CaseAnswer a = MEDMOE__V1__CASE_ANSWER__INIT;
    Medmoe__V1__Timings t = MEDMOE__V1__TIMINGS__INIT;
    a.case_id = c->client_case_id ? c->client_case_id : "";
    a.answer = r->answer ? r->answer : "";
    a.tokens = r->tokens;
    a.n_tokens = r->n_tokens;
    a.prompt_tokens = (uint32_t)r->prompt_len;
    a.generated_tokens = (uint32_t)r->n_tokens;
    a.routing = s_routing(r, &a.n_routing);
    s_timings(c, r, &t);
    a.timings = &t;
    a.finish_reason = r->hit_eos ? "eos" : "max_tokens";
    grpc_byte_buffer *bb = NULL;
    if (r->n_moe && !a.routing) {
        bb = NULL; /* out of memory */
    } else if (c->method == M_STREAM) {
        Medmoe__V1__AnswerChunk ch = MEDMOE__V1__ANSWER_CHUNK__INIT;
        ch.text = "";
        ch.final = &a;
        bb = s_pack(&ch.base);
    } else {
        bb = s_pack(&a.base);
    }
    s_routing_free(a.routing);
    return bb;
}

static grpc_byte_buffer *s_classified(s_call *c, const mm_case_result *r) {
    Medmoe__V1__ClassifyResult k = MEDMOE__V1__CLASSIFY_RESULT__INIT;
    Medmoe__V1__Timings t = MEDMOE__V1__TIMINGS__INIT;
    size_t n = r->n_candidates;
    Medmoe__V1__ScoredCandidate *sv = calloc(n + 1, sizeof *sv);
    Medmoe__V1__ScoredCandidate **sp = calloc(n + 1, sizeof *sp);
    grpc_byte_buffer *bb = NULL;
    if (sv && sp) {
        for (size_t i = 0; i < n; i++) { /* already ranked, best first */
            medmoe__v1__scored_candidate__init(&sv[i]);
            sv[i].text = r->candidates[i].text ? r->candidates[i].text : "";
            sv[i].logprob = r->candidates[i].logprob;
            sv[i].prob = r->candidates[i].prob;
            sp[i] = &sv[i];
        }
        k.case_id = c->client_case_id ? c->client_case_id : "";
        k.candidates = sp;
        k.n_candidates = n;
        k.routing = s_routing(r, &k.n_routing);
        s_timings(c, r, &t);
        k.timings = &t;
        if (k.routing || !r->n_moe)
            bb = s_pack(&k.base);
        s_routing_free(k.routing);
    }
    free(sv);
    free(sp);
    return bb;
}

/* ---- scheduler callbacks and their queue ------------------------------------------ */

/* Callback side (any thread): the fields read here (g, method, done_ev) were
 * set before the case was submitted and do not change until E_DONE. */
static void s_push(mm_grpc_server *g, s_event *e) {
    e->next = NULL;
    pthread_mutex_lock(&g->mu);
    if (g->ev_tail)
        g->ev_tail->next = e;
    else
        g->ev_head = e;
    g->ev_tail = e;
    pthread_mutex_unlock(&g->mu);
}

static void s_on_token(void *user, uint64_t case_id, const char *piece, size_t len, int32_t token) {
    s_call *c = user;
    (void)case_id;
    int stream = c->method == M_STREAM;
    if (!stream && token < 0)
        return; /* only streams send text; every method times its tokens */
    size_t keep = stream ? len : 0;
    s_event *e = malloc(sizeof *e + keep + 1);
    if (!e)
        return; /* a lost piece: the final message still carries the whole answer */
    e->c = c;
    e->kind = E_TOKEN;
    e->t_ms = mm_now_ms();
    e->token = token;
    e->len = keep;
    if (keep)
        memcpy(e->piece, piece, keep);
    s_push(c->g, e);
}

static void s_on_done(void *user, uint64_t case_id, int status, const char *message,
                      const mm_case_result *result) {
    s_call *c = user;
    (void)case_id;
    s_event *e = c->done_ev;
    e->c = c;
    e->kind = E_DONE;
    e->t_ms = mm_now_ms();
    e->status = status;
    snprintf(e->message, sizeof e->message, "%s",
             message && *message ? message : mm_status_str(status));
    if (status == MM_OK && result && mm_case_result_copy(&e->res, result) != MM_OK) {
        e->status = MM_ENOMEM;
        snprintf(e->message, sizeof e->message, "server out of memory copying the answer");
    }
    s_push(c->g, e);
}

/* mm_case_strip's whitespace: isspace() in the C locale. */
static int s_is_space(char ch) {
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\v' || ch == '\f' || ch == '\r';
}

/* CQ thread: one token's timing and, for a stream, its text. */
static void s_token(s_call *c, const s_event *e) {
    if (e->token >= 0) { /* pieces at the end come with -1, not a token */
        if (c->t_last_token > 0)
            mm_metric_observe(c->g->cm.token_latency, (e->t_ms - c->t_last_token) / 1e3);
        else
            mm_metric_observe(c->g->cm.ttft, (e->t_ms - c->t_arrival) / 1e3);
        c->t_last_token = e->t_ms;
    }
    if (c->method != M_STREAM || c->aborted)
        return;
    const char *piece = e->piece;
    size_t len = e->len;
    while (!c->acc_started && len && s_is_space(*piece)) /* the answer's leading strip */
        piece++, len--;
    if (len) {
        if (c->acc_len + e->len + 1 > c->acc_cap) {
            size_t cap = c->acc_cap ? c->acc_cap : 256;
            while (cap < c->acc_len + e->len + 1)
                cap *= 2;
            char *nb = realloc(c->acc, cap);
            if (!nb)
                return; /* the final chunk still carries the whole answer */
            c->acc = nb;
            c->acc_cap = cap;
        }
        memcpy(c->acc + c->acc_len, piece, len);
        c->acc_len += len;
        c->acc_started = 1;
        /* its trailing strip: hold back the whitespace at the end until
         * something else follows (UTF-8 continuation bytes are never ASCII
         * whitespace, so no character is split) */
        c->acc_hold = 0;
        while (c->acc_hold < c->acc_len && s_is_space(c->acc[c->acc_len - 1 - c->acc_hold]))
            c->acc_hold++;
    }
    if (e->token >= 0) {
        if (c->acc_n == c->acc_tcap) {
            size_t cap = c->acc_tcap ? 2 * c->acc_tcap : 16;
            int32_t *nt = realloc(c->acc_tok, cap * sizeof *nt);
            if (!nt)
                return;
            c->acc_tok = nt;
            c->acc_tcap = cap;
        }
        c->acc_tok[c->acc_n++] = e->token;
    }
    /* sent by s_drain once the whole batch of events is in: see there */
}

/* CQ thread: the case ended; the scheduler will not call back for it again. */
static void s_done(s_call *c, s_event *e) {
    c->done_ev = NULL; /* e: on_done is over, nothing reads the pointer now */
    c->in_sched = 0;
    c->g->n_in_sched--;
    if (e->status == MM_OK) {
        c->res = e->res; /* moved: the audit record reads it when the call ends */
        memset(&e->res, 0, sizeof e->res);
        c->has_res = 1;
        grpc_byte_buffer *bb =
            c->method == M_CLASSIFY ? s_classified(c, &c->res) : s_answer(c, &c->res);
        if (!bb) {
            s_finish(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "server out of memory packing the answer");
        } else {
            c->reply = bb;
            s_finish(c, GRPC_STATUS_OK, "%s", "");
        }
    } else {
        int status = e->status;
        const char *message = e->message;
        int past = c->deadline_ms > 0 && e->t_ms >= c->deadline_ms - 1.0;
        grpc_status_code code = GRPC_STATUS_INTERNAL;
        if (status == MM_ETIMEOUT)
            code = past || !strcmp(message, "deadline exceeded") ? GRPC_STATUS_DEADLINE_EXCEEDED
                                                                 : GRPC_STATUS_UNAVAILABLE;
        else if (status == MM_ECANCELLED)
            code = past ? GRPC_STATUS_DEADLINE_EXCEEDED : GRPC_STATUS_CANCELLED;
        else if (status == MM_EAGAIN || status == MM_ENOTFOUND || status == MM_EIO)
            code = GRPC_STATUS_UNAVAILABLE;
        else if (status == MM_EINVAL)
            code = GRPC_STATUS_INVALID_ARGUMENT;
        else if (status == MM_ENOMEM)
            code = GRPC_STATUS_RESOURCE_EXHAUSTED;
        s_finish(c, code, "%s", message);
    }
    mm_case_result_clear(&e->res);
    free(e);
}

/* CQ thread: take every event queued so far and act on it, then send what
 * streams gathered (one message per call for all its new pieces, rather
 * than one per token). Returns the number of events. */
static int s_drain(mm_grpc_server *g) {
    pthread_mutex_lock(&g->mu);
    s_event *e = g->ev_head;
    g->ev_head = g->ev_tail = NULL;
    pthread_mutex_unlock(&g->mu);
    int n = 0;
    while (e) {
        s_event *next = e->next;
        s_call *c = e->c;
        if (e->kind == E_TOKEN) {
            s_token(c, e);
            free(e);
        } else {
            s_done(c, e); /* frees e; c may be freed below, never earlier */
        }
        n++;
        e = next;
    }
    if (!n)
        return 0;
    for (s_call *c = g->calls, *next; c; c = next) {
        next = c->next;
        if (c->acc_len > c->acc_hold || c->acc_n)
            s_flush(c);
        s_call_maybe_free(c);
    }
    return n;
}

/* ---- arrival, admission, validation --------------------------------------------- */

/* The API key from `authorization: Bearer KEY` (pointer into md), or NULL. */
static const char *s_bearer(const grpc_metadata_array *md, size_t *len) {
    for (size_t i = 0; i < md->count; i++) {
        if (grpc_slice_str_cmp(md->metadata[i].key, "authorization"))
            continue;
        const char *v = (const char *)GRPC_SLICE_START_PTR(md->metadata[i].value);
        size_t n = GRPC_SLICE_LENGTH(md->metadata[i].value);
        if (n > 7 && !strncasecmp(v, "bearer ", 7)) {
            v += 7;
            n -= 7;
            while (n && *v == ' ')
                v++, n--;
            while (n && v[n - 1] == ' ')
                n--;
            *len = n;
            return n ? v : NULL;
        }
    }
    return NULL;
}

static int s_authenticate(s_call *c) {
    size_t len = 0;
    const char *key = s_bearer(&c->md, &len);
    if (!key) {
        s_finish(c, GRPC_STATUS_UNAUTHENTICATED,
                 "no API key: send metadata 'authorization: Bearer <key>'");
        return -1;
    }
    c->tenant = mm_tenants_auth(c->g->o.tenants, key, len);
    if (c->tenant < 0) {
        s_finish(c, GRPC_STATUS_UNAUTHENTICATED, "unknown API key");
        return -1;
    }
    return 0;
}

/* Parse, check, admit and submit a case call (Ask, AskStream, Classify). */
static void s_case_call(s_call *c, grpc_byte_buffer *payload) {
    mm_grpc_server *g = c->g;
    const mm_grpc_options *o = &g->o;
    if (s_authenticate(c))
        return;
    size_t len = 0;
    uint8_t *bytes = payload ? s_read_all(payload, &len) : NULL;
    if (!bytes) {
        s_finish(c, GRPC_STATUS_INVALID_ARGUMENT, "request: no message");
        return;
    }
    mm_request_limits lim = {.max_question_bytes = o->max_question_bytes,
                             .max_image_bytes = o->max_image_bytes,
                             .max_candidates = o->max_candidates,
                             .max_tokens_default = o->max_tokens_default,
                             .max_tokens_limit = o->max_tokens_limit};
    mm_request req;
    char err[1024] = "";
    int prc = mm_request_parse(bytes, len, c->method == M_CLASSIFY ? MM_REQ_CLASSIFY : MM_REQ_CASE,
                               &lim, &req, err, sizeof err);
    free(bytes);
    if (req.case_id) /* checked: valid, short, no control characters */
        c->client_case_id = strdup(req.case_id);
    if (prc != MM_OK) {
        s_finish(c, GRPC_STATUS_INVALID_ARGUMENT, "%s", err);
        goto out;
    }
    mm_sched_request r = req.r;
    r.tenant = mm_tenants_id(o->tenants, c->tenant);
    r.client_case_id = c->client_case_id;
    mm_dicom_info di;
    char derr[256];
    if (o->audit && r.image_bytes && mm_dicom_is(r.image_bytes, r.image_len, r.media_type) &&
        mm_dicom_probe(r.image_bytes, r.image_len, &di, derr, sizeof derr) == MM_OK) {
        /* the audit names the instance only as a salted hash (medmoe.proto) */
        c->is_dicom = 1;
        c->dicom = r.dicom;
        mm_audit_hash(o->audit, di.sop_instance_uid, strlen(di.sop_instance_uid), c->dicom_sop);
        snprintf(c->dicom_modality, sizeof c->dicom_modality, "%s", di.modality);
    }
    /* valid: only now does the case take a unit of the tenant's quota (the
     * quota counts what the tenant is served, see medmoe.proto) */
    if (mm_tenants_admit(o->tenants, c->tenant, mm_now_ms(), err, sizeof err) != MM_OK) {
        s_finish(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "%s", err);
        goto out;
    }
    c->admitted = 1;
    s_audit_admitted(c);
    r.deadline_ms = c->deadline_ms;
    r.on_token = s_on_token; /* every method: token timing; only streams send pieces */
    r.on_done = s_on_done;
    r.user = c;
    if (!(c->done_ev = calloc(1, sizeof *c->done_ev))) {
        s_finish(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "server out of memory");
        goto out;
    }
    c->t_submit = mm_now_ms();
    /* callbacks may run (on other threads) before this returns: they only
     * queue events, which this thread drains after setting in_sched */
    int rc = mm_sched_submit(o->sched, &r, &c->sched_id, err, sizeof err);
    if (rc == MM_OK) {
        c->in_sched = 1;
        g->n_in_sched++;
    } else if (rc == MM_EINVAL) {
        s_finish(c, GRPC_STATUS_INVALID_ARGUMENT, "%s", err);
    } else if (rc == MM_ETIMEOUT) {
        s_finish(c, GRPC_STATUS_DEADLINE_EXCEEDED, "%s", err);
    } else if (rc == MM_EAGAIN || rc == MM_ENOMEM) {
        s_finish(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "server busy: %s", err);
    } else {
        s_finish(c, GRPC_STATUS_INTERNAL, "%s: %s", mm_status_str(rc), err);
    }
out:
    mm_request_clear(&req);
}

static int s_live(const mm_grpc_server *g, int e) {
    return g->o.live_replicas ? g->o.live_replicas(g->o.live_ctx, e) : 1;
}

static void s_info_call(s_call *c) {
    mm_grpc_server *g = c->g;
    if (s_authenticate(c))
        return;
    const mm_config *cfg = mm_model_config(g->o.model);
    int n = g->o.n_experts > 0 ? g->o.n_experts : 0;
    Medmoe__V1__ServerInfo si = MEDMOE__V1__SERVER_INFO__INIT;
    Medmoe__V1__ExpertInfo *ev = calloc((size_t)n + 1, sizeof *ev);
    Medmoe__V1__ExpertInfo **ep = calloc((size_t)n + 1, sizeof *ep);
    if (!ev || !ep) {
        free(ev);
        free(ep);
        s_finish(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "server out of memory");
        return;
    }
    for (int e = 0; e < n; e++) {
        medmoe__v1__expert_info__init(&ev[e]);
        ev[e].expert = (uint32_t)e;
        ev[e].name = (char *)(e < cfg->n_expert_names ? cfg->expert_names[e] : "");
        ev[e].live_replicas = (uint32_t)s_live(g, e);
        ev[e].fingerprint = (char *)(g->o.expert_fingerprints ? g->o.expert_fingerprints[e] : "");
        ep[e] = &ev[e];
    }
    si.version = (char *)g->o.version;
    si.model = (char *)mm_model_variant(g->o.model);
    si.backbone = (char *)mm_arch_name(cfg->arch);
    si.backend = (char *)mm_backend_describe(mm_model_backend(g->o.model));
    si.experts = ep;
    si.n_experts = (size_t)n;
    si.max_concurrent_cases = (uint32_t)mm_model_n_slots(g->o.model);
    si.model_fingerprint = (char *)(g->o.model_fingerprint ? g->o.model_fingerprint : "");
    c->reply = s_pack(&si.base);
    free(ev);
    free(ep);
    s_finish(c, GRPC_STATUS_OK, "%s", "");
}

/* grpc.health.v1.Health/Check: no API key (load balancers and probes have
 * none). SERVING while every expert has a live replica. */
static void s_health_call(s_call *c, grpc_byte_buffer *payload) {
    size_t len = 0;
    uint8_t *bytes = payload ? s_read_all(payload, &len) : NULL;
    Grpc__Health__V1__HealthCheckRequest *q =
        bytes ? grpc__health__v1__health_check_request__unpack(NULL, len, bytes) : NULL;
    free(bytes);
    if (!q) {
        s_finish(c, GRPC_STATUS_INVALID_ARGUMENT, "request: malformed HealthCheckRequest");
        return;
    }
    const char *svc = q->service ? q->service : "";
    if (*svc && strcmp(svc, "medmoe.v1.CaseService")) {
        s_finish(c, GRPC_STATUS_NOT_FOUND, "unknown service '%.100s'", svc);
    } else {
        int all = 1;
        for (int e = 0; e < c->g->o.n_experts; e++)
            all &= s_live(c->g, e) > 0;
        Grpc__Health__V1__HealthCheckResponse r = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
        r.status = all && !c->g->draining
                       ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
                       : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
        c->reply = s_pack(&r.base);
        s_finish(c, GRPC_STATUS_OK, "%s", "");
    }
    grpc__health__v1__health_check_request__free_unpacked(q, NULL);
}

/* ---- events ----------------------------------------------------------------------- */

static void s_arm(s_listener *l) {
    mm_grpc_server *g = l->g;
    if (g->shutting_down)
        return;
    l->call = NULL;
    l->payload = NULL;
    grpc_metadata_array_init(&l->md);
    grpc_call_error e;
    if (l->rm) {
        e = grpc_server_request_registered_call(g->server, l->rm, &l->call, &l->deadline, &l->md,
                                                l->method == M_INFO ? NULL : &l->payload, g->cq,
                                                g->cq, &l->tag);
    } else {
        grpc_call_details_init(&l->details);
        e = grpc_server_request_call(g->server, &l->call, &l->details, &l->md, g->cq, g->cq,
                                     &l->tag);
    }
    if (e != GRPC_CALL_OK)
        mm_logf(g->o.log, MM_LOG_ERROR, NULL, "grpc request call (%s): error %d",
                s_method_name[l->method], (int)e);
}

static void s_on_new(s_listener *l, int ok) {
    mm_grpc_server *g = l->g;
    if (!ok) { /* shutting down: the request is void */
        grpc_metadata_array_destroy(&l->md);
        if (!l->rm)
            grpc_call_details_destroy(&l->details);
        if (l->payload)
            grpc_byte_buffer_destroy(l->payload);
        return;
    }
    s_call *c = calloc(1, sizeof *c);
    grpc_byte_buffer *payload = l->payload;
    if (!c) {
        /* cannot even hold the call: refuse it */
        grpc_call_cancel_with_status(l->call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory",
                                     NULL);
        grpc_call_unref(l->call);
        grpc_metadata_array_destroy(&l->md);
        if (!l->rm)
            grpc_call_details_destroy(&l->details);
        if (payload)
            grpc_byte_buffer_destroy(payload);
        s_arm(l);
        return;
    }
    c->g = g;
    c->method = l->method;
    c->call = l->call;
    c->md = l->md; /* ownership moves to the call */
    c->tenant = -1;
    c->t_arrival = mm_now_ms();
    char *peer = grpc_call_get_peer(c->call);
    snprintf(c->peer, sizeof c->peer, "%s", peer ? peer : "unknown");
    gpr_free(peer);
    gpr_timespec dl = l->deadline;
    if (!l->rm) {
        c->details = l->details;
        c->has_details = 1;
        dl = l->details.deadline;
    }
    if (gpr_time_cmp(dl, gpr_inf_future(dl.clock_type)) != 0) {
        gpr_timespec mono = gpr_convert_clock_type(dl, GPR_CLOCK_MONOTONIC);
        gpr_timespec left = gpr_time_sub(mono, gpr_now(GPR_CLOCK_MONOTONIC));
        c->deadline_ms = c->t_arrival + (double)gpr_timespec_to_micros(left) / 1000.0;
    }
    c->t_close = (s_tag){T_CLOSE, c};
    c->t_send = (s_tag){T_SEND, c};
    c->next = g->calls;
    if (g->calls)
        g->calls->prev = c;
    g->calls = c;
    g->n_calls++;
    g->calls_since_trim++;
    s_arm(l); /* the next call of this method may arrive now */

    /* learn at once when the client cancels or goes away */
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->recv_cancelled;
    if (grpc_call_start_batch(c->call, &op, 1, &c->t_close, NULL) == GRPC_CALL_OK)
        c->ops++;
    else
        c->aborted = 1;

    if (g->draining && c->method != M_HEALTH) {
        s_finish(c, GRPC_STATUS_UNAVAILABLE, "shutting down");
    } else
        switch (c->method) {
        case M_ASK:
        case M_STREAM:
        case M_CLASSIFY: s_case_call(c, payload); break;
        case M_INFO: s_info_call(c); break;
        case M_HEALTH: s_health_call(c, payload); break;
        default: {
            char path[256];
            size_t n = GRPC_SLICE_LENGTH(c->details.method);
            snprintf(path, sizeof path, "%.*s", (int)(n < 200 ? n : 200),
                     (const char *)GRPC_SLICE_START_PTR(c->details.method));
            s_finish(c, GRPC_STATUS_UNIMPLEMENTED, "method %s is not served here", path);
        }
        }
    if (payload)
        grpc_byte_buffer_destroy(payload);
    s_call_maybe_free(c);
}

static void s_on_close(s_call *c) {
    if (c->recv_cancelled && !c->status_started) {
        c->aborted = 1;
        /* frees the slot at the next step at the latest; the call waits
         * for on_done's event (in_sched) before it is freed */
        if (c->in_sched)
            mm_sched_cancel(c->g->o.sched, c->sched_id);
        s_finish(c,
                 c->deadline_ms > 0 && mm_now_ms() >= c->deadline_ms - 1.0
                     ? GRPC_STATUS_DEADLINE_EXCEEDED
                     : GRPC_STATUS_CANCELLED,
                 "client cancelled");
    }
    c->ops--;
    s_call_maybe_free(c);
}

static void s_on_send(s_call *c, int ok) {
    c->send_busy = 0;
    if (c->sending) {
        grpc_byte_buffer_destroy(c->sending);
        c->sending = NULL;
    }
    if (!ok && !c->aborted) { /* the stream broke under us: the client is gone */
        c->aborted = 1;
        if (c->in_sched)
            mm_sched_cancel(c->g->o.sched, c->sched_id);
        s_finish(c, GRPC_STATUS_CANCELLED, "send failed: client gone");
    }
    s_flush(c);
    c->ops--;
    s_call_maybe_free(c);
}

static void s_on_event(mm_grpc_server *g, grpc_event ev) {
    s_tag *t = ev.tag;
    switch (t->kind) {
    case T_NEW: s_on_new(t->obj, ev.success); break;
    case T_CLOSE: s_on_close(t->obj); break;
    case T_SEND: s_on_send(t->obj, ev.success); break;
    case T_SHUTDOWN: g->shutdown_done = 1; break;
    }
}

/* A call whose send has made no progress for write_timeout_ms: the client
 * does not read (its HTTP/2 window stays shut). Cancel it so that its
 * batch completes, its case leaves the scheduler and its tenant's slot is
 * freed when the call is (the audit and the log say CANCELLED, "write
 * timeout"). Scanned every 100 ms at most. */
static void s_write_timeouts(mm_grpc_server *g) {
    double now = mm_now_ms();
    if (g->o.write_timeout_ms <= 0 || now < g->t_write_check)
        return;
    g->t_write_check = now + 100;
    for (s_call *c = g->calls; c; c = c->next) {
        if (!c->send_busy || c->aborted || now - c->t_send_ms < g->o.write_timeout_ms)
            continue;
        c->aborted = 1;
        if (c->in_sched)
            mm_sched_cancel(g->o.sched, c->sched_id);
        /* what the audit and the log record: the client never got its status */
        c->code = GRPC_STATUS_CANCELLED;
        snprintf(c->msg, sizeof c->msg, "write timeout: the client read nothing for %d ms",
                 g->o.write_timeout_ms);
        c->status_set = 1;
        g->n_write_timeouts++;
        mm_logf(g->o.log, MM_LOG_WARN, c->client_case_id,
                "grpc %s from %s: write timeout (%d ms without progress): call cancelled, "
                "its slot freed",
                s_method_name[c->method], c->peer, g->o.write_timeout_ms);
        grpc_call_cancel_with_status(c->call, GRPC_STATUS_CANCELLED, c->msg, NULL);
    }
}

/* How long the CQ thread waits in grpc_completion_queue_next while cases are
 * in the scheduler: their events are only seen between two waits (the C core
 * 1.51 has no public alarm to wake the queue from another thread), so this
 * bounds the delay they add to a streamed token or an answer. */
#define S_EVENT_POLL_MS 2

/* After a burst of calls (a flood, a peak of traffic) give the freed heap
 * back to the system: glibc keeps it in its arenas (gRPC's threads have
 * their own), so a burst would otherwise stay in the RSS for good (measured:
 * 20,000 streams opened and reset at once left +233 MB without this, +0.1 MB
 * with it). At most once a second while a burst goes on, and once more
 * after it. */
static void s_trim(mm_grpc_server *g) {
    if (g->calls_since_trim >= S_TRIM_CALLS)
        g->trim_due = 1;
    double now = mm_now_ms();
    if (!g->trim_due || now - g->t_trim < 1000.0)
        return;
    g->t_trim = now;
    g->trim_due = g->calls_since_trim > 0; /* calls since the last one: once more */
    g->calls_since_trim = 0;
    malloc_trim(0);
}

int mm_grpc_server_poll(mm_grpc_server *g, int timeout_ms) {
    int n = s_drain(g);
    s_trim(g);
    if (mm_now_ms() >= g->t_unauth_flush)
        s_unauth_flush(g);
    s_write_timeouts(g);
    if (g->n_in_sched > 0 && timeout_ms > S_EVENT_POLL_MS)
        timeout_ms = S_EVENT_POLL_MS;
    gpr_timespec dl = timeout_ms > 0 ? gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                                    gpr_time_from_millis(timeout_ms, GPR_TIMESPAN))
                                     : gpr_time_0(GPR_CLOCK_MONOTONIC);
    for (int k = 0; k < 512; k++) {
        grpc_event ev = grpc_completion_queue_next(g->cq, dl, NULL);
        if (ev.type != GRPC_OP_COMPLETE)
            break;
        s_on_event(g, ev);
        n++;
        dl = gpr_time_0(GPR_CLOCK_MONOTONIC);
    }
    return n + s_drain(g);
}

size_t mm_grpc_server_calls(const mm_grpc_server *g) { return g->n_calls; }

int mm_grpc_server_port(const mm_grpc_server *g) { return g->port; }

/* ---- server life ---------------------------------------------------------------- */

static char *s_read_pem(const char *path, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        mm_errorf(err, errlen, MM_EINVAL, "%s: %s", path, strerror(errno));
        return NULL;
    }
    char *buf = malloc(1 << 20);
    size_t n = buf ? fread(buf, 1, (1 << 20) - 1, f) : 0;
    int big = buf && n == (1 << 20) - 1;
    fclose(f);
    if (!buf || n == 0 || big) {
        mm_errorf(err, errlen, MM_EINVAL, "%s: %s", path,
                  !buf     ? "out of memory"
                  : n == 0 ? "empty or unreadable"
                           : "over 1 MiB");
        free(buf);
        return NULL;
    }
    buf[n] = 0;
    if (!strstr(buf, "-----BEGIN ")) {
        mm_errorf(err, errlen, MM_EINVAL, "%s: not a PEM file", path);
        free(buf);
        return NULL;
    }
    return buf;
}

static grpc_server_credentials *s_credentials(const mm_grpc_options *o, char *err, size_t errlen) {
    if (!o->tls_cert && !o->tls_key && !o->tls_client_ca)
        return grpc_insecure_server_credentials_create();
    if (!o->tls_cert || !o->tls_key) {
        mm_errorf(err, errlen, MM_EINVAL,
                  "TLS needs both --tls-cert and --tls-key (--tls-client-ca adds mTLS)");
        return NULL;
    }
    char *cert = s_read_pem(o->tls_cert, err, errlen);
    char *key = cert ? s_read_pem(o->tls_key, err, errlen) : NULL;
    char *ca = key && o->tls_client_ca ? s_read_pem(o->tls_client_ca, err, errlen) : NULL;
    grpc_server_credentials *cr = NULL;
    if (cert && key && (ca || !o->tls_client_ca)) {
        grpc_ssl_pem_key_cert_pair pair = {key, cert};
        cr = grpc_ssl_server_credentials_create_ex(
            ca, &pair, 1,
            ca ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
               : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
            NULL);
        if (!cr)
            mm_errorf(err, errlen, MM_EINVAL, "TLS credentials from %s / %s rejected", o->tls_cert,
                      o->tls_key);
    }
    free(cert);
    free(key);
    free(ca);
    return cr;
}

/* Destroy the server, drain and destroy the queue, release gRPC (the
 * server must be started-and-shut-down or never started). */
static void s_teardown(mm_grpc_server *g) {
    grpc_server_destroy(g->server);
    grpc_completion_queue_shutdown(g->cq);
    while (grpc_completion_queue_next(g->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(g->cq);
    grpc_shutdown();
}

static void s_on_unfinished(void *ctx, const json_t *r) {
    mm_grpc_server *g = ctx;
    const char *cid = json_string_value(json_object_get(r, "case_id"));
    mm_logf(g->o.log, MM_LOG_WARN, cid && *cid ? cid : NULL,
            "audit: case '%s' (tenant %s, %s from %s, run %s seq %lld) admitted at %s never "
            "finished: the router stopped under it",
            cid ? cid : "", json_string_value(json_object_get(r, "tenant")),
            json_string_value(json_object_get(r, "method")),
            json_string_value(json_object_get(r, "peer")),
            json_string_value(json_object_get(r, "run")),
            (long long)json_integer_value(json_object_get(r, "seq")),
            json_string_value(json_object_get(r, "time")));
}

/* At start: the cases an earlier run admitted and never ended (it was
 * killed), each logged and recorded "unfinished" in the audit log. */
static void s_audit_recover(mm_grpc_server *g) {
    char err[512];
    size_t n = 0;
    if (mm_audit_recover(g->o.audit, MM_AUDIT_SCAN_BYTES, s_on_unfinished, g, &n, err,
                         sizeof err) != MM_OK)
        mm_logf(g->o.log, MM_LOG_ERROR, NULL, "%s", err);
    else if (n)
        mm_logf(g->o.log, MM_LOG_WARN, NULL,
                "audit: %zu case(s) admitted by an earlier run never finished (recorded as "
                "\"unfinished\")",
                n);
}

int mm_grpc_check_options(const mm_grpc_options *o, char *err, size_t errlen) {
    if (!o->listen || !*o->listen)
        return mm_errorf(err, errlen, MM_EINVAL, "grpc server: no listen address");
    if (o->max_message < 1024 || o->max_message > 0x7fffffff)
        return mm_errorf(err, errlen, MM_EINVAL, "grpc server: max message %zu out of range",
                         o->max_message);
    if (o->max_streams < 1 || o->idle_ms < 1 || o->max_age_ms < 1 || o->age_grace_ms < 0 ||
        o->write_timeout_ms < 0)
        return mm_errorf(err, errlen, MM_EINVAL,
                         "grpc server: max streams %d, idle %d ms, max age %d ms, age grace %d ms "
                         "or write timeout %d ms out of range",
                         o->max_streams, o->idle_ms, o->max_age_ms, o->age_grace_ms,
                         o->write_timeout_ms);
    if (!o->tls_cert && !o->tls_key && !o->tls_client_ca)
        return MM_OK;
    if (!o->tls_cert || !o->tls_key)
        return mm_errorf(err, errlen, MM_EINVAL,
                         "TLS needs both --tls-cert and --tls-key (--tls-client-ca adds mTLS)");
    const char *files[3] = {o->tls_cert, o->tls_key, o->tls_client_ca};
    for (int i = 0; i < 3; i++) {
        if (!files[i])
            continue;
        char *pem = s_read_pem(files[i], err, errlen);
        if (!pem)
            return MM_EINVAL;
        free(pem);
    }
    return MM_OK;
}

int mm_grpc_server_new(const mm_grpc_options *o, mm_grpc_server **out, char *err, size_t errlen) {
    *out = NULL;
    if (!o->listen || !o->sched || !o->tenants || !o->model)
        return mm_errorf(err, errlen, MM_EINVAL,
                         "grpc server: listen, sched, tenants and model "
                         "are required");
    if (o->max_message < 1024 || o->max_message > 0x7fffffff)
        return mm_errorf(err, errlen, MM_EINVAL, "grpc server: max message %zu out of range",
                         o->max_message);
    mm_grpc_server *g = calloc(1, sizeof *g);
    if (!g)
        return mm_errorf(err, errlen, MM_ENOMEM, "grpc server: out of memory");
    g->o = *o;
    if (mm_router_case_metrics_init(o->metrics, &g->cm) != MM_OK) {
        int rc = mm_errorf(err, errlen, MM_EINVAL, "grpc server metrics: %s",
                           mm_metrics_error(o->metrics));
        free(g);
        return rc;
    }
    pthread_mutex_init(&g->mu, NULL);
    /* gRPC 1.51's default epoll1 engine, when one thread both polled the
     * queue and ran scheduler steps, stopped reading a connection while
     * this server streamed on it (a client's RST_STREAM and new calls
     * waited until the stream ended). The CQ thread no longer computes, but
     * the poll() engine is what the tests have covered since. An explicit
     * GRPC_POLL_STRATEGY in the environment still wins. */
    setenv("GRPC_POLL_STRATEGY", "poll", 0);
    grpc_init();
    /* the transport's limits: streams per connection (the calls one
     * connection can have pending here), idle and old connections closed,
     * request metadata bounded */
    const struct {
        const char *key;
        int value;
    } lim[] = {{GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, (int)o->max_message},
               {GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, -1},
               {GRPC_ARG_MAX_CONCURRENT_STREAMS, o->max_streams},
               {GRPC_ARG_MAX_CONNECTION_IDLE_MS, o->idle_ms},
               {GRPC_ARG_MAX_CONNECTION_AGE_MS, o->max_age_ms},
               {GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS, o->age_grace_ms},
               {GRPC_ARG_MAX_METADATA_SIZE, 16 << 10}};
    enum { N_ARGS = sizeof lim / sizeof *lim };
    grpc_arg args[N_ARGS];
    memset(args, 0, sizeof args);
    for (size_t i = 0; i < N_ARGS; i++) {
        args[i].type = GRPC_ARG_INTEGER;
        args[i].key = (char *)lim[i].key;
        args[i].value.integer = lim[i].value;
    }
    grpc_channel_args ca = {N_ARGS, args};
    g->server = grpc_server_create(&ca, NULL);
    g->cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(g->server, g->cq, NULL);
    for (int m = 0; m < M_COUNT; m++) {
        void *rm = NULL;
        if (m != M_UNKNOWN)
            rm = grpc_server_register_method(
                g->server, s_method_path[m], NULL,
                m == M_INFO ? GRPC_SRM_PAYLOAD_NONE : GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
        for (int i = 0; i < S_LISTENERS; i++) {
            s_listener *l = &g->lis[m][i];
            l->g = g;
            l->method = m;
            l->rm = rm;
            l->tag = (s_tag){T_NEW, l};
        }
    }
    grpc_server_credentials *cr = s_credentials(o, err, errlen);
    int rc = MM_OK;
    if (!cr) {
        rc = MM_EINVAL;
    } else {
        g->port = grpc_server_add_http2_port(g->server, o->listen, cr);
        grpc_server_credentials_release(cr);
        if (g->port <= 0)
            rc = mm_errorf(err, errlen, MM_EIO, "gRPC: cannot listen on %s", o->listen);
    }
    if (rc != MM_OK) {
        /* never started: no shutdown needed beyond the queue */
        s_teardown(g);
        pthread_mutex_destroy(&g->mu);
        free(g);
        return rc;
    }
    if (o->audit)
        s_audit_recover(g);
    g->t_unauth_flush = mm_now_ms() + S_UNAUTH_INTERVAL_MS;
    grpc_server_start(g->server);
    for (int m = 0; m < M_COUNT; m++)
        for (int i = 0; i < S_LISTENERS; i++)
            s_arm(&g->lis[m][i]);
    *out = g;
    return MM_OK;
}

void mm_grpc_server_shutdown(mm_grpc_server *g) {
    if (!g || g->shutting_down)
        return;
    /* calls gRPC matched but this thread has not taken yet are taken now
     * and told UNAVAILABLE, rather than left to gRPC's shutdown, which
     * would cancel them without a word */
    g->draining = 1;
    double until = mm_now_ms() + 200;
    while (mm_now_ms() < until && mm_grpc_server_poll(g, 20) > 0) {
    }
    g->shutting_down = 1;
    g->t_shutdown = (s_tag){T_SHUTDOWN, NULL};
    grpc_server_shutdown_and_notify(g->server, g->cq, &g->t_shutdown);
}

void mm_grpc_server_destroy(mm_grpc_server **gp) {
    if (!gp || !*gp)
        return;
    mm_grpc_server *g = *gp;
    mm_grpc_server_shutdown(g);
    /* statuses already started (e.g. UNAVAILABLE "shutting down") get 2 s to go out */
    double until = mm_now_ms() + 2000;
    while ((g->n_calls || !g->shutdown_done) && mm_now_ms() < until)
        mm_grpc_server_poll(g, 20);
    /* what is left: calls whose client is slow or silent */
    for (s_call *c = g->calls; c; c = c->next)
        if (!c->status_started)
            s_finish(c, GRPC_STATUS_UNAVAILABLE, "shutting down");
    grpc_server_cancel_all_calls(g->server);
    until = mm_now_ms() + 3000;
    while ((g->n_calls || !g->shutdown_done) && mm_now_ms() < until)
        mm_grpc_server_poll(g, 20);
    if (g->n_calls || !g->shutdown_done)
        mm_logf(g->o.log, MM_LOG_WARN, NULL, "gRPC shutdown: %zu call(s) still open after 5 s",
                g->n_calls);
    /* calls still listed here would be leaked with their grpc_call refs; the
     * server cannot be destroyed under them, so only finish when all went */
    if (!g->n_calls && g->shutdown_done) {
        s_teardown(g);
    }
    if (g->n_in_sched) {
        /* the scheduler still holds cases whose callbacks would queue into
         * g: leak it rather than let them write freed memory (a caller that
         * destroys the scheduler first never gets here) */
        mm_logf(g->o.log, MM_LOG_ERROR, NULL,
                "gRPC shutdown: %zu case(s) still in the scheduler; server state leaked",
                g->n_in_sched);
        *gp = NULL;
        return;
    }
    s_drain(g); /* token events of calls freed above: free them */
    s_unauth_flush(g);
    json_decref(g->unauth);
    pthread_mutex_destroy(&g->mu);
    free(g);
    *gp = NULL;
}
