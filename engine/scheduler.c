/* scheduler.c — continuous batching of cases over one model (see scheduler.h).
 *
 * Data: every accepted case is an s_case. A waiting case sits in its
 * tenant's FIFO (s_tenant, kept while the tenant has waiting or running
 * cases); a running case sits in s->slots[slot]. Per-step row buffers are
 * allocated once, sized by max_step_rows.
 *
 * Exactness: a case's rows are the rows mm_generate would run (prompt rows
 * at positions 0..P-1 — here maybe split in chunks — then each generated
 * token fed back at the next position), its KV-cache slot is its own, and
 * attention only reads positions <= the row's own, so stale cache entries
 * of a slot's previous case are never seen. Sampling is mm_gen_pick, as
 * in mm_generate.
 */
#include "scheduler.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "case.h"
#include "generate.h"
#include "image.h"
#include "prompt.h"

typedef enum { S_WAITING, S_PREFILL, S_DECODE } s_state;

typedef struct s_case {
    uint64_t id;
    struct s_case *next; /* tenant FIFO link while waiting */
    char *tenant, *client_id;
    s_state state;
    int slot;
    int finishing; /* marked during a step, finished after it */
    /* the prompt: before ids, image embeddings, after ids */
    int32_t *before, *after;
    size_t n_before, n_after;
    float *pixels; /* [3, S, S] until admitted */
    float *img;    /* [n_img, H] from admission */
    size_t n_img, P, n_prefilled;
    /* generation */
    size_t max_new;
    mm_gen_params g;
    uint64_t rng;
    int32_t *tokens;
    size_t n_tokens;
    int32_t *routing; /* [L][cap][K] */
    size_t cap, n_pos;
    int32_t next_tok; /* fed back at position n_pos in the next step */
    mm_detok *dt;
    /* classification */
    char *cand_buf;
    size_t n_cands;
    int32_t **cand_ids;
    size_t *cand_n;
    /* callbacks */
    mm_sched_token_fn on_token;
    mm_sched_done_fn on_done;
    void *user;
    /* times (mm_now_ms) */
    double deadline, t_submit, t_admit, t_first, t_last, t_prefill0, t_prefill1, vision_ms;
    uint64_t steps;
} s_case;

typedef struct s_tenant {
    char *name;
    s_case *head, *tail;
    size_t waiting, active;
} s_tenant;

struct mm_sched {
    mm_model *m;
    const mm_tokenizer *tok;
    mm_sched_options o;
    size_t H, V, L, K, S, n_scored;
    int n_slots, max_ctx, pad;
    int32_t eos;
    mm_conv_mode default_mode;
    s_case **slots;
    size_t n_active, n_waiting;
    s_tenant *tenants;
    size_t n_tenants, cap_tenants, rr;
    size_t prefill_rr;
    uint64_t next_id, n_steps;
    int in_callback;
    /* step buffers */
    int32_t *row_tok, *row_slot, *row_pos, *step_routing, *order;
    uint8_t *row_want;
    float *row_embed, *logits, *work;
    s_case **row_case;
};

/* ---- sampling: mm_generate's, verbatim ---------------------------------- */

/* ---- options, cases, tenants -------------------------------------------- */

