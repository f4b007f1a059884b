/* cpu_pool.c — worker threads that poll briefly, then sleep (see cpu_pool.h).
 *
 * One job at a time: the caller publishes (fn, arg, n_tasks), sets `active`
 * to the number of workers, bumps the generation `gen` and broadcasts. Every
 * worker takes tasks from the shared counter `next` until none are left, then
 * checks out by decrementing `active`; the last one to check out wakes the
 * caller. Since every worker checks out of every job, none can lag a job
 * behind. Both waits (a worker for the next job, the caller for the last
 * worker) poll for MM_POOL_SPIN_US and then block on a condition variable,
 * re-checking under the mutex that the other side takes to signal, so no
 * wake-up is lost.
 */
#include "cpu_pool.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "status.h"

struct mm_pool {
    int n_threads; /* caller included */
    pthread_t *th; /* n_threads - 1 workers */
    int started;   /* workers actually started */

    pthread_mutex_t run_lock; /* held by the thread whose job is running */
    pthread_mutex_t mu;       /* guards the sleeps and wake-ups below */
    pthread_cond_t wake;      /* a new job (gen moved) or stop */
    pthread_cond_t done;      /* active reached 0 */

    mm_pool_fn fn; /* the job: published before gen moves */
    void *arg;
    size_t n_tasks;
    atomic_size_t next;
    atomic_int active;
    atomic_uint gen;
    atomic_int stop;
};

static double s_now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static inline void s_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Poll until *v != old (or stop) for at most MM_POOL_SPIN_US; 1 if it moved. */
static int s_spin_gen(mm_pool *p, unsigned old) {
    double t0 = 0.0;
    for (unsigned i = 0;; i++) {
        if (atomic_load_explicit(&p->gen, memory_order_acquire) != old ||
            atomic_load_explicit(&p->stop, memory_order_relaxed))
            return 1;
        s_relax();
        if ((i & 127) == 127) {
            double now = s_now_us();
            if (t0 == 0.0)
                t0 = now;
            else if (now - t0 > MM_POOL_SPIN_US)
                return 0;
        }
    }
}

static void s_work(mm_pool *p) {
    size_t t;
    while ((t = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed)) < p->n_tasks)
        p->fn(p->arg, t);
}

static void *s_worker(void *vp) {
    mm_pool *p = vp;
    /* 0, not the current gen: a worker that starts after the first job was
     * posted must still take part in it (the caller waits for every worker). */
    unsigned seen = 0;
    for (;;) {
        if (!s_spin_gen(p, seen)) {
            pthread_mutex_lock(&p->mu);
            while (atomic_load(&p->gen) == seen && !atomic_load(&p->stop))
                pthread_cond_wait(&p->wake, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->stop))
            return NULL;
        seen = atomic_load_explicit(&p->gen, memory_order_acquire);
        s_work(p);
        if (atomic_fetch_sub_explicit(&p->active, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->done);
            pthread_mutex_unlock(&p->mu);
        }
    }
}

int mm_pool_new(int n_threads, mm_pool **out, char *err, size_t errlen) {
    *out = NULL;
    if (n_threads < 1 || n_threads > 1024)
        return mm_errorf(err, errlen, MM_EINVAL, "thread pool: %d threads (want 1..1024)",
                         n_threads);
    mm_pool *p = calloc(1, sizeof *p);
    if (!p || !(p->th = calloc((size_t)n_threads, sizeof *p->th))) {
        free(p);
        return mm_errorf(err, errlen, MM_ENOMEM, "thread pool: out of memory");
    }
    p->n_threads = n_threads;
    pthread_mutex_init(&p->run_lock, NULL);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    for (int i = 0; i < n_threads - 1; i++) {
        int e = pthread_create(&p->th[i], NULL, s_worker, p);
        if (e != 0) {
            mm_pool_destroy(&p);
            return mm_errorf(err, errlen, MM_ENOMEM, "thread pool: starting worker %d of %d: %s",
                             i + 1, n_threads - 1, strerror(e));
        }
        p->started++;
    }
    *out = p;
    return MM_OK;
}

void mm_pool_destroy(mm_pool **pp) {
    if (!pp || !*pp)
        return;
    mm_pool *p = *pp;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->started; i++)
        pthread_join(p->th[i], NULL);
    pthread_cond_destroy(&p->done);
    pthread_cond_destroy(&p->wake);
    pthread_mutex_destroy(&p->mu);
    pthread_mutex_destroy(&p->run_lock);
    free(p->th);
    free(p);
    *pp = NULL;
}

int mm_pool_threads(const mm_pool *p) { return p ? p->n_threads : 1; }

void mm_pool_run(mm_pool *p, size_t n_tasks, mm_pool_fn fn, void *arg) {
    if (n_tasks == 0)
        return;
    /* Alone, one task, or the pool busy with another thread's job (or with
     * this thread's own, when fn nests a run): do it here. */
    if (!p || p->started == 0 || n_tasks == 1 || pthread_mutex_trylock(&p->run_lock) != 0) {
        for (size_t t = 0; t < n_tasks; t++)
            fn(arg, t);
        return;
    }
    p->fn = fn;
    p->arg = arg;
    p->n_tasks = n_tasks;
    atomic_store_explicit(&p->next, 0, memory_order_relaxed);
    atomic_store_explicit(&p->active, p->started, memory_order_relaxed);
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add_explicit(&p->gen, 1, memory_order_release);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);

    s_work(p);

    /* Wait for every worker to check out: poll, then sleep. */
    double t0 = 0.0;
    for (unsigned i = 0; atomic_load_explicit(&p->active, memory_order_acquire) > 0; i++) {
        s_relax();
        if ((i & 127) == 127) {
            double now = s_now_us();
            if (t0 == 0.0)
                t0 = now;
            else if (now - t0 > MM_POOL_SPIN_US) {
                pthread_mutex_lock(&p->mu);
                while (atomic_load(&p->active) > 0)
                    pthread_cond_wait(&p->done, &p->mu);
                pthread_mutex_unlock(&p->mu);
                break;
            }
        }
    }
    pthread_mutex_unlock(&p->run_lock);
}

typedef struct s_range {
    mm_pool_range_fn fn;
    void *arg;
    size_t n, chunk;
} s_range;

static void s_range_task(void *vp, size_t t) {
    const s_range *r = vp;
    size_t i0 = t * r->chunk, i1 = i0 + r->chunk < r->n ? i0 + r->chunk : r->n;
    r->fn(r->arg, i0, i1);
}

void mm_pool_for(mm_pool *p, size_t n, size_t grain, mm_pool_range_fn fn, void *arg) {
    if (n == 0)
        return;
    if (grain == 0)
        grain = 1;
    size_t nt = (size_t)mm_pool_threads(p);
    if (nt == 1 || n < 2 * grain) {
        fn(arg, 0, n);
        return;
    }
    /* About four ranges a thread, so a slow thread does not hold the rest. */
    size_t chunk = (n + 4 * nt - 1) / (4 * nt);
    if (chunk < grain)
        chunk = grain;
    s_range r = {fn, arg, n, chunk};
    mm_pool_run(p, (n + chunk - 1) / chunk, s_range_task, &r);
}
