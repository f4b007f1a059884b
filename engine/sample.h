/* sample.h — choosing the next token from a row of logits: greedy (the first
 * maximum) or temperature / top-p sampling with a seeded generator. Every
 * path that picks a token uses mm_gen_pick, so seeded runs agree everywhere.
 *
 *     mm_gen_params g;  mm_gen_params_default(&g);
 *     g.temperature = 0.7f;  g.seed = 42;
 *     uint64_t rng = g.seed;
 *     int32_t next = mm_gen_pick(logits, n_scored, &g, &rng, work, order);
 */
#ifndef MM_SAMPLE_H
#define MM_SAMPLE_H

#include <stddef.h>
#include <stdint.h>

#include "clock.h"

typedef struct mm_gen_params {
    int max_tokens;    /* stop after this many generated tokens (default 64)  */
    float temperature; /* 0: greedy (default)                                  */
    float top_p;       /* nucleus mass when sampling (default 1)               */
    uint64_t seed;     /* sampling seed                                        */
    int32_t eos;       /* stop token id, < 0: none                             */
    size_t n_scored;   /* logits rows that may be chosen: len(tokenizer)       */
    int keep_logits;   /* 1: keep each step's logits in the result             */
} mm_gen_params;

void mm_gen_params_default(mm_gen_params *g);

/* Choose the next token from logits[0..n): greedy (the first maximum) when
 * g->temperature is 0, else a draw from softmax(logits / T) cut to the
 * smallest set with mass >= top_p, advancing *rng. work, order: [n]
 * scratch. */
int32_t mm_gen_pick(const float *logits, size_t n, const mm_gen_params *g, uint64_t *rng,
                    float *work, int32_t *order);

#endif
