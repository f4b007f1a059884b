/* case.c — one case end to end (see case.h). */
#include "seq_case.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "image.h"
#include "prompt.h"
#include "seq_generate.h"

void mm_case_request_default(mm_case_request *q) {
    memset(q, 0, sizeof *q);
    q->max_tokens = 64;
    q->top_p = 1.0f;
}

static int s_cmp_cand(const void *a, const void *b) {
    const mm_candidate *x = a, *y = b;
    return x->logprob < y->logprob ? 1 : x->logprob > y->logprob ? -1 : 0;
}

void mm_case_candidates_json(mm_candidate *cands, size_t n, double classify_ms, json_t *out) {
    qsort(cands, n, sizeof *cands, s_cmp_cand);
    json_t *jc = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(jc, json_pack("{s:s, s:f, s:f}", "text", cands[i].text, "logprob",
                                            cands[i].logprob, "prob", cands[i].prob));
    json_object_set_new(out, "candidates", jc);
    json_object_set_new(out, "classify_ms", json_real(classify_ms));
}

/* Classification: score " " + candidate after the prompt, ranked. */
static int s_classify(mm_model *m, const mm_tokenizer *tok, const mm_case_request *q,
                      const mm_prompt_input *in, json_t *out, char *err, size_t errlen) {
    size_t n_cands = 0;
    int rc = MM_OK;
    char *buf = strdup(q->candidates);
    int32_t **ids = NULL;
    size_t *nids = NULL;
    mm_candidate *cands = NULL;
    if (!buf)
        return mm_errorf(err, errlen, MM_ENOMEM, "out of memory");
    for (char *p = buf; p; p = strchr(p, ','), p = p ? p + 1 : NULL)
        n_cands++;
    ids = calloc(n_cands, sizeof *ids);
    nids = calloc(n_cands, sizeof *nids);
    cands = calloc(n_cands, sizeof *cands);
    if (!ids || !nids || !cands) {
        rc = mm_errorf(err, errlen, MM_ENOMEM, "out of memory");
        goto out;
    }
    char *p = buf;
    for (size_t i = 0; i < n_cands; i++) {
        char *comma = strchr(p, ',');
        if (comma)
            *comma = 0;
        cands[i].text = p;
        if (!*p) {
            rc = mm_errorf(err, errlen, MM_EINVAL, "candidates: entry %zu is empty", i + 1);
            goto out;
        }
        size_t len = strlen(p);
        char *spaced = malloc(len + 2);
        if (!spaced) {
            rc = mm_errorf(err, errlen, MM_ENOMEM, "out of memory");
            goto out;
        }
        spaced[0] = ' ';
        memcpy(spaced + 1, p, len + 1);
        rc = mm_tokenizer_encode(tok, spaced, len + 1, &ids[i], &nids[i], err, errlen);
        free(spaced);
        if (rc != MM_OK)
            goto out;
        p = comma ? comma + 1 : p + len;
    }
    double t0 = mm_now_ms();
    if ((rc = mm_classify(m, q->slot, in, mm_tokenizer_size(tok), (const int32_t *const *)ids, nids,
                          cands, n_cands, err, errlen)) != MM_OK)
        goto out;
    mm_case_candidates_json(cands, n_cands, mm_now_ms() - t0, out);
out:
    for (size_t i = 0; ids && i < n_cands; i++)
        free(ids[i]);
    free(ids);
    free(nids);
    free(cands);
    free(buf);
    return rc;
}

void mm_case_routing_json(const mm_config *c, const int32_t *routing, size_t stride, size_t n_pos,
                          size_t image_start, size_t n_img, json_t *out) {
    size_t k = (size_t)(c->top_k_experts > 0 ? c->top_k_experts : 1);
    json_t *jr = json_array(), *js = json_array();
    for (int l = 0; c->moe_enable && l < c->n_moe_layers; l++) {
        json_t *je = json_array();
        int img_count[MM_CONFIG_MAX_EXPERTS] = {0}, txt_count[MM_CONFIG_MAX_EXPERTS] = {0};
        for (size_t pos = 0; pos < n_pos; pos++) {
            json_t *pe = json_array();
            int is_img = n_img && pos >= image_start && pos < image_start + n_img;
            for (size_t j = 0; j < k; j++) {
                int32_t e = routing[((size_t)l * stride + pos) * k + j];
                json_array_append_new(pe, json_integer(e));
                if (e >= 0 && e < MM_CONFIG_MAX_EXPERTS)
                    (is_img ? img_count : txt_count)[e]++;
            }
            json_array_append_new(je, pe);
        }
        json_array_append_new(
            jr, json_pack("{s:i, s:o}", "layer", c->moe_layers_idx[l], "experts", je));
        json_t *ic = json_array(), *tc = json_array();
        for (int e = 0; e < c->num_experts[l]; e++) {
            json_array_append_new(ic, json_integer(img_count[e]));
            json_array_append_new(tc, json_integer(txt_count[e]));
        }
        json_array_append_new(js, json_pack("{s:i, s:o, s:o}", "layer", c->moe_layers_idx[l],
                                            "image_tokens_per_expert", ic, "text_tokens_per_expert",
                                            tc));
    }
    json_object_set_new(out, "routing", jr);
    json_object_set_new(out, "expert_summary", js);
}

