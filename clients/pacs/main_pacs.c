/* main_pacs.c — `medmoe-pacs`: arguments, signals, then the bridge object
 * (pacs.h). docs/PACS.md is the administrator's guide.
 *
 * Exit status: 0 done (pull: answered, or the SR was already there; watch: a
 * clean stop on SIGTERM/SIGINT); 1 the work failed (message on stderr's log);
 * 2 usage. */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "args.h"
#include "log.h"
#include "pacs.h"
#include "status.h"

#define S_PROG "medmoe-pacs"

static volatile sig_atomic_t s_stop = 0;

static void s_on_signal(int sig) {
    (void)sig;
    s_stop = 1;
}

static void s_usage(FILE *f) {
    fprintf(
        f,
        "usage: medmoe-pacs pull  --study UID [--series UID] [--instance UID]\n"
        "                         [--question Q | --rules F] [--modality M] [options]\n"
        "       medmoe-pacs watch --rules F --state F [--poll-ms 2000] [--once] [options]\n"
        "pull: choose an image of the study (the middle instance, by InstanceNumber, of its\n"
        "  largest series of the modality), ask medmoe, store the answer as a DICOM SR in the\n"
        "  same study (STOW-RS). Prints the result as one JSON object on stdout.\n"
        "watch: follow Orthanc's change feed; each new stable study that has images of a\n"
        "  rule's modality is answered with that rule's question, once.\n"
        "PACS (Orthanc):\n"
        "  --orthanc URL           Orthanc REST root (default http://127.0.0.1:8042)\n"
        "  --dicomweb URL          DICOMweb root (default <orthanc>/dicom-web)\n"
        "  --orthanc-user U        HTTP basic auth user; password from $MEDMOE_PACS_PASSWORD\n"
        "  --orthanc-ca F          CA bundle (PEM) for an https:// Orthanc\n"
        "  --http-timeout-ms N     per HTTP request (default 30000)\n"
        "medmoe (gRPC):\n"
        "  --server HOST:PORT      medmoe-router's --grpc-listen address (required)\n"
        "  --key KEY               the tenant's API key (default: $MEDMOE_API_KEY)\n"
        "  --tls-ca F [--tls-cert F --tls-key F] | --tls   TLS (mutual with cert+key)\n"
        "  --ask-timeout-ms N      deadline of one answer (default 120000)\n"
        "  --max-tokens N          tokens to generate (default: the server's)\n"
        "  --conv-mode M           prompt template (default: the server's)\n"
        "  --send dicom|rendered   the image sent: the DICOM instance as stored (default),\n"
        "                          or the PACS's rendered PNG (WADO-RS /rendered)\n"
        "what to do:\n"
        "  --study/--series/--instance UID   pull: the source (series, instance optional)\n"
        "  --question Q            pull: the question (default: the first matching rule's)\n"
        "  --modality M            pull: only images of this modality\n"
        "  --rules F               JSON {\"rules\": [{\"modality\": \"CT\", \"question\": "
        "\"...\",\n"
        "                          \"max_tokens\": 32}, ...]}; first match wins; \"*\" = any\n"
        "  --state F               watch: progress file (JSON, rewritten atomically)\n"
        "  --poll-ms N             watch: change feed poll interval (default 2000)\n"
        "  --once                  watch: stop when the feed is drained\n"
        "  --sr-series-number N    SeriesNumber of the reports (default 7701)\n"
        "  --config F              JSON object of these options, e.g. {\"orthanc\":\n"
        "                          \"http://pacs:8042\", \"server\": \"medmoe:50051\"}; flags win\n"
        "  --log-format text|json  --log-level debug|info|warn|error\n"
        "exit status: 0 done; 1 failed (the reason is logged); 2 usage\n");
}

typedef struct s_args {
    const char *cmd, *study, *series, *instance, *question, *modality, *send;
    const char *log_format, *log_level;
    mm_pacs_options o;
} s_args;

