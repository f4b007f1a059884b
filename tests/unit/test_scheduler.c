/* test_scheduler.c — the continuous-batching scheduler (engine/scheduler.c) on a
 * tiny checkpoint: every case run through the scheduler, many at a time and
 * submitted at different steps, must give the tokens, routing and candidates
 * that mm_case_answer gives for it alone; streamed pieces make the answer;
 * tenants are served round-robin; cancel, deadlines, bad requests, a failing
 * forward step and shutdown each finish exactly the cases they should.
 *
 *   test_scheduler CKPT_DIR IMAGES_DIR           (CKPT_DIR/clip: the tower)
 *   test_scheduler CKPT_DIR IMAGES_DIR bench     throughput at 1, 8, 32 slots
 *
 * Plain C: returns nonzero when any check fails.
 */
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "scheduler.h"
#include "seq_case.h"
#include "seq_generate.h"

static int g_fail, g_checks;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        g_checks++;                                                                                \
        if (!(cond)) {                                                                             \
            g_fail++;                                                                              \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);               \
        }                                                                                          \
    } while (0)

#define CHECKF(cond, ...)                                                                          \
    do {                                                                                           \
        g_checks++;                                                                                \
        if (!(cond)) {                                                                             \
            g_fail++;                                                                              \
            fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond);               \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
        }                                                                                          \
    } while (0)

static const char *g_ckpt, *g_images;
static mm_backend *g_be;
static mm_tokenizer *g_tok;

/* ---- images ---------------------------------------------------------------- */

typedef struct blob {
    unsigned char *data;
    size_t len;
    const char *media;
} blob;

static blob g_img[3]; /* case.png, case.jpg, gray.png */

static int s_read_file(const char *path, blob *b) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return -1;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    b->data = malloc((size_t)n + 1);
    b->len = b->data ? fread(b->data, 1, (size_t)n, f) : 0;
    fclose(f);
    return b->data && b->len == (size_t)n ? 0 : -1;
}

/* ---- a case's callbacks ------------------------------------------------------ */

typedef struct tctx {
    int order;     /* first tokens seen so far, all cases */
    mm_sched *sch; /* for the re-entrancy check */
} tctx;

typedef struct tcase {
    tctx *ctx;
    uint64_t id;
    int done, status, first_order, n_tok_cb, reenter_rc, try_reenter;
    char msg[512];
    json_t *result;
    char *stream;
    size_t slen;
} tcase;

static void s_on_token(void *user, uint64_t id, const char *piece, size_t len, int32_t token) {
    tcase *t = user;
    if (t->n_tok_cb == 0 && token >= 0)
        t->first_order = ++t->ctx->order;
    if (token >= 0)
        t->n_tok_cb++;
    char *ns = realloc(t->stream, t->slen + len + 1);
    if (!ns)
        abort();
    t->stream = ns;
    memcpy(t->stream + t->slen, piece, len);
    t->slen += len;
    t->stream[t->slen] = 0;
    (void)id;
}

static void s_on_done(void *user, uint64_t id, int status, const char *message,
                      const mm_case_result *result) {
    tcase *t = user;
    t->status = status;
    snprintf(t->msg, sizeof t->msg, "%s", message ? message : "(null)");
    if (result) /* the edge form, so the checks compare it with the oracle's JSON */
        t->result = mm_case_result_json(result);
    CHECK(t->id == 0 || t->id == id);
    CHECK((status == MM_OK) == (result != NULL));
    if (t->try_reenter) { /* a step from inside a step's callback */
        char err[128];
        t->reenter_rc = mm_sched_step(t->ctx->sch, err, sizeof err);
    }
    /* last, and released: a test thread polling done then reads the rest */
    __atomic_add_fetch(&t->done, 1, __ATOMIC_RELEASE);
}

static void s_tcase_clear(tcase *t) {
    json_decref(t->result);
    free(t->stream);
    memset(t, 0, sizeof *t);
}

/* ---- requests ----------------------------------------------------------------- */

typedef struct spec {
    const char *tenant;
    const char *question;
    int image; /* -1: none, else g_img index */
    int max_tokens;
    float temperature;
    uint64_t seed;
    const char *candidates;
} spec;

static const char *g_questions[] = {
    "What modality is this image?",
    "Is there a lesion in the left lung?",
    "Describe the findings.",
    "Which organ is shown?",
    "Is this normal? Answer yes or no.",
    "What abnormality is seen in the image?",
    "Where is the mass located?",
    "How many kidneys are visible?",
};

static spec s_make_spec(int i) {
    spec sp = {0};
    sp.tenant = i % 3 == 0 ? "hospital-a" : i % 3 == 1 ? "hospital-b" : "clinic-c";
    sp.question = g_questions[i % 8];
    sp.image = i % 4 == 3 ? -1 : i % 3;
    sp.max_tokens = 16 - (i % 5) * 3;
    if (i % 7 == 5) { /* a seeded sampler now and then */
        sp.temperature = 0.8f;
        sp.seed = 1000 + (uint64_t)i;
    }
    return sp;
}

static void s_fill_request(const spec *sp, tcase *t, mm_sched_request *r) {
    mm_sched_request_default(r);
    r->tenant = sp->tenant;
    r->question = sp->question;
    if (sp->image >= 0) {
        r->image_bytes = g_img[sp->image].data;
        r->image_len = g_img[sp->image].len;
        r->media_type = g_img[sp->image].media;
    }
    r->max_tokens = sp->max_tokens;
    r->temperature = sp->temperature;
    r->seed = sp->seed;
    r->candidates = sp->candidates;
    r->on_token = s_on_token;
    r->on_done = s_on_done;
    r->user = t;
}

