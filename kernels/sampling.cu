// Token selection with the one definition of src/engine/sampling.rs (module docs), on the device.
//
// argmax_fwd: greedy rows. Per row, the argmax of the raw logits (lowest index on ties, -0.0
// equal to +0.0, exactly the CPU sampler's greedy rule) and its logprob in the raw distribution,
// logit[argmax] - log(sum(exp(logit))) = -log(sum(exp(logit - max))).
//
// sample_fwd: stochastic rows (temperature > 0), bit-exactly the host's sample_token. The
// definition's weights round(exp(d) * 2^52) need an exp that gives the same bits here and on the
// host; CUDA's exp and libm's do not promise that, so both sides use det_exp of
// src/engine/sampling_weight.rs, made of correctly rounded adds and multiplies only and spelled
// here with __dadd_rn / __dmul_rn, which the compiler never contracts into FMAs. Everything
// else is integers: 64-bit canonical keys, exact 128-bit weight sums (two u64 words), and the
// host's own reduction of the parameters (1/T, top-k count, p24 = round(top_p * 2^24),
// m = floor(u * 2^24)), so no float parameter is re-derived on the device.
//
// defines: argmax_fwd_<dt>(out[B] int, logprob[B] float, logits[B, ld], ld, vocab)
//   one block of 1024 threads per row. The sum is accumulated in f64 around the row max (NaN or
//   infinite logits make the logprob NaN; the host rejects such rows like the CPU sampler does).
// defines: sample_fwd_<dt>(out[B] int, logprob[B] float, logits[B, ld], ld, vocab,
//                          inv_t[B] double, params[B, 3] u32 = (top_k or 0, p24, m))
//   one block of 1024 threads per row; rows with inv_t == 0 (greedy) are left untouched. Writes
//   the drawn token and its raw logprob. Canonical order = ascending 64-bit keys
//   (~float_key(logit) << 32 | id, as sampling.rs's canonical_key); every selection is a
//   bisection over the key space with block-wide counts or weight sums: the top-k threshold (the
//   k-th key), the top-p threshold (smallest key whose prefix C satisfies C * 2^24 >= p24 * W) and
//   the draw (smallest key whose prefix C exceeds floor(m * N / 2^24)). Each takes at most 64
//   passes over the row, recomputing keys and weights instead of storing them.

#define ARGMAX_THREADS 1024

__device__ double block_sum_d(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ u64 block_max_u64(u64 v, u64* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        u64 y = __shfl_xor_sync(0xffffffffu, v, o);
        v = y > v ? y : v;
    }
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0ull;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        u64 y = __shfl_xor_sync(0xffffffffu, v, o);
        v = y > v ? y : v;
    }
    return v;
}

template <typename T>
__device__ void argmax_impl(int* out, float* logprob, const T* logits, long long ldl, int vocab) {
    __shared__ u64 scu[32];
    __shared__ double scd[32];
    const T* row = logits + (long long)blockIdx.x * ldl;
    // max of (key << 32 | ~index): the largest logit, then the lowest index; + 0.0f maps -0.0
    // to +0.0 so they tie as in the CPU comparison
    u64 best = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const u64 c = ((u64)float_key(ld(row + i) + 0.0f) << 32) | (u64)(0xffffffffu - (u32)i);
        best = c > best ? c : best;
    }
    best = block_max_u64(best, scu);
    const int amax = (int)(0xffffffffu - (u32)(best & 0xffffffffull));
    const double mx = (double)ld(row + amax);
    double s = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) s += exp((double)ld(row + i) - mx);
    s = block_sum_d(s, scd);
    if (threadIdx.x == 0) {
        out[blockIdx.x] = amax;
        logprob[blockIdx.x] = (float)(-log(s));
    }
}

#define ARGMAX_DEF(T, DT)                                                                     \
    extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)                               \
        argmax_fwd_##DT(int* out, float* lp, const T* logits, long long ldl, int vocab) {      \
        argmax_impl<T>(out, lp, logits, ldl, vocab);                                          \
    }
FOR_F32_BF16(ARGMAX_DEF)

// ---- stochastic sampling -------------------------------------------------------------------

#define SAMPLE_THREADS 1024

