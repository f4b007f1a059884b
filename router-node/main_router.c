/* medmoe-router — the trunk of Med-MoE (vision, attention, gates, meta
 * expert, LM head) in this process, the routed experts on medmoe-expert
 * nodes over ZeroMQ. Cases come over gRPC (--grpc-listen: medmoe.v1, many
 * at once, batched continuously by the scheduler), or as JSON lines from a
 * file or stdin (--cases, one at a time) with answers on stdout.
 *
 * With --grpc-listen one thread runs one loop: gRPC completion-queue events,
 * a scheduler step when there is work, and the expert socket's service.
 *
 * Observability (issue 6): every event is one line through common/log.h
 * (--log-format text|json, --log-level) on stderr; --metrics-listen serves
 * Prometheus /metrics (common/metrics.h, its own thread): cases, TTFT and
 * token latency, queue depth here and in grpc_server.c, per-expert routing,
 * replicas and batch latency in dispatch.c.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "args.h"
#include "audit.h"
#include "case.h"
#include "dispatch.h"
#include "fingerprint.h"
#include "generate.h"
#include "grpc_server.h"
#include "log.h"
#include "medmoe.h"
#include "metrics.h"
#include "router_metrics.h"
#include "scheduler.h"
#include "tenants.h"
#include "tokenizer.h"
#include "wire.h"

#define MAX_ALLOW 256 /* allowed expert keys */
#ifndef MM_VERSION
#define MM_VERSION "0.0.0"
#endif

static volatile sig_atomic_t g_stop; /* set by SIGTERM/SIGINT; main's loops check it */

static void on_signal(int sig) {
    (void)sig;
    g_stop = 1;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: medmoe-router --model DIR --vision DIR --experts-bind ENDPOINT [options]\n"
            "\n"
            "Serve Med-MoE with its routed experts on medmoe-expert nodes (ZeroMQ).\n"
            "\n"
            "  --model DIR             checkpoint dir (config.json, *.safetensors, tokenizer)\n"
            "  --vision DIR            CLIP vision tower dir\n"
            "  --experts-bind EP       ROUTER endpoint experts connect to; tcp://127.0.0.1:*\n"
            "                          picks a free port\n"
            "  --endpoint-file F       write the bound endpoint to F (atomically)\n"
            "  --cases FILE|-          JSON lines {id, image, question, max_tokens, candidates,\n"
            "                          no_pad, temperature, top_p, seed, conv_mode,\n"
            "                          dump_logits}; one JSON answer line each on stdout. Without\n"
            "                          --cases the router serves until SIGTERM\n"
            "  --serve                 keep serving after the cases end, until SIGTERM\n"
            "  --wait-experts MS       before the first case, wait up to MS for every expert\n"
            "                          to have a live replica (default 0)\n"
            "  --expert-wait-ms MS     how long a step waits for a replica of a needed expert\n"
            "                          before the case fails UNAVAILABLE (default 5000)\n"
            "  --batch-timeout-ms MS   a replica that leaves a batch unanswered this long is\n"
            "                          removed and the batch re-sent (default 60000)\n"
            "  --heartbeat-ms MS       heartbeat interval; 3 missed = dead (default 1000)\n"
            "  --fingerprint full|headers  how expert fingerprints are computed: all tensor\n"
            "                          bytes (default) or names/dtypes/shapes; experts must\n"
            "                          use the same\n"
            "  --backend cpu|vulkan    compute backend (default cpu)\n"
            "  --curve-secret-key F    CurveZMQ: this router's secret key (medmoe-keygen)\n"
            "  --curve-allow F         public keys of allowed experts (repeatable; one per line)\n"
            "  --stats-file F          on exit, write replica statistics as JSON\n"
            "  --metrics-listen ADDR   serve Prometheus /metrics and /healthz on ADDR\n"
            "                          (HOST:PORT, e.g. 0.0.0.0:9090; port 0 picks one)\n"
            "  --metrics-port-file F   write the bound metrics port to F (atomically)\n"
            "  --log-format text|json  log line format on stderr (default text)\n"
            "  --log-level L           debug|info|warn|error (default info)\n"
            "\n"
            "gRPC front door (medmoe.v1.CaseService + grpc.health.v1):\n"
            "  --grpc-listen HOST:PORT serve gRPC (127.0.0.1:0 = ephemeral port); serves\n"
            "                          until SIGTERM (not with --cases)\n"
            "  --grpc-port-file F      write the bound port there (atomically) once listening\n"
            "  --tenants FILE          tenant config, JSON (required with --grpc-listen)\n"
            "  --audit-log FILE        append one JSON line per case (default: none)\n"
            "  --audit-fsync           fsync the audit log after every record\n"
            "  --tls-cert F --tls-key F  serve TLS (PEM)\n"
            "  --tls-client-ca F       also require client certificates signed by F (mTLS)\n"
            "  --slots N               concurrent sequences in the scheduler (default 8)\n"
            "  --max-image-bytes N     image.data at most (default 20971520)\n"
            "  --max-question-bytes N  question at most (default 4096)\n"
            "  --max-tokens-default N  max_tokens when a request gives 0 (default 64)\n"
            "  --max-tokens-limit N    max_tokens a request may ask (default 512)\n"
            "  --grpc-max-message N    gRPC receive limit, bytes (default 33554432)\n"
            "  -h, --help              this text\n");
}