static json_t *s_reference(mm_model *m, const spec *sp) {
    mm_case_request q;
    mm_case_request_default(&q);
    if (sp->image >= 0) {
        q.image_bytes = g_img[sp->image].data;
        q.image_len = g_img[sp->image].len;
        q.media_type = g_img[sp->image].media;
    }
    q.question = sp->question;
    q.max_tokens = sp->max_tokens;
    q.temperature = sp->temperature;
    q.seed = sp->seed;
    q.candidates = sp->candidates;
    json_t *out = NULL;
    char err[1024];
    int rc = mm_case_answer(m, g_tok, &q, &out, err, sizeof err);
    CHECKF(rc == MM_OK, "reference: %s", err);
    return out;
}

static int s_key_equal(json_t *a, json_t *b, const char *key) {
    json_t *x = json_object_get(a, key), *y = json_object_get(b, key);
    return x && y && json_equal(x, y);
}

/* Scheduler result t vs mm_case_answer's ref. */
static void s_compare(const char *what, int i, tcase *t, json_t *ref) {
    CHECKF(t->done == 1 && t->status == MM_OK, "%s case %d: done %d status %s: %s", what, i,
           t->done, mm_status_str(t->status), t->msg);
    if (!t->result || !ref)
        return;
    static const char *keys[] = {"tokens",      "routing",   "expert_summary", "prompt_len",
                                 "image_start", "image_len", "answer"};
    for (size_t k = 0; k < sizeof keys / sizeof *keys; k++)
        CHECKF(s_key_equal(t->result, ref, keys[k]), "%s case %d: key %s differs", what, i,
               keys[k]);
    /* the stream, stripped as the answer is, is the answer */
    const char *ans = json_string_value(json_object_get(t->result, "answer"));
    char *st = t->stream ? t->stream : "";
    while (*st == ' ' || (*st >= '\t' && *st <= '\r'))
        st++;
    size_t n = strlen(st);
    while (n && (st[n - 1] == ' ' || (st[n - 1] >= '\t' && st[n - 1] <= '\r')))
        n--;
    CHECKF(ans && strlen(ans) == n && memcmp(ans, st, n) == 0,
           "%s case %d: stream \"%.*s\" != answer \"%s\"", what, i, (int)n, st, ans ? ans : "");
    size_t ntok = json_array_size(json_object_get(t->result, "tokens"));
    CHECKF((size_t)t->n_tok_cb == ntok, "%s case %d: %d token callbacks for %zu tokens", what, i,
           t->n_tok_cb, ntok);
    json_t *rc = json_object_get(ref, "candidates"), *sc = json_object_get(t->result, "candidates");
    CHECKF(!rc == !sc, "%s case %d: candidates present in one only", what, i);
    if (rc && sc) {
        CHECK(json_array_size(rc) == json_array_size(sc));
        for (size_t k = 0; k < json_array_size(rc) && k < json_array_size(sc); k++) {
            json_t *a = json_array_get(rc, k), *b = json_array_get(sc, k);
            CHECKF(strcmp(json_string_value(json_object_get(a, "text")),
                          json_string_value(json_object_get(b, "text"))) == 0,
                   "%s case %d: candidate rank %zu differs", what, i, k);
            CHECK(fabs(json_real_value(json_object_get(a, "logprob")) -
                       json_real_value(json_object_get(b, "logprob"))) < 1e-3);
            CHECK(fabs(json_real_value(json_object_get(a, "prob")) -
                       json_real_value(json_object_get(b, "prob"))) < 1e-3);
        }
    }
    CHECK(json_real_value(json_object_get(t->result, "queue_ms")) >= 0);
}

static mm_model *s_load(int n_slots) {
    mm_model_options o;
    mm_model_options_default(&o);
    char vis[1024];
    snprintf(vis, sizeof vis, "%s/clip", g_ckpt);
    o.vision_dir = vis;
    o.n_slots = n_slots;
    mm_model *m = NULL;
    char err[1024];
    if (mm_model_load(g_ckpt, g_be, &o, &m, err, sizeof err) != MM_OK) {
        fprintf(stderr, "load %s: %s\n", g_ckpt, err);
        exit(2);
    }
    return m;
}

static mm_sched *s_sched(mm_model *m, size_t rows, size_t chunk, size_t queued) {
    mm_sched_options o;
    mm_sched_options_default(&o);
    if (rows)
        o.max_step_rows = rows;
    if (chunk)
        o.prefill_chunk = chunk;
    if (queued)
        o.max_queued = queued;
    o.image_workers = 0; /* images inline: the steps below are deterministic */
    mm_sched *s = NULL;
    char err[512];
    int rc = mm_sched_new(m, g_tok, &o, &s, err, sizeof err);
    CHECKF(rc == MM_OK, "sched_new: %s", err);
    if (rc != MM_OK)
        exit(2);
    return s;
}

static void s_run_all(mm_sched *s, int max_steps) {
    char err[512];
    for (int k = 0; k < max_steps && mm_sched_pending(s) + mm_sched_active(s) > 0; k++)
        CHECKF(mm_sched_step(s, err, sizeof err) == MM_OK, "step: %s", err);
    CHECK(mm_sched_pending(s) + mm_sched_active(s) == 0);
}

/* ---- (1)(2)(7) equivalence with mm_case_answer --------------------------------- */

