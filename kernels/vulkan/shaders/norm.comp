#version 450
// Row normalisation over the last dimension, one workgroup per row.
// flags: bit 0 weight present, bit 1 bias present, bit 2 rmsnorm (else
// layernorm). Absent w/b are bound to a dummy buffer and never read.
#extension GL_GOOGLE_include_directive : enable
#include "common.glsl"

#define WG 128
layout(local_size_x = WG) in;
layout(std430, binding = 0) readonly buffer XBuf { float x[]; };
layout(std430, binding = 1) readonly buffer WBuf { float w[]; };
layout(std430, binding = 2) readonly buffer BBuf { float b[]; };
layout(std430, binding = 3) buffer OBuf { float o[]; };
layout(push_constant) uniform PC {
    uint rows, cols, x_off, w_off, b_off, o_off, flags;
    float eps;
} pc;

shared float red[WG];

float block_sum(float v) {
    uint tid = gl_LocalInvocationID.x;
    red[tid] = v;
    barrier();
    for (uint h = WG / 2; h > 0u; h >>= 1) {
        if (tid < h)
            red[tid] += red[tid + h];
        barrier();
    }
    float s = red[0];
    barrier(); // everyone has read red[0] before it is reused
    return s;
}

void main() {
    uint row = mm_group_id();
    if (row >= pc.rows)
        return;
    uint tid = gl_LocalInvocationID.x;
    uint xb = pc.x_off + row * pc.cols, ob = pc.o_off + row * pc.cols;
    bool rms = (pc.flags & 4u) != 0u;
    float mean = 0.0;
    if (!rms) {
        float s = 0.0;
        for (uint c = tid; c < pc.cols; c += WG)
            s += x[xb + c];
        mean = block_sum(s) / float(pc.cols);
    }
    float s2 = 0.0;
    for (uint c = tid; c < pc.cols; c += WG) {
        float d = x[xb + c] - mean;
        s2 += d * d;
    }
    float inv = inversesqrt(block_sum(s2) / float(pc.cols) + pc.eps);
    for (uint c = tid; c < pc.cols; c += WG) {
        float v = (x[xb + c] - mean) * inv;
        if ((pc.flags & 1u) != 0u)
            v *= w[pc.w_off + c];
        if ((pc.flags & 2u) != 0u)
            v += b[pc.b_off + c];
        o[ob + c] = v;
    }
}
