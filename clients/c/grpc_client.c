/* grpc_client.c — blocking unary and server-streaming calls on the gRPC C core.
 *
 * Each call gets its own pluck completion queue: the CLI makes one call at a
 * time, and a pluck queue lets every batch be awaited by its tag without an
 * event loop. All waits are bounded by the call's deadline (the C core ends
 * the call with DEADLINE_EXCEEDED when it passes), never by our own timers.
 */
#include "grpc_client.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "status.h"

struct mm_grpc_client {
    grpc_channel *channel;
    const volatile sig_atomic_t *cancel; /* nonzero: cancel the call in flight (NULL: never) */
};

const char *mm_grpc_code_name(int code) {
    static const char *const names[] = {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    };
    if (code < 0 || (size_t)code >= sizeof names / sizeof names[0])
        return "UNKNOWN_CODE";
    return names[code];
}

/* Reads a whole (small) PEM file into a NUL-terminated string. */
static int s_read_file(const char *path, char **out, char *err, size_t errlen) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return mm_errorf(err, errlen, MM_EIO, "%s: cannot open", path);
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        size_t got = fread(buf + n, 1, cap - 1 - n, f);
        n += got;
        if (n < cap - 1)
            break;
        if (cap > ((size_t)1 << 24)) { /* a PEM file is never 16 MiB */
            free(buf);
            fclose(f);
            return mm_errorf(err, errlen, MM_EINVAL, "%s: too large for a PEM file", path);
        }
        char *nb = realloc(buf, cap * 2);
        if (!nb) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = nb;
        cap *= 2;
    }
    int bad = ferror(f);
    fclose(f);
    if (!buf)
        return mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", path);
    if (bad) {
        free(buf);
        return mm_errorf(err, errlen, MM_EIO, "%s: read error", path);
    }
    buf[n] = '\0';
    *out = buf;
    return MM_OK;
}

int mm_grpc_client_new(const char *target, const mm_grpc_tls *tls, mm_grpc_client **out, char *err,
                       size_t errlen) {
    *out = NULL;
    if (!target || !*target)
        return mm_errorf(err, errlen, MM_EINVAL, "--server: empty address");
    char *ca = NULL, *cert = NULL, *key = NULL;
    int rc = MM_OK;
    if (tls && tls->ca_file && (rc = s_read_file(tls->ca_file, &ca, err, errlen)) != MM_OK)
        return rc;
    if (tls && ((tls->cert_file != NULL) != (tls->key_file != NULL))) {
        free(ca);
        return mm_errorf(err, errlen, MM_EINVAL, "--tls-cert and --tls-key go together");
    }
    if (tls && tls->cert_file) {
        if ((rc = s_read_file(tls->cert_file, &cert, err, errlen)) != MM_OK ||
            (rc = s_read_file(tls->key_file, &key, err, errlen)) != MM_OK) {
            free(ca);
            free(cert);
            return rc;
        }
    }
    mm_grpc_client *c = calloc(1, sizeof *c);
    if (!c) {
        free(ca);
        free(cert);
        free(key);
        return mm_errorf(err, errlen, MM_ENOMEM, "out of memory");
    }
    grpc_init();
    grpc_channel_credentials *creds;
    if (tls) {
        grpc_ssl_pem_key_cert_pair pair = {.private_key = key, .cert_chain = cert};
        creds = grpc_ssl_credentials_create(ca, cert ? &pair : NULL, NULL, NULL);
    } else {
        creds = grpc_insecure_credentials_create();
    }
    /* The CLI sends requests up to the server's limit; let gRPC, not us,
     * refuse what is too large, and accept any answer size. */
    grpc_arg args[2] = {
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, .value.integer = -1},
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, .value.integer = -1},
    };
    grpc_channel_args chargs = {.num_args = 2, .args = args};
    c->channel = creds ? grpc_channel_create(target, creds, &chargs) : NULL;
    if (creds)
        grpc_channel_credentials_release(creds);
    free(ca);
    free(cert);
    if (key) {
        memset(key, 0, strlen(key)); /* the private key does not linger in freed memory */
        free(key);
    }
    if (!c->channel) {
        free(c);
        grpc_shutdown();
        return mm_errorf(err, errlen, MM_ERR, "%s: cannot create a gRPC channel", target);
    }
    *out = c;
    return MM_OK;
}

void mm_grpc_client_destroy(mm_grpc_client **c) {
    if (!c || !*c)
        return;
    grpc_channel_destroy((*c)->channel);
    free(*c);
    *c = NULL;
    grpc_shutdown();
}

