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
#include "sched_internal.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "image.h"

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
    s->row_order = calloc((size_t)n_slots, sizeof *s->row_order);
    s->lent_to = calloc((size_t)n_slots, sizeof *s->lent_to);
    s->row_cand = malloc(B * sizeof *s->row_cand);
    s->row_ctok = malloc(B * sizeof *s->row_ctok);
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
    if (!s->slots || !s->row_order || !s->lent_to || !s->row_cand || !s->row_ctok || !s->img_busy ||
        !s->workers || !s->worker_args || !s->row_tok || !s->row_slot || !s->row_pos ||
        !s->row_want || !s->row_kind || !s->row_case || !s->row_embed || !s->logits ||
        !s->step_routing || !s->work || !s->order) {
        mm_sched_destroy(&s);
        return mm_errorf(err, errlen, MM_ENOMEM, "scheduler: out of memory for step buffers");
    }
    for (int i = 0; i < o->image_workers; i++) {
        s->worker_args[i] = (s_worker){s, i};
        if (pthread_create(&s->workers[i], NULL, sched_worker_main, &s->worker_args[i]) != 0) {
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
    sched_deliver_all(s);
    for (int i = 0; s->slots && i < s->n_slots; i++)
        if (s->slots[i]) {
            s_case *c = s->slots[i];
            sched_detach(s, c);
            sched_push_done(s, c, MM_EAGAIN, "shutting down", NULL);
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
        sched_detach(s, c);
        sched_push_done(s, c, MM_EAGAIN, "shutting down", NULL);
    }
    sched_deliver_all(s);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->work_cv);
    pthread_cond_destroy(&s->image_cv);
    free(s->tenants);
    free(s->slots);
    free(s->row_order);
    free(s->lent_to);
    free(s->row_cand);
    free(s->row_ctok);
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
    sched_detach(s, c);
    pthread_mutex_unlock(&s->mu);
    snprintf(c->fail_msg, sizeof c->fail_msg, "cancelled");
    s_done d = {c, MM_ECANCELLED, c->fail_msg, NULL};
    sched_deliver(&d);
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
    const s_tenant *t = tenant ? sched_tenant_find(s, tenant, NULL) : NULL;
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
            sched_detach(s, c);
            sched_push_done(s, c, c->cancelled ? MM_ECANCELLED : MM_ETIMEOUT,
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
            sched_detach(s, hit);
            sched_push_done(s, hit, MM_ETIMEOUT, "deadline exceeded", NULL);
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
        sched_fifo_remove(&t->head, &t->tail, c);
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
        if (s->slots[slot] || s->lent_to[slot])
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
        /* one-token candidates are fully scored by the prompt's logits */
        int left = 0;
        for (size_t k = 0; k < c->n_cands; k++) {
            c->cand_done[k] = c->cand_n[k] < 2;
            left |= !c->cand_done[k];
        }
        if (!left) {
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
/* Lend idle slots (after admission: no case waits for them) to c for its
 * candidates, copying the prompt's KV cache into each: then several
 * candidates are scored in one step, each in its own slot at positions
 * P.. (engine thread, unlocked; lent_to is only read under the lock by
 * admission, which runs on this thread too). */
static void s_lend_slots(mm_sched *s, s_case *c, size_t want_slots) {
    for (int k = 0; k < s->n_slots && c->n_lent < want_slots; k++) {
        if (s->slots[k] || s->lent_to[k])
            continue;
        char err[512];
        if (mm_model_kv_copy(s->m, c->slot, k, c->P, err, sizeof err) != MM_OK)
            return; /* score in fewer slots */
        pthread_mutex_lock(&s->mu);
        s->lent_to[k] = c;
        pthread_mutex_unlock(&s->mu);
        c->lent[c->n_lent++] = k;
    }
}

/* The rows of c's unscored candidates: each candidate whole (tokens
 * 0..len-2 at positions P.., each predicting the next token), one per slot
 * (its own, then lent ones), as many as fit. Returns the new row count. */
static size_t s_classify_rows(mm_sched *s, s_case *c, size_t n, size_t *want) {
    size_t B = s->o.max_step_rows, pending = 0;
    for (size_t k = 0; k < c->n_cands; k++)
        pending += !c->cand_done[k];
    if (pending > 1 + c->n_lent)
        s_lend_slots(s, c, pending - 1);
    size_t used = 0; /* slots given a candidate this step: own first */
    for (size_t k = 0; k < c->n_cands && used <= c->n_lent; k++) {
        if (c->cand_done[k])
            continue;
        size_t rows = c->cand_n[k] - 1;
        if (rows > B - n || rows > s->max_want - *want)
            break; /* next step */
        int slot = used == 0 ? c->slot : c->lent[used - 1];
        used++;
        for (size_t t = 0; t < rows; t++, n++) {
            s->row_tok[n] = c->cand_ids[k][t];
            s->row_slot[n] = slot;
            s->row_pos[n] = (int32_t)(c->P + t);
            s->row_want[n] = 1;
            s->row_kind[n] = R_CLASSIFY;
            s->row_case[n] = c;
            s->row_cand[n] = (int32_t)k;
            s->row_ctok[n] = (int32_t)t;
            (*want)++;
        }
    }
    return n;
}

/* Prefill order: a starved prompt first, then fewest rows left, then the
 * earlier admission. */
static int s_prefill_before(const s_case *a, const s_case *b) {
    if (a->starved != b->starved)
        return a->starved;
    size_t ra = a->P - a->n_prefilled, rb = b->P - b->n_prefilled;
    if (ra != rb)
        return ra < rb;
    return a->t_admit < b->t_admit;
}

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
    /* The order of the other rows: candidate scoring first (a few rows),
     * then prompts, shortest remaining first, so that a small case that
     * arrives while a long prompt is being prefilled gets its first token
     * after one step instead of waiting for the whole long prompt; a prompt
     * that got no rows in the last step goes first (nothing starves). All
     * prompts together take at most prefill_chunk rows a step. */
    s_case **order = s->row_order;
    size_t no = 0, npre = 0;
    for (int k = 0; k < s->n_slots; k++) {
        s_case *c = s->slots[(s->prefill_rr + (size_t)k) % (size_t)s->n_slots];
        if (c && !c->fail_rc && c->state == S_CLASSIFY)
            order[no++] = c;
    }
    for (int k = 0; k < s->n_slots; k++) {
        s_case *c = s->slots[(s->prefill_rr + (size_t)k) % (size_t)s->n_slots];
        if (!c || c->fail_rc || c->state != S_PREFILL)
            continue;
        size_t j = no + npre++; /* insertion sort: a handful of cases */
        while (j > no && s_prefill_before(c, order[j - 1])) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = c;
    }
    for (size_t k = no; k < no + npre; k++)
        order[k]->starved = 1; /* until it gets rows below */
    size_t prefill_left = s->o.prefill_chunk;
    for (size_t k = 0; k < no + npre && n < B; k++) {
        s_case *c = order[k];
        if (c->state == S_PREFILL) {
            size_t take = c->P - c->n_prefilled;
            if (take > prefill_left)
                take = prefill_left;
            if (take > B - n)
                take = B - n;
            if (take == 0)
                continue;
            c->starved = 0;
            prefill_left -= take;
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
        } else {
            n = s_classify_rows(s, c, n, &want);
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
    /* All the re-runs share one deadline: an expert that is really gone
     * would otherwise cost every case of the step a full wait for a
     * replica, one after the other, while the others' decoding stalls. */
    double budget_end = mm_now_ms() + S_ISOLATE_MS;
    size_t w = 0;
    for (size_t i0 = 0; i0 < n;) {
        s_case *c = s->row_case[i0];
        size_t i1 = i0, nw = 0;
        while (i1 < n && s->row_case[i1] == c)
            nw += s->row_want[i1++];
        char err[1024] = "";
        double dl = c->deadline > 0 && c->deadline < budget_end ? c->deadline : budget_end;
        int rc = rc0, late = mm_now_ms() >= budget_end;
        if (tmp && !late)
            rc = s_forward(s, i0, i1, n, w, dl, tmp, err, sizeof err);
        if (rc != MM_OK) {
            c->fail_rc = rc;
            /* a re-run cut short by the shared deadline reports the step's
             * own error (the expert that failed), not "deadline" */
            snprintf(c->fail_msg, sizeof c->fail_msg, "%s",
                     tmp && !late && mm_now_ms() < budget_end ? err : err0);
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
            size_t k = (size_t)s->row_cand[i], t = (size_t)s->row_ctok[i];
            c->cand_lp[k] += s_logprob(lg, s->n_scored, c->cand_ids[k][t + 1]);
            if (t + 2 == c->cand_n[k]) /* its last row */
                c->cand_done[k] = 1;
            int left = 0;
            for (size_t q = 0; q < c->n_cands && !left; q++)
                left = !c->cand_done[q];
            if (!left && !c->finishing) {
                c->t_cls1 = now;
                c->finishing = 1;
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
        sched_detach(s, c); /* first: sched_result moves the tenant name out */
        pthread_mutex_unlock(&s->mu);
        if (status == MM_OK) {
            const char *piece;
            size_t len = 0;
            if (c->dt && mm_detok_flush(c->dt, &piece, &len) == MM_OK && len && c->on_token)
                c->on_token(c->user, c->id, piece, len, -1);
            char err[1024] = "";
            if ((status = sched_result(s, c, &res, err, sizeof err)) != MM_OK)
                snprintf(c->fail_msg, sizeof c->fail_msg, "%s", err);
        }
        sched_push_done(s, c, status, c->fail_msg, res);
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
    sched_deliver_all(s);

    /* images the workers could not encode (backend not shareable, or no
     * workers): encode on this thread before the case's first row */
    for (int i = 0; i < s->n_slots; i++) {
        s_case *c = s->slots[i];
        if (c && c->state == S_PREFILL && c->n_img && !c->img) {
            char verr[1024] = "";
            int rc = sched_encode(s, c, verr, sizeof verr);
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
    sched_deliver_all(s); /* still "stepping": a callback's step is refused */
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
