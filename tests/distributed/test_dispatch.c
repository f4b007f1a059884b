/* test_dispatch.c — the router's dispatch thread (router-node/dispatch.h)
 * against fake experts in this process: DEALER sockets on real ZeroMQ tcp
 * loopback, each driven by its own thread, answering Work as told (y = 2x,
 * never, INTERNAL, EXPIRED). The runner is called as the engine calls it.
 *
 * What it holds the dispatcher to (docs/ARCHITECTURE.md, "Threads in the
 * router"): a busy engine does not stop heartbeats; a silent replica costs
 * a hedged re-send and is given no work again while silent (a Hello again
 * included); an error answer is re-sent at once to a healthy replica; a
 * batch fails only when no healthy replica remains for expert_wait_ms;
 * EXPIRED fails the step without blaming the replica; Work.deadline_ms is
 * the time left; in-flight counts are exact after every layer.
 *
 *     test_dispatch            # every scenario; exit 0 when all hold
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "clock.h"
#include "dispatch.h"
#include "wire.h"

#define H 8      /* row width                                            */
#define HB 100   /* heartbeat interval (ms): dead after 300 ms of silence */
#define WAIT 800 /* expert_wait_ms                                       */

static int g_failures;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                        \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, "\n");                                                                 \
            g_failures++;                                                                          \
        }                                                                                          \
    } while (0)

