#version 450
// GEMV (M small, used for M == 1): one workgroup per output element
// out[m, n] = x[m,:] · w[n,:] (+ bias[n]); 64 threads stride over K and
// reduce in shared memory (portable: no subgroup size assumed).
// Grid: n over x (and y when split), m over z.
#extension GL_GOOGLE_include_directive : enable
#define WEIGHT_BINDING 1
#include "common.glsl"

#define WG 64
layout(local_size_x = WG) in;
layout(std430, binding = 0) readonly buffer XBuf { float x[]; };
layout(std430, binding = 2) readonly buffer BBuf { float bias[]; };
layout(std430, binding = 3) buffer OBuf { float o[]; };
layout(push_constant) uniform PC {
    uint M, N, K, x_off, w_off, b_off, o_off, has_bias;
} pc;

shared float red[WG];

void main() {
    uint n = mm_group_id(), m = gl_WorkGroupID.z;
    uint tid = gl_LocalInvocationID.x;
    if (n >= pc.N) // uniform over the workgroup: safe before barrier()
        return;
    uint xb = pc.x_off + m * pc.K, wb = pc.w_off + n * pc.K;
    float s = 0.0;
    for (uint k = tid; k < pc.K; k += WG)
        s += x[xb + k] * load_w(wb + k);
    red[tid] = s;
    barrier();
    for (uint h = WG / 2; h > 0u; h >>= 1) {
        if (tid < h)
            red[tid] += red[tid + h];
        barrier();
    }
    if (tid == 0u)
        o[pc.o_off + m * pc.N + n] = red[0] + (pc.has_bias != 0u ? bias[pc.b_off + n] : 0.0);
}