typedef struct router_args {
    const char *model, *vision, *bind, *endpoint_file, *cases, *backend, *curve_secret;
    const char *stats_file;
    const char *allow_files[MAX_ALLOW];
    size_t n_allow_files;
    int wait_experts, expert_wait_ms, batch_timeout_ms, heartbeat_ms, serve;
    unsigned fp_flags;
    /* gRPC front door */
    const char *grpc_listen, *grpc_port_file, *tenants, *audit_log;
    const char *tls_cert, *tls_key, *tls_client_ca;
    int audit_fsync, slots, max_image_bytes, max_question_bytes, max_tokens_default;
    int max_tokens_limit, grpc_max_message;
    /* observability */
    const char *metrics_listen, *metrics_port_file;
    mm_log_format log_format;
    mm_log_level log_level;
} router_args;

enum {
    O_GRPC_LISTEN = 256,
    O_GRPC_PORT_FILE,
    O_TENANTS,
    O_AUDIT_LOG,
    O_AUDIT_FSYNC,
    O_TLS_CERT,
    O_TLS_KEY,
    O_TLS_CLIENT_CA,
    O_SLOTS,
    O_MAX_IMAGE,
    O_MAX_QUESTION,
    O_MAX_TOKENS_DEFAULT,
    O_MAX_TOKENS_LIMIT,
    O_GRPC_MAX_MESSAGE,
    O_METRICS_LISTEN,
    O_METRICS_PORT_FILE,
    O_LOG_FORMAT,
    O_LOG_LEVEL
};

