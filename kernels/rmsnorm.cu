// Fused RMSNorm, forward and backward (HF Qwen2/Llama semantics: y = x * rstd * w, where
// rstd = 1 / sqrt(mean(x^2) + eps), computed in f32).
//
// defines: rmsnorm_fwd_<dt>(out[N,D], rstd[N] f32, x, w[D], eps, N, D, per, ld)
//          rmsnorm_bwd_<dt>(dx, dout[N,D], x, w[D], rstd[N], N, D, per, ld)
// x (and dx) hold row i at (i / per) * ld + (i % per) * D: `per` rows side by side in lines
// `ld` apart, e.g. the q heads of the fused q|k|v projection (per = heads, ld = its width), so
// Qwen3's q/k norms read the projection and write its gradient in place; per = 1, ld = D is a
// compact [N, D] tensor. out and dout are always compact.
// One block per row; the row is read once into registers-through-L1 and reduced with warp
// shuffles. The backward only produces dx: base weights (w) are frozen.
//   dx_i = rstd * (w_i g_i - x_i * rstd^2 * mean_j(w_j g_j x_j))

template <typename T>
__device__ void rmsnorm_fwd_impl(T* out, float* rstd_out, const T* x, const T* w, float eps,
                                 int n, int d, int per, long long ldx) {
    __shared__ float scratch[32];
    int row = blockIdx.x;
    if (row >= n) return;
    const T* xr = x + (long long)(row / per) * ldx + (long long)(row % per) * d;
    T* yr = out + (long long)row * d;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = ld(xr + j);
        ss = fmaf(v, v, ss);
    }
    ss = block_sum(ss, scratch);
    float rstd = rsqrtf(ss / (float)d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        // Round x*rstd to T before the weight multiply, as HF does (hidden.to(dtype) * weight).
        float normed = ld(xr + j) * rstd;
        T tmp;
        st(&tmp, normed);
        st(yr + j, ld(&tmp) * ld(w + j));
    }
    if (threadIdx.x == 0 && rstd_out != nullptr) rstd_out[row] = rstd;
}

template <typename T>
__device__ void rmsnorm_bwd_impl(T* dx, const T* dout, const T* x, const T* w, const float* rstd,
                                 int n, int d, int per, long long ldx) {
    __shared__ float scratch[32];
    int row = blockIdx.x;
    if (row >= n) return;
    const long long xo = (long long)(row / per) * ldx + (long long)(row % per) * d;
    const T* xr = x + xo;
    const T* gr = dout + (long long)row * d;
    T* dxr = dx + xo;
    float r = rstd[row];
    float dot = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        dot = fmaf(ld(gr + j) * ld(w + j), ld(xr + j), dot);
    }
    dot = block_sum(dot, scratch);
    float c = dot * r * r / (float)d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float wg = ld(gr + j) * ld(w + j);
        st(dxr + j, r * (wg - ld(xr + j) * c));
    }
}

#define RMSNORM_DEF(T, DT)                                                                      \
    extern "C" __global__ void rmsnorm_fwd_##DT(T* out, float* rstd, const T* x, const T* w,   \
                                                float eps, int n, int d, int per,               \
                                                long long ldx) {                                \
        rmsnorm_fwd_impl<T>(out, rstd, x, w, eps, n, d, per, ldx);                              \
    }                                                                                           \
    extern "C" __global__ void rmsnorm_bwd_##DT(T* dx, const T* dout, const T* x, const T* w,  \
                                                const float* rstd, int n, int d, int per,       \
                                                long long ldx) {                                \
        rmsnorm_bwd_impl<T>(dx, dout, x, w, rstd, n, d, per, ldx);                              \
    }
FOR_F32_BF16(RMSNORM_DEF)
