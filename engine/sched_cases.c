/* sched_cases.c — the scheduler's case and tenant bookkeeping, on_done
 * delivery and the typed result (see sched_internal.h, scheduler.c). */
#include "sched_internal.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- options, cases, tenants -------------------------------------------- */

void mm_sched_options_default(mm_sched_options *o) {
    memset(o, 0, sizeof *o);
    o->max_step_rows = 512;
    o->prefill_chunk = 256;
    o->max_queued = 256;
    o->image_workers = 1;
    o->pixel_budget = (size_t)64 << 20;
}

void mm_sched_request_default(mm_sched_request *r) {
    memset(r, 0, sizeof *r);
    r->max_tokens = 64;
    r->top_p = 1.0f;
}

void sched_case_free(s_case *c) {
    if (!c)
        return;
    free(c->tenant);
    free(c->client_id);
    free(c->bytes);
    free(c->before);
    free(c->after);
    free(c->pixels);
    free(c->img);
    free(c->tokens);
    free(c->routing);
    free(c->logits);
    mm_detok_destroy(&c->dt);
    for (size_t i = 0; c->cand_ids && i < c->n_cands; i++)
        free(c->cand_ids[i]);
    free(c->cand_ids);
    free(c->cand_n);
    free(c->cand_lp);
    free(c->cand_done);
    free(c->lent);
    free(c->cand_buf);
    free(c);
}

s_tenant *sched_tenant_find(const mm_sched *s, const char *name, size_t *idx) {
    for (size_t i = 0; i < s->n_tenants; i++)
        if (strcmp(s->tenants[i].name, name) == 0) {
            if (idx)
                *idx = i;
            return &s->tenants[i];
        }
    return NULL;
}

s_tenant *sched_tenant_get(mm_sched *s, const char *name) {
    s_tenant *t = sched_tenant_find(s, name, NULL);
    if (t)
        return t;
    if (s->n_tenants == s->cap_tenants) {
        size_t cap = s->cap_tenants ? 2 * s->cap_tenants : 8;
        s_tenant *nt = realloc(s->tenants, cap * sizeof *nt);
        if (!nt)
            return NULL;
        s->tenants = nt;
        s->cap_tenants = cap;
    }
    t = &s->tenants[s->n_tenants];
    memset(t, 0, sizeof *t);
    if (!(t->name = strdup(name)))
        return NULL;
    s->n_tenants++;
    return t;
}

/* Forget a tenant with nothing left, keeping both round-robin cursors on
 * the same next tenant. */
void sched_tenant_release(mm_sched *s, const char *name) {
    size_t i;
    s_tenant *t = sched_tenant_find(s, name, &i);
    if (!t || t->n_img || t->waiting || t->active)
        return;
    free(t->name);
    memmove(&s->tenants[i], &s->tenants[i + 1], (s->n_tenants - i - 1) * sizeof *t);
    s->n_tenants--;
    if (i < s->rr)
        s->rr--;
    if (i < s->img_rr)
        s->img_rr--;
    if (s->rr >= s->n_tenants)
        s->rr = 0;
    if (s->img_rr >= s->n_tenants)
        s->img_rr = 0;
}

/* Unlink c from a FIFO; 1 if it was there. */
int sched_fifo_remove(s_case **head, s_case **tail, s_case *c) {
    s_case **pp = head, *prev = NULL;
    while (*pp && *pp != c) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    if (!*pp)
        return 0;
    *pp = c->next;
    if (*tail == c)
        *tail = prev;
    c->next = NULL;
    return 1;
}

void sched_fifo_push(s_case **head, s_case **tail, s_case *c) {
    c->next = NULL;
    if (*tail)
        (*tail)->next = c;
    else
        *head = c;
    *tail = c;
}

