/* wire.c — framing of the router <-> expert protocol on ZeroMQ (see wire.h). */
#include "wire.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- reference-counted tensor buffers ------------------------------------ */

mm_wire_buf *mm_wire_buf_new(size_t len) {
    /* One allocation: header then data, data aligned for floats. */
    size_t hdr = (sizeof(mm_wire_buf) + 63) & ~(size_t)63;
    if (len > SIZE_MAX - hdr)
        return NULL;
    mm_wire_buf *b = malloc(hdr + (len ? len : 1));
    if (!b)
        return NULL;
    atomic_init(&b->refs, 1);
    b->len = len;
    b->data = (float *)((char *)b + hdr);
    return b;
}

static void s_buf_release(mm_wire_buf *b) {
    if (b && atomic_fetch_sub(&b->refs, 1) == 1)
        free(b);
}

void mm_wire_buf_unref(mm_wire_buf **b) {
    if (!b || !*b)
        return;
    s_buf_release(*b);
    *b = NULL;
}

/* ZeroMQ's free callback: may run on its I/O thread, hence the atomic. */
static void s_zmq_free(void *data, void *hint) {
    (void)data;
    s_buf_release(hint);
}

/* ---- send ---------------------------------------------------------------- */

static int s_send_errno(int e, const char *what, char *err, size_t errlen) {
    errno = e;
    if (e == EAGAIN)
        return mm_errorf(err, errlen, MM_EAGAIN, "%s: peer queue full (high-water mark)", what);
    return mm_errorf(err, errlen, MM_EIO, "%s: %s", what, zmq_strerror(e));
}

int mm_wire_send(void *sock, const void *id, size_t idlen, const Medmoe__Wire__Envelope *env,
                 mm_wire_buf *t, char *err, size_t errlen) {
    uint8_t hdr[MM_WIRE_MAX_HEADER];
    size_t hlen = medmoe__wire__envelope__get_packed_size(env);
    if (hlen > sizeof hdr)
        return mm_errorf(err, errlen, MM_EINVAL, "envelope of %zu bytes exceeds %d", hlen,
                         MM_WIRE_MAX_HEADER);
    medmoe__wire__envelope__pack(env, hdr);
    int more = t ? ZMQ_SNDMORE : 0;
    if (id) {
        /* With ZMQ_ROUTER_MANDATORY an unknown peer fails here (EHOSTUNREACH);
         * a full queue fails with EAGAIN: nothing has been queued then. */
        if (zmq_send(sock, id, idlen, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0)
            return s_send_errno(zmq_errno(), "send", err, errlen);
    }
    /* Later frames of a started multipart message are queued atomically. */
    if (zmq_send(sock, hdr, hlen, more | ZMQ_DONTWAIT) < 0)
        return s_send_errno(zmq_errno(), "send header", err, errlen);
    if (!t)
        return MM_OK;
    zmq_msg_t m;
    if (t->len >= MM_WIRE_ZERO_COPY_MIN) {
        atomic_fetch_add(&t->refs, 1);
        if (zmq_msg_init_data(&m, t->data, t->len, s_zmq_free, t) != 0) {
            s_buf_release(t);
            return mm_errorf(err, errlen, MM_ENOMEM, "zmq_msg_init_data(%zu bytes)", t->len);
        }
    } else {
        if (zmq_msg_init_size(&m, t->len) != 0)
            return mm_errorf(err, errlen, MM_ENOMEM, "zmq_msg_init_size(%zu bytes)", t->len);
        memcpy(zmq_msg_data(&m), t->data, t->len);
    }
    if (zmq_msg_send(&m, sock, ZMQ_DONTWAIT) < 0) {
        int e = zmq_errno();
        zmq_msg_close(&m); /* runs the free callback: drops the reference */
        return s_send_errno(e, "send tensor", err, errlen);
    }
    return MM_OK;
}

/* ---- receive ------------------------------------------------------------- */

static int s_more(void *sock) {
    int more = 0;
    size_t sz = sizeof more;
    zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &sz);
    return more;
}

