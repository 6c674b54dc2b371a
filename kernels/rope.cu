// Rotary position embedding (HF rotate_half convention), forward and backward.
//
// defines: rope_fwd_<dt>(out[N,H,hd], x[N,H,hd], cos[P,hd/2], sin[P,hd/2], pos[N], N, H, hd, P)
//          rope_bwd_<dt>(dx, dout, cos, sin, pos, N, H, hd, P)
// cos/sin tables are f32, built on the host (so rope scaling variants need no kernel change).
// out may alias x: each thread reads its pair (i, i + hd/2) before writing it.
//   fwd: y1 = x1 c - x2 s, y2 = x2 c + x1 s;   bwd: the transpose (rotation by -angle).
// Positions outside [0, P) are clamped to the table (the launcher's caller validates them).

template <typename T>
__device__ void rope_impl(T* out, const T* x, const float* cos_t, const float* sin_t,
                          const int* pos, int n, int h, int hd, int p, float sign) {
    int half = hd >> 1;
    long long total = (long long)n * h * half;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += stride) {
        int i = (int)(t % half);
        long long row = t / half;  // token * h + head
        int tok = (int)(row / h);
        int pp = pos[tok];
        pp = pp < 0 ? 0 : (pp >= p ? p - 1 : pp);
        float c = cos_t[(long long)pp * half + i];
        float s = sign * sin_t[(long long)pp * half + i];
        const T* xr = x + row * hd;
        T* yr = out + row * hd;
        float x1 = ld(xr + i);
        float x2 = ld(xr + i + half);
        st(yr + i, x1 * c - x2 * s);
        st(yr + i + half, x2 * c + x1 * s);
    }
}

#define ROPE_DEF(T, DT)                                                                           \
    extern "C" __global__ void rope_fwd_##DT(T* out, const T* x, const float* cos_t,             \
                                             const float* sin_t, const int* pos, int n, int h,   \
                                             int hd, int p) {                                     \
        rope_impl<T>(out, x, cos_t, sin_t, pos, n, h, hd, p, 1.0f);                               \
    }                                                                                             \
    extern "C" __global__ void rope_bwd_##DT(T* dx, const T* dout, const float* cos_t,           \
                                             const float* sin_t, const int* pos, int n, int h,   \
                                             int hd, int p) {                                     \
        rope_impl<T>(dx, dout, cos_t, sin_t, pos, n, h, hd, p, -1.0f);                            \
    }
FOR_F32_BF16(ROPE_DEF)
