// emu_device.h - the CUDA device-language subset used by kernels/*.cu, mapped onto host C++20.
//
// Every generated kernel translation unit includes this header first, then kernels/common.cuh and
// one kernel file (with their __shared__ declarations rewritten by gen_kernels.py). Each CUDA
// thread runs as a fiber; threadIdx & co. read the fiber / block that is running right now, and
// __syncthreads / warp shuffles park the fiber until the scheduler releases it (see sched.cpp).
#pragma once

#include <cmath>
#include <math.h>  // expf, exp2f, fmaf, ... in the global namespace, as CUDA has them
#include <cstdint>
#include <cstring>
#include <type_traits>

// ---- qualifiers ---------------------------------------------------------------------------
#define __global__
#define __device__ static
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
// __shared__ declarations are rewritten by the generator; one that slips through must not compile.
#define __shared__ __shared___is_rewritten_by_gen_kernels_py
// Lets kernels/common.cuh pick the host form of the few intrinsics that are inline PTX on a GPU
// (the tensor-core MMA), which must then behave exactly as the PTX ISA specifies.
#define TWINKLE_CUDA_EMU 1

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(8) uint2 {
    unsigned x, y;
};

static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
    return uint4{x, y, z, w};
}
static inline float2 make_float2(float x, float y) { return float2{x, y}; }

// ---- the runtime side (implemented in sched.cpp) -------------------------------------------
#define EMU_EXPORT __attribute__((visibility("default")))

namespace emu {

// What a running CUDA thread can see. One per fiber; the scheduler keeps `cur` pointing at the
// fiber it resumed.
struct ThreadView {
    uint3 tid;
    uint3 bid;
    dim3 bdim;
    dim3 gdim;
};

EMU_EXPORT extern thread_local ThreadView* cur __attribute__((tls_model("initial-exec")));

// Parks the calling fiber at a block barrier (site = file:line of the call).
EMU_EXPORT void syncthreads(const char* file, int line);
// Parks at a warp barrier, publishing `val`; returns the value published by lane `src`.
// kind: 0 = __shfl_sync (src absolute), 1 = __shfl_xor_sync (src = lane ^ arg),
//       2 = __shfl_down_sync, 3 = __shfl_up_sync, 4 = __syncwarp (no data).
EMU_EXPORT uint64_t warp_exchange(unsigned mask, uint64_t val, int kind, int arg, int width, const char* file,
                       int line);
// Start of this block's dynamic shared memory (poisoned fresh for every block).
EMU_EXPORT void* dyn_smem();
// This block's instance of one static __shared__ variable (key = address of a per-declaration
// static), poisoned fresh for every block.
EMU_EXPORT void* static_smem(const void* key, std::size_t bytes, std::size_t align, const char* name);

template <typename T>
inline T shfl(unsigned mask, T v, int kind, int arg, int width, const char* file, int line) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a wide type");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = warp_exchange(mask, bits, kind, arg, width, file, line);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

}  // namespace emu

#define threadIdx (::emu::cur->tid)
#define blockIdx (::emu::cur->bid)
#define blockDim (::emu::cur->bdim)
#define gridDim (::emu::cur->gdim)
#define warpSize 32

#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ((void)::emu::warp_exchange(0xffffffffu, 0, 4, 0, 32, __FILE__, __LINE__))
#define __shfl_sync(mask, v, src, ...) \
    ::emu::shfl((mask), (v), 0, (src), emu_width_(__VA_ARGS__ + 0), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, lm, ...) \
    ::emu::shfl((mask), (v), 1, (lm), emu_width_(__VA_ARGS__ + 0), __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) \
    ::emu::shfl((mask), (v), 2, (d), emu_width_(__VA_ARGS__ + 0), __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) \
    ::emu::shfl((mask), (v), 3, (d), emu_width_(__VA_ARGS__ + 0), __FILE__, __LINE__)
static inline int emu_width_(int w) { return w == 0 ? 32 : w; }

