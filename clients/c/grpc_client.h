/* grpc_client.h — a small blocking gRPC client over the gRPC C core.
 *
 * Offers one channel to one server (plaintext, TLS or mutual TLS) and two call
 * shapes, unary and server-streaming, on already-serialized protobuf bytes:
 * the caller packs and unpacks its messages (protobuf-c) and this module only
 * moves bytes, metadata, deadlines and status. Every gRPC call of the `medmoe`
 * CLI lives here, so the CLI itself never includes <grpc/grpc.h>.
 *
 *     mm_grpc_client *c = NULL;
 *     char err[256];
 *     if (mm_grpc_client_new("127.0.0.1:50051", NULL, &c, err, sizeof err) != MM_OK) ...
 *     mm_grpc_status st;
 *     uint8_t *resp = NULL; size_t n = 0;
 *     mm_grpc_unary(c, "/medmoe.v1.CaseService/Ask", key, 5000, req, req_len, &resp, &n, &st);
 *     if (st.code != MM_GRPC_OK) fprintf(stderr, "%s: %s\n", mm_grpc_code_name(st.code),
 * st.message); free(resp); mm_grpc_client_destroy(&c);
 */
#ifndef MM_GRPC_CLIENT_H
#define MM_GRPC_CLIENT_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>

/* gRPC status codes (the numbers are the wire values, grpc_status_code). */
enum {
    MM_GRPC_OK = 0,
    MM_GRPC_CANCELLED = 1,
    MM_GRPC_UNKNOWN = 2,
    MM_GRPC_INVALID_ARGUMENT = 3,
    MM_GRPC_DEADLINE_EXCEEDED = 4,
    MM_GRPC_RESOURCE_EXHAUSTED = 8,
    MM_GRPC_UNIMPLEMENTED = 12,
    MM_GRPC_INTERNAL = 13,
    MM_GRPC_UNAVAILABLE = 14,
    MM_GRPC_UNAUTHENTICATED = 16,
};

typedef struct mm_grpc_client mm_grpc_client;

/* TLS files (PEM). ca_file NULL = the system's roots; cert/key both set = mTLS. */
typedef struct mm_grpc_tls {
    const char *ca_file;
    const char *cert_file;
    const char *key_file;
} mm_grpc_tls;

/* The outcome of one call: gRPC code and the server's (or the library's) message. */
typedef struct mm_grpc_status {
    int code;
    char message[1024];
} mm_grpc_status;

/* Called once per streamed message; return nonzero to cancel the call. */
typedef int (*mm_grpc_msg_fn)(void *user, const uint8_t *msg, size_t len);

/* Opens a channel to target ("host:port"); tls NULL = plaintext. The
 * connection itself is made lazily by the first call. */
int mm_grpc_client_new(const char *target, const mm_grpc_tls *tls, mm_grpc_client **out, char *err,
                       size_t errlen);
void mm_grpc_client_destroy(mm_grpc_client **c);

/* From now on, a call in flight is cancelled (status CANCELLED) within about
 * 50 ms of *flag becoming nonzero — a SIGTERM handler's flag, so that a
 * program stops promptly. NULL: never (the default). */
void mm_grpc_client_set_cancel(mm_grpc_client *c, const volatile sig_atomic_t *flag);

/* One unary call. api_key NULL = no authorization metadata; timeout_ms <= 0 =
 * no deadline. On return st holds the call's status; *resp (malloc'd, caller
 * frees) holds the response bytes when st->code == MM_GRPC_OK. Returns MM_OK
 * when the call ran (whatever its status), a negative mm_status when it could
 * not be started (message in st->message). */
int mm_grpc_unary(mm_grpc_client *c, const char *method, const char *api_key, int timeout_ms,
                  const uint8_t *req, size_t req_len, uint8_t **resp, size_t *resp_len,
                  mm_grpc_status *st);

/* One server-streaming call: fn gets each message as it arrives. Same
 * conventions as mm_grpc_unary; a nonzero fn return cancels the call (the
 * status is then CANCELLED). */
int mm_grpc_server_stream(mm_grpc_client *c, const char *method, const char *api_key,
                          int timeout_ms, const uint8_t *req, size_t req_len, mm_grpc_msg_fn fn,
                          void *user, mm_grpc_status *st);

/* "OK", "INVALID_ARGUMENT", ... ("UNKNOWN_CODE" past the table); never NULL. */
const char *mm_grpc_code_name(int code);

#endif
