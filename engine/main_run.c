/* medmoe-run — the whole engine in one process: load a Med-MoE checkpoint
 * and its CLIP tower, answer one case (an image and a question), or rank
 * candidate answers. The case runs through the same scheduler as the
 * router's (engine/scheduler.h), driven on this thread with the image done
 * inline: the numerical reference the distributed path equals.
 */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "clock.h"
#include "image.h"
#include "medmoe.h"
#include "result.h"
#include "scheduler.h"
#include "tokenizer.h"

static void usage(FILE *f) {
    fprintf(f, "usage: medmoe-run --model DIR --vision DIR --image FILE --question TEXT [options]\n"
               "\n"
               "Answer one medical case with a Med-MoE checkpoint (HF layout), in one process.\n"
               "\n"
               "  --model DIR          checkpoint dir: config.json, *.safetensors, tokenizer.json\n"
               "  --vision DIR         CLIP vision tower dir (config.json + safetensors)\n"
               "  --image FILE         PNG, JPEG or DICOM image (DICOM: by its \"DICM\" preamble,\n"
               "                       or a .dcm name; shown as a viewer would: modality and\n"
               "                       VOI LUTs, the file's window, the middle frame)\n"
               "  --window NAME        DICOM window: auto (the file's), full, or a CT preset:\n"
               "                       lung (W1500/L-600), mediastinum (W350/L50),\n"
               "                       bone (W1800/L400), brain (W80/L40)\n"
               "  --frame N            DICOM multi-frame: frame N (1-based; default middle)\n"
               "  --question TEXT      the question (must not be empty)\n"
               "  --candidates A,B,C   rank these answers by likelihood (generates nothing\n"
               "                       unless --max-tokens is given)\n"
               "  --max-tokens N       generated tokens at most (default 64)\n"
               "  --backend cpu|vulkan compute backend (default cpu)\n"
               "  --vk-device SEL      vulkan device: index, name, UUID (GPU-...) or PCI bus id\n"
               "                       (sets MEDMOE_VK_DEVICE; default: the first discrete GPU)\n"
               "  --conv-mode MODE     prompt template: stablelm, phi or simple (default: the\n"
               "                       backbone's training template)\n"
               "  --no-pad             resize + centre crop without padding to a square\n"
               "  --temperature T      sample with temperature T (default 0: greedy)\n"
               "  --top-p P            nucleus sampling mass (default 1)\n"
               "  --seed S             sampling seed (default 0)\n"
               "  --max-pixels N       refuse larger images (default 89478485)\n"
               "  --json               print a JSON object: answer, token ids, experts per MoE\n"
               "                       layer and position, timings\n"
               "  --dump-logits FILE   write each step's logits (float32 [steps, vocab])\n"
               "  --weights W          stored (default): weights as the checkpoint stores\n"
               "                       them, used in place; f32: widened to f32 at load\n"
               "                       (a copy: the numerics and speed baseline); int8:\n"
               "                       decoder weights quantised at load (cpu only)\n"
               "  -h, --help           this text\n");
}

typedef struct run_args {
    const char *model, *vision, *image, *question, *candidates, *backend, *conv_mode;
    const char *dump_logits;
    mm_dicom_options dicom; /* --window, --frame */
    int max_tokens, max_tokens_given, json, no_pad;
    mm_weights weights;
    float temperature, top_p;
    unsigned long long seed;
    size_t max_pixels;
} run_args;

