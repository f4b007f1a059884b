/* generate.c — prefill, decode and classification of one case. */
#include "seq_generate.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void mm_gen_result_clear(mm_gen_result *r) {
    free(r->tokens);
    free(r->routing);
    free(r->logits);
    free(r->decode_ms);
    memset(r, 0, sizeof *r);
}

/* The prompt as forward-step rows at positions 0.., in slot `slot`. */
typedef struct s_rows {
    int32_t *token, *slot, *pos;
    uint8_t *want;
    float *embed;
    size_t n;
} s_rows;

static void s_rows_free(s_rows *r) {
    free(r->token);
    free(r->slot);
    free(r->pos);
    free(r->want);
    free(r->embed);
    memset(r, 0, sizeof *r);
}

static int s_rows_alloc(s_rows *r, size_t n, size_t H, int with_embed) {
    r->n = n;
    r->token = calloc(n, sizeof *r->token);
    r->slot = calloc(n, sizeof *r->slot);
    r->pos = calloc(n, sizeof *r->pos);
    r->want = calloc(n, 1);
    r->embed = with_embed ? calloc(n * H, sizeof *r->embed) : NULL;
    return r->token && r->slot && r->pos && r->want && (!with_embed || r->embed);
}

/* Rows for the prompt, plus `extra` ids appended (classification). */
static int s_prompt_rows(mm_model *m, int slot, const mm_prompt_input *in, const int32_t *extra,
                         size_t n_extra, s_rows *r, char *err, size_t errlen) {
    size_t H = (size_t)mm_model_config(m)->hidden_size;
    size_t n = in->n_before + in->n_image + in->n_after + n_extra;
    if (n == 0)
        return mm_errorf(err, errlen, MM_EINVAL, "prompt is empty");
    if (n > (size_t)mm_model_max_ctx(m))
        return mm_errorf(err, errlen, MM_EINVAL,
                         "prompt of %zu positions exceeds the context of %d positions", n,
                         mm_model_max_ctx(m));
    if (!s_rows_alloc(r, n, H, in->n_image > 0))
        return mm_errorf(err, errlen, MM_ENOMEM, "out of memory for %zu prompt rows", n);
    size_t t = 0;
    for (size_t i = 0; i < in->n_before; i++)
        r->token[t++] = in->before[i];
    for (size_t i = 0; i < in->n_image; i++, t++) {
        r->token[t] = -1;
        memcpy(r->embed + t * H, in->image + i * H, H * sizeof(float));
    }
    for (size_t i = 0; i < in->n_after; i++)
        r->token[t++] = in->after[i];
    for (size_t i = 0; i < n_extra; i++)
        r->token[t++] = extra[i];
    for (size_t i = 0; i < n; i++) {
        r->slot[i] = slot;
        r->pos[i] = (int32_t)i;
    }
    return MM_OK;
}

/* Copy one step's routing [L][n][k] into the result's [L][n_pos][k] at pos0. */
static void s_keep_routing(mm_gen_result *res, const int32_t *step, size_t n, size_t pos0, size_t L,
                           size_t k, size_t cap) {
    for (size_t l = 0; l < L; l++)
        memcpy(res->routing + (l * cap + pos0) * k, step + l * n * k, n * k * sizeof *step);
}

