// Causal self-attention over packed variable-length sequences with GQA, flash-style: keys and
// values are streamed through shared memory in tiles of 32 with an online softmax, so the
// [seq x seq] score matrix never exists. The backward recomputes probabilities from the saved
// log-sum-exp (FlashAttention-2 scheme).
//
// Layout (T = bf16 or f32, packed tokens, cu_seqlens[B+1] int32 prefix sums):
//   q, out, dq, dout : [Ttot, Hq, hd]     k, v, dk, dv : [Ttot, Hkv, hd]
//   lse, delta       : [Ttot, Hq] f32 (natural-log log-sum-exp of the scaled scores)
// q head h reads kv head h / (Hq / Hkv). Requires hd % 32 == 0 and hd <= 256. Sequence bounds
// are clamped to [0, Ttot), so a malformed cu_seqlens gives wrong rows, never a wild access.
//
// defines: attention_fwd_<dt>(out, lse, q, k, v, cu_seqlens, hq, hkv, hd, scale)
//            grid (ceil(max_seqlen/16), Hq, B), block 128, dyn smem attn_fwd_smem(hd)
//          attention_delta_bwd_<dt>(delta, dout, out, ntok_heads, hd)   delta = rowsum(dO * O)
//            grid ceil(Ttot*Hq/8), block 256
//          attention_bwd_<dt>(dq_accum f32, dk, dv, dout, q, k, v, lse, delta, cu_seqlens,
//                             Ttot, hq, hkv, hd, scale)
//            grid (ceil(max_seqlen/32), Hkv, B), block 256, dyn smem attn_bwd_smem(hd);
//            dq_accum must be zeroed: it is accumulated with atomics across key tiles.
//          attention_dq_bwd_<dt>(dq, dq_accum, n)   dq = dq_accum (cast to T)
// The smem sizes are recomputed by the Rust launcher (launch/attention.rs) with the same
// formulas; keep them in sync.

#define ATT_BK 32        // keys per tile (= one key per lane)
#define ATT_FWD_ROWS 4   // query rows per warp in the forward
#define ATT_FWD_WARPS 4
#define ATT_BQ (ATT_FWD_ROWS * ATT_FWD_WARPS)
#define ATT_BWD_WARPS 8
#define ATT_BWD_RB 8     // query rows per step in the backward (one per warp)
#define ATT_MAX_DPL 8    // hd / 32 <= 8

// Row stride (elements) of the K/V tiles in shared memory: padded by 4 bytes so that 32 lanes
// reading 32 different rows at the same column hit 32 different banks.
template <typename T> __device__ __forceinline__ int kv_stride(int hd) { return hd + 4 / (int)sizeof(T); }

// Two consecutive elements as f32 (p is 4-byte aligned for bf16: even column, even stride).
__device__ __forceinline__ void ld2(const float* p, float& a, float& b) { a = p[0]; b = p[1]; }
__device__ __forceinline__ void ld2(const bf16* p, float& a, float& b) {
    u32 w = *reinterpret_cast<const u32*>(p);
    a = __uint_as_float(w << 16);
    b = __uint_as_float(w & 0xffff0000u);
}

// Stages keys k0 .. k0 + ATT_BK - 1 of one sequence (kv head kvh) into the shared K/V tiles,
// zero past the sequence's end so that padding keys contribute nothing; the whole block takes
// part (the forward and the backward load their tiles the same way).
template <typename T>
__device__ __forceinline__ void load_kv_tile(T* Ks, T* Vs, const T* k, const T* v, int k0,
                                             int seq0, int seqlen, int hkv, int kvh, int hd,
                                             int ks) {
    for (int idx = threadIdx.x; idx < ATT_BK * hd; idx += blockDim.x) {
        int j = idx / hd, d = idx - j * hd;
        int kj = k0 + j;
        if (kj < seqlen) {
            long long g = ((long long)(seq0 + kj) * hkv + kvh) * hd + d;
            Ks[j * ks + d] = k[g];
            Vs[j * ks + d] = v[g];
        } else {
            st(Ks + j * ks + d, 0.0f);
            st(Vs + j * ks + d, 0.0f);
        }
    }
}

