/* seq_generate.h — the TEST ORACLE: one case through the model, sequentially
 * (prefill in one step, decode one by one, classification by one full
 * forward per candidate), written independently of engine/scheduler.c so
 * that the scheduler's batched, chunked, interleaved rows can be checked
 * against it. Production code never links this.
 *
 * The loop: the prompt
 * (text before the image, the image embeddings, text after) is prefilled in
 * one forward step, then tokens are decoded one by one (greedy by default,
 * or temperature / top-p sampling with a seed) until EOS or max_tokens.
 * Classification scores candidate answers by their log-likelihood after the
 * prompt: one forward step per candidate over prompt + candidate, so each
 * score is computed exactly as a fresh case would compute it.
 *
 *     mm_gen_params g;  mm_gen_params_default(&g);
 *     mm_gen_result r = {0};
 *     mm_prompt_input in = {before, nb, img_embeds, n_img, after, na};
 *     if (mm_generate(m, 0, &in, &g, &r, err, sizeof err) == MM_OK) ... r.tokens ...
 *     mm_gen_result_clear(&r);
 */
#ifndef MM_SEQ_GENERATE_H
#define MM_SEQ_GENERATE_H

#include <stddef.h>
#include <stdint.h>

#include "clock.h"
#include "medmoe.h"
#include "sample.h"

typedef struct mm_prompt_input {
    const int32_t *before; /* [n_before] ids before the image (or the whole text) */
    size_t n_before;
    const float *image; /* [n_image, hidden] projected image embeddings, or NULL */
    size_t n_image;
    const int32_t *after; /* [n_after] ids after the image */
    size_t n_after;
} mm_prompt_input;

typedef struct mm_gen_result {
    int32_t *tokens; /* [n_tokens] generated ids (EOS included when hit)    */
    size_t n_tokens;
    size_t prompt_len;  /* positions in the prompt (image rows included)       */
    size_t image_start; /* first image position                                */
    int32_t *routing;   /* [n_moe_layers][n_pos][top_k] experts per position   */
    size_t n_pos;       /* positions processed (prompt + fed-back tokens)      */
    float *logits;      /* [n_tokens, vocab] when keep_logits                  */
    double prefill_ms;  /* prompt forward step                                 */
    double *decode_ms;  /* [n_tokens - 1] each decode step                     */
} mm_gen_result;

void mm_gen_result_clear(mm_gen_result *r);

/* Generate in KV-cache slot `slot`. */
int mm_generate(mm_model *m, int slot, const mm_prompt_input *in, const mm_gen_params *g,
                mm_gen_result *out, char *err, size_t errlen);

typedef struct mm_candidate {
    const char *text; /* as given                                       */
    double logprob;   /* Σ log p(token | everything before)             */
    double prob;      /* softmax of logprob over the candidates          */
} mm_candidate;

/* Score each candidate's token ids (cand_ids[i], cand_n[i]) after the prompt;
 * fills cands[i].logprob/prob (same order as given; sort to rank). */
int mm_classify(mm_model *m, int slot, const mm_prompt_input *in, size_t n_scored,
                const int32_t *const *cand_ids, const size_t *cand_n, mm_candidate *cands,
                size_t n_cands, char *err, size_t errlen);

#endif
