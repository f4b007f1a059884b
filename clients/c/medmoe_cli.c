/* medmoe_cli.c — `medmoe`, the command-line client of medmoe-router's gRPC
 * front door (proto/medmoe.proto, service medmoe.v1.CaseService).
 *
 *   medmoe ask      --server HOST:PORT --key KEY [--image F] --question Q [--stream] [--json]
 *   medmoe classify --server HOST:PORT --key KEY [--image F] --question Q --candidates a,b,c
 *   medmoe status   --server HOST:PORT [--key KEY]
 *
 * Exit status: 0 when the call ended OK; 1 with "medmoe: <STATUS_NAME>:
 * <message>" on stderr when it ended with a gRPC error; 2 on a usage or local
 * error (unreadable image, bad flag). The key may also come from the
 * environment (MEDMOE_API_KEY) so that it does not show in `ps`.
 * Messages are packed with protobuf-c; every gRPC call is in grpc_client.c.
 */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "grpc_client.h"
#include "health.pb-c.h"
#include "medmoe.pb-c.h"
#include "status.h"

#define S_EXIT_RPC 1
#define S_EXIT_USAGE 2
/* An image file bigger than this is refused locally (the server's own
 * default limit is 20 MiB; this only guards the CLI's memory). */
#define S_MAX_IMAGE_FILE ((size_t)256 << 20)

typedef struct s_args {
    const char *cmd, *server, *key, *image, *media_type, *question, *candidates, *case_id;
    const char *question_file;
    const char *conv_mode, *tls_ca, *tls_cert, *tls_key;
    const char *window;  /* DICOM: VOI window preset name */
    unsigned long frame; /* DICOM: 1-based frame, 0 = middle */
    unsigned long max_tokens;
    double temperature, top_p;
    unsigned long long seed;
    long timeout_ms;
    int stream, json, tls;
} s_args;

static void s_usage(FILE *f) {
    fprintf(f,
            "usage: medmoe ask|classify|status --server HOST:PORT [--key KEY] [options]\n"
            "  --server HOST:PORT     medmoe-router's --grpc-listen address\n"
            "  --key KEY              the tenant's API key (default: $MEDMOE_API_KEY)\n"
            "  --image F              PNG, JPEG or DICOM file (optional: a text-only question)\n"
            "  --media-type T         image/png | image/jpeg | application/dicom (default:\n"
            "                         application/dicom for a .dcm name, else detected by the\n"
            "                         server)\n"
            "  --window W             DICOM: auto (the file's window), full, or a CT preset:\n"
            "                         lung (W1500/L-600), mediastinum (W350/L50),\n"
            "                         bone (W1800/L400), brain (W80/L40)\n"
            "  --frame N              DICOM multi-frame: frame N, 1-based (default: middle)\n"
            "  --question Q           the question (required for ask and classify)\n"
            "  --question-file F      the question from a file (UTF-8 text, no NUL)\n"
            "  --candidates a,b,c     classify: the candidate answers\n"
            "  --max-tokens N         ask: tokens to generate (default: the server's)\n"
            "  --temperature T        ask: 0 = greedy (default)\n"
            "  --top-p P              ask: nucleus cut (0 or 1 = none)\n"
            "  --seed S               ask: sampling seed\n"
            "  --conv-mode M          prompt template: stablelm | phi | simple\n"
            "  --stream               ask: print the answer's pieces as they arrive\n"
            "  --json                 print the whole reply as JSON\n"
            "  --case-id ID           your id for the case (echoed, audited)\n"
            "  --timeout-ms N         the call's deadline (default: none)\n"
            "  --tls-ca F             serve over TLS, trusting this CA (PEM)\n"
            "  --tls-cert F --tls-key F  client certificate for mutual TLS\n"
            "  --tls                  TLS with the system's CA roots\n"
            "exit status: 0 OK; 1 gRPC error (\"medmoe: STATUS: message\" on stderr); 2 usage\n");
}

