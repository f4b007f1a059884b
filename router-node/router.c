/* router.c — medmoe-router as an object (see router.h).
 *
 * Sections: the object; files written atomically; --cases (a case line ->
 * a scheduler request -> one answer line); the gRPC front door's loop;
 * new / run / destroy.
 */
#include "router.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "audit.h"
#include "clock.h"
#include "dispatch.h"
#include "fingerprint.h"
#include "grpc_server.h"
#include "image.h"
#include "medmoe.h"
#include "metrics.h"
#include "router_metrics.h"
#include "scheduler.h"
#include "status.h"
#include "tenants.h"
#include "tokenizer.h"
#include "wire.h"

#define S_MAX_ALLOW 256 /* allowed expert keys */

/* Cases from --cases count under this tenant (scheduler and metrics). */
#define S_LOCAL_TENANT "local"

/* ---- the object ------------------------------------------------------------- */

/* Case lines from a file descriptor, read as they come. */
typedef struct s_lines {
    int fd;    /* -1: none                              */
    char *buf; /* bytes read, not yet consumed           */
    size_t len, cap;
    size_t lineno;
} s_lines;

/* The --cases case in flight (one at a time): the reading thread waits on
 * cv; the scheduler's callbacks (engine thread, an image worker) fill it. */
typedef struct s_local {
    pthread_mutex_t mu;
    pthread_cond_t cv; /* on CLOCK_MONOTONIC                          */
    int done;          /* on_done ran (under mu)                     */
    int status;        /* its status                                  */
    char message[1024];
    mm_case_result res; /* deep copy of the answer (MM_OK)            */
    /* token timing for the metrics: written by the callbacks only, which
     * never run two at once for a case */
    double t_submit, t_last_token;
    const mm_router_case_metrics *cm;
} s_local;

struct mm_router {
    mm_router_options o;
    mm_log *log;
    mm_metrics *reg;                   /* NULL without metrics_listen                  */
    mm_metrics_server *msrv;           /* serves reg                                    */
    mm_router_case_metrics cm;         /* NULL handles without reg                      */
    mm_tenants *tenants;               /* with grpc_listen                              */
    mm_audit *audit;                   /* with audit_log                                */
    mm_backend *be;                    /* compute backend                               */
    mm_model *m;                       /* the trunk: everything but the routed experts  */
    mm_tokenizer *tok;                 /* the model's tokenizer                         */
    int n_experts;                     /* experts per MoE layer (max over the layers)   */
    char (*fps)[MM_FINGERPRINT_HEX];   /* [n_experts] expected expert fingerprints */
    char model_fp[MM_FINGERPRINT_HEX]; /* the whole model's (GetServerInfo)      */
    char (*allow)[41];                 /* [S_MAX_ALLOW] allowed expert CURVE keys       */
    const char **allow_ptr;            /* [S_MAX_ALLOW] pointers into allow             */
    size_t n_allow;
    char secret[41]; /* this router's CURVE secret key (Z85)          */
    mm_dispatch *d;  /* the expert socket, its own thread             */
    mm_sched *sched; /* the engine: its thread + image workers        */
    mm_grpc_server *grpc;
    s_lines lines; /* --cases input                                  */
    s_local local; /* --cases: the case in flight                     */
    int local_init;
    size_t shown_pending, shown_active; /* gauge values last set            */
};

void mm_router_options_default(mm_router_options *o) {
    memset(o, 0, sizeof *o);
    o->backend = "cpu";
    o->expert_wait_ms = 5000;
    o->batch_timeout_ms = 60000;
    o->heartbeat_ms = 1000;
    o->max_image_bytes = 20u << 20;
    o->max_question_bytes = 4096;
    o->max_tokens_default = 64;
    o->max_tokens_limit = 512;
    o->grpc_max_message = 32u << 20;
    o->slots = 8;
    o->image_workers = 1;
    o->log_format = MM_LOG_TEXT;
    o->log_level = MM_LOG_INFO;
    o->version = "";
}

static int s_stopped(const mm_router *r) { return r->o.stop && *r->o.stop; }

/* Queue depth and active cases, set only when they change (a set takes the
 * registry's lock). */
static void s_gauges(mm_router *r) {
    if (!r->reg || !r->sched)
        return;
    size_t pending = mm_sched_pending(r->sched), active = mm_sched_active(r->sched);
    if (pending != r->shown_pending || active != r->shown_active) {
        mm_metric_set(r->cm.queue, (double)pending);
        mm_metric_set(r->cm.active, (double)active);
        r->shown_pending = pending;
        r->shown_active = active;
    }
}

static int s_live(void *d, int e) { return mm_dispatch_live(d, e); }

static int s_all_live(const mm_router *r) {
    for (int e = 0; e < r->n_experts; e++)
        if (!mm_dispatch_live(r->d, e))
            return 0;
    return 1;
}

