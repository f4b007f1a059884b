#version 450
// Row-wise softmax over the last dimension, one workgroup per row; out may
// alias x (each element is read before its own write, after both reductions).
#extension GL_GOOGLE_include_directive : enable
#include "common.glsl"

#define WG 128
layout(local_size_x = WG) in;
layout(std430, binding = 0) readonly buffer XBuf { float x[]; };
layout(std430, binding = 1) buffer OBuf { float o[]; };
layout(push_constant) uniform PC { uint rows, cols, x_off, o_off; } pc;

shared float red[WG];

void main() {
    uint row = mm_group_id();
    if (row >= pc.rows)
        return;
    uint tid = gl_LocalInvocationID.x;
    uint xb = pc.x_off + row * pc.cols, ob = pc.o_off + row * pc.cols;
    float m = -3.402823466e38;
    for (uint c = tid; c < pc.cols; c += WG)
        m = max(m, x[xb + c]);
    red[tid] = m;
    barrier();
    for (uint h = WG / 2; h > 0u; h >>= 1) {
        if (tid < h)
            red[tid] = max(red[tid], red[tid + h]);
        barrier();
    }
    m = red[0];
    barrier();
    float s = 0.0;
    for (uint c = tid; c < pc.cols; c += WG)
        s += exp(x[xb + c] - m);
    red[tid] = s;
    barrier();
    for (uint h = WG / 2; h > 0u; h >>= 1) {
        if (tid < h)
            red[tid] += red[tid + h];
        barrier();
    }
    float inv = 1.0 / red[0];
    for (uint c = tid; c < pc.cols; c += WG)
        o[ob + c] = exp(x[xb + c] - m) * inv;
}
