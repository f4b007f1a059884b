/* scheduler.c — the one engine: continuous batching of cases over one model
 * (see scheduler.h).
 *
 * Data: every accepted case is an s_case. Until it holds a KV-cache slot it
 * sits in one of its tenant's two FIFOs (s_tenant: `img` for the image stage,
 * `ready` for admission) or, while an image worker works on it, in
 * s->img_busy. A running case sits in s->slots[slot]. One mutex (s->mu)
 * guards all of that; it is never held while the model computes, while an
 * image is decoded, or while a callback runs.
 *
 * Ownership while unlocked: the engine (whoever runs mm_sched_step; one at a
 * time) owns the cases in slots; an image worker owns the case it took. Other
 * threads only set c->cancelled (under the lock) for such a case; the owner
 * finishes it when it is done with it.
 *
 * Exactness: a case's rows are the rows a sequential run would compute
 * (prompt rows at positions 0..P-1, maybe split in chunks, then each
 * generated token fed back at the next position); its KV-cache slot is its
 * own, and attention only reads positions <= the row's own, so stale cache
 * entries of a slot's previous case are never seen. Classification scores
 * candidate c at positions P..P+len(c)-1 of the same slot, after the prompt:
 * the prompt's KV cache is reused, and each candidate overwrites the
 * previous one's positions, which nothing reads afterwards. Sampling is
 * mm_gen_pick, as everywhere.
 */
#include "scheduler.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "image.h"
#include "prompt.h"
#include "sample.h"

typedef enum { S_IMAGE, S_WAITING, S_PREFILL, S_DECODE, S_CLASSIFY } s_state;

typedef enum { R_DECODE, R_PREFILL, R_CLASSIFY } s_row_kind;

/* Wanted logits rows per step beyond one per slot: candidate scoring. */
#define S_CLASSIFY_ROWS 64

typedef struct s_case {
    uint64_t id;
    struct s_case *next; /* tenant FIFO link (image stage or ready) */
    char *tenant, *client_id;
    s_state state;
    int slot;
    int busy;      /* an image worker has it                          */
    int cancelled; /* cancel asked while busy or in a step             */
    int finishing; /* done: finish after this step                    */
    int fail_rc;   /* finish with this status instead of MM_OK          */
    char fail_msg[1024];
    /* image stage */
    unsigned char *bytes;
    size_t nbytes, max_pixels, cost;
    char media_type[64];
    int no_pad;
    /* the prompt: before ids, image embeddings, after ids */
    int32_t *before, *after;
    size_t n_before, n_after;
    float *pixels; /* [3, S, S] when the engine encodes */
    float *img;    /* [n_img, H] */
    size_t n_img, P, n_prefilled;
    /* generation */
    size_t max_new;
    int truncated;
    mm_gen_params g;
    uint64_t rng;
    int32_t *tokens;
    size_t n_tokens;
    int32_t *routing; /* [L][cap][K] */
    size_t cap, n_pos;
    int32_t next_tok; /* fed back at position n_pos in the next step */
    mm_detok *dt;
    float *logits; /* [max_new][V] when keep_logits */
    int keep_logits;
    /* classification */
    char *cand_buf;
    size_t n_cands, max_cand;
    int32_t **cand_ids;
    size_t *cand_n;
    double *cand_lp;
    size_t cand_next, cand_off; /* candidate being scored, rows of it done */
    double t_cls0, t_cls1;
    /* callbacks */
    mm_sched_token_fn on_token;
    mm_sched_done_fn on_done;
    void *user;
    /* times (mm_now_ms) */
    double deadline, t_submit, t_admit, t_first, t_last, t_prefill0, t_prefill1;
    double image_ms, vision_ms;
    uint64_t steps;
} s_case;

typedef struct s_tenant {
    char *name;
    s_case *img_head, *img_tail; /* image stage, not taken by a worker */
    s_case *head, *tail;         /* ready for a slot                   */
    size_t n_img, waiting, active;
} s_tenant;

typedef struct s_worker {
    struct mm_sched *s;
    int index; /* into img_busy */
} s_worker;

/* A finished case on its way to its on_done (fired outside the lock). */
typedef struct s_done {
    s_case *c;
    int status;
    const char *message;
    mm_case_result *result;
} s_done;

struct mm_sched {
    mm_model *m;
    const mm_tokenizer *tok;
    mm_sched_options o;
    size_t H, V, L, K, S, n_scored, n_experts;
    int n_slots, max_ctx, pad, vision_on_worker;
    int32_t eos;
    mm_conv_mode default_mode;

    pthread_mutex_t mu;
    pthread_cond_t work_cv;  /* engine: a case became ready / was cancelled */
    pthread_cond_t image_cv; /* workers: image work or budget freed         */
    atomic_int stop;
    pthread_t engine;
    int engine_started;
    pthread_t *workers;
    struct s_worker *worker_args;
    int n_workers;

    s_case **slots;
    s_case **img_busy; /* [n_workers] cases in the image workers        */
    size_t n_image, n_active, n_waiting;
    size_t pixels_in_flight;
    s_tenant *tenants;
    size_t n_tenants, cap_tenants, rr, img_rr;
    size_t prefill_rr;
    uint64_t next_id, n_steps;
    int stepping; /* a step owns the slot cases right now */

    /* step buffers (the engine's own) */
    int32_t *row_tok, *row_slot, *row_pos, *step_routing, *order;
    uint8_t *row_want, *row_kind;
    float *row_embed, *logits, *work;
    s_case **row_case;
    size_t max_want;
    s_done *done;
    size_t n_done, cap_done;
};

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

static void s_case_free(s_case *c) {
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
    free(c->cand_buf);
    free(c);
}

static s_tenant *s_tenant_find(const mm_sched *s, const char *name, size_t *idx) {
    for (size_t i = 0; i < s->n_tenants; i++)
        if (strcmp(s->tenants[i].name, name) == 0) {
            if (idx)
                *idx = i;
            return &s->tenants[i];
        }
    return NULL;
}

