#version 450
// out[i, c] = src[idx[i], c]; an index outside [0, rows) yields a zero row.
// Source dtype by -DW_F32 / -DW_F16 / -DW_BF16. One thread per output element.
#extension GL_GOOGLE_include_directive : enable
#define WEIGHT_BINDING 0
#include "common.glsl"

layout(local_size_x = 256) in;
layout(std430, binding = 1) readonly buffer IBuf { int idx[]; };
layout(std430, binding = 2) buffer OBuf { float o[]; };
layout(push_constant) uniform PC { uint n, cols, rows, s_off, i_off, o_off; } pc;

void main() {
    uint e = mm_group_id() * 256u + gl_LocalInvocationID.x;
    if (e >= pc.n * pc.cols)
        return;
    uint i = e / pc.cols, c = e % pc.cols;
    int r = idx[pc.i_off + i];
    o[pc.o_off + e] = (r >= 0 && uint(r) < pc.rows) ? load_w(pc.s_off + uint(r) * pc.cols + c) : 0.0;
}
