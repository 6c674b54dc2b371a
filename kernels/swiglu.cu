// SwiGLU on the fused gate|up projection: out = silu(gate) * up, forward and backward (f32
// math, any dtype storage). One GEMM produces gu [rows, 2I]: row r holds gate at r*2I + j and
// up at r*2I + I + j, so the kernels read both halves of a row and the backward writes dgate and
// dup into the same layout, ready for one GEMM against the fused weight.
//
// defines: swiglu_fwd_<dt>(out[n], gu[2n], n, I)         n = rows * I
//          swiglu_bwd_<dt>(dgu[2n], dout[n], gu[2n], n, I)
//   silu(g) = g * sigmoid(g);  d silu / dg = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
// dgu may alias gu (each element is read before it is written). 16-byte vectors when I is a
// multiple of the vector width and every pointer is aligned (a vector then never straddles a
// row), scalars otherwise.

__device__ __forceinline__ float sigmoidf_(float g) { return 1.0f / (1.0f + __expf(-g)); }

// Offset in gu of element i of the [rows, I] output: its gate (its up is `inter` further on).
__device__ __forceinline__ long long gu_at(long long i, int inter) {
    const long long r = i / inter;
    return i + r * inter;
}

template <typename T>
__device__ void swiglu_fwd_impl(T* out, const T* gu, long long n, int inter) {
    constexpr int V = Pack<T>::N;
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long head = 0;
    if (inter % V == 0 && aligned16(out) && aligned16(gu)) {
        head = n;
        for (long long i = tid * V; i < head; i += stride * V) {
            const T* g = gu + gu_at(i, inter);
            float x[V], u[V];
            ld16(g, x);
            ld16(g + inter, u);
#pragma unroll
            for (int j = 0; j < V; ++j) x[j] = x[j] * sigmoidf_(x[j]) * u[j];
            st16(out + i, x);
        }
    }
    for (long long i = head + tid; i < n; i += stride) {
        const T* g = gu + gu_at(i, inter);
        const float x = ld(g);
        st(out + i, x * sigmoidf_(x) * ld(g + inter));
    }
}

template <typename T>
__device__ void swiglu_bwd_impl(T* dgu, const T* dout, const T* gu, long long n, int inter) {
    constexpr int V = Pack<T>::N;
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long head = 0;
    if (inter % V == 0 && aligned16(dgu) && aligned16(dout) && aligned16(gu)) {
        head = n;
        for (long long i = tid * V; i < head; i += stride * V) {
            const long long o = gu_at(i, inter);
            float g[V], u[V], d[V], dg[V], du[V];
            ld16(gu + o, g);
            ld16(gu + o + inter, u);
            ld16(dout + i, d);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const float sg = sigmoidf_(g[j]);
                du[j] = d[j] * g[j] * sg;
                dg[j] = d[j] * u[j] * sg * (1.0f + g[j] * (1.0f - sg));
            }
            st16(dgu + o + inter, du);
            st16(dgu + o, dg);
        }
    }
    for (long long i = head + tid; i < n; i += stride) {
        const long long o = gu_at(i, inter);
        const float g = ld(gu + o), u = ld(gu + o + inter), d = ld(dout + i);
        const float sg = sigmoidf_(g);
        st(dgu + o + inter, d * g * sg);
        st(dgu + o, d * u * sg * (1.0f + g * (1.0f - sg)));
    }
}

#define SWIGLU_DEF(T, DT)                                                                       \
    extern "C" __global__ void swiglu_fwd_##DT(T* out, const T* gu, long long n, int inter) {  \
        swiglu_fwd_impl<T>(out, gu, n, inter);                                                  \
    }                                                                                           \
    extern "C" __global__ void swiglu_bwd_##DT(T* dgu, const T* dout, const T* gu, long long n, \
                                               int inter) {                                     \
        swiglu_bwd_impl<T>(dgu, dout, gu, n, inter);                                            \
    }
FOR_F32_BF16(SWIGLU_DEF)