template <typename T>
__device__ void attn_fwd_impl(T* out, float* lse, const T* q, const T* k, const T* v,
                              const int* cu, int ntok, int hq, int hkv, int hd, float scale) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int h = blockIdx.y;
    int seq0, seqlen, q0;
    if (!tile_start(cu, ntok, ATT_BQ, seq0, seqlen, q0)) return;
    const int kvh = h / (hq / hkv);
    const int ks = kv_stride<T>(hd);
    T* Ks = reinterpret_cast<T*>(smem);
    T* Vs = Ks + ATT_BK * ks;
    float* Qs = reinterpret_cast<float*>(Vs + ATT_BK * ks);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int dpl = hd >> 5;
    const float qscale = scale * LOG2E_F;  // scores in log2 units: exp2f is one instruction

    for (int idx = threadIdx.x; idx < ATT_BQ * hd; idx += blockDim.x) {
        int r = idx / hd, d = idx - r * hd;
        int qi = q0 + r;
        Qs[idx] = qi < seqlen ? ld(q + ((long long)(seq0 + qi) * hq + h) * hd + d) * qscale : 0.0f;
    }

    float m[ATT_FWD_ROWS], l[ATT_FWD_ROWS], acc[ATT_FWD_ROWS][ATT_MAX_DPL];
#pragma unroll
    for (int rr = 0; rr < ATT_FWD_ROWS; ++rr) {
        m[rr] = NEG_INF_F;
        l[rr] = 0.0f;
#pragma unroll
        for (int dd = 0; dd < ATT_MAX_DPL; ++dd) acc[rr][dd] = 0.0f;
    }

    const int kend = min(seqlen, q0 + ATT_BQ);  // causal: no query here sees a later key
    for (int k0 = 0; k0 < kend; k0 += ATT_BK) {
        __syncthreads();
        load_kv_tile(Ks, Vs, k, v, k0, seq0, seqlen, hkv, kvh, hd, ks);
        __syncthreads();
#pragma unroll
        for (int rr = 0; rr < ATT_FWD_ROWS; ++rr) {
            const int r = warp * ATT_FWD_ROWS + rr;
            const int qi = q0 + r;
            if (qi >= seqlen || k0 > qi) continue;  // warp-uniform
            const int kj = k0 + lane;
            const float* qrow = Qs + r * hd;
            const T* krow = Ks + lane * ks;
            float s = 0.0f;
            for (int d = 0; d < hd; d += 2) {
                float a, c;
                ld2(krow + d, a, c);
                s = fmaf(qrow[d], a, s);
                s = fmaf(qrow[d + 1], c, s);
            }
            s = (kj <= qi) ? s : NEG_INF_F;  // kj <= qi < seqlen also excludes padding keys
            const float m_new = fmaxf(m[rr], warp_max(s));  // lane 0 (kj = k0 <= qi) is finite
            const float p = exp2f(s - m_new);
            const float corr = exp2f(m[rr] - m_new);
            l[rr] = l[rr] * corr + warp_sum(p);
            m[rr] = m_new;
#pragma unroll
            for (int dd = 0; dd < ATT_MAX_DPL; ++dd) acc[rr][dd] *= corr;
            const int jmax = min(ATT_BK, qi - k0 + 1);
            for (int jj = 0; jj < jmax; ++jj) {
                const float pj = __shfl_sync(0xffffffffu, p, jj);
                const T* vrow = Vs + jj * ks + lane;
#pragma unroll
                for (int dd = 0; dd < ATT_MAX_DPL; ++dd)
                    if (dd < dpl) acc[rr][dd] = fmaf(pj, ld(vrow + dd * 32), acc[rr][dd]);
            }
        }
    }