/* Throw away the remaining frames of the current message. */
static size_t s_drain(void *sock) {
    size_t n = 0;
    while (s_more(sock)) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, sock, 0) < 0) {
            zmq_msg_close(&m);
            break;
        }
        zmq_msg_close(&m);
        n++;
    }
    return n;
}

int mm_wire_recv(void *sock, int with_id, mm_wire_msg *msg, char *err, size_t errlen) {
    memset(msg, 0, sizeof *msg);
    zmq_msg_t f;
    zmq_msg_init(&f);
    if (zmq_msg_recv(&f, sock, ZMQ_DONTWAIT) < 0) {
        int e = zmq_errno();
        zmq_msg_close(&f);
        if (e == EAGAIN)
            return MM_EAGAIN;
        return mm_errorf(err, errlen, MM_EIO, "receive: %s", zmq_strerror(e));
    }
    if (with_id) {
        size_t n = zmq_msg_size(&f);
        if (n > MM_WIRE_MAX_ID)
            n = MM_WIRE_MAX_ID;
        memcpy(msg->id, zmq_msg_data(&f), n);
        msg->idlen = n;
        if (!s_more(sock)) {
            zmq_msg_close(&f);
            return mm_errorf(err, errlen, MM_EPROTO, "message without an envelope frame");
        }
        zmq_msg_close(&f);
        zmq_msg_init(&f);
        /* the rest of a multipart message is already here */
        if (zmq_msg_recv(&f, sock, 0) < 0) {
            zmq_msg_close(&f);
            return mm_errorf(err, errlen, MM_EIO, "receive: %s", zmq_strerror(zmq_errno()));
        }
    }
    /* Frames from the wire carry their connection's metadata (the routing
     * id frame a ROUTER makes up does not). */
    const char *addr = zmq_msg_gets(&f, "Peer-Address");
    snprintf(msg->peer, sizeof msg->peer, "%s", addr ? addr : "");
    size_t hlen = zmq_msg_size(&f);
    if (hlen == 0 || hlen > MM_WIRE_MAX_HEADER) {
        zmq_msg_close(&f);
        size_t extra = s_drain(sock);
        return mm_errorf(err, errlen, MM_EPROTO, "envelope frame of %zu bytes (+%zu frames)", hlen,
                         extra);
    }
    msg->env = medmoe__wire__envelope__unpack(NULL, hlen, zmq_msg_data(&f));
    zmq_msg_close(&f);
    if (!msg->env) {
        size_t extra = s_drain(sock);
        return mm_errorf(err, errlen, MM_EPROTO,
                         "frame of %zu bytes is not an Envelope (+%zu frames)", hlen, extra);
    }
    int wants_tensor = msg->env->body_case == MM_WIRE_WORK ||
                       (msg->env->body_case == MM_WIRE_RESULT &&
                        msg->env->result->error == MEDMOE__WIRE__ERROR_CODE__ERROR_OK);
    if (msg->env->body_case == MEDMOE__WIRE__ENVELOPE__BODY__NOT_SET) {
        size_t extra = s_drain(sock);
        mm_wire_msg_clear(msg);
        return mm_errorf(err, errlen, MM_EPROTO, "Envelope with no body (+%zu frames)", extra);
    }
    if (s_more(sock)) {
        zmq_msg_init(&msg->tensor_msg);
        msg->has_tensor = 1;
        if (zmq_msg_recv(&msg->tensor_msg, sock, 0) < 0) {
            mm_wire_msg_clear(msg);
            return mm_errorf(err, errlen, MM_EIO, "receive: %s", zmq_strerror(zmq_errno()));
        }
        msg->tensor = zmq_msg_data(&msg->tensor_msg);
        msg->tensor_len = zmq_msg_size(&msg->tensor_msg);
        size_t extra = s_drain(sock);
        if (extra) {
            mm_wire_msg_clear(msg);
            return mm_errorf(err, errlen, MM_EPROTO, "%zu frames after the tensor frame", extra);
        }
    }
    if (wants_tensor && !msg->has_tensor) {
        const char *what = msg->env->body_case == MM_WIRE_WORK ? "Work" : "Result";
        mm_wire_msg_clear(msg);
        return mm_errorf(err, errlen, MM_EPROTO, "%s without its tensor frame", what);
    }
    if (!wants_tensor && msg->has_tensor) {
        mm_wire_msg_clear(msg);
        return mm_errorf(err, errlen, MM_EPROTO, "unexpected second frame");
    }
    return MM_OK;
}

