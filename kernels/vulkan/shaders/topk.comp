#version 450
// Per row of x [T, E]: the k largest values in descending order, ties to
// the lower index. One thread per row; k passes over the row, each picking
// the best element ranked strictly after the previous pick in the order
// (value descending, index ascending), so no scratch memory is needed.
#extension GL_GOOGLE_include_directive : enable
#include "common.glsl"

layout(local_size_x = 64) in;
layout(std430, binding = 0) readonly buffer XBuf { float x[]; };
layout(std430, binding = 1) buffer IBuf { int oi[]; };
layout(std430, binding = 2) buffer VBuf { float ov[]; };
layout(push_constant) uniform PC { uint T, E, k, x_off, i_off, v_off; } pc;

void main() {
    uint t = mm_group_id() * 64u + gl_LocalInvocationID.x;
    if (t >= pc.T)
        return;
    uint xb = pc.x_off + t * pc.E;
    float pv = 0.0;
    int pi = -1;
    for (uint r = 0u; r < pc.k; r++) {
        int bi = -1;
        float bv = 0.0;
        for (uint j = 0u; j < pc.E; j++) {
            float v = x[xb + j];
            bool after = pi < 0 || v < pv || (v == pv && int(j) > pi);
            if (after && (bi < 0 || v > bv)) { // strict >: ties keep the lower index
                bi = int(j);
                bv = v;
            }
        }
        if (bi < 0) { // only NaNs left: fall back to the next index not yet taken
            bi = pi + 1;
            bv = x[xb + uint(bi)];
        }
        oi[pc.i_off + t * pc.k + r] = bi;
        ov[pc.v_off + t * pc.k + r] = bv;
        pv = bv;
        pi = bi;
    }
}