#pragma unroll
    for (int rr = 0; rr < ATT_FWD_ROWS; ++rr) {
        const int qi = q0 + warp * ATT_FWD_ROWS + rr;
        if (qi >= seqlen) continue;
        const float inv = 1.0f / l[rr];
        T* orow = out + ((long long)(seq0 + qi) * hq + h) * hd + lane;
#pragma unroll
        for (int dd = 0; dd < ATT_MAX_DPL; ++dd)
            if (dd < dpl) st(orow + dd * 32, acc[rr][dd] * inv);
        if (lane == 0) lse[(long long)(seq0 + qi) * hq + h] = (m[rr] + __log2f(l[rr])) * LN2_F;
    }
}

template <typename T>
__device__ void attn_delta_impl(float* delta, const T* dout, const T* out, long long rows, int hd) {
    long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const T* a = dout + row * hd;
    const T* o = out + row * hd;
    float s = 0.0f;
    for (int d = lane; d < hd; d += 32) s = fmaf(ld(a + d), ld(o + d), s);
    s = warp_sum(s);
    if (lane == 0) delta[row] = s;
}

template <typename T>
__device__ void attn_bwd_impl(float* dq_acc, T* dk, T* dv, const T* dout, const T* q, const T* k,
                              const T* v, const float* lse, const float* delta, const int* cu,
                              int ntok, int hq, int hkv, int hd, float scale) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int kvh = blockIdx.y;
    int seq0, seqlen, k0;
    if (!tile_start(cu, ntok, ATT_BK, seq0, seqlen, k0)) return;
    const int group = hq / hkv;
    const int ks = kv_stride<T>(hd);
    T* Ks = reinterpret_cast<T*>(smem);
    T* Vs = Ks + ATT_BK * ks;
    float* Qs = reinterpret_cast<float*>(Vs + ATT_BK * ks);  // [RB][hd], pre-scaled by `scale`
    float* dOs = Qs + ATT_BWD_RB * hd;                       // [RB][hd]
    float* Ps = dOs + ATT_BWD_RB * hd;                       // [RB][BK]
    float* dSs = Ps + ATT_BWD_RB * ATT_BK;                   // [RB][BK]
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nthreads = blockDim.x;

    load_kv_tile(Ks, Vs, k, v, k0, seq0, seqlen, hkv, kvh, hd, ks);

    // This thread accumulates dK/dV for key `lane`, columns warp + 8 * e.
    const int ept = hd / ATT_BWD_WARPS;  // <= 32
    float dk_acc[32], dv_acc[32];