int mm_generate(mm_model *m, int slot, const mm_prompt_input *in, const mm_gen_params *g,
                mm_gen_result *res, char *err, size_t errlen) {
    const mm_config *c = mm_model_config(m);
    size_t V = (size_t)c->vocab_size;
    size_t L = (size_t)(c->moe_enable ? c->n_moe_layers : 0);
    size_t k = (size_t)(c->top_k_experts > 0 ? c->top_k_experts : 1);
    size_t n_scored = g->n_scored && g->n_scored <= V ? g->n_scored : V;
    size_t max_new = g->max_tokens > 0 ? (size_t)g->max_tokens : 0;
    s_rows r = {0};
    float *logits = NULL, *work = NULL;
    int32_t *order = NULL, *step_routing = NULL;
    uint64_t rng = g->seed;
    int rc;

    memset(res, 0, sizeof *res);
    if ((rc = s_prompt_rows(m, slot, in, NULL, 0, &r, err, errlen)) != MM_OK)
        goto out;
    size_t P = r.n;
    size_t cap = P + max_new; /* positions the routing may hold */
    if (P + max_new > (size_t)mm_model_max_ctx(m))
        max_new = (size_t)mm_model_max_ctx(m) - P;
    res->prompt_len = P;
    res->image_start = in->n_image ? in->n_before : 0;
    res->tokens = calloc(max_new + 1, sizeof *res->tokens);
    res->routing = calloc(L * cap * k + 1, sizeof *res->routing);
    res->decode_ms = calloc(max_new + 1, sizeof *res->decode_ms);
    res->logits = g->keep_logits ? calloc((max_new + 1) * V, sizeof *res->logits) : NULL;
    logits = malloc(V * sizeof *logits);
    work = malloc(V * sizeof *work);
    order = malloc(V * sizeof *order);
    step_routing = malloc((L * P * k + 1) * sizeof *step_routing);
    if (!res->tokens || !res->routing || !res->decode_ms || (g->keep_logits && !res->logits) ||
        !logits || !work || !order || !step_routing) {
        rc = mm_errorf(err, errlen, MM_ENOMEM, "out of memory for generation");
        goto out;
    }
    /* prefill: the whole prompt in one step, logits of its last row (none
     * when nothing is to be generated: the step then only routes) */
    r.want[P - 1] = max_new > 0;
    mm_step st = {.n = P,
                  .token = r.token,
                  .embed = r.embed,
                  .slot = r.slot,
                  .pos = r.pos,
                  .want_logits = r.want};
    double t0 = mm_now_ms();
    if ((rc = mm_model_forward(m, &st, logits, step_routing, err, errlen)) != MM_OK)
        goto out;
    res->prefill_ms = mm_now_ms() - t0;
    s_keep_routing(res, step_routing, P, 0, L, k, cap);
    res->n_pos = P;

    while (max_new > 0) {
        int32_t next = mm_gen_pick(logits, n_scored, g, &rng, work, order);
        if (res->logits)
            memcpy(res->logits + res->n_tokens * V, logits, V * sizeof *logits);
        res->tokens[res->n_tokens++] = next;
        if (next == g->eos || res->n_tokens >= max_new)
            break;
        /* decode: feed the token back at the next position */
        int32_t pos = (int32_t)res->n_pos;
        uint8_t want = 1;
        mm_step d = {.n = 1, .token = &next, .slot = &slot, .pos = &pos, .want_logits = &want};
        t0 = mm_now_ms();
        if ((rc = mm_model_forward(m, &d, logits, step_routing, err, errlen)) != MM_OK)
            goto out;
        res->decode_ms[res->n_tokens - 1] = mm_now_ms() - t0;
        s_keep_routing(res, step_routing, 1, res->n_pos, L, k, cap);
        res->n_pos++;
    }
    /* compact routing from [L][cap][k] to [L][n_pos][k] */
    for (size_t l = 1; l < L; l++)
        memmove(res->routing + l * res->n_pos * k, res->routing + l * cap * k,
                res->n_pos * k * sizeof *res->routing);
out:
    s_rows_free(&r);
    free(logits);
    free(work);
    free(order);
    free(step_routing);
    if (rc != MM_OK)
        mm_gen_result_clear(res);
    return rc;
}

/* log-softmax of row[0..n) at index i */
static double s_logprob(const float *row, size_t n, int32_t i) {
    float mx = row[0];
    for (size_t j = 1; j < n; j++)
        if (row[j] > mx)
            mx = row[j];
    double sum = 0;
    for (size_t j = 0; j < n; j++)
        sum += exp((double)row[j] - mx);
    return (double)row[i] - mx - log(sum);
}

int mm_classify(mm_model *m, int slot, const mm_prompt_input *in, size_t n_scored,
                const int32_t *const *cand_ids, const size_t *cand_n, mm_candidate *cands,
                size_t n_cands, char *err, size_t errlen) {
    const mm_config *c = mm_model_config(m);
    size_t V = (size_t)c->vocab_size;
    if (n_scored == 0 || n_scored > V)
        n_scored = V;
    if (n_cands == 0)
        return mm_errorf(err, errlen, MM_EINVAL, "classify: no candidates");
    int rc = MM_OK;
    s_rows r = {0};
    float *logits = NULL;
    for (size_t ci = 0; ci < n_cands; ci++) {
        if (cand_n[ci] == 0)
            return mm_errorf(err, errlen, MM_EINVAL, "classify: candidate %zu ('%s') is empty", ci,
                             cands[ci].text ? cands[ci].text : "");
        /* the prompt and the candidate in one step; logits of the rows that
         * predict each candidate token: the prompt's last row and all but
         * the candidate's last. (The prompt part is recomputed per
         * candidate: simple, and exact; the router's scheduler shares it.) */
        if ((rc = s_prompt_rows(m, slot, in, cand_ids[ci], cand_n[ci], &r, err, errlen)) != MM_OK)
            goto out;
        size_t P = r.n - cand_n[ci];
        for (size_t t = P - 1; t < r.n - 1; t++)
            r.want[t] = 1;
        free(logits);
        if (!(logits = malloc(cand_n[ci] * V * sizeof *logits))) {
            rc = mm_errorf(err, errlen, MM_ENOMEM, "classify: out of memory");
            goto out;
        }
        mm_step st = {.n = r.n,
                      .token = r.token,
                      .embed = r.embed,
                      .slot = r.slot,
                      .pos = r.pos,
                      .want_logits = r.want};
        if ((rc = mm_model_forward(m, &st, logits, NULL, err, errlen)) != MM_OK)
            goto out;
        double lp = 0;
        for (size_t j = 0; j < cand_n[ci]; j++)
            lp += s_logprob(logits + j * V, n_scored, cand_ids[ci][j]);
        cands[ci].logprob = lp;
        s_rows_free(&r);
    }
    double mx = cands[0].logprob, sum = 0;
    for (size_t ci = 1; ci < n_cands; ci++)
        if (cands[ci].logprob > mx)
            mx = cands[ci].logprob;
    for (size_t ci = 0; ci < n_cands; ci++)
        sum += exp(cands[ci].logprob - mx);
    for (size_t ci = 0; ci < n_cands; ci++)
        cands[ci].prob = exp(cands[ci].logprob - mx) / sum;
out:
    s_rows_free(&r);
    free(logits);
    return rc;
}