/* "after MS ms, experts without a live replica: 1 3; cases needing them will fail" */
static void s_report_missing(const mm_router *r) {
    char list[512] = "";
    size_t u = 0;
    for (int e = 0; e < r->n_experts && u < sizeof list - 16; e++)
        if (!mm_dispatch_live(r->d, e))
            u += (size_t)snprintf(list + u, sizeof list - u, " %d", e);
    mm_logf(r->log, MM_LOG_WARN, NULL,
            "after %d ms, experts without a live replica:%s; cases needing them will fail",
            r->o.wait_experts_ms, list);
}

/* ---- files written atomically --------------------------------------------- */

/* Write text to path atomically: a reader sees the old file or the new one. */
static int s_write_atomic(const char *path, const char *text) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f)
        return -1;
    int ok = fputs(text, f) >= 0;
    ok &= fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok &= fclose(f) == 0;
    if (!ok || rename(tmp, path) != 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

/* ---- --cases: one case line, through the scheduler -------------------------- */

/* The code an error line carries for a status (as the gRPC front door
 * names them). */
static const char *s_code(int rc) {
    switch (rc) {
    case MM_ETIMEOUT:
    case MM_EAGAIN: return "UNAVAILABLE";
    case MM_EINVAL: return "INVALID_ARGUMENT";
    case MM_ENOTFOUND: return "NOT_FOUND";
    case MM_ECANCELLED: return "CANCELLED";
    case MM_ENOMEM: return "RESOURCE_EXHAUSTED";
    default: return "INTERNAL";
    }
}

static void s_emit(json_t *o) {
    char *s = json_dumps(o, JSON_COMPACT);
    if (s) {
        fputs(s, stdout);
        fputc('\n', stdout);
        fflush(stdout);
    }
    free(s);
}

static void s_emit_error(mm_router *r, json_t *id, const char *code, const char *msg) {
    json_t *o = json_pack("{s:O,s:s,s:s,s:s}", "id", id ? id : json_null(), "status", "error",
                          "code", code, "message", msg);
    if (o)
        s_emit(o);
    json_decref(o);
    mm_metric_add(r->cm.cases, 1, S_LOCAL_TENANT, code);
}

static void s_local_token(void *user, uint64_t case_id, const char *piece, size_t len,
                          int32_t token) {
    s_local *l = user;
    (void)case_id;
    (void)piece;
    (void)len;
    if (token < 0)
        return;
    double now = mm_now_ms();
    if (l->t_last_token > 0)
        mm_metric_observe(l->cm->token_latency, (now - l->t_last_token) / 1e3);
    else
        mm_metric_observe(l->cm->ttft, (now - l->t_submit) / 1e3);
    l->t_last_token = now;
}

static void s_local_done(void *user, uint64_t case_id, int status, const char *message,
                         const mm_case_result *result) {
    s_local *l = user;
    (void)case_id;
    pthread_mutex_lock(&l->mu);
    l->status = status;
    snprintf(l->message, sizeof l->message, "%s",
             message && *message ? message : mm_status_str(status));
    if (status == MM_OK && result && mm_case_result_copy(&l->res, result) != MM_OK) {
        l->status = MM_ENOMEM;
        snprintf(l->message, sizeof l->message, "out of memory copying the answer");
    }
    l->done = 1;
    pthread_cond_signal(&l->cv);
    pthread_mutex_unlock(&l->mu);
}

/* Wait for the case's on_done. On a stop request the case is cancelled and
 * still waited for: on_done is the one sure end of a case, and s_local must
 * not be reused before it. */
static void s_local_wait(mm_router *r, uint64_t id) {
    s_local *l = &r->local;
    int cancelled = 0;
    pthread_mutex_lock(&l->mu);
    while (!l->done) {
        if (!cancelled && s_stopped(r)) {
            pthread_mutex_unlock(&l->mu); /* cancel may call on_done here */
            mm_sched_cancel(r->sched, id);
            cancelled = 1;
            pthread_mutex_lock(&l->mu);
            continue;
        }
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += 200 * 1000000L; /* the stop flag is looked at this often */
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&l->cv, &l->mu, &ts);
        if (r->reg) {
            pthread_mutex_unlock(&l->mu);
            s_gauges(r);
            pthread_mutex_lock(&l->mu);
        }
    }
    pthread_mutex_unlock(&l->mu);
}