static void test_equivalence(int n_cases, int n_slots, size_t rows, size_t chunk) {
    mm_model *m = s_load(n_slots);
    spec *sp = calloc((size_t)n_cases, sizeof *sp);
    json_t **ref = calloc((size_t)n_cases, sizeof *ref);
    tcase *tc = calloc((size_t)n_cases, sizeof *tc);
    tctx ctx = {0};
    for (int i = 0; i < n_cases; i++) {
        sp[i] = s_make_spec(i);
        if (i % 6 == 4) { /* classification, with and without generation */
            sp[i].candidates = "ct,mri,x-ray,pathology";
            sp[i].max_tokens = i % 12 == 4 ? 0 : 4;
        }
        ref[i] = s_reference(m, &sp[i]);
    }
    mm_sched *s = s_sched(m, rows, chunk, 0);
    ctx.sch = s;
    char err[1024];
    int submitted = 0, steps = 0;
    /* submit in waves: a couple of cases, a step, a couple more ... */
    while (submitted < n_cases || mm_sched_pending(s) + mm_sched_active(s) > 0) {
        for (int k = 0; k < 1 + steps % 3 && submitted < n_cases; k++, submitted++) {
            mm_sched_request r;
            tc[submitted].ctx = &ctx;
            s_fill_request(&sp[submitted], &tc[submitted], &r);
            int rc = mm_sched_submit(s, &r, &tc[submitted].id, err, sizeof err);
            CHECKF(rc == MM_OK, "submit %d: %s", submitted, err);
        }
        CHECKF(mm_sched_step(s, err, sizeof err) == MM_OK, "step: %s", err);
        if (++steps > 2000)
            break;
    }
    for (int i = 0; i < n_cases; i++) {
        s_compare("equivalence", i, &tc[i], ref[i]);
        json_decref(ref[i]);
        s_tcase_clear(&tc[i]);
    }
    printf("equivalence: %d cases on %d slots (rows %zu, chunk %zu): %d steps\n", n_cases, n_slots,
           rows, chunk, steps);
    mm_sched_destroy(&s);
    free(sp);
    free(ref);
    free(tc);
    mm_model_destroy(&m);
}

/* ---- (3) fairness --------------------------------------------------------------- */

static void test_fairness(void) {
    mm_model *m = s_load(2);
    mm_sched *s = s_sched(m, 0, 0, 64);
    tctx ctx = {.sch = s};
    tcase a[30] = {0}, b[2] = {0};
    char err[512];
    spec sp = {.question = "Which organ is shown?", .image = -1, .max_tokens = 2};
    mm_sched_request r;
    for (int i = 0; i < 30; i++) {
        sp.tenant = "flood";
        a[i].ctx = &ctx;
        s_fill_request(&sp, &a[i], &r);
        CHECK(mm_sched_submit(s, &r, &a[i].id, err, sizeof err) == MM_OK);
    }
    for (int i = 0; i < 2; i++) {
        sp.tenant = "small";
        b[i].ctx = &ctx;
        s_fill_request(&sp, &b[i], &r);
        CHECK(mm_sched_submit(s, &r, &b[i].id, err, sizeof err) == MM_OK);
    }
    size_t w, act;
    mm_sched_tenant_load(s, "flood", &w, &act);
    CHECK(w == 30 && act == 0);
    mm_sched_tenant_load(s, "small", &w, &act);
    CHECK(w == 2 && act == 0);
    CHECK(mm_sched_pending(s) == 32);
    CHECK(mm_sched_step(s, err, sizeof err) == MM_OK);
    mm_sched_tenant_load(s, "small", &w, &act);
    CHECK(w == 1 && act == 1);
    s_run_all(s, 500);
    /* admission order = first-token order (each prompt fits one step) */
    printf("fairness: small tenant's cases admitted #%d, #%d of 32\n", b[0].first_order,
           b[1].first_order);
    CHECKF(b[0].first_order >= 1 && b[0].first_order <= 4 && b[1].first_order >= 1 &&
               b[1].first_order <= 4,
           "small tenant admitted as #%d and #%d of 32", b[0].first_order, b[1].first_order);
    for (int i = 1; i < 30; i++)
        CHECKF(a[i].first_order > a[i - 1].first_order, "flood FIFO broken at %d", i);
    for (int i = 0; i < 30; i++) {
        CHECK(a[i].done == 1 && a[i].status == MM_OK);
        s_tcase_clear(&a[i]);
    }
    for (int i = 0; i < 2; i++) {
        CHECK(b[i].done == 1 && b[i].status == MM_OK);
        s_tcase_clear(&b[i]);
    }
    mm_sched_tenant_load(s, "flood", &w, &act);
    CHECK(w == 0 && act == 0);
    mm_sched_destroy(&s);
    mm_model_destroy(&m);
}

/* ---- (4) cancel --------------------------------------------------------------- */

static void test_cancel(void) {
    mm_model *m = s_load(2);
    mm_sched *s = s_sched(m, 0, 0, 0);
    tctx ctx = {.sch = s};
    tcase t[4] = {0};
    char err[512];
    spec sp = {.tenant = "a", .question = "Describe the findings.", .image = 0, .max_tokens = 16};
    mm_sched_request r;
    for (int i = 0; i < 3; i++) {
        t[i].ctx = &ctx;
        s_fill_request(&sp, &t[i], &r);
        CHECK(mm_sched_submit(s, &r, &t[i].id, err, sizeof err) == MM_OK);
    }
    for (int k = 0; k < 3; k++)
        CHECK(mm_sched_step(s, err, sizeof err) == MM_OK);
    CHECK(mm_sched_active(s) == 2 && mm_sched_pending(s) == 1);
    CHECK(t[0].n_tok_cb > 0 && t[0].done == 0);
    CHECK(mm_sched_cancel(s, t[0].id) == MM_OK);
    CHECK(t[0].done == 1 && t[0].status == MM_ECANCELLED && strcmp(t[0].msg, "cancelled") == 0);
    CHECK(t[0].result == NULL);
    CHECK(mm_sched_active(s) == 1 && mm_sched_pending(s) == 1);
    CHECK(mm_sched_cancel(s, t[0].id) == MM_ENOTFOUND);
    CHECK(mm_sched_cancel(s, 99999) == MM_ENOTFOUND);
    /* the waiting case takes the freed slot at the next step */
    CHECK(mm_sched_step(s, err, sizeof err) == MM_OK);
    CHECK(mm_sched_active(s) == 2 && mm_sched_pending(s) == 0);
    CHECK(t[2].n_tok_cb == 1);
    /* cancel a waiting case */
    t[3].ctx = &ctx;
    s_fill_request(&sp, &t[3], &r);
    CHECK(mm_sched_submit(s, &r, &t[3].id, err, sizeof err) == MM_OK);
    CHECK(mm_sched_pending(s) == 1);
    CHECK(mm_sched_cancel(s, t[3].id) == MM_OK);
    CHECK(t[3].done == 1 && t[3].status == MM_ECANCELLED && mm_sched_pending(s) == 0);
    s_run_all(s, 100);
    json_t *ref = s_reference(m, &sp);
    s_compare("cancel", 1, &t[1], ref);
    s_compare("cancel", 2, &t[2], ref);
    json_decref(ref);
    for (int i = 0; i < 4; i++)
        s_tcase_clear(&t[i]);
    mm_sched_destroy(&s);
    mm_model_destroy(&m);
}

