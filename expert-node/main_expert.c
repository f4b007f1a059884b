/* medmoe-expert — hosts one routed expert of Med-MoE (its FFN in every MoE
 * layer) and computes batches of token rows for a medmoe-router over
 * ZeroMQ (proto/expert_wire.proto). Only that expert's tensors are loaded,
 * so the memory stays proportional to one expert.
 *
 * The session (Paranoid Pirate shape): connect a DEALER, Hello, Welcome;
 * then Work -> Result; heartbeats while idle; the router silent for 3
 * intervals -> a new socket after a back-off and Hello again.
 *
 * Deadlines: a Work's deadline_ms counts from its receipt; a batch whose
 * deadline passed while it waited for the compute thread is answered
 * ERROR_EXPIRED without compute (its cases are out of time; the router fails
 * them and does not blame this replica). A probe Work (a quarantined
 * replica's test, one synthetic row) is computed like any other.
 *
 * Observability (issue 6): one log line per event (common/log.h, --log-format
 * text|json) and, with --metrics-listen, a Prometheus endpoint
 * (common/metrics.h) with the medmoe_expert_* series listed in s_metrics_init.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "args.h"
#include "clock.h"
#include "fingerprint.h"
#include "log.h"
#include "medmoe.h"
#include "metrics.h"
#include "wire.h"

#define S_DEAD_AFTER 3        /* silent heartbeats before the router counts as gone */
#define S_BACKOFF_MAX_MS 8000 /* longest pause between reconnections                */
#define S_QUEUE_MAX 64        /* batches queued for the compute thread; more: BUSY  */
#define S_DRAIN_MS 10000      /* on SIGTERM, finish queued batches for at most this */

static volatile sig_atomic_t g_stop;

static void on_signal(int sig) {
    (void)sig;
    g_stop = 1;
}

static void usage(FILE *f) {
    fprintf(f, "usage: medmoe-expert --model DIR --expert K --router ENDPOINT [options]\n"
               "\n"
               "Host routed expert K of a Med-MoE checkpoint for a medmoe-router.\n"
               "\n"
               "  --model DIR              checkpoint dir (config.json, *.safetensors)\n"
               "  --expert K               expert index to host (every MoE layer)\n"
               "  --router EP              the router's endpoint, e.g. tcp://10.0.0.5:5555\n"
               "  --backend cpu|vulkan     compute backend (default cpu)\n"
               "  --heartbeat-ms MS        heartbeat interval until the router's Welcome sets it\n"
               "                           (default 1000)\n"
               "  --capacity N             rows per batch accepted; more get BUSY (default 0:\n"
               "                           no limit)\n"
               "  --fingerprint full|headers  as the router's --fingerprint (default full)\n"
               "  --curve-server-key F     CurveZMQ: the router's public key\n"
               "  --curve-key F            CurveZMQ: this expert's secret key\n"
               "  --give-up-ms MS          exit 4 when no router welcomed us for MS (default 0:\n"
               "                           keep trying)\n"
               "  --metrics-listen ADDR    serve Prometheus /metrics and /healthz on ADDR\n"
               "                           (HOST:PORT, e.g. 0.0.0.0:9091; port 0 picks one)\n"
               "  --metrics-port-file F    write the bound metrics port to F (with port 0)\n"
               "  --log-format text|json   log line format on stderr (default text)\n"
               "  --log-level L            debug|info|warn|error (default info)\n"
               "  --debug-delay-ms N       sleep N ms before each batch reply (tests)\n"
               "  --debug-fail-batches     answer every batch ERROR_INTERNAL (tests)\n"
               "  --debug-never-answer     keep heartbeating, never answer a batch (tests)\n"
               "  -h, --help               this text\n"
               "\n"
               "Exit status: 0 after SIGTERM/SIGINT, 2 bad usage, 3 refused by the router,\n"
               "4 gave up connecting, 1 other errors.\n");
}

typedef struct expert_args {
    const char *model, *router, *backend, *server_key, *key;
    const char *metrics_listen, *metrics_port_file; /* NULL: no metrics endpoint */
    int expert, heartbeat_ms, capacity, give_up_ms, delay_ms;
    int fail_batches; /* --debug-fail-batches: every batch answers ERROR_INTERNAL */
    int never_answer; /* --debug-never-answer: Work is swallowed, heartbeats go on */
    unsigned fp_flags;
    mm_log_format log_format;
    mm_log_level log_level;
} expert_args;