/* Parse and answer one JSON line; every failure becomes an error line. */
static void s_case(mm_router *r, const char *line, size_t lineno) {
    json_error_t jerr;
    char msg[1200];
    json_t *c = json_loads(line, 0, &jerr);
    if (!c || !json_is_object(c)) {
        snprintf(msg, sizeof msg, "case line %zu: %s", lineno, c ? "not a JSON object" : jerr.text);
        s_emit_error(r, NULL, "INVALID_ARGUMENT", msg);
        json_decref(c);
        return;
    }
    json_t *id = json_object_get(c, "id");
    mm_sched_request q;
    mm_sched_request_default(&q);
    const char *bad = NULL, *image_path = NULL, *dump_logits = NULL;
    json_t *v;
    if (id && !json_is_string(id) && !json_is_integer(id))
        bad = "id";
    if ((v = json_object_get(c, "image")) && !json_is_null(v))
        json_is_string(v) ? (void)(image_path = json_string_value(v)) : (void)(bad = "image");
    if ((v = json_object_get(c, "question")))
        json_is_string(v) ? (void)(q.question = json_string_value(v)) : (void)(bad = "question");
    if ((v = json_object_get(c, "candidates")) && !json_is_null(v))
        json_is_string(v) ? (void)(q.candidates = json_string_value(v))
                          : (void)(bad = "candidates");
    if ((v = json_object_get(c, "conv_mode")) && !json_is_null(v))
        json_is_string(v) ? (void)(q.conv_mode = json_string_value(v)) : (void)(bad = "conv_mode");
    if ((v = json_object_get(c, "dump_logits")) && !json_is_null(v))
        json_is_string(v) ? (void)(dump_logits = json_string_value(v))
                          : (void)(bad = "dump_logits");
    if ((v = json_object_get(c, "no_pad")))
        json_is_boolean(v) ? (void)(q.no_pad = json_is_true(v)) : (void)(bad = "no_pad");
    /* ranking candidates generates nothing unless max_tokens says so (as medmoe-run) */
    if (q.candidates)
        q.max_tokens = 0;
    if ((v = json_object_get(c, "max_tokens"))) {
        if (json_is_integer(v) && json_integer_value(v) >= 0 && json_integer_value(v) <= 100000)
            q.max_tokens = (int)json_integer_value(v);
        else
            bad = "max_tokens";
    }
    if ((v = json_object_get(c, "temperature")))
        json_is_number(v) ? (void)(q.temperature = (float)json_number_value(v))
                          : (void)(bad = "temperature");
    if ((v = json_object_get(c, "top_p")))
        json_is_number(v) ? (void)(q.top_p = (float)json_number_value(v)) : (void)(bad = "top_p");
    if ((v = json_object_get(c, "seed")))
        json_is_integer(v) ? (void)(q.seed = (uint64_t)json_integer_value(v))
                           : (void)(bad = "seed");
    if (bad) {
        snprintf(msg, sizeof msg, "case line %zu: field '%s' has the wrong type or range", lineno,
                 bad);
        s_emit_error(r, id, "INVALID_ARGUMENT", msg);
        json_decref(c);
        return;
    }
    if (!q.question) {
        snprintf(msg, sizeof msg, "case line %zu: field 'question' missing", lineno);
        s_emit_error(r, id, "INVALID_ARGUMENT", msg);
        json_decref(c);
        return;
    }
    char cid[64];
    if (json_is_integer(id))
        snprintf(cid, sizeof cid, "%lld", (long long)json_integer_value(id));
    q.client_case_id = json_is_string(id)    ? json_string_value(id)
                       : json_is_integer(id) ? cid
                                             : NULL;
    const char *log_id = q.client_case_id;

    char err[1024] = "";
    uint8_t *image = NULL;
    size_t image_len = 0;
    int rc = MM_OK;
    if (image_path &&
        (rc = mm_image_read_file(image_path, &image, &image_len, err, sizeof err)) != MM_OK)
        goto failed;
    q.tenant = S_LOCAL_TENANT;
    q.image_bytes = image;
    q.image_len = image_len;
    q.keep_logits = dump_logits != NULL;
    q.on_token = s_local_token;
    q.on_done = s_local_done;
    q.user = &r->local;
    s_local *l = &r->local;
    l->done = 0;
    l->t_last_token = 0;
    l->t_submit = mm_now_ms();
    uint64_t sid = 0;
    if ((rc = mm_sched_submit(r->sched, &q, &sid, err, sizeof err)) != MM_OK)
        goto failed;
    free(image); /* the scheduler has its copy */
    image = NULL;
    s_local_wait(r, sid);
    rc = l->status;
    if (rc != MM_OK) {
        snprintf(err, sizeof err, "%s", l->message);
        goto failed;
    }
    if (dump_logits &&
        (rc = mm_case_result_dump_logits(&l->res, dump_logits, err, sizeof err)) != MM_OK)
        goto failed;
    json_t *out = mm_case_result_json(&l->res);
    json_t *o = json_pack("{s:O,s:s}", "id", id ? id : json_null(), "status", "ok");
    if (!out || !o) {
        json_decref(out);
        json_decref(o);
        rc = mm_errorf(err, sizeof err, MM_ENOMEM, "out of memory writing the answer");
        goto failed;
    }
    json_object_update(o, out);
    s_emit(o);
    mm_metric_add(r->cm.cases, 1, S_LOCAL_TENANT, "OK");
    json_decref(o);
    json_decref(out);
    mm_case_result_clear(&l->res);
    json_decref(c);
    return;
failed:
    free(image);
    mm_case_result_clear(&r->local.res);
    mm_logf(r->log, MM_LOG_WARN, log_id, "case %s failed: %s: %s", log_id ? log_id : "(no id)",
            mm_status_str(rc), err);
    s_emit_error(r, id, s_code(rc), err);
    json_decref(c);
}