/* ---- (5) deadlines -------------------------------------------------------------- */

static void test_deadline(void) {
    mm_model *m = s_load(1);
    mm_sched *s = s_sched(m, 0, 0, 0);
    tctx ctx = {.sch = s};
    tcase t[4] = {0};
    char err[512];
    spec sp = {.tenant = "a", .question = "Describe the findings.", .image = -1, .max_tokens = 6};
    mm_sched_request r;
    /* already past: refused at submit */
    t[3].ctx = &ctx;
    s_fill_request(&sp, &t[3], &r);
    r.deadline_ms = mm_now_ms() - 1;
    CHECK(mm_sched_submit(s, &r, &t[3].id, err, sizeof err) == MM_ETIMEOUT);
    CHECK(t[3].done == 0);
    /* t0 runs, t1 waits behind it and expires while waiting */
    t[0].ctx = t[1].ctx = t[2].ctx = &ctx;
    s_fill_request(&sp, &t[0], &r);
    CHECK(mm_sched_submit(s, &r, &t[0].id, err, sizeof err) == MM_OK);
    s_fill_request(&sp, &t[1], &r);
    r.deadline_ms = mm_now_ms() + 30;
    CHECK(mm_sched_submit(s, &r, &t[1].id, err, sizeof err) == MM_OK);
    CHECK(mm_sched_step(s, err, sizeof err) == MM_OK);
    usleep(40 * 1000);
    CHECK(mm_sched_step(s, err, sizeof err) == MM_OK);
    CHECK(t[1].done == 1 && t[1].status == MM_ETIMEOUT && t[1].n_tok_cb == 0);
    CHECK(mm_sched_pending(s) == 0);
    s_run_all(s, 100);
    CHECK(t[0].done == 1 && t[0].status == MM_OK);
    /* t2 expires while running: its slot is freed */
    s_fill_request(&sp, &t[2], &r);
    r.max_tokens = 64;
    r.deadline_ms = mm_now_ms() + 30;
    CHECK(mm_sched_submit(s, &r, &t[2].id, err, sizeof err) == MM_OK);
    CHECK(mm_sched_step(s, err, sizeof err) == MM_OK);
    CHECK(mm_sched_active(s) == 1 && t[2].n_tok_cb == 1);
    usleep(40 * 1000);
    CHECK(mm_sched_step(s, err, sizeof err) == MM_OK);
    CHECK(t[2].done == 1 && t[2].status == MM_ETIMEOUT);
    CHECK(mm_sched_active(s) == 0);
    for (int i = 0; i < 4; i++)
        s_tcase_clear(&t[i]);
    mm_sched_destroy(&s);
    mm_model_destroy(&m);
}

/* ---- (6) bad requests --------------------------------------------------------------- */

static void s_expect_reject(mm_sched *s, mm_sched_request *r, int want, const char *field) {
    char err[1024] = "";
    uint64_t id = 7;
    int rc = mm_sched_submit(s, r, &id, err, sizeof err);
    CHECKF(rc == want && strstr(err, field) && id == 0, "want %s naming '%s', got %s: %s",
           mm_status_str(want), field, mm_status_str(rc), err);
}