// The steps of det_exp (src/engine/sampling_weight.rs) in the same order, for d in [-40, 0]:
// k = round(d log2 e), r = d - k ln2_hi - k ln2_lo, Horner on the degree-13 Taylor polynomial,
// times 2^k from its exponent bits. Constants are bit patterns, like the host's.
__device__ double sample_exp(double d) {
    const double k = round(__dmul_rn(d, __longlong_as_double(0x3ff71547652b82fell)));
    double r = __dadd_rn(d, -__dmul_rn(k, __longlong_as_double(0x3fe62e42fee00000ll)));
    r = __dadd_rn(r, -__dmul_rn(k, __longlong_as_double(0x3dea39ef35793c76ll)));
    // 1/n! for n = 13 down to 0
    const long long c[14] = {0x3de6124613a86d09ll, 0x3e21eed8eff8d898ll, 0x3e5ae64567f544e4ll,
                             0x3e927e4fb7789f5cll, 0x3ec71de3a556c734ll, 0x3efa01a01a01a01all,
                             0x3f2a01a01a01a01all, 0x3f56c16c16c16c17ll, 0x3f81111111111111ll,
                             0x3fa5555555555555ll, 0x3fc5555555555555ll, 0x3fe0000000000000ll,
                             0x3ff0000000000000ll, 0x3ff0000000000000ll};
    double p = __longlong_as_double(c[0]);
#pragma unroll
    for (int n = 1; n < 14; ++n) p = __dadd_rn(__dmul_rn(p, r), __longlong_as_double(c[n]));
    return __dmul_rn(p, __longlong_as_double((long long)(1023 + (int)k) << 52));
}

// token_weight of sampling_weight.rs: d = (logit - max) * (1/T); 0 outside [-40, 0] (masked
// tokens, and whatever a NaN row produces).
__device__ __forceinline__ u64 sample_weight(float x, double mx, double inv_t) {
    const double d = __dmul_rn(__dadd_rn((double)x, -mx), inv_t);
    if (!(d >= -40.0 && d <= 0.0)) return 0ull;
    return (u64)round(__dmul_rn(sample_exp(d), 4503599627370496.0));
}

// canonical_key of sampling.rs: ascending keys = logit descending, then id ascending.
__device__ __forceinline__ u64 sample_key(float x, int i) {
    return ((u64)(~float_key(x + 0.0f)) << 32) | (u64)(u32)i;
}

// An exact unsigned 128-bit integer as two words. Weight sums stay below 2^83 (fewer than 2^31
// tokens of at most 2^52 each), which a u64 cannot hold for large vocabularies.
struct U128 {
    u64 hi, lo;
};

__device__ __forceinline__ U128 u128_add(U128 a, U128 b) {
    U128 r;
    r.lo = a.lo + b.lo;
    r.hi = a.hi + b.hi + (r.lo < a.lo ? 1ull : 0ull);
    return r;
}

// a * s for s <= 2^32: a.hi * s cannot overflow because a < 2^84.
__device__ __forceinline__ U128 u128_mul_small(U128 a, u64 s) {
    U128 r;
    r.lo = a.lo * s;
    r.hi = __umul64hi(a.lo, s) + a.hi * s;
    return r;
}

__device__ __forceinline__ U128 u128_shl24(U128 a) {
    U128 r;
    r.hi = (a.hi << 24) | (a.lo >> 40);
    r.lo = a.lo << 24;
    return r;
}

__device__ __forceinline__ U128 u128_shr24(U128 a) {
    U128 r;
    r.hi = a.hi >> 24;
    r.lo = (a.lo >> 24) | (a.hi << 40);
    return r;
}

__device__ __forceinline__ bool u128_gt(U128 a, U128 b) {
    return a.hi != b.hi ? a.hi > b.hi : a.lo > b.lo;
}

// Block-wide exact sum; every thread gets the total. scratch holds 64 words.
__device__ U128 block_sum_u128(U128 v, u64* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        U128 y;
        y.hi = __shfl_xor_sync(0xffffffffu, v.hi, o);
        y.lo = __shfl_xor_sync(0xffffffffu, v.lo, o);
        v = u128_add(v, y);
    }
    __syncthreads();  // the previous call's readers are done with scratch
    if (lane == 0) {
        scratch[2 * warp] = v.hi;
        scratch[2 * warp + 1] = v.lo;
    }
    __syncthreads();
    v.hi = lane < nw ? scratch[2 * lane] : 0ull;
    v.lo = lane < nw ? scratch[2 * lane + 1] : 0ull;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        U128 y;
        y.hi = __shfl_xor_sync(0xffffffffu, v.hi, o);
        y.lo = __shfl_xor_sync(0xffffffffu, v.lo, o);
        v = u128_add(v, y);
    }
    return v;
}

