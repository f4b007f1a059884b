/* fuzz_wire — hostile messages on the router <-> expert wire, through the
 * code each side runs on what arrives: mm_wire_recv (framing, Envelope
 * unpacking, tensor-frame rules) on a real ZeroMQ inproc socket, then the
 * checks of the body: the expert's mm_wire_check_work on a Work, the
 * router's mm_wire_check_hello on a Hello and mm_wire_result_fits on a
 * Result, against a small fixed model (hidden 8, MoE layers 1 and 3, 4
 * experts, this node hosting expert 2, capacity 16).
 *
 * Input: byte 0 bit 0 = the router side (the first frame is the routing
 * id), bits 1..3 = how many frames (1..8); then each frame as a 2-byte
 * little-endian length and its bytes (the last frame takes the rest). */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "status.h"
#include "wire.h"

static void *s_ctx, *s_tx, *s_rx;

static void s_setup(void) {
    s_ctx = zmq_ctx_new();
    s_tx = zmq_socket(s_ctx, ZMQ_PAIR);
    s_rx = zmq_socket(s_ctx, ZMQ_PAIR);
    int hwm = 0; /* never drop: each input is drained before the next */
    zmq_setsockopt(s_tx, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(s_rx, ZMQ_RCVHWM, &hwm, sizeof hwm);
    if (zmq_bind(s_rx, "inproc://fuzz-wire") || zmq_connect(s_tx, "inproc://fuzz-wire"))
        abort();
}

static void s_check(const mm_wire_msg *m) {
    static const int moe_layers[2] = {1, 3};
    static const char fps[4][65] = {
        "0000000000000000000000000000000000000000000000000000000000000000",
        "1111111111111111111111111111111111111111111111111111111111111111",
        "2222222222222222222222222222222222222222222222222222222222222222",
        "3333333333333333333333333333333333333333333333333333333333333333"};
    char text[512];
    const Medmoe__Wire__Envelope *env = m->env;
    assert(env && env->body_case != MEDMOE__WIRE__ENVELOPE__BODY__NOT_SET);
    assert(!m->has_tensor || m->tensor);
    switch (env->body_case) {
    case MM_WIRE_WORK: {
        assert(m->has_tensor);
        mm_wire_work_rules r = {2, moe_layers, 8, 2, 16};
        int code = mm_wire_check_work(env->work, m->tensor_len, &r, text, sizeof text);
        if (code == 0) /* accepted: the expert copies rows x 8 floats out of the frame */
            assert(m->tensor_len == (size_t)env->work->rows * 8 * sizeof(float) &&
                   env->work->rows <= 16);
        mm_wire_error_str(code);
        break;
    }
    case MM_WIRE_HELLO:
        if (mm_wire_check_hello(env->hello, 4, fps[0], sizeof fps[0], text, sizeof text) == MM_OK)
            assert(env->hello->expert >= 0 && env->hello->expert < 4);
        break;
    case MM_WIRE_RESULT: {
        const Medmoe__Wire__Result *res = env->result;
        if (mm_wire_result_fits(res, m->tensor_len, 3, 1, 2, 5, 8) &&
            res->error == MEDMOE__WIRE__ERROR_CODE__ERROR_OK)
            assert(m->has_tensor && m->tensor_len == 5 * 8 * sizeof(float));
        mm_wire_error_str(res->error);
        break;
    }
    default: break;
    }
    char idbuf[2 * MM_WIRE_MAX_ID + 1];
    mm_wire_id_str(m->id, m->idlen, idbuf, sizeof idbuf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len) {
    if (!s_ctx)
        s_setup();
    if (len < 1)
        return 0;
    int router = data[0] & 1;
    int nframes = 1 + ((data[0] >> 1) & 7);
    size_t at = 1;
    for (int i = 0; i < nframes; i++) {
        size_t n = len - at;
        if (i + 1 < nframes && n >= 2) {
            size_t want = data[at] | (size_t)data[at + 1] << 8;
            at += 2;
            n = want < len - at ? want : len - at;
        }
        int more = i + 1 < nframes ? ZMQ_SNDMORE : 0;
        if (zmq_send(s_tx, data + at, n, more) < 0)
            abort();
        at += n;
    }
    mm_wire_msg m;
    char err[256];
    int rc = mm_wire_recv(s_rx, router, &m, err, sizeof err);
    assert(rc == MM_OK || rc == MM_EPROTO);
    if (rc == MM_OK) {
        s_check(&m);
        mm_wire_msg_clear(&m);
    }
    /* whatever a refused message left behind must not reach the next input */
    zmq_msg_t f;
    zmq_msg_init(&f);
    int left = 0;
    while (zmq_msg_recv(&f, s_rx, ZMQ_DONTWAIT) >= 0)
        left++;
    zmq_msg_close(&f);
    assert(left == 0);
    return 0;
}