static int parse_args(int argc, char **argv, expert_args *a) {
    static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                         {"expert", required_argument, 0, 'e'},
                                         {"router", required_argument, 0, 'r'},
                                         {"backend", required_argument, 0, 'b'},
                                         {"heartbeat-ms", required_argument, 0, 'H'},
                                         {"capacity", required_argument, 0, 'c'},
                                         {"fingerprint", required_argument, 0, 'F'},
                                         {"curve-server-key", required_argument, 0, 'S'},
                                         {"curve-key", required_argument, 0, 'k'},
                                         {"give-up-ms", required_argument, 0, 'g'},
                                         {"debug-delay-ms", required_argument, 0, 'd'},
                                         {"debug-fail-batches", no_argument, 0, 'f'},
                                         {"debug-never-answer", no_argument, 0, 'n'},
                                         {"metrics-listen", required_argument, 0, 'M'},
                                         {"metrics-port-file", required_argument, 0, 'P'},
                                         {"log-format", required_argument, 0, 'L'},
                                         {"log-level", required_argument, 0, 'l'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    memset(a, 0, sizeof *a);
    a->expert = -1;
    a->backend = "cpu";
    a->heartbeat_ms = 1000;
    a->log_format = MM_LOG_TEXT;
    a->log_level = MM_LOG_INFO;
    int o, rc = 0;
    while (rc == 0 && (o = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (o) {
        case 'm': a->model = optarg; break;
        case 'e': rc = mm_arg_int("medmoe-expert", "--expert", optarg, 0, &a->expert); break;
        case 'r': a->router = optarg; break;
        case 'b': a->backend = optarg; break;
        case 'H':
            rc = mm_arg_int("medmoe-expert", "--heartbeat-ms", optarg, 1, &a->heartbeat_ms);
            break;
        case 'c': rc = mm_arg_int("medmoe-expert", "--capacity", optarg, 0, &a->capacity); break;
        case 'F':
            if (mm_fingerprint_mode_parse(optarg, &a->fp_flags) != MM_OK) {
                fprintf(stderr, "medmoe-expert: --fingerprint wants full or headers\n");
                rc = 2;
            }
            break;
        case 'S': a->server_key = optarg; break;
        case 'k': a->key = optarg; break;
        case 'g':
            rc = mm_arg_int("medmoe-expert", "--give-up-ms", optarg, 0, &a->give_up_ms);
            break;
        case 'd':
            rc = mm_arg_int("medmoe-expert", "--debug-delay-ms", optarg, 0, &a->delay_ms);
            break;
        case 'f': a->fail_batches = 1; break;
        case 'n': a->never_answer = 1; break;
        case 'M': a->metrics_listen = optarg; break;
        case 'P': a->metrics_port_file = optarg; break;
        case 'L': rc = mm_arg_log_format("medmoe-expert", optarg, &a->log_format); break;
        case 'l': rc = mm_arg_log_level("medmoe-expert", optarg, &a->log_level); break;
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); return 2;
        }
    }
    if (rc)
        return rc;
    if (optind < argc) {
        fprintf(stderr, "medmoe-expert: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (!a->model || a->expert < 0 || !a->router) {
        fprintf(stderr,
                "medmoe-expert: --model, --expert and --router are required (see --help)\n");
        return 2;
    }
    if (a->metrics_port_file && !a->metrics_listen) {
        fprintf(stderr, "medmoe-expert: --metrics-port-file needs --metrics-listen\n");
        return 2;
    }
    if (!a->server_key != !a->key) {
        fprintf(stderr, "medmoe-expert: --curve-server-key and --curve-key go together\n");
        return 2;
    }
    return 0;
}

/* A /proc/self/status field in MiB (VmRSS, RssAnon...), -1 if unknown.
 * RssAnon is what this process owns; the rest of VmRSS is mapped checkpoint
 * pages (page cache, shared, reclaimable). */
static double s_status_mib(const char *field) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f)
        return -1;
    char line[256];
    double kib = -1;
    size_t n = strlen(field);
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, field, n) && line[n] == ':') {
            kib = strtod(line + n + 1, NULL);
            break;
        }
    fclose(f);
    return kib < 0 ? -1 : kib / 1024.0;
}

/* Sleep up to ms, waking early on a signal. */
static void s_nap(int ms) {
    while (ms > 0 && !g_stop) {
        int step = ms < 50 ? ms : 50;
        struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)step * 1000000L};
        nanosleep(&ts, NULL);
        ms -= step;
    }
}

/* ---- the node -------------------------------------------------------------- */

/* One Work message on its way through the compute thread. */
typedef struct s_job {
    struct s_job *next; /* queue link                                         */
    mm_wire_msg msg;    /* the Work and its tensor frame (owned)              */
    unsigned gen;       /* connection it arrived on: replies to older ones die */
    double t0;          /* receipt time (ms)                                  */
    double deadline;    /* t0 + Work.deadline_ms: not computed after (0: none) */
    int code;           /* ErrorCode of the reply                             */
    char text[512];     /* message when code != OK                            */
    mm_wire_buf *out;   /* y rows when code == OK                             */
} s_job;