// Number of tokens with key <= t.
template <typename T>
__device__ u64 count_le(const T* row, int vocab, u64 t, u64* scratch) {
    U128 c = {0ull, 0ull};
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) c.lo += sample_key(ld(row + i), i) <= t;
    return block_sum_u128(c, scratch).lo;
}

// Sum of the weights of tokens with key <= t (t never above the top-k threshold, so these are
// candidates): C(n) for the n candidates up to key t.
template <typename T>
__device__ U128 weight_le(const T* row, int vocab, u64 t, double mx, double inv_t, u64* scratch) {
    U128 s = {0ull, 0ull};
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float x = ld(row + i);
        if (sample_key(x, i) <= t) {
            const u64 w = sample_weight(x, mx, inv_t);
            s.lo += w;
            s.hi += s.lo < w ? 1ull : 0ull;
        }
    }
    return block_sum_u128(s, scratch);
}

template <typename T>
__device__ void sample_impl(int* out, float* logprob, const T* logits, long long ldl, int vocab,
                            const double* inv_ts, const u32* params) {
    __shared__ u64 scu[64];
    __shared__ double scd[32];
    const double inv_t = inv_ts[blockIdx.x];
    if (inv_t == 0.0) return;  // greedy row (the whole block leaves, before any barrier)
    const u32 top_k = params[3 * blockIdx.x], p24 = params[3 * blockIdx.x + 1],
              m = params[3 * blockIdx.x + 2];
    const T* row = logits + (long long)blockIdx.x * ldl;

    // the smallest key (the best token) and the largest: the bisections' range
    u64 kmin = ~0ull, kmax = 0ull;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const u64 key = sample_key(ld(row + i), i);
        kmin = key < kmin ? key : kmin;
        kmax = key > kmax ? key : kmax;
    }
    kmin = ~block_max_u64(~kmin, scu);
    kmax = block_max_u64(kmax, scu);
    const double mx = (double)ld(row + (u32)kmin);

    // top-k: the k-th smallest key (keys are unique, so exactly k keys are <= it)
    u64 kth = kmax;
    if (top_k > 0 && top_k < (u32)vocab) {
        u64 lo = kmin, hi = kmax;
        while (lo < hi) {
            const u64 mid = lo + (hi - lo) / 2;
            if (count_le(row, vocab, mid, scu) >= top_k) hi = mid;
            else lo = mid + 1;
        }
        kth = lo;
    }
    const U128 total = weight_le(row, vocab, kth, mx, inv_t, scu);

    // top-p: the smallest key t with C(t) * 2^24 >= p24 * W; N = C(t)
    u64 pth = kth;
    U128 norm = total;
    if (p24 < (1u << 24)) {
        const U128 bound = u128_mul_small(total, p24);
        u64 lo = kmin, hi = kth;  // the predicate holds at hi, where C(hi) = norm
        while (lo < hi) {
            const u64 mid = lo + (hi - lo) / 2;
            const U128 c = weight_le(row, vocab, mid, mx, inv_t, scu);
            if (!u128_gt(bound, u128_shl24(c))) {
                hi = mid;
                norm = c;
            } else {
                lo = mid + 1;
            }
        }
        pth = lo;
    }

    // the draw: the smallest key t with C(t) > floor(m * N / 2^24)
    const U128 target = u128_shr24(u128_mul_small(norm, m));
    u64 lo = kmin, hi = pth;
    while (lo < hi) {
        const u64 mid = lo + (hi - lo) / 2;
        if (u128_gt(weight_le(row, vocab, mid, mx, inv_t, scu), target)) hi = mid;
        else lo = mid + 1;
    }
    const u32 tok = (u32)lo;

    // the raw logprob of the token, as argmax_fwd computes it for the best one
    double s = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) s += exp((double)ld(row + i) - mx);
    s = block_sum_d(s, scd);
    if (threadIdx.x == 0) {
        // a valid row always lands on a token; a NaN row may not (the host rejects it)
        const bool ok = tok < (u32)vocab;
        out[blockIdx.x] = ok ? (int)tok : -1;
        logprob[blockIdx.x] = ok ? (float)((double)ld(row + tok) - mx - log(s)) : __int_as_float(0x7fc00000);
    }
}

#define SAMPLE_DEF(T, DT)                                                                     \
    extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)                               \
        sample_fwd_##DT(int* out, float* lp, const T* logits, long long ldl, int vocab,         \
                        const double* inv_t, const u32* params) {                             \
        sample_impl<T>(out, lp, logits, ldl, vocab, inv_t, params);                           \
    }
FOR_F32_BF16(SAMPLE_DEF)
