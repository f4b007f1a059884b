/* request_check.h — the front door's strict text rules for a request's strings.
 *
 * Offers the checks the gRPC server (grpc_server.c) runs on a CaseRequest or
 * ClassifyRequest before anything else looks at it, each failure an
 * MM_EINVAL whose message names the field, the reason and the byte offset
 * (the server sends it as INVALID_ARGUMENT):
 *
 *   question, candidates[i], image.media_type, conv_mode
 *       no NUL byte (protobuf-c hands strings over as C strings: a NUL would
 *       silently cut the text the model sees) and valid UTF-8 (RFC 3629: no
 *       overlong forms, no surrogates, nothing past U+10FFFF);
 *   case_id
 *       the same, at most MM_CASE_ID_MAX bytes, and no control or
 *       bidirectional-formatting character (C0, DEL, C1, U+2028/2029,
 *       U+200E/200F, U+202A..202E, U+2066..2069): the id is echoed to the
 *       client and written to logs and the audit log, where such characters
 *       would forge lines or hide text.
 *
 * The strings are checked on the wire bytes of the message, where their
 * lengths are known, so a NUL is seen. Every occurrence of a field counts
 * (protobuf keeps the last of a repeated singular field; a NUL in an earlier
 * copy is refused all the same). Pure functions, no allocation: fit for a
 * fuzzer.
 *
 *     char err[256];
 *     if (mm_request_check_wire(bytes, len, MM_REQ_CASE, err, sizeof err) != MM_OK)
 *         refuse(INVALID_ARGUMENT, err);   // "question: NUL byte at offset 4"
 */
#ifndef MM_REQUEST_CHECK_H
#define MM_REQUEST_CHECK_H

#include <stddef.h>
#include <stdint.h>

#include "medmoe.pb-c.h"
#include "scheduler.h"

/* Bytes of a case id at most (a UUID is 36, a DICOM UID 64). */
#define MM_CASE_ID_MAX 256

typedef enum { MM_REQ_CASE, MM_REQ_CLASSIFY } mm_req_kind;

/* The strings of a serialized CaseRequest (MM_REQ_CASE) or ClassifyRequest.
 * MM_OK, MM_EINVAL (a rule broken: field, reason, offset) or MM_EPROTO (the
 * bytes are not a protobuf message). */
int mm_request_check_wire(const uint8_t *msg, size_t len, mm_req_kind kind, char *err,
                          size_t errlen);

/* One text field's rules (no NUL, valid UTF-8); field names it in err. */
int mm_request_check_text(const char *field, const uint8_t *s, size_t len, char *err,
                          size_t errlen);

/* The case id's rules (text, length, no control characters). */
int mm_request_check_case_id(const uint8_t *s, size_t len, char *err, size_t errlen);

/* ---- the whole request ------------------------------------------------------
 * mm_request_parse is everything the gRPC server does with a request's
 * bytes before it admits the case (grpc_server.c: then the tenant's quota,
 * then the scheduler): unpack, the wire rules above, then the values —
 * question non-empty and within its limit, image (non-empty, within its
 * limit, media type png/jpeg/empty and agreeing with the magic bytes),
 * generation options in range, candidates (1..max, non-empty, within the
 * question limit) — and the conversion into a scheduler request. No I/O, no
 * state: tests/fuzz/fuzz_case_request.c runs it on hostile bytes. */

/* The limits it enforces (mm_grpc_options' values). */
typedef struct mm_request_limits {
    size_t max_question_bytes; /* question and each candidate at most    */
    size_t max_image_bytes;    /* image.data at most                      */
    size_t max_candidates;     /* ClassifyRequest.candidates at most      */
    int max_tokens_default;    /* options.max_tokens 0 (or no options)    */
    int max_tokens_limit;      /* options.max_tokens at most              */
} mm_request_limits;

/* A parsed request. The strings and the image in r point into q / k. */
typedef struct mm_request {
    Medmoe__V1__CaseRequest *q;     /* unpacked (MM_REQ_CASE), else NULL            */
    Medmoe__V1__ClassifyRequest *k; /* unpacked (MM_REQ_CLASSIFY), else NULL        */
    const char *case_id;            /* the client's id once its rules passed, else NULL */
    mm_sched_request r;             /* complete but for tenant, client_case_id,
                                       deadline_ms and the callbacks (the caller's) */
} mm_request;

/* MM_OK with *out filled, or MM_EINVAL with err naming the field and the
 * reason (the server's INVALID_ARGUMENT message: "request: malformed
 * CaseRequest (12 bytes)", "question: empty", "options.top_p: 2, want 0 ..
 * 1"). Either way the caller calls mm_request_clear(out); after a refusal
 * out->case_id is still set when the id itself was valid (for the audit). */
int mm_request_parse(const uint8_t *bytes, size_t len, mm_req_kind kind,
                     const mm_request_limits *lim, mm_request *out, char *err, size_t errlen);

/* Free what mm_request_parse unpacked and zero *req; idempotent. */
void mm_request_clear(mm_request *req);

/* Known-answer checks of the rules; MM_OK or MM_ERR (what failed on stderr
 * when verbose). */
int mm_request_check_selftest(int verbose);

#endif
