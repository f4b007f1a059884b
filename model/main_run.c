/* medmoe-run — the whole engine in one process: load a Med-MoE checkpoint
 * and its CLIP tower, answer one case (an image and a question), or rank
 * candidate answers. The numerical reference the distributed path equals.
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "generate.h"
#include "image.h"
#include "medmoe.h"
#include "prompt.h"
#include "tokenizer.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: medmoe-run --model DIR --vision DIR --image FILE --question TEXT [options]\n"
            "\n"
            "Answer one medical case with a Med-MoE checkpoint (HF layout), in one process.\n"
            "\n"
            "  --model DIR          checkpoint dir: config.json, *.safetensors, tokenizer.json\n"
            "  --vision DIR         CLIP vision tower dir (config.json + safetensors)\n"
            "  --image FILE         PNG or JPEG image\n"
            "  --question TEXT      the question (must not be empty)\n"
            "  --candidates A,B,C   rank these answers by likelihood instead of generating\n"
            "  --max-tokens N       generated tokens at most (default 64)\n"
            "  --backend cpu|vulkan compute backend (default cpu)\n"
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
            "  -h, --help           this text\n");
}

typedef struct run_args {
    const char *model, *vision, *image, *question, *candidates, *backend, *conv_mode;
    const char *dump_logits;
    int max_tokens, json, no_pad;
    float temperature, top_p;
    unsigned long long seed;
    size_t max_pixels;
} run_args;

static int parse_args(int argc, char **argv, run_args *a) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},      {"vision", required_argument, 0, 'v'},
        {"image", required_argument, 0, 'i'},      {"question", required_argument, 0, 'q'},
        {"candidates", required_argument, 0, 'c'}, {"max-tokens", required_argument, 0, 'n'},
        {"backend", required_argument, 0, 'b'},    {"conv-mode", required_argument, 0, 'C'},
        {"no-pad", no_argument, 0, 'P'},           {"temperature", required_argument, 0, 't'},
        {"top-p", required_argument, 0, 'p'},      {"seed", required_argument, 0, 's'},
        {"max-pixels", required_argument, 0, 'x'}, {"json", no_argument, 0, 'j'},
        {"dump-logits", required_argument, 0, 'd'}, {"help", no_argument, 0, 'h'},
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
            a->max_tokens = (int)strtol(optarg, &end, 10);
            if (*end || a->max_tokens < 1 || errno) {
                fprintf(stderr, "medmoe-run: --max-tokens wants a positive integer\n");
                return 2;
            }
            break;
        case 'b': a->backend = optarg; break;
        case 'C': a->conv_mode = optarg; break;
        case 'P': a->no_pad = 1; break;
        case 't': a->temperature = strtof(optarg, &end); break;
        case 'p': a->top_p = strtof(optarg, &end); break;
        case 's': a->seed = strtoull(optarg, &end, 10); break;
        case 'x': a->max_pixels = (size_t)strtoull(optarg, &end, 10); break;
        case 'j': a->json = 1; break;
        case 'd': a->dump_logits = optarg; break;
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
    if (!a->model || !a->question) {
        fprintf(stderr, "medmoe-run: --model and --question are required (see --help)\n");
        return 2;
    }
    return 0;
}

/* Python's str.strip() for ASCII whitespace, in place. */
static char *s_strip(char *s) {
    while (*s && isspace((unsigned char)*s))
        s++;
    size_t n = strlen(s);
    while (n && isspace((unsigned char)s[n - 1]))
        s[--n] = 0;
    return s;
}

