/* medmoe-router — the trunk of Med-MoE (vision, attention, gates, meta
 * expert, LM head) in this process, the routed experts on medmoe-expert
 * nodes over ZeroMQ. Cases come over gRPC (--grpc-listen: medmoe.v1, many
 * at once, batched continuously by the scheduler), or as JSON lines from a
 * file or stdin (--cases, one at a time, through the same scheduler) with
 * answers on stdout.
 *
 * This file only parses the arguments; the router is an object (router.h).
 * How this build maps docs/ARCHITECTURE.md's "Threads in the router":
 *   main thread      mm_router_run: the gRPC completion queue (grpc_server.c;
 *                    scheduler callbacks reach it through an event queue),
 *                    or with --cases the case lines and answer lines
 *   engine           the scheduler's step loop (mm_sched_start)
 *   image workers    --image-workers of them, under --pixel-budget
 *   dispatch         the expert socket (dispatch.c, started by mm_dispatch_new)
 *   metrics          libmicrohttpd's thread (--metrics-listen)
 * gRPC's own threads come with the C core. SIGTERM/SIGINT are blocked in all
 * but the main thread, whose waits they cut short.
 *
 * Observability: every event is one line through common/log.h
 * (--log-format text|json, --log-level) on stderr; --metrics-listen serves
 * Prometheus /metrics (common/metrics.h, its own thread): cases, TTFT and
 * token latency, queue depth in router.c and grpc_server.c, per-expert
 * routing, replicas and batch latency in dispatch.c.
 */
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "args.h"
#include "fingerprint.h"
#include "log.h"
#include "medmoe.h"
#include "router.h"
#include "status.h"

#define MAX_ALLOW 256 /* allowed expert keys */
#ifndef MM_VERSION
#define MM_VERSION "0.0.0"
#endif

static volatile sig_atomic_t g_stop; /* set by SIGTERM/SIGINT; the router's loops check it */

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
            "  --vk-device SEL         vulkan device: index, name, UUID (GPU-...) or PCI bus\n"
            "                          id (sets MEDMOE_VK_DEVICE; default: first discrete GPU)\n"
            "  --curve-secret-key F    CurveZMQ: this router's secret key (medmoe-keygen)\n"
            "  --curve-allow F         public keys of allowed experts (repeatable; one per line)\n"
            "  --insecure-experts      no CurveZMQ: accept any expert in plaintext (one\n"
            "                          machine's loopback, tests). One of this or the two\n"
            "                          --curve-* options is required; logged as a WARNING at\n"
            "                          start and every 60 s\n"
            "  --insecure-warn-ms MS   tests: repeat that WARNING every MS (default 60000)\n"
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
            "  --audit-salt-file F     salt for the audit's SHA-256 of DICOM SOP Instance UIDs\n"
            "                          (16..4096 bytes; default: random, per process)\n"
            "  --tls-cert F --tls-key F  serve TLS (PEM)\n"
            "  --tls-client-ca F       also require client certificates signed by F (mTLS)\n"
            "  --slots N               concurrent sequences in the scheduler (default 8)\n"
            "  --weights W             stored (default: as the checkpoint stores them, used in\n"
            "                          place), f32 (widened copy) or int8 (decoder weights\n"
            "                          quantised at load; cpu). Experts must say the same\n"
            "  --context N             positions per sequence (prompt + answer; default the\n"
            "                          model's max_position_embeddings). The KV cache takes\n"
            "                          slots x N positions: lower it to fit more slots\n"
            "  --max-image-bytes N     image.data at most (default 20971520)\n"
            "  --max-question-bytes N  question at most (default 4096)\n"
            "  --max-tokens-default N  max_tokens when a request gives 0 (default 64)\n"
            "  --max-tokens-limit N    max_tokens a request may ask (default 512)\n"
            "  --grpc-max-message N    gRPC receive limit, bytes (default 33554432)\n"
            "  --grpc-max-streams N    HTTP/2 streams at once per connection (default 100)\n"
            "  --grpc-idle-ms MS       close a connection idle this long (default 300000)\n"
            "  --grpc-max-age-ms MS    close a connection this old, after 10 min of grace for\n"
            "                          its calls (default 3600000)\n"
            "  --grpc-write-timeout-ms MS  a client that reads nothing of its answer for MS\n"
            "                          (HTTP/2 window shut) has its call cancelled and its\n"
            "                          tenant's slot freed (default 20000; 0: never)\n"
            "\n"
            "Engine:\n"
            "  --image-workers N       threads that decode images and run the vision tower\n"
            "                          (default 1); a slow image delays only its own case\n"
            "  --pixel-budget N        decoded source pixels in the image stage at once\n"
            "                          (default 67108864)\n"
            "  --jpeg-downscale        decode large JPEGs at 1/2..1/8 size in libjpeg (faster,\n"
            "                          less memory; pixels no longer equal Pillow's exactly)\n"
            "  --debug-vision-delay-ms MS  tests: every vision encode sleeps MS first\n"
            "  -h, --help              this text\n");
}

