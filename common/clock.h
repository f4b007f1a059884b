/* clock.h — the one monotonic clock every medmoe module reads.
 *
 * Deadlines, timings, heartbeats and metrics all compare values of
 * mm_now_ms(), so they agree across threads and modules. Code whose subject
 * is time (timeouts, back-off) takes an mm_clock so a test can inject its own.
 *
 *     double t0 = mm_now_ms();
 *     ...
 *     printf("%.1f ms\n", mm_now_ms() - t0);
 */
#ifndef MM_CLOCK_H
#define MM_CLOCK_H

/* Milliseconds on CLOCK_MONOTONIC (arbitrary origin, never goes back). */
double mm_now_ms(void);

/* An injectable clock: now(ctx) in mm_now_ms()'s units. */
typedef struct mm_clock {
    double (*now)(void *ctx);
    void *ctx;
} mm_clock;

/* The real clock (mm_now_ms). */
mm_clock mm_clock_real(void);

/* c->now(c->ctx), or mm_now_ms() when c or c->now is NULL. */
double mm_clock_now(const mm_clock *c);

#endif