/* Take c out of every structure (locked). It is then the caller's alone. */
void sched_detach(mm_sched *s, s_case *c) {
    for (size_t i = 0; i < c->n_lent; i++) /* slots borrowed for candidates */
        s->lent_to[c->lent[i]] = NULL;
    c->n_lent = 0;
    s_tenant *t = sched_tenant_find(s, c->tenant, NULL);
    switch (c->state) {
    case S_IMAGE:
        if (c->busy) {
            for (int i = 0; i < s->n_workers; i++)
                if (s->img_busy[i] == c)
                    s->img_busy[i] = NULL;
        } else if (t) {
            sched_fifo_remove(&t->img_head, &t->img_tail, c);
        }
        if (t)
            t->n_img--;
        s->n_image--;
        break;
    case S_WAITING:
        if (t && sched_fifo_remove(&t->head, &t->tail, c))
            t->waiting--;
        s->n_waiting--;
        break;
    default:
        s->slots[c->slot] = NULL;
        s->n_active--;
        if (t)
            t->active--;
        break;
    }
    sched_tenant_release(s, c->tenant);
}

/* on_done, then free: outside the lock. */
void sched_deliver(s_done *d) {
    s_case *c = d->c;
    c->on_done(c->user, c->id, d->status, d->status == MM_OK ? "" : d->message, d->result);
    if (d->result) {
        mm_case_result_clear(d->result);
        free(d->result);
    }
    sched_case_free(c);
}

/* Queue a detached case's on_done for the engine's next delivery. */
void sched_push_done(mm_sched *s, s_case *c, int status, const char *message,
                     mm_case_result *result) {
    if (s->n_done == s->cap_done) {
        size_t cap = s->cap_done ? 2 * s->cap_done : 16;
        s_done *nd = realloc(s->done, cap * sizeof *nd);
        if (!nd) { /* deliver now rather than lose it (we may hold the lock:
                      only from the engine, whose callers accept that) */
            s_done d = {c, status, message, result};
            sched_deliver(&d);
            return;
        }
        s->done = nd;
        s->cap_done = cap;
    }
    /* the message must outlive the call: keep it in the case */
    if (status != MM_OK && message && message != c->fail_msg)
        snprintf(c->fail_msg, sizeof c->fail_msg, "%s", message);
    s->done[s->n_done++] = (s_done){c, status, status == MM_OK ? "" : c->fail_msg, result};
}

void sched_deliver_all(mm_sched *s) {
    /* take the list: a callback may re-enter (a refused step, a cancel) */
    s_done *list = s->done;
    size_t n = s->n_done;
    s->done = NULL;
    s->n_done = s->cap_done = 0;
    for (size_t i = 0; i < n; i++)
        sched_deliver(&list[i]);
    free(list);
}

/* ---- the answer ---------------------------------------------------------- */

static int s_cmp_cand(const void *a, const void *b) {
    const mm_candidate_score *x = a, *y = b;
    return x->logprob < y->logprob ? 1 : x->logprob > y->logprob ? -1 : 0;
}