void mm_sched_options_default(mm_sched_options *o) {
    memset(o, 0, sizeof *o);
    o->max_step_rows = 512;
    o->prefill_chunk = 256;
    o->max_queued = 256;
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
    free(c->before);
    free(c->after);
    free(c->pixels);
    free(c->img);
    free(c->tokens);
    free(c->routing);
    mm_detok_destroy(&c->dt);
    for (size_t i = 0; c->cand_ids && i < c->n_cands; i++)
        free(c->cand_ids[i]);
    free(c->cand_ids);
    free(c->cand_n);
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

/* Forget a tenant with nothing waiting or running, keeping the round-robin
 * cursor on the same next tenant. */
static void s_tenant_release(mm_sched *s, const char *name) {
    size_t i;
    s_tenant *t = s_tenant_find(s, name, &i);
    if (!t || t->waiting || t->active)
        return;
    free(t->name);
    memmove(&s->tenants[i], &s->tenants[i + 1], (s->n_tenants - i - 1) * sizeof *t);
    s->n_tenants--;
    if (i < s->rr)
        s->rr--;
    if (s->rr >= s->n_tenants)
        s->rr = 0;
}

/* Unlink a waiting case from its tenant's FIFO. */
static void s_unqueue(mm_sched *s, s_case *c) {
    s_tenant *t = s_tenant_find(s, c->tenant, NULL);
    if (!t)
        return;
    s_case **pp = &t->head, *prev = NULL;
    while (*pp && *pp != c) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    if (!*pp)
        return;
    *pp = c->next;
    if (t->tail == c)
        t->tail = prev;
    c->next = NULL;
    t->waiting--;
    s->n_waiting--;
}

/* ---- the answer ---------------------------------------------------------- */

/* Score the candidates in the case's slot (mm_case_answer's s_classify). */
static int s_classify(mm_sched *s, s_case *c, json_t *out, char *err, size_t errlen) {
    mm_candidate *cands = calloc(c->n_cands, sizeof *cands);
    if (!cands)
        return mm_errorf(err, errlen, MM_ENOMEM, "classify: out of memory");
    const char *p = c->cand_buf;
    for (size_t i = 0; i < c->n_cands; i++) {
        cands[i].text = p;
        p += strlen(p) + 1;
    }
    mm_prompt_input in = {c->before, c->n_before, c->img, c->n_img, c->after, c->n_after};
    double t0 = mm_now_ms();
    int rc = mm_classify(s->m, c->slot, &in, s->n_scored, (const int32_t *const *)c->cand_ids,
                         c->cand_n, cands, c->n_cands, err, errlen);
    if (rc == MM_OK) {
        mm_case_candidates_json(cands, c->n_cands, mm_now_ms() - t0, out);
    }
    free(cands);
    return rc;
}

static int s_result(mm_sched *s, s_case *c, json_t **outp, char *err, size_t errlen) {
    size_t n_ans = c->n_tokens;
    if (n_ans && c->tokens[n_ans - 1] == s->eos)
        n_ans--;
    char *answer = NULL;
    size_t alen = 0;
    int rc = mm_tokenizer_decode(s->tok, c->tokens, n_ans, 0, &answer, &alen, err, errlen);
    if (rc != MM_OK)
        return rc;
    json_t *out = json_object(), *jt = json_array();
    for (size_t i = 0; i < c->n_tokens; i++)
        json_array_append_new(jt, json_integer(c->tokens[i]));
    json_object_set_new(out, "answer", json_string(mm_case_strip(answer)));
    free(answer);
    json_object_set_new(out, "tokens", jt);
    json_object_set_new(out, "prompt_len", json_integer((json_int_t)c->P));
    json_object_set_new(out, "image_start", json_integer((json_int_t)(c->n_img ? c->n_before : 0)));
    json_object_set_new(out, "image_len", json_integer((json_int_t)c->n_img));
    mm_case_routing_json(mm_model_config(s->m), c->routing, c->cap, c->n_pos,
                         c->n_img ? c->n_before : 0, c->n_img, out);
    json_object_set_new(out, "vision_ms", json_real(c->vision_ms));
    json_object_set_new(out, "prefill_ms", json_real(c->t_prefill1 - c->t_prefill0));
    json_object_set_new(
        out, "decode_ms_per_token",
        json_real(c->n_tokens > 1 ? (c->t_last - c->t_first) / (double)(c->n_tokens - 1) : 0.0));
    if (c->n_cands && (rc = s_classify(s, c, out, err, errlen)) != MM_OK) {
        json_decref(out);
        return rc;
    }
    double now = mm_now_ms();
    json_object_set_new(out, "case_id", json_integer((json_int_t)c->id));
    json_object_set_new(out, "tenant", json_string(c->tenant));
    json_object_set_new(out, "client_case_id",
                        c->client_id ? json_string(c->client_id) : json_null());
    json_object_set_new(out, "queue_ms", json_real(c->t_admit - c->t_submit));
    json_object_set_new(out, "ttft_ms", json_real(c->n_tokens ? c->t_first - c->t_submit : 0.0));
    json_object_set_new(out, "total_ms", json_real(now - c->t_submit));
    json_object_set_new(out, "steps", json_integer((json_int_t)c->steps));
    *outp = out;
    return MM_OK;
}

/* Take the case out of the scheduler, tell its owner, free it. With status
 * MM_OK the answer is built first (classification runs here, in its slot). */
static void s_finish(mm_sched *s, s_case *c, int status, const char *message) {
    char err[1024] = "";
    json_t *result = NULL;
    if (status == MM_OK && c->state != S_WAITING) {
        const char *piece;
        size_t len = 0;
        if (c->dt && mm_detok_flush(c->dt, &piece, &len) == MM_OK && len && c->on_token) {
            s->in_callback++;
            c->on_token(c->user, c->id, piece, len, -1);
            s->in_callback--;
        }
        if ((status = s_result(s, c, &result, err, sizeof err)) != MM_OK)
            message = err;
    }
    if (c->state == S_WAITING) {
        s_unqueue(s, c);
    } else {
        s->slots[c->slot] = NULL;
        s->n_active--;
        s_tenant *t = s_tenant_find(s, c->tenant, NULL);
        if (t)
            t->active--;
    }
    s_tenant_release(s, c->tenant);
    s->in_callback++;
    c->on_done(c->user, c->id, status, status == MM_OK ? "" : message, result);
    s->in_callback--;
    json_decref(result);
    s_case_free(c);
}

/* ---- new / destroy -------------------------------------------------------- */

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
    s->S = mm_model_image_size(m);
    s->n_scored = mm_tokenizer_size(tok);
    if (s->n_scored == 0 || s->n_scored > s->V)
        s->n_scored = s->V;
    s->n_slots = n_slots;
    s->max_ctx = mm_model_max_ctx(m);
    s->pad = strcmp(c->image_aspect_ratio, "pad") == 0;
    s->eos = mm_tokenizer_eos_id(tok) >= 0 ? mm_tokenizer_eos_id(tok) : c->eos_token_id;
    s->default_mode = c->arch == MM_ARCH_PHI ? MM_CONV_PHI : MM_CONV_STABLELM;
    s->next_id = 1;
    size_t B = o->max_step_rows, emb;
    int ok = mm_size_mul(B, s->H, &emb) && mm_size_mul(emb, sizeof(float), &emb);
    size_t lg;
    ok = ok && mm_size_mul((size_t)n_slots, s->V, &lg) && mm_size_mul(lg, sizeof(float), &lg);
    size_t rt;
    ok = ok && mm_size_mul(s->L * s->K + 1, B, &rt) && mm_size_mul(rt, sizeof(int32_t), &rt);
    if (!ok) {
        free(s);
        return mm_errorf(err, errlen, MM_EINVAL, "scheduler: step buffers overflow size_t");
    }
    s->slots = calloc((size_t)n_slots, sizeof *s->slots);
    s->row_tok = malloc(B * sizeof *s->row_tok);
    s->row_slot = malloc(B * sizeof *s->row_slot);
    s->row_pos = malloc(B * sizeof *s->row_pos);
    s->row_want = malloc(B);
    s->row_case = malloc(B * sizeof *s->row_case);
    s->row_embed = malloc(emb);
    s->logits = malloc(lg);
    s->step_routing = malloc(rt);
    s->work = malloc(s->V * sizeof *s->work);
    s->order = malloc(s->V * sizeof *s->order);
    if (!s->slots || !s->row_tok || !s->row_slot || !s->row_pos || !s->row_want || !s->row_case ||
        !s->row_embed || !s->logits || !s->step_routing || !s->work || !s->order) {
        mm_sched_destroy(&s);
        return mm_errorf(err, errlen, MM_ENOMEM, "scheduler: out of memory for step buffers");
    }
    *out = s;
    return MM_OK;
}

