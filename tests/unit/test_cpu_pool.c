/* test_cpu_pool.c — the cpu backend's worker threads (kernels/cpu/cpu_pool.h).
 *
 * Every task runs exactly once, whatever the thread count, under concurrent
 * callers and nested runs; and idle workers sleep: over 300 ms of idleness
 * the process uses almost no CPU time (spinning workers, as OpenMP's and
 * OpenBLAS's, would use the whole interval per thread).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cpu/cpu_pool.h"

typedef struct hits {
    atomic_int *n;
    size_t len;
    mm_pool *nested; /* if set, each task also runs a small job on it */
} hits;

static void s_hit(void *vp, size_t t) {
    hits *h = vp;
    atomic_fetch_add(&h->n[t], 1);
}

static void s_nested(void *vp, size_t t) {
    hits *h = vp;
    atomic_int inner[3] = {0, 0, 0};
    hits hi = {inner, 3, NULL};
    mm_pool_run(h->nested, 3, s_hit, &hi); /* pool busy: runs inline */
    for (int i = 0; i < 3; i++)
        assert_int_equal(atomic_load(&inner[i]), 1);
    atomic_fetch_add(&h->n[t], 1);
}

static void s_check_once(hits *h) {
    for (size_t i = 0; i < h->len; i++)
        assert_int_equal(atomic_load(&h->n[i]), 1);
}

static void test_every_task_once(void **state) {
    int threads[] = {1, 2, 3, 8};
    size_t sizes[] = {0, 1, 2, 7, 100, 4096};
    for (size_t a = 0; a < 4; a++) {
        mm_pool *p;
        char err[128];
        assert_int_equal(mm_pool_new(threads[a], &p, err, sizeof err), 0);
        assert_int_equal(mm_pool_threads(p), threads[a]);
        for (size_t b = 0; b < 6; b++)
            for (int rep = 0; rep < 20; rep++) {
                atomic_int *n = calloc(sizes[b] + 1, sizeof *n);
                hits h = {n, sizes[b], NULL};
                mm_pool_run(p, sizes[b], s_hit, &h);
                s_check_once(&h);
                free(n);
            }
        mm_pool_destroy(&p);
        assert_null(p);
    }
}

static void s_range(void *vp, size_t i0, size_t i1) {
    hits *h = vp;
    assert_true(i0 < i1 && i1 <= h->len);
    for (size_t i = i0; i < i1; i++)
        atomic_fetch_add(&h->n[i], 1);
}

static void test_for_covers_range(void **state) {
    mm_pool *p;
    char err[128];
    assert_int_equal(mm_pool_new(3, &p, err, sizeof err), 0);
    size_t sizes[] = {1, 5, 64, 1000, 99991};
    size_t grains[] = {1, 7, 1000};
    for (size_t a = 0; a < 5; a++)
        for (size_t g = 0; g < 3; g++) {
            atomic_int *n = calloc(sizes[a], sizeof *n);
            hits h = {n, sizes[a], NULL};
            mm_pool_for(p, sizes[a], grains[g], s_range, &h);
            s_check_once(&h);
            free(n);
        }
    mm_pool_destroy(&p);
}

typedef struct caller {
    mm_pool *p;
    int ok;
} caller;

static void *s_caller(void *vp) {
    caller *c = vp;
    c->ok = 1;
    for (int rep = 0; rep < 200; rep++) {
        atomic_int n[257] = {0};
        hits h = {n, 257, NULL};
        mm_pool_run(c->p, 257, s_hit, &h);
        for (int i = 0; i < 257; i++)
            if (atomic_load(&n[i]) != 1)
                c->ok = 0;
    }
    return NULL;
}

/* Two threads share one pool (the engine's step beside an image worker's
 * vision tower): whichever finds it busy runs its tasks itself. */
static void test_concurrent_callers_and_nesting(void **state) {
    mm_pool *p;
    char err[128];
    assert_int_equal(mm_pool_new(2, &p, err, sizeof err), 0);
    caller c1 = {p, 0}, c2 = {p, 0};
    pthread_t t1, t2;
    assert_int_equal(pthread_create(&t1, NULL, s_caller, &c1), 0);
    assert_int_equal(pthread_create(&t2, NULL, s_caller, &c2), 0);
    pthread_join(t1, NULL);
    pthread_join(t2, NULL);
    assert_true(c1.ok && c2.ok);
    atomic_int n[50] = {0};
    hits h = {n, 50, p};
    mm_pool_run(p, 50, s_nested, &h);
    s_check_once(&h);
    mm_pool_destroy(&p);
}

static double s_cpu_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* Idle workers sleep. Time is the subject here, so this waits 300 ms on
 * purpose; the bound is on CPU time, which another process's load cannot
 * raise: 4 workers that spun would use ~300 ms each (≥ 600 ms even sharing
 * 2 cores); sleeping ones use their 50 µs of polling once. */
static void test_idle_workers_sleep(void **state) {
    mm_pool *p;
    char err[128];
    assert_int_equal(mm_pool_new(5, &p, err, sizeof err), 0);
    atomic_int n[64] = {0};
    hits h = {n, 64, NULL};
    mm_pool_run(p, 64, s_hit, &h);
    double c0 = s_cpu_ms();
    struct timespec d = {0, 300 * 1000 * 1000};
    nanosleep(&d, NULL);
    double used = s_cpu_ms() - c0;
    print_message("CPU time over 300 ms idle with 4 workers: %.2f ms\n", used);
    assert_true(used < 30.0);
    mm_pool_destroy(&p);
}

static void test_bad_thread_counts(void **state) {
    mm_pool *p = (mm_pool *)1;
    char err[128] = "";
    assert_int_not_equal(mm_pool_new(0, &p, err, sizeof err), 0);
    assert_null(p);
    assert_non_null(strstr(err, "0 threads"));
    assert_int_not_equal(mm_pool_new(100000, &p, err, sizeof err), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_task_once),
        cmocka_unit_test(test_for_covers_range),
        cmocka_unit_test(test_concurrent_callers_and_nesting),
        cmocka_unit_test(test_idle_workers_sleep),
        cmocka_unit_test(test_bad_thread_counts),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