static const struct option s_opts[] = {{"orthanc", required_argument, 0, 'O'},
                                       {"dicomweb", required_argument, 0, 'W'},
                                       {"orthanc-user", required_argument, 0, 'U'},
                                       {"orthanc-ca", required_argument, 0, 'C'},
                                       {"http-timeout-ms", required_argument, 0, 'H'},
                                       {"server", required_argument, 0, 's'},
                                       {"key", required_argument, 0, 'k'},
                                       {"tls-ca", required_argument, 0, 'A'},
                                       {"tls-cert", required_argument, 0, 'E'},
                                       {"tls-key", required_argument, 0, 'K'},
                                       {"tls", no_argument, 0, 'L'},
                                       {"ask-timeout-ms", required_argument, 0, 'T'},
                                       {"max-tokens", required_argument, 0, 'n'},
                                       {"conv-mode", required_argument, 0, 'M'},
                                       {"send", required_argument, 0, 'S'},
                                       {"study", required_argument, 0, 'y'},
                                       {"series", required_argument, 0, 'e'},
                                       {"instance", required_argument, 0, 'i'},
                                       {"question", required_argument, 0, 'q'},
                                       {"modality", required_argument, 0, 'm'},
                                       {"rules", required_argument, 0, 'r'},
                                       {"state", required_argument, 0, 't'},
                                       {"poll-ms", required_argument, 0, 'P'},
                                       {"once", no_argument, 0, '1'},
                                       {"sr-series-number", required_argument, 0, 'N'},
                                       {"config", required_argument, 0, 'c'},
                                       {"log-format", required_argument, 0, 'F'},
                                       {"log-level", required_argument, 0, 'l'},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};

/* --config F: its keys become "--key value" arguments placed before the
 * command line's own, so that a flag given on the command line wins. The
 * strings live in *keep (decref at exit). */
static int s_config_args(int argc, char **argv, json_t **keep, char ***out_argv, int *out_argc) {
    const char *path = NULL;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--config") && i + 1 < argc)
            path = argv[i + 1];
        else if (!strncmp(argv[i], "--config=", 9))
            path = argv[i] + 9;
    }
    *out_argv = argv;
    *out_argc = argc;
    if (!path)
        return 0;
    json_error_t je;
    json_t *j = json_load_file(path, 0, &je);
    if (!j || !json_is_object(j)) {
        fprintf(stderr, S_PROG ": --config %s: %s (line %d)\n", path,
                j ? "want a JSON object" : je.text, je.line);
        json_decref(j);
        return -1;
    }
    size_t n = json_object_size(j);
    char **v = calloc((size_t)argc + 2 * n + 1, sizeof *v);
    json_t *strs = json_array();
    if (!v || !strs) {
        free(v);
        json_decref(strs);
        json_decref(j);
        return -1;
    }
    int k = 0;
    v[k++] = argv[0];
    v[k++] = argv[1];
    const char *key;
    json_t *val;
    json_object_foreach(j, key, val) {
        int known = 0;
        for (const struct option *o = s_opts; o->name; o++)
            known |= !strcmp(o->name, key) && strcmp(key, "config") && strcmp(key, "help");
        char flag[96], num[32];
        if (!known || strlen(key) > 80) {
            fprintf(stderr, S_PROG ": --config %s: unknown option \"%s\"\n", path, key);
            goto bad;
        }
        snprintf(flag, sizeof flag, "--%s", key);
        json_array_append_new(strs, json_string(flag));
        v[k++] = (char *)json_string_value(json_array_get(strs, json_array_size(strs) - 1));
        if (json_is_true(val))
            continue;
        const char *sv = json_string_value(val);
        if (json_is_integer(val)) {
            snprintf(num, sizeof num, "%lld", (long long)json_integer_value(val));
            sv = num;
        }
        if (!sv) {
            fprintf(stderr, S_PROG ": --config %s: \"%s\" wants a string, a number or true\n", path,
                    key);
            goto bad;
        }
        json_array_append_new(strs, json_string(sv));
        v[k++] = (char *)json_string_value(json_array_get(strs, json_array_size(strs) - 1));
    }
    for (int i = 2; i < argc; i++)
        v[k++] = argv[i];
    json_decref(j);
    *keep = strs;
    *out_argv = v;
    *out_argc = k;
    return 0;