static int parse_args(int argc, char **argv, router_args *a) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},
        {"vision", required_argument, 0, 'v'},
        {"experts-bind", required_argument, 0, 'b'},
        {"endpoint-file", required_argument, 0, 'E'},
        {"cases", required_argument, 0, 'c'},
        {"serve", no_argument, 0, 'S'},
        {"wait-experts", required_argument, 0, 'w'},
        {"expert-wait-ms", required_argument, 0, 'W'},
        {"batch-timeout-ms", required_argument, 0, 'T'},
        {"heartbeat-ms", required_argument, 0, 'H'},
        {"fingerprint", required_argument, 0, 'F'},
        {"backend", required_argument, 0, 'B'},
        {"curve-secret-key", required_argument, 0, 'k'},
        {"curve-allow", required_argument, 0, 'a'},
        {"stats-file", required_argument, 0, 's'},
        {"grpc-listen", required_argument, 0, O_GRPC_LISTEN},
        {"grpc-port-file", required_argument, 0, O_GRPC_PORT_FILE},
        {"tenants", required_argument, 0, O_TENANTS},
        {"audit-log", required_argument, 0, O_AUDIT_LOG},
        {"audit-fsync", no_argument, 0, O_AUDIT_FSYNC},
        {"tls-cert", required_argument, 0, O_TLS_CERT},
        {"tls-key", required_argument, 0, O_TLS_KEY},
        {"tls-client-ca", required_argument, 0, O_TLS_CLIENT_CA},
        {"slots", required_argument, 0, O_SLOTS},
        {"max-image-bytes", required_argument, 0, O_MAX_IMAGE},
        {"max-question-bytes", required_argument, 0, O_MAX_QUESTION},
        {"max-tokens-default", required_argument, 0, O_MAX_TOKENS_DEFAULT},
        {"max-tokens-limit", required_argument, 0, O_MAX_TOKENS_LIMIT},
        {"grpc-max-message", required_argument, 0, O_GRPC_MAX_MESSAGE},
        {"metrics-listen", required_argument, 0, O_METRICS_LISTEN},
        {"metrics-port-file", required_argument, 0, O_METRICS_PORT_FILE},
        {"log-format", required_argument, 0, O_LOG_FORMAT},
        {"log-level", required_argument, 0, O_LOG_LEVEL},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    memset(a, 0, sizeof *a);
    a->backend = "cpu";
    a->expert_wait_ms = 5000;
    a->batch_timeout_ms = 60000;
    a->heartbeat_ms = 1000;
    a->slots = 8;
    a->max_image_bytes = 20 << 20;
    a->max_question_bytes = 4096;
    a->max_tokens_default = 64;
    a->max_tokens_limit = 512;
    a->grpc_max_message = 32 << 20;
    a->log_format = MM_LOG_TEXT;
    a->log_level = MM_LOG_INFO;
    int o, rc = 0;
    while (rc == 0 && (o = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (o) {
        case 'm': a->model = optarg; break;
        case 'v': a->vision = optarg; break;
        case 'b': a->bind = optarg; break;
        case 'E': a->endpoint_file = optarg; break;
        case 'c': a->cases = optarg; break;
        case 'S': a->serve = 1; break;
        case 'w':
            rc = mm_arg_int("medmoe-router", "--wait-experts", optarg, 0, &a->wait_experts);
            break;
        case 'W':
            rc = mm_arg_int("medmoe-router", "--expert-wait-ms", optarg, 0, &a->expert_wait_ms);
            break;
        case 'T':
            rc = mm_arg_int("medmoe-router", "--batch-timeout-ms", optarg, 1, &a->batch_timeout_ms);
            break;
        case 'H':
            rc = mm_arg_int("medmoe-router", "--heartbeat-ms", optarg, 1, &a->heartbeat_ms);
            break;
        case 'F':
            if (mm_fingerprint_mode_parse(optarg, &a->fp_flags) != MM_OK) {
                fprintf(stderr, "medmoe-router: --fingerprint wants full or headers\n");
                rc = 2;
            }
            break;
        case 'B': a->backend = optarg; break;
        case 'k': a->curve_secret = optarg; break;
        case 'a':
            if (a->n_allow_files == MAX_ALLOW) {
                fprintf(stderr, "medmoe-router: too many --curve-allow files\n");
                rc = 2;
            } else {
                a->allow_files[a->n_allow_files++] = optarg;
            }
            break;
        case 's': a->stats_file = optarg; break;
        case O_GRPC_LISTEN: a->grpc_listen = optarg; break;
        case O_GRPC_PORT_FILE: a->grpc_port_file = optarg; break;
        case O_TENANTS: a->tenants = optarg; break;
        case O_AUDIT_LOG: a->audit_log = optarg; break;
        case O_AUDIT_FSYNC: a->audit_fsync = 1; break;
        case O_TLS_CERT: a->tls_cert = optarg; break;
        case O_TLS_KEY: a->tls_key = optarg; break;
        case O_TLS_CLIENT_CA: a->tls_client_ca = optarg; break;
        case O_SLOTS: rc = mm_arg_int("medmoe-router", "--slots", optarg, 1, &a->slots); break;
        case O_MAX_IMAGE:
            rc = mm_arg_int("medmoe-router", "--max-image-bytes", optarg, 1, &a->max_image_bytes);
            break;
        case O_MAX_QUESTION:
            rc = mm_arg_int("medmoe-router", "--max-question-bytes", optarg, 1,
                            &a->max_question_bytes);
            break;
        case O_MAX_TOKENS_DEFAULT:
            rc = mm_arg_int("medmoe-router", "--max-tokens-default", optarg, 1,
                            &a->max_tokens_default);
            break;
        case O_MAX_TOKENS_LIMIT:
            rc = mm_arg_int("medmoe-router", "--max-tokens-limit", optarg, 1, &a->max_tokens_limit);
            break;
        case O_GRPC_MAX_MESSAGE:
            rc = mm_arg_int("medmoe-router", "--grpc-max-message", optarg, 1024,
                            &a->grpc_max_message);
            break;
        case O_METRICS_LISTEN: a->metrics_listen = optarg; break;
        case O_METRICS_PORT_FILE: a->metrics_port_file = optarg; break;
        case O_LOG_FORMAT: rc = mm_arg_log_format("medmoe-router", optarg, &a->log_format); break;
        case O_LOG_LEVEL: rc = mm_arg_log_level("medmoe-router", optarg, &a->log_level); break;
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); return 2;
        }
    }
    if (rc)
        return rc;
    if (optind < argc) {
        fprintf(stderr, "medmoe-router: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (!a->model || !a->bind) {
        fprintf(stderr, "medmoe-router: --model and --experts-bind are required (see --help)\n");
        return 2;
    }
    if (a->metrics_port_file && !a->metrics_listen) {
        fprintf(stderr, "medmoe-router: --metrics-port-file needs --metrics-listen\n");
        return 2;
    }
    if (!a->curve_secret != !a->n_allow_files) {
        fprintf(stderr, "medmoe-router: --curve-secret-key and --curve-allow go together\n");
        return 2;
    }
    if (a->grpc_listen) {
        const char *bad = !a->tenants ? "--grpc-listen needs --tenants FILE"
                          : a->cases  ? "--grpc-listen and --cases do not go together"
                          : !a->tls_cert != !a->tls_key ? "--tls-cert and --tls-key go together"
                          : a->tls_client_ca && !a->tls_cert ? "--tls-client-ca needs --tls-cert"
                          : a->max_tokens_default > a->max_tokens_limit
                              ? "--max-tokens-default is over --max-tokens-limit"
                              : NULL;
        if (bad) {
            fprintf(stderr, "medmoe-router: %s\n", bad);
            return 2;
        }
    } else if (a->tenants || a->grpc_port_file || a->audit_log || a->tls_cert || a->tls_key ||
               a->tls_client_ca) {
        fprintf(stderr, "medmoe-router: --tenants, --grpc-port-file, --audit-log and --tls-* "
                        "need --grpc-listen\n");
        return 2;
    }
    return 0;
}

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

