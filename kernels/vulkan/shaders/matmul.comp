#version 450
// Tiled GEMM: out[M,N] = x[M,K] · w[N,K]^T (+ bias[N]). A 32x32 output tile
// per workgroup, 16x16 threads computing 2x2 each, K in slices of 16
// through shared memory. Weight dtype by -DW_F32 / -DW_F16 / -DW_BF16.
#extension GL_GOOGLE_include_directive : enable
#define WEIGHT_BINDING 1
#include "common.glsl"

layout(local_size_x = 16, local_size_y = 16) in;
layout(std430, binding = 0) readonly buffer XBuf { float x[]; };
layout(std430, binding = 2) readonly buffer BBuf { float bias[]; };
layout(std430, binding = 3) buffer OBuf { float o[]; };
layout(push_constant) uniform PC {
    uint M, N, K, x_off, w_off, b_off, o_off, has_bias;
} pc;

#define BM 32
#define BN 32
#define BK 16
shared float As[BK][BM + 1];
shared float Bs[BK][BN + 1];

void main() {
    uint tx = gl_LocalInvocationID.x, ty = gl_LocalInvocationID.y;
    uint tid = ty * 16u + tx;
    uint m0 = gl_WorkGroupID.y * BM, n0 = gl_WorkGroupID.x * BN;
    float acc00 = 0.0, acc01 = 0.0, acc10 = 0.0, acc11 = 0.0;
    for (uint k0 = 0u; k0 < pc.K; k0 += BK) {
        // 512 elements per tile, 2 per thread; consecutive threads walk K so
        // loads from a row are contiguous.
        for (uint r = 0u; r < 2u; r++) {
            uint e = tid + r * 256u;
            uint row = e / BK, kk = e % BK;
            uint gk = k0 + kk;
            uint gm = m0 + row, gn = n0 + row;
            As[kk][row] = (gm < pc.M && gk < pc.K) ? x[pc.x_off + gm * pc.K + gk] : 0.0;
            Bs[kk][row] = (gn < pc.N && gk < pc.K) ? load_w(pc.w_off + gn * pc.K + gk) : 0.0;
        }
        barrier();
        for (uint kk = 0u; kk < BK; kk++) {
            float a0 = As[kk][ty], a1 = As[kk][ty + 16u];
            float b0 = Bs[kk][tx], b1 = Bs[kk][tx + 16u];
            acc00 += a0 * b0;
            acc01 += a0 * b1;
            acc10 += a1 * b0;
            acc11 += a1 * b1;
        }
        barrier();
    }
    uint ma = m0 + ty, mb = m0 + ty + 16u, na = n0 + tx, nb = n0 + tx + 16u;
    float ba = 0.0, bb = 0.0;
    if (pc.has_bias != 0u) {
        ba = na < pc.N ? bias[pc.b_off + na] : 0.0;
        bb = nb < pc.N ? bias[pc.b_off + nb] : 0.0;
    }
    if (ma < pc.M && na < pc.N) o[pc.o_off + ma * pc.N + na] = acc00 + ba;
    if (ma < pc.M && nb < pc.N) o[pc.o_off + ma * pc.N + nb] = acc01 + bb;
    if (mb < pc.M && na < pc.N) o[pc.o_off + mb * pc.N + na] = acc10 + ba;
    if (mb < pc.M && nb < pc.N) o[pc.o_off + mb * pc.N + nb] = acc11 + bb;
}
