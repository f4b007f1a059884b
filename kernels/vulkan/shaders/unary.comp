#version 450
// Elementwise unary ops, out may alias x. op: 0 gelu (erf), 1 gelu (tanh),
// 2 quick gelu, 3 silu (= mm_unary_op), 4 scale by f.
#extension GL_GOOGLE_include_directive : enable
#include "common.glsl"

layout(local_size_x = 256) in;
layout(std430, binding = 0) readonly buffer XBuf { float x[]; };
layout(std430, binding = 1) buffer OBuf { float o[]; };
layout(push_constant) uniform PC { uint n, x_off, o_off, op; float f; } pc;

// GLSL has no erf: Abramowitz & Stegun 7.1.26, |error| < 1.5e-7.
float erf_approx(float v) {
    float s = sign(v), a = abs(v);
    float t = 1.0 / (1.0 + 0.3275911 * a);
    float y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t +
                     0.254829592) * t * exp(-a * a);
    return s * y;
}

float sigmoid(float v) { return 1.0 / (1.0 + exp(-v)); }

void main() {
    uint i = mm_group_id() * 256u + gl_LocalInvocationID.x;
    if (i >= pc.n)
        return;
    float v = x[pc.x_off + i];
    float r;
    if (pc.op == 0u) {
        r = 0.5 * v * (1.0 + erf_approx(v * 0.70710678118654752));
    } else if (pc.op == 1u) {
        // clamp: some drivers' tanh overflows to NaN for large arguments
        float u = clamp(0.7978845608028654 * (v + 0.044715 * v * v * v), -15.0, 15.0);
        r = 0.5 * v * (1.0 + tanh(u));
    } else if (pc.op == 2u) {
        r = v * sigmoid(1.702 * v);
    } else if (pc.op == 3u) {
        r = v * sigmoid(v);
    } else {
        r = v * pc.f;
    }
    o[pc.o_off + i] = r;
}