void mm_sched_destroy(mm_sched **sp) {
    if (!sp || !*sp)
        return;
    mm_sched *s = *sp;
    for (int i = 0; s->slots && i < s->n_slots; i++)
        if (s->slots[i])
            s_finish(s, s->slots[i], MM_EAGAIN, "shutting down");
    while (s->n_tenants > 0) {
        s_tenant *t = &s->tenants[0];
        if (t->head) {
            s_finish(s, t->head, MM_EAGAIN, "shutting down");
        } else { /* cannot happen: a tenant without cases is released */
            free(t->name);
            memmove(&s->tenants[0], &s->tenants[1], (s->n_tenants - 1) * sizeof *t);
            s->n_tenants--;
        }
    }
    free(s->tenants);
    free(s->slots);
    free(s->row_tok);
    free(s->row_slot);
    free(s->row_pos);
    free(s->row_want);
    free(s->row_case);
    free(s->row_embed);
    free(s->logits);
    free(s->step_routing);
    free(s->work);
    free(s->order);
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

/* " a" style ids of each candidate (as case.c). */
static int s_parse_candidates(mm_sched *s, s_case *c, const mm_sched_request *r, char *err,
                              size_t errlen) {
    size_t n = 0;
    int rc0 = s_candidate_buf(c, r, &n, err, errlen);
    if (rc0 != MM_OK)
        return rc0;
    c->n_cands = n;
    c->cand_ids = calloc(n, sizeof *c->cand_ids);
    c->cand_n = calloc(n, sizeof *c->cand_n);
    if (!c->cand_ids || !c->cand_n)
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
        p += pl + 1;
    }
    return MM_OK;
}