static void test_bad_requests(void) {
    mm_model *m = s_load(1);
    mm_sched *s = s_sched(m, 0, 0, 2);
    tctx ctx = {.sch = s};
    tcase t = {.ctx = &ctx};
    spec sp = {.tenant = "a", .question = "What is it?", .image = 0, .max_tokens = 4};
    mm_sched_request r;
    s_fill_request(&sp, &t, &r);
    r.question = "  \n ";
    s_expect_reject(s, &r, MM_EINVAL, "question");
    s_fill_request(&sp, &t, &r);
    r.question = NULL;
    s_expect_reject(s, &r, MM_EINVAL, "question");
    s_fill_request(&sp, &t, &r);
    r.tenant = "";
    s_expect_reject(s, &r, MM_EINVAL, "tenant");
    s_fill_request(&sp, &t, &r);
    r.on_done = NULL;
    s_expect_reject(s, &r, MM_EINVAL, "on_done");
    s_fill_request(&sp, &t, &r);
    r.image_bytes = "this is not an image at all";
    r.image_len = 27;
    r.media_type = NULL;
    s_expect_reject(s, &r, MM_EINVAL, "image");
    s_fill_request(&sp, &t, &r);
    r.image_len = g_img[0].len / 2; /* truncated PNG */
    s_expect_reject(s, &r, MM_EINVAL, "image");
    s_fill_request(&sp, &t, &r);
    r.media_type = "image/gif";
    s_expect_reject(s, &r, MM_EINVAL, "image");
    s_fill_request(&sp, &t, &r);
    r.image_len = 0;
    s_expect_reject(s, &r, MM_EINVAL, "image");
    s_fill_request(&sp, &t, &r);
    r.conv_mode = "llama";
    s_expect_reject(s, &r, MM_EINVAL, "conv_mode");
    s_fill_request(&sp, &t, &r);
    r.candidates = "ct,,mri";
    s_expect_reject(s, &r, MM_EINVAL, "candidates");
    s_fill_request(&sp, &t, &r);
    r.max_tokens = -1;
    s_expect_reject(s, &r, MM_EINVAL, "max_tokens");
    s_fill_request(&sp, &t, &r);
    r.temperature = NAN;
    s_expect_reject(s, &r, MM_EINVAL, "temperature");
    s_fill_request(&sp, &t, &r);
    r.top_p = 1.5f;
    s_expect_reject(s, &r, MM_EINVAL, "top_p");
    s_fill_request(&sp, &t, &r);
    r.question = "\xff\xfe broken UTF-8";
    s_expect_reject(s, &r, MM_EINVAL, "question");
    /* a prompt longer than the context */
    size_t qn = (size_t)mm_model_max_ctx(m) * 4;
    char *longq = malloc(qn + 1);
    for (size_t i = 0; i < qn; i++)
        longq[i] = i % 2 ? ' ' : 'a' + (char)(i % 23);
    longq[qn] = 0;
    s_fill_request(&sp, &t, &r);
    r.question = longq;
    s_expect_reject(s, &r, MM_EINVAL, "context");
    free(longq);
    /* queue full */
    char err[512];
    tcase ok[2] = {{.ctx = &ctx}, {.ctx = &ctx}};
    for (int i = 0; i < 2; i++) {
        s_fill_request(&sp, &ok[i], &r);
        CHECK(mm_sched_submit(s, &r, &ok[i].id, err, sizeof err) == MM_OK);
    }
    s_fill_request(&sp, &t, &r);
    s_expect_reject(s, &r, MM_EAGAIN, "queue full");
    CHECK(t.done == 0);
    CHECK(mm_sched_pending(s) == 2);
    /* nothing rejected ever reached on_done; shutdown finishes the rest */
    ok[0].try_reenter = 1;
    ctx.sch = s;
    CHECK(mm_sched_step(s, err, sizeof err) == MM_OK);
    mm_sched_destroy(&s);
    CHECK(s == NULL);
    for (int i = 0; i < 2; i++) {
        CHECKF(ok[i].done == 1 && ok[i].status == MM_EAGAIN && strstr(ok[i].msg, "shutting down"),
               "shutdown: case %d done %d %s %s", i, ok[i].done, mm_status_str(ok[i].status),
               ok[i].msg);
        s_tcase_clear(&ok[i]);
    }
    CHECK(t.done == 0);
    mm_model_destroy(&m);
}

/* ---- re-entrancy and a failing forward step ------------------------------------------ */

typedef struct fail_runner {
    int fail;        /* every layer fails                         */
    int fail_expert; /* only layers with a job for this expert (-1: none) */
    int fail_once;   /* the next layer fails, then this is cleared          */
} fail_runner;

static int s_fail_start(void *ctx, mm_model *m, mm_expert_job *jobs, size_t n, char *err,
                        size_t errlen) {
    fail_runner *f = ctx;
    if (f->fail)
        return mm_errorf(err, errlen, MM_ETIMEOUT, "expert %d of layer %d: no live replica",
                         n ? jobs[0].expert : -1, n ? jobs[0].layer : -1);
    if (f->fail_once) {
        f->fail_once = 0;
        return mm_errorf(err, errlen, MM_ETIMEOUT, "expert %d of layer %d: replica lost",
                         n ? jobs[0].expert : -1, n ? jobs[0].layer : -1);
    }
    for (size_t i = 0; i < n; i++)
        if (jobs[i].expert == f->fail_expert)
            return mm_errorf(err, errlen, MM_ETIMEOUT, "expert %d of layer %d: no live replica",
                             jobs[i].expert, jobs[i].layer);
    for (size_t i = 0; i < n; i++) {
        int rc = mm_model_expert_forward(m, jobs[i].moe, jobs[i].expert, jobs[i].x, jobs[i].y, err,
                                         errlen);
        if (rc != MM_OK)
            return rc;
    }
    return MM_OK;
}

static int s_fail_finish(void *ctx, mm_model *m, mm_expert_job *jobs, size_t n, char *err,
                         size_t errlen) {
    return mm_backend_sync(mm_model_backend(m)) == MM_OK
               ? MM_OK
               : mm_errorf(err, errlen, MM_EDEVICE, "sync failed");
}

