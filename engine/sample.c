/* sample.c — choosing the next token (see sample.h). */
#include "sample.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void mm_gen_params_default(mm_gen_params *g) {
    memset(g, 0, sizeof *g);
    g->max_tokens = 64;
    g->top_p = 1.0f;
    g->eos = -1;
}

/* xorshift64*: small, seedable, good enough to draw from a distribution. */
static double s_uniform(uint64_t *state) {
    uint64_t x = *state ? *state : 0x9e3779b97f4a7c15ull;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return (double)((x * 0x2545f4914f6cdd1dull) >> 11) / 9007199254740992.0;
}

static int s_cmp_desc(const void *a, const void *b, void *p) {
    const float *v = p;
    float x = v[*(const int32_t *)a], y = v[*(const int32_t *)b];
    return x < y ? 1 : x > y ? -1 : 0;
}

int32_t mm_gen_pick(const float *logits, size_t n, const mm_gen_params *g, uint64_t *rng,
                    float *work, int32_t *order) {
    size_t best = 0;
    for (size_t i = 1; i < n; i++)
        if (logits[i] > logits[best])
            best = i;
    if (g->temperature <= 0.0f)
        return (int32_t)best;
    /* softmax(logits / T), then the smallest top set with mass >= top_p */
    double sum = 0;
    for (size_t i = 0; i < n; i++) {
        work[i] = expf((logits[i] - logits[best]) / g->temperature);
        sum += work[i];
        order[i] = (int32_t)i;
    }
    for (size_t i = 0; i < n; i++)
        work[i] = (float)(work[i] / sum);
    qsort_r(order, n, sizeof *order, s_cmp_desc, work);
    double mass = 0, cut = g->top_p > 0 && g->top_p < 1 ? g->top_p : 1.0;
    size_t keep = 0;
    while (keep < n && mass < cut)
        mass += work[order[keep++]];
    double r = s_uniform(rng) * mass, acc = 0;
    for (size_t i = 0; i < keep; i++) {
        acc += work[order[i]];
        if (r < acc)
            return order[i];
    }
    return order[keep - 1];
}