/* Decode + preprocess the image into c->pixels. */
static int s_load_image(mm_sched *s, s_case *c, const mm_sched_request *r, char *err,
                        size_t errlen) {
    if (!mm_model_image_tokens(s->m))
        return mm_errorf(err, errlen, MM_EINVAL, "image: this model has no vision tower");
    double t0 = mm_now_ms();
    mm_image *img = NULL;
    char sub[768];
    int rc = mm_image_decode(r->image_bytes, r->image_len, r->media_type, r->max_pixels, &img, sub,
                             sizeof sub);
    if (rc == MM_OK) {
        mm_image_params ip;
        mm_image_params_default(&ip, s->S);
        ip.pad_to_square = !r->no_pad && s->pad;
        size_t n;
        if (!mm_size_mul(3 * s->S, s->S, &n) || !(c->pixels = malloc(n * sizeof *c->pixels)))
            rc = mm_errorf(sub, sizeof sub, MM_ENOMEM, "out of memory for the image");
        else
            rc = mm_image_preprocess(img, &ip, c->pixels, sub, sizeof sub);
        mm_image_destroy(&img);
    }
    if (rc != MM_OK) /* image.c's messages already start with "image: " */
        return mm_errorf(err, errlen, rc == MM_ENOMEM ? MM_ENOMEM : MM_EINVAL, "%s%s",
                         strncmp(sub, "image", 5) == 0 ? "" : "image: ", sub);
    c->n_img = mm_model_image_tokens(s->m);
    c->vision_ms = mm_now_ms() - t0;
    return MM_OK;
}

int mm_sched_submit(mm_sched *s, const mm_sched_request *r, uint64_t *case_id, char *err,
                    size_t errlen) {
    if (case_id)
        *case_id = 0;
    if (s->in_callback)
        return mm_errorf(err, errlen, MM_EAGAIN, "submit: called from a scheduler callback");
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
    double now = mm_now_ms();
    if (r->deadline_ms > 0 && now >= r->deadline_ms)
        return mm_errorf(err, errlen, MM_ETIMEOUT, "deadline: already passed %.1f ms ago",
                         now - r->deadline_ms);
    if (s->n_waiting >= s->o.max_queued)
        return mm_errorf(err, errlen, MM_EAGAIN, "queue full: %zu cases waiting", s->n_waiting);

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
    c->state = S_WAITING;
    c->slot = -1;
    if (!(c->tenant = strdup(r->tenant)) ||
        (r->client_case_id && !(c->client_id = strdup(r->client_case_id)))) {
        rc = mm_errorf(err, errlen, MM_ENOMEM, "submit: out of memory");
        goto fail;
    }
    int has_image = r->image_bytes != NULL;
    if (has_image && (rc = s_load_image(s, c, r, err, errlen)) != MM_OK)
        goto fail;
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
    /* as mm_generate: never run past the context */
    c->max_new = (size_t)r->max_tokens;
    if (c->P + c->max_new > (size_t)s->max_ctx)
        c->max_new = (size_t)s->max_ctx - c->P;
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
    if (!c->tokens || !c->routing || mm_detok_new(s->tok, 0, &c->dt) != MM_OK) {
        rc = mm_errorf(err, errlen, MM_ENOMEM, "submit: out of memory");
        goto fail;
    }
    s_tenant *t = s_tenant_get(s, c->tenant);
    if (!t) {
        rc = mm_errorf(err, errlen, MM_ENOMEM, "submit: out of memory");
        goto fail;
    }
    if (t->tail)
        t->tail->next = c;
    else
        t->head = c;
    t->tail = c;
    t->waiting++;
    s->n_waiting++;
    c->id = s->next_id++;
    if (case_id)
        *case_id = c->id;
    return MM_OK;
fail:
    if (!c->before) /* not yet owned by the case */
        mm_prompt_ids_clear(&ids);
    s_case_free(c);
    return rc;
}