/* Read what is available (the fd polled readable). 0 ok, -1 error/EOF. */
static int s_lines_fill(s_lines *l) {
    if (l->cap - l->len < 65536) {
        size_t cap = l->cap ? 2 * l->cap : 131072;
        char *nb = realloc(l->buf, cap);
        if (!nb)
            return -1;
        l->buf = nb;
        l->cap = cap;
    }
    ssize_t n = read(l->fd, l->buf + l->len, l->cap - l->len - 1);
    if (n < 0 && errno == EINTR)
        return 0;
    if (n <= 0)
        return -1;
    l->len += (size_t)n;
    return 0;
}

/* Next complete line (NUL-terminated in place) or NULL; at EOF the last
 * unterminated line counts. *consumed: bytes to drop after use. */
static char *s_lines_next(s_lines *l, int eof, size_t *consumed) {
    char *nl = l->len ? memchr(l->buf, '\n', l->len) : NULL;
    if (nl) {
        *nl = 0;
        *consumed = (size_t)(nl - l->buf) + 1;
    } else if (eof && l->len) {
        l->buf[l->len] = 0;
        *consumed = l->len;
    } else {
        return NULL;
    }
    l->lineno++;
    return l->buf;
}

static void s_lines_drop(s_lines *l, size_t n) {
    memmove(l->buf, l->buf + n, l->len - n);
    l->len -= n;
}

/* The cases one after another, as their lines come. */
static int s_run_cases(mm_router *r) {
    s_lines *l = &r->lines;
    int eof = 0, rc = MM_OK;
    size_t n_cases = 0;
    while (!s_stopped(r)) {
        size_t used;
        char *line = s_lines_next(l, eof, &used);
        if (line) {
            if (strspn(line, " \t\r") != strlen(line)) {
                s_case(r, line, l->lineno);
                n_cases++;
            }
            s_lines_drop(l, used);
            continue;
        }
        if (eof)
            break;
        int ready = 0;
        if ((rc = mm_dispatch_service(r->d, r->o.heartbeat_ms, l->fd, &ready)) != MM_OK)
            break;
        if (ready && s_lines_fill(l) != 0)
            eof = 1;
    }
    mm_logf(r->log, MM_LOG_INFO, NULL, "%zu case(s) done", n_cases);
    return rc;
}

/* ---- the gRPC front door's loop ------------------------------------------------ */

/* This thread is the completion-queue thread: it never computes, so a wait
 * here is short (the engine thread runs the steps). --wait-experts does not
 * hold it: health says NOT_SERVING until every expert has a replica; the
 * loop only reports when that happened or the wait ran out. */
static int s_run_grpc(mm_router *r) {
    double wait_until = mm_now_ms() + r->o.wait_experts_ms;
    int reported = 0, rc = MM_OK;
    mm_logf(r->log, MM_LOG_INFO, NULL, "serving gRPC until SIGTERM");
    while (!s_stopped(r)) {
        s_gauges(r);
        mm_grpc_server_poll(r->grpc, 100);
        if ((rc = mm_dispatch_service(r->d, 0, -1, NULL)) != MM_OK) {
            mm_logf(r->log, MM_LOG_ERROR, NULL, "the expert socket failed: stopping");
            break;
        }
        if (!reported && s_all_live(r)) {
            mm_logf(r->log, MM_LOG_INFO, NULL, "every expert has a live replica");
            reported = 1;
        } else if (!reported && r->o.wait_experts_ms > 0 && mm_now_ms() >= wait_until) {
            s_report_missing(r);
            reported = 1;
        }
    }
    return rc;
}

/* ---- new / run / destroy -------------------------------------------------------- */

/* The front door's resource limits given on the command line (0: default). */
static void s_grpc_limits(const mm_router_options *o, mm_grpc_options *go) {
    if (o->grpc_max_streams)
        go->max_streams = o->grpc_max_streams;
    if (o->grpc_idle_ms)
        go->idle_ms = o->grpc_idle_ms;
    if (o->grpc_max_age_ms)
        go->max_age_ms = o->grpc_max_age_ms;
    if (o->grpc_write_timeout_ms)
        go->write_timeout_ms = o->grpc_write_timeout_ms < 0 ? 0 : o->grpc_write_timeout_ms;
}

/* The options and every file they name but the model: tenants, audit log,
 * TLS certificates, CURVE keys. */
