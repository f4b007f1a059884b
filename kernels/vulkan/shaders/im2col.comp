#version 450
// img [C, H, W] -> out [(H/P)*(W/P), C*P*P]; patches row-major (py, px),
// each row ordered (c, ky, kx). One thread per output element.
#extension GL_GOOGLE_include_directive : enable
#include "common.glsl"

layout(local_size_x = 256) in;
layout(std430, binding = 0) readonly buffer IBuf { float img[]; };
layout(std430, binding = 1) buffer OBuf { float o[]; };
layout(push_constant) uniform PC { uint C, H, W, P, i_off, o_off; } pc;

void main() {
    uint e = mm_group_id() * 256u + gl_LocalInvocationID.x;
    uint pw = pc.C * pc.P * pc.P, npx = pc.W / pc.P;
    uint np = (pc.H / pc.P) * npx;
    if (e >= np * pw)
        return;
    uint p = e / pw, col = e % pw;
    uint c = col / (pc.P * pc.P), ky = (col / pc.P) % pc.P, kx = col % pc.P;
    uint y = (p / npx) * pc.P + ky, xx = (p % npx) * pc.P + kx;
    o[pc.o_off + e] = img[pc.i_off + (c * pc.H + y) * pc.W + xx];
}