#pragma unroll
    for (int e = 0; e < 32; ++e) { dk_acc[e] = 0.0f; dv_acc[e] = 0.0f; }
    const int kj = k0 + lane;

    for (int hh = 0; hh < group; ++hh) {
        const int h = kvh * group + hh;
        for (int r0 = k0; r0 < seqlen; r0 += ATT_BWD_RB) {  // causal: queries before k0 see no key here
            __syncthreads();
            for (int idx = threadIdx.x; idx < ATT_BWD_RB * hd; idx += nthreads) {
                int r = idx / hd, d = idx - r * hd;
                int qi = r0 + r;
                bool ok = qi < seqlen;
                long long g = ((long long)(seq0 + qi) * hq + h) * hd + d;
                Qs[idx] = ok ? ld(q + g) * scale : 0.0f;
                dOs[idx] = ok ? ld(dout + g) : 0.0f;
            }
            __syncthreads();
            {
                // warp w: query row r0 + w against the 32 keys of the tile
                const int r = warp;
                const int qi = r0 + r;
                float p = 0.0f, ds = 0.0f;
                if (qi < seqlen && kj <= qi) {
                    const float* qrow = Qs + r * hd;
                    const float* orow = dOs + r * hd;
                    const T* krow = Ks + lane * ks;
                    const T* vrow = Vs + lane * ks;
                    float s = 0.0f, dp = 0.0f;
                    for (int d = 0; d < hd; d += 2) {
                        float a, c;
                        ld2(krow + d, a, c);
                        s = fmaf(qrow[d], a, s);
                        s = fmaf(qrow[d + 1], c, s);
                        ld2(vrow + d, a, c);
                        dp = fmaf(orow[d], a, dp);
                        dp = fmaf(orow[d + 1], c, dp);
                    }
                    const long long li = (long long)(seq0 + qi) * hq + h;
                    p = exp2f((s - lse[li]) * LOG2E_F);
                    ds = p * (dp - delta[li]);
                }
                Ps[r * ATT_BK + lane] = p;
                dSs[r * ATT_BK + lane] = ds;
            }
            __syncthreads();
            // dV[j] += sum_r P[r][j] dO[r];  dK[j] += sum_r dS[r][j] Qscaled[r]
#pragma unroll
            for (int r = 0; r < ATT_BWD_RB; ++r) {
                const float p = Ps[r * ATT_BK + lane];
                const float ds = dSs[r * ATT_BK + lane];
#pragma unroll
                for (int e = 0; e < 32; ++e) {
                    if (e < ept) {
                        const int d = warp + ATT_BWD_WARPS * e;
                        dv_acc[e] = fmaf(p, dOs[r * hd + d], dv_acc[e]);
                        dk_acc[e] = fmaf(ds, Qs[r * hd + d], dk_acc[e]);
                    }
                }
            }
            // dQ[r] += scale * sum_j dS[r][j] K[j]  (atomics: other key tiles add to the same rows)
            for (int o = threadIdx.x; o < ATT_BWD_RB * hd; o += nthreads) {
                const int r = o / hd, d = o - r * hd;
                const int qi = r0 + r;
                if (qi >= seqlen) continue;
                float acc = 0.0f;
                const int jmax = min(ATT_BK, qi - k0 + 1);
                for (int j = 0; j < jmax; ++j) acc = fmaf(dSs[r * ATT_BK + j], ld(Ks + j * ks + d), acc);
                atomicAdd(dq_acc + ((long long)(seq0 + qi) * hq + h) * hd + d, acc * scale);
            }
        }
    }

    if (kj < seqlen) {
        const long long g = ((long long)(seq0 + kj) * hkv + kvh) * hd;
#pragma unroll
        for (int e = 0; e < 32; ++e) {
            if (e < ept) {
                const int d = warp + ATT_BWD_WARPS * e;
                st(dk + g + d, dk_acc[e]);
                st(dv + g + d, dv_acc[e]);
            }
        }
    }
}

#define ATTENTION_DEF(T, DT)                                                                       \
    extern "C" __global__ void __launch_bounds__(ATT_FWD_WARPS * 32)                               \
        attention_fwd_##DT(T* out, float* lse, const T* q, const T* k, const T* v, const int* cu,  \
                           int ntok, int hq, int hkv, int hd, float scale) {                       \
        attn_fwd_impl<T>(out, lse, q, k, v, cu, ntok, hq, hkv, hd, scale);                             \
    }                                                                                              \
    extern "C" __global__ void attention_delta_bwd_##DT(float* delta, const T* dout, const T* out, \
                                                        long long rows, int hd) {                  \
        attn_delta_impl<T>(delta, dout, out, rows, hd);                                            \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(ATT_BWD_WARPS * 32)                               \
        attention_bwd_##DT(float* dq_acc, T* dk, T* dv, const T* dout, const T* q, const T* k,     \
                           const T* v, const float* lse, const float* delta, const int* cu,        \
                           int ntok, int hq, int hkv, int hd, float scale) {                       \
        attn_bwd_impl<T>(dq_acc, dk, dv, dout, q, k, v, lse, delta, cu, ntok, hq, hkv, hd, scale);     \
    }                                                                                              \
    extern "C" __global__ void attention_dq_bwd_##DT(T* dq, const float* dq_acc, long long n) {    \
        long long stride = (long long)gridDim.x * blockDim.x;                                      \
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)   \
            st(dq + i, dq_acc[i]);                                                                 \
    }
FOR_F32_BF16(ATTENTION_DEF)
