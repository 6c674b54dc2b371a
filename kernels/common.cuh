// Prelude prepended to every kernel file before NVRTC compiles it (no #include: NVRTC gets no
// include path, so the kernels build with nothing but libnvrtc).
//
// defines: bf16 (storage type, bit-level conversions), ld/st (load any dtype as f32, store f32 as
// any dtype), warp_sum/warp_max, block_reduce and block_sum/block_max, ordered keys for float
// comparisons, the TWINKLE_F32_BF16 macro that instantiates extern "C" entry points for both
// dtypes, map2_vec (the vectorised binary elementwise loop), seq_bounds (one packed sequence's
// clamped extent) and the tensor-core layer: mma_bf16_16816 (inline PTX on a GPU, warp shuffles
// under the CPU emulator) and pack_bf16x2.
//
// Conventions: activations and base weights are T (bf16 or f32), all accumulation is f32,
// indices are int (packed token counts fit in 2^31), shapes arrive as int.

typedef unsigned int u32;
#define NEG_INF_F __int_as_float(0xff800000)
#define POS_INF_F __int_as_float(0x7f800000)
typedef unsigned long long u64;

// bf16 as raw bits: a struct so overloads on bf16 differ from unsigned short.
struct bf16 {
    unsigned short bits;
};

__device__ __forceinline__ float bf16_to_f32(bf16 h) {
    return __uint_as_float(((u32)h.bits) << 16);
}

// Round to nearest even, NaN stays NaN (quiet): matches half::bf16::from_f32 on the CPU side.
__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    u32 x = __float_as_uint(f);
    bf16 r;
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (unsigned short)((x >> 16) | 0x0040u);
        return r;
    }
    u32 lsb = (x >> 16) & 1u;
    x += 0x7fffu + lsb;
    r.bits = (unsigned short)(x >> 16);
    return r;
}

__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const bf16* p) { return bf16_to_f32(*p); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(bf16* p, float v) { *p = f32_to_bf16(v); }

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

// Reduction over the whole block with the warp reduction `warp_op`; lanes past the last warp
// read `identity`. Every thread gets the result. `scratch` holds >= 32 values. Safe to call
// repeatedly with the same scratch (the leading barrier protects the reuse).
template <typename T, typename F>
__device__ __forceinline__ T block_reduce(T v, T* scratch, T identity, F warp_op) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_op(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < nwarps) ? scratch[lane] : identity;
    return warp_op(v);
}

// Sum over the whole block; every thread gets the result (see block_reduce).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    return block_reduce(v, scratch, 0.0f, [](float x) { return warp_sum(x); });
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    return block_reduce(v, scratch, NEG_INF_F, [](float x) { return warp_max(x); });
}

// Monotone map float -> u32: a < b (as floats, -0 == +0 aside) iff key(a) < key(b).
__device__ __forceinline__ u32 float_key(float f) {
    u32 x = __float_as_uint(f);
    return (x & 0x80000000u) ? ~x : (x | 0x80000000u);
}

__device__ __forceinline__ float key_float(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

#define LOG2E_F 1.4426950408889634f
#define LN2_F 0.6931471805599453f

// Entry-point instantiation: KERNEL_DEF(T, suffix) must be a macro that emits
// `extern "C" __global__ void name_<suffix>(...)` calling a template with T.
#define FOR_F32_BF16(KERNEL_DEF) KERNEL_DEF(float, f32) KERNEL_DEF(bf16, bf16)

// 16-byte vector access (4 f32 or 8 bf16 per load): the memory-bound kernels use it when every
// pointer is 16-byte aligned and fall back to scalar access otherwise (views at odd offsets).
template <typename T> struct Pack;
template <> struct Pack<float> { static constexpr int N = 4; };
template <> struct Pack<bf16> { static constexpr int N = 8; };

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<u64>(p) & 15ull) == 0;
}

__device__ __forceinline__ void ld16(const float* p, float* out) {
    float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
}

