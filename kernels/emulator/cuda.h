// CPU emulation of the CUDA C++ that the kernels in kernels/cuda use, so the very same sources
// NVRTC compiles can be compiled by the host compiler and run in tests without a GPU.
//
// The model: a launch runs its blocks one after another on the calling host thread; the threads
// of a block are fibers scheduled by the Rust side (kernels/src/cuda/emulator), which switches
// between them only at synchronization points: __syncthreads() is a real barrier over the block
// and each warp shuffle is an exchange among the lanes its mask names. Between two such points
// the threads run one at a time, in an order the scheduler varies: thread by thread (ascending,
// descending, shuffled) or warp by warp, each warp running ahead to the next barrier. So a kernel
// that reads another thread's shared-memory write without a barrier between them, or overwrites
// what a slower warp has yet to read, sees a different value in some order.
//
// What this checks: arithmetic, indexing, shared-memory use across barriers, and shuffles. What
// it does not: timing, the GPU memory model (all memory is coherent host memory), or code that
// relies on a warp's lanes running in lockstep without a shuffle or barrier between them.
#pragma once

#include <cmath>
#include <math.h>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#define SWITCHYARD_EMULATION 1

#define __global__
#define __device__
#define __forceinline__ inline __attribute__((always_inline))
// Blocks run one at a time on one host thread, so a function-level static per host thread is
// exactly the shared memory of the block that thread is running (and launches on other host
// threads, such as concurrent tests, each have their own).
#define __shared__ static thread_local

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};

namespace emu {

// Where the running fiber is: its thread and block, and the launch's shape. Laid out as the Rust
// scheduler's `ThreadCtx`.
struct Thread {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
};

// The fiber running on this host thread, set by the scheduler before each resume.
extern thread_local const Thread* current;

inline unsigned int linear_thread() {
    const Thread& t = *current;
    return t.thread_idx.x + t.block_dim.x * (t.thread_idx.y + t.block_dim.y * t.thread_idx.z);
}

template <typename To, typename From> inline To bits(From v) {
    static_assert(sizeof(To) == sizeof(From), "same size");
    To out;
    std::memcpy(&out, &v, sizeof(To));
    return out;
}

// IEEE binary16 to binary32, exact (the twin of PTX cvt.f32.f16).
inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0) {
        // Zero or subnormal: man · 2^-24, exact in f32.
        return bits<float>(bits<uint32_t>((float)man * 5.9604644775390625e-8f) | sign);
    }
    if (exp == 31) return bits<float>(sign | 0x7f800000u | (man << 13));
    return bits<float>(sign | ((exp + 112u) << 23) | (man << 13));
}

// binary32 to binary16, rounding to nearest even (the twin of PTX cvt.rn.f16.f32).
inline uint16_t f32_to_f16(float f) {
    const uint32_t x = bits<uint32_t>(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);  // NaN stays NaN
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); // at or past 65520: infinity
    if (ax < 0x38800000u) {
        // Below the smallest normal (2^-14): a subnormal whose mantissa is |f| · 2^24 rounded to
        // nearest even (1024 is the smallest normal, which is its correct encoding too).
        return (uint16_t)(sign | (uint32_t)std::nearbyint(bits<float>(ax) * 16777216.0f));
    }
    uint32_t r = ax - 0x38000000u; // rebias the exponent from 127 to 15
    r += 0xfffu + ((r >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
}

// The kernel entry points this translation unit defines, found by name from the Rust side.
using Invoker = void (*)(void* const* params);
struct Entry {
    const char* name;
    Invoker invoke;
    std::vector<uint32_t> param_sizes;
};
std::vector<Entry>& registry();

template <typename F> struct Signature;
template <typename... A> struct Signature<void (*)(A...)> {
    template <void (*F)(A...), std::size_t... I> static void call(void* const* p, std::index_sequence<I...>) {
        F(*static_cast<A*>(p[I])...);
    }
    template <void (*F)(A...)> static void invoke(void* const* p) { call<F>(p, std::index_sequence_for<A...>{}); }
    static std::vector<uint32_t> sizes() { return {(uint32_t)sizeof(A)...}; }
};

// Adds an entry point to the registry at static initialization.
struct Registration {
    Registration(const char* name, Invoker invoke, std::vector<uint32_t> sizes) {
        registry().push_back(Entry{name, invoke, std::move(sizes)});
    }
};

} // namespace emu

// An entry point: an ordinary function the scheduler calls once per thread with its arguments
// (CUDA's kernelParams: one pointer per argument), registered under its name.
#define ENTRY_POINT(NAME, PARAMS)                                                                    \
    static void NAME PARAMS;                                                                         \
    static const emu::Registration NAME##_registration(                                              \
        #NAME, &emu::Signature<decltype(&NAME)>::invoke<&NAME>, emu::Signature<decltype(&NAME)>::sizes()); \
    static void NAME PARAMS

// The f16 conversions the prelude otherwise writes as inline PTX.
#define F16_TO_F32(h) emu::f16_to_f32(h)
#define F32_TO_F16(f) emu::f32_to_f16(f)

#define threadIdx (emu::current->thread_idx)
#define blockIdx (emu::current->block_idx)
#define blockDim (emu::current->block_dim)
#define gridDim (emu::current->grid_dim)

// Provided by the Rust scheduler: suspend this fiber until the block, or the shuffle's lanes,
// have all arrived.
extern "C" void switchyard_emu_syncthreads(void);
extern "C" uint32_t switchyard_emu_shfl(uint32_t value, int32_t src_lane, uint32_t mask);

inline void __syncthreads() { switchyard_emu_syncthreads(); }

inline float __shfl_xor_sync(unsigned int mask, float v, int lane_mask) {
    const int lane = (int)(emu::linear_thread() % 32);
    return emu::bits<float>(switchyard_emu_shfl(emu::bits<uint32_t>(v), lane ^ lane_mask, mask));
}

inline float __int_as_float(int v) { return emu::bits<float>(v); }
inline float __uint_as_float(unsigned int v) { return emu::bits<float>(v); }
inline unsigned int __float_as_uint(float v) { return emu::bits<unsigned int>(v); }
// CUDA's fast-math exponential is approximate; the emulation computes it exactly, well inside
// every kernel check's tolerance.
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline void emu_sincosf(float x, float* s, float* c) {
    *s = std::sin(x);
    *c = std::cos(x);
}
#define sincosf emu_sincosf

template <typename T> inline T min(T a, T b) { return b < a ? b : a; }
template <typename T> inline T max(T a, T b) { return a < b ? b : a; }
