/* audit.h — the append-only audit log: one JSON object per line per case.
 *
 * Offers an open/append/close trio over a file opened O_APPEND: each record
 * is written with one write(2) of the whole line (so lines from one process
 * never interleave and a crash leaves at most a torn last line) and so is in
 * the kernel when mm_audit_write returns; with sync = 1 it is also fsync'ed.
 * The caller decides what goes in; the log never holds the image, the
 * question or the answer (the gRPC server builds the records).
 *
 *     mm_audit *a;  char err[512];
 *     if (mm_audit_open("audit.jsonl", 0, &a, err, sizeof err)) {...}
 *     json_t *r = json_pack("{s:s, s:s}", "tenant", "hospital-a", "status", "OK");
 *     mm_audit_write(a, r, err, sizeof err);     // prepends "time" (UTC, ms)
 *     json_decref(r);
 *     mm_audit_close(&a);
 */
#ifndef MM_AUDIT_H
#define MM_AUDIT_H

#include <jansson.h>
#include <stddef.h>

typedef struct mm_audit mm_audit;

/* Open (create, mode 0640) path for appending. */
int mm_audit_open(const char *path, int sync, mm_audit **out, char *err, size_t errlen);
/* NULL and *a == NULL are fine; fsyncs before closing. */
void mm_audit_close(mm_audit **a);
/* Append {"time": "YYYY-MM-DDTHH:MM:SS.mmmZ", ...record's keys in order}.
 * record is borrowed. */
int mm_audit_write(mm_audit *a, const json_t *record, char *err, size_t errlen);
/* Records written so far. */
size_t mm_audit_count(const mm_audit *a);

#endif