static s_tenant *s_tenant_get(mm_sched *s, const char *name) {
    s_tenant *t = s_tenant_find(s, name, NULL);
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
static void s_tenant_release(mm_sched *s, const char *name) {
    size_t i;
    s_tenant *t = s_tenant_find(s, name, &i);
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
static int s_fifo_remove(s_case **head, s_case **tail, s_case *c) {
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

static void s_fifo_push(s_case **head, s_case **tail, s_case *c) {
    c->next = NULL;
    if (*tail)
        (*tail)->next = c;
    else
        *head = c;
    *tail = c;
}

/* Take c out of every structure (locked). It is then the caller's alone. */
static void s_detach(mm_sched *s, s_case *c) {
    s_tenant *t = s_tenant_find(s, c->tenant, NULL);
    switch (c->state) {
    case S_IMAGE:
        if (c->busy) {
            for (int i = 0; i < s->n_workers; i++)
                if (s->img_busy[i] == c)
                    s->img_busy[i] = NULL;
        } else if (t) {
            s_fifo_remove(&t->img_head, &t->img_tail, c);
        }
        if (t)
            t->n_img--;
        s->n_image--;
        break;
    case S_WAITING:
        if (t && s_fifo_remove(&t->head, &t->tail, c))
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
    s_tenant_release(s, c->tenant);
}

/* on_done, then free: outside the lock. */
static void s_deliver(s_done *d) {
    s_case *c = d->c;
    c->on_done(c->user, c->id, d->status, d->status == MM_OK ? "" : d->message, d->result);
    if (d->result) {
        mm_case_result_clear(d->result);
        free(d->result);
    }
    s_case_free(c);
}

/* Queue a detached case's on_done for the engine's next delivery. */
static void s_push_done(mm_sched *s, s_case *c, int status, const char *message,
                        mm_case_result *result) {
    if (s->n_done == s->cap_done) {
        size_t cap = s->cap_done ? 2 * s->cap_done : 16;
        s_done *nd = realloc(s->done, cap * sizeof *nd);
        if (!nd) { /* deliver now rather than lose it (we may hold the lock:
                      only from the engine, whose callers accept that) */
            s_done d = {c, status, message, result};
            s_deliver(&d);
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

static void s_deliver_all(mm_sched *s) {
    /* take the list: a callback may re-enter (a refused step, a cancel) */
    s_done *list = s->done;
    size_t n = s->n_done;
    s->done = NULL;
    s->n_done = s->cap_done = 0;
    for (size_t i = 0; i < n; i++)
        s_deliver(&list[i]);
    free(list);
}

/* ---- the answer ---------------------------------------------------------- */

static int s_cmp_cand(const void *a, const void *b) {
    const mm_candidate_score *x = a, *y = b;
    return x->logprob < y->logprob ? 1 : x->logprob > y->logprob ? -1 : 0;
}

/* Build the typed result of a finished case (engine thread, unlocked). */
static int s_result(mm_sched *s, s_case *c, mm_case_result **outp, char *err, size_t errlen) {
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

/* ---- new / destroy -------------------------------------------------------- */

static void *s_worker_main(void *arg);

int mm_sched_new(mm_model *m, const mm_tokenizer *tok, const mm_sched_options *o, mm_sched **out,
                 char *err, size_t errlen) {
    *out = NULL;
    mm_sched_options def;
    if (!o) {
        mm_sched_options_default(&def);
        o = &def;
    }
    if (!m || !tok)
        return mm_errorf(err, errlen, MM_EINVAL, "scheduler: model and tokenizer are required");
    int n_slots = mm_model_n_slots(m);
    if (o->max_step_rows < (size_t)n_slots)
        return mm_errorf(err, errlen, MM_EINVAL,
                         "scheduler: max_step_rows %zu is below the model's %d slots (every "
                         "running case needs its decode row in each step)",
                         o->max_step_rows, n_slots);
    if (o->prefill_chunk == 0)
        return mm_errorf(err, errlen, MM_EINVAL, "scheduler: prefill_chunk must be >= 1");
    if (o->max_queued == 0)
        return mm_errorf(err, errlen, MM_EINVAL, "scheduler: max_queued must be >= 1");
    if (o->image_workers < 0 || o->image_workers > 64)
        return mm_errorf(err, errlen, MM_EINVAL, "scheduler: image_workers %d is not in 0..64",
                         o->image_workers);
    if (o->pixel_budget == 0)
        return mm_errorf(err, errlen, MM_EINVAL, "scheduler: pixel_budget must be >= 1");
    const mm_config *c = mm_model_config(m);
    mm_sched *s = calloc(1, sizeof *s);
    if (!s)
        return mm_errorf(err, errlen, MM_ENOMEM, "scheduler: out of memory");
    s->m = m;
    s->tok = tok;
    s->o = *o;
    s->H = (size_t)c->hidden_size;
    s->V = (size_t)c->vocab_size;
    s->L = (size_t)(c->moe_enable ? c->n_moe_layers : 0);
    s->K = (size_t)(c->top_k_experts > 0 ? c->top_k_experts : 1);
    for (size_t l = 0; l < s->L; l++)
        if ((size_t)c->num_experts[l] > s->n_experts)
            s->n_experts = (size_t)c->num_experts[l];
    s->S = mm_model_image_size(m);
    s->n_scored = mm_tokenizer_size(tok);
    if (s->n_scored == 0 || s->n_scored > s->V)
        s->n_scored = s->V;
    s->n_slots = n_slots;
    s->max_ctx = mm_model_max_ctx(m);
    s->pad = strcmp(c->image_aspect_ratio, "pad") == 0;
    s->eos = mm_tokenizer_eos_id(tok) >= 0 ? mm_tokenizer_eos_id(tok) : c->eos_token_id;
    s->default_mode = c->arch == MM_ARCH_PHI ? MM_CONV_PHI : MM_CONV_STABLELM;
    /* The cpu backend keeps no state between ops (each op allocates its own
     * temporaries), so a vision encode may run beside a decode step; the
     * vulkan backend records into one queue and may not. */
    s->vision_on_worker =
        o->image_workers > 0 && strcmp(mm_backend_name(mm_model_backend(m)), "cpu") == 0;
    s->next_id = 1;
    s->max_want = (size_t)n_slots + S_CLASSIFY_ROWS;
    size_t B = o->max_step_rows, emb;
    int ok = mm_size_mul(B, s->H, &emb) && mm_size_mul(emb, sizeof(float), &emb);
    size_t lg;
    ok = ok && mm_size_mul(s->max_want, s->V, &lg) && mm_size_mul(lg, sizeof(float), &lg);
    size_t rt;
    ok = ok && mm_size_mul(s->L * s->K + 1, B, &rt) && mm_size_mul(rt, sizeof(int32_t), &rt);
    if (!ok) {
        free(s);
        return mm_errorf(err, errlen, MM_EINVAL, "scheduler: step buffers overflow size_t");
    }
    pthread_mutex_init(&s->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->work_cv, &ca);
    pthread_cond_init(&s->image_cv, &ca);
    pthread_condattr_destroy(&ca);
    s->slots = calloc((size_t)n_slots, sizeof *s->slots);
    s->img_busy = calloc((size_t)o->image_workers + 1, sizeof *s->img_busy);
    s->workers = calloc((size_t)o->image_workers + 1, sizeof *s->workers);
    s->worker_args = calloc((size_t)o->image_workers + 1, sizeof *s->worker_args);
    s->row_tok = malloc(B * sizeof *s->row_tok);
    s->row_slot = malloc(B * sizeof *s->row_slot);
    s->row_pos = malloc(B * sizeof *s->row_pos);
    s->row_want = malloc(B);
    s->row_kind = malloc(B);
    s->row_case = malloc(B * sizeof *s->row_case);
    s->row_embed = malloc(emb);
    s->logits = malloc(lg);
    s->step_routing = malloc(rt);
    s->work = malloc(s->V * sizeof *s->work);
    s->order = malloc(s->V * sizeof *s->order);
    if (!s->slots || !s->img_busy || !s->workers || !s->worker_args || !s->row_tok ||
        !s->row_slot || !s->row_pos || !s->row_want || !s->row_kind || !s->row_case ||
        !s->row_embed || !s->logits || !s->step_routing || !s->work || !s->order) {
        mm_sched_destroy(&s);
        return mm_errorf(err, errlen, MM_ENOMEM, "scheduler: out of memory for step buffers");
    }
    for (int i = 0; i < o->image_workers; i++) {
        s->worker_args[i] = (s_worker){s, i};
        if (pthread_create(&s->workers[i], NULL, s_worker_main, &s->worker_args[i]) != 0) {
            mm_sched_destroy(&s);
            return mm_errorf(err, errlen, MM_ERR, "scheduler: cannot start image worker %d", i);
        }
        s->n_workers++;
    }
    *out = s;
    return MM_OK;
}

static void *s_engine_main(void *arg);

int mm_sched_start(mm_sched *s, char *err, size_t errlen) {
    if (s->engine_started)
        return mm_errorf(err, errlen, MM_EINVAL, "scheduler: already started");
    if (pthread_create(&s->engine, NULL, s_engine_main, s) != 0)
        return mm_errorf(err, errlen, MM_ERR, "scheduler: cannot start the engine thread");
    s->engine_started = 1;
    return MM_OK;
}

void mm_sched_destroy(mm_sched **sp) {
    if (!sp || !*sp)
        return;
    mm_sched *s = *sp;
    pthread_mutex_lock(&s->mu);
    atomic_store(&s->stop, 1);
    s->stepping = 1; /* from now on a step (from a callback) is refused */
    pthread_cond_broadcast(&s->work_cv);
    pthread_cond_broadcast(&s->image_cv);
    pthread_mutex_unlock(&s->mu);
    if (s->engine_started)
        pthread_join(s->engine, NULL);
    for (int i = 0; i < s->n_workers; i++)
        pthread_join(s->workers[i], NULL);
    s->n_workers = 0;
    /* every thread is gone: finish what is left on this one */
    s_deliver_all(s);
    for (int i = 0; s->slots && i < s->n_slots; i++)
        if (s->slots[i]) {
            s_case *c = s->slots[i];
            s_detach(s, c);
            s_push_done(s, c, MM_EAGAIN, "shutting down", NULL);
        }
    while (s->n_tenants > 0) {
        s_tenant *t = &s->tenants[0];
        s_case *c = t->img_head ? t->img_head : t->head;
        if (!c) { /* cannot happen: a tenant without cases is released */
            free(t->name);
            memmove(&s->tenants[0], &s->tenants[1], (s->n_tenants - 1) * sizeof *t);
            s->n_tenants--;
            continue;
        }
        s_detach(s, c);
        s_push_done(s, c, MM_EAGAIN, "shutting down", NULL);
    }
    s_deliver_all(s);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->work_cv);
    pthread_cond_destroy(&s->image_cv);
    free(s->tenants);
    free(s->slots);
    free(s->img_busy);
    free(s->workers);
    free(s->worker_args);
    free(s->row_tok);
    free(s->row_slot);
    free(s->row_pos);
    free(s->row_want);
    free(s->row_kind);
    free(s->row_case);
    free(s->row_embed);
    free(s->logits);
    free(s->step_routing);
    free(s->work);
    free(s->order);
    free(s->done);
    free(s);
    *sp = NULL;
}

/* ---- submit --------------------------------------------------------------- */

/* The candidates, NUL-separated in c->cand_buf: from the array when given,
 * else split at the commas of r->candidates. */
static int s_candidate_buf(s_case *c, const mm_sched_request *r, size_t *n, char *err,
                           size_t errlen) {
    size_t len = 0;
    if (r->candidate_list) {
        for (size_t i = 0; i < r->n_candidate_list; i++)
            len += strlen(r->candidate_list[i]) + 1;
        if (!(c->cand_buf = malloc(len ? len : 1)))
            return mm_errorf(err, errlen, MM_ENOMEM, "candidates: out of memory");
        char *p = c->cand_buf;
        for (size_t i = 0; i < r->n_candidate_list; i++) {
            size_t l = strlen(r->candidate_list[i]) + 1;
            memcpy(p, r->candidate_list[i], l);
            p += l;
        }
        *n = r->n_candidate_list;
        return MM_OK;
    }
    len = strlen(r->candidates);
    if (!(c->cand_buf = malloc(len + 1)))
        return mm_errorf(err, errlen, MM_ENOMEM, "candidates: out of memory");
    memcpy(c->cand_buf, r->candidates, len + 1);
    *n = 1;
    for (char *p = c->cand_buf; *p; p++)
        if (*p == ',') {
            *p = 0;
            (*n)++;
        }
    return MM_OK;
}

/* " a" style ids of each candidate. */
static int s_parse_candidates(mm_sched *s, s_case *c, const mm_sched_request *r, char *err,
                              size_t errlen) {
    size_t n = 0;
    int rc0 = s_candidate_buf(c, r, &n, err, errlen);
    if (rc0 != MM_OK)
        return rc0;
    c->n_cands = n;
    c->cand_ids = calloc(n, sizeof *c->cand_ids);
    c->cand_n = calloc(n, sizeof *c->cand_n);
    c->cand_lp = calloc(n, sizeof *c->cand_lp);
    if (!c->cand_ids || !c->cand_n || !c->cand_lp)
        return mm_errorf(err, errlen, MM_ENOMEM, "candidates: out of memory");
    const char *p = c->cand_buf;
    for (size_t i = 0; i < n; i++) {
        size_t pl = strlen(p);
        if (pl == 0)
            return mm_errorf(err, errlen, MM_EINVAL, "candidates: entry %zu is empty", i + 1);
        char *spaced = malloc(pl + 2);
        if (!spaced)
            return mm_errorf(err, errlen, MM_ENOMEM, "candidates: out of memory");
        spaced[0] = ' ';
        memcpy(spaced + 1, p, pl + 1);
        char sub[512];
        int rc = mm_tokenizer_encode(s->tok, spaced, pl + 1, &c->cand_ids[i], &c->cand_n[i], sub,
                                     sizeof sub);
        free(spaced);
        if (rc != MM_OK)
            return mm_errorf(err, errlen, rc == MM_ENOMEM ? MM_ENOMEM : MM_EINVAL,
                             "candidates: entry %zu: %s", i + 1, sub);
        if (c->cand_n[i] == 0)
            return mm_errorf(err, errlen, MM_EINVAL, "candidates: entry %zu has no tokens", i + 1);
        if (c->cand_n[i] > c->max_cand)
            c->max_cand = c->cand_n[i];
        p += pl + 1;
    }
    return MM_OK;
}

/* image.c's messages start with "image: "; make sure ours do. */
static int s_image_error(int rc, const char *sub, char *err, size_t errlen) {
    return mm_errorf(err, errlen, rc == MM_ENOMEM ? MM_ENOMEM : MM_EINVAL, "%s%s",
                     strncmp(sub, "image", 5) == 0 ? "" : "image: ", sub);
}

/* Decode + preprocess c's image into c->pixels (any thread, unlocked). */
static int s_preprocess(mm_sched *s, s_case *c, char *err, size_t errlen) {
    double t0 = mm_now_ms();
    mm_image *img = NULL;
    char sub[768];
    int rc = mm_image_decode(c->bytes, c->nbytes, c->media_type[0] ? c->media_type : NULL,
                             c->max_pixels, &img, sub, sizeof sub);
    if (rc == MM_OK) {
        mm_image_params ip;
        mm_image_params_default(&ip, s->S);
        ip.pad_to_square = !c->no_pad && s->pad;
        size_t n;
        if (!mm_size_mul(3 * s->S, s->S, &n) || !(c->pixels = malloc(n * sizeof *c->pixels)))
            rc = mm_errorf(sub, sizeof sub, MM_ENOMEM, "out of memory for the image");
        else
            rc = mm_image_preprocess(img, &ip, c->pixels, sub, sizeof sub);
        mm_image_destroy(&img);
    }
    free(c->bytes);
    c->bytes = NULL;
    c->image_ms = mm_now_ms() - t0;
    c->vision_ms = c->image_ms;
    if (rc != MM_OK)
        return s_image_error(rc, sub, err, errlen);
    return MM_OK;
}

/* Sleep ms in short naps, ending early when the scheduler stops. */
static void s_nap(mm_sched *s, double ms) {
    double end = mm_now_ms() + ms;
    while (!atomic_load(&s->stop)) {
        double left = end - mm_now_ms();
        if (left <= 0)
            break;
        struct timespec ts = {0, (long)((left < 50 ? left : 50) * 1e6)};
        nanosleep(&ts, NULL);
    }
}

/* Vision tower + projector: c->pixels -> c->img (unlocked). */
static int s_encode(mm_sched *s, s_case *c, char *err, size_t errlen) {
    double t0 = mm_now_ms();
    int rc = MM_OK;
    size_t n;
    if (s->o.debug_vision_delay_ms > 0)
        s_nap(s, s->o.debug_vision_delay_ms);
    if (!mm_size_mul(c->n_img, s->H, &n) || !(c->img = malloc(n * sizeof *c->img)))
        rc = mm_errorf(err, errlen, MM_ENOMEM, "vision: out of memory");
    else
        rc = mm_model_encode_image(s->m, c->pixels, c->img, err, errlen);
    free(c->pixels);
    c->pixels = NULL;
    c->vision_ms += mm_now_ms() - t0;
    return rc;
}

int mm_sched_submit(mm_sched *s, const mm_sched_request *r, uint64_t *case_id, char *err,
                    size_t errlen) {
    if (case_id)
        *case_id = 0;
    if (!r)
        return mm_errorf(err, errlen, MM_EINVAL, "submit: no request");
    if (!r->tenant || !*r->tenant)
        return mm_errorf(err, errlen, MM_EINVAL, "tenant: empty");
    if (!r->on_done)
        return mm_errorf(err, errlen, MM_EINVAL, "on_done: a completion callback is required");
    if (!r->question || strspn(r->question, " \t\r\n") == strlen(r->question))
        return mm_errorf(err, errlen, MM_EINVAL, "question: empty");
    if (r->max_tokens < 0)
        return mm_errorf(err, errlen, MM_EINVAL, "max_tokens: %d is negative", r->max_tokens);
    if (!isfinite(r->temperature) || r->temperature < 0)
        return mm_errorf(err, errlen, MM_EINVAL, "temperature: %g is not >= 0",
                         (double)r->temperature);
    if (!isfinite(r->top_p) || r->top_p < 0 || r->top_p > 1)
        return mm_errorf(err, errlen, MM_EINVAL, "top_p: %g is not in [0, 1]", (double)r->top_p);
    if (r->candidates && !*r->candidates)
        return mm_errorf(err, errlen, MM_EINVAL, "candidates: empty list");
    if (r->candidate_list && r->n_candidate_list == 0)
        return mm_errorf(err, errlen, MM_EINVAL, "candidates: empty list");
    if (r->media_type && strlen(r->media_type) >= sizeof((s_case *)0)->media_type)
        return mm_errorf(err, errlen, MM_EINVAL, "image: media type '%.32s...' is too long",
                         r->media_type);
    double now = mm_now_ms();
    if (r->deadline_ms > 0 && now >= r->deadline_ms)
        return mm_errorf(err, errlen, MM_ETIMEOUT, "deadline: already passed %.1f ms ago",
                         now - r->deadline_ms);
    if (atomic_load(&s->stop))
        return mm_errorf(err, errlen, MM_EAGAIN, "shutting down");

    mm_conv_mode mode = s->default_mode;
    char sub[768];
    if (r->conv_mode && mm_conv_mode_parse(r->conv_mode, &mode, sub, sizeof sub) != MM_OK)
        return mm_errorf(err, errlen, MM_EINVAL, "conv_mode: %s", sub);

    int rc = MM_OK;
    mm_prompt_ids ids = {0};
    s_case *c = calloc(1, sizeof *c);
    if (!c)
        return mm_errorf(err, errlen, MM_ENOMEM, "submit: out of memory");
    c->t_submit = now;
    c->deadline = r->deadline_ms;
    c->on_token = r->on_token;
    c->on_done = r->on_done;
    c->user = r->user;
    c->slot = -1;
    c->keep_logits = r->keep_logits;
    c->no_pad = r->no_pad;
    c->max_pixels = r->max_pixels;
    if (!(c->tenant = strdup(r->tenant)) ||
        (r->client_case_id && !(c->client_id = strdup(r->client_case_id)))) {
        rc = mm_errorf(err, errlen, MM_ENOMEM, "submit: out of memory");
        goto fail;
    }
    int has_image = r->image_bytes != NULL;
    if (has_image) {
        if (!mm_model_image_tokens(s->m)) {
            rc = mm_errorf(err, errlen, MM_EINVAL, "image: this model has no vision tower");
            goto fail;
        }
        /* the header only: format, size and max_pixels are refused here,
         * and the image stage knows the pixels it will cost */
        size_t w = 0, h = 0, limit = r->max_pixels ? r->max_pixels : MM_IMAGE_DEFAULT_MAX_PIXELS;
        if ((rc = mm_image_probe(r->image_bytes, r->image_len, r->media_type, &w, &h, sub,
                                 sizeof sub)) != MM_OK) {
            rc = s_image_error(rc, sub, err, errlen);
            goto fail;
        }
        if (w > MM_IMAGE_MAX_SIDE || h > MM_IMAGE_MAX_SIDE || w * h > limit) {
            rc = mm_errorf(
                err, errlen, MM_EINVAL,
                w > MM_IMAGE_MAX_SIDE || h > MM_IMAGE_MAX_SIDE
                    ? "image: absurd dimensions %zu x %zu (each side must be <= %zu)"
                    : "image: %zu x %zu pixels exceeds the pixel limit of %zu",
                w, h,
                w > MM_IMAGE_MAX_SIDE || h > MM_IMAGE_MAX_SIDE ? (size_t)MM_IMAGE_MAX_SIDE : limit);
            goto fail;
        }
        c->cost = w * h;
        c->n_img = mm_model_image_tokens(s->m);
        if (r->media_type)
            snprintf(c->media_type, sizeof c->media_type, "%s", r->media_type);
        if (!(c->bytes = malloc(r->image_len ? r->image_len : 1))) {
            rc = mm_errorf(err, errlen, MM_ENOMEM, "image: out of memory for %zu bytes",
                           r->image_len);
            goto fail;
        }
        memcpy(c->bytes, r->image_bytes, r->image_len);
        c->nbytes = r->image_len;
        /* inline mode: decode now, encode at admission (as documented) */
        if (s->o.image_workers == 0 && (rc = s_preprocess(s, c, err, errlen)) != MM_OK)
            goto fail;
    }
    if ((rc = mm_prompt_tokenize(s->tok, mode, r->question, strlen(r->question), has_image, &ids,
                                 sub, sizeof sub)) != MM_OK) {
        rc = mm_errorf(err, errlen, rc == MM_ENOMEM ? MM_ENOMEM : MM_EINVAL, "question: %s", sub);
        goto fail;
    }
    c->before = ids.before;
    c->n_before = ids.n_before;
    c->after = ids.after;
    c->n_after = ids.n_after;
    c->P = c->n_before + c->n_img + c->n_after;
    if (c->P == 0 || c->P > (size_t)s->max_ctx) {
        rc = mm_errorf(err, errlen, MM_EINVAL,
                       "question: the prompt of %zu positions exceeds the context of %d "
                       "positions",
                       c->P, s->max_ctx);
        goto fail;
    }
    if ((r->candidates || r->candidate_list) &&
        (rc = s_parse_candidates(s, c, r, err, errlen)) != MM_OK)
        goto fail;
    if (c->n_cands && c->P + c->max_cand - 1 > (size_t)s->max_ctx) {
        rc = mm_errorf(err, errlen, MM_EINVAL,
                       "candidates: the prompt of %zu positions and a candidate of %zu tokens "
                       "exceed the context of %d positions",
                       c->P, c->max_cand, s->max_ctx);
        goto fail;
    }
    /* never run past the context */
    c->max_new = (size_t)r->max_tokens;
    if (c->P + c->max_new > (size_t)s->max_ctx) {
        c->max_new = (size_t)s->max_ctx - c->P;
        c->truncated = 1;
    }
    mm_gen_params_default(&c->g);
    c->g.max_tokens = r->max_tokens;
    c->g.temperature = r->temperature;
    c->g.top_p = r->top_p;
    c->g.seed = r->seed;
    c->g.eos = s->eos;
    c->g.n_scored = s->n_scored;
    c->rng = r->seed;
    c->cap = c->P + c->max_new;
    c->tokens = malloc((c->max_new + 1) * sizeof *c->tokens);
    c->routing = malloc((s->L * c->cap * s->K + 1) * sizeof *c->routing);
    if (c->keep_logits) {
        size_t n;
        if (!mm_size_mul(c->max_new ? c->max_new : 1, s->V * sizeof(float), &n) ||
            !(c->logits = malloc(n))) {
            rc = mm_errorf(err, errlen, MM_ENOMEM, "submit: out of memory for the logits");
            goto fail;
        }
    }
    if (!c->tokens || !c->routing || mm_detok_new(s->tok, 0, &c->dt) != MM_OK) {
        rc = mm_errorf(err, errlen, MM_ENOMEM, "submit: out of memory");
        goto fail;
    }

    pthread_mutex_lock(&s->mu);
    if (s->n_image + s->n_waiting >= s->o.max_queued) {
        rc = mm_errorf(err, errlen, MM_EAGAIN, "queue full: %zu cases waiting",
                       s->n_image + s->n_waiting);
        pthread_mutex_unlock(&s->mu);
        goto fail;
    }
    s_tenant *t = s_tenant_get(s, c->tenant);
    if (!t) {
        pthread_mutex_unlock(&s->mu);
        rc = mm_errorf(err, errlen, MM_ENOMEM, "submit: out of memory");
        goto fail;
    }
    c->id = s->next_id++;
    if (c->bytes) { /* to the image workers */
        c->state = S_IMAGE;
        s_fifo_push(&t->img_head, &t->img_tail, c);
        t->n_img++;
        s->n_image++;
        pthread_cond_signal(&s->image_cv);
    } else {
        c->state = S_WAITING;
        s_fifo_push(&t->head, &t->tail, c);
        t->waiting++;
        s->n_waiting++;
        pthread_cond_signal(&s->work_cv);
    }
    if (case_id)
        *case_id = c->id;
    pthread_mutex_unlock(&s->mu);
    return MM_OK;
fail:
    if (!c->before) /* not yet owned by the case */
        mm_prompt_ids_clear(&ids);
    s_case_free(c);
    return rc;
}

/* ---- the image workers ---------------------------------------------------- */

/* Next image-stage case, round-robin over tenants, FIFO within one, that
 * fits the pixel budget (or anything when the stage is empty) (locked). */
static s_case *s_pop_image(mm_sched *s) {
    for (size_t k = 0; k < s->n_tenants; k++) {
        size_t i = (s->img_rr + k) % s->n_tenants;
        s_tenant *t = &s->tenants[i];
        s_case *c = t->img_head;
        if (!c)
            continue;
        if (s->pixels_in_flight > 0 && s->pixels_in_flight + c->cost > s->o.pixel_budget)
            continue;
        s_fifo_remove(&t->img_head, &t->img_tail, c);
        s->img_rr = (i + 1) % s->n_tenants;
        return c;
    }
    return NULL;
}

static void *s_worker_main(void *arg) {
    s_worker *wk = arg;
    mm_sched *s = wk->s;
    int me = wk->index;
    pthread_mutex_lock(&s->mu);
    while (!atomic_load(&s->stop)) {
        s_case *c = s_pop_image(s);
        if (!c) {
            pthread_cond_wait(&s->image_cv, &s->mu);
            continue;
        }
        c->busy = 1;
        s->img_busy[me] = c;
        s->pixels_in_flight += c->cost;
        double deadline = c->deadline;
        pthread_mutex_unlock(&s->mu);

        char err[1024] = "";
        int rc = MM_OK;
        if (deadline > 0 && mm_now_ms() >= deadline)
            rc = mm_errorf(err, sizeof err, MM_ETIMEOUT, "deadline exceeded");
        else if ((rc = s_preprocess(s, c, err, sizeof err)) == MM_OK && s->vision_on_worker)
            rc = s_encode(s, c, err, sizeof err);

        pthread_mutex_lock(&s->mu);
        s->pixels_in_flight -= c->cost;
        pthread_cond_broadcast(&s->image_cv); /* budget freed */
        c->busy = 0;
        s->img_busy[me] = NULL;
        if (rc == MM_OK && c->cancelled)
            rc = mm_errorf(err, sizeof err, MM_ECANCELLED, "cancelled");
        if (rc == MM_OK && atomic_load(&s->stop))
            rc = mm_errorf(err, sizeof err, MM_EAGAIN, "shutting down");
        if (rc != MM_OK) {
            s_tenant *t = s_tenant_find(s, c->tenant, NULL);
            if (t)
                t->n_img--;
            s->n_image--;
            s_tenant_release(s, c->tenant);
            pthread_mutex_unlock(&s->mu);
            snprintf(c->fail_msg, sizeof c->fail_msg, "%s", err);
            s_done d = {c, rc, c->fail_msg, NULL};
            s_deliver(&d);
            pthread_mutex_lock(&s->mu);
            continue;
        }
        s_tenant *t = s_tenant_find(s, c->tenant, NULL);
        t->n_img--;
        s->n_image--;
        c->state = S_WAITING;
        s_fifo_push(&t->head, &t->tail, c);
        t->waiting++;
        s->n_waiting++;
        pthread_cond_signal(&s->work_cv);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* ---- cancel, counts ------------------------------------------------------- */

static s_case *s_find(mm_sched *s, uint64_t id) {
    for (int i = 0; i < s->n_slots; i++)
        if (s->slots[i] && s->slots[i]->id == id)
            return s->slots[i];
    for (int i = 0; i < s->n_workers; i++)
        if (s->img_busy[i] && s->img_busy[i]->id == id)
            return s->img_busy[i];
    for (size_t i = 0; i < s->n_tenants; i++) {
        for (s_case *c = s->tenants[i].head; c; c = c->next)
            if (c->id == id)
                return c;
        for (s_case *c = s->tenants[i].img_head; c; c = c->next)
            if (c->id == id)
                return c;
    }
    return NULL;
}

int mm_sched_cancel(mm_sched *s, uint64_t case_id) {
    pthread_mutex_lock(&s->mu);
    s_case *c = s_find(s, case_id);
    if (!c || c->cancelled) {
        pthread_mutex_unlock(&s->mu);
        return c ? MM_OK : MM_ENOTFOUND;
    }
    int owned = c->busy || (c->slot >= 0 && s->stepping);
    if (owned) { /* its owner finishes it when done with it */
        c->cancelled = 1;
        pthread_cond_signal(&s->work_cv);
        pthread_mutex_unlock(&s->mu);
        return MM_OK;
    }
    s_detach(s, c);
    pthread_mutex_unlock(&s->mu);
    snprintf(c->fail_msg, sizeof c->fail_msg, "cancelled");
    s_done d = {c, MM_ECANCELLED, c->fail_msg, NULL};
    s_deliver(&d);
    return MM_OK;
}

size_t mm_sched_pending(const mm_sched *s) {
    pthread_mutex_lock((pthread_mutex_t *)&s->mu);
    size_t n = s->n_image + s->n_waiting;
    pthread_mutex_unlock((pthread_mutex_t *)&s->mu);
    return n;
}

size_t mm_sched_active(const mm_sched *s) {
    pthread_mutex_lock((pthread_mutex_t *)&s->mu);
    size_t n = s->n_active;
    pthread_mutex_unlock((pthread_mutex_t *)&s->mu);
    return n;
}

uint64_t mm_sched_steps(const mm_sched *s) {
    pthread_mutex_lock((pthread_mutex_t *)&s->mu);
    uint64_t n = s->n_steps;
    pthread_mutex_unlock((pthread_mutex_t *)&s->mu);
    return n;
}

void mm_sched_tenant_load(const mm_sched *s, const char *tenant, size_t *waiting, size_t *active) {
    pthread_mutex_lock((pthread_mutex_t *)&s->mu);
    const s_tenant *t = tenant ? s_tenant_find(s, tenant, NULL) : NULL;
    if (waiting)
        *waiting = t ? t->n_img + t->waiting : 0;
    if (active)
        *active = t ? t->active : 0;
    pthread_mutex_unlock((pthread_mutex_t *)&s->mu);
}

int mm_sched_wait_work(mm_sched *s, int ms) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&s->mu);
    while (s->n_waiting + s->n_active == 0 && !atomic_load(&s->stop))
        if (pthread_cond_timedwait(&s->work_cv, &s->mu, &ts) != 0)
            break;
    int has = s->n_waiting + s->n_active > 0;
    pthread_mutex_unlock(&s->mu);
    return has;
}

/* ---- step ------------------------------------------------------------------ */

/* Finish what ran out of time or was cancelled (locked; not in a step). */
static void s_expire(mm_sched *s) {
    double now = mm_now_ms();
    for (int i = 0; i < s->n_slots; i++) {
        s_case *c = s->slots[i];
        if (!c)
            continue;
        if (c->cancelled || (c->deadline > 0 && now >= c->deadline)) {
            s_detach(s, c);
            s_push_done(s, c, c->cancelled ? MM_ECANCELLED : MM_ETIMEOUT,
                        c->cancelled ? "cancelled" : "deadline exceeded", NULL);
        }
    }
    for (size_t i = 0; i < s->n_tenants;) {
        s_case *hit = NULL;
        for (s_case *c = s->tenants[i].head; c && !hit; c = c->next)
            if (c->deadline > 0 && now >= c->deadline)
                hit = c;
        for (s_case *c = s->tenants[i].img_head; c && !hit; c = c->next)
            if (c->deadline > 0 && now >= c->deadline)
                hit = c;
        if (hit) { /* may drop tenant i: rescan it */
            s_detach(s, hit);
            s_push_done(s, hit, MM_ETIMEOUT, "deadline exceeded", NULL);
        } else {
            i++;
        }
    }
}

/* Next ready case, round-robin over tenants, FIFO within one (locked). */
static s_case *s_pop_waiting(mm_sched *s) {
    for (size_t k = 0; k < s->n_tenants; k++) {
        size_t i = (s->rr + k) % s->n_tenants;
        s_tenant *t = &s->tenants[i];
        if (!t->head)
            continue;
        s_case *c = t->head;
        s_fifo_remove(&t->head, &t->tail, c);
        t->waiting--;
        t->active++;
        s->n_waiting--;
        s->rr = (i + 1) % s->n_tenants;
        return c;
    }
    return NULL;
}

/* Ready cases into free slots (locked). */
static void s_admit(mm_sched *s) {
    for (int slot = 0; slot < s->n_slots && s->n_waiting > 0; slot++) {
        if (s->slots[slot])
            continue;
        s_case *c = s_pop_waiting(s);
        if (!c)
            break;
        c->state = S_PREFILL;
        c->slot = slot;
        c->t_admit = mm_now_ms();
        s->slots[slot] = c;
        s->n_active++;
    }
}

/* The prompt row at position pos: an id, or an image embedding. */
static void s_prompt_row(const mm_sched *s, const s_case *c, size_t pos, size_t row) {
    if (pos < c->n_before) {
        s->row_tok[row] = c->before[pos];
    } else if (pos < c->n_before + c->n_img) {
        s->row_tok[row] = -1;
        memcpy(s->row_embed + row * s->H, c->img + (pos - c->n_before) * s->H,
               s->H * sizeof(float));
    } else {
        s->row_tok[row] = c->after[pos - c->n_before - c->n_img];
    }
}

/* A new token for c: keep, stream, and say whether generation is done. */
static int s_take_token(mm_sched *s, s_case *c, int32_t next, const float *logits, double now) {
    if (c->n_tokens == 0)
        c->t_first = now;
    c->t_last = now;
    if (c->keep_logits)
        memcpy(c->logits + c->n_tokens * s->V, logits, s->V * sizeof(float));
    c->tokens[c->n_tokens++] = next;
    const char *piece = "";
    size_t len = 0;
    if (next != s->eos) {
        char err[256];
        if (mm_detok_push(c->dt, next, &piece, &len, err, sizeof err) != MM_OK) {
            piece = "";
            len = 0;
        }
    }
    if (c->on_token)
        c->on_token(c->user, c->id, piece, len, next);
    return next == s->eos || c->n_tokens >= c->max_new;
}

/* Generation is over: score the candidates next, or finish. */
static void s_generated(mm_sched *s, s_case *c, double now) {
    if (c->n_cands) {
        c->state = S_CLASSIFY;
        c->t_cls0 = now;
        c->cand_next = 0;
        c->cand_off = 0;
        /* one-token candidates are fully scored by the prompt's logits */
        while (c->cand_next < c->n_cands && c->cand_n[c->cand_next] < 2)
            c->cand_next++;
        if (c->cand_next == c->n_cands) {
            c->t_cls1 = now;
            c->finishing = 1;
        }
    } else {
        c->finishing = 1;
    }
}

/* log p(token i) under softmax(row[0..n)). */
static double s_logprob(const float *row, size_t n, int32_t i) {
    float mx = row[0];
    for (size_t j = 1; j < n; j++)
        mx = row[j] > mx ? row[j] : mx;
    double sum = 0;
    for (size_t j = 0; j < n; j++)
        sum += exp((double)row[j] - mx);
    return (double)row[i] - mx - log(sum);
}

/* Rows for the step: every decode row, then prefill and candidate chunks
 * within the budget. Returns the row count (engine, unlocked). */
static size_t s_build_rows(mm_sched *s, double *deadline) {
    size_t n = 0, B = s->o.max_step_rows, want = 0;
    *deadline = 0;
    for (int i = 0; i < s->n_slots; i++) {
        s_case *c = s->slots[i];
        if (!c || c->state != S_DECODE || c->fail_rc)
            continue;
        s->row_tok[n] = c->next_tok;
        s->row_slot[n] = c->slot;
        s->row_pos[n] = (int32_t)c->n_pos;
        s->row_want[n] = 1;
        s->row_kind[n] = R_DECODE;
        s->row_case[n] = c;
        n++;
        want++;
    }
    for (int k = 0; k < s->n_slots && n < B; k++) {
        s_case *c = s->slots[(s->prefill_rr + (size_t)k) % (size_t)s->n_slots];
        if (!c || c->fail_rc)
            continue;
        if (c->state == S_PREFILL) {
            size_t take = c->P - c->n_prefilled;
            if (take > s->o.prefill_chunk)
                take = s->o.prefill_chunk;
            if (take > B - n)
                take = B - n;
            if (c->n_prefilled == 0)
                c->t_prefill0 = mm_now_ms();
            for (size_t j = 0; j < take; j++, n++) {
                size_t pos = c->n_prefilled + j;
                s_prompt_row(s, c, pos, n);
                s->row_slot[n] = c->slot;
                s->row_pos[n] = (int32_t)pos;
                /* the last prompt row predicts the first token, and the
                 * first token of every candidate */
                s->row_want[n] = pos == c->P - 1 && (c->max_new > 0 || c->n_cands > 0);
                s->row_kind[n] = R_PREFILL;
                s->row_case[n] = c;
                want += s->row_want[n];
            }
        } else if (c->state == S_CLASSIFY) {
            /* rows of candidate cand_next: tokens 0..len-2 at P.., each
             * predicting the next token of the candidate */
            size_t len = c->cand_n[c->cand_next];
            size_t take = len - 1 - c->cand_off;
            if (take > B - n)
                take = B - n;
            if (take > s->max_want - want)
                take = s->max_want - want;
            for (size_t j = 0; j < take; j++, n++) {
                size_t t = c->cand_off + j;
                s->row_tok[n] = c->cand_ids[c->cand_next][t];
                s->row_slot[n] = c->slot;
                s->row_pos[n] = (int32_t)(c->P + t);
                s->row_want[n] = 1;
                s->row_kind[n] = R_CLASSIFY;
                s->row_case[n] = c;
                want++;
            }
        }
        if (c->deadline > 0 && (*deadline == 0 || c->deadline < *deadline))
            *deadline = c->deadline;
    }
    for (size_t i = 0; i < n; i++) /* decode rows' cases too */
        if (s->row_kind[i] == R_DECODE && s->row_case[i]->deadline > 0 &&
            (*deadline == 0 || s->row_case[i]->deadline < *deadline))
            *deadline = s->row_case[i]->deadline;
    s->prefill_rr = (s->prefill_rr + 1) % (size_t)s->n_slots;
    return n;
}

/* One forward over rows [i0, i1) into logits from want-row w0 and routing
 * [L][n][K] at row i0 (unlocked). */
static int s_forward(mm_sched *s, size_t i0, size_t i1, size_t n, size_t w0, double deadline,
                     int32_t *routing_tmp, char *err, size_t errlen) {
    mm_step st = {.n = i1 - i0,
                  .token = s->row_tok + i0,
                  .embed = s->row_embed + i0 * s->H,
                  .slot = s->row_slot + i0,
                  .pos = s->row_pos + i0,
                  .want_logits = s->row_want + i0,
                  .deadline_ms = deadline};
    int32_t *rt = s->L ? (i0 == 0 && i1 == n ? s->step_routing : routing_tmp) : NULL;
    int rc = mm_model_forward(s->m, &st, s->logits + w0 * s->V, rt, err, errlen);
    if (rc == MM_OK && rt && rt != s->step_routing) /* [L][i1-i0][K] -> [L][n][K] at i0 */
        for (size_t l = 0; l < s->L; l++)
            memcpy(s->step_routing + (l * n + i0) * s->K, rt + l * (i1 - i0) * s->K,
                   (i1 - i0) * s->K * sizeof(int32_t));
    return rc;
}

/* The step failed as a whole: run each case's rows alone, so that only the
 * cases whose rows cannot be computed fail (e.g. the ones routed to an
 * expert without a live replica). Rows are idempotent: each writes the KV
 * cache at its own position. A case that fails is marked (fail_rc) and its
 * rows are dropped from the step (row_case NULL). */
static void s_isolate(mm_sched *s, size_t n, int rc0, const char *err0) {
    int32_t *tmp = malloc((s->L * s->K * n + 1) * sizeof *tmp);
    size_t w = 0;
    for (size_t i0 = 0; i0 < n;) {
        s_case *c = s->row_case[i0];
        size_t i1 = i0, nw = 0;
        while (i1 < n && s->row_case[i1] == c)
            nw += s->row_want[i1++];
        char err[1024] = "";
        int rc = tmp ? s_forward(s, i0, i1, n, w, c->deadline, tmp, err, sizeof err) : rc0;
        if (rc != MM_OK) {
            c->fail_rc = rc;
            snprintf(c->fail_msg, sizeof c->fail_msg, "%s", tmp ? err : err0);
            for (size_t i = i0; i < i1; i++)
                s->row_case[i] = NULL;
        }
        w += nw;
        i0 = i1;
    }
    free(tmp);
}

/* Apply a step's outputs to its cases (engine, unlocked). */
static void s_apply(mm_sched *s, size_t n, double now) {
    for (size_t i = 0, w = 0; i < n; i++) {
        s_case *c = s->row_case[i];
        int want = s->row_want[i];
        const float *lg = s->logits + w * s->V;
        w += want;
        if (!c)
            continue;
        size_t pos = (size_t)s->row_pos[i];
        if (i == 0 || s->row_case[i - 1] != c)
            c->steps++;
        if (s->row_kind[i] == R_CLASSIFY) {
            size_t t = c->cand_off++;
            c->cand_lp[c->cand_next] +=
                s_logprob(lg, s->n_scored, c->cand_ids[c->cand_next][t + 1]);
            if (c->cand_off + 1 == c->cand_n[c->cand_next]) {
                c->cand_off = 0;
                c->cand_next++;
                while (c->cand_next < c->n_cands && c->cand_n[c->cand_next] < 2)
                    c->cand_next++;
                if (c->cand_next == c->n_cands) {
                    c->t_cls1 = now;
                    c->finishing = 1;
                }
            }
            continue;
        }
        for (size_t l = 0; l < s->L; l++)
            memcpy(c->routing + (l * c->cap + pos) * s->K, s->step_routing + (l * n + i) * s->K,
                   s->K * sizeof(int32_t));
        if (s->row_kind[i] == R_PREFILL) {
            c->n_prefilled++;
            c->n_pos = c->n_prefilled;
            if (c->n_prefilled == c->P) {
                c->t_prefill1 = now;
                c->state = S_DECODE;
                if (want && c->n_cands) /* first token of every candidate */
                    for (size_t k = 0; k < c->n_cands; k++)
                        c->cand_lp[k] = s_logprob(lg, s->n_scored, c->cand_ids[k][0]);
                if (c->max_new == 0) {
                    s_generated(s, c, now);
                    continue;
                }
            }
        } else {
            c->n_pos++;
        }
        if (want && c->state == S_DECODE) {
            int32_t next = mm_gen_pick(lg, s->n_scored, &c->g, &c->rng, s->work, s->order);
            if (s_take_token(s, c, next, lg, now))
                s_generated(s, c, now);
            else
                c->next_tok = next;
        }
    }
}

/* Finish the marked cases of a step: results, then on_done (engine). */
static void s_finish_marked(mm_sched *s) {
    for (int i = 0; i < s->n_slots; i++) {
        s_case *c = s->slots[i];
        if (!c || (!c->finishing && !c->fail_rc))
            continue;
        int status = c->fail_rc;
        mm_case_result *res = NULL;
        pthread_mutex_lock(&s->mu);
        s_detach(s, c); /* first: s_result moves the tenant name out */
        pthread_mutex_unlock(&s->mu);
        if (status == MM_OK) {
            const char *piece;
            size_t len = 0;
            if (c->dt && mm_detok_flush(c->dt, &piece, &len) == MM_OK && len && c->on_token)
                c->on_token(c->user, c->id, piece, len, -1);
            char err[1024] = "";
            if ((status = s_result(s, c, &res, err, sizeof err)) != MM_OK)
                snprintf(c->fail_msg, sizeof c->fail_msg, "%s", err);
        }
        s_push_done(s, c, status, c->fail_msg, res);
    }
}

int mm_sched_step(mm_sched *s, char *err, size_t errlen) {
    pthread_mutex_lock(&s->mu);
    if (s->stepping) {
        pthread_mutex_unlock(&s->mu);
        return mm_errorf(err, errlen, MM_EAGAIN, "step: another step is running");
    }
    s_expire(s);
    s_admit(s);
    s->stepping = 1;
    pthread_mutex_unlock(&s->mu);
    s_deliver_all(s);

    /* images the workers could not encode (backend not shareable, or no
     * workers): encode on this thread before the case's first row */
    for (int i = 0; i < s->n_slots; i++) {
        s_case *c = s->slots[i];
        if (c && c->state == S_PREFILL && c->n_img && !c->img) {
            char verr[1024] = "";
            int rc = s_encode(s, c, verr, sizeof verr);
            if (rc != MM_OK) {
                c->fail_rc = rc;
                snprintf(c->fail_msg, sizeof c->fail_msg, "%s", verr);
            }
        }
    }
    double deadline = 0;
    size_t n = s_build_rows(s, &deadline); /* failed encodes get no rows */
    if (n > 0) {
        char ferr[1024] = "";
        int rc = s_forward(s, 0, n, n, 0, deadline, NULL, ferr, sizeof ferr);
        pthread_mutex_lock(&s->mu);
        s->n_steps++;
        pthread_mutex_unlock(&s->mu);
        if (rc != MM_OK) {
            int multi = 0;
            for (size_t i = 1; i < n && !multi; i++)
                multi = s->row_case[i] != s->row_case[0];
            if (multi) {
                s_isolate(s, n, rc, ferr);
            } else {
                s->row_case[0]->fail_rc = rc;
                snprintf(s->row_case[0]->fail_msg, sizeof s->row_case[0]->fail_msg, "%s", ferr);
                for (size_t i = 0; i < n; i++)
                    s->row_case[i] = NULL;
            }
        }
        s_apply(s, n, mm_now_ms());
    }
    s_finish_marked(s);
    s_deliver_all(s); /* still "stepping": a callback's step is refused */
    pthread_mutex_lock(&s->mu);
    s->stepping = 0;
    pthread_mutex_unlock(&s->mu);
    return MM_OK;
}

/* ---- the engine thread ------------------------------------------------------ */

static void *s_engine_main(void *arg) {
    mm_sched *s = arg;
    while (!atomic_load(&s->stop)) {
        pthread_mutex_lock(&s->mu);
        int idle = s->n_waiting + s->n_active == 0;
        if (idle) {
            /* wake for new work, or every 50 ms to expire image-stage
             * cases whose deadline passed */
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            ts.tv_nsec += 50 * 1000000L;
            if (ts.tv_nsec >= 1000000000L) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000L;
            }
            pthread_cond_timedwait(&s->work_cv, &s->mu, &ts);
        }
        pthread_mutex_unlock(&s->mu);
        if (atomic_load(&s->stop))
            break;
        char err[512];
        mm_sched_step(s, err, sizeof err);
    }
    return NULL;
}
