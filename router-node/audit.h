/* audit.h — the append-only audit log: JSON lines, one per event of a case.
 *
 * Offers an open/append/close trio over a file opened O_APPEND: each record
 * is written with one write(2) of the whole line (so lines from one process
 * never interleave and a crash leaves at most a torn last line) and so is in
 * the kernel when mm_audit_write returns: a killed process loses nothing it
 * wrote; with sync = 1 it is also fsync'ed (survives the machine). The caller
 * decides what goes in; the log never holds the image, the question or the
 * answer (the gRPC server builds the records, see grpc_server.c).
 *
 * Each open is a "run" (a random id); records about a case carry "run" and
 * "seq" (mm_audit_next_seq): its "admitted" record is written when the case
 * is admitted, its "end" record when it ends. mm_audit_recover, at start,
 * reads the log's tail and reports every case admitted by an earlier run that
 * has no end (the router died under it), writing an "unfinished" record for
 * each so that the next start does not report it again.
 *
 *     mm_audit *a;  char err[512];
 *     if (mm_audit_open("audit.jsonl", 0, &a, err, sizeof err)) {...}
 *     mm_audit_recover(a, MM_AUDIT_SCAN_BYTES, on_unfinished, ctx, err, sizeof err);
 *     json_t *r = json_pack("{s:s, s:s}", "tenant", "hospital-a", "status", "OK");
 *     mm_audit_write(a, r, err, sizeof err);     // prepends "time" (UTC, ms)
 *     json_decref(r);
 *     mm_audit_close(&a);
 */
#ifndef MM_AUDIT_H
#define MM_AUDIT_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "hash.h"

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

/* This open's run id (16 hex digits, random). */
const char *mm_audit_run(const mm_audit *a);
/* The next case number of this run (1, 2, ...). */
uint64_t mm_audit_next_seq(mm_audit *a);

/* How much of the log's end mm_audit_recover reads: a case admitted more
 * than this many bytes of records before the crash is not seen (16 MiB is
 * ~60,000 records of ~280 bytes: far more than the cases that can be in flight). */
#define MM_AUDIT_SCAN_BYTES ((size_t)16 << 20)

/* Called for each admitted case without an end: its "admitted" record. */
typedef void (*mm_audit_unfinished_fn)(void *ctx, const json_t *admitted);

/* Read the last scan_bytes of the log; for every {"event": "admitted"} of
 * another run with no {"event": "end"} or {"event": "unfinished"} of the same
 * run and seq after it, call fn and append {"event": "unfinished", "run",
 * "seq", "tenant", "case_id", "method", "peer", "admitted_at"}. *n_out (may be
 * NULL): how many. Lines that are not JSON (a torn last line) are skipped. */
int mm_audit_recover(mm_audit *a, size_t scan_bytes, mm_audit_unfinished_fn fn, void *ctx,
                     size_t *n_out, char *err, size_t errlen);

/* Known-answer checks (write, recover, recover again finds nothing) on a
 * file in dir; MM_OK or MM_ERR (what failed on stderr when verbose). */
int mm_audit_selftest(const char *dir, int verbose);

/* The salt of mm_audit_hash: the bytes of the file at salt_path (16 to 4096
 * of them: make one with `head -c 32 /dev/urandom`), or, with salt_path
 * NULL, 32 random bytes of this process (hashes then cannot be matched
 * across restarts). Until called, the salt is empty. */
int mm_audit_set_salt(mm_audit *a, const char *salt_path, char *err, size_t errlen);
/* Lower-case hex of SHA-256(salt || data): an identifier such as a DICOM SOP
 * Instance UID can be recorded so that whoever holds the salt can find the
 * record of a known instance, while the log alone names none. */
void mm_audit_hash(const mm_audit *a, const void *data, size_t len, char hex[MM_SHA256_HEX]);

#endif