void mm_grpc_client_set_cancel(mm_grpc_client *c, const volatile sig_atomic_t *flag) {
    c->cancel = flag;
}

static gpr_timespec s_deadline(int timeout_ms) {
    if (timeout_ms <= 0)
        return gpr_inf_future(GPR_CLOCK_REALTIME);
    return gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
                        gpr_time_from_millis(timeout_ms, GPR_TIMESPAN));
}

/* Starts a batch and waits for it; a failed batch means the call is over and
 * its status (fetched next) says why. */
static int s_run_batch(grpc_call *call, grpc_completion_queue *cq, const grpc_op *ops, size_t n,
                       void *tag, const volatile sig_atomic_t *cancel) {
    if (grpc_call_start_batch(call, ops, n, tag, NULL) != GRPC_CALL_OK)
        return -1;
    /* Wait in 50 ms slices while a cancel flag is set up, so that a signal
     * (SIGTERM) ends the call promptly: the cancelled batch then completes. */
    int cancelled = 0;
    for (;;) {
        gpr_timespec until =
            cancel && !cancelled ? s_deadline(50) : gpr_inf_future(GPR_CLOCK_REALTIME);
        grpc_event ev = grpc_completion_queue_pluck(cq, tag, until, NULL);
        if (ev.type == GRPC_OP_COMPLETE)
            return ev.success ? 0 : -1;
        if (ev.type != GRPC_QUEUE_TIMEOUT)
            return -1;
        if (!cancelled && *cancel) {
            grpc_call_cancel(call, NULL);
            cancelled = 1;
        }
    }
}

static int s_bytes_of(grpc_byte_buffer *bb, uint8_t **out, size_t *len) {
    grpc_byte_buffer_reader r;
    *out = NULL;
    *len = 0;
    if (!grpc_byte_buffer_reader_init(&r, bb))
        return MM_EPROTO;
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    size_t n = GRPC_SLICE_LENGTH(s);
    uint8_t *p = malloc(n ? n : 1);
    if (!p) {
        grpc_slice_unref(s);
        return MM_ENOMEM;
    }
    memcpy(p, GRPC_SLICE_START_PTR(s), n);
    grpc_slice_unref(s);
    *out = p;
    *len = n;
    return MM_OK;
}

/* The state of one call: everything its batches point into. */
typedef struct s_call {
    grpc_completion_queue *cq;
    grpc_call *call;
    grpc_metadata md;
    char *bearer;
    grpc_metadata_array initial_md, trailing_md;
    grpc_status_code status;
    grpc_slice details;
    grpc_byte_buffer *req;
    const volatile sig_atomic_t *cancel; /* the client's cancel flag */
} s_call;

static int s_call_start(mm_grpc_client *c, s_call *k, const char *method, const char *api_key,
                        int timeout_ms, const uint8_t *req, size_t req_len, mm_grpc_status *st) {
    memset(k, 0, sizeof *k);
    st->code = MM_GRPC_UNKNOWN;
    st->message[0] = '\0';
    k->details = grpc_empty_slice();
    grpc_metadata_array_init(&k->initial_md);
    grpc_metadata_array_init(&k->trailing_md);
    k->cancel = c->cancel;
    k->cq = grpc_completion_queue_create_for_pluck(NULL);
    grpc_slice m = grpc_slice_from_static_string(method);
    k->call = grpc_channel_create_call(c->channel, NULL, GRPC_PROPAGATE_DEFAULTS, k->cq, m, NULL,
                                       s_deadline(timeout_ms), NULL);
    if (!k->call) {
        snprintf(st->message, sizeof st->message, "%s: cannot create the call", method);
        return MM_ERR;
    }
    size_t nmd = 0;
    if (api_key) {
        size_t n = strlen(api_key) + sizeof "Bearer ";
        k->bearer = malloc(n);
        if (!k->bearer) {
            snprintf(st->message, sizeof st->message, "out of memory");
            return MM_ENOMEM;
        }
        snprintf(k->bearer, n, "Bearer %s", api_key);
        k->md.key = grpc_slice_from_static_string("authorization");
        k->md.value = grpc_slice_from_static_string(k->bearer);
        nmd = 1;
    }
    grpc_slice body = grpc_slice_from_copied_buffer((const char *)req, req_len);
    k->req = grpc_raw_byte_buffer_create(&body, 1);
    grpc_slice_unref(body);

    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = nmd;
    ops[0].data.send_initial_metadata.metadata = nmd ? &k->md : NULL;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = k->req;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &k->initial_md;
    /* A failure here (server gone, refused) shows in the status below. */
    (void)s_run_batch(k->call, k->cq, ops, 4, (void *)1, k->cancel);
    return MM_OK;
}