static int s_check_config(mm_router *r, char *err, size_t errlen) {
    const mm_router_options *o = &r->o;
    int rc;
    if (!o->model || !o->bind)
        return mm_errorf(err, errlen, MM_EINVAL, "model and experts-bind are required");
    if (o->grpc_listen && o->cases)
        return mm_errorf(err, errlen, MM_EINVAL, "--grpc-listen and --cases do not go together");
    if (o->grpc_listen && !o->tenants)
        return mm_errorf(err, errlen, MM_EINVAL, "--grpc-listen needs --tenants FILE");
    if (o->slots < 1 || o->image_workers < 0 || o->context < 0)
        return mm_errorf(err, errlen, MM_EINVAL, "slots %d / image workers %d out of range",
                         o->slots, o->image_workers);
    if (o->grpc_listen) {
        if ((rc = mm_tenants_load(o->tenants, &r->tenants, err, errlen)) != MM_OK)
            return rc == MM_ENOMEM ? rc : MM_EINVAL;
        mm_grpc_options go;
        mm_grpc_options_default(&go);
        go.listen = o->grpc_listen;
        go.tls_cert = o->tls_cert;
        go.tls_key = o->tls_key;
        go.tls_client_ca = o->tls_client_ca;
        go.max_message = o->grpc_max_message;
        s_grpc_limits(o, &go);
        if ((rc = mm_grpc_check_options(&go, err, errlen)) != MM_OK)
            return rc;
        if (o->audit_log &&
            (rc = mm_audit_open(o->audit_log, o->audit_fsync, &r->audit, err, errlen)) != MM_OK)
            return rc == MM_ENOMEM ? rc : MM_EINVAL;
        if (r->audit && (rc = mm_audit_set_salt(r->audit, o->audit_salt, err, errlen)) != MM_OK)
            return MM_EINVAL;
    }
    if (!o->curve_secret == !o->insecure_experts)
        return mm_errorf(err, errlen, MM_EINVAL,
                         o->curve_secret
                             ? "--insecure-experts and a CurveZMQ key do not go together"
                             : "the expert socket needs CurveZMQ keys (--curve-secret-key, "
                               "--curve-allow) or --insecure-experts");
    if (o->curve_secret) {
        size_t n = 0;
        char secret[1][41];
        if ((rc = mm_wire_read_keys(o->curve_secret, secret, 1, &n, err, errlen)) != MM_OK)
            return MM_EINVAL;
        memcpy(r->secret, secret[0], sizeof r->secret);
        char pub[41];
        if (zmq_curve_public(pub, r->secret) != 0)
            return mm_errorf(err, errlen, MM_EINVAL, "%s: not a CURVE secret key", o->curve_secret);
        r->allow = calloc(S_MAX_ALLOW, sizeof *r->allow);
        r->allow_ptr = calloc(S_MAX_ALLOW, sizeof *r->allow_ptr);
        if (!r->allow || !r->allow_ptr)
            return mm_errorf(err, errlen, MM_ENOMEM, "out of memory");
        for (size_t i = 0; i < o->n_curve_allow; i++)
            if ((rc = mm_wire_read_keys(o->curve_allow[i], r->allow, S_MAX_ALLOW, &r->n_allow, err,
                                        errlen)) != MM_OK)
                return MM_EINVAL;
        for (size_t i = 0; i < r->n_allow; i++)
            r->allow_ptr[i] = r->allow[i];
        mm_logf(r->log, MM_LOG_INFO, NULL, "CURVE on: public key %s, %zu allowed expert key(s)",
                pub, r->n_allow);
    }
    if (o->cases) {
        r->lines.fd = strcmp(o->cases, "-") ? open(o->cases, O_RDONLY | O_CLOEXEC) : 0;
        if (r->lines.fd < 0)
            return mm_errorf(err, errlen, MM_EINVAL, "%s: %s", o->cases, strerror(errno));
    }
    return MM_OK;
}

/* The metrics endpoint comes up before the model: /healthz answers while it
 * loads, and the families exist (at 0) before the first case. */
static int s_start_metrics(mm_router *r, char *err, size_t errlen) {
    int rc;
    if (!r->o.metrics_listen)
        return MM_OK;
    if ((rc = mm_metrics_new(&r->reg)) != MM_OK)
        return mm_errorf(err, errlen, rc, "metrics registry: out of memory");
    if ((rc = mm_router_case_metrics_init(r->reg, &r->cm)) != MM_OK)
        return mm_errorf(err, errlen, rc, "metrics: %s", mm_metrics_error(r->reg));
    if ((rc = mm_metrics_serve(r->reg, r->o.metrics_listen, &r->msrv, err, errlen)) != MM_OK)
        return rc;
    if (r->o.metrics_port_file &&
        (rc = mm_metrics_server_write_port(r->msrv, r->o.metrics_port_file, err, errlen)) != MM_OK)
        return rc;
    mm_logf(r->log, MM_LOG_INFO, NULL, "metrics on http://%s/metrics (port %d)",
            r->o.metrics_listen, mm_metrics_server_port(r->msrv));
    return MM_OK;
}

