#version 450
// cache[slot_t, pos_t, :] = kv[t, :]; a token whose slot or position lies
// outside the cache is skipped. One thread per element of kv.
#extension GL_GOOGLE_include_directive : enable
#include "common.glsl"

layout(local_size_x = 256) in;
layout(std430, binding = 0) buffer CBuf { float cache[]; };
layout(std430, binding = 1) readonly buffer KBuf { float kv[]; };
layout(std430, binding = 2) readonly buffer SBuf { int seq[]; };
layout(push_constant) uniform PC { uint T, width, n_slots, max_ctx, c_off, kv_off, s_off; } pc;

void main() {
    uint e = mm_group_id() * 256u + gl_LocalInvocationID.x;
    if (e >= pc.T * pc.width)
        return;
    uint t = e / pc.width, c = e % pc.width;
    int slot = seq[pc.s_off + 2u * t], pos = seq[pc.s_off + 2u * t + 1u];
    if (slot < 0 || uint(slot) >= pc.n_slots || pos < 0 || uint(pos) >= pc.max_ctx)
        return;
    cache[pc.c_off + (uint(slot) * pc.max_ctx + uint(pos)) * pc.width + c] = kv[pc.kv_off + e];
}