typedef struct s_node {
    expert_args a;
    mm_model *m;
    const mm_config *cfg;
    char fp[MM_FINGERPRINT_HEX];
    char node[160];    /* host:pid                                          */
    char backend[200]; /* backend description sent in the Hello              */
    char server_key[1][41], secret[1][41], public_key[41];
    void *zctx, *sock;
    int hb_ms;            /* heartbeat interval (the router's, once welcomed)   */
    int welcomed;         /* 1 after Welcome on this socket                      */
    double last_recv_ms;  /* last message from the router (or connect time)     */
    double last_send_ms;  /* last message sent                                  */
    double lost_since_ms; /* since when no router has welcomed us               */
    unsigned gen;         /* connection generation (bumped per new socket)       */
    /* The compute thread owns the model; the main thread owns the socket, so
     * heartbeats go on while a long batch computes. */
    pthread_t worker;
    int worker_started;
    pthread_mutex_t mu; /* guards todo, done, n_todo, quit                      */
    pthread_cond_t cv;  /* todo non-empty or quit                               */
    s_job *todo, *todo_tail, *done, *done_tail;
    int n_todo, quit;
    int busy;         /* the compute thread holds a job (guarded by mu)               */
    int wake[2];      /* pipe: the worker writes a byte per finished job     */
    mm_tensor *x, *y; /* [rows_cached, hidden] reused while rows repeat (worker) */
    size_t rows_cached;
    uint64_t batches, rows, errors;
    /* Observability: the logger and the metrics (families owned by reg; the
     * server's thread renders them, any thread updates them). */
    mm_log *log;
    mm_metrics *reg;
    mm_metrics_server *srv;
    mm_metric *m_batches, *m_rows, *m_compute, *m_queue, *m_memory, *m_errors;
} s_node;

