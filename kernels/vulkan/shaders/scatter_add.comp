#version 450
// dst[idx[i], c] += w[i] * src[i, c] (w absent: 1). idx entries do not
// repeat within one call, so threads never race; an index outside [0, R)
// is skipped. One thread per element of src.
#extension GL_GOOGLE_include_directive : enable
#include "common.glsl"

layout(local_size_x = 256) in;
layout(std430, binding = 0) buffer DBuf { float dst[]; };
layout(std430, binding = 1) readonly buffer SBuf { float src[]; };
layout(std430, binding = 2) readonly buffer IBuf { int idx[]; };
layout(std430, binding = 3) readonly buffer WBuf { float w[]; };
layout(push_constant) uniform PC { uint n, cols, R, d_off, s_off, i_off, w_off, has_w; } pc;

void main() {
    uint e = mm_group_id() * 256u + gl_LocalInvocationID.x;
    if (e >= pc.n * pc.cols)
        return;
    uint i = e / pc.cols, c = e % pc.cols;
    int r = idx[pc.i_off + i];
    if (r < 0 || uint(r) >= pc.R)
        return;
    float wi = pc.has_w != 0u ? w[pc.w_off + i] : 1.0;
    dst[pc.d_off + uint(r) * pc.cols + c] += wi * src[pc.s_off + e];
}
