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
//   (~float_key(logit) << 32 | id, as sampling.rs's canonical_key); every selection is a 256-way
//   search over the key space with exact bucketed counts or weight sums (key_search): the top-k
//   threshold (the k-th key), the top-p threshold (smallest key whose prefix C satisfies
//   C * 2^24 >= p24 * W) and the draw (smallest key whose prefix C exceeds floor(m * N / 2^24)).
//   Each takes at most 8 passes over the row, recomputing keys and weights instead of storing
//   them. Any block size that is a multiple of 32 up to 1024 works (the launcher gives small
//   vocabularies fewer threads).
// defines: sample_exp_fwd(out[n] double, d[n] double, n): the shared exp alone, for the test
//   that its bits equal the host's.

#define ARGMAX_THREADS 1024

__device__ double block_sum_d(double v, double* scratch) {
    return block_reduce(v, scratch, 0.0, [](double x) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
        return x;
    });
}

__device__ u64 block_max_u64(u64 v, u64* scratch) {
    return block_reduce(v, scratch, 0ull, [](u64 x) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            u64 y = __shfl_xor_sync(0xffffffffu, x, o);
            x = y > x ? y : x;
        }
        return x;
    });
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

// det_exp element-wise, so a test can check bit for bit that the device computes the host's
// exp (over [-708, 0]; the draw only needs [-40, 0]).
extern "C" __global__ void sample_exp_fwd(double* out, const double* d, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = sample_exp(d[i]);
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

// Exact sum over the warp; every lane gets the total (two shuffles per step: U128 is two words).
__device__ __forceinline__ U128 warp_sum_u128(U128 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        U128 y;
        y.hi = __shfl_xor_sync(0xffffffffu, v.hi, o);
        y.lo = __shfl_xor_sync(0xffffffffu, v.lo, o);
        v = u128_add(v, y);
    }
    return v;
}

// Block-wide exact sum; every thread gets the total. scratch holds 64 words.
__device__ U128 block_sum_u128(U128 v, u64* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum_u128(v);
    __syncthreads();  // the previous call's readers are done with scratch
    if (lane == 0) {
        scratch[2 * warp] = v.hi;
        scratch[2 * warp + 1] = v.lo;
    }
    __syncthreads();
    v.hi = lane < nw ? scratch[2 * lane] : 0ull;
    v.lo = lane < nw ? scratch[2 * lane + 1] : 0ull;
    return warp_sum_u128(v);
}

__device__ __forceinline__ bool u128_ge(U128 a, U128 b) { return !u128_gt(b, a); }

// Sum of the weights of tokens with key <= t: C(n) for the n candidates up to key t when t is
// at most the top-k threshold.
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

#define SAMPLE_BUCKETS 256

// Shared state of one search: 256 buckets of 128-bit sums and the narrowed range.
struct SampleSearch {
    u64 hi[SAMPLE_BUCKETS], lo[SAMPLE_BUCKETS];
    u64 range_lo, range_hi;
    U128 base, at;
};

// The smallest key t in [lo, hi] with S(t) >= limit, where S(t) sums over the tokens with
// key <= t either 1 (count: the top-k rank) or the weight; the caller guarantees S(hi) >= limit
// and that no key above hi is a candidate. Returns t and sets *sum = S(t). A 256-way search:
// each pass spreads the keys of the current range over 256 equal buckets (exact 128-bit sums:
// a 64-bit shared atomicAdd on the low word, a carry into the high word when it wraps), one
// thread scans the buckets for the first where S crosses the limit, and the range shrinks to
// that bucket: 8 bits of key per pass, at most 8 passes, each the same integers whatever the
// order of the atomics.
template <typename T>
__device__ u64 key_search(const T* row, int vocab, u64 lo, u64 hi, U128 limit, bool count,
                          double mx, double inv_t, SampleSearch* sh, U128* sum) {
    U128 base = {0ull, 0ull};  // S(lo - 1): the tokens below the range
    for (;;) {
        int shift = 0;
        while (((hi - lo) >> shift) >= SAMPLE_BUCKETS) ++shift;
        const int nb = (int)((hi - lo) >> shift) + 1;
        for (int b = threadIdx.x; b < nb; b += blockDim.x) sh->hi[b] = sh->lo[b] = 0ull;
        __syncthreads();
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float x = ld(row + i);
            const u64 key = sample_key(x, i);
            if (key < lo || key > hi) continue;
            const u64 w = count ? 1ull : sample_weight(x, mx, inv_t);
            if (w == 0) continue;
            const int b = (int)((key - lo) >> shift);
            const u64 old = atomicAdd(&sh->lo[b], w);
            if (old + w < old) atomicAdd(&sh->hi[b], 1ull);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            U128 cum = base, prev = base;
            int b = 0;
            for (; b < nb; ++b) {
                prev = cum;
                U128 bucket;
                bucket.hi = sh->hi[b];
                bucket.lo = sh->lo[b];
                cum = u128_add(cum, bucket);
                // the last bucket when nothing crosses: only rows the host rejects get there
                if (u128_ge(cum, limit) || b == nb - 1) break;
            }
            const u64 start = lo + ((u64)b << shift);
            sh->range_lo = start;
            const u64 width = (1ull << shift) - 1;  // the bucket's keys beyond its first
            sh->range_hi = hi - start > width ? start + width : hi;  // no overflow near 2^64
            sh->base = prev;
            sh->at = cum;
        }
        __syncthreads();
        lo = sh->range_lo;
        hi = sh->range_hi;
        base = sh->base;
        if (shift == 0) {
            *sum = sh->at;
            return lo;
        }
        // thread 0 rewrites sh only after the next pass's two barriers, so these reads are safe
    }
}