bad:
    free(v);
    json_decref(strs);
    json_decref(j);
    return -1;
}

static int s_parse(int argc, char **argv, s_args *a) {
    memset(a, 0, sizeof *a);
    mm_pacs_options_default(&a->o);
    a->o.pacs.orthanc = "http://127.0.0.1:8042";
    a->o.stop = &s_stop;
    a->o.pacs.stop = &s_stop;
    a->cmd = argv[1];
    optind = 2;
    int o, v;
    while ((o = getopt_long(argc, argv, "", s_opts, NULL)) != -1) {
        switch (o) {
        case 'O': a->o.pacs.orthanc = optarg; break;
        case 'W': a->o.pacs.dicomweb = optarg; break;
        case 'U': a->o.pacs.user = optarg; break;
        case 'C': a->o.pacs.ca_file = optarg; break;
        case 'H':
            if (mm_arg_int(S_PROG, "--http-timeout-ms", optarg, 1, &v))
                return -1;
            a->o.pacs.timeout_ms = v;
            break;
        case 's': a->o.server = optarg; break;
        case 'k': a->o.api_key = optarg; break;
        case 'A': a->o.tls.ca_file = optarg, a->o.tls_on = 1; break;
        case 'E': a->o.tls.cert_file = optarg, a->o.tls_on = 1; break;
        case 'K': a->o.tls.key_file = optarg, a->o.tls_on = 1; break;
        case 'L': a->o.tls_on = 1; break;
        case 'T':
            if (mm_arg_int(S_PROG, "--ask-timeout-ms", optarg, 1, &a->o.ask_timeout_ms))
                return -1;
            break;
        case 'n':
            if (mm_arg_int(S_PROG, "--max-tokens", optarg, 0, &v))
                return -1;
            a->o.max_tokens = (unsigned)v;
            break;
        case 'M': a->o.conv_mode = optarg; break;
        case 'S': a->send = optarg; break;
        case 'y': a->study = optarg; break;
        case 'e': a->series = optarg; break;
        case 'i': a->instance = optarg; break;
        case 'q': a->question = optarg; break;
        case 'm': a->modality = optarg; break;
        case 'r': a->o.rules_file = optarg; break;
        case 't': a->o.state_file = optarg; break;
        case 'P':
            if (mm_arg_int(S_PROG, "--poll-ms", optarg, 10, &a->o.poll_ms))
                return -1;
            break;
        case '1': a->o.once = 1; break;
        case 'N':
            if (mm_arg_int(S_PROG, "--sr-series-number", optarg, 0, &a->o.sr_series_number))
                return -1;
            break;
        case 'c': break; /* read by s_config_args */
        case 'F': a->log_format = optarg; break;
        case 'l': a->log_level = optarg; break;
        case 'h': s_usage(stdout); exit(0);
        default: s_usage(stderr); return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, S_PROG ": unexpected argument '%s'\n", argv[optind]);
        return -1;
    }
    if (!a->o.server) {
        fprintf(stderr, S_PROG ": --server HOST:PORT (medmoe-router) is required\n");
        return -1;
    }
    if (!a->o.api_key)
        a->o.api_key = getenv("MEDMOE_API_KEY");
    if (a->o.pacs.user)
        a->o.pacs.password = getenv("MEDMOE_PACS_PASSWORD");
    if (a->send && strcmp(a->send, "dicom") && strcmp(a->send, "rendered")) {
        fprintf(stderr, S_PROG ": --send wants dicom or rendered, got '%s'\n", a->send);
        return -1;
    }
    a->o.send_rendered = a->send && !strcmp(a->send, "rendered");
    if (!strcmp(a->cmd, "pull")) {
        if (!a->study) {
            fprintf(stderr, S_PROG ": pull: --study UID is required\n");
            return -1;
        }
        if (!a->question && !a->o.rules_file) {
            fprintf(stderr, S_PROG ": pull: --question Q or --rules F is required\n");
            return -1;
        }
    } else {
        if (!a->o.rules_file || !a->o.state_file) {
            fprintf(stderr, S_PROG ": watch: --rules F and --state F are required\n");
            return -1;
        }
    }
    return 0;
}