static int s_parse_num(const char *flag, const char *s, double lo, double hi, double *out) {
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "medmoe: %s: '%s' is not a number in [%g, %g]\n", flag, s, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

static int s_parse_args(int argc, char **argv, s_args *a) {
    memset(a, 0, sizeof *a);
    a->timeout_ms = 0;
    if (argc < 2 || argv[1][0] == '-') {
        if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
            s_usage(stdout);
            exit(0);
        }
        s_usage(stderr);
        return -1;
    }
    a->cmd = argv[1];
    if (strcmp(a->cmd, "ask") && strcmp(a->cmd, "classify") && strcmp(a->cmd, "status")) {
        fprintf(stderr, "medmoe: unknown command '%s' (ask, classify or status)\n", a->cmd);
        return -1;
    }
    static const struct option opts[] = {{"server", required_argument, 0, 's'},
                                         {"key", required_argument, 0, 'k'},
                                         {"image", required_argument, 0, 'i'},
                                         {"media-type", required_argument, 0, 'm'},
                                         {"window", required_argument, 0, 'W'},
                                         {"frame", required_argument, 0, 'F'},
                                         {"question", required_argument, 0, 'q'},
                                         {"question-file", required_argument, 0, 'Q'},
                                         {"candidates", required_argument, 0, 'c'},
                                         {"max-tokens", required_argument, 0, 'n'},
                                         {"temperature", required_argument, 0, 't'},
                                         {"top-p", required_argument, 0, 'p'},
                                         {"seed", required_argument, 0, 'S'},
                                         {"conv-mode", required_argument, 0, 'C'},
                                         {"stream", no_argument, 0, 'r'},
                                         {"json", no_argument, 0, 'j'},
                                         {"case-id", required_argument, 0, 'I'},
                                         {"timeout-ms", required_argument, 0, 'T'},
                                         {"tls-ca", required_argument, 0, 'A'},
                                         {"tls-cert", required_argument, 0, 'E'},
                                         {"tls-key", required_argument, 0, 'K'},
                                         {"tls", no_argument, 0, 'L'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    optind = 2;
    int o;
    double v;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 's': a->server = optarg; break;
        case 'k': a->key = optarg; break;
        case 'i': a->image = optarg; break;
        case 'm': a->media_type = optarg; break;
        case 'W': a->window = optarg; break;
        case 'F': {
            char *end;
            errno = 0;
            a->frame = strtoul(optarg, &end, 10);
            if (*end || errno || a->frame > 0xffffffffUL) {
                fprintf(stderr, "medmoe: --frame wants a frame number (1-based)\n");
                return -1;
            }
            break;
        }
        case 'q': a->question = optarg; break;
        case 'Q': a->question_file = optarg; break;
        case 'c': a->candidates = optarg; break;
        case 'C': a->conv_mode = optarg; break;
        case 'I': a->case_id = optarg; break;
        case 'r': a->stream = 1; break;
        case 'j': a->json = 1; break;
        case 'A':
            a->tls_ca = optarg;
            a->tls = 1;
            break;
        case 'E':
            a->tls_cert = optarg;
            a->tls = 1;
            break;
        case 'K':
            a->tls_key = optarg;
            a->tls = 1;
            break;
        case 'L': a->tls = 1; break;
        case 'n':
            if (s_parse_num("--max-tokens", optarg, 0, 4294967295.0, &v))
                return -1;
            a->max_tokens = (unsigned long)v;
            break;
        case 't':
            if (s_parse_num("--temperature", optarg, 0, 1e6, &v))
                return -1;
            a->temperature = v;
            break;
        case 'p':
            if (s_parse_num("--top-p", optarg, 0, 1, &v))
                return -1;
            a->top_p = v;
            break;
        case 'S':
            if (s_parse_num("--seed", optarg, 0, 1.8e19, &v))
                return -1;
            a->seed = strtoull(optarg, NULL, 10);
            break;
        case 'T':
            if (s_parse_num("--timeout-ms", optarg, 1, 86400000.0, &v))
                return -1;
            a->timeout_ms = (long)v;
            break;
        case 'h': s_usage(stdout); exit(0);
        default: s_usage(stderr); return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "medmoe: unexpected argument '%s'\n", argv[optind]);
        return -1;
    }
    if (!a->server) {
        fprintf(stderr, "medmoe: --server HOST:PORT is required\n");
        return -1;
    }
    if (!a->key)
        a->key = getenv("MEDMOE_API_KEY");
    if (a->question && a->question_file) {
        fprintf(stderr, "medmoe: --question and --question-file do not go together\n");
        return -1;
    }
    if (strcmp(a->cmd, "status") && !a->question && !a->question_file) {
        fprintf(stderr, "medmoe: %s: --question (or --question-file) is required\n", a->cmd);
        return -1;
    }
    if (!strcmp(a->cmd, "classify") && !a->candidates) {
        fprintf(stderr, "medmoe: classify: --candidates a,b,c is required\n");
        return -1;
    }
    return 0;
}

