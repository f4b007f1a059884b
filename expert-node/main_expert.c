/* medmoe-expert — hosts one routed expert of Med-MoE for a medmoe-router
 * over ZeroMQ (docs/ARCHITECTURE.md, "Router ↔ expert wire").
 *
 * This file only parses the arguments; the expert is an object (expert.h)
 * that owns the backend, the expert's tensors, the compute thread, the
 * DEALER socket and the metrics server. SIGTERM/SIGINT set the stop flag:
 * mm_expert_run drains the batches already queued, says Bye and returns.
 *
 * Observability (docs/ARCHITECTURE.md, "Observability"): one log line per
 * event (common/log.h, --log-format text|json) and, with --metrics-listen, a
 * Prometheus endpoint (common/metrics.h) with the medmoe_expert_* series
 * (expert.c, s_metrics_init).
 */
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

#include "args.h"
#include "expert.h"
#include "fingerprint.h"
#include "log.h"
#include "medmoe.h"
#include "status.h"

static volatile sig_atomic_t g_stop; /* set by SIGTERM/SIGINT; mm_expert_run checks it */

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
               "  --vk-device SEL          vulkan device: index, name, UUID or PCI bus id\n"
               "                           (sets MEDMOE_VK_DEVICE)\n"
               "  --heartbeat-ms MS        heartbeat interval until the router's Welcome sets it\n"
               "                           (default 1000)\n"
               "  --capacity N             rows per batch accepted; more get BUSY (default 0:\n"
               "                           no limit)\n"
               "  --fingerprint full|headers  as the router's --fingerprint (default full)\n"
               "  --weights stored|f32|int8   as the router's --weights (default stored)\n"
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

static int parse_args(int argc, char **argv, mm_expert_options *a) {
    static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                         {"expert", required_argument, 0, 'e'},
                                         {"router", required_argument, 0, 'r'},
                                         {"backend", required_argument, 0, 'b'},
                                         {"vk-device", required_argument, 0, 1001},
                                         {"heartbeat-ms", required_argument, 0, 'H'},
                                         {"capacity", required_argument, 0, 'c'},
                                         {"fingerprint", required_argument, 0, 'F'},
                                         {"weights", required_argument, 0, 'W'},
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
    mm_expert_options_default(a);
    int o, rc = 0;
    while (rc == 0 && (o = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (o) {
        case 'm': a->model = optarg; break;
        case 'e': rc = mm_arg_int("medmoe-expert", "--expert", optarg, 0, &a->expert); break;
        case 'r': a->router = optarg; break;
        case 'b': a->backend = optarg; break;
        case 1001: /* the backend reads it when it opens the device */
            setenv("MEDMOE_VK_DEVICE", optarg, 1);
            break;
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
        case 'W': {
            mm_weights w;
            if (mm_weights_parse(optarg, &w) != 0) {
                fprintf(stderr, "medmoe-expert: --weights wants stored, f32 or int8\n");
                rc = 2;
            }
            a->weights = (int)w;
            break;
        }
        case 'S': a->curve_server_key = optarg; break;
        case 'k': a->curve_key = optarg; break;
        case 'g':
            rc = mm_arg_int("medmoe-expert", "--give-up-ms", optarg, 0, &a->give_up_ms);
            break;
        case 'd':
            rc = mm_arg_int("medmoe-expert", "--debug-delay-ms", optarg, 0, &a->debug_delay_ms);
            break;
        case 'f': a->debug_fail = 1; break;
        case 'n': a->debug_no_answer = 1; break;
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
    if (!a->curve_server_key != !a->curve_key) {
        fprintf(stderr, "medmoe-expert: --curve-server-key and --curve-key go together\n");
        return 2;
    }
    return 0;
}

/* The exit statuses --help promises, from mm_expert_new's and
 * mm_expert_run's codes (expert.h). */
static int s_exit_status(int new_rc, int run_rc) {
    if (new_rc != MM_OK)
        return new_rc == MM_EINVAL ? 2 : 1;
    switch (run_rc) {
    case MM_OK: return 0;
    case MM_EPROTO: return 3;   /* refused by the router */
    case MM_ETIMEOUT: return 4; /* --give-up-ms passed   */
    default: return 1;
    }
}

int main(int argc, char **argv) {
    mm_expert_options o;
    int rc = parse_args(argc, argv, &o);
    if (rc)
        return rc;
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    /* The threads the expert starts (compute, metrics) inherit a mask without
     * SIGTERM/SIGINT, so the signal comes to this thread, whose poll it
     * interrupts. */
    sigset_t stop_sigs, old;
    sigemptyset(&stop_sigs);
    sigaddset(&stop_sigs, SIGTERM);
    sigaddset(&stop_sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop_sigs, &old);
    o.stop = &g_stop;
    mm_expert *e = NULL;
    char err[1024] = "";
    rc = mm_expert_new(&o, &e, err, sizeof err); /* on failure also logged */
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != MM_OK)
        return s_exit_status(rc, MM_OK);
    int run_rc = mm_expert_run(e);
    mm_expert_destroy(&e);
    return s_exit_status(MM_OK, run_rc);
}
