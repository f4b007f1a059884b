/* peer_tally.h — bounded, aggregated accounting of events caused by peers
 * that have not (or not yet) authenticated: refused connections, refused
 * Hellos, malformed messages. A flood of them must cost neither memory nor
 * log volume in proportion to its size (docs/ARCHITECTURE.md, "Router ↔
 * expert wire", "Bounded memory").
 *
 * A tally is a fixed table of at most max_entries (peer, kind) entries,
 * allocated once by mm_peer_tally_new: nothing is allocated per event or per
 * peer afterwards. An event of a (peer, kind) that has had none for an
 * interval is to be reported at once (mm_peer_tally_note returns 1); later
 * ones within the interval are only counted, and mm_peer_tally_flush hands
 * each entry's count to a callback once its interval is over — one summary
 * line per peer and kind per interval, however fast the events come. When
 * the table is full, events of new peers go to one overflow entry (peer
 * "(other peers)"); an entry whose count was flushed and that has been quiet
 * for an interval is reused.
 *
 * Not thread-safe: one owner (the router's dispatch thread, under its lock).
 *
 *     mm_peer_tally *t;
 *     if (mm_peer_tally_new(64, 10000, &t) != MM_OK) ...
 *     if (mm_peer_tally_note(t, "127.0.0.1", "fingerprint", reason, now_ms))
 *         log("refused 127.0.0.1: %s", reason);        // the first of 10 s
 *     ...
 *     mm_peer_tally_flush(t, now_ms, emit, ctx);         // periodically
 *     mm_peer_tally_destroy(&t);
 */
#ifndef MM_PEER_TALLY_H
#define MM_PEER_TALLY_H

#include <stddef.h>
#include <stdint.h>

#define MM_PEER_TALLY_PEER 64    /* bytes kept of a peer's name (address)   */
#define MM_PEER_TALLY_KIND 24    /* bytes kept of an event's kind            */
#define MM_PEER_TALLY_DETAIL 200 /* bytes kept of the latest event's detail  */

typedef struct mm_peer_tally_entry {
    char peer[MM_PEER_TALLY_PEER];     /* peer address ("(other peers)": overflow) */
    char kind[MM_PEER_TALLY_KIND];     /* what happened ("fingerprint", "curve")   */
    char detail[MM_PEER_TALLY_DETAIL]; /* the latest event's text (a reason)       */
    uint64_t total;                    /* events since the entry was (re)used      */
    uint64_t pending;                  /* events counted, not yet reported         */
    double window_ms;                  /* start of the current interval            */
    double last_ms;                    /* the latest event                         */
    int used;                          /* 1: holds a (peer, kind)                  */
} mm_peer_tally_entry;

typedef struct mm_peer_tally mm_peer_tally;

/* max_entries >= 2 (one is the overflow entry), interval_ms > 0.
 * MM_OK, MM_EINVAL or MM_ENOMEM. */
int mm_peer_tally_new(size_t max_entries, double interval_ms, mm_peer_tally **out);
/* Frees *t (NULL fine) and clears the pointer. */
void mm_peer_tally_destroy(mm_peer_tally **t);

/* Count one event of peer (NULL/"" -> "(unknown)") and kind at now_ms;
 * detail (may be NULL) replaces the entry's latest text. Returns 1 when the
 * caller should report this event now (the first of its interval), 0 when
 * it was only counted (mm_peer_tally_flush reports it). */
int mm_peer_tally_note(mm_peer_tally *t, const char *peer, const char *kind, const char *detail,
                       double now_ms);

/* For every entry whose interval has ended with events not yet reported:
 * emit(ctx, entry, n, span_ms) with n those events and span_ms the time
 * they came in, then a new interval starts. */
void mm_peer_tally_flush(mm_peer_tally *t, double now_ms,
                         void (*emit)(void *ctx, const mm_peer_tally_entry *e, uint64_t n,
                                      double span_ms),
                         void *ctx);

/* The entries in use: mm_peer_tally_at(t, i) for i < mm_peer_tally_size(t)
 * (NULL for an unused slot). Owned by t; valid until its next call. */
size_t mm_peer_tally_size(const mm_peer_tally *t);
const mm_peer_tally_entry *mm_peer_tally_at(const mm_peer_tally *t, size_t i);
/* Every event ever noted (overflow included). */
uint64_t mm_peer_tally_events(const mm_peer_tally *t);

#endif