static void s_log(s_node *n, mm_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void s_log(s_node *n, mm_log_level level, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    mm_vlogf(n->log, level, NULL, fmt, ap);
    va_end(ap);
}

/* The RSS, sampled at each scrape (from the metrics thread: reads /proc). */
static void s_collect(mm_metrics *reg, void *ctx) {
    s_node *n = ctx;
    (void)reg;
    double rss = mm_metrics_process_rss_bytes();
    if (rss >= 0)
        mm_metric_set(n->m_memory, rss);
}

/* The expert's series. No "expert" label on purpose: the router exports
 * medmoe_expert_queue_depth{expert="K"} (batches in flight to expert K) for
 * the HorizontalPodAutoscaler, and a selector expert="K" must not also sum
 * these per-pod series; Prometheus adds pod/instance labels to tell pods
 * apart. */
static int s_metrics_init(s_node *n, char *err, size_t errlen) {
    static const double compute_b[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                       0.05,   0.1,   0.25,   0.5,   1,    2.5};
    int rc = mm_metrics_new(&n->reg);
    if (rc != MM_OK)
        return mm_errorf(err, errlen, rc, "metrics registry: out of memory");
    n->m_batches = mm_metrics_counter(n->reg, "medmoe_expert_batches_total",
                                      "Batches computed and answered.", NULL);
    n->m_rows = mm_metrics_counter(n->reg, "medmoe_expert_rows_total",
                                   "Token rows computed in answered batches.", NULL);
    n->m_compute = mm_metrics_histogram(n->reg, "medmoe_expert_compute_seconds",
                                        "Compute time of one batch (upload, expert FFN in one "
                                        "MoE layer, download).",
                                        NULL, compute_b, sizeof compute_b / sizeof *compute_b);
    n->m_queue = mm_metrics_gauge(n->reg, "medmoe_expert_queue_depth",
                                  "Batches received and waiting for the compute thread.", NULL);
    n->m_memory = mm_metrics_gauge(n->reg, "medmoe_expert_memory_bytes",
                                   "Resident set size of this process (includes mapped "
                                   "checkpoint pages).",
                                   NULL);
    n->m_errors = mm_metrics_counter(n->reg, "medmoe_expert_errors_total",
                                     "Batches answered with an error, by wire error code.", "code");
    if (!n->m_batches || !n->m_rows || !n->m_compute || !n->m_queue || !n->m_memory || !n->m_errors)
        return mm_errorf(err, errlen, MM_ERR, "metrics: %s", mm_metrics_error(n->reg));
    mm_metrics_on_collect(n->reg, s_collect, n);
    if ((rc = mm_metrics_serve(n->reg, n->a.metrics_listen, &n->srv, err, errlen)) != MM_OK)
        return rc;
    if (n->a.metrics_port_file &&
        (rc = mm_metrics_server_write_port(n->srv, n->a.metrics_port_file, err, errlen)) != MM_OK)
        return rc;
    s_log(n, MM_LOG_INFO, "metrics on http://%s/metrics (port %d)", n->a.metrics_listen,
          mm_metrics_server_port(n->srv));
    return MM_OK;
}

static int s_send(s_node *n, const Medmoe__Wire__Envelope *env, mm_wire_buf *t) {
    char err[256];
    int rc = mm_wire_send(n->sock, NULL, 0, env, t, err, sizeof err);
    if (rc == MM_OK)
        n->last_send_ms = mm_now_ms();
    else
        s_log(n, MM_LOG_WARN, "send failed: %s", err);
    return rc;
}

static void s_close(s_node *n) {
    if (n->sock)
        zmq_close(n->sock);
    n->sock = NULL;
    n->welcomed = 0;
    n->gen++;
}

/* A fresh DEALER, connected, with a Hello queued. */
static int s_connect(s_node *n) {
    s_close(n);
    n->sock = zmq_socket(n->zctx, ZMQ_DEALER);
    if (!n->sock)
        return MM_EIO;
    int zero = 0, hwm = 1000;
    int64_t maxmsg = (int64_t)1 << 30;
    zmq_setsockopt(n->sock, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(n->sock, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(n->sock, ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(n->sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    if (n->a.server_key) {
        zmq_setsockopt(n->sock, ZMQ_CURVE_SERVERKEY, n->server_key[0], 40);
        zmq_setsockopt(n->sock, ZMQ_CURVE_PUBLICKEY, n->public_key, 40);
        zmq_setsockopt(n->sock, ZMQ_CURVE_SECRETKEY, n->secret[0], 40);
    }
    if (zmq_connect(n->sock, n->a.router) != 0) {
        s_log(n, MM_LOG_ERROR, "connect %s: %s", n->a.router, zmq_strerror(zmq_errno()));
        return MM_EIO;
    }
    Medmoe__Wire__Hello h = MEDMOE__WIRE__HELLO__INIT;
    h.version = MM_WIRE_VERSION;
    h.expert = n->a.expert;
    h.fingerprint = n->fp;
    h.backend = n->backend;
    h.capacity = (uint32_t)n->a.capacity;
    h.node = n->node;
    Medmoe__Wire__Envelope env = MEDMOE__WIRE__ENVELOPE__INIT;
    env.body_case = MM_WIRE_HELLO;
    env.hello = &h;
    n->last_recv_ms = mm_now_ms(); /* the silence clock starts now */
    return s_send(n, &env, NULL);
}

static void s_job_free(s_job *j) {
    if (!j)
        return;
    mm_wire_msg_clear(&j->msg);
    mm_wire_buf_unref(&j->out);
    free(j);
}

/* Check every field of a Work before it is queued. 0: fine, else the
 * ErrorCode to answer with (text says why). */
static int s_validate(s_node *n, const mm_wire_msg *msg, char *text, size_t len) {
    const Medmoe__Wire__Work *w = msg->env->work;
    const mm_config *c = n->cfg;
    size_t H = (size_t)c->hidden_size, want = 0;
    if (w->moe < 0 || w->moe >= c->n_moe_layers || w->layer != c->moe_layers_idx[w->moe]) {
        snprintf(text, len, "MoE layer %d / decoder layer %d do not exist or disagree", w->moe,
                 w->layer);
        return MEDMOE__WIRE__ERROR_CODE__ERROR_BAD_REQUEST;
    }
    if (w->expert != n->a.expert) {
        snprintf(text, len, "expert %d asked, this node hosts expert %d", w->expert, n->a.expert);
        return MEDMOE__WIRE__ERROR_CODE__ERROR_EXPERT_NOT_LOADED;
    }
    if (w->rows < 1 || w->width != H || w->dtype != MEDMOE__WIRE__DTYPE__DTYPE_F32 ||
        !mm_size_mul(w->rows, H * sizeof(float), &want) || msg->tensor_len != want) {
        snprintf(text, len, "bad batch: rows %u width %u (hidden %zu) dtype %d, tensor %zu bytes",
                 w->rows, w->width, H, (int)w->dtype, msg->tensor_len);
        return MEDMOE__WIRE__ERROR_CODE__ERROR_BAD_REQUEST;
    }
    if (n->a.capacity && w->rows > (unsigned)n->a.capacity) {
        snprintf(text, len, "%u rows, capacity %d", w->rows, n->a.capacity);
        return MEDMOE__WIRE__ERROR_CODE__ERROR_BUSY;
    }
    if (g_stop) {
        snprintf(text, len, "shutting down");
        return MEDMOE__WIRE__ERROR_CODE__ERROR_DRAINING;
    }
    return 0;
}

/* Compute one validated job (compute thread): j->out or j->code/j->text. */
static void s_compute(s_node *n, s_job *j) {
    const Medmoe__Wire__Work *w = j->msg.env->work;
    double now = mm_now_ms();
    if (j->deadline > 0 && now >= j->deadline) {
        /* The cases it serves are out of time: computing it helps nobody. */
        snprintf(j->text, sizeof j->text,
                 "deadline of %u ms passed before compute (%.0f ms in the queue)", w->deadline_ms,
                 now - j->t0);
        j->code = MEDMOE__WIRE__ERROR_CODE__ERROR_EXPIRED;
        return;
    }
    if (n->a.fail_batches) {
        snprintf(j->text, sizeof j->text, "--debug-fail-batches");
        j->code = MEDMOE__WIRE__ERROR_CODE__ERROR_INTERNAL;
        return;
    }
    mm_backend *be = mm_model_backend(n->m);
    size_t H = (size_t)n->cfg->hidden_size, want = j->msg.tensor_len;
    int rc = MM_OK;
    char *err = j->text;
    size_t errlen = sizeof j->text;
    if (n->rows_cached != w->rows) {
        mm_tensor_destroy(&n->x);
        mm_tensor_destroy(&n->y);
        n->rows_cached = 0;
        if ((rc = mm_tensor_new_2d(be, MM_F32, w->rows, H, &n->x)) ||
            (rc = mm_tensor_new_2d(be, MM_F32, w->rows, H, &n->y))) {
            snprintf(err, errlen, "tensors of %u x %zu: %s", w->rows, H, mm_backend_error(be));
            mm_tensor_destroy(&n->x);
        } else {
            n->rows_cached = w->rows;
        }
    }
    if (rc == MM_OK) {
        const void *src = j->msg.tensor;
        float *tmp = NULL;
        if ((uintptr_t)src % _Alignof(float)) { /* ZeroMQ frames are not promised aligned */
            tmp = malloc(want);
            if (tmp)
                memcpy(tmp, src, want);
            src = tmp;
        }
        if (!src) {
            rc = MM_ENOMEM;
            snprintf(err, errlen, "out of memory");
        } else if ((rc = mm_tensor_set(n->x, src, MM_F32)) != MM_OK) {
            snprintf(err, errlen, "upload: %s", mm_backend_error(be));
        }
        free(tmp);
    }
    if (rc == MM_OK)
        rc = mm_model_expert_forward(n->m, w->moe, w->expert, n->x, n->y, err, errlen);
    if (rc == MM_OK && !(j->out = mm_wire_buf_new(want))) {
        rc = MM_ENOMEM;
        snprintf(err, errlen, "out of memory for %zu bytes", want);
    }
    if (rc == MM_OK && (rc = mm_tensor_get(n->y, j->out->data)) != MM_OK)
        snprintf(err, errlen, "download: %s", mm_backend_error(be));
    if (rc != MM_OK) {
        mm_wire_buf_unref(&j->out);
        j->code = MEDMOE__WIRE__ERROR_CODE__ERROR_INTERNAL;
        return;
    }
    if (n->a.delay_ms)
        s_nap(n->a.delay_ms);
    j->code = MEDMOE__WIRE__ERROR_CODE__ERROR_OK;
}

static void *s_worker(void *arg) {
    s_node *n = arg;
    for (;;) {
        pthread_mutex_lock(&n->mu);
        while (!n->todo && !n->quit)
            pthread_cond_wait(&n->cv, &n->mu);
        s_job *j = n->todo;
        if (n->quit) { /* queued jobs are freed by main; the router re-sends them */
            pthread_mutex_unlock(&n->mu);
            return NULL;
        }
        n->todo = j->next;
        if (!n->todo)
            n->todo_tail = NULL;
        n->n_todo--;
        n->busy = 1;
        mm_metric_set(n->m_queue, n->n_todo);
        pthread_mutex_unlock(&n->mu);

        double t = mm_now_ms();
        s_compute(n, j);
        mm_metric_observe(n->m_compute, (mm_now_ms() - t) / 1e3);

        pthread_mutex_lock(&n->mu);
        j->next = NULL;
        if (n->done_tail)
            n->done_tail->next = j;
        else
            n->done = j;
        n->done_tail = j;
        n->busy = 0;
        pthread_mutex_unlock(&n->mu);
        char one = 1;
        if (write(n->wake[1], &one, 1) < 0) {
            /* the pipe is full: the main thread has wake-ups pending anyway */
        }
    }
}

/* The reply to j (main thread). */
static void s_reply(s_node *n, s_job *j) {
    const Medmoe__Wire__Work *w = j->msg.env->work;
    Medmoe__Wire__Result r = MEDMOE__WIRE__RESULT__INIT;
    r.batch_id = w->batch_id;
    r.layer = w->layer;
    r.moe = w->moe;
    r.expert = w->expert;
    r.rows = w->rows;
    r.width = w->width;
    r.dtype = w->dtype;
    r.error = j->code;
    r.compute_us = (uint64_t)((mm_now_ms() - j->t0) * 1e3);
    Medmoe__Wire__Envelope env = MEDMOE__WIRE__ENVELOPE__INIT;
    env.body_case = MM_WIRE_RESULT;
    env.result = &r;
    if (j->code != MEDMOE__WIRE__ERROR_CODE__ERROR_OK) {
        r.message = j->text;
        n->errors++;
        mm_metric_add(n->m_errors, 1, mm_wire_error_str(j->code));
        s_log(n, MM_LOG_WARN, "batch %llu: %s: %s", (unsigned long long)w->batch_id,
              mm_wire_error_str(j->code), j->text);
        s_send(n, &env, NULL);
        return;
    }
    if (s_send(n, &env, j->out) == MM_OK) {
        n->batches++;
        mm_metric_add(n->m_batches, 1);
        mm_metric_add(n->m_rows, w->rows);
        n->rows += w->rows;
    }
}

/* Send the replies of finished jobs that belong to the current connection. */
static void s_flush_done(s_node *n) {
    char buf[256];
    while (read(n->wake[0], buf, sizeof buf) > 0) {
    }
    pthread_mutex_lock(&n->mu);
    s_job *j = n->done;
    n->done = n->done_tail = NULL;
    pthread_mutex_unlock(&n->mu);
    while (j) {
        s_job *next = j->next;
        if (j->gen == n->gen && n->sock)
            s_reply(n, j);
        else
            s_log(n, MM_LOG_WARN, "dropped the reply to batch %llu: its connection is gone",
                  (unsigned long long)j->msg.env->work->batch_id);
        s_job_free(j);
        j = next;
    }
}

/* Validate a Work and queue it for the compute thread (takes j). */
static void s_work(s_node *n, s_job *j) {
    j->gen = n->gen;
    j->t0 = mm_now_ms();
    const Medmoe__Wire__Work *w = j->msg.env->work;
    j->deadline = w->deadline_ms ? j->t0 + w->deadline_ms : 0;
    if (n->a.never_answer) {
        s_log(n, MM_LOG_INFO, "--debug-never-answer: ignoring %s %llu (layer %d, %u rows)",
              w->probe ? "probe" : "batch", (unsigned long long)w->batch_id, w->layer, w->rows);
        s_job_free(j);
        return;
    }
    int code = s_validate(n, &j->msg, j->text, sizeof j->text);
    pthread_mutex_lock(&n->mu);
    if (!code && n->n_todo >= S_QUEUE_MAX) {
        snprintf(j->text, sizeof j->text, "%d batches queued", n->n_todo);
        code = MEDMOE__WIRE__ERROR_CODE__ERROR_BUSY;
    }
    if (!code) {
        j->next = NULL;
        if (n->todo_tail)
            n->todo_tail->next = j;
        else
            n->todo = j;
        n->todo_tail = j;
        n->n_todo++;
        mm_metric_set(n->m_queue, n->n_todo);
        pthread_cond_signal(&n->cv);
    }
    pthread_mutex_unlock(&n->mu);
    if (code) {
        j->code = code;
        s_reply(n, j);
        s_job_free(j);
    }
}

/* Handle one message. Returns 3 when refused (exit status), else 0. */
static int s_handle(s_node *n) {
    char err[256];
    s_job *j = calloc(1, sizeof *j); /* received in place: the frame is not moved */
    if (!j) {
        s_log(n, MM_LOG_ERROR, "out of memory");
        return -1;
    }
    int rc = mm_wire_recv(n->sock, 0, &j->msg, err, sizeof err);
    if (rc != MM_OK)
        free(j);
    if (rc == MM_EAGAIN || rc == MM_EIO)
        return rc == MM_EIO ? -1 : 1;
    if (rc == MM_EPROTO) {
        s_log(n, MM_LOG_WARN, "dropped a malformed message: %s", err);
        return 0;
    }
    mm_wire_msg msg = j->msg; /* a view for the non-Work cases below */
    n->last_recv_ms = mm_now_ms();
    int out = 0;
    switch (msg.env->body_case) {
    case MM_WIRE_WELCOME: {
        const Medmoe__Wire__Welcome *w = msg.env->welcome;
        if (w->version != MM_WIRE_VERSION) {
            s_log(n, MM_LOG_WARN, "dropped a Welcome of protocol version %u (we speak %u)",
                  w->version, MM_WIRE_VERSION);
            break;
        }
        n->welcomed = 1;
        n->lost_since_ms = 0;
        if (w->heartbeat_ms >= 1 && w->heartbeat_ms <= 600000)
            n->hb_ms = (int)w->heartbeat_ms;
        s_log(n, MM_LOG_INFO, "connected to %s as replica %s (expert %d, heartbeat %d ms)",
              n->a.router, w->replica_id ? w->replica_id : "?", n->a.expert, n->hb_ms);
        break;
    }
    case MM_WIRE_REFUSE:
        s_log(n, MM_LOG_ERROR, "refused by router: %s",
              msg.env->refuse->reason ? msg.env->refuse->reason : "(no reason)");
        out = 3;
        break;
    case MM_WIRE_WORK:
        if (!n->welcomed) {
            s_log(n, MM_LOG_WARN, "dropped Work before Welcome");
            break;
        }
        s_work(n, j);
        return 0;
    case MM_WIRE_HEARTBEAT: break;
    default:
        s_log(n, MM_LOG_WARN, "dropped an unexpected message (body %d)", (int)msg.env->body_case);
        break;
    }
    s_job_free(j);
    return out;
}

static void s_heartbeat_if_due(s_node *n, double now) {
    if (n->welcomed && now - n->last_send_ms >= n->hb_ms) {
        Medmoe__Wire__Heartbeat hb = MEDMOE__WIRE__HEARTBEAT__INIT;
        Medmoe__Wire__Envelope env = MEDMOE__WIRE__ENVELOPE__INIT;
        env.body_case = MM_WIRE_HEARTBEAT;
        env.heartbeat = &hb;
        s_send(n, &env, NULL);
    }
}

/* After SIGTERM: reply to the batches already queued or being computed
 * (new Work is answered DRAINING by s_work's validation, so the router
 * sends it elsewhere), for at most S_DRAIN_MS; then the caller says Bye.
 * Scaling down then costs no recomputation. */
static void s_drain(s_node *n) {
    double until = mm_now_ms() + S_DRAIN_MS;
    int n_left = 0;
    for (;;) {
        pthread_mutex_lock(&n->mu);
        int idle = !n->todo && !n->busy;
        n_left = n->n_todo + n->busy;
        pthread_mutex_unlock(&n->mu);
        s_flush_done(n);
        if (idle || mm_now_ms() >= until)
            break;
        zmq_pollitem_t it[2] = {{.socket = n->sock, .events = ZMQ_POLLIN},
                                {.fd = n->wake[0], .events = ZMQ_POLLIN}};
        if (zmq_poll(it, 2, 50) > 0 && (it[0].revents & ZMQ_POLLIN)) {
            for (int i = 0; i < 100; i++)
                if (s_handle(n) != 0)
                    break;
        }
        s_heartbeat_if_due(n, mm_now_ms());
    }
    if (n_left)
        s_log(n, MM_LOG_WARN,
              "drain: %d batch(es) still unanswered after %d ms; the router re-sends them", n_left,
              S_DRAIN_MS);
    else
        s_log(n, MM_LOG_INFO, "drained: every queued batch answered");
}

static int s_serve(s_node *n) {
    int backoff = n->a.heartbeat_ms;
    n->lost_since_ms = mm_now_ms();
    if (s_connect(n) != MM_OK)
        return 1;
    while (!g_stop) {
        zmq_pollitem_t it[2] = {{.socket = n->sock, .events = ZMQ_POLLIN},
                                {.fd = n->wake[0], .events = ZMQ_POLLIN}};
        int rc = zmq_poll(it, 2, n->hb_ms);
        if (rc < 0 && zmq_errno() != EINTR) {
            s_log(n, MM_LOG_ERROR, "poll: %s", zmq_strerror(zmq_errno()));
            return 1;
        }
        if (rc > 0 && (it[1].revents & ZMQ_POLLIN))
            s_flush_done(n);
        if (rc > 0 && (it[0].revents & ZMQ_POLLIN)) {
            for (int i = 0; i < 100 && !g_stop; i++) {
                int h = s_handle(n);
                if (h == 3)
                    return 3;
                if (h < 0)
                    return 1;
                if (h == 1)
                    break;
            }
        }
        double now = mm_now_ms();
        if (n->welcomed)
            backoff = n->hb_ms;
        if (now - n->last_recv_ms >= S_DEAD_AFTER * n->hb_ms) {
            if (n->a.give_up_ms && n->lost_since_ms && now - n->lost_since_ms >= n->a.give_up_ms) {
                s_log(n, MM_LOG_ERROR, "no router welcomed us for %d ms: giving up",
                      n->a.give_up_ms);
                return 4;
            }
            if (!n->lost_since_ms)
                n->lost_since_ms = now;
            s_log(n, MM_LOG_WARN, "%s silent for %.0f ms (%s): reconnecting in %d ms", n->a.router,
                  now - n->last_recv_ms, n->welcomed ? "connection lost" : "no Welcome yet",
                  backoff);
            s_close(n);
            s_nap(backoff);
            backoff = backoff * 2 > S_BACKOFF_MAX_MS ? S_BACKOFF_MAX_MS : backoff * 2;
            if (g_stop)
                break;
            if (s_connect(n) != MM_OK)
                return 1;
            continue;
        }
        s_heartbeat_if_due(n, now);
    }
    /* SIGTERM: drain, then say Bye so the router re-routes at once instead of
     * after 3 beats. */
    if (n->sock && n->welcomed) {
        s_drain(n);
        Medmoe__Wire__Bye bye = MEDMOE__WIRE__BYE__INIT;
        bye.reason = "shutting down (signal)";
        Medmoe__Wire__Envelope env = MEDMOE__WIRE__ENVELOPE__INIT;
        env.body_case = MM_WIRE_BYE;
        env.bye = &bye;
        s_send(n, &env, NULL);
        int linger = 500; /* give the Bye a moment to leave */
        zmq_setsockopt(n->sock, ZMQ_LINGER, &linger, sizeof linger);
    }
    return 0;
}

int main(int argc, char **argv) {
    s_node n;
    memset(&n, 0, sizeof n);
    n.wake[0] = n.wake[1] = -1;
    int rc = parse_args(argc, argv, &n.a);
    if (rc)
        return rc;
    /* a NULL logger (out of memory) still logs, as text to stderr */
    mm_log_new("medmoe-expert", stderr, n.a.log_format, n.a.log_level, &n.log);
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    n.hb_ms = n.a.heartbeat_ms;

    char err[1024] = "", host[128] = "?";
    gethostname(host, sizeof host);
    host[sizeof host - 1] = 0;
    snprintf(n.node, sizeof n.node, "%s:%ld", host, (long)getpid());
    mm_backend *be = NULL;
    int status = 1;
    if (n.a.expert >= 64) {
        rc = mm_errorf(err, sizeof err, MM_EINVAL, "--expert %d: at most 64 experts", n.a.expert);
        status = 2;
        goto fail;
    }
    if (n.a.server_key) {
        size_t k = 0, s = 0;
        if ((rc = mm_wire_read_keys(n.a.server_key, n.server_key, 1, &k, err, sizeof err)) ||
            (rc = mm_wire_read_keys(n.a.key, n.secret, 1, &s, err, sizeof err)))
            goto fail;
        if (zmq_curve_public(n.public_key, n.secret[0]) != 0) {
            rc = mm_errorf(err, sizeof err, MM_EINVAL, "%s: not a CURVE secret key", n.a.key);
            goto fail;
        }
    }
    /* The endpoint comes up before the (possibly long) load, so a liveness
     * probe on /healthz passes while the checkpoint maps. */
    if (n.a.metrics_listen && (rc = s_metrics_init(&n, err, sizeof err)) != MM_OK) {
        status = rc == MM_EINVAL ? 2 : 1;
        goto fail;
    }
    double t0 = mm_now_ms();
    if ((rc = mm_backend_new(n.a.backend, &be, err, sizeof err)) != MM_OK)
        goto fail;
    mm_model_options mo;
    mm_model_options_default(&mo);
    mo.load_trunk = 0;
    mo.experts_mask = 1ull << n.a.expert;
    if ((rc = mm_model_load(n.a.model, be, &mo, &n.m, err, sizeof err)) != MM_OK)
        goto fail;
    n.cfg = mm_model_config(n.m);
    int in_some = 0;
    for (int i = 0; i < n.cfg->n_moe_layers; i++)
        in_some |= n.a.expert < n.cfg->num_experts[i];
    if (!in_some) {
        rc = mm_errorf(err, sizeof err, MM_EINVAL, "--expert %d: no MoE layer has that expert",
                       n.a.expert);
        status = 2;
        goto fail;
    }
    double t_fp = mm_now_ms();
    char cfg_path[4096];
    snprintf(cfg_path, sizeof cfg_path, "%s/config.json", n.a.model);
    if ((rc = mm_fingerprint_expert(cfg_path, mm_model_checkpoint(n.m), n.cfg, n.a.expert,
                                    n.a.fp_flags, n.fp, err, sizeof err)) != MM_OK)
        goto fail;
    snprintf(n.backend, sizeof n.backend, "%s", mm_backend_describe(be));
    s_log(&n, MM_LOG_INFO,
          "expert %d of %s loaded in %.0f ms, fingerprint (%s) %.16s... in %.0f ms, RSS %.1f MiB "
          "(anonymous %.1f MiB), backend %s",
          n.a.expert, n.a.model, t_fp - t0, n.a.fp_flags ? "headers" : "full", n.fp,
          mm_now_ms() - t_fp, s_status_mib("VmRSS"), s_status_mib("RssAnon"), n.backend);
    n.zctx = zmq_ctx_new();
    if (!n.zctx) {
        rc = mm_errorf(err, sizeof err, MM_EIO, "zmq_ctx_new failed");
        goto fail;
    }
    if (pipe2(n.wake, O_NONBLOCK | O_CLOEXEC) != 0) {
        rc = mm_errorf(err, sizeof err, MM_EIO, "pipe: %s", strerror(errno));
        goto fail;
    }
    pthread_mutex_init(&n.mu, NULL);
    pthread_cond_init(&n.cv, NULL);
    if (pthread_create(&n.worker, NULL, s_worker, &n) != 0) {
        rc = mm_errorf(err, sizeof err, MM_ERR, "cannot start the compute thread");
        goto fail;
    }
    n.worker_started = 1;
    status = s_serve(&n);
    s_log(&n, MM_LOG_INFO, "served %llu batch(es), %llu row(s), %llu error repl%s; exiting",
          (unsigned long long)n.batches, (unsigned long long)n.rows, (unsigned long long)n.errors,
          n.errors == 1 ? "y" : "ies");
    goto done;
fail:
    s_log(&n, MM_LOG_ERROR, "%s: %s", mm_status_str(rc), err);
done:
    if (n.worker_started) {
        pthread_mutex_lock(&n.mu);
        n.quit = 1;
        pthread_cond_signal(&n.cv);
        pthread_mutex_unlock(&n.mu);
        pthread_join(n.worker, NULL); /* waits for the batch in progress, if any */
        for (s_job *j = n.todo, *next; j; j = next) {
            next = j->next;
            s_job_free(j);
        }
        for (s_job *j = n.done, *next; j; j = next) {
            next = j->next;
            s_job_free(j);
        }
    }
    s_close(&n);
    if (n.wake[0] >= 0) {
        close(n.wake[0]);
        close(n.wake[1]);
    }
    if (n.zctx)
        zmq_ctx_term(n.zctx);
    mm_tensor_destroy(&n.x);
    mm_tensor_destroy(&n.y);
    mm_model_destroy(&n.m);
    mm_backend_destroy(&be);
    mm_metrics_server_stop(&n.srv); /* before the registry it renders */
    mm_metrics_destroy(&n.reg);
    mm_log_destroy(&n.log);
    return status;
}