static int s_generate(mm_model *m, const mm_tokenizer *tok, const mm_case_request *q,
                      const mm_prompt_input *in, json_t *out, char *err, size_t errlen) {
    const mm_config *c = mm_model_config(m);
    mm_gen_params g;
    mm_gen_result res = {0};
    char *answer = NULL;
    int rc;
    mm_gen_params_default(&g);
    g.max_tokens = q->max_tokens;
    g.temperature = q->temperature;
    g.top_p = q->top_p;
    g.seed = q->seed;
    g.eos = mm_tokenizer_eos_id(tok) >= 0 ? mm_tokenizer_eos_id(tok) : c->eos_token_id;
    g.n_scored = mm_tokenizer_size(tok);
    g.keep_logits = q->dump_logits != NULL;
    if ((rc = mm_generate(m, q->slot, in, &g, &res, err, errlen)) != MM_OK)
        return rc;
    size_t n_ans = res.n_tokens;
    if (n_ans && res.tokens[n_ans - 1] == g.eos)
        n_ans--;
    size_t alen = 0;
    if ((rc = mm_tokenizer_decode(tok, res.tokens, n_ans, 0, &answer, &alen, err, errlen)) != MM_OK)
        goto out;
    if (q->dump_logits) {
        FILE *f = fopen(q->dump_logits, "wb");
        size_t V = (size_t)c->vocab_size;
        int ok = f && fwrite(res.logits, sizeof(float) * V, res.n_tokens, f) == res.n_tokens;
        if (f && fclose(f) != 0)
            ok = 0;
        if (!ok) {
            rc = mm_errorf(err, errlen, MM_EIO, "%s: cannot write logits: %s", q->dump_logits,
                           strerror(errno));
            goto out;
        }
    }
    json_t *jt = json_array();
    for (size_t i = 0; i < res.n_tokens; i++)
        json_array_append_new(jt, json_integer(res.tokens[i]));
    json_object_set_new(out, "answer", json_string(mm_case_strip(answer)));
    json_object_set_new(out, "tokens", jt);
    json_object_set_new(out, "prompt_len", json_integer((json_int_t)res.prompt_len));
    json_object_set_new(out, "image_start", json_integer((json_int_t)res.image_start));
    json_object_set_new(out, "image_len", json_integer((json_int_t)in->n_image));
    mm_case_routing_json(c, res.routing, res.n_pos, res.n_pos, res.image_start, in->n_image, out);
    double dsum = 0;
    for (size_t i = 0; i + 1 < res.n_tokens; i++)
        dsum += res.decode_ms[i];
    json_object_set_new(out, "prefill_ms", json_real(res.prefill_ms));
    json_object_set_new(out, "decode_ms_per_token",
                        json_real(res.n_tokens > 1 ? dsum / (double)(res.n_tokens - 1) : 0.0));
out:
    free(answer);
    mm_gen_result_clear(&res);
    return rc;
}

int mm_case_answer(mm_model *m, const mm_tokenizer *tok, const mm_case_request *q, json_t **outp,
                   char *err, size_t errlen) {
    const mm_config *c = mm_model_config(m);
    mm_image *img = NULL;
    float *pixels = NULL, *embeds = NULL;
    mm_prompt_ids ids = {0};
    json_t *out = NULL;
    int rc = MM_OK;
    *outp = NULL;

    if (!q->question || strspn(q->question, " \t\r\n") == strlen(q->question))
        return mm_errorf(err, errlen, MM_EINVAL, "question: empty");
    int has_image = q->image_bytes || q->image_path;
    size_t n_img = 0;
    double vision_ms = 0;
    if (has_image) {
        if (!mm_model_image_tokens(m))
            return mm_errorf(err, errlen, MM_EINVAL, "image: this model has no vision tower");
        double t0 = mm_now_ms();
        if (q->image_bytes)
            rc = mm_image_decode(q->image_bytes, q->image_len, q->media_type, q->max_pixels, &img,
                                 err, errlen);
        else
            rc = mm_image_load_file(q->image_path, q->max_pixels, &img, err, errlen);
        if (rc != MM_OK)
            goto out;
        size_t S = mm_model_image_size(m), H = (size_t)c->hidden_size;
        n_img = mm_model_image_tokens(m);
        mm_image_params ip;
        mm_image_params_default(&ip, S);
        ip.pad_to_square = !q->no_pad && strcmp(c->image_aspect_ratio, "pad") == 0;
        pixels = malloc(3 * S * S * sizeof *pixels);
        embeds = malloc(n_img * H * sizeof *embeds);
        if (!pixels || !embeds) {
            rc = mm_errorf(err, errlen, MM_ENOMEM, "out of memory for the image");
            goto out;
        }
        if ((rc = mm_image_preprocess(img, &ip, pixels, err, errlen)) != MM_OK)
            goto out;
        if ((rc = mm_model_encode_image(m, pixels, embeds, err, errlen)) != MM_OK)
            goto out;
        vision_ms = mm_now_ms() - t0;
    }
    mm_conv_mode mode = c->arch == MM_ARCH_PHI ? MM_CONV_PHI : MM_CONV_STABLELM;
    if (q->conv_mode && (rc = mm_conv_mode_parse(q->conv_mode, &mode, err, errlen)) != MM_OK)
        goto out;
    if ((rc = mm_prompt_tokenize(tok, mode, q->question, strlen(q->question), has_image, &ids, err,
                                 errlen)) != MM_OK)
        goto out;
    mm_prompt_input in = {ids.before, ids.n_before, embeds, n_img, ids.after, ids.n_after};
    out = json_object();
    /* with candidates, generation still runs for q->max_tokens (0: the
     * prompt step only, which reports the routing) */
    rc = s_generate(m, tok, q, &in, out, err, errlen);
    if (rc == MM_OK && q->candidates)
        rc = s_classify(m, tok, q, &in, out, err, errlen);
    if (rc == MM_OK)
        json_object_set_new(out, "vision_ms", json_real(vision_ms));
out:
    if (rc != MM_OK)
        json_decref(out);
    else
        *outp = out;
    mm_prompt_ids_clear(&ids);
    free(pixels);
    free(embeds);
    mm_image_destroy(&img);
    return rc;
}
