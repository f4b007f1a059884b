/* sched_intake.c — submitting a case and the image stage: validation,
 * tokenising, the image header check, and the image workers that decode,
 * preprocess and (on a backend that allows it) encode images beside the
 * engine (see sched_internal.h, scheduler.c). */
#include "sched_internal.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "image.h"

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
    c->cand_done = calloc(n, sizeof *c->cand_done);
    c->lent = calloc(n, sizeof *c->lent);
    if (!c->cand_ids || !c->cand_n || !c->cand_lp || !c->cand_done || !c->lent)
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
        if (c->cand_n[i] > S_CLASSIFY_ROWS + 1)
            return mm_errorf(err, errlen, MM_EINVAL,
                             "candidates: entry %zu has %zu tokens, more than %d", i + 1,
                             c->cand_n[i], S_CLASSIFY_ROWS + 1);
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
int sched_preprocess(mm_sched *s, s_case *c, char *err, size_t errlen) {
    double t0 = mm_now_ms();
    mm_image *img = NULL;
    char sub[768];
    /* jpeg_downscale: libjpeg's DCT scaling for large JPEGs (image.h says
     * how far that moves the pixels from Pillow's full decode) */
    int rc =
        c->is_dicom
            ? mm_dicom_decode(c->bytes, c->nbytes, &c->dicom, c->max_pixels, &img, sub, sizeof sub)
            : mm_image_decode_for(c->bytes, c->nbytes, c->media_type[0] ? c->media_type : NULL,
                                  c->max_pixels, s->o.jpeg_downscale ? s->S : 0, &img, sub,
                                  sizeof sub);
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
int sched_encode(mm_sched *s, s_case *c, char *err, size_t errlen) {
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
        size_t cost = 0;
        c->is_dicom = mm_dicom_is(r->image_bytes, r->image_len, r->media_type);
        if (c->is_dicom) {
            /* DICOM: the header's frames count when they decode together,
             * and the window/frame options are checked against it now */
            mm_dicom_info di;
            if ((rc = mm_dicom_probe(r->image_bytes, r->image_len, &di, sub, sizeof sub)) !=
                    MM_OK ||
                (rc = mm_dicom_check_options(&di, &r->dicom, sub, sizeof sub)) != MM_OK) {
                rc = s_image_error(rc, sub, err, errlen);
                goto fail;
            }
            w = di.cols;
            h = di.rows;
            cost = di.decode_pixels;
            c->dicom = r->dicom;
        } else if ((rc = mm_image_probe(r->image_bytes, r->image_len, r->media_type, &w, &h, sub,
                                        sizeof sub)) != MM_OK) {
            rc = s_image_error(rc, sub, err, errlen);
            goto fail;
        }
        if (cost > limit) {
            rc = mm_errorf(err, errlen, MM_EINVAL,
                           "image: %zu x %zu pixels x %zu frames to decode exceeds the pixel "
                           "limit of %zu",
                           w, h, cost / (w * h), limit);
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
        c->cost = cost > w * h ? cost : w * h;
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
        if (s->o.image_workers == 0 && (rc = sched_preprocess(s, c, err, errlen)) != MM_OK)
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
    s_tenant *t = sched_tenant_get(s, c->tenant);
    if (!t) {
        pthread_mutex_unlock(&s->mu);
        rc = mm_errorf(err, errlen, MM_ENOMEM, "submit: out of memory");
        goto fail;
    }
    c->id = s->next_id++;
    if (c->bytes) { /* to the image workers */
        c->state = S_IMAGE;
        sched_fifo_push(&t->img_head, &t->img_tail, c);
        t->n_img++;
        s->n_image++;
        pthread_cond_signal(&s->image_cv);
    } else {
        c->state = S_WAITING;
        sched_fifo_push(&t->head, &t->tail, c);
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
    sched_case_free(c);
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
        sched_fifo_remove(&t->img_head, &t->img_tail, c);
        s->img_rr = (i + 1) % s->n_tenants;
        return c;
    }
    return NULL;
}

void *sched_worker_main(void *arg) {
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
        else if ((rc = sched_preprocess(s, c, err, sizeof err)) == MM_OK && s->vision_on_worker)
            rc = sched_encode(s, c, err, sizeof err);

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
            s_tenant *t = sched_tenant_find(s, c->tenant, NULL);
            if (t)
                t->n_img--;
            s->n_image--;
            sched_tenant_release(s, c->tenant);
            pthread_mutex_unlock(&s->mu);
            snprintf(c->fail_msg, sizeof c->fail_msg, "%s", err);
            s_done d = {c, rc, c->fail_msg, NULL};
            sched_deliver(&d);
            pthread_mutex_lock(&s->mu);
            continue;
        }
        s_tenant *t = sched_tenant_find(s, c->tenant, NULL);
        t->n_img--;
        s->n_image--;
        c->state = S_WAITING;
        sched_fifo_push(&t->head, &t->tail, c);
        t->waiting++;
        s->n_waiting++;
        pthread_cond_signal(&s->work_cv);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}