static int s_load_model(mm_router *r, char *err, size_t errlen) {
    const mm_router_options *o = &r->o;
    int rc;
    double t0 = mm_now_ms();
    if ((rc = mm_backend_new(o->backend, &r->be, err, errlen)) != MM_OK)
        return rc;
    mm_model_options mo;
    mm_model_options_default(&mo);
    mo.vision_dir = o->vision;
    mo.load_trunk = 1;
    mo.experts_mask = 0; /* the routed experts live on the expert nodes */
    if (o->grpc_listen)
        mo.n_slots = o->slots; /* one KV-cache slot per case in flight */
    mo.max_ctx = o->context;
    mo.weights = (mm_weights)o->weights;
    if ((rc = mm_model_load(o->model, r->be, &mo, &r->m, err, errlen)) != MM_OK)
        return rc;
    if (o->context > mm_model_config(r->m)->max_position_embeddings)
        return mm_errorf(err, errlen, MM_EINVAL,
                         "--context %d is over the model's max_position_embeddings (%d)",
                         o->context, mm_model_config(r->m)->max_position_embeddings);
    if ((rc = mm_tokenizer_load(o->model, &r->tok, err, errlen)) != MM_OK)
        return rc;
    const mm_config *cfg = mm_model_config(r->m);
    for (int i = 0; i < cfg->n_moe_layers; i++)
        r->n_experts = cfg->num_experts[i] > r->n_experts ? cfg->num_experts[i] : r->n_experts;
    if (r->n_experts < 1)
        return mm_errorf(err, errlen, MM_EINVAL, "%s: the model has no MoE layer", o->model);
    double t_fp = mm_now_ms();
    r->fps = calloc((size_t)r->n_experts, sizeof *r->fps);
    if (!r->fps)
        return mm_errorf(err, errlen, MM_ENOMEM, "out of memory");
    char cfg_path[4096];
    snprintf(cfg_path, sizeof cfg_path, "%s/config.json", o->model);
    for (int e = 0; e < r->n_experts; e++)
        if ((rc = mm_fingerprint_expert(cfg_path, mm_model_checkpoint(r->m), cfg, e,
                                        o->fp_flags | MM_FINGERPRINT_WEIGHTS(o->weights), r->fps[e],
                                        err, errlen)) != MM_OK)
            return rc;
    if ((rc = mm_fingerprint_model(cfg_path, mm_model_checkpoint(r->m), o->fp_flags,
                                   (const char(*)[MM_FINGERPRINT_HEX])r->fps, r->n_experts,
                                   r->model_fp, err, errlen)) != MM_OK)
        return rc;
    mm_logf(r->log, MM_LOG_INFO, NULL,
            "model %s loaded in %.0f ms (%s, backend %s); model fingerprint %.16s..., %d expert "
            "fingerprints (%s) in %.0f ms",
            o->model, t_fp - t0, mm_model_variant(r->m), mm_backend_describe(r->be), r->model_fp,
            r->n_experts, o->fp_flags ? "headers" : "full", mm_now_ms() - t_fp);
    return MM_OK;
}

/* The scheduler's options: its rows per forward step also bound the rows of
 * one expert batch (a step's rows split over the experts), hence the expert
 * socket's ZMQ_MAXMSGSIZE. */
static void s_sched_options(const mm_router *r, mm_sched_options *so) {
    mm_sched_options_default(so);
    size_t slots = (size_t)mm_model_n_slots(r->m);
    if (so->max_step_rows < slots)
        so->max_step_rows = slots;
    so->image_workers = r->o.image_workers;
    if (r->o.pixel_budget)
        so->pixel_budget = r->o.pixel_budget;
    so->debug_vision_delay_ms = r->o.debug_vision_delay_ms;
    so->jpeg_downscale = r->o.jpeg_downscale;
}

static int s_start_dispatch(mm_router *r, char *err, size_t errlen) {
    const mm_router_options *o = &r->o;
    int rc;
    mm_sched_options so;
    s_sched_options(r, &so);
    mm_dispatch_options dopt;
    mm_dispatch_options_default(&dopt);
    dopt.max_rows = so.max_step_rows;
    dopt.insecure = o->insecure_experts;
    if (o->insecure_warn_ms > 0)
        dopt.insecure_warn_ms = o->insecure_warn_ms;
    dopt.bind = o->bind;
    dopt.heartbeat_ms = o->heartbeat_ms;
    dopt.expert_wait_ms = o->expert_wait_ms;
    dopt.batch_timeout_ms = o->batch_timeout_ms;
    dopt.n_experts = r->n_experts;
    dopt.hidden = mm_model_config(r->m)->hidden_size;
    dopt.cfg = mm_model_config(r->m);
    dopt.fingerprints = (const char(*)[MM_FINGERPRINT_HEX])r->fps;
    dopt.stop = o->stop;
    dopt.log = r->log;
    dopt.metrics = r->reg;
    if (o->curve_secret) {
        dopt.curve_secret = r->secret;
        dopt.curve_allow = r->allow_ptr;
        dopt.n_allow = r->n_allow;
    }
    if ((rc = mm_dispatch_new(&dopt, &r->d, err, errlen)) != MM_OK)
        return rc;
    mm_logf(r->log, MM_LOG_INFO, NULL, "experts connect to %s", mm_dispatch_endpoint(r->d));
    if (o->endpoint_file) {
        char text[300];
        snprintf(text, sizeof text, "%s\n", mm_dispatch_endpoint(r->d));
        if (s_write_atomic(o->endpoint_file, text) != 0)
            return mm_errorf(err, errlen, MM_EIO, "%s: %s", o->endpoint_file, strerror(errno));
    }
    mm_expert_runner runner;
    mm_dispatch_runner(r->d, &runner);
    mm_model_set_expert_runner(r->m, &runner);
    return MM_OK;
}