/* ---- cancel, counts ------------------------------------------------------- */

static s_case *s_find(mm_sched *s, uint64_t id) {
    for (int i = 0; i < s->n_slots; i++)
        if (s->slots[i] && s->slots[i]->id == id)
            return s->slots[i];
    for (size_t i = 0; i < s->n_tenants; i++)
        for (s_case *c = s->tenants[i].head; c; c = c->next)
            if (c->id == id)
                return c;
    return NULL;
}

int mm_sched_cancel(mm_sched *s, uint64_t case_id) {
    if (s->in_callback)
        return MM_EAGAIN;
    s_case *c = s_find(s, case_id);
    if (!c)
        return MM_ENOTFOUND;
    s_finish(s, c, MM_ECANCELLED, "cancelled");
    return MM_OK;
}

size_t mm_sched_pending(const mm_sched *s) { return s->n_waiting; }
size_t mm_sched_active(const mm_sched *s) { return s->n_active; }
uint64_t mm_sched_steps(const mm_sched *s) { return s->n_steps; }

void mm_sched_tenant_load(const mm_sched *s, const char *tenant, size_t *waiting, size_t *active) {
    const s_tenant *t = tenant ? s_tenant_find(s, tenant, NULL) : NULL;
    if (waiting)
        *waiting = t ? t->waiting : 0;
    if (active)
        *active = t ? t->active : 0;
}

/* ---- step ------------------------------------------------------------------ */

static void s_expire(mm_sched *s) {
    double now = mm_now_ms();
    for (int i = 0; i < s->n_slots; i++) {
        s_case *c = s->slots[i];
        if (c && c->deadline > 0 && now >= c->deadline)
            s_finish(s, c, MM_ETIMEOUT, "deadline exceeded");
    }
    for (size_t i = 0; i < s->n_tenants;) {
        s_case *c = s->tenants[i].head, *hit = NULL;
        for (; c && !hit; c = c->next)
            if (c->deadline > 0 && now >= c->deadline)
                hit = c;
        if (hit)
            s_finish(s, hit, MM_ETIMEOUT, "deadline exceeded"); /* may drop tenant i: rescan */
        else
            i++;
    }
}

/* Next waiting case, round-robin over tenants, FIFO within one. */
static s_case *s_pop_waiting(mm_sched *s) {
    for (size_t k = 0; k < s->n_tenants; k++) {
        size_t i = (s->rr + k) % s->n_tenants;
        s_tenant *t = &s->tenants[i];
        if (!t->head)
            continue;
        s_case *c = t->head;
        t->head = c->next;
        if (!t->head)
            t->tail = NULL;
        c->next = NULL;
        t->waiting--;
        t->active++;
        s->n_waiting--;
        s->rr = (i + 1) % s->n_tenants;
        return c;
    }
    return NULL;
}

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
        if (c->pixels) {
            char err[1024];
            double t0 = mm_now_ms();
            int rc = MM_OK;
            size_t n;
            if (!mm_size_mul(c->n_img, s->H, &n) || !(c->img = malloc(n * sizeof *c->img)))
                rc = mm_errorf(err, sizeof err, MM_ENOMEM, "vision: out of memory");
            else
                rc = mm_model_encode_image(s->m, c->pixels, c->img, err, sizeof err);
            free(c->pixels);
            c->pixels = NULL;
            c->vision_ms += mm_now_ms() - t0;
            if (rc != MM_OK) {
                s_finish(s, c, rc, err);
                slot--; /* the slot is free again */
            }
        }
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

