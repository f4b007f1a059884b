/* clock.c — see clock.h. */
#include "clock.h"

#include <time.h>

double mm_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static double s_real(void *ctx) {
    (void)ctx;
    return mm_now_ms();
}

mm_clock mm_clock_real(void) { return (mm_clock){.now = s_real, .ctx = 0}; }

double mm_clock_now(const mm_clock *c) { return c && c->now ? c->now(c->ctx) : mm_now_ms(); }