static int s_print_result(const mm_pacs_result *r) {
    json_t *j = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:f, s:f}", "status", r->status,
                          "study", r->study, "series", r->series, "instance", r->instance,
                          "sr_instance", r->sr_uid, "sr_series", r->sr_series, "model_fingerprint",
                          r->model_fingerprint, "ask_ms", r->ask_ms, "total_ms", r->total_ms);
    if (j && r->answer)
        json_object_set_new(j, "answer", json_string(r->answer));
    if (j && r->experts)
        json_object_set_new(j, "experts", json_string(r->experts));
    char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    if (!s)
        return -1;
    printf("%s\n", s);
    fflush(stdout);
    free(s);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2 || argv[1][0] == '-') {
        int help = argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"));
        s_usage(help ? stdout : stderr);
        return help ? 0 : 2;
    }
    if (strcmp(argv[1], "pull") && strcmp(argv[1], "watch")) {
        fprintf(stderr, S_PROG ": unknown command '%s' (pull or watch)\n", argv[1]);
        return 2;
    }
    json_t *keep = NULL;
    char **av = NULL;
    int ac = 0;
    if (s_config_args(argc, argv, &keep, &av, &ac))
        return 2;
    s_args a;
    int bad = s_parse(ac, av, &a);
    mm_log_format fmt = MM_LOG_TEXT;
    mm_log_level lvl = MM_LOG_INFO;
    if (!bad && a.log_format && mm_arg_log_format(S_PROG, a.log_format, &fmt))
        bad = 1;
    if (!bad && a.log_level && mm_arg_log_level(S_PROG, a.log_level, &lvl))
        bad = 1;
    mm_log *lg = NULL;
    if (!bad && mm_log_new(S_PROG, stderr, fmt, lvl, &lg) != MM_OK)
        bad = 1;
    if (bad) {
        if (av != argv)
            free(av);
        json_decref(keep);
        return 2;
    }
    a.o.log = lg;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = s_on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    char err[1024];
    mm_pacs *p = NULL;
    int rc = mm_pacs_new(&a.o, &p, err, sizeof err);
    if (rc == MM_OK && !strcmp(a.cmd, "pull")) {
        mm_pacs_result res;
        rc = mm_pacs_pull(p, a.study, a.series, a.instance, a.question, a.modality, &res, err,
                          sizeof err);
        if (rc == MM_OK && s_print_result(&res))
            rc = mm_errorf(err, sizeof err, MM_ENOMEM, "cannot print the result");
        mm_pacs_result_clear(&res);
    } else if (rc == MM_OK) {
        mm_logf(lg, MM_LOG_INFO, NULL, "watching %s for rules in %s, asking %s; state %s",
                a.o.pacs.orthanc, a.o.rules_file, a.o.server, a.o.state_file);
        rc = mm_pacs_watch(p, err, sizeof err);
    }
    if (rc != MM_OK)
        mm_logf(lg, MM_LOG_ERROR, NULL, "%s: %s", mm_status_str(rc), err);
    mm_pacs_destroy(&p);
    mm_log_destroy(&lg);
    if (av != argv)
        free(av);
    json_decref(keep);
    return rc == MM_OK ? 0 : 1;
}
