#version 450
// NeoX rope in place on x [T, n_heads*head_dim]: one thread per rotated
// pair (i, i + rot/2) of one head of one token, angle pos * theta^(-2i/rot).
#extension GL_GOOGLE_include_directive : enable
#include "common.glsl"

layout(local_size_x = 256) in;
layout(std430, binding = 0) buffer XBuf { float x[]; };
layout(std430, binding = 1) readonly buffer SBuf { int seq[]; };
layout(push_constant) uniform PC {
    uint T, n_heads, head_dim, rot, x_off, s_off;
    float theta;
} pc;

void main() {
    uint half_rot = pc.rot / 2u;
    uint e = mm_group_id() * 256u + gl_LocalInvocationID.x;
    if (e >= pc.T * pc.n_heads * half_rot)
        return;
    uint i = e % half_rot, h = (e / half_rot) % pc.n_heads, t = e / (half_rot * pc.n_heads);
    float pos = float(seq[pc.s_off + 2u * t + 1u]);
    float inv_freq = pow(pc.theta, -2.0 * float(i) / float(pc.rot));
    float ang = pos * inv_freq;
    float c = cos(ang), s = sin(ang);
    uint base = pc.x_off + t * pc.n_heads * pc.head_dim + h * pc.head_dim;
    float a = x[base + i], b = x[base + i + half_rot];
    x[base + i] = a * c - b * s;
    x[base + i + half_rot] = b * c + a * s;
}