static void s_sleep_ms(int ms) {
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ---- a fake expert ---------------------------------------------------------- */

typedef enum { FAKE_OK, FAKE_SILENT, FAKE_ERROR, FAKE_EXPIRED } f_mode;

typedef struct fake {
    void *zctx;           /* shared context                                   */
    char endpoint[256];   /* the router's                                     */
    int expert;           /* expert served                                    */
    char node[64];        /* Hello.node: the same across reconnections        */
    atomic_int mode;      /* f_mode                                           */
    atomic_int quit;      /* ends the thread                                  */
    atomic_int rehello;   /* 1: open a new connection and say Hello again     */
    atomic_int welcomed;  /* Welcomes received                                */
    atomic_int works;     /* case Work received                               */
    atomic_int probes;    /* probe Work received                              */
    atomic_uint deadline; /* Work.deadline_ms of the last case Work           */
    atomic_int max_gap;   /* longest silence of the router once welcomed (ms) */
    pthread_t t;
} fake;

static void *s_connect(fake *f) {
    void *s = zmq_socket(f->zctx, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    zmq_connect(s, f->endpoint);
    Medmoe__Wire__Hello h = MEDMOE__WIRE__HELLO__INIT;
    char fp[MM_FINGERPRINT_HEX];
    memset(fp, 'a', sizeof fp - 1);
    fp[sizeof fp - 1] = 0;
    h.version = MM_WIRE_VERSION;
    h.expert = f->expert;
    h.fingerprint = fp;
    h.backend = "fake";
    h.node = f->node;
    Medmoe__Wire__Envelope env = MEDMOE__WIRE__ENVELOPE__INIT;
    env.body_case = MM_WIRE_HELLO;
    env.hello = &h;
    char err[256];
    mm_wire_send(s, NULL, 0, &env, NULL, err, sizeof err);
    return s;
}

static void s_reply(void *s, const Medmoe__Wire__Work *w, const mm_wire_msg *m, int code) {
    Medmoe__Wire__Result r = MEDMOE__WIRE__RESULT__INIT;
    r.batch_id = w->batch_id;
    r.layer = w->layer;
    r.moe = w->moe;
    r.expert = w->expert;
    r.rows = w->rows;
    r.width = w->width;
    r.dtype = w->dtype;
    r.error = code;
    r.message = code ? "fake expert says so" : NULL;
    Medmoe__Wire__Envelope env = MEDMOE__WIRE__ENVELOPE__INIT;
    env.body_case = MM_WIRE_RESULT;
    env.result = &r;
    char err[256];
    if (code) {
        mm_wire_send(s, NULL, 0, &env, NULL, err, sizeof err);
        return;
    }
    mm_wire_buf *y = mm_wire_buf_new(m->tensor_len);
    memcpy(y->data, m->tensor, m->tensor_len);
    for (size_t i = 0; i < m->tensor_len / sizeof(float); i++)
        y->data[i] *= 2;
    mm_wire_send(s, NULL, 0, &env, y, err, sizeof err);
    mm_wire_buf_unref(&y);
}

static void *s_fake(void *arg) {
    fake *f = arg;
    void *s = s_connect(f);
    double last_recv = 0, last_sent = mm_now_ms();
    Medmoe__Wire__Heartbeat hb = MEDMOE__WIRE__HEARTBEAT__INIT;
    Medmoe__Wire__Envelope beat = MEDMOE__WIRE__ENVELOPE__INIT;
    beat.body_case = MM_WIRE_HEARTBEAT;
    beat.heartbeat = &hb;
    char err[256];
    while (!atomic_load(&f->quit)) {
        if (atomic_exchange(&f->rehello, 0)) {
            zmq_close(s);
            s = s_connect(f);
            last_recv = 0;
        }
        zmq_pollitem_t it = {.socket = s, .events = ZMQ_POLLIN};
        zmq_poll(&it, 1, 5);
        mm_wire_msg m;
        while (mm_wire_recv(s, 0, &m, err, sizeof err) == MM_OK) {
            double now = mm_now_ms();
            if (last_recv > 0 && now - last_recv > atomic_load(&f->max_gap))
                atomic_store(&f->max_gap, (int)(now - last_recv));
            if (m.env->body_case == MM_WIRE_WELCOME) {
                atomic_fetch_add(&f->welcomed, 1);
                last_recv = now;
            } else if (last_recv > 0) {
                last_recv = now;
            }
            if (m.env->body_case == MM_WIRE_WORK) {
                const Medmoe__Wire__Work *w = m.env->work;
                if (w->probe) {
                    atomic_fetch_add(&f->probes, 1);
                } else {
                    atomic_fetch_add(&f->works, 1);
                    atomic_store(&f->deadline, w->deadline_ms);
                }
                int mode = atomic_load(&f->mode);
                if (mode == FAKE_OK)
                    s_reply(s, w, &m, MEDMOE__WIRE__ERROR_CODE__ERROR_OK);
                else if (mode == FAKE_ERROR)
                    s_reply(s, w, &m, MEDMOE__WIRE__ERROR_CODE__ERROR_INTERNAL);
                else if (mode == FAKE_EXPIRED)
                    s_reply(s, w, &m, MEDMOE__WIRE__ERROR_CODE__ERROR_EXPIRED);
                last_sent = mm_now_ms();
            }
            mm_wire_msg_clear(&m);
        }
        if (mm_now_ms() - last_sent >= HB) {
            mm_wire_send(s, NULL, 0, &beat, NULL, err, sizeof err);
            last_sent = mm_now_ms();
        }
    }
    zmq_close(s);
    return NULL;
}

static fake *s_fake_start(void *zctx, const char *endpoint, int expert, f_mode mode,
                          const char *node) {
    fake *f = calloc(1, sizeof *f);
    f->zctx = zctx;
    snprintf(f->endpoint, sizeof f->endpoint, "%s", endpoint);
    f->expert = expert;
    snprintf(f->node, sizeof f->node, "%s", node);
    atomic_init(&f->mode, mode);
    pthread_create(&f->t, NULL, s_fake, f);
    double end = mm_now_ms() + 5000;
    while (!atomic_load(&f->welcomed) && mm_now_ms() < end)
        s_sleep_ms(2);
    CHECK(atomic_load(&f->welcomed), "fake %s (expert %d) was not welcomed within 5 s", node,
          expert);
    return f;
}

static void s_fake_stop(fake **fp) {
    fake *f = *fp;
    if (!f)
        return;
    atomic_store(&f->quit, 1);
    pthread_join(f->t, NULL);
    free(f);
    *fp = NULL;
}

/* ---- the engine side ------------------------------------------------------ */

typedef struct bench {
    mm_log *log; /* NULL: stderr */
    mm_backend *be;
    mm_dispatch *d;
    mm_expert_runner r;
    void *zctx;
    char fps[2][MM_FINGERPRINT_HEX];
} bench;

static void s_bench_new_log(bench *b, int batch_timeout_ms, mm_log *lg, int refusal_log_ms) {
    memset(b, 0, sizeof *b);
    b->log = lg;
    char err[512];
    if (mm_backend_new("cpu", &b->be, err, sizeof err) != MM_OK) {
        fprintf(stderr, "cpu backend: %s\n", err);
        exit(1);
    }
    for (int e = 0; e < 2; e++) {
        memset(b->fps[e], 'a', MM_FINGERPRINT_HEX - 1);
        b->fps[e][MM_FINGERPRINT_HEX - 1] = 0;
    }
    mm_dispatch_options o;
    mm_dispatch_options_default(&o);
    o.bind = "tcp://127.0.0.1:*";
    o.heartbeat_ms = HB;
    o.expert_wait_ms = WAIT;
    o.batch_timeout_ms = batch_timeout_ms;
    o.n_experts = 2;
    o.hidden = H;
    o.fingerprints = (const char(*)[MM_FINGERPRINT_HEX])b->fps;
    o.insecure = 1; /* the fakes speak plaintext: these tests are about scheduling */
    o.log = b->log;
    if (refusal_log_ms)
        o.refusal_log_ms = refusal_log_ms;
    if (mm_dispatch_new(&o, &b->d, err, sizeof err) != MM_OK) {
        fprintf(stderr, "mm_dispatch_new: %s\n", err);
        exit(1);
    }
    mm_dispatch_runner(b->d, &b->r);
    b->zctx = zmq_ctx_new();
}

static void s_bench_new(bench *b, int batch_timeout_ms) {
    s_bench_new_log(b, batch_timeout_ms, NULL, 0);
}

static void s_bench_destroy(bench *b) {
    mm_dispatch_destroy(&b->d);
    zmq_ctx_term(b->zctx);
    mm_backend_destroy(&b->be);
}

/* stats: the replicas of `node` (every record, reconnections included). */
static json_int_t s_sum(json_t *st, const char *node, const char *field) {
    json_int_t n = 0;
    size_t i;
    json_t *r;
    json_array_foreach(json_object_get(st, "replicas"), i, r) {
        if (!strcmp(json_string_value(json_object_get(r, "node")), node))
            n += json_integer_value(json_object_get(r, field));
    }
    return n;
}

static const char *s_health(json_t *st, const char *node) {
    const char *h = "absent";
    size_t i;
    json_t *r;
    json_array_foreach(json_object_get(st, "replicas"), i, r) {
        if (!strcmp(json_string_value(json_object_get(r, "node")), node) &&
            json_is_true(json_object_get(r, "alive")))
            h = json_string_value(json_object_get(r, "health"));
    }
    return h;
}

/* In-flight counts equal the open sends, and with no layer open they are 0. */
static void s_check_accounting(mm_dispatch *d, const char *when) {
    json_t *st = mm_dispatch_stats(d);
    CHECK(json_is_true(json_object_get(st, "inflight_exact")), "%s: in-flight counts drifted",
          when);
    size_t i;
    json_t *r;
    json_array_foreach(json_object_get(st, "replicas"), i, r) {
        CHECK(json_integer_value(json_object_get(r, "inflight")) == 0 &&
                  json_integer_value(json_object_get(r, "inflight_rows")) == 0,
              "%s: replica %s has %lld batch(es) / %lld row(s) in flight after the layer", when,
              json_string_value(json_object_get(r, "id")),
              (long long)json_integer_value(json_object_get(r, "inflight")),
              (long long)json_integer_value(json_object_get(r, "inflight_rows")));
    }
    json_decref(st);
}

/* One MoE layer through the runner: rows rows for each expert in `experts`
 * (x = i + 1000 e + 0.25), then `busy_ms` of engine work between start and
 * finish. Returns finish()'s status (err filled); y is checked (2x) on OK. */
static int s_layer(bench *b, int nexp, const int *experts, size_t rows, double deadline_ms,
                   int busy_ms, char *err, size_t errlen, double *took_ms) {
    mm_expert_job jobs[2];
    double t0 = mm_now_ms();
    for (int j = 0; j < nexp; j++) {
        memset(&jobs[j], 0, sizeof jobs[j]);
        jobs[j].layer = 3;
        jobs[j].moe = 1;
        jobs[j].expert = experts[j];
        jobs[j].n = rows;
        jobs[j].deadline_ms = deadline_ms;
        mm_tensor_new_2d(b->be, MM_F32, rows, H, &jobs[j].x);
        mm_tensor_new_2d(b->be, MM_F32, rows, H, &jobs[j].y);
        float x[64 * H];
        for (size_t i = 0; i < rows * H; i++)
            x[i] = (float)i + 1000.0f * (float)experts[j] + 0.25f;
        mm_tensor_set(jobs[j].x, x, MM_F32);
    }
    int rc = b->r.start(b->r.ctx, NULL, jobs, (size_t)nexp, err, errlen);
    if (rc == MM_OK) {
        if (busy_ms)
            s_sleep_ms(busy_ms);
        rc = b->r.finish(b->r.ctx, NULL, jobs, (size_t)nexp, err, errlen);
    }
    if (took_ms)
        *took_ms = mm_now_ms() - t0;
    for (int j = 0; j < nexp; j++) {
        if (rc == MM_OK) {
            float y[64 * H];
            mm_tensor_get(jobs[j].y, y);
            int bad = 0;
            for (size_t i = 0; i < rows * H; i++)
                bad += y[i] != 2 * ((float)i + 1000.0f * (float)experts[j] + 0.25f);
            CHECK(!bad, "expert %d: %d wrong value(s) in y", experts[j], bad);
        }
        mm_tensor_destroy(&jobs[j].x);
        mm_tensor_destroy(&jobs[j].y);
    }
    return rc;
}

/* ---- scenarios -------------------------------------------------------------- */

/* The engine computes for 1.5 s (5 silent periods) between start and finish:
 * replicas keep hearing from the router and stay in; the answers wait. The
 * deadline travels as the time left. */
static void t_busy_engine(void) {
    bench b;
    s_bench_new(&b, 60000);
    const char *ep = mm_dispatch_endpoint(b.d);
    fake *f0 = s_fake_start(b.zctx, ep, 0, FAKE_OK, "busy:0");
    fake *f1 = s_fake_start(b.zctx, ep, 1, FAKE_OK, "busy:1");
    CHECK(mm_dispatch_wait_experts(b.d, 5000) == 1, "experts not in service");
    char err[512] = "";
    int both[2] = {0, 1};
    int rc = s_layer(&b, 2, both, 3, mm_now_ms() + 5000, 1500, err, sizeof err, NULL);
    CHECK(rc == MM_OK, "layer with a busy engine: %s: %s", mm_status_str(rc), err);
    unsigned dl = atomic_load(&f0->deadline);
    CHECK(dl > 3000 && dl <= 5000, "Work.deadline_ms %u, want the time left (<= 5000)", dl);
    rc = s_layer(&b, 2, both, 1, 0, 0, err, sizeof err, NULL);
    CHECK(rc == MM_OK, "second layer: %s", err);
    CHECK(atomic_load(&f0->deadline) == 60000,
          "Work.deadline_ms %u without a deadline, want "
          "batch_timeout_ms",
          atomic_load(&f0->deadline));
    CHECK(atomic_load(&f0->max_gap) < 3 * HB && atomic_load(&f1->max_gap) < 3 * HB,
          "the router fell silent for %d / %d ms while the engine was busy",
          atomic_load(&f0->max_gap), atomic_load(&f1->max_gap));
    json_t *st = mm_dispatch_stats(b.d);
    CHECK(!strcmp(s_health(st, "busy:0"), "healthy") && !strcmp(s_health(st, "busy:1"), "healthy"),
          "a replica left or was quarantined while the engine was busy");
    CHECK(s_sum(st, "busy:0", "timeouts") == 0, "timeouts counted");
    json_decref(st);
    int ready = -1;
    double t0 = mm_now_ms();
    CHECK(mm_dispatch_service(b.d, 30, -1, &ready) == MM_OK && ready == 0,
          "mm_dispatch_service without an fd");
    CHECK(mm_now_ms() - t0 < 1000, "mm_dispatch_service waited %.0f ms", mm_now_ms() - t0);
    s_check_accounting(b.d, "busy engine");
    s_fake_stop(&f0);
    s_fake_stop(&f1);
    s_bench_destroy(&b);
}

/* A replica that heartbeats and never answers, first in line for expert 0,
 * beside a healthy one. */
static void t_silent(void) {
    bench b;
    s_bench_new(&b, 60000);
    const char *ep = mm_dispatch_endpoint(b.d);
    fake *h0 = s_fake_start(b.zctx, ep, 0, FAKE_OK, "healthy:0");
    fake *h1 = s_fake_start(b.zctx, ep, 1, FAKE_OK, "healthy:1");
    char err[512] = "";
    int both[2] = {0, 1};
    double took;
    /* the healthy replicas teach the router expert 0's round trip */
    for (int i = 0; i < 3; i++)
        CHECK(s_layer(&b, 2, both, 2, 0, 0, err, sizeof err, NULL) == MM_OK, "warm-up: %s", err);
    fake *s0 =
        s_fake_start(b.zctx, ep, 0, FAKE_SILENT, "silent:0"); /* served 0 rows: chosen next */
    int rc = s_layer(&b, 2, both, 2, 0, 0, err, sizeof err, &took);
    CHECK(rc == MM_OK, "layer with a silent replica: %s", err);
    CHECK(atomic_load(&s0->works) == 1, "the silent replica got %d batches, want 1",
          atomic_load(&s0->works));
    CHECK(took < 5000, "the hedge took %.0f ms (an estimate-based timeout is ~250 ms)", took);
    printf("silent replica: layer answered by the hedge in %.0f ms\n", took);
    for (int i = 0; i < 20; i++) {
        rc = s_layer(&b, 2, both, 1 + (size_t)i % 3, 0, 0, err, sizeof err, NULL);
        CHECK(rc == MM_OK, "layer %d after the quarantine: %s", i, err);
        s_check_accounting(b.d, "silent");
    }
    /* Hello again on a new connection: still no work */
    atomic_store(&s0->rehello, 1);
    double end = mm_now_ms() + 3000;
    while (atomic_load(&s0->welcomed) < 2 && mm_now_ms() < end)
        s_sleep_ms(5);
    CHECK(atomic_load(&s0->welcomed) == 2, "no second Welcome");
    s_sleep_ms(600); /* probes come and go unanswered */
    for (int i = 0; i < 10; i++)
        CHECK(s_layer(&b, 2, both, 2, 0, 0, err, sizeof err, NULL) == MM_OK, "after re-Hello: %s",
              err);
    CHECK(atomic_load(&s0->works) == 1, "the silent replica got %d batches in all, want 1",
          atomic_load(&s0->works));
    json_t *st = mm_dispatch_stats(b.d);
    CHECK(strcmp(s_health(st, "silent:0"), "healthy") != 0, "the silent replica is %s",
          s_health(st, "silent:0"));
    CHECK(s_sum(st, "silent:0", "sent") == 1, "stats: %lld batches sent to the silent replica",
          (long long)s_sum(st, "silent:0", "sent"));
    CHECK(s_sum(st, "silent:0", "timeouts") >= 1, "no timeout counted");
    CHECK(s_sum(st, "healthy:0", "errors") == 0, "errors counted against the healthy replica");
    printf("silent replica: %d probe(s) unanswered, %lld quarantine(s)\n", atomic_load(&s0->probes),
           (long long)s_sum(st, "silent:0", "quarantines"));
    json_decref(st);
    s_check_accounting(b.d, "silent, end");
    s_fake_stop(&s0);
    s_fake_stop(&h0);
    s_fake_stop(&h1);
    s_bench_destroy(&b);
}

/* A replica that answers INTERNAL, first in line, beside a healthy one; then
 * alone: the step fails naming the expert after expert_wait_ms. */
static void t_errors(void) {
    bench b;
    s_bench_new(&b, 60000);
    const char *ep = mm_dispatch_endpoint(b.d);
    fake *e0 = s_fake_start(b.zctx, ep, 0, FAKE_ERROR, "failing:0");
    fake *h0 = s_fake_start(b.zctx, ep, 0, FAKE_OK, "healthy:0");
    fake *h1 = s_fake_start(b.zctx, ep, 1, FAKE_OK, "healthy:1");
    char err[512] = "";
    int both[2] = {0, 1};
    for (int i = 0; i < 10; i++) {
        int rc = s_layer(&b, 2, both, 2, 0, 0, err, sizeof err, NULL);
        CHECK(rc == MM_OK, "layer %d with a failing replica: %s", i, err);
    }
    CHECK(atomic_load(&e0->works) == 1, "the failing replica got %d batches, want 1",
          atomic_load(&e0->works));
    json_t *st = mm_dispatch_stats(b.d);
    CHECK(s_sum(st, "failing:0", "errors") >= 1, "no error counted");
    CHECK(s_sum(st, "failing:0", "batches") == 0, "an error answer was used");
    json_decref(st);
    s_check_accounting(b.d, "errors");
    /* alone with the failing one (probes fail too): UNAVAILABLE after the wait */
    s_fake_stop(&h0);
    double end = mm_now_ms() + 3000;
    while (mm_dispatch_live(b.d, 0) > 0 && mm_now_ms() < end)
        s_sleep_ms(10);
    double took;
    int rc = s_layer(&b, 2, both, 2, 0, 0, err, sizeof err, &took);
    CHECK(rc == MM_ETIMEOUT && strstr(err, "expert 0"),
          "alone: %s: %s (want ETIMEOUT naming "
          "expert 0)",
          mm_status_str(rc), err);
    CHECK(took >= WAIT - 50 && took < WAIT + 3000, "failed after %.0f ms, expert_wait_ms %d", took,
          WAIT);
    s_check_accounting(b.d, "errors, alone");
    s_fake_stop(&e0);
    s_fake_stop(&h1);
    s_bench_destroy(&b);
}

/* EXPIRED: the step fails (deadline), the replica stays in service. */
static void t_expired(void) {
    bench b;
    s_bench_new(&b, 60000);
    const char *ep = mm_dispatch_endpoint(b.d);
    fake *f0 = s_fake_start(b.zctx, ep, 0, FAKE_EXPIRED, "late:0");
    char err[512] = "";
    int one[1] = {0};
    int rc = s_layer(&b, 1, one, 2, mm_now_ms() + 4000, 0, err, sizeof err, NULL);
    CHECK(rc == MM_ETIMEOUT && strstr(err, "deadline"), "EXPIRED: %s: %s", mm_status_str(rc), err);
    json_t *st = mm_dispatch_stats(b.d);
    CHECK(!strcmp(s_health(st, "late:0"), "healthy"), "EXPIRED quarantined the replica (%s)",
          s_health(st, "late:0"));
    CHECK(json_integer_value(json_object_get(st, "expired")) == 1, "expired not counted");
    json_decref(st);
    atomic_store(&f0->mode, FAKE_OK);
    rc = s_layer(&b, 1, one, 2, 0, 0, err, sizeof err, NULL);
    CHECK(rc == MM_OK, "after EXPIRED: %s", err);
    /* a deadline already past: fails without waiting for anyone */
    double took;
    rc = s_layer(&b, 1, one, 2, mm_now_ms() - 1, 0, err, sizeof err, &took);
    CHECK(rc == MM_ETIMEOUT && strstr(err, "deadline"), "past deadline: %s: %s", mm_status_str(rc),
          err);
    CHECK(took < 1000, "a past deadline took %.0f ms to fail", took);
    s_check_accounting(b.d, "expired");
    s_fake_stop(&f0);
    s_bench_destroy(&b);
}

/* A start() whose finish() never comes (the step failed in between): the
 * next start() discards it; the counts stay exact. */
static void t_abandoned(void) {
    bench b;
    s_bench_new(&b, 60000);
    const char *ep = mm_dispatch_endpoint(b.d);
    fake *f0 = s_fake_start(b.zctx, ep, 0, FAKE_SILENT, "abandon:0");
    mm_expert_job j = {.layer = 3, .moe = 1, .expert = 0, .n = 2};
    mm_tensor_new_2d(b.be, MM_F32, 2, H, &j.x);
    mm_tensor_new_2d(b.be, MM_F32, 2, H, &j.y);
    char err[512] = "";
    CHECK(b.r.start(b.r.ctx, NULL, &j, 1, err, sizeof err) == MM_OK, "start: %s", err);
    double end = mm_now_ms() + 3000;
    while (atomic_load(&f0->works) < 1 && mm_now_ms() < end)
        s_sleep_ms(5);
    mm_tensor_destroy(&j.x);
    mm_tensor_destroy(&j.y);
    atomic_store(&f0->mode, FAKE_OK);
    int one[1] = {0};
    int rc = s_layer(&b, 1, one, 1, 0, 0, err, sizeof err, NULL);
    CHECK(rc == MM_OK, "layer after an abandoned one: %s", err);
    s_check_accounting(b.d, "abandoned");
    s_fake_stop(&f0);
    s_bench_destroy(&b);
}

/* Without a CurveZMQ key the dispatcher starts only when told it is
 * insecure on purpose. */
static void t_secure_default(void) {
    char fp[MM_FINGERPRINT_HEX] = "";
    mm_dispatch_options o;
    mm_dispatch_options_default(&o);
    o.bind = "tcp://127.0.0.1:*";
    o.n_experts = 1;
    o.hidden = H;
    o.fingerprints = (const char(*)[MM_FINGERPRINT_HEX])fp;
    mm_dispatch *d = NULL;
    char err[512] = "";
    CHECK(mm_dispatch_new(&o, &d, err, sizeof err) == MM_EINVAL && !d, "no key, not insecure");
    CHECK(strstr(err, "--insecure-experts") != NULL, "the error names the way out: %s", err);
    o.max_rows = MM_WIRE_MAX_ROWS + 1;
    o.insecure = 1;
    CHECK(mm_dispatch_new(&o, &d, err, sizeof err) == MM_EINVAL && !d,
          "a batch over the wire's rows");
}

/* Lines of text that contain needle. */
static int s_count_lines(const char *text, const char *needle) {
    int n = 0;
    for (const char *p = text; p && *p;) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        char line[1024];
        snprintf(line, sizeof line, "%.*s", (int)(len < sizeof line - 1 ? len : sizeof line - 1),
                 p);
        n += strstr(line, needle) != NULL;
        p = nl ? nl + 1 : NULL;
    }
    return n;
}

/* A flood of Hellos with a wrong fingerprint, on one connection and on many
 * (no peer of it ever authenticates): every one is refused and counted, the
 * router keeps a bounded table (at most 64 entries) and logs one line per
 * peer and kind per interval (200 ms here), not one per Hello. */
static void t_refusal_flood(void) {
    char *text = NULL;
    size_t text_len = 0;
    FILE *mem = open_memstream(&text, &text_len);
    mm_log *lg = NULL;
    mm_log_new("test_dispatch", mem, MM_LOG_TEXT, MM_LOG_INFO, &lg);
    bench b;
    s_bench_new_log(&b, 60000, lg, 200);
    const char *ep = mm_dispatch_endpoint(b.d);
    char fp[MM_FINGERPRINT_HEX];
    memset(fp, 'b', sizeof fp - 1); /* the bench expects 'a...' */
    fp[sizeof fp - 1] = 0;
    Medmoe__Wire__Hello h = MEDMOE__WIRE__HELLO__INIT;
    h.version = MM_WIRE_VERSION;
    h.expert = 0;
    h.fingerprint = fp;
    h.backend = "intruder";
    Medmoe__Wire__Envelope env = MEDMOE__WIRE__ENVELOPE__INIT;
    env.body_case = MM_WIRE_HELLO;
    env.hello = &h;
    char err[256], node[64];
    int zero = 0, sent = 0;
    const int n_conns = 40, per_conn = 20, flood = 20000;
    double t0 = mm_now_ms();
    for (int c = 0; c < n_conns; c++) { /* many connections, new node names */
        void *s = zmq_socket(b.zctx, ZMQ_DEALER);
        int linger = 5000; /* deliver the Hellos, then close */
        zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
        zmq_connect(s, ep);
        snprintf(node, sizeof node, "intruder:%d", c);
        h.node = node;
        for (int i = 0; i < per_conn; i++)
            sent += mm_wire_send(s, NULL, 0, &env, NULL, err, sizeof err) == MM_OK;
        zmq_close(s);
    }
    void *s = zmq_socket(b.zctx, ZMQ_DEALER); /* one connection, many Hellos */
    int hwm = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(s, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_connect(s, ep);
    h.node = "intruder:flood";
    for (int i = 0; i < flood; i++)
        sent += mm_wire_send(s, NULL, 0, &env, NULL, err, sizeof err) == MM_OK;
    json_int_t total = 0;
    json_t *st = NULL;
    double end = mm_now_ms() + 20000;
    while (mm_now_ms() < end) {
        json_decref(st);
        st = mm_dispatch_stats(b.d);
        total = json_integer_value(json_object_get(st, "refused_total"));
        if (total >= sent)
            break;
        s_sleep_ms(20);
        zmq_msg_t m; /* read the Refuse replies: the peer's queue stays short */
        zmq_msg_init(&m);
        while (zmq_msg_recv(&m, s, ZMQ_DONTWAIT) >= 0) {
        }
        zmq_msg_close(&m);
    }
    double span = mm_now_ms() - t0;
    s_sleep_ms(450); /* the last interval's summary */
    json_t *refused = json_object_get(st, "refused");
    CHECK(total == sent, "refused_total %lld, Hellos sent %d", (long long)total, sent);
    CHECK(json_array_size(refused) <= 64, "%zu tally entries", json_array_size(refused));
    CHECK(json_array_size(json_object_get(st, "replicas")) == 0, "an intruder joined");
    json_t *e0 = json_array_get(refused, 0);
    CHECK(e0 && json_integer_value(json_object_get(e0, "count")) == sent &&
              !strcmp(json_string_value(json_object_get(e0, "kind")), "fingerprint"),
          "one entry (127.0.0.1, fingerprint) counts them all");
    json_decref(st);
    zmq_close(s);
    s_bench_destroy(&b);
    mm_log_destroy(&lg);
    fclose(mem);
    int first = s_count_lines(text, "model fingerprint mismatch");
    int summaries = s_count_lines(text, "more fingerprint event(s) from 127.0.0.1");
    /* per 200 ms interval at most two lines: the summary of the interval
     * before and, after a quiet interval, the first refusal at once (+2:
     * the intervals cut at either end) */
    int most = 2 * ((int)(span / 200) + 2);
    CHECK(first + summaries <= most && summaries >= 1,
          "%d refusal lines (%d summaries) for %d Hellos in %.0f ms, want <= %d", first + summaries,
          summaries, sent, span, most);
    int lines = s_count_lines(text, "");
    CHECK(lines <= most + 4, "%d log lines in all for %d Hellos", lines, sent);
    printf("     %d Hellos refused in %.0f ms: %d log lines, %zu bytes of log\n", sent, span,
           first + summaries, text_len);
    free(text);
}

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    struct {
        const char *name;
        void (*fn)(void);
    } t[] = {{"busy_engine", t_busy_engine},
             {"silent", t_silent},
             {"errors", t_errors},
             {"expired", t_expired},
             {"abandoned", t_abandoned},
             {"secure_default", t_secure_default},
             {"refusal_flood", t_refusal_flood}};
    for (size_t i = 0; i < sizeof t / sizeof *t; i++) {
        int before = g_failures;
        double t0 = mm_now_ms();
        t[i].fn();
        printf("%s %s (%.0f ms)\n", g_failures == before ? "ok  " : "FAIL", t[i].name,
               mm_now_ms() - t0);
    }
    printf(g_failures ? "%d check(s) failed\n" : "all passed\n", g_failures);
    return g_failures ? 1 : 0;
}