static void test_forward_failure(void) {
    mm_model *m = s_load(3);
    if (!mm_model_config(m)->moe_enable) {
        mm_model_destroy(&m);
        return;
    }
    mm_sched *s = s_sched(m, 0, 0, 0);
    tctx ctx = {.sch = s};
    tcase t[4] = {0};
    char err[512];
    spec sp = {.tenant = "a", .question = "Which organ is shown?", .image = 1, .max_tokens = 8};
    mm_sched_request r;
    fail_runner fr = {0};
    fr.fail_expert = -1;
    mm_expert_runner runner = {&fr, s_fail_start, s_fail_finish};
    mm_model_set_expert_runner(m, &runner);
    for (int i = 0; i < 2; i++) {
        t[i].ctx = &ctx;
        s_fill_request(&sp, &t[i], &r);
        CHECK(mm_sched_submit(s, &r, &t[i].id, err, sizeof err) == MM_OK);
    }
    CHECK(mm_sched_step(s, err, sizeof err) == MM_OK);
    CHECK(mm_sched_step(s, err, sizeof err) == MM_OK);
    fr.fail = 1; /* the step's cases fail; the scheduler carries on */
    CHECK(mm_sched_step(s, err, sizeof err) == MM_OK);
    for (int i = 0; i < 2; i++)
        CHECKF(t[i].done == 1 && t[i].status == MM_ETIMEOUT && strstr(t[i].msg, "replica"),
               "case %d: %s %s", i, mm_status_str(t[i].status), t[i].msg);
    CHECK(mm_sched_active(s) == 0);
    fr.fail = 0;
    t[2].ctx = &ctx;
    s_fill_request(&sp, &t[2], &r);
    CHECK(mm_sched_submit(s, &r, &t[2].id, err, sizeof err) == MM_OK);
    s_run_all(s, 100);
    mm_model_set_expert_runner(m, NULL);
    json_t *ref = s_reference(m, &sp);
    s_compare("after failure", 2, &t[2], ref);
    json_decref(ref);
    /* a callback calling mm_sched_step is refused */
    t[3].ctx = &ctx;
    t[3].try_reenter = 1;
    sp.max_tokens = 1;
    s_fill_request(&sp, &t[3], &r);
    CHECK(mm_sched_submit(s, &r, &t[3].id, err, sizeof err) == MM_OK);
    s_run_all(s, 10);
    CHECK(t[3].done == 1 && t[3].reenter_rc == MM_EAGAIN);
    for (int i = 0; i < 4; i++)
        s_tcase_clear(&t[i]);
    mm_sched_destroy(&s);
    mm_model_destroy(&m);
}

/* jpeg_downscale leaves a JPEG smaller than 2 x 336 on its short side as it
 * is (the scaling itself is tested in test_image): same answer as the
 * oracle's full decode. */
static void test_jpeg_downscale_small(void) {
    mm_model *m = s_load(1);
    mm_sched_options o;
    mm_sched_options_default(&o);
    o.image_workers = 0;
    o.jpeg_downscale = 1;
    mm_sched *s = NULL;
    char err[512];
    CHECKF(mm_sched_new(m, g_tok, &o, &s, err, sizeof err) == MM_OK, "new: %s", err);
    tctx ctx = {.sch = s};
    spec sp = {"hospital-a", g_questions[0], 1 /* case.jpg */, 4, 0, 0, NULL};
    tcase t = {.ctx = &ctx};
    mm_sched_request r;
    s_fill_request(&sp, &t, &r);
    CHECK(mm_sched_submit(s, &r, &t.id, err, sizeof err) == MM_OK);
    s_run_all(s, 50);
    json_t *ref = s_reference(m, &sp);
    s_compare("jpeg downscale", 0, &t, ref);
    json_decref(ref);
    s_tcase_clear(&t);
    mm_sched_destroy(&s);
    mm_model_destroy(&m);
}

/* Candidates are scored in one step when idle slots can be lent (the
 * prompt's KV cache copied into each), one a step otherwise; the scores
 * equal the oracle's either way. */
static void test_classify_batched(void) {
    static const char *cands = "left lung,right lung,both lungs,neither side";
    for (int slots = 5; slots >= 1; slots -= 4) {
        mm_model *m = s_load(slots);
        mm_sched *s = s_sched(m, 0, 0, 0);
        tctx ctx = {.sch = s};
        spec sp = {"hospital-a", g_questions[1], 0, 0, 0, 0, cands};
        tcase t = {.ctx = &ctx};
        mm_sched_request r;
        char err[512];
        s_fill_request(&sp, &t, &r);
        CHECK(mm_sched_submit(s, &r, &t.id, err, sizeof err) == MM_OK);
        s_run_all(s, 50);
        json_t *ref = s_reference(m, &sp);
        s_compare("classify batched", slots, &t, ref);
        json_decref(ref);
        /* steps: the prompt, then 1 (lent slots) or 4 (one candidate each) */
        json_int_t steps = json_integer_value(json_object_get(t.result, "steps"));
        CHECKF(steps == (slots == 5 ? 2 : 5), "%d slot(s): %lld steps", slots, (long long)steps);
        s_tcase_clear(&t);
        mm_sched_destroy(&s);
        mm_model_destroy(&m);
    }
}

/* A short prompt admitted while a long one is being prefilled goes first:
 * its first token comes from the very next step, not after the long
 * prompt (prefill_chunk is the budget of all prompts together). */
static void test_short_first(void) {
    mm_model *m = s_load(2);
    mm_sched *s = s_sched(m, 0, 160, 0); /* the short prompt (~130) fits one chunk */
    tctx ctx = {.sch = s};
    char longq[2048] = "";
    for (int i = 0; i < 5; i++) /* ~245 positions: two chunks */
        strcat(longq, "Describe every finding of this study in detail. ");
    spec sp_long = {"hospital-a", longq, -1, 2, 0, 0, NULL};
    spec sp_short = {"hospital-b", g_questions[4], -1, 2, 0, 0, NULL};
    tcase lg = {.ctx = &ctx}, sh = {.ctx = &ctx};
    mm_sched_request r;
    char err[512];
    s_fill_request(&sp_long, &lg, &r);
    CHECK(mm_sched_submit(s, &r, &lg.id, err, sizeof err) == MM_OK);
    CHECK(mm_sched_step(s, err, sizeof err) == MM_OK); /* 160 rows of the long prompt */
    s_fill_request(&sp_short, &sh, &r);
    CHECK(mm_sched_submit(s, &r, &sh.id, err, sizeof err) == MM_OK);
    /* step 2: the long prompt has fewer rows left (85 < ~130): it goes
     * first and finishes; the short one gets the rest of the 160 rows
     * (per-case chunks would have run both whole; shortest-first broken
     * would give the short one its token here) */
    CHECK(mm_sched_step(s, err, sizeof err) == MM_OK);
    CHECKF(lg.n_tok_cb == 1 && sh.n_tok_cb == 0, "after step 2: long %d token(s), short %d",
           lg.n_tok_cb, sh.n_tok_cb);
    CHECK(mm_sched_step(s, err, sizeof err) == MM_OK); /* step 3: the short's rest */
    CHECKF(sh.n_tok_cb == 1, "after step 3: short %d token(s)", sh.n_tok_cb);
    s_run_all(s, 400);
    json_t *ref = s_reference(m, &sp_long);
    s_compare("short-first long", 0, &lg, ref);
    json_decref(ref);
    ref = s_reference(m, &sp_short);
    s_compare("short-first short", 1, &sh, ref);
    json_decref(ref);
    s_tcase_clear(&lg);
    s_tcase_clear(&sh);
    mm_sched_destroy(&s);
    mm_model_destroy(&m);
}

