// Fused LoRA pieces around the rank-r intermediate (LoRA is memory bound on the activations,
// so each activation tensor is read once per kernel and the tiny f32 adapter weights stay in
// L1/L2). With A [r, K] and B [J, r] (PEFT layout, f32 master weights) and s = alpha / r:
//   forward   h = x A^T              (lora_shrink_fwd, scale 1, W = A: wk = K, wj = 1)
//             y += s h B^T           (lora_expand_fwd, W = B: wj = r, wk = 1)
//   backward  dh = s dy B            (lora_shrink_fwd on dy, W = B: wk = 1, wj = r)
//             dx += dh A             (lora_expand_fwd, W = A: wj = 1, wk = K)
//             dA += dh^T x           (lora_wgrad_bwd, u = dh, v = x, out stride (K, 1))
//             dB += s dy^T h         (lora_wgrad_bwd, u = h, v = dy, out stride (1, r))
//
// defines: lora_shrink_fwd_<dt>(h[N,r] f32, x[N,K] T, W f32, wk, wj, N, K, r, s)
//            h[n,k] = s * sum_j x[n,j] W[k*wk + j*wj]; grid ceil(N/4), block 256
//          lora_expand_fwd_<dt>(y[N,J] T, h[N,r] f32, W f32, wj, wk, N, J, r, s)
//            y[n,j] += s * sum_k h[n,k] W[j*wj + k*wk]; grid (ceil(J/256), ceil(N/8)), block 256,
//            r <= 256
//          lora_wgrad_bwd_<dt>(dW f32, u[N,r] f32, v[N,J] T, ok, oj, N, J, r, s)
//            dW[k*ok + j*oj] += s * sum_n u[n,k] v[n,j]; grid (ceil(J/256), ceil(r/8),
//            ceil(N/512)), block 256, atomics across the N splits

#define LORA_SHRINK_ROWS 4
#define LORA_EXPAND_ROWS 8
#define LORA_MAX_R 256
#define LORA_WGRAD_K 8
#define LORA_WGRAD_NCHUNK 512

template <typename T>
__device__ void lora_shrink_impl(float* h, const T* x, const float* w, long long wk, long long wj,
                                 int n, int kdim, int r, float s) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nwarps = blockDim.x >> 5;
    const int n0 = blockIdx.x * LORA_SHRINK_ROWS;
    for (int k = warp; k < r; k += nwarps) {
        float acc[LORA_SHRINK_ROWS];
#pragma unroll
        for (int i = 0; i < LORA_SHRINK_ROWS; ++i) acc[i] = 0.0f;
        const float* wrow = w + (long long)k * wk;
        for (int j = lane; j < kdim; j += 32) {
            const float wv = wrow[(long long)j * wj];
#pragma unroll
            for (int i = 0; i < LORA_SHRINK_ROWS; ++i)
                if (n0 + i < n) acc[i] = fmaf(ld(x + (long long)(n0 + i) * kdim + j), wv, acc[i]);
        }
#pragma unroll
        for (int i = 0; i < LORA_SHRINK_ROWS; ++i) {
            const float v = warp_sum(acc[i]);
            if (lane == 0 && n0 + i < n) h[(long long)(n0 + i) * r + k] = v * s;
        }
    }
}

template <typename T>
__device__ void lora_expand_impl(T* y, const float* h, const float* w, long long wj, long long wk,
                                 int n, int jdim, int r, float s) {
    __shared__ float hs[LORA_EXPAND_ROWS][LORA_MAX_R];
    const int n0 = blockIdx.y * LORA_EXPAND_ROWS;
    for (int idx = threadIdx.x; idx < LORA_EXPAND_ROWS * r; idx += blockDim.x) {
        const int i = idx / r, k = idx - i * r;
        hs[i][k] = (n0 + i < n) ? h[(long long)(n0 + i) * r + k] : 0.0f;
    }
    __syncthreads();
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= jdim) return;
    float acc[LORA_EXPAND_ROWS];
#pragma unroll
    for (int i = 0; i < LORA_EXPAND_ROWS; ++i) acc[i] = 0.0f;
    const float* wrow = w + (long long)j * wj;
    for (int k = 0; k < r; ++k) {
        const float wv = wrow[(long long)k * wk];
#pragma unroll
        for (int i = 0; i < LORA_EXPAND_ROWS; ++i) acc[i] = fmaf(hs[i][k], wv, acc[i]);
    }
#pragma unroll
    for (int i = 0; i < LORA_EXPAND_ROWS; ++i) {
        if (n0 + i < n) {
            T* p = y + (long long)(n0 + i) * jdim + j;
            st(p, ld(p) + s * acc[i]);
        }
    }
}

template <typename T>
__device__ void lora_wgrad_impl(float* dw, const float* u, const T* v, long long ok, long long oj,
                                int n, int jdim, int r, float s) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int k0 = blockIdx.y * LORA_WGRAD_K;
    const int nbeg = blockIdx.z * LORA_WGRAD_NCHUNK;
    const int nend = min(n, nbeg + LORA_WGRAD_NCHUNK);
    if (j >= jdim) return;
    float acc[LORA_WGRAD_K];
#pragma unroll
    for (int i = 0; i < LORA_WGRAD_K; ++i) acc[i] = 0.0f;
    for (int t = nbeg; t < nend; ++t) {
        const float vv = ld(v + (long long)t * jdim + j);
        const float* urow = u + (long long)t * r + k0;
#pragma unroll
        for (int i = 0; i < LORA_WGRAD_K; ++i)
            if (k0 + i < r) acc[i] = fmaf(urow[i], vv, acc[i]);
    }
#pragma unroll
    for (int i = 0; i < LORA_WGRAD_K; ++i)
        if (k0 + i < r) atomicAdd(dw + (long long)(k0 + i) * ok + (long long)j * oj, s * acc[i]);
}

#define LORA_DEF(T, DT)                                                                          \
    extern "C" __global__ void lora_shrink_fwd_##DT(float* h, const T* x, const float* w,       \
                                                    long long wk, long long wj, int n, int k,   \
                                                    int r, float s) {                            \
        lora_shrink_impl<T>(h, x, w, wk, wj, n, k, r, s);                                        \
    }                                                                                            \
    extern "C" __global__ void lora_expand_fwd_##DT(T* y, const float* h, const float* w,       \
                                                    long long wj, long long wk, int n, int j,   \
                                                    int r, float s) {                            \
        lora_expand_impl<T>(y, h, w, wj, wk, n, j, r, s);                                        \
    }                                                                                            \
    extern "C" __global__ void lora_wgrad_bwd_##DT(float* dw, const float* u, const T* v,       \
                                                   long long ok, long long oj, int n, int j,    \
                                                   int r, float s) {                             \
        lora_wgrad_impl<T>(dw, u, v, ok, oj, n, j, r, s);                                        \
    }
FOR_F32_BF16(LORA_DEF)
