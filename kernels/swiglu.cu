// SwiGLU: out = silu(gate) * up, forward and backward (f32 math, any dtype storage).
//
// defines: swiglu_fwd_<dt>(out[n], gate[n], up[n], n)
//          swiglu_bwd_<dt>(dgate[n], dup[n], dout[n], gate[n], up[n], n)
//   silu(g) = g * sigmoid(g);  d silu / dg = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
// dgate/dup may alias gate/up (each element is read before it is written).

__device__ __forceinline__ float sigmoidf_(float g) { return 1.0f / (1.0f + __expf(-g)); }

template <typename T>
__device__ void swiglu_fwd_impl(T* out, const T* gate, const T* up, long long n) {
    map2_vec(out, gate, up, n, [](float g, float u) { return g * sigmoidf_(g) * u; });
}

template <typename T>
__device__ void swiglu_bwd_impl(T* dgate, T* dup, const T* dout, const T* gate, const T* up,
                                long long n) {
    constexpr int V = Pack<T>::N;
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long head = 0;
    if (aligned16(dgate) && aligned16(dup) && aligned16(dout) && aligned16(gate) &&
        aligned16(up)) {
        head = n / V * V;
        for (long long i = tid * V; i < head; i += stride * V) {
            float g[V], u[V], d[V], dg[V], du[V];
            ld16(gate + i, g);
            ld16(up + i, u);
            ld16(dout + i, d);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const float sg = sigmoidf_(g[j]);
                du[j] = d[j] * g[j] * sg;
                dg[j] = d[j] * u[j] * sg * (1.0f + g[j] * (1.0f - sg));
            }
            st16(dup + i, du);
            st16(dgate + i, dg);
        }
    }
    for (long long i = head + tid; i < n; i += stride) {
        float g = ld(gate + i);
        float u = ld(up + i);
        float d = ld(dout + i);
        float sg = sigmoidf_(g);
        st(dup + i, d * g * sg);
        st(dgate + i, d * u * sg * (1.0f + g * (1.0f - sg)));
    }
}

#define SWIGLU_DEF(T, DT)                                                                       \
    extern "C" __global__ void swiglu_fwd_##DT(T* out, const T* gate, const T* up, long long n) { \
        swiglu_fwd_impl<T>(out, gate, up, n);                                                   \
    }                                                                                           \
    extern "C" __global__ void swiglu_bwd_##DT(T* dgate, T* dup, const T* dout, const T* gate, \
                                               const T* up, long long n) {                      \
        swiglu_bwd_impl<T>(dgate, dup, dout, gate, up, n);                                      \
    }
FOR_F32_BF16(SWIGLU_DEF)