/* ---- one case ------------------------------------------------------------ */

static const char *s_code(int rc) {
    switch (rc) {
    case MM_ETIMEOUT:
    case MM_EAGAIN: return "UNAVAILABLE";
    case MM_EINVAL: return "INVALID_ARGUMENT";
    case MM_ENOTFOUND: return "NOT_FOUND";
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

static void s_emit_error(json_t *id, const char *code, const char *msg) {
    json_t *o = json_pack("{s:O,s:s,s:s,s:s}", "id", id ? id : json_null(), "status", "error",
                          "code", code, "message", msg);
    if (o)
        s_emit(o);
    json_decref(o);
}

/* Parse and answer one JSON line; every failure becomes an error line. */
/* Cases from --cases count under this tenant label. */
#define S_LOCAL_TENANT "local"

/* Metrics of one --cases answer. The case runs as one call, so TTFT is its
 * wall time less the decode steps, and each token's latency is the case's
 * mean decode time per token. */
static void s_case_metrics(const mm_router_case_metrics *cm, double t0, const json_t *out) {
    size_t n = json_array_size(json_object_get(out, "tokens"));
    if (!n)
        return;
    double per = json_number_value(json_object_get(out, "decode_ms_per_token"));
    double total = mm_now_ms() - t0, ttft = total - per * (double)(n - 1);
    mm_metric_observe(cm->ttft, (ttft > 0 ? ttft : 0) / 1e3);
    for (size_t i = 1; i < n; i++)
        mm_metric_observe(cm->token_latency, per / 1e3);
}

static void s_case(mm_model *m, const mm_tokenizer *tok, const char *line, size_t lineno,
                   mm_log *lg, const mm_router_case_metrics *cm) {
    double t0 = mm_now_ms();
    json_error_t jerr;
    char msg[1200];
    json_t *c = json_loads(line, 0, &jerr);
    if (!c || !json_is_object(c)) {
        snprintf(msg, sizeof msg, "case line %zu: %s", lineno, c ? "not a JSON object" : jerr.text);
        s_emit_error(NULL, "INVALID_ARGUMENT", msg);
        mm_metric_add(cm->cases, 1, S_LOCAL_TENANT, "INVALID_ARGUMENT");
        json_decref(c);
        return;
    }
    json_t *id = json_object_get(c, "id");
    mm_case_request q;
    mm_case_request_default(&q);
    const char *bad = NULL;
    json_t *v;
    if (id && !json_is_string(id) && !json_is_integer(id))
        bad = "id";
    if ((v = json_object_get(c, "image")) && !json_is_null(v))
        json_is_string(v) ? (void)(q.image_path = json_string_value(v)) : (void)(bad = "image");
    if ((v = json_object_get(c, "question")))
        json_is_string(v) ? (void)(q.question = json_string_value(v)) : (void)(bad = "question");
    if ((v = json_object_get(c, "candidates")) && !json_is_null(v))
        json_is_string(v) ? (void)(q.candidates = json_string_value(v))
                          : (void)(bad = "candidates");
    if ((v = json_object_get(c, "conv_mode")) && !json_is_null(v))
        json_is_string(v) ? (void)(q.conv_mode = json_string_value(v)) : (void)(bad = "conv_mode");
    if ((v = json_object_get(c, "dump_logits")) && !json_is_null(v))
        json_is_string(v) ? (void)(q.dump_logits = json_string_value(v))
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
        s_emit_error(id, "INVALID_ARGUMENT", msg);
        mm_metric_add(cm->cases, 1, S_LOCAL_TENANT, "INVALID_ARGUMENT");
        json_decref(c);
        return;
    }
    if (!q.question) {
        snprintf(msg, sizeof msg, "case line %zu: field 'question' missing", lineno);
        s_emit_error(id, "INVALID_ARGUMENT", msg);
        mm_metric_add(cm->cases, 1, S_LOCAL_TENANT, "INVALID_ARGUMENT");
        json_decref(c);
        return;
    }
    json_t *out = NULL;
    char err[1024] = "";
    int rc = mm_case_answer(m, tok, &q, &out, err, sizeof err);
    if (rc != MM_OK) {
        mm_logf(lg, MM_LOG_WARN, json_is_string(id) ? json_string_value(id) : NULL,
                "case %s failed: %s: %s", json_is_string(id) ? json_string_value(id) : "(no id)",
                mm_status_str(rc), err);
        s_emit_error(id, s_code(rc), err);
        mm_metric_add(cm->cases, 1, S_LOCAL_TENANT, s_code(rc));
    } else {
        json_t *o = json_pack("{s:O,s:s}", "id", id ? id : json_null(), "status", "ok");
        json_object_update(o, out);
        s_emit(o);
        mm_metric_add(cm->cases, 1, S_LOCAL_TENANT, "OK");
        s_case_metrics(cm, t0, out);
        json_decref(o);
    }
    json_decref(out);
    json_decref(c);
}

/* ---- the case source: lines from a file descriptor, read as they come ---- */

typedef struct s_lines {
    int fd;    /* -1 after EOF                       */
    char *buf; /* bytes read, not yet consumed        */
    size_t len, cap;
    size_t lineno;
} s_lines;

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

/* ---- the gRPC front door ------------------------------------------------------ */

static int s_live(void *ctx, int e) { return mm_dispatch_live(ctx, e); }

static int s_all_live(const mm_dispatch *d, int n) {
    for (int e = 0; e < n; e++)
        if (!mm_dispatch_live(d, e))
            return 0;
    return 1;
}

/* "after MS ms, experts without a live replica: 1 3; cases needing them will fail" */
static void s_report_missing(mm_log *lg, const mm_dispatch *d, int n_experts, int wait_ms) {
    char list[512] = "";
    size_t u = 0;
    for (int e = 0; e < n_experts && u < sizeof list - 16; e++)
        if (!mm_dispatch_live(d, e))
            u += (size_t)snprintf(list + u, sizeof list - u, " %d", e);
    mm_logf(lg, MM_LOG_WARN, NULL,
            "after %d ms, experts without a live replica:%s; cases needing them will fail", wait_ms,
            list);
}

/* Open the front door and run the engine loop until SIGTERM. The objects
 * are the caller's to free (in main's order), also on error. */
static int s_serve_grpc(const router_args *a, mm_model *m, const mm_tokenizer *tok, mm_dispatch *d,
                        mm_tenants **tenants, mm_audit **audit, mm_sched **sched,
                        mm_grpc_server **grpc, mm_log *lg, mm_metrics *reg,
                        const mm_router_case_metrics *cm, char *err, size_t errlen) {
    int rc;
    if ((rc = mm_tenants_load(a->tenants, tenants, err, errlen)) != MM_OK)
        return rc;
    if (a->audit_log && (rc = mm_audit_open(a->audit_log, a->audit_fsync, audit, err, errlen)))
        return rc;
    mm_sched_options so;
    mm_sched_options_default(&so);
    if (so.max_step_rows < (size_t)a->slots)
        so.max_step_rows = (size_t)a->slots;
    if ((rc = mm_sched_new(m, tok, &so, sched, err, errlen)) != MM_OK)
        return rc;
    const mm_config *cfg = mm_model_config(m);
    int n_experts = 0;
    for (int i = 0; i < cfg->n_moe_layers; i++)
        n_experts = cfg->num_experts[i] > n_experts ? cfg->num_experts[i] : n_experts;
    mm_grpc_options go;
    mm_grpc_options_default(&go);
    go.listen = a->grpc_listen;
    go.tls_cert = a->tls_cert;
    go.tls_key = a->tls_key;
    go.tls_client_ca = a->tls_client_ca;
    go.max_image_bytes = (size_t)a->max_image_bytes;
    go.max_question_bytes = (size_t)a->max_question_bytes;
    go.max_tokens_default = a->max_tokens_default;
    go.max_tokens_limit = a->max_tokens_limit;
    go.max_message = (size_t)a->grpc_max_message;
    go.sched = *sched;
    go.tenants = *tenants;
    go.audit = *audit;
    go.model = m;
    go.version = MM_VERSION;
    go.n_experts = n_experts;
    go.eos_token = mm_tokenizer_eos_id(tok);
    go.live_replicas = s_live;
    go.live_ctx = d;
    go.log = lg;
    go.metrics = reg;
    if ((rc = mm_grpc_server_new(&go, grpc, err, errlen)) != MM_OK)
        return rc;
    int port = mm_grpc_server_port(*grpc);
    mm_logf(lg, MM_LOG_INFO, NULL,
            "gRPC on %s (port %d, %s), %zu tenant(s), %d slot(s), audit log %s", a->grpc_listen,
            port,
            a->tls_client_ca ? "mTLS"
            : a->tls_cert    ? "TLS"
                             : "plaintext",
            mm_tenants_count(*tenants), mm_model_n_slots(m), a->audit_log ? a->audit_log : "off");
    if (a->grpc_port_file) {
        char text[32];
        snprintf(text, sizeof text, "%d\n", port);
        if (s_write_atomic(a->grpc_port_file, text) != 0)
            return mm_errorf(err, errlen, MM_EIO, "%s: %s", a->grpc_port_file, strerror(errno));
    }
    /* --wait-experts does not block here: health says NOT_SERVING until
     * every expert has a replica; the loop only reports when that happened
     * or the wait ran out */
    double wait_until = mm_now_ms() + a->wait_experts;
    int reported = 0, step_failed = 0;
    mm_logf(lg, MM_LOG_INFO, NULL, "serving gRPC until SIGTERM");
    size_t shown_pending = (size_t)-1, shown_active = (size_t)-1;
    while (!g_stop) {
        size_t pending = mm_sched_pending(*sched), active = mm_sched_active(*sched);
        if (pending != shown_pending || active != shown_active) { /* only changes take the lock */
            mm_metric_set(cm->queue, (double)pending);
            mm_metric_set(cm->active, (double)active);
            shown_pending = pending;
            shown_active = active;
        }
        int busy = pending + active > 0;
        mm_grpc_server_poll(*grpc, busy && !step_failed ? 0 : 5);
        if (mm_sched_pending(*sched) + mm_sched_active(*sched) > 0) {
            char serr[1024] = "";
            int src = mm_sched_step(*sched, serr, sizeof serr);
            if (src != MM_OK && !step_failed)
                mm_logf(lg, MM_LOG_ERROR, NULL, "scheduler step: %s: %s", mm_status_str(src), serr);
            step_failed = src != MM_OK; /* back off to the 5 ms poll while it fails */
        }
        if (mm_dispatch_service(d, 0, -1, NULL) != MM_OK)
            break;
        if (!reported && s_all_live(d, n_experts)) {
            mm_logf(lg, MM_LOG_INFO, NULL, "every expert has a live replica");
            reported = 1;
        } else if (!reported && a->wait_experts > 0 && mm_now_ms() >= wait_until) {
            s_report_missing(lg, d, n_experts, a->wait_experts);
            reported = 1;
        }
    }
    return MM_OK;
}

/* ---- main ------------------------------------------------------------------ */

int main(int argc, char **argv) {
    router_args a;
    int rc = parse_args(argc, argv, &a);
    if (rc)
        return rc;
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    char err[1024] = "";
    mm_backend *be = NULL;
    mm_model *m = NULL;
    mm_tokenizer *tok = NULL;
    mm_dispatch *d = NULL;
    char(*fps)[MM_FINGERPRINT_HEX] = NULL;
    char(*allow)[41] = NULL;
    const char **allow_ptr = NULL;
    s_lines lines = {.fd = -1};
    mm_tenants *tenants = NULL;
    mm_audit *audit = NULL;
    mm_sched *sched = NULL;
    mm_grpc_server *grpc = NULL;
    mm_log *lg = NULL;
    mm_metrics *reg = NULL;
    mm_metrics_server *msrv = NULL;
    mm_router_case_metrics cm = {0};
    int status = 1;

    /* a NULL logger (out of memory) still logs, as text to stderr */
    mm_log_new("medmoe-router", stderr, a.log_format, a.log_level, &lg);
    /* The metrics endpoint comes up first: /healthz answers while the model
     * loads, and the families exist (at 0) before the first case. */
    if (a.metrics_listen) {
        if ((rc = mm_metrics_new(&reg)) != MM_OK) {
            mm_errorf(err, sizeof err, rc, "metrics registry: out of memory");
            goto fail;
        }
        if ((rc = mm_router_case_metrics_init(reg, &cm)) != MM_OK) {
            mm_errorf(err, sizeof err, rc, "metrics: %s", mm_metrics_error(reg));
            goto fail;
        }
        if ((rc = mm_metrics_serve(reg, a.metrics_listen, &msrv, err, sizeof err)) != MM_OK) {
            status = rc == MM_EINVAL ? 2 : 1;
            goto fail;
        }
        if (a.metrics_port_file && (rc = mm_metrics_server_write_port(msrv, a.metrics_port_file,
                                                                      err, sizeof err)) != MM_OK)
            goto fail;
        mm_logf(lg, MM_LOG_INFO, NULL, "metrics on http://%s/metrics (port %d)", a.metrics_listen,
                mm_metrics_server_port(msrv));
    }

    double t0 = mm_now_ms();
    if ((rc = mm_backend_new(a.backend, &be, err, sizeof err)) != MM_OK)
        goto fail;
    mm_model_options mo;
    mm_model_options_default(&mo);
    mo.vision_dir = a.vision;
    mo.load_trunk = 1;
    mo.experts_mask = 0; /* the routed experts live on the expert nodes */
    if (a.grpc_listen)
        mo.n_slots = a.slots; /* one KV-cache slot per case in flight */
    if ((rc = mm_model_load(a.model, be, &mo, &m, err, sizeof err)) != MM_OK)
        goto fail;
    if ((rc = mm_tokenizer_load(a.model, &tok, err, sizeof err)) != MM_OK)
        goto fail;
    const mm_config *cfg = mm_model_config(m);
    int n_experts = 0;
    for (int i = 0; i < cfg->n_moe_layers; i++)
        n_experts = cfg->num_experts[i] > n_experts ? cfg->num_experts[i] : n_experts;
    if (n_experts < 1) {
        rc = mm_errorf(err, sizeof err, MM_EINVAL, "%s: the model has no MoE layer", a.model);
        goto fail;
    }
    double t_fp = mm_now_ms();
    fps = calloc((size_t)n_experts, sizeof *fps);
    if (!fps) {
        rc = mm_errorf(err, sizeof err, MM_ENOMEM, "out of memory");
        goto fail;
    }
    char cfg_path[4096];
    snprintf(cfg_path, sizeof cfg_path, "%s/config.json", a.model);
    for (int e = 0; e < n_experts; e++)
        if ((rc = mm_fingerprint_expert(cfg_path, mm_model_checkpoint(m), cfg, e, a.fp_flags,
                                        fps[e], err, sizeof err)) != MM_OK)
            goto fail;
    mm_logf(lg, MM_LOG_INFO, NULL,
            "model %s loaded in %.0f ms (%s, backend %s); %d expert "
            "fingerprints (%s) in %.0f ms",
            a.model, t_fp - t0, mm_model_variant(m), mm_backend_describe(be), n_experts,
            a.fp_flags ? "headers" : "full", mm_now_ms() - t_fp);

    mm_dispatch_options dopt;
    mm_dispatch_options_default(&dopt);
    dopt.bind = a.bind;
    dopt.heartbeat_ms = a.heartbeat_ms;
    dopt.expert_wait_ms = a.expert_wait_ms;
    dopt.batch_timeout_ms = a.batch_timeout_ms;
    dopt.n_experts = n_experts;
    dopt.hidden = cfg->hidden_size;
    dopt.cfg = cfg;
    dopt.fingerprints = (const char(*)[MM_FINGERPRINT_HEX])fps;
    dopt.stop = &g_stop;
    dopt.log = lg;
    dopt.metrics = reg;
    char secret[1][41];
    if (a.curve_secret) {
        size_t n = 0, n_allow = 0;
        if ((rc = mm_wire_read_keys(a.curve_secret, secret, 1, &n, err, sizeof err)) != MM_OK)
            goto fail;
        allow = calloc(MAX_ALLOW, sizeof *allow);
        allow_ptr = calloc(MAX_ALLOW, sizeof *allow_ptr);
        if (!allow || !allow_ptr) {
            rc = mm_errorf(err, sizeof err, MM_ENOMEM, "out of memory");
            goto fail;
        }
        for (size_t i = 0; i < a.n_allow_files; i++)
            if ((rc = mm_wire_read_keys(a.allow_files[i], allow, MAX_ALLOW, &n_allow, err,
                                        sizeof err)) != MM_OK)
                goto fail;
        for (size_t i = 0; i < n_allow; i++)
            allow_ptr[i] = allow[i];
        dopt.curve_secret = secret[0];
        dopt.curve_allow = allow_ptr;
        dopt.n_allow = n_allow;
        char pub[41];
        if (zmq_curve_public(pub, secret[0]) != 0) {
            rc =
                mm_errorf(err, sizeof err, MM_EINVAL, "%s: not a CURVE secret key", a.curve_secret);
            goto fail;
        }
        mm_logf(lg, MM_LOG_INFO, NULL, "CURVE on: public key %s, %zu allowed expert key(s)", pub,
                n_allow);
    }
    if ((rc = mm_dispatch_new(&dopt, &d, err, sizeof err)) != MM_OK)
        goto fail;
    mm_logf(lg, MM_LOG_INFO, NULL, "experts connect to %s", mm_dispatch_endpoint(d));
    if (a.endpoint_file) {
        char text[300];
        snprintf(text, sizeof text, "%s\n", mm_dispatch_endpoint(d));
        if (s_write_atomic(a.endpoint_file, text) != 0) {
            rc = mm_errorf(err, sizeof err, MM_EIO, "%s: %s", a.endpoint_file, strerror(errno));
            goto fail;
        }
    }
    mm_expert_runner runner;
    mm_dispatch_runner(d, &runner);
    mm_model_set_expert_runner(m, &runner);

    if (a.grpc_listen) {
        if ((rc = s_serve_grpc(&a, m, tok, d, &tenants, &audit, &sched, &grpc, lg, reg, &cm, err,
                               sizeof err)) != MM_OK)
            goto fail;
        status = 0;
        goto done;
    }

    if (a.wait_experts > 0 && !g_stop) {
        if (mm_dispatch_wait_experts(d, a.wait_experts))
            mm_logf(lg, MM_LOG_INFO, NULL, "every expert has a live replica");
        else
            s_report_missing(lg, d, n_experts, a.wait_experts);
    }

    if (a.cases) {
        lines.fd = strcmp(a.cases, "-") ? open(a.cases, O_RDONLY | O_CLOEXEC) : 0;
        if (lines.fd < 0) {
            rc = mm_errorf(err, sizeof err, MM_EIO, "%s: %s", a.cases, strerror(errno));
            goto fail;
        }
        int eof = 0;
        size_t n_cases = 0;
        while (!g_stop) {
            size_t used;
            char *line = s_lines_next(&lines, eof, &used);
            if (line) {
                if (strspn(line, " \t\r") != strlen(line)) {
                    s_case(m, tok, line, lines.lineno, lg, &cm);
                    n_cases++;
                }
                s_lines_drop(&lines, used);
                continue;
            }
            if (eof)
                break;
            int ready = 0;
            if (mm_dispatch_service(d, a.heartbeat_ms, lines.fd, &ready) != MM_OK)
                break;
            if (ready && s_lines_fill(&lines) != 0)
                eof = 1;
        }
        mm_logf(lg, MM_LOG_INFO, NULL, "%zu case(s) done", n_cases);
    }
    if (!a.cases || a.serve) {
        mm_logf(lg, MM_LOG_INFO, NULL, "serving until SIGTERM");
        while (!g_stop && mm_dispatch_service(d, a.heartbeat_ms, -1, NULL) == MM_OK) {
        }
    }
    status = 0;
    goto done;
fail:
    mm_logf(lg, MM_LOG_ERROR, NULL, "%s: %s", mm_status_str(rc), err);
done:
    if (g_stop)
        mm_logf(lg, MM_LOG_INFO, NULL, "signal received, shutting down");
    if (d && a.stats_file) {
        json_t *st = mm_dispatch_stats(d);
        char *s = st ? json_dumps(st, JSON_INDENT(1)) : NULL;
        if (!s || s_write_atomic(a.stats_file, s) != 0)
            mm_logf(lg, MM_LOG_ERROR, NULL, "cannot write %s", a.stats_file);
        free(s);
        json_decref(st);
    }
    if (d) {
        json_t *st = mm_dispatch_stats(d);
        json_t *t = json_object_get(st, "dispatch");
        mm_logf(lg, MM_LOG_INFO, NULL,
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
    /* order matters: stop accepting, end the cases (their calls get
     * UNAVAILABLE "shutting down"), send those statuses, then the rest */
    mm_grpc_server_shutdown(grpc);
    mm_sched_destroy(&sched);
    mm_grpc_server_destroy(&grpc);
    mm_audit_close(&audit);
    mm_tenants_destroy(&tenants);
    if (m)
        mm_model_set_expert_runner(m, NULL);
    mm_dispatch_destroy(&d);
    if (lines.fd > 0)
        close(lines.fd);
    free(lines.buf);
    free(fps);
    free(allow);
    free(allow_ptr);
    mm_tokenizer_destroy(&tok);
    mm_model_destroy(&m);
    mm_backend_destroy(&be);
    /* last: the dispatcher and the front door update families of reg until
     * they are gone; the server renders reg, so it stops first */
    mm_metrics_server_stop(&msrv);
    mm_metrics_destroy(&reg);
    mm_log_destroy(&lg);
    return status;
}
