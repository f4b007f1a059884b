#version 450
// Elementwise binary ops, out may alias a: op 0 add, 1 mul, 2 swiglu
// (silu(a) * b). b_row != 0: b is one row of `cols`, broadcast over a's rows.
#extension GL_GOOGLE_include_directive : enable
#include "common.glsl"

layout(local_size_x = 256) in;
layout(std430, binding = 0) readonly buffer ABuf { float a[]; };
layout(std430, binding = 1) readonly buffer BBuf { float b[]; };
layout(std430, binding = 2) buffer OBuf { float o[]; };
layout(push_constant) uniform PC { uint n, cols, a_off, b_off, o_off, op, b_row; } pc;

void main() {
    uint i = mm_group_id() * 256u + gl_LocalInvocationID.x;
    if (i >= pc.n)
        return;
    float x = a[pc.a_off + i];
    float y = b[pc.b_off + (pc.b_row != 0u ? i % pc.cols : i)];
    float r;
    if (pc.op == 0u)
        r = x + y;
    else if (pc.op == 1u)
        r = x * y;
    else
        r = x / (1.0 + exp(-x)) * y;
    o[pc.o_off + i] = r;
}
