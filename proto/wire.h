/* wire.h — framing of the router <-> expert protocol (expert_wire.proto) on
 * ZeroMQ sockets, shared by medmoe-router and medmoe-expert.
 *
 * A message is [identity] Envelope [tensor]: the identity frame only on the
 * router's ROUTER socket. mm_wire_send() packs an Envelope and sends it with
 * an optional tensor frame; large tensors go without a copy through a
 * reference-counted mm_wire_buf (ZeroMQ holds a reference until its free
 * callback runs, so the sender may keep the same bytes for a re-send).
 * mm_wire_recv() reads one whole multipart message without blocking and
 * checks its framing; the caller validates the fields.
 *
 *     mm_wire_buf *b = mm_wire_buf_new(nbytes);       // refs = 1 (mine)
 *     memcpy(b->data, rows, nbytes);
 *     Medmoe__Wire__Envelope env = MEDMOE__WIRE__ENVELOPE__INIT; ... env.work = &w;
 *     if (mm_wire_send(sock, id, idlen, &env, b, err, sizeof err) == MM_EIO) ...  // errno says why
 *     ...
 *     mm_wire_buf_unref(&b);                           // drop mine when answered
 *
 *     mm_wire_msg msg;
 *     int rc = mm_wire_recv(sock, 1, &msg, err, sizeof err); // MM_EAGAIN: nothing queued
 *     if (rc == MM_OK) { ... msg.env->body_case ... msg.tensor, msg.tensor_len ... }
 *     mm_wire_msg_clear(&msg);
 */
#ifndef MM_WIRE_H
#define MM_WIRE_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <zmq.h>

#include "expert_wire.pb-c.h"
#include "status.h"

#define MM_WIRE_VERSION 1u               /* protocol version carried in Hello/Welcome  */
#define MM_WIRE_MAX_ID 256               /* longest ZeroMQ routing id we keep           */
#define MM_WIRE_MAX_HEADER 4096          /* an Envelope larger than this is malformed    */
#define MM_WIRE_ZERO_COPY_MIN (64 << 10) /* tensors at least this big go without copy */
#define MM_WIRE_MAX_ROWS 4096            /* rows of one Work / Result at most         */

/* Envelope body cases, shorter names. */
#define MM_WIRE_HELLO MEDMOE__WIRE__ENVELOPE__BODY_HELLO
#define MM_WIRE_WELCOME MEDMOE__WIRE__ENVELOPE__BODY_WELCOME
#define MM_WIRE_REFUSE MEDMOE__WIRE__ENVELOPE__BODY_REFUSE
#define MM_WIRE_WORK MEDMOE__WIRE__ENVELOPE__BODY_WORK
#define MM_WIRE_RESULT MEDMOE__WIRE__ENVELOPE__BODY_RESULT
#define MM_WIRE_HEARTBEAT MEDMOE__WIRE__ENVELOPE__BODY_HEARTBEAT
#define MM_WIRE_BYE MEDMOE__WIRE__ENVELOPE__BODY_BYE

/* A reference-counted byte buffer for tensor frames. */
typedef struct mm_wire_buf {
    atomic_int refs; /* owners: the creator + one per zero-copy send in flight */
    size_t len;      /* bytes at data                                          */
    float *data;     /* the bytes (malloc'd with the struct)                   */
} mm_wire_buf;

/* NULL on allocation failure; refs = 1. */
mm_wire_buf *mm_wire_buf_new(size_t len);
/* Drop one reference (frees at zero) and clear *b. NULL-safe. */
void mm_wire_buf_unref(mm_wire_buf **b);

/* Send [identity (when id != NULL)] envelope [tensor (when t != NULL)].
 * Non-blocking (ZMQ_DONTWAIT): returns MM_EAGAIN when the peer's queue is
 * full, MM_EIO with errno kept (EHOSTUNREACH: the ROUTER has no such peer),
 * MM_ENOMEM. t is not consumed: a zero-copy send takes its own reference. */
int mm_wire_send(void *sock, const void *id, size_t idlen, const Medmoe__Wire__Envelope *env,
                 mm_wire_buf *t, char *err, size_t errlen);

/* One received message. */
typedef struct mm_wire_msg {
    uint8_t id[MM_WIRE_MAX_ID];  /* sender's routing id (ROUTER side)           */
    size_t idlen;                /* 0 on the DEALER side                        */
    char peer[64];               /* the connection's remote address ("" unknown) */
    Medmoe__Wire__Envelope *env; /* unpacked header (NULL when malformed)       */
    zmq_msg_t tensor_msg;        /* the tensor frame, when present              */
    int has_tensor;              /* 1: tensor/tensor_len point into tensor_msg  */
    const void *tensor;          /* tensor bytes (not aligned: memcpy them)     */
    size_t tensor_len;           /* bytes                                       */
} mm_wire_msg;

