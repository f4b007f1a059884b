/* result.h — the answer to one case, as a typed struct.
 *
 * The scheduler fills an mm_case_result for every case it finishes with
 * MM_OK; medmoe-run, the router's --cases path and the gRPC front door read
 * its fields directly. JSON exists only at the edges: mm_case_result_json()
 * writes the one JSON shape that medmoe-run --json and --cases print (and
 * that the tests compare key by key).
 *
 *     void on_done(void *user, uint64_t id, int status, const char *msg,
 *                  const mm_case_result *r) {
 *         if (status == MM_OK) printf("%s (%zu tokens)\n", r->answer, r->n_tokens);
 *     }
 *
 * Routing: routing[(l * n_pos + pos) * top_k + j] is the j-th expert chosen
 * by MoE layer l (decoder layer moe_layer[l]) for position pos. Positions are
 * the prompt (image rows at [image_start, image_start + image_len)) followed
 * by every generated token that was fed back. The per-layer counts
 * image_count / text_count ([n_moe][n_experts]) summarise it.
 */
#ifndef MM_RESULT_H
#define MM_RESULT_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"

typedef struct mm_candidate_score {
    char *text;     /* the candidate as given                       */
    double logprob; /* Σ log p(token | everything before)           */
    double prob;    /* softmax of logprob over the candidates        */
} mm_candidate_score;

typedef struct mm_case_result {
    uint64_t case_id;     /* the scheduler's id                              */
    char *tenant;         /* as submitted                                     */
    char *client_case_id; /* as submitted, or NULL                            */
    char *answer;         /* decoded text, leading/trailing whitespace removed */
    int32_t *tokens;      /* [n_tokens] generated ids (EOS included when hit)  */
    size_t n_tokens;
    int hit_eos;   /* 1: generation ended at EOS (else at max_tokens)  */
    int truncated; /* 1: max_tokens was cut to fit the context          */
    size_t prompt_len, image_start, image_len;
    /* routing */
    size_t n_moe, n_pos, top_k, n_experts;
    int32_t *routing;      /* [n_moe][n_pos][top_k]                             */
    int *moe_layer;        /* [n_moe] decoder layer index of each MoE layer      */
    uint32_t *image_count; /* [n_moe][n_experts] image positions per expert     */
    uint32_t *text_count;  /* [n_moe][n_experts] text positions per expert      */
    /* classification: ranked by logprob, best first (answer = the first) */
    mm_candidate_score *candidates;
    size_t n_candidates;
    /* logits of every generated token, [n_tokens][vocab] (keep_logits only) */
    float *logits;
    size_t vocab;
    /* timings, milliseconds */
    double image_ms;            /* decode + preprocessing                       */
    double vision_ms;           /* vision tower + projector                     */
    double prefill_ms;          /* first to last prefill step of the prompt     */
    double decode_ms_per_token; /* mean over the generated tokens after the first */
    double classify_ms;         /* candidate scoring                            */
    double queue_ms;            /* submit -> KV-cache slot                      */
    double ttft_ms;             /* submit -> first token (0 when none)          */
    double total_ms;            /* submit -> done                               */
    uint64_t steps;             /* forward steps the case took part in          */
} mm_case_result;

/* Free every field and zero the struct; NULL is fine. */
void mm_case_result_clear(mm_case_result *r);

/* Deep copy (for a caller that keeps a result beyond its callback). */
int mm_case_result_copy(mm_case_result *dst, const mm_case_result *src);

/* The edge format: {answer, tokens, prompt_len, image_start, image_len,
 * routing [{layer, experts: [[e...] per position]}], expert_summary [{layer,
 * image_tokens_per_expert, text_tokens_per_expert}], vision_ms, prefill_ms,
 * decode_ms_per_token, [candidates [{text, logprob, prob}], classify_ms],
 * case_id, tenant, client_case_id, queue_ms, ttft_ms, total_ms, steps}.
 * New reference, NULL when out of memory. */
json_t *mm_case_result_json(const mm_case_result *r);

/* r->logits ([n_tokens][vocab] float32, from keep_logits) to path, the
 * format of medmoe-run --dump-logits. MM_EIO names the path. */
int mm_case_result_dump_logits(const mm_case_result *r, const char *path, char *err, size_t errlen);

/* Python's str.strip() for ASCII whitespace, in place; returns s moved past
 * the leading whitespace. */
char *mm_case_strip(char *s);

#endif