/* A step that fails once (a transient expert failure in a batch of several
 * cases) is re-run case by case: nobody fails, every answer is exact. */
static void test_step_retry(void) {
    enum { N = 6 };
    mm_model *m = s_load(N);
    if (!mm_model_config(m)->moe_enable) {
        mm_model_destroy(&m);
        return;
    }
    mm_sched *s = s_sched(m, 0, 0, 0);
    tctx ctx = {.sch = s};
    fail_runner fr = {.fail = 0, .fail_expert = -1};
    mm_expert_runner runner = {&fr, s_fail_start, s_fail_finish};
    mm_model_set_expert_runner(m, &runner);
    spec sp[N];
    tcase t[N];
    memset(t, 0, sizeof t);
    char err[512];
    for (int i = 0; i < N; i++) {
        sp[i] = (spec){i % 2 ? "hospital-a" : "hospital-b",
                       g_questions[i % 8],
                       i % 3 == 0 ? 0 : -1,
                       6,
                       0,
                       0,
                       NULL};
        mm_sched_request r;
        t[i].ctx = &ctx;
        s_fill_request(&sp[i], &t[i], &r);
        CHECK(mm_sched_submit(s, &r, &t[i].id, err, sizeof err) == MM_OK);
    }
    CHECK(mm_sched_step(s, err, sizeof err) == MM_OK); /* the prompts */
    fr.fail_once = 1; /* the next step's first MoE layer fails, with all N cases in it */
    s_run_all(s, 200);
    CHECK(fr.fail_once == 0);
    mm_model_set_expert_runner(m, NULL);
    for (int i = 0; i < N; i++) {
        json_t *ref = s_reference(m, &sp[i]);
        s_compare("step retry", i, &t[i], ref);
        json_decref(ref);
        s_tcase_clear(&t[i]);
    }
    mm_sched_destroy(&s);
    mm_model_destroy(&m);
}

/* ---- threads: image workers + engine thread ------------------------------------------ */

static int s_done_now(tcase *t) { return __atomic_load_n(&t->done, __ATOMIC_ACQUIRE); }

/* Wait (events, bounded) until t is done; 1 when it is. */
static int s_wait_done(tcase *t, double ms) {
    double end = mm_now_ms() + ms;
    while (!s_done_now(t) && mm_now_ms() < end) {
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
    }
    return s_done_now(t);
}

typedef struct slow_watch {
    tcase *slow;       /* the case whose vision is slowed */
    int slow_was_done; /* when the fast case finished */
} slow_watch;

static void s_on_done_watch(void *user, uint64_t id, int status, const char *message,
                            const mm_case_result *result) {
    tcase *t = user;
    slow_watch *w = (slow_watch *)t->ctx->sch; /* see test_threads */
    w->slow_was_done = s_done_now(w->slow);
    s_on_done(user, id, status, message, result);
}

/* The engine thread keeps decoding while an image worker spends seconds on a
 * vision encode (debug_vision_delay_ms): a text-only case submitted after a
 * slow image case finishes first, and both equal the oracle. Cancel in the
 * image stage and shutdown with work in flight end their cases. */
static void test_threads(void) {
    mm_model *m = s_load(2);
    mm_sched_options o;
    mm_sched_options_default(&o);
    o.image_workers = 1;
    o.debug_vision_delay_ms = 3000;
    mm_sched *s = NULL;
    char err[512];
    CHECKF(mm_sched_new(m, g_tok, &o, &s, err, sizeof err) == MM_OK, "new: %s", err);
    CHECKF(mm_sched_start(s, err, sizeof err) == MM_OK, "start: %s", err);
    CHECK(mm_sched_start(s, err, sizeof err) == MM_EINVAL);
    tcase slow = {0}, fast = {0}, gone = {0}, last = {0};
    slow_watch w = {.slow = &slow};
    tctx ctx = {0}, wctx = {.sch = (mm_sched *)&w}; /* s_on_done_watch finds w there */
    slow.ctx = gone.ctx = last.ctx = &ctx;
    fast.ctx = &wctx;
    spec sp_slow = {"hospital-a", g_questions[0], 0, 6, 0, 0, NULL};
    spec sp_fast = {"hospital-b", g_questions[1], -1, 6, 0, 0, NULL};
    mm_sched_request r;
    s_fill_request(&sp_slow, &slow, &r);
    CHECKF(mm_sched_submit(s, &r, &slow.id, err, sizeof err) == MM_OK, "submit: %s", err);
    s_fill_request(&sp_fast, &fast, &r);
    r.on_done = s_on_done_watch;
    CHECKF(mm_sched_submit(s, &r, &fast.id, err, sizeof err) == MM_OK, "submit: %s", err);
    CHECK(s_wait_done(&fast, 60000));
    CHECKF(fast.status == MM_OK && !w.slow_was_done,
           "the text case waited for the slow image: %s, slow done %d", fast.msg, w.slow_was_done);
    CHECK(s_wait_done(&slow, 120000) && slow.status == MM_OK);
    json_t *ref = s_reference(m, &sp_fast);
    s_compare("threads fast", 0, &fast, ref);
    json_decref(ref);
    ref = s_reference(m, &sp_slow);
    s_compare("threads slow", 1, &slow, ref);
    json_decref(ref);
    /* cancelled while its image is queued or encoding */
    s_fill_request(&sp_slow, &gone, &r);
    CHECK(mm_sched_submit(s, &r, &gone.id, err, sizeof err) == MM_OK);
    CHECK(mm_sched_cancel(s, gone.id) == MM_OK);
    CHECK(s_wait_done(&gone, 60000) && gone.status == MM_ECANCELLED);
    CHECK(mm_sched_cancel(s, gone.id) == MM_ENOTFOUND);
    /* shutdown with an image in the worker: the case ends "shutting down" */
    s_fill_request(&sp_slow, &last, &r);
    CHECK(mm_sched_submit(s, &r, &last.id, err, sizeof err) == MM_OK);
    mm_sched_destroy(&s);
    CHECK(last.done == 1 && last.status == MM_EAGAIN);
    s_tcase_clear(&slow);
    s_tcase_clear(&fast);
    s_tcase_clear(&gone);
    s_tcase_clear(&last);
    mm_model_destroy(&m);
}