void mm_wire_msg_clear(mm_wire_msg *msg) {
    if (msg->env)
        medmoe__wire__envelope__free_unpacked(msg->env, NULL);
    msg->env = NULL;
    if (msg->has_tensor)
        zmq_msg_close(&msg->tensor_msg);
    msg->has_tensor = 0;
    msg->tensor = NULL;
    msg->tensor_len = 0;
}

/* ---- names --------------------------------------------------------------- */

const char *mm_wire_id_str(const uint8_t *id, size_t idlen, char *buf, size_t len) {
    if (!len)
        return buf;
    buf[0] = 0;
    size_t at = 0;
    for (size_t i = 0; i < idlen && at + 3 < len; i++)
        at += (size_t)snprintf(buf + at, len - at, "%02x", id[i]);
    return buf;
}

int mm_wire_max_frame(size_t max_rows, size_t hidden, int64_t *bytes, char *err, size_t errlen) {
    size_t row, n;
    if (max_rows < 1 || max_rows > MM_WIRE_MAX_ROWS || hidden < 1 ||
        !mm_size_mul(hidden, sizeof(float), &row) || !mm_size_mul(max_rows, row, &n) ||
        n > INT64_MAX)
        return mm_errorf(err, errlen, MM_EINVAL,
                         "expert wire: %zu rows of width %zu per batch (rows 1..%d)", max_rows,
                         hidden, MM_WIRE_MAX_ROWS);
    *bytes = n > MM_WIRE_MAX_HEADER ? (int64_t)n : MM_WIRE_MAX_HEADER;
    return MM_OK;
}

const char *mm_wire_error_str(int code) {
    switch (code) {
    case MEDMOE__WIRE__ERROR_CODE__ERROR_OK: return "OK";
    case MEDMOE__WIRE__ERROR_CODE__ERROR_BUSY: return "BUSY";
    case MEDMOE__WIRE__ERROR_CODE__ERROR_DRAINING: return "DRAINING";
    case MEDMOE__WIRE__ERROR_CODE__ERROR_BAD_REQUEST: return "BAD_REQUEST";
    case MEDMOE__WIRE__ERROR_CODE__ERROR_EXPERT_NOT_LOADED: return "EXPERT_NOT_LOADED";
    case MEDMOE__WIRE__ERROR_CODE__ERROR_INTERNAL: return "INTERNAL";
    case MEDMOE__WIRE__ERROR_CODE__ERROR_EXPIRED: return "EXPIRED";
    default: return "UNKNOWN";
    }
}

/* ---- checks of received messages ------------------------------------------- */

int mm_wire_check_work(const Medmoe__Wire__Work *w, size_t tensor_len,
                       const mm_wire_work_rules *rules, char *text, size_t len) {
    size_t H = rules->hidden, want = 0;
    if (w->moe < 0 || w->moe >= rules->n_moe_layers || w->layer != rules->moe_layers_idx[w->moe]) {
        snprintf(text, len, "MoE layer %d / decoder layer %d do not exist or disagree", w->moe,
                 w->layer);
        return MEDMOE__WIRE__ERROR_CODE__ERROR_BAD_REQUEST;
    }
    if (w->expert != rules->expert) {
        snprintf(text, len, "expert %d asked, this node hosts expert %d", w->expert, rules->expert);
        return MEDMOE__WIRE__ERROR_CODE__ERROR_EXPERT_NOT_LOADED;
    }
    if (w->rows < 1 || w->width != H || w->dtype != MEDMOE__WIRE__DTYPE__DTYPE_F32 ||
        !mm_size_mul(w->rows, H * sizeof(float), &want) || tensor_len != want) {
        snprintf(text, len, "bad batch: rows %u width %u (hidden %zu) dtype %d, tensor %zu bytes",
                 w->rows, w->width, H, (int)w->dtype, tensor_len);
        return MEDMOE__WIRE__ERROR_CODE__ERROR_BAD_REQUEST;
    }
    if (rules->capacity > 0 && w->rows > (unsigned)rules->capacity) {
        snprintf(text, len, "%u rows, capacity %d", w->rows, rules->capacity);
        return MEDMOE__WIRE__ERROR_CODE__ERROR_BUSY;
    }
    return MEDMOE__WIRE__ERROR_CODE__ERROR_OK;
}

