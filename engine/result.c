/* result.c — the typed case result and its one JSON form (see result.h). */
#include "result.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "status.h"

char *mm_case_strip(char *s) {
    while (*s && isspace((unsigned char)*s))
        s++;
    size_t n = strlen(s);
    while (n && isspace((unsigned char)s[n - 1]))
        s[--n] = 0;
    return s;
}

void mm_case_result_clear(mm_case_result *r) {
    if (!r)
        return;
    free(r->tenant);
    free(r->client_case_id);
    free(r->answer);
    free(r->tokens);
    free(r->routing);
    free(r->moe_layer);
    free(r->image_count);
    free(r->text_count);
    for (size_t i = 0; r->candidates && i < r->n_candidates; i++)
        free(r->candidates[i].text);
    free(r->candidates);
    free(r->logits);
    memset(r, 0, sizeof *r);
}

/* malloc + memcpy of n elements of size sz; NULL src gives NULL. */
static int s_dup(void **dst, const void *src, size_t n, size_t sz) {
    *dst = NULL;
    if (!src)
        return 1;
    size_t bytes;
    if (!mm_size_mul(n ? n : 1, sz, &bytes) || !(*dst = malloc(bytes)))
        return 0;
    memcpy(*dst, src, n * sz);
    return 1;
}

static int s_strdup(char **dst, const char *src) {
    *dst = src ? strdup(src) : NULL;
    return !src || *dst;
}

int mm_case_result_copy(mm_case_result *d, const mm_case_result *s) {
    *d = *s;
    d->tenant = d->client_case_id = d->answer = NULL;
    d->tokens = d->routing = NULL;
    d->moe_layer = NULL;
    d->image_count = d->text_count = NULL;
    d->candidates = NULL;
    d->logits = NULL;
    size_t nr = 0, nc = 0, nl = 0;
    int ok = mm_size_mul(s->n_moe, s->n_pos, &nr) && mm_size_mul(nr, s->top_k, &nr) &&
             mm_size_mul(s->n_moe, s->n_experts, &nc) && mm_size_mul(s->n_tokens, s->vocab, &nl);
    ok = ok && s_strdup(&d->tenant, s->tenant) && s_strdup(&d->client_case_id, s->client_case_id) &&
         s_strdup(&d->answer, s->answer) &&
         s_dup((void **)&d->tokens, s->tokens, s->n_tokens, sizeof *s->tokens) &&
         s_dup((void **)&d->routing, s->routing, nr, sizeof *s->routing) &&
         s_dup((void **)&d->moe_layer, s->moe_layer, s->n_moe, sizeof *s->moe_layer) &&
         s_dup((void **)&d->image_count, s->image_count, nc, sizeof *s->image_count) &&
         s_dup((void **)&d->text_count, s->text_count, nc, sizeof *s->text_count) &&
         s_dup((void **)&d->logits, s->logits, nl, sizeof *s->logits);
    if (ok && s->candidates) {
        d->candidates = calloc(s->n_candidates ? s->n_candidates : 1, sizeof *d->candidates);
        ok = d->candidates != NULL;
        for (size_t i = 0; ok && i < s->n_candidates; i++) {
            d->candidates[i] = s->candidates[i];
            ok = s_strdup(&d->candidates[i].text, s->candidates[i].text);
        }
    }
    if (!ok) {
        if (!d->candidates)
            d->n_candidates = 0;
        mm_case_result_clear(d);
        return MM_ENOMEM;
    }
    return MM_OK;
}

json_t *mm_case_result_json(const mm_case_result *r) {
    json_t *out = json_object(), *jt = json_array(), *jr = json_array(), *js = json_array();
    if (!out || !jt || !jr || !js) {
        json_decref(out);
        json_decref(jt);
        json_decref(jr);
        json_decref(js);
        return NULL;
    }
    json_object_set_new(out, "answer", json_string(r->answer ? r->answer : ""));
    for (size_t i = 0; i < r->n_tokens; i++)
        json_array_append_new(jt, json_integer(r->tokens[i]));
    json_object_set_new(out, "tokens", jt);
    json_object_set_new(out, "prompt_len", json_integer((json_int_t)r->prompt_len));
    json_object_set_new(out, "image_start", json_integer((json_int_t)r->image_start));
    json_object_set_new(out, "image_len", json_integer((json_int_t)r->image_len));
    for (size_t l = 0; l < r->n_moe; l++) {
        json_t *je = json_array(), *ic = json_array(), *tc = json_array();
        for (size_t pos = 0; pos < r->n_pos; pos++) {
            json_t *pe = json_array();
            for (size_t j = 0; j < r->top_k; j++)
                json_array_append_new(
                    pe, json_integer(r->routing[(l * r->n_pos + pos) * r->top_k + j]));
            json_array_append_new(je, pe);
        }
        for (size_t e = 0; e < r->n_experts; e++) {
            json_array_append_new(ic, json_integer(r->image_count[l * r->n_experts + e]));
            json_array_append_new(tc, json_integer(r->text_count[l * r->n_experts + e]));
        }
        json_array_append_new(jr, json_pack("{s:i, s:o}", "layer", r->moe_layer[l], "experts", je));
        json_array_append_new(js, json_pack("{s:i, s:o, s:o}", "layer", r->moe_layer[l],
                                            "image_tokens_per_expert", ic, "text_tokens_per_expert",
                                            tc));
    }
    json_object_set_new(out, "routing", jr);
    json_object_set_new(out, "expert_summary", js);
    json_object_set_new(out, "vision_ms", json_real(r->vision_ms));
    json_object_set_new(out, "image_ms", json_real(r->image_ms));
    json_object_set_new(out, "prefill_ms", json_real(r->prefill_ms));
    json_object_set_new(out, "decode_ms_per_token", json_real(r->decode_ms_per_token));
    if (r->candidates) {
        json_t *jc = json_array();
        for (size_t i = 0; i < r->n_candidates; i++)
            json_array_append_new(jc, json_pack("{s:s, s:f, s:f}", "text", r->candidates[i].text,
                                                "logprob", r->candidates[i].logprob, "prob",
                                                r->candidates[i].prob));
        json_object_set_new(out, "candidates", jc);
        json_object_set_new(out, "classify_ms", json_real(r->classify_ms));
    }
    json_object_set_new(out, "case_id", json_integer((json_int_t)r->case_id));
    json_object_set_new(out, "tenant", json_string(r->tenant ? r->tenant : ""));
    json_object_set_new(out, "client_case_id",
                        r->client_case_id ? json_string(r->client_case_id) : json_null());
    json_object_set_new(out, "queue_ms", json_real(r->queue_ms));
    json_object_set_new(out, "ttft_ms", json_real(r->ttft_ms));
    json_object_set_new(out, "total_ms", json_real(r->total_ms));
    json_object_set_new(out, "steps", json_integer((json_int_t)r->steps));
    return out;
}

int mm_case_result_dump_logits(const mm_case_result *r, const char *path, char *err,
                               size_t errlen) {
    FILE *f = fopen(path, "wb");
    int ok = f && (!r->n_tokens || (r->logits && fwrite(r->logits, sizeof(float) * r->vocab,
                                                        r->n_tokens, f) == r->n_tokens));
    int saved = errno;
    if (f && fclose(f) != 0)
        ok = 0, saved = errno;
    if (!ok)
        return mm_errorf(err, errlen, MM_EIO, "%s: cannot write logits: %s", path, strerror(saved));
    return MM_OK;
}
