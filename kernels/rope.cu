// Rotary position embedding (HF rotate_half convention) over one layer's q, k and v heads in
// one launch, forward and backward.
//
// defines: rope_fwd_<dt>(qo, ko, vo, qi, ki, vi, ld_i[3], ld_o[3], hs_i, hs_o, cos, sin, pos,
//                        n, hq, hkv, hd, p)
//          rope_bwd_<dt>(same arguments)
// Head h of row r of tensor t (q with hq heads, k and v with hkv) is read at
// t_i + r * ld_i[t] + h * hs_i and written at t_o + r * ld_o[t] + h * hs_o: either side may be
// a column window of wider rows (the fused q|k|v projection, its gradient) or a compact tensor
// whose heads are padded to hs > hd (the attention kernels' layout). So the forward reads the
// projection in place and writes the attention inputs, padding included, and the backward
// reads the attention gradients and writes straight into the fused gradient: no separate pad,
// unpad or v copy. q and k are rotated (fwd: y1 = x1 c - x2 s, y2 = x2 c + x1 s; bwd: the
// transpose, rotation by -angle), v is copied; a head's output columns hd .. hs_o are zeros.
// cos/sin are f32 tables [P, hd/2] built on the host (rope scaling variants need no kernel
// change). Positions outside [0, P) are clamped to the table (the caller validates them).
// ld_i / ld_o are passed as three values each (q, k, v).

template <typename T>
__device__ void rope_impl(T* qo, T* ko, T* vo, const T* qi, const T* ki, const T* vi,
                          long long qli, long long kli, long long vli, long long qlo,
                          long long klo, long long vlo, int hs_i, int hs_o, const float* cos_t,
                          const float* sin_t, const int* pos, int n, int hq, int hkv, int hd,
                          int p, float sign) {
    const int half = hd >> 1, pairs = hs_o >> 1, heads = hq + 2 * hkv;
    const long long total = (long long)n * heads * pairs;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += stride) {
        const int i = (int)(t % pairs);
        const long long rest = t / pairs;
        int h = (int)(rest % heads);
        const int tok = (int)(rest / heads);
        const T* x;
        T* y;
        bool rotate = true;
        if (h < hq) {
            x = qi + tok * qli;
            y = qo + tok * qlo;
        } else if (h < hq + hkv) {
            h -= hq;
            x = ki + tok * kli;
            y = ko + tok * klo;
        } else {
            h -= hq + hkv;
            x = vi + tok * vli;
            y = vo + tok * vlo;
            rotate = false;
        }
        x += (long long)h * hs_i;
        y += (long long)h * hs_o;
        if (i >= half) {  // the head's padding columns, a pair per thread
            const int c = hd + 2 * (i - half);
            st(y + c, 0.0f);
            st(y + c + 1, 0.0f);
            continue;
        }
        const float x1 = ld(x + i), x2 = ld(x + i + half);
        if (!rotate) {
            st(y + i, x1);
            st(y + i + half, x2);
            continue;
        }
        int pp = pos[tok];
        pp = pp < 0 ? 0 : (pp >= p ? p - 1 : pp);
        const float c = cos_t[(long long)pp * half + i];
        const float s = sign * sin_t[(long long)pp * half + i];
        st(y + i, x1 * c - x2 * s);
        st(y + i + half, x2 * c + x1 * s);
    }
}

#define ROPE_ENTRY(T, NAME, SIGN)                                                                \
    extern "C" __global__ void NAME(T* qo, T* ko, T* vo, const T* qi, const T* ki, const T* vi, \
                                    long long qli, long long kli, long long vli, long long qlo, \
                                    long long klo, long long vlo, int hs_i, int hs_o,           \
                                    const float* cos_t, const float* sin_t, const int* pos,     \
                                    int n, int hq, int hkv, int hd, int p) {                    \
        rope_impl<T>(qo, ko, vo, qi, ki, vi, qli, kli, vli, qlo, klo, vlo, hs_i, hs_o, cos_t,   \
                     sin_t, pos, n, hq, hkv, hd, p, SIGN);                                      \
    }
#define ROPE_DEF(T, DT) ROPE_ENTRY(T, rope_fwd_##DT, 1.0f) ROPE_ENTRY(T, rope_bwd_##DT, -1.0f)
FOR_F32_BF16(ROPE_DEF)