/* The whole file (flag names it in messages), with a NUL after its bytes. */
static int s_read_file(const char *flag, const char *path, uint8_t **out, size_t *len) {
    *out = NULL;
    *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "medmoe: %s %s: %s\n", flag, path, strerror(errno));
        return -1;
    }
    size_t cap = 1 << 16, n = 0;
    uint8_t *buf = malloc(cap);
    for (;;) {
        if (!buf) {
            fclose(f);
            fprintf(stderr, "medmoe: %s %s: out of memory\n", flag, path);
            return -1;
        }
        n += fread(buf + n, 1, cap - 1 - n, f);
        if (n < cap - 1)
            break;
        if (cap >= S_MAX_IMAGE_FILE) {
            free(buf);
            fclose(f);
            fprintf(stderr, "medmoe: %s %s: larger than %zu bytes\n", flag, path, S_MAX_IMAGE_FILE);
            return -1;
        }
        uint8_t *nb = realloc(buf, cap * 2);
        if (!nb)
            free(buf);
        buf = nb;
        cap *= 2;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        fprintf(stderr, "medmoe: %s %s: read error\n", flag, path);
        return -1;
    }
    buf[n] = 0;
    *out = buf;
    *len = n;
    return 0;
}

/* ---- JSON views of the replies (proto field names) -------------------------------- */

static json_t *s_routing_json(size_t n, Medmoe__V1__LayerRouting **r) {
    json_t *arr = json_array();
    for (size_t i = 0; i < n; i++) {
        json_t *img = json_array(), *txt = json_array();
        for (size_t e = 0; e < r[i]->n_image_tokens_per_expert; e++)
            json_array_append_new(img, json_integer(r[i]->image_tokens_per_expert[e]));
        for (size_t e = 0; e < r[i]->n_text_tokens_per_expert; e++)
            json_array_append_new(txt, json_integer(r[i]->text_tokens_per_expert[e]));
        json_array_append_new(arr, json_pack("{s:i, s:o, s:o}", "layer", (json_int_t)r[i]->layer,
                                             "image_tokens_per_expert", img,
                                             "text_tokens_per_expert", txt));
    }
    return arr;
}

static json_t *s_timings_json(const Medmoe__V1__Timings *t) {
    if (!t)
        return json_object();
    return json_pack("{s:f, s:f, s:f, s:f, s:f}", "queue_ms", t->queue_ms, "vision_ms",
                     t->vision_ms, "ttft_ms", t->ttft_ms, "total_ms", t->total_ms,
                     "decode_ms_per_token", t->decode_ms_per_token);
}

/* Strings from the wire are UTF-8 by contract, but jansson refuses invalid
 * UTF-8 outright: fall back to a lossy copy rather than dropping the field. */
static json_t *s_str(const char *s) {
    json_t *j = json_string(s ? s : "");
    if (j)
        return j;
    size_t n = strlen(s);
    char *c = malloc(n + 1);
    if (!c)
        return json_null();
    for (size_t i = 0; i <= n; i++)
        c[i] = (unsigned char)s[i] < 0x80 ? s[i] : '?';
    j = json_string(c);
    free(c);
    return j ? j : json_null();
}