__device__ __forceinline__ void ld16(const bf16* p, float* out) {
    uint4 v = *reinterpret_cast<const uint4*>(p);
    u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ void st16(float* p, const float* in) {
    *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
}

__device__ __forceinline__ void st16(bf16* p, const float* in) {
    u32 w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        w[i] = (u32)f32_to_bf16(in[2 * i]).bits | ((u32)f32_to_bf16(in[2 * i + 1]).bits << 16);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// out[i] = f(a[i], b[i]) (f32 math) over a grid-stride loop, 16-byte vectors where all three
// pointers are aligned and scalars for the rest: the one copy of the binary elementwise loop
// (residual add). out may alias a or b: each element is read before it is written.
template <typename T, typename F>
__device__ __forceinline__ void map2_vec(T* out, const T* a, const T* b, long long n, F f) {
    constexpr int V = Pack<T>::N;
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long head = 0;
    if (aligned16(out) && aligned16(a) && aligned16(b)) {
        head = n / V * V;
        for (long long i = tid * V; i < head; i += stride * V) {
            float x[V], y[V];
            ld16(a + i, x);
            ld16(b + i, y);
#pragma unroll
            for (int j = 0; j < V; ++j) x[j] = f(x[j], y[j]);
            st16(out + i, x);
        }
    }
    for (long long i = head + tid; i < n; i += stride) st(out + i, f(ld(a + i), ld(b + i)));
}

// Start and length of packed sequence b (cu = cu_seqlens), clamped so that a malformed
// cu_seqlens can never index outside [0, ntok).
__device__ __forceinline__ void seq_bounds(const int* cu, int b, int ntok, int& seq0,
                                           int& seqlen) {
    const int seq_end = max(0, min(cu[b + 1], ntok));
    seq0 = max(0, min(cu[b], seq_end));
    seqlen = seq_end - seq0;
}

// Where a block of the tiled attention kernels starts (grid x = tile of `tile` rows, z =
// sequence): the sequence's clamped extent (seq_bounds) and the tile's first row `r0`. False when
// the tile starts past the sequence's end (the grid is sized for the longest one): the whole
// block then has nothing to do.
__device__ __forceinline__ bool tile_start(const int* cu, int ntok, int tile, int& seq0,
                                           int& seqlen, int& r0) {
    seq_bounds(cu, blockIdx.z, ntok, seq0, seqlen);
    r0 = blockIdx.x * tile;
    return r0 < seqlen;
}

// ---- tensor cores ------------------------------------------------------------------------------
// The one tensor-core instruction the kernels use: a warp-wide bf16 MMA with f32 accumulation,
// D[16x8] += A[16x16] * B[16x8] (PTX mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, sm_80+).
// Fragments follow the PTX ISA layout; with g = lane / 4 and t = lane % 4 each lane holds
//   a[0] = A[g][2t, 2t+1]    a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]  a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]    b[1] = B[2t+8, 2t+9][g]
//   d[0..1] = D[g][2t, 2t+1] d[2..3] = D[g+8][2t, 2t+1]
// (a pair is two bf16 in one u32, the lower column / row in the low half). All 32 lanes of the
// warp must execute it together. Under the CPU emulator (TWINKLE_CUDA_EMU) the same contract is
// met with warp shuffles, so a kernel's fragment bookkeeping is tested exactly as the GPU runs it.
#ifdef TWINKLE_CUDA_EMU
__device__ __forceinline__ float bf16_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }

__device__ inline void mma_bf16_16816(float* d, const u32* a, const u32* b) {
    const int lane = ((threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x) & 31;
    const int g = lane >> 2, t = lane & 3;
    for (int kq = 0; kq < 4; ++kq) {
        // row g's pairs live in lane 4g + kq; column n's pairs in lane 4n + kq
        const int sa = 4 * g + kq, sb0 = 8 * t + kq, sb1 = 8 * t + 4 + kq;
        const u32 a0 = __shfl_sync(0xffffffffu, a[0], sa), a1 = __shfl_sync(0xffffffffu, a[1], sa);
        const u32 a2 = __shfl_sync(0xffffffffu, a[2], sa), a3 = __shfl_sync(0xffffffffu, a[3], sa);
        const u32 c0 = __shfl_sync(0xffffffffu, b[0], sb0), c1 = __shfl_sync(0xffffffffu, b[1], sb0);
        const u32 e0 = __shfl_sync(0xffffffffu, b[0], sb1), e1 = __shfl_sync(0xffffffffu, b[1], sb1);
        // products of two bf16 are exact in f32, so only the summation order can differ from
        // the tensor core's (which the PTX ISA leaves unspecified)
        d[0] += bf16_lo(a0) * bf16_lo(c0) + bf16_hi(a0) * bf16_hi(c0) + bf16_lo(a2) * bf16_lo(c1) +
                bf16_hi(a2) * bf16_hi(c1);
        d[1] += bf16_lo(a0) * bf16_lo(e0) + bf16_hi(a0) * bf16_hi(e0) + bf16_lo(a2) * bf16_lo(e1) +
                bf16_hi(a2) * bf16_hi(e1);
        d[2] += bf16_lo(a1) * bf16_lo(c0) + bf16_hi(a1) * bf16_hi(c0) + bf16_lo(a3) * bf16_lo(c1) +
                bf16_hi(a3) * bf16_hi(c1);
        d[3] += bf16_lo(a1) * bf16_lo(e0) + bf16_hi(a1) * bf16_hi(e0) + bf16_lo(a3) * bf16_lo(e1) +
                bf16_hi(a3) * bf16_hi(e1);
    }
}
#else
__device__ __forceinline__ void mma_bf16_16816(float* d, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// Two f32 as one bf16 pair (x in the low half), the A-fragment form of an accumulator pair.
__device__ __forceinline__ u32 pack_bf16x2(float x, float y) {
    return (u32)f32_to_bf16(x).bits | ((u32)f32_to_bf16(y).bits << 16);
}
