// Elementwise ops and reductions.
//
// defines: add_fwd_<dt> (out = a + b, residual adds; out may alias a or b),
//          scale_fwd_<dt> (x *= s in place), to_bf16_fwd_f32 / to_f32_fwd_bf16 (dtype casts),
//          sumsq_fwd_f32 (atomically adds sum(x^2) * 1 into out[0]: global grad-norm pieces),
//          acc_fwd_<dt> (y += x in place), bias_add_fwd_<dt> (y[r, c] += b[c], y [rows, cols]),
//          copy_cols_fwd_<dt> (dst[r, c] = c < copy ? src[r * src_ld + c] : 0 for c < dst_cols:
//          pads head_dim to a multiple of 32 for attention, and strips the padding again).
// All are memory bound: grid-stride loops; add uses 16-byte vector access when aligned.

template <typename T>
__device__ void add_impl(T* out, const T* a, const T* b, long long n) {
    map2_vec(out, a, b, n, [](float x, float y) { return x + y; });
}

template <typename T>
__device__ void scale_impl(T* x, float s, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        st(x + i, ld(x + i) * s);
    }
}

template <typename T>
__device__ void acc_impl(T* y, const T* x, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        st(y + i, ld(y + i) + ld(x + i));
    }
}

template <typename T>
__device__ void bias_add_impl(T* y, const T* b, long long n, int cols) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        st(y + i, ld(y + i) + ld(b + (int)(i % cols)));
    }
}

template <typename T>
__device__ void copy_cols_impl(T* dst, const T* src, long long rows, int src_ld, int dst_cols,
                               int copy) {
    const long long n = rows * dst_cols;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const long long r = i / dst_cols;
        const int c = (int)(i % dst_cols);
        dst[i] = c < copy ? src[r * src_ld + c] : T{};
    }
}

#define ELEMENTWISE_DEF(T, DT)                                                              \
    extern "C" __global__ void add_fwd_##DT(T* out, const T* a, const T* b, long long n) {   \
        add_impl<T>(out, a, b, n);                                                          \
    }                                                                                       \
    extern "C" __global__ void scale_fwd_##DT(T* x, float s, long long n) {                 \
        scale_impl<T>(x, s, n);                                                             \
    }                                                                                       \
    extern "C" __global__ void acc_fwd_##DT(T* y, const T* x, long long n) {                \
        acc_impl<T>(y, x, n);                                                               \
    }                                                                                       \
    extern "C" __global__ void bias_add_fwd_##DT(T* y, const T* b, long long n, int cols) { \
        bias_add_impl<T>(y, b, n, cols);                                                    \
    }                                                                                       \
    extern "C" __global__ void copy_cols_fwd_##DT(T* dst, const T* src, long long rows,     \
                                                  int src_ld, int dst_cols, int copy) {     \
        copy_cols_impl<T>(dst, src, rows, src_ld, dst_cols, copy);                          \
    }
FOR_F32_BF16(ELEMENTWISE_DEF)

extern "C" __global__ void to_bf16_fwd_f32(bf16* out, const float* x, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = f32_to_bf16(x[i]);
    }
}

extern "C" __global__ void to_f32_fwd_bf16(float* out, const bf16* x, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = bf16_to_f32(x[i]);
    }
}

// out[0] += sum(x^2). Each block reduces its grid-stride share in f32 and does one atomic,
// so a few hundred blocks cover any size with negligible atomic traffic.
extern "C" __global__ void sumsq_fwd_f32(float* out, const float* x, long long n) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float v = x[i];
        acc = fmaf(v, v, acc);
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) atomicAdd(out, acc);
}
