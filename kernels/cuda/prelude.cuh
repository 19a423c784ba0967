// Shared by every kernel source: numeric types and helpers. Prepended to each .cu file before
// NVRTC compiles it, so the kernels need no CUDA toolkit headers. The CPU emulation
// (kernels/emulator/cuda.h) includes it too, after defining the hooks below its own way.

#ifndef ENTRY_POINT
// A kernel the driver finds by its unmangled name.
#define ENTRY_POINT(NAME, PARAMS) extern "C" __global__ void NAME PARAMS
#endif

#ifndef F16_TO_F32
__device__ __forceinline__ float f16_to_f32_ptx(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short f32_to_f16_ptx(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#define F16_TO_F32(h) f16_to_f32_ptx(h)
#define F32_TO_F16(f) f32_to_f16_ptx(f)
#endif

typedef unsigned short u16;
typedef unsigned long long u64;

#define NEG_INF __int_as_float(0xff800000)

// Element types: storage type T, conversion to and from f32 (all arithmetic is f32).
struct F32 {
    typedef float T;
    static __device__ __forceinline__ float load(float v) { return v; }
    static __device__ __forceinline__ float store(float v) { return v; }
};
struct BF16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(u16 v) { return __uint_as_float(((unsigned int)v) << 16); }
    // Round to nearest even, NaN kept quiet.
    static __device__ __forceinline__ u16 store(float f) {
        unsigned int u = __float_as_uint(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)0x7fc0;
        u += 0x7fffu + ((u >> 16) & 1u);
        return (u16)(u >> 16);
    }
};
struct F16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(u16 h) { return F16_TO_F32(h); }
    static __device__ __forceinline__ u16 store(float f) { return F32_TO_F16(f); }
};

// Elements of type T in one 16-byte vector load.
template <typename D> struct Vec {
    static const int N = 16 / sizeof(typename D::T);
    // Loads N elements from a 16-byte aligned address and widens them to f32.
    static __device__ __forceinline__ void load(const typename D::T* p, float* out) {
        uint4 raw = *reinterpret_cast<const uint4*>(p);
        const typename D::T* e = reinterpret_cast<const typename D::T*>(&raw);
#pragma unroll
        for (int k = 0; k < N; ++k) out[k] = D::load(e[k]);
    }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Instantiates `extern "C"` entry points NAME_f32, NAME_bf16 and NAME_f16 of a templated kernel
// body NAME<D>(args...).
#define INSTANTIATE(NAME, PARAMS, ARGS)                  \
    ENTRY_POINT(NAME##_f32, PARAMS) { NAME<F32> ARGS; }   \
    ENTRY_POINT(NAME##_bf16, PARAMS) { NAME<BF16> ARGS; } \
    ENTRY_POINT(NAME##_f16, PARAMS) { NAME<F16> ARGS; }