static json_t *s_answer_json(const Medmoe__V1__CaseAnswer *a) {
    json_t *tok = json_array();
    for (size_t i = 0; i < a->n_tokens; i++)
        json_array_append_new(tok, json_integer(a->tokens[i]));
    return json_pack("{s:o, s:o, s:o, s:i, s:i, s:o, s:o, s:o}", "case_id", s_str(a->case_id),
                     "answer", s_str(a->answer), "tokens", tok, "prompt_tokens",
                     (json_int_t)a->prompt_tokens, "generated_tokens",
                     (json_int_t)a->generated_tokens, "routing",
                     s_routing_json(a->n_routing, a->routing), "timings",
                     s_timings_json(a->timings), "finish_reason", s_str(a->finish_reason));
}

static json_t *s_classify_json(const Medmoe__V1__ClassifyResult *r) {
    json_t *c = json_array();
    for (size_t i = 0; i < r->n_candidates; i++)
        json_array_append_new(c, json_pack("{s:o, s:f, s:f}", "text", s_str(r->candidates[i]->text),
                                           "logprob", r->candidates[i]->logprob, "prob",
                                           r->candidates[i]->prob));
    return json_pack("{s:o, s:o, s:o, s:o}", "case_id", s_str(r->case_id), "candidates", c,
                     "routing", s_routing_json(r->n_routing, r->routing), "timings",
                     s_timings_json(r->timings));
}

static void s_print_json(json_t *j) {
    char *s = j ? json_dumps(j, JSON_INDENT(1)) : NULL;
    if (s)
        printf("%s\n", s);
    else
        fprintf(stderr, "medmoe: cannot format the reply as JSON\n");
    free(s);
    json_decref(j);
}

/* ---- calls ---------------------------------------------------------------------------- */

static int s_rpc_failed(const mm_grpc_status *st) {
    fprintf(stderr, "medmoe: %s: %s\n", mm_grpc_code_name(st->code), st->message);
    return S_EXIT_RPC;
}

typedef struct s_stream_state {
    const s_args *a;
    Medmoe__V1__CaseAnswer *final;
    int bad;
} s_stream_state;

static int s_on_chunk(void *user, const uint8_t *msg, size_t len) {
    s_stream_state *s = user;
    Medmoe__V1__AnswerChunk *ch = medmoe__v1__answer_chunk__unpack(NULL, len, msg);
    if (!ch) {
        s->bad = 1;
        return 1;
    }
    if (!s->a->json && ch->text && *ch->text) {
        fputs(ch->text, stdout);
        fflush(stdout);
    }
    if (ch->final) {
        /* Keep the final answer: re-pack it detached from the chunk. */
        size_t n = medmoe__v1__case_answer__get_packed_size(ch->final);
        uint8_t *buf = malloc(n ? n : 1);
        if (buf) {
            medmoe__v1__case_answer__pack(ch->final, buf);
            if (s->final)
                medmoe__v1__case_answer__free_unpacked(s->final, NULL);
            s->final = medmoe__v1__case_answer__unpack(NULL, n, buf);
            free(buf);
        }
    }
    medmoe__v1__answer_chunk__free_unpacked(ch, NULL);
    return 0;
}

static int s_ask(mm_grpc_client *c, const s_args *a, const uint8_t *req, size_t req_len) {
    mm_grpc_status st;
    if (a->stream) {
        s_stream_state s = {.a = a};
        if (mm_grpc_server_stream(c, "/medmoe.v1.CaseService/AskStream", a->key, (int)a->timeout_ms,
                                  req, req_len, s_on_chunk, &s, &st) != MM_OK)
            return s_rpc_failed(&st);
        if (s.bad) {
            fprintf(stderr,
                    "medmoe: INTERNAL: the server sent an AnswerChunk that does not parse\n");
            if (s.final)
                medmoe__v1__case_answer__free_unpacked(s.final, NULL);
            return S_EXIT_RPC;
        }
        if (st.code != MM_GRPC_OK) {
            if (!a->json)
                printf("\n");
            if (s.final)
                medmoe__v1__case_answer__free_unpacked(s.final, NULL);
            return s_rpc_failed(&st);
        }
        if (!s.final) {
            fprintf(stderr, "medmoe: INTERNAL: the stream ended without a final chunk\n");
            return S_EXIT_RPC;
        }
        if (a->json)
            s_print_json(s_answer_json(s.final));
        else
            printf("\n");
        medmoe__v1__case_answer__free_unpacked(s.final, NULL);
        return 0;
    }
    uint8_t *resp = NULL;
    size_t n = 0;
    if (mm_grpc_unary(c, "/medmoe.v1.CaseService/Ask", a->key, (int)a->timeout_ms, req, req_len,
                      &resp, &n, &st) != MM_OK ||
        st.code != MM_GRPC_OK) {
        free(resp);
        return s_rpc_failed(&st);
    }
    Medmoe__V1__CaseAnswer *ans = medmoe__v1__case_answer__unpack(NULL, n, resp);
    free(resp);
    if (!ans) {
        fprintf(stderr, "medmoe: INTERNAL: the server's CaseAnswer does not parse\n");
        return S_EXIT_RPC;
    }
    if (a->json)
        s_print_json(s_answer_json(ans));
    else
        printf("%s\n", ans->answer ? ans->answer : "");
    medmoe__v1__case_answer__free_unpacked(ans, NULL);
    return 0;
}