static int s_cmp_cand(const void *a, const void *b) {
    const mm_candidate *x = a, *y = b;
    return x->logprob < y->logprob ? 1 : x->logprob > y->logprob ? -1 : 0;
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
    mm_image *img = NULL;
    float *pixels = NULL, *embeds = NULL;
    mm_prompt_ids ids = {0};
    mm_gen_result res = {0};
    char *answer = NULL, *cand_buf = NULL;
    int32_t **cand_ids = NULL;
    size_t *cand_n = NULL, n_cands = 0;
    mm_candidate *cands = NULL;
    json_t *out = NULL;
    int status = 1;

    double t_start = mm_now_ms();
    if (a.question[0] == 0 || strspn(a.question, " \t\r\n") == strlen(a.question)) {
        fprintf(stderr, "medmoe-run: --question is empty\n");
        return 2;
    }
    if ((rc = mm_backend_new(a.backend, &be, err, sizeof err)) != MM_OK)
        goto fail;
    mm_model_options mo;
    mm_model_options_default(&mo);
    mo.vision_dir = a.vision;
    if ((rc = mm_model_load(a.model, be, &mo, &m, err, sizeof err)) != MM_OK)
        goto fail;
    if ((rc = mm_tokenizer_load(a.model, &tok, err, sizeof err)) != MM_OK)
        goto fail;
    const mm_config *c = mm_model_config(m);
    double load_ms = mm_now_ms() - t_start;

    /* the image: decode, preprocess, vision tower + projector */
    size_t n_img = 0;
    double vision_ms = 0;
    if (a.image) {
        if (!mm_model_image_tokens(m)) {
            rc = mm_errorf(err, sizeof err, MM_EINVAL, "%s: the model has no vision tower",
                           a.model);
            goto fail;
        }
        double t0 = mm_now_ms();
        if ((rc = mm_image_load_file(a.image, a.max_pixels, &img, err, sizeof err)) != MM_OK)
            goto fail;
        size_t S = mm_model_image_size(m), H = (size_t)c->hidden_size;
        n_img = mm_model_image_tokens(m);
        mm_image_params ip;
        mm_image_params_default(&ip, S);
        ip.pad_to_square = !a.no_pad && strcmp(c->image_aspect_ratio, "pad") == 0;
        pixels = malloc(3 * S * S * sizeof *pixels);
        embeds = malloc(n_img * H * sizeof *embeds);
        if (!pixels || !embeds) {
            rc = mm_errorf(err, sizeof err, MM_ENOMEM, "out of memory for the image");
            goto fail;
        }
        if ((rc = mm_image_preprocess(img, &ip, pixels, err, sizeof err)) != MM_OK)
            goto fail;
        if ((rc = mm_model_encode_image(m, pixels, embeds, err, sizeof err)) != MM_OK)
            goto fail;
        vision_ms = mm_now_ms() - t0;
    }

    /* the prompt */
    mm_conv_mode mode = c->arch == MM_ARCH_PHI ? MM_CONV_PHI : MM_CONV_STABLELM;
    if (a.conv_mode && (rc = mm_conv_mode_parse(a.conv_mode, &mode, err, sizeof err)) != MM_OK)
        goto fail;
    if ((rc = mm_prompt_tokenize(tok, mode, a.question, strlen(a.question), a.image != NULL, &ids,
                                 err, sizeof err)) != MM_OK)
        goto fail;
    mm_prompt_input in = {ids.before, ids.n_before, embeds, n_img, ids.after, ids.n_after};
    size_t n_scored = mm_tokenizer_size(tok);

    out = json_object();
    if (a.candidates) {
        /* classification: score " " + candidate after the prompt */
        cand_buf = strdup(a.candidates);
        if (!cand_buf) {
            rc = mm_errorf(err, sizeof err, MM_ENOMEM, "out of memory");
            goto fail;
        }
        for (char *p = cand_buf; p; p = strchr(p, ','), p = p ? p + 1 : NULL)
            n_cands++;
        cand_ids = calloc(n_cands, sizeof *cand_ids);
        cand_n = calloc(n_cands, sizeof *cand_n);
        cands = calloc(n_cands, sizeof *cands);
        if (!cand_ids || !cand_n || !cands) {
            rc = mm_errorf(err, sizeof err, MM_ENOMEM, "out of memory");
            goto fail;
        }
        char *save = NULL, *p = cand_buf;
        for (size_t i = 0; i < n_cands; i++) {
            char *comma = strchr(p, ',');
            if (comma)
                *comma = 0;
            cands[i].text = p;
            char spaced[2048];
            snprintf(spaced, sizeof spaced, " %s", p);
            if ((rc = mm_tokenizer_encode(tok, spaced, strlen(spaced), &cand_ids[i], &cand_n[i],
                                          err, sizeof err)) != MM_OK)
                goto fail;
            p = comma ? comma + 1 : p + strlen(p);
        }
        (void)save;
        double t0 = mm_now_ms();
        if ((rc = mm_classify(m, 0, &in, n_scored, (const int32_t *const *)cand_ids, cand_n,
                              cands, n_cands, err, sizeof err)) != MM_OK)
            goto fail;
        double cls_ms = mm_now_ms() - t0;
        qsort(cands, n_cands, sizeof *cands, s_cmp_cand);
        if (!a.json) {
            for (size_t i = 0; i < n_cands; i++)
                printf("%-24s p=%.4f  logprob=%.4f\n", cands[i].text, cands[i].prob,
                       cands[i].logprob);
        }
        json_t *jc = json_array();
        for (size_t i = 0; i < n_cands; i++)
            json_array_append_new(jc, json_pack("{s:s, s:f, s:f}", "text", cands[i].text,
                                                "logprob", cands[i].logprob, "prob",
                                                cands[i].prob));
        json_object_set_new(out, "candidates", jc);
        json_object_set_new(out, "answer", json_string(cands[0].text));
        json_object_set_new(out, "timings", json_pack("{s:f, s:f, s:f}", "load_ms", load_ms,
                                                      "vision_ms", vision_ms, "classify_ms",
                                                      cls_ms));
    } else {
        mm_gen_params g;
        mm_gen_params_default(&g);
        g.max_tokens = a.max_tokens;
        g.temperature = a.temperature;
        g.top_p = a.top_p;
        g.seed = a.seed;
        g.eos = mm_tokenizer_eos_id(tok) >= 0 ? mm_tokenizer_eos_id(tok) : c->eos_token_id;
        g.n_scored = n_scored;
        g.keep_logits = a.dump_logits != NULL;
        if ((rc = mm_generate(m, 0, &in, &g, &res, err, sizeof err)) != MM_OK)
            goto fail;
        size_t n_ans = res.n_tokens;
        if (n_ans && res.tokens[n_ans - 1] == g.eos)
            n_ans--;
        size_t alen = 0;
        if ((rc = mm_tokenizer_decode(tok, res.tokens, n_ans, 0, &answer, &alen, err,
                                      sizeof err)) != MM_OK)
            goto fail;
        char *stripped = s_strip(answer);
        if (!a.json)
            printf("%s\n", stripped);
        if (a.dump_logits) {
            FILE *f = fopen(a.dump_logits, "wb");
            size_t V = (size_t)c->vocab_size;
            if (!f || fwrite(res.logits, sizeof(float) * V, res.n_tokens, f) != res.n_tokens) {
                rc = mm_errorf(err, sizeof err, MM_EIO, "%s: cannot write logits: %s",
                               a.dump_logits, strerror(errno));
                if (f)
                    fclose(f);
                goto fail;
            }
            fclose(f);
        }
        json_t *jt = json_array();
        for (size_t i = 0; i < res.n_tokens; i++)
            json_array_append_new(jt, json_integer(res.tokens[i]));
        json_object_set_new(out, "answer", json_string(stripped));
        json_object_set_new(out, "tokens", jt);
        json_object_set_new(out, "prompt_len", json_integer((json_int_t)res.prompt_len));
        json_object_set_new(out, "image_start", json_integer((json_int_t)res.image_start));
        json_object_set_new(out, "image_len", json_integer((json_int_t)n_img));
        /* experts per MoE layer per position, and a per-layer summary of
         * which experts served the image tokens and the text tokens */
        size_t k = (size_t)(c->top_k_experts > 0 ? c->top_k_experts : 1);
        json_t *jr = json_array(), *js = json_array();
        for (int l = 0; c->moe_enable && l < c->n_moe_layers; l++) {
            json_t *je = json_array();
            int img_count[MM_CONFIG_MAX_EXPERTS] = {0}, txt_count[MM_CONFIG_MAX_EXPERTS] = {0};
            for (size_t pos = 0; pos < res.n_pos; pos++) {
                json_t *pe = json_array();
                for (size_t j = 0; j < k; j++) {
                    int32_t e = res.routing[((size_t)l * res.n_pos + pos) * k + j];
                    json_array_append_new(pe, json_integer(e));
                    int is_img = n_img && pos >= res.image_start && pos < res.image_start + n_img;
                    if (e >= 0 && e < MM_CONFIG_MAX_EXPERTS)
                        (is_img ? img_count : txt_count)[e]++;
                }
                json_array_append_new(je, pe);
            }
            json_array_append_new(jr, json_pack("{s:i, s:o}", "layer", c->moe_layers_idx[l],
                                                "experts", je));
            json_t *ic = json_array(), *tc = json_array();
            for (int e = 0; e < c->num_experts[l]; e++) {
                json_array_append_new(ic, json_integer(img_count[e]));
                json_array_append_new(tc, json_integer(txt_count[e]));
            }
            json_array_append_new(js, json_pack("{s:i, s:o, s:o}", "layer", c->moe_layers_idx[l],
                                                "image_tokens_per_expert", ic,
                                                "text_tokens_per_expert", tc));
        }
        json_object_set_new(out, "routing", jr);
        json_object_set_new(out, "expert_summary", js);
        double dsum = 0;
        for (size_t i = 0; i + 1 < res.n_tokens; i++)
            dsum += res.decode_ms[i];
        json_object_set_new(
            out, "timings",
            json_pack("{s:f, s:f, s:f, s:f}", "load_ms", load_ms, "vision_ms", vision_ms,
                      "prefill_ms", res.prefill_ms, "decode_ms_per_token",
                      res.n_tokens > 1 ? dsum / (double)(res.n_tokens - 1) : 0.0));
    }
    if (a.json) {
        json_object_set_new(out, "backend", json_string(mm_backend_describe(be)));
        json_object_set_new(out, "model", json_string(mm_model_variant(m)));
        char *s = json_dumps(out, JSON_INDENT(1));
        if (s) {
            printf("%s\n", s);
            free(s);
        }
    }
    status = 0;
    goto done;
fail:
    fprintf(stderr, "medmoe-run: %s: %s\n", mm_status_str(rc), err);
done:
    json_decref(out);
    for (size_t i = 0; cand_ids && i < n_cands; i++)
        free(cand_ids[i]);
    free(cand_ids);
    free(cand_n);
    free(cands);
    free(cand_buf);
    free(answer);
    mm_gen_result_clear(&res);
    mm_prompt_ids_clear(&ids);
    free(pixels);
    free(embeds);
    mm_image_destroy(&img);
    mm_tokenizer_destroy(&tok);
    mm_model_destroy(&m);
    mm_backend_destroy(&be);
    return status;
}