/* A new token for c: keep, stream, and say whether the case is done. */
static int s_take_token(mm_sched *s, s_case *c, int32_t next, double now) {
    if (c->n_tokens == 0)
        c->t_first = now;
    c->t_last = now;
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
    if (c->on_token) {
        s->in_callback++;
        c->on_token(c->user, c->id, piece, len, next);
        s->in_callback--;
    }
    return next == s->eos || c->n_tokens >= c->max_new;
}

int mm_sched_step(mm_sched *s, char *err, size_t errlen) {
    if (s->in_callback)
        return mm_errorf(err, errlen, MM_EAGAIN, "step: called from a scheduler callback");
    s_expire(s);
    s_admit(s);

    /* rows: every decode row, then prefill chunks within the budget */
    size_t n = 0, B = s->o.max_step_rows;
    for (int i = 0; i < s->n_slots; i++) {
        s_case *c = s->slots[i];
        if (!c || c->state != S_DECODE)
            continue;
        s->row_tok[n] = c->next_tok;
        s->row_slot[n] = c->slot;
        s->row_pos[n] = (int32_t)c->n_pos;
        s->row_want[n] = 1;
        s->row_case[n] = c;
        n++;
    }
    for (int k = 0; k < s->n_slots && n < B; k++) {
        s_case *c = s->slots[(s->prefill_rr + (size_t)k) % (size_t)s->n_slots];
        if (!c || c->state != S_PREFILL)
            continue;
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
            /* mm_generate: logits of the last prompt row, when generating */
            s->row_want[n] = pos == c->P - 1 && c->max_new > 0;
            s->row_case[n] = c;
        }
    }
    s->prefill_rr = (s->prefill_rr + 1) % (size_t)s->n_slots;
    if (n == 0)
        return MM_OK;

    mm_step st = {.n = n,
                  .token = s->row_tok,
                  .embed = s->row_embed,
                  .slot = s->row_slot,
                  .pos = s->row_pos,
                  .want_logits = s->row_want};
    char ferr[1024] = "";
    int rc =
        mm_model_forward(s->m, &st, s->logits, s->L ? s->step_routing : NULL, ferr, sizeof ferr);
    s->n_steps++;
    double now = mm_now_ms();
    if (rc != MM_OK) {
        /* the step's cases fail; their slots are free for the next step */
        for (size_t i = 0; i < n; i++)
            if (s->row_case[i] && s->slots[s->row_case[i]->slot] == s->row_case[i]) {
                s_case *c = s->row_case[i];
                for (size_t j = i; j < n; j++)
                    if (s->row_case[j] == c)
                        s->row_case[j] = NULL;
                s_finish(s, c, rc, ferr);
            }
        return MM_OK;
    }
    /* routing [L][n][K] -> each case's [L][cap][K]; progress; tokens */
    for (size_t i = 0, w = 0; i < n; i++) {
        s_case *c = s->row_case[i];
        size_t pos = (size_t)s->row_pos[i];
        for (size_t l = 0; l < s->L; l++)
            memcpy(c->routing + (l * c->cap + pos) * s->K, s->step_routing + (l * n + i) * s->K,
                   s->K * sizeof(int32_t));
        if (i == 0 || s->row_case[i - 1] != c)
            c->steps++;
        if (c->state == S_PREFILL) {
            c->n_prefilled++;
            c->n_pos = c->n_prefilled;
            if (c->n_prefilled == c->P) {
                c->t_prefill1 = now;
                c->state = S_DECODE;
                if (c->max_new == 0)
                    c->finishing = 1;
            }
        } else {
            c->n_pos++;
        }
        if (s->row_want[i]) {
            int32_t next =
                mm_gen_pick(s->logits + w * s->V, s->n_scored, &c->g, &c->rng, s->work, s->order);
            w++;
            if (s_take_token(s, c, next, now))
                c->finishing = 1;
            else
                c->next_tok = next;
        }
    }
    for (int i = 0; i < s->n_slots; i++)
        if (s->slots[i] && s->slots[i]->finishing)
            s_finish(s, s->slots[i], MM_OK, "");
    return MM_OK;
}