static int s_classify(mm_grpc_client *c, const s_args *a, const uint8_t *req, size_t req_len) {
    mm_grpc_status st;
    uint8_t *resp = NULL;
    size_t n = 0;
    if (mm_grpc_unary(c, "/medmoe.v1.CaseService/Classify", a->key, (int)a->timeout_ms, req,
                      req_len, &resp, &n, &st) != MM_OK ||
        st.code != MM_GRPC_OK) {
        free(resp);
        return s_rpc_failed(&st);
    }
    Medmoe__V1__ClassifyResult *r = medmoe__v1__classify_result__unpack(NULL, n, resp);
    free(resp);
    if (!r) {
        fprintf(stderr, "medmoe: INTERNAL: the server's ClassifyResult does not parse\n");
        return S_EXIT_RPC;
    }
    if (a->json) {
        s_print_json(s_classify_json(r));
    } else {
        for (size_t i = 0; i < r->n_candidates; i++)
            printf("%-24s p=%.4f  logprob=%.4f\n", r->candidates[i]->text, r->candidates[i]->prob,
                   r->candidates[i]->logprob);
    }
    medmoe__v1__classify_result__free_unpacked(r, NULL);
    return 0;
}

static const char *s_serving_name(int s) {
    switch (s) {
    case GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING: return "SERVING";
    case GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING: return "NOT_SERVING";
    case GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN:
        return "SERVICE_UNKNOWN";
    default: return "UNKNOWN";
    }
}