/* Build the typed result of a finished case (engine thread, unlocked). */
int sched_result(mm_sched *s, s_case *c, mm_case_result **outp, char *err, size_t errlen) {
    mm_case_result *r = calloc(1, sizeof *r);
    if (!r)
        return mm_errorf(err, errlen, MM_ENOMEM, "result: out of memory");
    const mm_config *cfg = mm_model_config(s->m);
    size_t n_ans = c->n_tokens;
    if (n_ans && c->tokens[n_ans - 1] == s->eos)
        n_ans--;
    char *answer = NULL;
    size_t alen = 0;
    int rc = mm_tokenizer_decode(s->tok, c->tokens, n_ans, 0, &answer, &alen, err, errlen);
    if (rc != MM_OK) {
        free(r);
        return rc;
    }
    char *st = mm_case_strip(answer);
    memmove(answer, st, strlen(st) + 1);
    r->answer = answer;
    r->case_id = c->id;
    r->tenant = c->tenant;
    c->tenant = NULL; /* moved: the case is detached, nothing reads it again */
    r->client_case_id = c->client_id;
    c->client_id = NULL;
    r->tokens = c->tokens;
    c->tokens = NULL;
    r->n_tokens = c->n_tokens;
    r->hit_eos = c->n_tokens && r->tokens[c->n_tokens - 1] == s->eos;
    r->truncated = c->truncated;
    r->prompt_len = c->P;
    r->image_start = c->n_img ? c->n_before : 0;
    r->image_len = c->n_img;
    r->n_moe = s->L;
    r->n_pos = c->n_pos;
    r->top_k = s->K;
    r->n_experts = s->n_experts;
    size_t nr = s->L * c->n_pos * s->K, nc = s->L * s->n_experts;
    r->routing = malloc((nr ? nr : 1) * sizeof *r->routing);
    r->moe_layer = malloc((s->L ? s->L : 1) * sizeof *r->moe_layer);
    r->image_count = calloc(nc ? nc : 1, sizeof *r->image_count);
    r->text_count = calloc(nc ? nc : 1, sizeof *r->text_count);
    if (!r->routing || !r->moe_layer || !r->image_count || !r->text_count) {
        mm_case_result_clear(r);
        free(r);
        return mm_errorf(err, errlen, MM_ENOMEM, "result: out of memory");
    }
    for (size_t l = 0; l < s->L; l++) {
        r->moe_layer[l] = cfg->moe_layers_idx[l];
        for (size_t pos = 0; pos < c->n_pos; pos++) {
            int is_img = c->n_img && pos >= r->image_start && pos < r->image_start + c->n_img;
            for (size_t j = 0; j < s->K; j++) {
                int32_t e = c->routing[(l * c->cap + pos) * s->K + j];
                r->routing[(l * c->n_pos + pos) * s->K + j] = e;
                if (e >= 0 && (size_t)e < s->n_experts)
                    (is_img ? r->image_count : r->text_count)[l * s->n_experts + (size_t)e]++;
            }
        }
    }
    if (c->keep_logits) {
        r->logits = c->logits;
        c->logits = NULL;
        r->vocab = s->V;
    }
    if (c->n_cands) {
        r->candidates = calloc(c->n_cands, sizeof *r->candidates);
        if (!r->candidates) {
            mm_case_result_clear(r);
            free(r);
            return mm_errorf(err, errlen, MM_ENOMEM, "result: out of memory");
        }
        r->n_candidates = c->n_cands;
        double mx = c->cand_lp[0], sum = 0;
        for (size_t i = 1; i < c->n_cands; i++)
            mx = c->cand_lp[i] > mx ? c->cand_lp[i] : mx;
        for (size_t i = 0; i < c->n_cands; i++)
            sum += exp(c->cand_lp[i] - mx);
        const char *p = c->cand_buf;
        for (size_t i = 0; i < c->n_cands; i++) {
            r->candidates[i].text = strdup(p);
            r->candidates[i].logprob = c->cand_lp[i];
            r->candidates[i].prob = exp(c->cand_lp[i] - mx) / sum;
            if (!r->candidates[i].text) {
                mm_case_result_clear(r);
                free(r);
                return mm_errorf(err, errlen, MM_ENOMEM, "result: out of memory");
            }
            p += strlen(p) + 1;
        }
        qsort(r->candidates, r->n_candidates, sizeof *r->candidates, s_cmp_cand);
        r->classify_ms = c->t_cls1 - c->t_cls0;
    }
    double now = mm_now_ms();
    r->image_ms = c->image_ms;
    r->vision_ms = c->vision_ms;
    r->prefill_ms = c->t_prefill1 - c->t_prefill0;
    r->decode_ms_per_token =
        c->n_tokens > 1 ? (c->t_last - c->t_first) / (double)(c->n_tokens - 1) : 0.0;
    r->queue_ms = c->t_admit - c->t_submit;
    r->ttft_ms = c->n_tokens ? c->t_first - c->t_submit : 0.0;
    r->total_ms = now - c->t_submit;
    r->steps = c->steps;
    *outp = r;
    return MM_OK;
}