int mm_wire_check_hello(const Medmoe__Wire__Hello *h, int n_experts, const char *fps,
                        size_t fp_stride, char *reason, size_t len) {
    if (h->version != MM_WIRE_VERSION)
        return mm_errorf(reason, len, MM_EPROTO, "protocol version %u, this router speaks %u",
                         h->version, MM_WIRE_VERSION);
    if (h->expert < 0 || h->expert >= n_experts)
        return mm_errorf(reason, len, MM_EPROTO,
                         "expert %d does not exist (the model has %d experts)", h->expert,
                         n_experts);
    const char *fp = h->fingerprint ? h->fingerprint : "";
    const char *want = fps + (size_t)h->expert * fp_stride;
    if (strcmp(fp, want) != 0)
        return mm_errorf(reason, len, MM_EPROTO,
                         "model fingerprint mismatch for expert %d: router has %.16s..., expert "
                         "sent %.16s... (another checkpoint or fingerprint mode)",
                         h->expert, want, *fp ? fp : "(none)");
    return MM_OK;
}

int mm_wire_result_fits(const Medmoe__Wire__Result *res, size_t tensor_len, int layer, int moe,
                        int expert, size_t rows, size_t hidden) {
    size_t want = 0;
    if (!mm_size_mul(rows, hidden * sizeof(float), &want))
        return 0;
    return res->layer == layer && res->moe == moe && res->expert == expert && res->rows == rows &&
           res->width == hidden &&
           (res->error != MEDMOE__WIRE__ERROR_CODE__ERROR_OK ||
            (res->dtype == MEDMOE__WIRE__DTYPE__DTYPE_F32 && tensor_len == want));
}

/* ---- key files ------------------------------------------------------------- */

int mm_wire_read_keys(const char *path, char (*keys)[41], size_t max, size_t *n, char *err,
                      size_t errlen) {
    FILE *f = fopen(path, "r");
    if (!f)
        return mm_errorf(err, errlen, MM_EIO, "%s: %s", path, strerror(errno));
    char line[512];
    size_t found = 0;
    int lineno = 0, rc = MM_OK;
    while (rc == MM_OK && fgets(line, sizeof line, f)) {
        lineno++;
        char *s = line;
        while (*s == ' ' || *s == '\t')
            s++;
        /* '#' is a Z85 digit: only a line that starts with it is a comment */
        size_t len = strcspn(s, " \t\r\n");
        if (len == 0 || *s == '#')
            continue;
        uint8_t raw[32];
        if (len != 40) {
            rc = mm_errorf(err, errlen, MM_EPROTO, "%s:%d: not a Z85 key (%zu characters, want 40)",
                           path, lineno, len);
            break;
        }
        s[len] = 0;
        if (!zmq_z85_decode(raw, s)) {
            rc = mm_errorf(err, errlen, MM_EPROTO, "%s:%d: not a Z85 key", path, lineno);
            break;
        }
        if (*n >= max) {
            rc = mm_errorf(err, errlen, MM_EINVAL, "%s: more than %zu keys", path, max);
            break;
        }
        memcpy(keys[*n], s, 41);
        (*n)++;
        found++;
    }
    fclose(f);
    if (rc == MM_OK && !found)
        rc = mm_errorf(err, errlen, MM_EINVAL, "%s: no key in the file", path);
    return rc;
}
