#version 450
// Causal attention over the KV cache, one workgroup per (token, head).
// Positions 0..pos are taken in chunks of WG: each thread scores one
// position, then the running max / sum / output (online softmax) are
// rescaled once per chunk. Each thread owns output dims d = tid + WG*r,
// so head_dim <= WG * MAX_DPT (the host checks it).
#extension GL_GOOGLE_include_directive : enable
#include "common.glsl"

#define WG 64
#define MAX_DPT 4
layout(local_size_x = WG) in;
layout(std430, binding = 0) readonly buffer QBuf { float q[]; };
layout(std430, binding = 1) readonly buffer KBuf { float kc[]; };
layout(std430, binding = 2) readonly buffer VBuf { float vc[]; };
layout(std430, binding = 3) readonly buffer SBuf { int seq[]; };
layout(std430, binding = 4) buffer OBuf { float o[]; };
layout(push_constant) uniform PC {
    uint T, n_heads, n_kv_heads, head_dim, n_slots, max_ctx, q_off, k_off, v_off, s_off, o_off;
    float scale;
} pc;

shared float qs[WG * MAX_DPT];
shared float sc[WG];

void main() {
    uint g = mm_group_id();
    if (g >= pc.T * pc.n_heads)
        return;
    uint tid = gl_LocalInvocationID.x;
    uint t = g / pc.n_heads, h = g % pc.n_heads;
    uint hd = pc.head_dim;
    uint kvh = h / (pc.n_heads / pc.n_kv_heads);
    uint kw = pc.n_kv_heads * hd;
    int slot = seq[pc.s_off + 2u * t], pos = seq[pc.s_off + 2u * t + 1u];
    uint qb = pc.q_off + t * pc.n_heads * hd + h * hd;
    for (uint d = tid; d < hd; d += WG)
        qs[d] = q[qb + d] * pc.scale;
    barrier();
    bool valid = slot >= 0 && uint(slot) < pc.n_slots && pos >= 0;
    uint n = valid ? min(uint(pos) + 1u, pc.max_ctx) : 0u;
    uint cb = valid ? uint(slot) * pc.max_ctx * kw + kvh * hd : 0u;
    float m = -3.402823466e38, l = 0.0;
    float acc[MAX_DPT];
    for (uint r = 0u; r < MAX_DPT; r++)
        acc[r] = 0.0;
    for (uint j0 = 0u; j0 < n; j0 += WG) { // n is uniform: barriers are safe
        uint j = j0 + tid;
        float s = -3.402823466e38;
        if (j < n) {
            uint kb = pc.k_off + cb + j * kw;
            s = 0.0;
            for (uint d = 0u; d < hd; d++)
                s += qs[d] * kc[kb + d];
        }
        sc[tid] = s;
        barrier();
        uint cnt = min(uint(WG), n - j0);
        float cm = m;
        for (uint i = 0u; i < cnt; i++)
            cm = max(cm, sc[i]);
        float corr = exp(m - cm);
        l *= corr;
        for (uint r = 0u; r < MAX_DPT; r++)
            acc[r] *= corr;
        for (uint i = 0u; i < cnt; i++) {
            float p = exp(sc[i] - cm);
            l += p;
            uint vb = pc.v_off + cb + (j0 + i) * kw;
            for (uint r = 0u; r < MAX_DPT; r++) {
                uint d = tid + r * WG;
                if (d < hd)
                    acc[r] += p * vc[vb + d];
            }
        }
        m = cm;
        barrier(); // all threads have read sc before the next chunk writes it
    }
    uint ob = pc.o_off + t * pc.n_heads * hd + h * hd;
    for (uint r = 0u; r < MAX_DPT; r++) {
        uint d = tid + r * WG;
        if (d < hd)
            o[ob + d] = l > 0.0 ? acc[r] / l : 0.0;
    }
}