static int s_start_engine(mm_router *r, char *err, size_t errlen) {
    int rc;
    mm_sched_options so;
    s_sched_options(r, &so);
    if ((rc = mm_sched_new(r->m, r->tok, &so, &r->sched, err, errlen)) != MM_OK)
        return rc;
    if ((rc = mm_sched_start(r->sched, err, errlen)) != MM_OK)
        return rc;
    if (so.debug_vision_delay_ms > 0)
        mm_logf(r->log, MM_LOG_WARN, NULL, "debug: every vision encode sleeps %.0f ms",
                so.debug_vision_delay_ms);
    return MM_OK;
}

static int s_start_grpc(mm_router *r, char *err, size_t errlen) {
    const mm_router_options *o = &r->o;
    int rc;
    mm_grpc_options go;
    mm_grpc_options_default(&go);
    go.listen = o->grpc_listen;
    go.tls_cert = o->tls_cert;
    go.tls_key = o->tls_key;
    go.tls_client_ca = o->tls_client_ca;
    go.max_image_bytes = o->max_image_bytes;
    go.max_question_bytes = o->max_question_bytes;
    go.max_tokens_default = o->max_tokens_default;
    go.max_tokens_limit = o->max_tokens_limit;
    go.max_message = o->grpc_max_message;
    s_grpc_limits(o, &go);
    go.sched = r->sched;
    go.tenants = r->tenants;
    go.audit = r->audit;
    go.model = r->m;
    go.version = o->version;
    go.n_experts = r->n_experts;
    go.model_fingerprint = r->model_fp;
    go.expert_fingerprints = (const char(*)[MM_FINGERPRINT_HEX])r->fps;
    go.eos_token = mm_tokenizer_eos_id(r->tok);
    go.live_replicas = s_live;
    go.live_ctx = r->d;
    go.log = r->log;
    go.metrics = r->reg;
    if ((rc = mm_grpc_server_new(&go, &r->grpc, err, errlen)) != MM_OK)
        return rc;
    int port = mm_grpc_server_port(r->grpc);
    mm_logf(r->log, MM_LOG_INFO, NULL,
            "gRPC on %s (port %d, %s), %zu tenant(s), %d slot(s) of %d positions, %d image "
            "worker(s), audit log %s",
            o->grpc_listen, port,
            o->tls_client_ca ? "mTLS"
            : o->tls_cert    ? "TLS"
                             : "plaintext",
            mm_tenants_count(r->tenants), mm_model_n_slots(r->m), mm_model_max_ctx(r->m),
            o->image_workers, o->audit_log ? o->audit_log : "off");
    if (o->grpc_port_file) {
        char text[32];
        snprintf(text, sizeof text, "%d\n", port);
        if (s_write_atomic(o->grpc_port_file, text) != 0)
            return mm_errorf(err, errlen, MM_EIO, "%s: %s", o->grpc_port_file, strerror(errno));
    }
    return MM_OK;
}

static int s_local_init(s_local *l, const mm_router_case_metrics *cm) {
    pthread_condattr_t ca;
    if (pthread_condattr_init(&ca) != 0)
        return MM_ENOMEM;
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    int ok = pthread_cond_init(&l->cv, &ca) == 0;
    pthread_condattr_destroy(&ca);
    if (!ok)
        return MM_ENOMEM;
    pthread_mutex_init(&l->mu, NULL);
    l->cm = cm;
    return MM_OK;
}

