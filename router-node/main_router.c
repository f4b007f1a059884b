/* medmoe-router — the trunk of Med-MoE (vision, attention, gates, meta
 * expert, LM head) in this process, the routed experts on medmoe-expert
 * nodes over ZeroMQ. Until the gRPC front door exists, cases come as JSON
 * lines from a file or stdin and answers go to stdout, one JSON line each.
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

#include "case.h"
#include "dispatch.h"
#include "fingerprint.h"
#include "generate.h"
#include "medmoe.h"
#include "tokenizer.h"
#include "wire.h"

#define MAX_ALLOW 256 /* allowed expert keys */

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
            "  -h, --help              this text\n");
}

typedef struct router_args {
    const char *model, *vision, *bind, *endpoint_file, *cases, *backend, *curve_secret;
    const char *stats_file;
    const char *allow_files[MAX_ALLOW];
    size_t n_allow_files;
    int wait_experts, expert_wait_ms, batch_timeout_ms, heartbeat_ms, serve;
    unsigned fp_flags;
} router_args;

static int s_int_arg(const char *opt, const char *v, int min, int *out) {
    char *end = NULL;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (!*v || *end || errno || x < min || x > 1000000000) {
        fprintf(stderr, "medmoe-router: %s wants an integer >= %d, got '%s'\n", opt, min, v);
        return 2;
    }
    *out = (int)x;
    return 0;
}

static int parse_args(int argc, char **argv, router_args *a) {
    static const struct option opts[] = {{"model", required_argument, 0, 'm'},
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
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    memset(a, 0, sizeof *a);
    a->backend = "cpu";
    a->expert_wait_ms = 5000;
    a->batch_timeout_ms = 60000;
    a->heartbeat_ms = 1000;
    int o, rc = 0;
    while (rc == 0 && (o = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (o) {
        case 'm': a->model = optarg; break;
        case 'v': a->vision = optarg; break;
        case 'b': a->bind = optarg; break;
        case 'E': a->endpoint_file = optarg; break;
        case 'c': a->cases = optarg; break;
        case 'S': a->serve = 1; break;
        case 'w': rc = s_int_arg("--wait-experts", optarg, 0, &a->wait_experts); break;
        case 'W': rc = s_int_arg("--expert-wait-ms", optarg, 0, &a->expert_wait_ms); break;
        case 'T': rc = s_int_arg("--batch-timeout-ms", optarg, 1, &a->batch_timeout_ms); break;
        case 'H': rc = s_int_arg("--heartbeat-ms", optarg, 1, &a->heartbeat_ms); break;
        case 'F':
            if (!strcmp(optarg, "full")) {
                a->fp_flags = 0;
            } else if (!strcmp(optarg, "headers")) {
                a->fp_flags = MM_FINGERPRINT_HEADERS_ONLY;
            } else {
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
    if (!a->curve_secret != !a->n_allow_files) {
        fprintf(stderr, "medmoe-router: --curve-secret-key and --curve-allow go together\n");
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
static void s_case(mm_model *m, const mm_tokenizer *tok, const char *line, size_t lineno) {
    json_error_t jerr;
    char msg[1200];
    json_t *c = json_loads(line, 0, &jerr);
    if (!c || !json_is_object(c)) {
        snprintf(msg, sizeof msg, "case line %zu: %s", lineno, c ? "not a JSON object" : jerr.text);
        s_emit_error(NULL, "INVALID_ARGUMENT", msg);
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
        json_decref(c);
        return;
    }
    if (!q.question) {
        snprintf(msg, sizeof msg, "case line %zu: field 'question' missing", lineno);
        s_emit_error(id, "INVALID_ARGUMENT", msg);
        json_decref(c);
        return;
    }
    json_t *out = NULL;
    char err[1024] = "";
    int rc = mm_case_answer(m, tok, &q, &out, err, sizeof err);
    if (rc != MM_OK) {
        fprintf(stderr, "medmoe-router: case %s failed: %s: %s\n",
                json_is_string(id) ? json_string_value(id) : "(no id)", mm_status_str(rc), err);
        s_emit_error(id, s_code(rc), err);
    } else {
        json_t *o = json_pack("{s:O,s:s}", "id", id ? id : json_null(), "status", "ok");
        json_object_update(o, out);
        s_emit(o);
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
    int status = 1;

    double t0 = mm_now_ms();
    if ((rc = mm_backend_new(a.backend, &be, err, sizeof err)) != MM_OK)
        goto fail;
    mm_model_options mo;
    mm_model_options_default(&mo);
    mo.vision_dir = a.vision;
    mo.load_trunk = 1;
    mo.experts_mask = 0; /* the routed experts live on the expert nodes */
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
    fprintf(stderr,
            "medmoe-router: model %s loaded in %.0f ms (%s, backend %s); %d expert "
            "fingerprints (%s) in %.0f ms\n",
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
        fprintf(stderr, "medmoe-router: CURVE on: public key %s, %zu allowed expert key(s)\n", pub,
                n_allow);
    }
    if ((rc = mm_dispatch_new(&dopt, &d, err, sizeof err)) != MM_OK)
        goto fail;
    fprintf(stderr, "medmoe-router: experts connect to %s\n", mm_dispatch_endpoint(d));
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

    if (a.wait_experts > 0 && !g_stop) {
        if (mm_dispatch_wait_experts(d, a.wait_experts)) {
            fprintf(stderr, "medmoe-router: every expert has a live replica\n");
        } else {
            fprintf(stderr,
                    "medmoe-router: after %d ms, experts without a live replica:", a.wait_experts);
            for (int e = 0; e < n_experts; e++)
                if (!mm_dispatch_live(d, e))
                    fprintf(stderr, " %d", e);
            fprintf(stderr, "; cases needing them will fail\n");
        }
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
                    s_case(m, tok, line, lines.lineno);
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
        fprintf(stderr, "medmoe-router: %zu case(s) done\n", n_cases);
    }
    if (!a.cases || a.serve) {
        fprintf(stderr, "medmoe-router: serving until SIGTERM\n");
        while (!g_stop && mm_dispatch_service(d, a.heartbeat_ms, -1, NULL) == MM_OK) {
        }
    }
    status = 0;
    goto done;
fail:
    fprintf(stderr, "medmoe-router: %s: %s\n", mm_status_str(rc), err);
done:
    if (g_stop)
        fprintf(stderr, "medmoe-router: signal received, shutting down\n");
    if (d && a.stats_file) {
        json_t *st = mm_dispatch_stats(d);
        char *s = st ? json_dumps(st, JSON_INDENT(1)) : NULL;
        if (!s || s_write_atomic(a.stats_file, s) != 0)
            fprintf(stderr, "medmoe-router: cannot write %s\n", a.stats_file);
        free(s);
        json_decref(st);
    }
    if (d) {
        json_t *st = mm_dispatch_stats(d);
        json_t *t = json_object_get(st, "dispatch");
        fprintf(stderr,
                "medmoe-router: dispatched %lld MoE layer(s), %lld batch(es): round trip "
                "mean %.0f us (min %.0f, max %.0f), expert compute mean %.0f us, layer wait "
                "mean %.0f us; %lld message(s) dropped, %lld batch(es) re-sent\n",
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
    return status;
}
