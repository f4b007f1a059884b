/* peer_tally.c — bounded, aggregated per-peer event counts (see peer_tally.h). */
#include "peer_tally.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "status.h"

#define S_OVERFLOW "(other peers)"

struct mm_peer_tally {
    mm_peer_tally_entry *e; /* [n]; e[0] is the overflow entry                  */
    size_t n;               /* entries                                          */
    double interval_ms;     /* one report per entry per interval                */
    uint64_t events;        /* every event noted                                */
};

int mm_peer_tally_new(size_t max_entries, double interval_ms, mm_peer_tally **out) {
    *out = NULL;
    if (max_entries < 2 || !(interval_ms > 0))
        return MM_EINVAL;
    mm_peer_tally *t = calloc(1, sizeof *t);
    if (!t || !(t->e = calloc(max_entries, sizeof *t->e))) {
        free(t);
        return MM_ENOMEM;
    }
    t->n = max_entries;
    t->interval_ms = interval_ms;
    *out = t;
    return MM_OK;
}

void mm_peer_tally_destroy(mm_peer_tally **t) {
    if (!t || !*t)
        return;
    free((*t)->e);
    free(*t);
    *t = NULL;
}

static void s_set(char *dst, size_t len, const char *src) { snprintf(dst, len, "%s", src); }

/* The entry of (peer, kind): the existing one, a free or reusable slot, or
 * the overflow entry. */
static mm_peer_tally_entry *s_entry(mm_peer_tally *t, const char *peer, const char *kind,
                                    double now) {
    mm_peer_tally_entry *spare = NULL;
    for (size_t i = 1; i < t->n; i++) {
        mm_peer_tally_entry *x = &t->e[i];
        if (!x->used) {
            spare = spare ? spare : x;
            continue;
        }
        if (!strncmp(x->peer, peer, sizeof x->peer - 1) &&
            !strncmp(x->kind, kind, sizeof x->kind - 1))
            return x;
        /* reported in full and quiet for an interval: its slot may be reused */
        if (!spare && !x->pending && now - x->last_ms >= t->interval_ms)
            spare = x;
    }
    mm_peer_tally_entry *x = spare ? spare : &t->e[0];
    if (x == &t->e[0] && x->used)
        return x; /* the table is full: the overflow entry counts for everyone else */
    memset(x, 0, sizeof *x);
    x->used = 1;
    x->window_ms = now - t->interval_ms; /* its first event is reported */
    s_set(x->peer, sizeof x->peer, x == &t->e[0] ? S_OVERFLOW : peer);
    s_set(x->kind, sizeof x->kind, x == &t->e[0] ? "any" : kind);
    return x;
}

int mm_peer_tally_note(mm_peer_tally *t, const char *peer, const char *kind, const char *detail,
                       double now_ms) {
    if (!peer || !*peer)
        peer = "(unknown)";
    if (!kind)
        kind = "";
    mm_peer_tally_entry *x = s_entry(t, peer, kind, now_ms);
    t->events++;
    x->total++;
    x->last_ms = now_ms;
    if (detail)
        s_set(x->detail, sizeof x->detail, detail);
    if (!x->pending && now_ms - x->window_ms >= t->interval_ms) {
        x->window_ms = now_ms; /* reported now; the interval starts */
        return 1;
    }
    x->pending++;
    return 0;
}

void mm_peer_tally_flush(mm_peer_tally *t, double now_ms,
                         void (*emit)(void *ctx, const mm_peer_tally_entry *e, uint64_t n,
                                      double span_ms),
                         void *ctx) {
    for (size_t i = 0; i < t->n; i++) {
        mm_peer_tally_entry *x = &t->e[i];
        if (!x->used || !x->pending || now_ms - x->window_ms < t->interval_ms)
            continue;
        uint64_t n = x->pending;
        x->pending = 0;
        if (emit)
            emit(ctx, x, n, now_ms - x->window_ms);
        x->window_ms = now_ms;
    }
}

size_t mm_peer_tally_size(const mm_peer_tally *t) { return t->n; }

const mm_peer_tally_entry *mm_peer_tally_at(const mm_peer_tally *t, size_t i) {
    return i < t->n && t->e[i].used ? &t->e[i] : NULL;
}

uint64_t mm_peer_tally_events(const mm_peer_tally *t) { return t->events; }
