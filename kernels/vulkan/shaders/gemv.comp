#version 450
// GEMV for few rows of x (decode steps, small expert batches):
//   out[m, n] = x[m,:] · w[n,:] (+ bias[n])   for M <= NT rows of x.
// A workgroup computes NR consecutive outputs n for all NT rows m of one
// token block (z), so each weight element is read once for every row of x
// (the 2..16-row path: batched decode and expert batches cost one pass over
// the weights, not one per row). The 64 threads stride over K, 8 elements at
// a time with 16-byte loads (two vec4 of f32, or one uvec4 of 8 halves) when
// K and the offsets allow it, else element by element; the NT*NR partial sums
// are reduced with subgroupAdd and one shared-memory step across subgroups
// (SUBGROUP variants, used when the device has subgroup arithmetic in
// compute), or by a shared-memory tree.
// Grid: n / NR over x (and y when split), token blocks of NT over z.
#extension GL_GOOGLE_include_directive : enable
#ifdef SUBGROUP
#extension GL_KHR_shader_subgroup_basic : enable
#extension GL_KHR_shader_subgroup_arithmetic : enable
#endif
#define WEIGHT_BINDING 1
#include "common.glsl"

#define WG 64
#ifndef NT
#define NT 1
#endif
#if NT == 1
#define NR 4
#else
#define NR 2
#endif
#define NV (NT * NR)

layout(local_size_x = WG) in;
layout(std430, binding = 0) readonly buffer XBuf { float x[]; };
layout(std430, binding = 0) readonly buffer XBuf4 { vec4 x4[]; };
layout(std430, binding = 2) readonly buffer BBuf { float bias[]; };
layout(std430, binding = 3) buffer OBuf { float o[]; };
layout(push_constant) uniform PC {
    uint M, N, K, x_off, w_off, b_off, o_off, has_bias;
} pc;

// 8 weights starting at element 8*i8 (aligned), widened to f32.
#if defined(W_F32)
layout(std430, binding = 1) readonly buffer WBuf8 { vec4 w8[]; };
void load_w8(uint i8, out vec4 a, out vec4 b) {
    a = w8[2u * i8];
    b = w8[2u * i8 + 1u];
}
#else
layout(std430, binding = 1) readonly buffer WBuf8 { uvec4 w8[]; };
#if defined(W_F16)
void load_w8(uint i8, out vec4 a, out vec4 b) {
    uvec4 u = w8[i8];
    a = vec4(unpackHalf2x16(u.x), unpackHalf2x16(u.y));
    b = vec4(unpackHalf2x16(u.z), unpackHalf2x16(u.w));
}
#else
vec2 bf2(uint u) { return vec2(uintBitsToFloat(u << 16), uintBitsToFloat(u & 0xffff0000u)); }
void load_w8(uint i8, out vec4 a, out vec4 b) {
    uvec4 u = w8[i8];
    a = vec4(bf2(u.x), bf2(u.y));
    b = vec4(bf2(u.z), bf2(u.w));
}
#endif
#endif

// [value][subgroup] with subgroups (WG bounds their count), else [value][thread]
shared float red[NV][WG];

void main() {
    uint r0 = mm_group_id() * NR;
    uint tid = gl_LocalInvocationID.x;
    if (r0 >= pc.N) // uniform over the workgroup: safe before barrier()
        return;
    uint m0 = gl_WorkGroupID.z * NT;
    uint nt = min(uint(NT), pc.M - m0);
    float acc[NV];
    for (uint i = 0u; i < NV; i++)
        acc[i] = 0.0;

    // 16-byte loads need 8-element rows and offsets (x: 4 floats)
    if (((pc.K | pc.w_off) & 7u) == 0u && (pc.x_off & 3u) == 0u) {
        uint K8 = pc.K >> 3;
        for (uint k8 = tid; k8 < K8; k8 += WG) {
            for (uint r = 0u; r < NR; r++) {
                uint n = r0 + r;
                if (n >= pc.N)
                    break;
                vec4 wa, wb;
                load_w8((pc.w_off >> 3) + n * K8 + k8, wa, wb);
                for (uint t = 0u; t < NT; t++) {
                    if (t >= nt)
                        break;
                    uint xi = ((pc.x_off + (m0 + t) * pc.K) >> 2) + 2u * k8;
                    acc[t * NR + r] += dot(x4[xi], wa) + dot(x4[xi + 1u], wb);
                }
            }
        }
    } else {
        for (uint k = tid; k < pc.K; k += WG) {
            for (uint r = 0u; r < NR; r++) {
                uint n = r0 + r;
                if (n >= pc.N)
                    break;
                float wv = load_w(pc.w_off + n * pc.K + k);
                for (uint t = 0u; t < NT; t++) {
                    if (t >= nt)
                        break;
                    acc[t * NR + r] += x[pc.x_off + (m0 + t) * pc.K + k] * wv;
                }
            }
        }
    }

#ifdef SUBGROUP
    for (uint i = 0u; i < NV; i++) {
        float s = subgroupAdd(acc[i]);
        if (subgroupElect())
            red[i][gl_SubgroupID] = s;
    }
    barrier();
    if (tid < NV) {
        float s = 0.0;
        for (uint g = 0u; g < gl_NumSubgroups; g++)
            s += red[tid][g];
        acc[0] = s;
    }
#else
    for (uint i = 0u; i < NV; i++)
        red[i][tid] = acc[i];
    barrier();
    for (uint h = WG / 2; h > 0u; h >>= 1) {
        if (tid < h)
            for (uint i = 0u; i < NV; i++)
                red[i][tid] += red[i][tid + h];
        barrier();
    }
    if (tid < NV)
        acc[0] = red[tid][0];
#endif
    if (tid < NV) {
        uint t = tid / NR, n = r0 + tid % NR;
        if (t < nt && n < pc.N)
            o[pc.o_off + (m0 + t) * pc.N + n] =
                acc[0] + (pc.has_bias != 0u ? bias[pc.b_off + n] : 0.0);
    }
}