/* Receive one whole message without blocking. MM_EAGAIN: none queued.
 * MM_EPROTO: a message arrived but its framing is wrong (too many frames, no
 * envelope, not an Envelope, no body, a tensor frame on a message that takes
 * none); it has been consumed, msg->id/idlen name the sender, err says why.
 * MM_EIO: the socket failed. On MM_OK the caller owns msg: clear it. */
int mm_wire_recv(void *sock, int with_id, mm_wire_msg *msg, char *err, size_t errlen);
void mm_wire_msg_clear(mm_wire_msg *msg);

/* "worker-1a2b3c..." style printable form of a routing id, for logs. */
const char *mm_wire_id_str(const uint8_t *id, size_t idlen, char *buf, size_t len);

/* Read Z85 CurveZMQ keys (40 characters each) from a file: one per line,
 * blank lines and lines starting with '#' ignored. Appends up to max keys to keys[*n]
 * and advances *n. MM_EIO (unreadable), MM_EPROTO (a line is not a key),
 * MM_EINVAL (more than max keys, or none in the file). */
int mm_wire_read_keys(const char *path, char (*keys)[41], size_t max, size_t *n, char *err,
                      size_t errlen);

/* ---- what each side checks of a message it received ----------------------
 * Pure functions (no socket, no state), shared by the nodes and by the
 * fuzz target tests/fuzz/fuzz_wire.c, which feeds them what mm_wire_recv
 * accepts from hostile frames. */

/* What an expert knows to check a Work against. */
typedef struct mm_wire_work_rules {
    int n_moe_layers;          /* MoE layers of the model                    */
    const int *moe_layers_idx; /* [n_moe_layers] decoder layer of each one  */
    size_t hidden;             /* hidden size: the width of every row        */
    int expert;                /* the expert this node hosts                 */
    int capacity;              /* rows per Work at most; 0 = no limit        */
} mm_wire_work_rules;

/* An expert's check of a received Work (tensor_len: its tensor frame's
 * bytes): the MoE ordinal exists and names the decoder layer the Work says,
 * the expert is the hosted one, rows >= 1, width == hidden, dtype F32, the
 * tensor is exactly rows x hidden floats, rows within capacity. Returns 0
 * (ERROR_OK) or the ErrorCode to answer with (BAD_REQUEST,
 * EXPERT_NOT_LOADED, BUSY); text says why. */
int mm_wire_check_work(const Medmoe__Wire__Work *w, size_t tensor_len,
                       const mm_wire_work_rules *rules, char *text, size_t len);

/* The router's check of a Hello: protocol version, expert index within
 * 0..n_experts-1, and its fingerprint equal to the expected one of that
 * expert (fps: n_experts NUL-terminated strings, fp_stride bytes apart).
 * MM_OK, or MM_EPROTO with the reason to Refuse with in reason. */
int mm_wire_check_hello(const Medmoe__Wire__Hello *h, int n_experts, const char *fps,
                        size_t fp_stride, char *reason, size_t len);

/* The router's check that a Result (tensor_len: its tensor frame's bytes,
 * when error is ERROR_OK) answers a Work of rows x hidden it sent for
 * (layer, moe, expert): 1 when it fits, 0 when it is malformed. */
int mm_wire_result_fits(const Medmoe__Wire__Result *res, size_t tensor_len, int layer, int moe,
                        int expert, size_t rows, size_t hidden);

/* ZMQ_MAXMSGSIZE of a socket of the expert wire: the largest legitimate
 * frame, so a peer cannot make the receiver allocate more. A frame is an
 * Envelope (at most MM_WIRE_MAX_HEADER bytes) or one tensor of
 * rows x hidden f32 values, rows <= max_rows (the largest batch: the
 * router's rows per forward step, an expert's --capacity, at most
 * MM_WIRE_MAX_ROWS):
 *     max(MM_WIRE_MAX_HEADER, max_rows * hidden * sizeof(float))
 * MM_EINVAL (written to err) when max_rows or hidden is out of range. */
int mm_wire_max_frame(size_t max_rows, size_t hidden, int64_t *bytes, char *err, size_t errlen);

/* Name of an ErrorCode ("BUSY"). */
const char *mm_wire_error_str(int code);

#endif
