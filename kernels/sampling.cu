// Greedy decoding support: per row, the argmax of the raw logits (lowest index on ties, -0.0
// equal to +0.0, exactly the CPU sampler's greedy rule) and its logprob in the raw distribution,
// logit[argmax] - log(sum(exp(logit))) = -log(sum(exp(logit - max))).
//
// Stochastic sampling (temperature > 0) is NOT done here: its definition (src/engine/sampling.rs:
// integer weights round(exp((x - max) / T) * 2^52) summed exactly) needs f64 exp bit-identical to
// the host's, which CUDA's exp does not promise. The device returns the f32 logits of the rows
// that sample, and the host runs the one definition, so CPU and GPU pick the same token from the
// same draw by construction.
//
// defines: argmax_fwd_<dt>(out[B] int, logprob[B] float, logits[B, ld], ld, vocab)
//   one block of 1024 threads per row. The sum is accumulated in f64 around the row max (NaN or
//   infinite logits make the logprob NaN; the host rejects such rows like the CPU sampler does).

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
