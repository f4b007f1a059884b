// common.glsl — shared helpers of the medmoe compute shaders.
// Every buffer is bound at its root tensor's allocation; a tensor's first
// element is at an element offset passed in push constants (views need not
// be aligned). Widths are arbitrary: every load is guarded.

// Linear workgroup id when the host splits a large 1-D grid over x and y
// (maxComputeWorkGroupCount[0] may be as small as 65535).
uint mm_group_id() { return gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x; }

// Weight / table storage: f32 as floats, f16 and bf16 packed two per uint
// (read as uint pairs so no 16-bit storage feature is needed).
#ifdef WEIGHT_BINDING
#if defined(W_F32)
layout(std430, binding = WEIGHT_BINDING) readonly buffer WBuf { float wdata[]; };
float load_w(uint i) { return wdata[i]; }
#elif defined(W_F16)
layout(std430, binding = WEIGHT_BINDING) readonly buffer WBuf { uint wdata[]; };
float load_w(uint i) { return unpackHalf2x16(wdata[i >> 1])[i & 1u]; }
#elif defined(W_BF16)
layout(std430, binding = WEIGHT_BINDING) readonly buffer WBuf { uint wdata[]; };
float load_w(uint i) {
    uint u = wdata[i >> 1];
    return uintBitsToFloat((i & 1u) != 0u ? (u & 0xffff0000u) : (u << 16));
}
#else
#error "define W_F32, W_F16 or W_BF16"
#endif
#endif