static int s_status(mm_grpc_client *c, const s_args *a) {
    mm_grpc_status st;
    Medmoe__V1__ServerInfoRequest ireq = MEDMOE__V1__SERVER_INFO_REQUEST__INIT;
    uint8_t ibuf[16];
    size_t ilen = medmoe__v1__server_info_request__pack(&ireq, ibuf);
    uint8_t *resp = NULL;
    size_t n = 0;
    if (mm_grpc_unary(c, "/medmoe.v1.CaseService/GetServerInfo", a->key, (int)a->timeout_ms, ibuf,
                      ilen, &resp, &n, &st) != MM_OK ||
        st.code != MM_GRPC_OK) {
        free(resp);
        return s_rpc_failed(&st);
    }
    Medmoe__V1__ServerInfo *info = medmoe__v1__server_info__unpack(NULL, n, resp);
    free(resp);
    if (!info) {
        fprintf(stderr, "medmoe: INTERNAL: the server's ServerInfo does not parse\n");
        return S_EXIT_RPC;
    }

    /* Health of the whole server ("") and of the case service. */
    const char *services[2] = {"", "medmoe.v1.CaseService"};
    const char *health[2] = {"UNKNOWN", "UNKNOWN"};
    for (int i = 0; i < 2; i++) {
        Grpc__Health__V1__HealthCheckRequest hreq = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
        hreq.service = (char *)services[i];
        uint8_t hbuf[64];
        size_t hlen = grpc__health__v1__health_check_request__pack(&hreq, hbuf);
        if (mm_grpc_unary(c, "/grpc.health.v1.Health/Check", a->key, (int)a->timeout_ms, hbuf, hlen,
                          &resp, &n, &st) != MM_OK ||
            st.code != MM_GRPC_OK) {
            free(resp);
            medmoe__v1__server_info__free_unpacked(info, NULL);
            return s_rpc_failed(&st);
        }
        Grpc__Health__V1__HealthCheckResponse *h =
            grpc__health__v1__health_check_response__unpack(NULL, n, resp);
        free(resp);
        if (!h) {
            medmoe__v1__server_info__free_unpacked(info, NULL);
            fprintf(stderr, "medmoe: INTERNAL: the server's HealthCheckResponse does not parse\n");
            return S_EXIT_RPC;
        }
        health[i] = s_serving_name(h->status);
        grpc__health__v1__health_check_response__free_unpacked(h, NULL);
    }

    if (a->json) {
        json_t *ex = json_array();
        for (size_t i = 0; i < info->n_experts; i++)
            json_array_append_new(ex,
                                  json_pack("{s:i, s:o, s:i, s:o}", "expert",
                                            (json_int_t)info->experts[i]->expert, "name",
                                            s_str(info->experts[i]->name), "live_replicas",
                                            (json_int_t)info->experts[i]->live_replicas,
                                            "fingerprint", s_str(info->experts[i]->fingerprint)));
        s_print_json(json_pack(
            "{s:{s:o, s:o, s:o, s:o, s:o, s:i, s:o}, s:s, s:s}", "server_info", "version",
            s_str(info->version), "model", s_str(info->model), "backbone", s_str(info->backbone),
            "backend", s_str(info->backend), "experts", ex, "max_concurrent_cases",
            (json_int_t)info->max_concurrent_cases, "model_fingerprint",
            s_str(info->model_fingerprint), "health", health[0], "health_case_service", health[1]));
    } else {
        printf("server:   %s\nversion:  %s\nmodel:    %s\nfingerprint: %s\nbackbone: %s\n"
               "backend:  %s\nmax concurrent cases: %u\nhealth:   %s (medmoe.v1.CaseService: %s)\n",
               a->server, info->version, info->model, info->model_fingerprint, info->backbone,
               info->backend, info->max_concurrent_cases, health[0], health[1]);
        for (size_t i = 0; i < info->n_experts; i++)
            printf("expert %u%s%s: %u live replica%s\n", info->experts[i]->expert,
                   *info->experts[i]->name ? " " : "", info->experts[i]->name,
                   info->experts[i]->live_replicas,
                   info->experts[i]->live_replicas == 1 ? "" : "s");
    }
    medmoe__v1__server_info__free_unpacked(info, NULL);
    return 0;
}

/* Splits "a,b,c" into a NULL-terminated array of strings in one allocation. */
static char **s_split_candidates(const char *list, size_t *n) {
    size_t count = 1;
    for (const char *p = list; *p; p++)
        count += *p == ',';
    size_t len = strlen(list) + 1;
    char **v = malloc(count * sizeof *v + len);
    if (!v)
        return NULL;
    char *s = (char *)(v + count);
    memcpy(s, list, len);
    size_t i = 0;
    v[i++] = s;
    for (; *s; s++)
        if (*s == ',') {
            *s = '\0';
            v[i++] = s + 1;
        }
    *n = count;
    return v;
}