typedef struct router_args {
    const char *model, *vision, *bind, *endpoint_file, *cases, *backend, *curve_secret;
    const char *stats_file;
    const char *allow_files[MAX_ALLOW];
    size_t n_allow_files;
    int wait_experts, expert_wait_ms, batch_timeout_ms, heartbeat_ms, serve;
    int insecure_experts, insecure_warn_ms;
    unsigned fp_flags;
    /* gRPC front door */
    const char *grpc_listen, *grpc_port_file, *tenants, *audit_log, *audit_salt;
    const char *tls_cert, *tls_key, *tls_client_ca;
    int audit_fsync, slots, context, weights, max_image_bytes, max_question_bytes,
        max_tokens_default;
    int max_tokens_limit, grpc_max_message;
    int grpc_max_streams, grpc_idle_ms, grpc_max_age_ms, grpc_write_timeout_ms;
    /* engine */
    int image_workers, pixel_budget, debug_vision_delay_ms, jpeg_downscale;
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
    O_AUDIT_SALT,
    O_TLS_CERT,
    O_TLS_KEY,
    O_TLS_CLIENT_CA,
    O_SLOTS,
    O_CONTEXT,
    O_WEIGHTS,
    O_MAX_IMAGE,
    O_MAX_QUESTION,
    O_MAX_TOKENS_DEFAULT,
    O_MAX_TOKENS_LIMIT,
    O_GRPC_MAX_MESSAGE,
    O_GRPC_MAX_STREAMS,
    O_GRPC_IDLE_MS,
    O_GRPC_MAX_AGE_MS,
    O_GRPC_WRITE_TIMEOUT_MS,
    O_METRICS_LISTEN,
    O_METRICS_PORT_FILE,
    O_LOG_FORMAT,
    O_LOG_LEVEL,
    O_IMAGE_WORKERS,
    O_PIXEL_BUDGET,
    O_DEBUG_VISION_DELAY,
    O_JPEG_DOWNSCALE,
    O_INSECURE_EXPERTS,
    O_INSECURE_WARN_MS
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
        {"vk-device", required_argument, 0, 1001},
        {"curve-secret-key", required_argument, 0, 'k'},
        {"curve-allow", required_argument, 0, 'a'},
        {"stats-file", required_argument, 0, 's'},
        {"grpc-listen", required_argument, 0, O_GRPC_LISTEN},
        {"grpc-port-file", required_argument, 0, O_GRPC_PORT_FILE},
        {"tenants", required_argument, 0, O_TENANTS},
        {"audit-log", required_argument, 0, O_AUDIT_LOG},
        {"audit-fsync", no_argument, 0, O_AUDIT_FSYNC},
        {"audit-salt-file", required_argument, 0, O_AUDIT_SALT},
        {"tls-cert", required_argument, 0, O_TLS_CERT},
        {"tls-key", required_argument, 0, O_TLS_KEY},
        {"tls-client-ca", required_argument, 0, O_TLS_CLIENT_CA},
        {"slots", required_argument, 0, O_SLOTS},
        {"context", required_argument, 0, O_CONTEXT},
        {"weights", required_argument, 0, O_WEIGHTS},
        {"max-image-bytes", required_argument, 0, O_MAX_IMAGE},
        {"max-question-bytes", required_argument, 0, O_MAX_QUESTION},
        {"max-tokens-default", required_argument, 0, O_MAX_TOKENS_DEFAULT},
        {"max-tokens-limit", required_argument, 0, O_MAX_TOKENS_LIMIT},
        {"grpc-max-message", required_argument, 0, O_GRPC_MAX_MESSAGE},
        {"grpc-max-streams", required_argument, 0, O_GRPC_MAX_STREAMS},
        {"grpc-idle-ms", required_argument, 0, O_GRPC_IDLE_MS},
        {"grpc-max-age-ms", required_argument, 0, O_GRPC_MAX_AGE_MS},
        {"grpc-write-timeout-ms", required_argument, 0, O_GRPC_WRITE_TIMEOUT_MS},
        {"metrics-listen", required_argument, 0, O_METRICS_LISTEN},
        {"metrics-port-file", required_argument, 0, O_METRICS_PORT_FILE},
        {"log-format", required_argument, 0, O_LOG_FORMAT},
        {"log-level", required_argument, 0, O_LOG_LEVEL},
        {"image-workers", required_argument, 0, O_IMAGE_WORKERS},
        {"pixel-budget", required_argument, 0, O_PIXEL_BUDGET},
        {"debug-vision-delay-ms", required_argument, 0, O_DEBUG_VISION_DELAY},
        {"jpeg-downscale", no_argument, 0, O_JPEG_DOWNSCALE},
        {"insecure-experts", no_argument, 0, O_INSECURE_EXPERTS},
        {"insecure-warn-ms", required_argument, 0, O_INSECURE_WARN_MS},
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
    a->grpc_write_timeout_ms = 20000;
    a->log_format = MM_LOG_TEXT;
    a->log_level = MM_LOG_INFO;
    a->image_workers = 1;
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
        case 1001: /* the backend reads it when it opens the device */
            setenv("MEDMOE_VK_DEVICE", optarg, 1);
            break;
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
        case O_AUDIT_SALT: a->audit_salt = optarg; break;
        case O_TLS_CERT: a->tls_cert = optarg; break;
        case O_TLS_KEY: a->tls_key = optarg; break;
        case O_TLS_CLIENT_CA: a->tls_client_ca = optarg; break;
        case O_SLOTS: rc = mm_arg_int("medmoe-router", "--slots", optarg, 1, &a->slots); break;
        case O_CONTEXT:
            rc = mm_arg_int("medmoe-router", "--context", optarg, 1, &a->context);
            break;
        case O_WEIGHTS: {
            mm_weights w;
            if (mm_weights_parse(optarg, &w) != 0) {
                fprintf(stderr, "medmoe-router: --weights wants stored, f32 or int8\n");
                rc = 2;
            }
            a->weights = (int)w;
            break;
        }
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
        case O_GRPC_MAX_STREAMS:
            rc = mm_arg_int("medmoe-router", "--grpc-max-streams", optarg, 1, &a->grpc_max_streams);
            break;
        case O_GRPC_IDLE_MS:
            rc = mm_arg_int("medmoe-router", "--grpc-idle-ms", optarg, 1, &a->grpc_idle_ms);
            break;
        case O_GRPC_MAX_AGE_MS:
            rc = mm_arg_int("medmoe-router", "--grpc-max-age-ms", optarg, 1, &a->grpc_max_age_ms);
            break;
        case O_GRPC_WRITE_TIMEOUT_MS:
            rc = mm_arg_int("medmoe-router", "--grpc-write-timeout-ms", optarg, 0,
                            &a->grpc_write_timeout_ms);
            break;
        case O_METRICS_LISTEN: a->metrics_listen = optarg; break;
        case O_METRICS_PORT_FILE: a->metrics_port_file = optarg; break;
        case O_LOG_FORMAT: rc = mm_arg_log_format("medmoe-router", optarg, &a->log_format); break;
        case O_LOG_LEVEL: rc = mm_arg_log_level("medmoe-router", optarg, &a->log_level); break;
        case O_IMAGE_WORKERS:
            rc = mm_arg_int("medmoe-router", "--image-workers", optarg, 1, &a->image_workers);
            break;
        case O_PIXEL_BUDGET:
            rc = mm_arg_int("medmoe-router", "--pixel-budget", optarg, 1, &a->pixel_budget);
            break;
        case O_JPEG_DOWNSCALE: a->jpeg_downscale = 1; break;
        case O_INSECURE_EXPERTS: a->insecure_experts = 1; break;
        case O_INSECURE_WARN_MS:
            rc = mm_arg_int("medmoe-router", "--insecure-warn-ms", optarg, 1, &a->insecure_warn_ms);
            break;
        case O_DEBUG_VISION_DELAY:
            rc = mm_arg_int("medmoe-router", "--debug-vision-delay-ms", optarg, 0,
                            &a->debug_vision_delay_ms);
            break;
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
    if (!a->curve_secret && !a->insecure_experts) {
        fprintf(stderr, "medmoe-router: the expert socket needs CurveZMQ keys "
                        "(--curve-secret-key F --curve-allow F; medmoe-keygen makes them) or, "
                        "to accept any expert in plaintext, --insecure-experts\n");
        return 2;
    }
    if (a->curve_secret && a->insecure_experts) {
        fprintf(stderr, "medmoe-router: --insecure-experts and --curve-secret-key do not go "
                        "together\n");
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

static void s_options(const router_args *a, mm_router_options *o) {
    mm_router_options_default(o);
    o->model = a->model;
    o->vision = a->vision;
    o->backend = a->backend;
    o->bind = a->bind;
    o->endpoint_file = a->endpoint_file;
    o->fp_flags = a->fp_flags;
    o->wait_experts_ms = a->wait_experts;
    o->expert_wait_ms = a->expert_wait_ms;
    o->batch_timeout_ms = a->batch_timeout_ms;
    o->heartbeat_ms = a->heartbeat_ms;
    o->curve_secret = a->curve_secret;
    o->curve_allow = a->allow_files;
    o->n_curve_allow = a->n_allow_files;
    o->insecure_experts = a->insecure_experts;
    o->insecure_warn_ms = a->insecure_warn_ms;
    o->stats_file = a->stats_file;
    o->cases = a->cases;
    o->serve = a->serve;
    o->grpc_listen = a->grpc_listen;
    o->grpc_port_file = a->grpc_port_file;
    o->tenants = a->tenants;
    o->audit_log = a->audit_log;
    o->audit_fsync = a->audit_fsync;
    o->audit_salt = a->audit_salt;
    o->tls_cert = a->tls_cert;
    o->tls_key = a->tls_key;
    o->tls_client_ca = a->tls_client_ca;
    o->max_image_bytes = (size_t)a->max_image_bytes;
    o->max_question_bytes = (size_t)a->max_question_bytes;
    o->max_tokens_default = a->max_tokens_default;
    o->max_tokens_limit = a->max_tokens_limit;
    o->grpc_max_message = (size_t)a->grpc_max_message;
    o->grpc_max_streams = a->grpc_max_streams;
    o->grpc_idle_ms = a->grpc_idle_ms;
    o->grpc_max_age_ms = a->grpc_max_age_ms;
    o->grpc_write_timeout_ms = a->grpc_write_timeout_ms ? a->grpc_write_timeout_ms : -1;
    o->slots = a->slots;
    o->context = a->context;
    o->weights = a->weights;
    o->image_workers = a->image_workers;
    o->pixel_budget = (size_t)a->pixel_budget;
    o->debug_vision_delay_ms = a->debug_vision_delay_ms;
    o->jpeg_downscale = a->jpeg_downscale;
    o->metrics_listen = a->metrics_listen;
    o->metrics_port_file = a->metrics_port_file;
    o->log_format = a->log_format;
    o->log_level = a->log_level;
    o->version = MM_VERSION;
    o->stop = &g_stop;
}

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
    /* The threads the router starts inherit a mask without SIGTERM/SIGINT,
     * so the signal comes to this thread, whose waits it interrupts. */
    sigset_t stop_sigs, old;
    sigemptyset(&stop_sigs);
    sigaddset(&stop_sigs, SIGTERM);
    sigaddset(&stop_sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop_sigs, &old);

    mm_router_options o;
    s_options(&a, &o);
    mm_router *r = NULL;
    char err[1024] = "";
    rc = mm_router_new(&o, &r, err, sizeof err); /* on failure also logged */
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != MM_OK)
        return rc == MM_EINVAL ? 2 : 1;
    rc = mm_router_run(r);
    mm_router_destroy(&r);
    return rc == MM_OK ? 0 : 1;
}
