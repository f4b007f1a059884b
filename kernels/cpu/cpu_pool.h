/* cpu_pool.h — the cpu backend's worker threads (private to kernels/cpu).
 *
 * Why not OpenMP: libgomp's idle workers spin (OMP_WAIT_POLICY is read once,
 * when the library loads, so a program cannot change it), and so do a
 * pthreads OpenBLAS's. Where a router and several experts share a host,
 * spinning threads take the cores the busy process needs: decode measured
 * 508 ms/token with spinning workers beside 385-402 with passive ones, and
 * gRPC p50 157 ms against 13.8 ms. These workers spin for at most
 * MM_POOL_SPIN_US after their last task (ops follow each other within
 * microseconds inside a step) and then sleep on a condition variable, so an
 * idle process costs nothing, whatever the environment says.
 *
 *     mm_pool *p;
 *     if (mm_pool_new(4, &p, err, sizeof err) != MM_OK) ...
 *     mm_pool_run(p, n_tasks, fn, arg);   // fn(arg, task) for every task
 *     mm_pool_destroy(&p);
 *
 * Tasks are handed out one at a time from a shared counter, so uneven tasks
 * balance themselves. The caller's thread works too. One run at a time: a
 * second thread calling mm_pool_run while a run is under way (an image
 * worker's vision tower beside the engine's step) runs its tasks itself,
 * on its own thread, rather than waiting.
 */
#ifndef MM_CPU_POOL_H
#define MM_CPU_POOL_H

#include <stddef.h>

/* How long an idle worker keeps polling before it sleeps. */
#define MM_POOL_SPIN_US 50

typedef struct mm_pool mm_pool;
typedef void (*mm_pool_fn)(void *arg, size_t task);

/* n_threads >= 1 counts the caller: n_threads - 1 workers are started. */
int mm_pool_new(int n_threads, mm_pool **out, char *err, size_t errlen);
void mm_pool_destroy(mm_pool **p);
int mm_pool_threads(const mm_pool *p);

/* fn(arg, t) for t in [0, n_tasks), spread over the pool; returns when all
 * have run. */
void mm_pool_run(mm_pool *p, size_t n_tasks, mm_pool_fn fn, void *arg);

/* Convenience over mm_pool_run: fn(arg, i0, i1) over [0, n) in ranges of at
 * least `grain` items (n < 2 * grain runs on the caller at once). */
typedef void (*mm_pool_range_fn)(void *arg, size_t i0, size_t i1);
void mm_pool_for(mm_pool *p, size_t n, size_t grain, mm_pool_range_fn fn, void *arg);

#endif
