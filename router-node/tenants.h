/* tenants.h — who may call the front door, and how much.
 *
 * Offers the tenant table read from a JSON file, API-key authentication
 * (sha256 of the presented key compared in constant time against every
 * tenant's stored hash; keys themselves are never stored) and two quotas per
 * tenant: cases in flight at once, and cases per minute (a token bucket of
 * cases_per_minute tokens refilled continuously, so a burst of a full
 * minute's worth is allowed and then one case per 60/cpm seconds).
 *
 *     {"tenants": [{"id": "hospital-a", "key_sha256": "<64 hex>",
 *                   "max_concurrent": 4, "cases_per_minute": 120}]}
 *     (0 or a missing quota field = unlimited)
 *
 *     mm_tenants *t;  char err[512];
 *     if (mm_tenants_load("tenants.json", &t, err, sizeof err)) {...}
 *     int i = mm_tenants_auth(t, key, strlen(key));       // -1: unknown key
 *     if (i >= 0 && mm_tenants_admit(t, i, mm_now_ms(), err, sizeof err) == MM_OK) {
 *         ... the case runs ...
 *         mm_tenants_release(t, i);
 *     }
 *     mm_tenants_destroy(&t);
 *
 * Single-threaded: the router's gRPC completion-queue thread is its only user.
 */
#ifndef MM_TENANTS_H
#define MM_TENANTS_H

#include <stddef.h>
#include <stdint.h>

#define MM_TENANT_ID_MAX 128 /* bytes of a tenant id, NUL included */

typedef struct mm_tenants mm_tenants;

/* Read and validate the file: ids non-empty, printable, unique; key_sha256
 * 64 hex digits, unique; quotas integers >= 0. Errors name the file, the
 * tenant's index and the field. */
int mm_tenants_load(const char *path, mm_tenants **out, char *err, size_t errlen);
/* The same from a JSON text (name is used in messages). */
int mm_tenants_parse(const char *json, size_t len, const char *name, mm_tenants **out, char *err,
                     size_t errlen);
void mm_tenants_destroy(mm_tenants **t);

size_t mm_tenants_count(const mm_tenants *t);
/* Id of tenant i (borrowed). */
const char *mm_tenants_id(const mm_tenants *t, int i);

/* Index of the tenant whose key this is, or -1. Every tenant's hash is
 * compared in full whatever matches, so the time does not tell which
 * tenant's hash shares a prefix with the guess. */
int mm_tenants_auth(const mm_tenants *t, const char *key, size_t len);

/* Take one case for tenant i at time now_ms (any monotonic ms clock):
 * MM_OK, or MM_EAGAIN with the quota named in err ("max_concurrent 4
 * reached", "cases_per_minute 120 used up: next in 350 ms"). A case that
 * was admitted must be released exactly once. */
int mm_tenants_admit(mm_tenants *t, int i, double now_ms, char *err, size_t errlen);
void mm_tenants_release(mm_tenants *t, int i);
/* Give back the cases_per_minute unit an admitted case took (never past a
 * full bucket): the quota counts what the tenant was served, so a case that
 * ends refused (invalid, no expert, server busy) does not use it up. Does
 * not release the concurrency unit (mm_tenants_release does). */
void mm_tenants_refund(mm_tenants *t, int i);
/* Cases of tenant i in flight now. */
int mm_tenants_active(const mm_tenants *t, int i);

/* Known-answer checks of parse/auth/quotas; MM_OK or MM_ERR (printing what
 * failed to stderr when verbose). */
int mm_tenants_selftest(int verbose);

#endif