static int parse_args(int argc, char **argv, run_args *a) {
    static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                         {"vision", required_argument, 0, 'v'},
                                         {"image", required_argument, 0, 'i'},
                                         {"question", required_argument, 0, 'q'},
                                         {"candidates", required_argument, 0, 'c'},
                                         {"max-tokens", required_argument, 0, 'n'},
                                         {"backend", required_argument, 0, 'b'},
                                         {"vk-device", required_argument, 0, 1001},
                                         {"conv-mode", required_argument, 0, 'C'},
                                         {"no-pad", no_argument, 0, 'P'},
                                         {"temperature", required_argument, 0, 't'},
                                         {"top-p", required_argument, 0, 'p'},
                                         {"seed", required_argument, 0, 's'},
                                         {"max-pixels", required_argument, 0, 'x'},
                                         {"json", no_argument, 0, 'j'},
                                         {"dump-logits", required_argument, 0, 'd'},
                                         {"weights", required_argument, 0, 'w'},
                                         {"window", required_argument, 0, 'W'},
                                         {"frame", required_argument, 0, 'F'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    memset(a, 0, sizeof *a);
    a->max_tokens = 64;
    a->backend = "cpu";
    a->top_p = 1.0f;
    int o;
    while ((o = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        char *end = NULL;
        errno = 0;
        switch (o) {
        case 'm': a->model = optarg; break;
        case 'v': a->vision = optarg; break;
        case 'i': a->image = optarg; break;
        case 'q': a->question = optarg; break;
        case 'c': a->candidates = optarg; break;
        case 'n':
            a->max_tokens_given = 1;
            a->max_tokens = (int)strtol(optarg, &end, 10);
            if (*end || a->max_tokens < 0 || errno) {
                fprintf(stderr, "medmoe-run: --max-tokens wants an integer >= 0\n");
                return 2;
            }
            break;
        case 'b': a->backend = optarg; break;
        case 1001: /* the backend reads it when it opens the device */
            setenv("MEDMOE_VK_DEVICE", optarg, 1);
            break;
        case 'C': a->conv_mode = optarg; break;
        case 'P': a->no_pad = 1; break;
        case 't': a->temperature = strtof(optarg, &end); break;
        case 'p': a->top_p = strtof(optarg, &end); break;
        case 's': a->seed = strtoull(optarg, &end, 10); break;
        case 'x': a->max_pixels = (size_t)strtoull(optarg, &end, 10); break;
        case 'j': a->json = 1; break;
        case 'd': a->dump_logits = optarg; break;
        case 'w':
            if (mm_weights_parse(optarg, &a->weights) != 0) {
                fprintf(stderr, "medmoe-run: --weights wants stored, f32 or int8, not '%s'\n",
                        optarg);
                return 2;
            }
            break;
        case 'W': {
            char werr[160];
            if (mm_dicom_window_parse(optarg, &a->dicom.window, werr, sizeof werr) != MM_OK) {
                fprintf(stderr, "medmoe-run: --%s\n", werr);
                return 2;
            }
            break;
        }
        case 'F': a->dicom.frame = (uint32_t)strtoul(optarg, &end, 10); break;
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); return 2;
        }
        if (end && *end) {
            fprintf(stderr, "medmoe-run: bad number '%s'\n", optarg);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "medmoe-run: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (a->question && strspn(a->question, " \t\r\n") == strlen(a->question)) {
        fprintf(stderr, "medmoe-run: --question is empty\n");
        return 2;
    }
    if (!a->model || !a->question) {
        fprintf(stderr, "medmoe-run: --model and --question are required (see --help)\n");
        return 2;
    }
    return 0;
}

/* The case's outcome, filled by on_done. */
typedef struct s_outcome {
    int done, status;
    char message[1024];
    mm_case_result r;
} s_outcome;

static void s_on_done(void *user, uint64_t id, int status, const char *message,
                      const mm_case_result *result) {
    s_outcome *o = user;
    o->done = 1;
    o->status = status;
    snprintf(o->message, sizeof o->message, "%s", message ? message : "");
    if (status == MM_OK && mm_case_result_copy(&o->r, result) != MM_OK) {
        o->status = MM_ENOMEM;
        snprintf(o->message, sizeof o->message, "out of memory copying the result");
    }
    (void)id;
}

int main(int argc, char **argv) {
    run_args a;
    int rc = parse_args(argc, argv, &a);
    if (rc)
        return rc;
    char err[1024] = "";
    mm_backend *be = NULL;
    mm_model *m = NULL;
    mm_tokenizer *tok = NULL;
    json_t *out = NULL;
    mm_sched *sched = NULL;
    int status = 1;

    double t0 = mm_now_ms();
    if ((rc = mm_backend_new(a.backend, &be, err, sizeof err)) != MM_OK)
        goto fail;
    mm_model_options mo;
    mm_model_options_default(&mo);
    mo.vision_dir = a.vision;
    mo.weights = a.weights;
    if ((rc = mm_model_load(a.model, be, &mo, &m, err, sizeof err)) != MM_OK)
        goto fail;
    if ((rc = mm_tokenizer_load(a.model, &tok, err, sizeof err)) != MM_OK)
        goto fail;
    fprintf(stderr, "medmoe-run: loaded %s on %s\n", mm_model_variant(m), mm_backend_describe(be));
    if (mm_model_warnings(m)[0])
        fprintf(stderr, "medmoe-run: warning: %s\n", mm_model_warnings(m));
    double load_ms = mm_now_ms() - t0;

    uint8_t *image = NULL;
    size_t image_len = 0;
    if (a.image && (rc = mm_image_read_file(a.image, &image, &image_len, err, sizeof err)) != MM_OK)
        goto fail;
    mm_sched_options so;
    mm_sched_options_default(&so);
    so.image_workers = 0; /* one case: decode inline, encode at admission */
    if ((rc = mm_sched_new(m, tok, &so, &sched, err, sizeof err)) != MM_OK) {
        free(image);
        goto fail;
    }
    s_outcome oc = {0};
    mm_sched_request q;
    mm_sched_request_default(&q);
    q.tenant = "local";
    q.image_bytes = image;
    q.image_len = image_len;
    q.dicom = a.dicom;
    /* a .dcm without the Part 10 preamble is still DICOM */
    size_t il = a.image ? strlen(a.image) : 0;
    if (il > 4 && strcasecmp(a.image + il - 4, ".dcm") == 0)
        q.media_type = "application/dicom";
    q.max_pixels = a.max_pixels;
    q.no_pad = a.no_pad;
    q.question = a.question;
    q.conv_mode = a.conv_mode;
    q.candidates = a.candidates;
    /* ranking candidates generates nothing unless --max-tokens says so */
    q.max_tokens = a.candidates && !a.max_tokens_given ? 0 : a.max_tokens;
    q.temperature = a.temperature;
    q.top_p = a.top_p;
    q.seed = a.seed;
    q.keep_logits = a.dump_logits != NULL;
    q.on_done = s_on_done;
    q.user = &oc;
    uint64_t id;
    rc = mm_sched_submit(sched, &q, &id, err, sizeof err);
    free(image);
    if (rc != MM_OK && a.image && strncmp(err, "image", 5) == 0) { /* name the file */
        char sub[sizeof err];
        snprintf(sub, sizeof sub, "%s", err);
        snprintf(err, sizeof err, "%.300s: %.700s", a.image, sub);
    }
    if (rc != MM_OK)
        goto fail;
    while (!oc.done && (rc = mm_sched_step(sched, err, sizeof err)) == MM_OK) {
    }
    if (rc == MM_OK && oc.status != MM_OK)
        rc = mm_errorf(err, sizeof err, oc.status, "%s", oc.message);
    if (rc != MM_OK)
        goto fail;
    if (a.dump_logits &&
        (rc = mm_case_result_dump_logits(&oc.r, a.dump_logits, err, sizeof err)) != MM_OK)
        goto fail;
    if (a.json) {
        if (!(out = mm_case_result_json(&oc.r))) {
            rc = mm_errorf(err, sizeof err, MM_ENOMEM, "out of memory");
            goto fail;
        }
        /* the scheduler's bookkeeping keys are the router's business */
        json_object_del(out, "case_id");
        json_object_del(out, "tenant");
        json_object_del(out, "client_case_id");
        json_object_set_new(out, "load_ms", json_real(load_ms));
        json_object_set_new(out, "backend", json_string(mm_backend_describe(be)));
        json_object_set_new(out, "model", json_string(mm_model_variant(m)));
        char *js = json_dumps(out, JSON_INDENT(1));
        if (js)
            printf("%s\n", js);
        free(js);
    } else if (a.candidates) {
        for (size_t i = 0; i < oc.r.n_candidates; i++)
            printf("%-24s p=%.4f  logprob=%.4f\n", oc.r.candidates[i].text, oc.r.candidates[i].prob,
                   oc.r.candidates[i].logprob);
    } else {
        printf("%s\n", oc.r.answer);
    }
    mm_case_result_clear(&oc.r);
    status = 0;
    goto done;
fail:
    fprintf(stderr, "medmoe-run: %s: %s\n", mm_status_str(rc), err);
done:
    json_decref(out);
    mm_sched_destroy(&sched);
    mm_tokenizer_destroy(&tok);
    mm_model_destroy(&m);
    mm_backend_destroy(&be);
    return status;
}