/* ---- throughput ------------------------------------------------------------------------ */

static void bench(void) {
    const int n_cases = 64;
    int conc[] = {1, 8, 32};
    for (size_t ci = 0; ci < 3; ci++) {
        mm_model *m = s_load(conc[ci]);
        mm_sched *s = s_sched(m, 0, 0, (size_t)n_cases);
        tctx ctx = {.sch = s};
        tcase *tc = calloc((size_t)n_cases, sizeof *tc);
        spec *sp = calloc((size_t)n_cases, sizeof *sp);
        char err[512];
        double t0 = mm_now_ms();
        for (int i = 0; i < n_cases; i++) {
            sp[i] = s_make_spec(i);
            sp[i].max_tokens = 16;
            sp[i].temperature = 0;
            mm_sched_request r;
            tc[i].ctx = &ctx;
            s_fill_request(&sp[i], &tc[i], &r);
            if (mm_sched_submit(s, &r, &tc[i].id, err, sizeof err) != MM_OK)
                fprintf(stderr, "bench submit: %s\n", err);
        }
        double t1 = mm_now_ms();
        uint64_t st0 = mm_sched_steps(s);
        s_run_all(s, 100000);
        double t2 = mm_now_ms();
        uint64_t steps = mm_sched_steps(s) - st0;
        size_t toks = 0;
        for (int i = 0; i < n_cases; i++) {
            toks += json_array_size(json_object_get(tc[i].result, "tokens"));
            s_tcase_clear(&tc[i]);
        }
        printf("bench: %2d slots: %d cases (16 tokens, 3/4 with image) in %.0f ms (+%.0f ms "
               "submit): %.1f cases/s, %.0f tokens/s, %llu steps, %.1f steps/s\n",
               conc[ci], n_cases, t2 - t1, t1 - t0, n_cases * 1e3 / (t2 - t0),
               (double)toks * 1e3 / (t2 - t1), (unsigned long long)steps,
               (double)steps * 1e3 / (t2 - t1));
        free(tc);
        free(sp);
        mm_sched_destroy(&s);
        if (ci == 0) { /* the same cases one by one through mm_case_answer */
            double b0 = mm_now_ms();
            for (int i = 0; i < n_cases; i++) {
                spec x = s_make_spec(i);
                x.max_tokens = 16;
                x.temperature = 0;
                json_decref(s_reference(m, &x));
            }
            printf("bench: mm_case_answer one by one: %.1f cases/s\n",
                   n_cases * 1e3 / (mm_now_ms() - b0));
        }
        mm_model_destroy(&m);
    }
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: test_scheduler CKPT_DIR IMAGES_DIR [bench]\n");
        return 2;
    }
    g_ckpt = argv[1];
    g_images = argv[2];
    char err[1024], path[1024];
    static const char *names[] = {"case.png", "case.jpg", "gray.png"};
    static const char *media[] = {"image/png", "image/jpeg", NULL};
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/%s", g_images, names[i]);
        if (s_read_file(path, &g_img[i]) != 0) {
            fprintf(stderr, "cannot read %s\n", path);
            return 2;
        }
        g_img[i].media = media[i];
    }
    const char *backend = getenv("MM_TEST_BACKEND"); /* default cpu; vulkan: lavapipe run */
    if (mm_backend_new(backend ? backend : "cpu", &g_be, err, sizeof err) != MM_OK ||
        mm_tokenizer_load(g_ckpt, &g_tok, err, sizeof err) != MM_OK) {
        fprintf(stderr, "setup: %s\n", err);
        return 2;
    }
    if (argc > 3 && strcmp(argv[3], "bench") == 0) {
        bench();
    } else {
        test_equivalence(8, 8, 160, 64); /* prompts split over steps, shared budget */
        test_equivalence(8, 4, 0, 0);    /* more cases than slots */
        test_equivalence(32, 32, 0, 0);
        test_fairness();
        test_cancel();
        test_deadline();
        test_bad_requests();
        test_forward_failure();
        test_threads();
        test_short_first();
        test_classify_batched();
        test_jpeg_downscale_small();
        test_step_retry();
    }
    for (int i = 0; i < 3; i++)
        free(g_img[i].data);
    mm_tokenizer_destroy(&g_tok);
    mm_backend_destroy(&g_be);
    printf("test_scheduler %s: %d checks, %d failed\n", g_ckpt, g_checks, g_fail);
    return g_fail ? 1 : 0;
}