int mm_router_new(const mm_router_options *o, mm_router **out, char *err, size_t errlen) {
    *out = NULL;
    mm_router *r = calloc(1, sizeof *r);
    if (!r)
        return mm_errorf(err, errlen, MM_ENOMEM, "out of memory");
    r->o = *o;
    r->lines.fd = -1;
    r->shown_pending = r->shown_active = (size_t)-1;
    /* a NULL logger (out of memory) still logs, as text to stderr */
    mm_log_new("medmoe-router", stderr, o->log_format, o->log_level, &r->log);
    int rc;
    if ((rc = s_check_config(r, err, errlen)) != MM_OK ||
        (rc = s_start_metrics(r, err, errlen)) != MM_OK)
        goto fail;
    if ((rc = s_local_init(&r->local, &r->cm)) != MM_OK) {
        mm_errorf(err, errlen, rc, "out of memory");
        goto fail;
    }
    r->local_init = 1;
    if ((rc = s_load_model(r, err, errlen)) != MM_OK ||
        (rc = s_start_dispatch(r, err, errlen)) != MM_OK ||
        (rc = s_start_engine(r, err, errlen)) != MM_OK)
        goto fail;
    if (o->grpc_listen && (rc = s_start_grpc(r, err, errlen)) != MM_OK)
        goto fail;
    *out = r;
    return MM_OK;
fail:
    mm_logf(r->log, MM_LOG_ERROR, NULL, "%s: %s", mm_status_str(rc), err);
    mm_router_destroy(&r);
    return rc;
}

int mm_router_run(mm_router *r) {
    if (r->grpc)
        return s_run_grpc(r);
    int rc = MM_OK;
    if (r->o.wait_experts_ms > 0 && !s_stopped(r)) {
        if (mm_dispatch_wait_experts(r->d, r->o.wait_experts_ms))
            mm_logf(r->log, MM_LOG_INFO, NULL, "every expert has a live replica");
        else
            s_report_missing(r);
    }
    if (r->o.cases)
        rc = s_run_cases(r);
    if (rc == MM_OK && (!r->o.cases || r->o.serve)) {
        mm_logf(r->log, MM_LOG_INFO, NULL, "serving until SIGTERM");
        while (!s_stopped(r) &&
               (rc = mm_dispatch_service(r->d, r->o.heartbeat_ms, -1, NULL)) == MM_OK) {
        }
    }
    return rc;
}

/* The stats file and the dispatch summary line. */
static void s_report_dispatch(mm_router *r) {
    if (r->o.stats_file) {
        json_t *st = mm_dispatch_stats(r->d);
        char *s = st ? json_dumps(st, JSON_INDENT(1)) : NULL;
        if (!s || s_write_atomic(r->o.stats_file, s) != 0)
            mm_logf(r->log, MM_LOG_ERROR, NULL, "cannot write %s", r->o.stats_file);
        free(s);
        json_decref(st);
    }
    json_t *st = mm_dispatch_stats(r->d);
    json_t *t = json_object_get(st, "dispatch");
    mm_logf(r->log, MM_LOG_INFO, NULL,
            "dispatched %lld MoE layer(s), %lld batch(es): round trip "
            "mean %.0f us (min %.0f, max %.0f), expert compute mean %.0f us, layer wait "
            "mean %.0f us; %lld message(s) dropped, %lld batch(es) re-sent",
            (long long)json_integer_value(json_object_get(t, "moe_layers")),
            (long long)json_integer_value(json_object_get(t, "batches")),
            json_real_value(json_object_get(t, "batch_rtt_us_mean")),
            json_real_value(json_object_get(t, "batch_rtt_us_min")),
            json_real_value(json_object_get(t, "batch_rtt_us_max")),
            json_real_value(json_object_get(t, "expert_compute_us_mean")),
            json_real_value(json_object_get(t, "layer_wait_us_mean")),
            (long long)json_integer_value(json_object_get(st, "dropped_messages")),
            (long long)json_integer_value(json_object_get(st, "resent_batches")));
    json_decref(st);
}

void mm_router_destroy(mm_router **rp) {
    if (!rp || !*rp)
        return;
    mm_router *r = *rp;
    if (s_stopped(r))
        mm_logf(r->log, MM_LOG_INFO, NULL, "signal received, shutting down");
    if (r->d)
        s_report_dispatch(r);
    /* order matters: stop accepting, end the cases (their calls get
     * UNAVAILABLE "shutting down"; the engine thread stops), send those
     * statuses, then the rest */
    mm_grpc_server_shutdown(r->grpc);
    mm_sched_destroy(&r->sched);
    mm_grpc_server_destroy(&r->grpc);
    mm_audit_close(&r->audit);
    mm_tenants_destroy(&r->tenants);
    if (r->m)
        mm_model_set_expert_runner(r->m, NULL);
    mm_dispatch_destroy(&r->d);
    if (r->lines.fd > 0)
        close(r->lines.fd);
    free(r->lines.buf);
    if (r->local_init) {
        mm_case_result_clear(&r->local.res);
        pthread_cond_destroy(&r->local.cv);
        pthread_mutex_destroy(&r->local.mu);
    }
    free(r->fps);
    free(r->allow);
    free(r->allow_ptr);
    mm_tokenizer_destroy(&r->tok);
    mm_model_destroy(&r->m);
    mm_backend_destroy(&r->be);
    /* last: the dispatcher and the front door update families of reg until
     * they are gone; the server renders reg, so it stops first */
    mm_metrics_server_stop(&r->msrv);
    mm_metrics_destroy(&r->reg);
    mm_log_destroy(&r->log);
    free(r);
    *rp = NULL;
}