int main(int argc, char **argv) {
    s_args a;
    if (s_parse_args(argc, argv, &a) != 0)
        return S_EXIT_USAGE;

    uint8_t *img = NULL;
    size_t img_len = 0;
    if (a.image && s_read_file("--image", a.image, &img, &img_len) != 0)
        return S_EXIT_USAGE;
    uint8_t *qfile = NULL; /* --question-file's bytes (a.question points here) */
    size_t q_len = 0;
    if (a.question_file) {
        if (s_read_file("--question-file", a.question_file, &qfile, &q_len) != 0) {
            free(img);
            return S_EXIT_USAGE;
        }
        /* a C string cannot carry a NUL: the message would silently cut the
         * question there, so refuse it here as the server would */
        const uint8_t *z = memchr(qfile, 0, q_len);
        if (z) {
            fprintf(stderr,
                    "medmoe: --question-file %s: NUL byte at offset %zu (a question is text)\n",
                    a.question_file, (size_t)(z - qfile));
            free(img);
            free(qfile);
            return S_EXIT_USAGE;
        }
        a.question = (const char *)qfile;
    }

    Medmoe__V1__Image image = MEDMOE__V1__IMAGE__INIT;
    image.data.data = img;
    image.data.len = img_len;
    image.media_type = (char *)(a.media_type ? a.media_type : "");
    /* a .dcm name is DICOM even without the Part 10 preamble */
    size_t il = a.image ? strlen(a.image) : 0;
    if (!a.media_type && il > 4 && strcasecmp(a.image + il - 4, ".dcm") == 0)
        image.media_type = (char *)"application/dicom";
    Medmoe__V1__DicomOptions dicom = MEDMOE__V1__DICOM_OPTIONS__INIT;
    if (a.window || a.frame) { /* the server checks the name and the frame */
        dicom.window = (char *)(a.window ? a.window : "");
        dicom.frame = (uint32_t)a.frame;
        image.dicom = &dicom;
    }

    uint8_t *req = NULL;
    size_t req_len = 0;
    char **cands = NULL;
    if (!strcmp(a.cmd, "ask")) {
        Medmoe__V1__GenerationOptions opt = MEDMOE__V1__GENERATION_OPTIONS__INIT;
        opt.max_tokens = (uint32_t)a.max_tokens;
        opt.temperature = (float)a.temperature;
        opt.top_p = (float)a.top_p;
        opt.seed = a.seed;
        Medmoe__V1__CaseRequest r = MEDMOE__V1__CASE_REQUEST__INIT;
        r.case_id = (char *)(a.case_id ? a.case_id : "");
        r.image = a.image ? &image : NULL;
        r.question = (char *)a.question;
        r.options = &opt;
        r.conv_mode = (char *)(a.conv_mode ? a.conv_mode : "");
        req_len = medmoe__v1__case_request__get_packed_size(&r);
        req = malloc(req_len ? req_len : 1);
        if (req)
            medmoe__v1__case_request__pack(&r, req);
    } else if (!strcmp(a.cmd, "classify")) {
        Medmoe__V1__ClassifyRequest r = MEDMOE__V1__CLASSIFY_REQUEST__INIT;
        cands = s_split_candidates(a.candidates, &r.n_candidates);
        if (!cands) {
            free(img);
            fprintf(stderr, "medmoe: out of memory\n");
            return S_EXIT_USAGE;
        }
        r.candidates = cands;
        r.case_id = (char *)(a.case_id ? a.case_id : "");
        r.image = a.image ? &image : NULL;
        r.question = (char *)a.question;
        r.conv_mode = (char *)(a.conv_mode ? a.conv_mode : "");
        req_len = medmoe__v1__classify_request__get_packed_size(&r);
        req = malloc(req_len ? req_len : 1);
        if (req)
            medmoe__v1__classify_request__pack(&r, req);
    }
    free(img);
    free(cands);
    free(qfile);
    if (strcmp(a.cmd, "status") && !req) {
        fprintf(stderr, "medmoe: out of memory\n");
        return S_EXIT_USAGE;
    }

    mm_grpc_tls tls = {.ca_file = a.tls_ca, .cert_file = a.tls_cert, .key_file = a.tls_key};
    mm_grpc_client *c = NULL;
    char err[512];
    if (mm_grpc_client_new(a.server, a.tls ? &tls : NULL, &c, err, sizeof err) != MM_OK) {
        free(req);
        fprintf(stderr, "medmoe: %s\n", err);
        return S_EXIT_USAGE;
    }
    int rc;
    if (!strcmp(a.cmd, "ask"))
        rc = s_ask(c, &a, req, req_len);
    else if (!strcmp(a.cmd, "classify"))
        rc = s_classify(c, &a, req, req_len);
    else
        rc = s_status(c, &a);
    free(req);
    mm_grpc_client_destroy(&c);
    return rc;
}