// ---- bit casts and intrinsics ---------------------------------------------------------------
template <typename To, typename From>
static inline To emu_bits_(From f) {
    static_assert(sizeof(To) == sizeof(From));
    To t;
    std::memcpy(&t, &f, sizeof(To));
    return t;
}
static inline unsigned __float_as_uint(float f) { return emu_bits_<unsigned>(f); }
static inline int __float_as_int(float f) { return emu_bits_<int>(f); }
static inline float __uint_as_float(unsigned u) { return emu_bits_<float>(u); }
static inline float __int_as_float(int i) { return emu_bits_<float>(i); }
static inline long long __double_as_longlong(double d) { return emu_bits_<long long>(d); }
static inline double __longlong_as_double(long long v) { return emu_bits_<double>(v); }

// Double-precision intrinsics with IEEE round-to-nearest that the device never fuses into an
// FMA. g++ contracts a * b + c in C++ by default (and -mfma makes that one instruction), so the
// product passes through an empty asm the optimiser cannot see through: kernels/sampling.cu
// needs the same bits as the host's plain Rust arithmetic.
static inline double emu_opaque_(double x) {
#if defined(__x86_64__)
    __asm__("" : "+x"(x));
#elif defined(__aarch64__)
    __asm__("" : "+w"(x));
#else
    __asm__("" : "+m"(x));
#endif
    return x;
}
static inline double __dmul_rn(double a, double b) { return emu_opaque_(a * b); }
static inline double __dadd_rn(double a, double b) { return emu_opaque_(a + b); }
static inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}

// glibc declares some of these __names itself, so they are macros onto emu_ functions.
static inline float emu_expf_(float x) { return std::exp(x); }
static inline float emu_logf_(float x) { return std::log(x); }
static inline float emu_log2f_(float x) { return std::log2(x); }
static inline float emu_powf_(float x, float y) { return std::pow(x, y); }
static inline float emu_sinf_(float x) { return std::sin(x); }
static inline float emu_cosf_(float x) { return std::cos(x); }
static inline float emu_saturatef_(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
#define __expf(x) emu_expf_(x)
#define __logf(x) emu_logf_(x)
#define __log2f(x) emu_log2f_(x)
#define __powf(x, y) emu_powf_(x, y)
#define __sinf(x) emu_sinf_(x)
#define __cosf(x) emu_cosf_(x)
#define __fdividef(x, y) ((float)(x) / (float)(y))
#define __frcp_rn(x) (1.0f / (float)(x))
#define __saturatef(x) emu_saturatef_(x)
static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
static inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }

template <typename A, typename B>
static inline std::common_type_t<A, B> max(A a, B b) {
    using C = std::common_type_t<A, B>;
    return (C)a > (C)b ? (C)a : (C)b;
}
template <typename A, typename B>
static inline std::common_type_t<A, B> min(A a, B b) {
    using C = std::common_type_t<A, B>;
    return (C)a < (C)b ? (C)a : (C)b;
}

// ---- atomics (blocks may run on several OS threads) ----------------------------------------
static inline float atomicAdd(float* p, float v) {
    unsigned* u = reinterpret_cast<unsigned*>(p);
    unsigned old = __atomic_load_n(u, __ATOMIC_RELAXED);
    for (;;) {
        unsigned want = emu_bits_<unsigned>(emu_bits_<float>(old) + v);
        if (__atomic_compare_exchange_n(u, &old, want, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return emu_bits_<float>(old);
    }
}
static inline double atomicAdd(double* p, double v) {
    unsigned long long* u = reinterpret_cast<unsigned long long*>(p);
    unsigned long long old = __atomic_load_n(u, __ATOMIC_RELAXED);
    for (;;) {
        unsigned long long want = emu_bits_<unsigned long long>(emu_bits_<double>(old) + v);
        if (__atomic_compare_exchange_n(u, &old, want, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return emu_bits_<double>(old);
    }
}
template <typename T>
static inline std::enable_if_t<std::is_integral_v<T>, T> atomicAdd(T* p, T v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
template <typename T>
static inline std::enable_if_t<std::is_integral_v<T>, T> atomicMax(T* p, T v) {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v &&
           !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
template <typename T>
static inline std::enable_if_t<std::is_integral_v<T>, T> atomicExch(T* p, T v) {
    return __atomic_exchange_n(p, v, __ATOMIC_RELAXED);
}
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