template <typename T>
__device__ void sample_impl(int* out, float* logprob, const T* logits, long long ldl, int vocab,
                            const double* inv_ts, const u32* params) {
    __shared__ u64 scu[64];
    __shared__ double scd[32];
    __shared__ SampleSearch sh;
    const double inv_t = inv_ts[blockIdx.x];
    if (inv_t == 0.0) return;  // greedy row (the whole block leaves, before any barrier)
    const u32 top_k = params[3 * blockIdx.x], p24 = params[3 * blockIdx.x + 1],
              m = params[3 * blockIdx.x + 2];
    const T* row = logits + (long long)blockIdx.x * ldl;

    // the smallest key (the best token) and the largest: the searches' range
    u64 kmin = ~0ull, kmax = 0ull;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const u64 key = sample_key(ld(row + i), i);
        kmin = key < kmin ? key : kmin;
        kmax = key > kmax ? key : kmax;
    }
    kmin = ~block_max_u64(~kmin, scu);
    kmax = block_max_u64(kmax, scu);
    const double mx = (double)ld(row + (u32)kmin);

    U128 found;
    // top-k: the k-th smallest key (keys are unique, so exactly k keys are <= it)
    u64 kth = kmax;
    if (top_k > 0 && top_k < (u32)vocab) {
        const U128 k = {0ull, (u64)top_k};
        kth = key_search(row, vocab, kmin, kmax, k, true, mx, inv_t, &sh, &found);
    }
    const U128 total = weight_le(row, vocab, kth, mx, inv_t, scu);

    // top-p: the smallest key t with C(t) * 2^24 >= p24 * W, i.e. C(t) >= ceil(p24 * W / 2^24);
    // N = C(t)
    u64 pth = kth;
    U128 norm = total;
    if (p24 < (1u << 24)) {
        const U128 round_up = {0ull, (1ull << 24) - 1};
        const U128 limit = u128_shr24(u128_add(u128_mul_small(total, p24), round_up));
        pth = key_search(row, vocab, kmin, kth, limit, false, mx, inv_t, &sh, &norm);
    }

    // the draw: the smallest key t with C(t) > floor(m * N / 2^24), i.e. C(t) >= that + 1
    const U128 one = {0ull, 1ull};
    const U128 target = u128_add(u128_shr24(u128_mul_small(norm, m)), one);
    const u32 tok = (u32)key_search(row, vocab, kmin, pth, target, false, mx, inv_t, &sh, &found);

    // the raw logprob of the token, as argmax_fwd computes it for the best one
    double s = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) s += exp((double)ld(row + i) - mx);
    s = block_sum_d(s, scd);
    if (threadIdx.x == 0) {
        // a valid row always lands on a token; a NaN row may not (the host rejects it)
        const bool ok = tok < (u32)vocab;
        out[blockIdx.x] = ok ? (int)tok : -1;
        logprob[blockIdx.x] =
            ok ? (float)((double)ld(row + tok) - mx - log(s)) : __int_as_float(0x7fc00000);
    }
}

#define SAMPLE_DEF(T, DT)                                                                     \
    extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)                               \
        sample_fwd_##DT(int* out, float* lp, const T* logits, long long ldl, int vocab,         \
                        const double* inv_t, const u32* params) {                             \
        sample_impl<T>(out, lp, logits, ldl, vocab, inv_t, params);                           \
    }
FOR_F32_BF16(SAMPLE_DEF)