/* Receives the final status into st. */
static void s_call_finish(s_call *k, mm_grpc_status *st) {
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    op.data.recv_status_on_client.trailing_metadata = &k->trailing_md;
    op.data.recv_status_on_client.status = &k->status;
    op.data.recv_status_on_client.status_details = &k->details;
    if (s_run_batch(k->call, k->cq, &op, 1, (void *)3, k->cancel) != 0) {
        st->code = MM_GRPC_UNKNOWN;
        snprintf(st->message, sizeof st->message, "no status received");
        return;
    }
    st->code = (int)k->status;
    size_t n = GRPC_SLICE_LENGTH(k->details);
    if (n >= sizeof st->message)
        n = sizeof st->message - 1;
    memcpy(st->message, GRPC_SLICE_START_PTR(k->details), n);
    st->message[n] = '\0';
}

static void s_call_free(s_call *k) {
    if (k->call)
        grpc_call_unref(k->call);
    if (k->req)
        grpc_byte_buffer_destroy(k->req);
    grpc_metadata_array_destroy(&k->initial_md);
    grpc_metadata_array_destroy(&k->trailing_md);
    grpc_slice_unref(k->details);
    free(k->bearer);
    if (k->cq) {
        grpc_completion_queue_shutdown(k->cq);
        /* Drain to the shutdown event (a pluck queue is drained by pluck). */
        for (;;) {
            grpc_event ev =
                grpc_completion_queue_pluck(k->cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
            if (ev.type == GRPC_QUEUE_SHUTDOWN)
                break;
        }
        grpc_completion_queue_destroy(k->cq);
    }
}

/* Receives one message; *bb NULL = the stream ended (or the call failed). */
static void s_recv(s_call *k, grpc_byte_buffer **bb) {
    grpc_op op;
    memset(&op, 0, sizeof op);
    *bb = NULL;
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = bb;
    if (s_run_batch(k->call, k->cq, &op, 1, (void *)2, k->cancel) != 0 && *bb) {
        grpc_byte_buffer_destroy(*bb);
        *bb = NULL;
    }
}

int mm_grpc_unary(mm_grpc_client *c, const char *method, const char *api_key, int timeout_ms,
                  const uint8_t *req, size_t req_len, uint8_t **resp, size_t *resp_len,
                  mm_grpc_status *st) {
    *resp = NULL;
    *resp_len = 0;
    s_call k;
    int rc = s_call_start(c, &k, method, api_key, timeout_ms, req, req_len, st);
    if (rc == MM_OK) {
        grpc_byte_buffer *bb = NULL;
        s_recv(&k, &bb);
        s_call_finish(&k, st);
        if (bb) {
            if (st->code == MM_GRPC_OK && s_bytes_of(bb, resp, resp_len) != MM_OK) {
                st->code = MM_GRPC_INTERNAL;
                snprintf(st->message, sizeof st->message, "cannot read the response bytes");
            }
            grpc_byte_buffer_destroy(bb);
        } else if (st->code == MM_GRPC_OK) {
            st->code = MM_GRPC_INTERNAL;
            snprintf(st->message, sizeof st->message, "%s: OK status without a response", method);
        }
    }
    s_call_free(&k);
    return rc;
}

int mm_grpc_server_stream(mm_grpc_client *c, const char *method, const char *api_key,
                          int timeout_ms, const uint8_t *req, size_t req_len, mm_grpc_msg_fn fn,
                          void *user, mm_grpc_status *st) {
    s_call k;
    int rc = s_call_start(c, &k, method, api_key, timeout_ms, req, req_len, st);
    if (rc == MM_OK) {
        int stop = 0;
        for (;;) {
            grpc_byte_buffer *bb = NULL;
            s_recv(&k, &bb);
            if (!bb)
                break;
            uint8_t *msg = NULL;
            size_t n = 0;
            int brc = s_bytes_of(bb, &msg, &n);
            grpc_byte_buffer_destroy(bb);
            if (brc != MM_OK || fn(user, msg, n) != 0) {
                free(msg);
                stop = 1;
                grpc_call_cancel(k.call, NULL);
                break;
            }
            free(msg);
        }
        s_call_finish(&k, st);
        if (stop && st->code == MM_GRPC_OK)
            st->code = MM_GRPC_CANCELLED;
    }
    s_call_free(&k);
    return rc;
}
