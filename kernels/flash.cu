// Causal flash attention on tensor cores (bf16 mma, f32 accumulation) over packed variable-length
// sequences with GQA: the bf16 path of attention.cu's contract (same layouts, same lse), chosen by
// the launcher (launch/flash.rs) for head dims 32, 64 and 128. The head dim is a template
// parameter so every fragment array has a constant size and lives in registers.
//
// Layout (packed tokens, cu_seqlens[B+1] int32 prefix sums):
//   q, out, dq, dout : [Ttot, Hq, HD] bf16     k, v, dk, dv : [Ttot, Hkv, HD] bf16
//   lse, delta       : [Ttot, Hq] f32 (natural-log log-sum-exp of the scaled scores; rowsum(dO*O))
// q head h reads kv head h / (Hq / Hkv). Sequence bounds are clamped to [0, Ttot) (seq_bounds).
// Every pointer must be 16-byte aligned (rows are moved as uint4; the launcher checks).
//
// defines, for HD in {32, 64, 128}, each with block 128 (4 warps) and dynamic smem given by the
// formula next to it (launch/flash.rs recomputes them; keep in sync):
//   flash_fwd_hd<HD>_bf16(out, lse, q, k, v, cu, ntok, hq, hkv, scale)
//     grid (ceil(max_seqlen/64), Hq, B); smem (64 + 64) * (HD + 8) * 2 + HD * (64 + 8) * 2
//   flash_bwd_dq_hd<HD>_bf16(dq, dout, q, k, v, lse, delta, cu, ntok, hq, hkv, scale)
//     grid (ceil(max_seqlen/64), Hq, B); smem (2 * 64 + 2 * 32) * (HD + 8) * 2 + HD * (32 + 8) * 2
//   flash_bwd_dkdv_hd<HD>_bf16(dk, dv, dout, q, k, v, lse, delta, cu, ntok, hq, hkv, scale)
//     grid (ceil(max_seqlen/64), Hkv, B); smem (2 * 64 + 2 * 32) * (HD + 8) * 2
//                                              + 2 * HD * (32 + 8) * 2 + 2 * 32 * 4
// The backward is two kernels so that no gradient is accumulated with atomics: dQ rows are owned
// by query tiles (recomputing P and dP), dK/dV rows by key tiles, which also sum the GQA group.

#define FL_WARPS 4
#define FL_BM 64     // query rows per block (16 per warp); keys per block in the dK/dV kernel
#define FL_BN 64     // keys per tile in the forward
#define FL_BN_DQ 32  // keys per tile in the dQ kernel
#define FL_BQ_KV 32  // query rows per tile in the dK/dV kernel
// Row padding in bf16: keeps rows 16-byte aligned and puts the 8 rows of one fragment load in
// 8 different bank groups.
#define FL_PAD 8

__device__ __forceinline__ u32 ld_pair(const bf16* p) { return *reinterpret_cast<const u32*>(p); }

// A fragment of the 16x16 block of a row-major smem tile at (row0, col0).
__device__ __forceinline__ void frag_a(u32* a, const bf16* s, int ld, int row0, int col0, int g,
                                       int t) {
    const bf16* p = s + (row0 + g) * ld + col0 + 2 * t;
    a[0] = ld_pair(p);
    a[1] = ld_pair(p + 8 * ld);
    a[2] = ld_pair(p + 8);
    a[3] = ld_pair(p + 8 * ld + 8);
}

// B fragment of the 16x8 block B[k][n] = s[(n0 + n) * ld + k0 + k]: the tile stores B's columns
// as rows (K for Q K^T, a transposed tile for P V).
__device__ __forceinline__ void frag_b(u32* b, const bf16* s, int ld, int n0, int k0, int g,
                                       int t) {
    const bf16* p = s + (n0 + g) * ld + k0 + 2 * t;
    b[0] = ld_pair(p);
    b[1] = ld_pair(p + 8);
}

// A fragment from two accumulator tiles: the C layout of keys 16kk..16kk+15 is the A layout of
// the next product, so P and dS never leave registers.
__device__ __forceinline__ void frag_from_acc(u32* a, const float* c0, const float* c1) {
    a[0] = pack_bf16x2(c0[0], c0[1]);
    a[1] = pack_bf16x2(c0[2], c0[3]);
    a[2] = pack_bf16x2(c1[0], c1[1]);
    a[3] = pack_bf16x2(c1[2], c1[3]);
}

// Rows r0 .. r0 + nrows - 1 of one head (row r at src + r * stride) into a [nrows][ld] tile, or
// with TRANS into a [HD][ld] tile (dst[d * ld + r]); zero from row `valid` on; the whole block
// takes part.
template <int HD, bool TRANS = false>
__device__ __forceinline__ void fl_load(bf16* dst, int ld, const bf16* src, long long stride,
                                        int r0, int nrows, int valid) {
    constexpr int C = HD / 8;
    for (int i = threadIdx.x; i < nrows * C; i += blockDim.x) {
        const int r = i / C, c = i - r * C;
        uint4 w = make_uint4(0u, 0u, 0u, 0u);
        if (r0 + r < valid) w = *reinterpret_cast<const uint4*>(src + (r0 + r) * stride + c * 8);
        if constexpr (!TRANS) {
            *reinterpret_cast<uint4*>(dst + r * ld + c * 8) = w;
            continue;
        }
        const u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            dst[(c * 8 + 2 * j) * ld + r].bits = (unsigned short)(words[j] & 0xffffu);
            dst[(c * 8 + 2 * j + 1) * ld + r].bits = (unsigned short)(words[j] >> 16);
        }
    }
}

// Warp-tile products (all loops unroll: the sizes are template constants, so the accumulator
// arrays stay in registers).

template <int N>
__device__ __forceinline__ void zero_acc(float (&c)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; ++n) c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.0f;
}

// c[16 x 8N] += a * B[kk-th 16 rows][8N]: one k step of the products below, with B[k][n] =
// bs[n * ld + k] (B's columns stored as rows).
template <int N>
__device__ __forceinline__ void mma_k_step(float (&c)[N][4], const u32 (&a)[4], const bf16* bs,
                                           int ld, int kk, int g, int t) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
        u32 bb[2];
        frag_b(bb, bs, ld, n * 8, kk * 16, g, t);
        mma_bf16_16816(c[n], a, bb);
    }
}

// c[16 x 8N] += A[16 x K] * B[K x 8N], A as K/16 fragments in registers, B as in mma_k_step.
template <int K, int N>
__device__ __forceinline__ void mma_a_regs(float (&c)[N][4], const u32 (&a)[K / 16][4],
                                           const bf16* bs, int ld, int g, int t) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) mma_k_step(c, a[kk], bs, ld, kk, g, t);
}

// Two products of the same shape in one pass over k (c1 += A1 B1, c2 += A2 B2), interleaved so
// that both accumulators advance together as the backward kernels need them.
template <int K, int N>
__device__ __forceinline__ void mma_a_regs2(float (&c1)[N][4], const u32 (&a1)[K / 16][4],
                                            const bf16* b1, float (&c2)[N][4],
                                            const u32 (&a2)[K / 16][4], const bf16* b2, int ld,
                                            int g, int t) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        mma_k_step(c1, a1[kk], b1, ld, kk, g, t);
        mma_k_step(c2, a2[kk], b2, ld, kk, g, t);
    }
}

// c[16 x 8N] += P[16 x K] * B[K x 8N], P given as the accumulator tiles p[K / 8] of an earlier
// product (rounded to bf16 on the way: the FlashAttention-2 register reuse), B as above.
template <int K, int N>
__device__ __forceinline__ void mma_a_acc(float (&c)[N][4], const float (&p)[K / 8][4],
                                          const bf16* bs, int ld, int g, int t) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        u32 pa[4];
        frag_from_acc(pa, p[2 * kk], p[2 * kk + 1]);
        mma_k_step(c, pa, bs, ld, kk, g, t);
    }
}

// Row `i` (0: g, 1: g + 8) of accumulator c [16 x HD] times `mul`, stored at dst (one bf16 pair
// per lane and tile).
template <int HD>
__device__ __forceinline__ void store_row(bf16* dst, const float (&c)[HD / 8][4], int i, float mul,
                                          int t) {
#pragma unroll
    for (int n = 0; n < HD / 8; ++n)
        *reinterpret_cast<u32*>(dst + n * 8 + 2 * t) =
            pack_bf16x2(c[n][2 * i] * mul, c[n][2 * i + 1] * mul);
}

// Max / sum over the four lanes that hold one accumulator row.
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Where a block of the forward or the dQ kernel (FL_BM query rows of one head each) works:
// head h (blockIdx.y) and its kv head, its sequence (first token seq0, length seqlen; blockIdx.z),
// the tile's first query row q0, the row strides of q-shaped and k-shaped tensors and the offsets
// of the head's first row in them. `live` is false for a tile past its sequence's end.
struct QTile {
    bool live;
    int h, kvh, seq0, seqlen, q0;
    long long qs, ks, qoff, koff;
};

template <int HD>
__device__ __forceinline__ QTile q_tile(const int* cu, int ntok, int hq, int hkv) {
    QTile p{};
    p.h = blockIdx.y;
    p.live = tile_start(cu, ntok, FL_BM, p.seq0, p.seqlen, p.q0);
    if (!p.live) return p;
    p.kvh = p.h / (hq / hkv);
    p.qs = (long long)hq * HD;
    p.ks = (long long)hkv * HD;
    p.qoff = (long long)p.seq0 * p.qs + (long long)p.h * HD;
    p.koff = (long long)p.seq0 * p.ks + (long long)p.kvh * HD;
    return p;
}

template <int HD>
__device__ void flash_fwd_impl(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                               const int* cu, int ntok, int hq, int hkv, float scale) {
    extern __shared__ __align__(16) unsigned char smem[];
    constexpr int LD = HD + FL_PAD, LDT = FL_BN + FL_PAD;
    const auto [live, h, kvh, seq0, seqlen, q0, qs, ks, qoff, koff] = q_tile<HD>(cu, ntok, hq, hkv);
    if (!live) return;
    bf16* Qs = reinterpret_cast<bf16*>(smem);  // [BM][LD]
    bf16* Ks = Qs + FL_BM * LD;                // [BN][LD]
    bf16* Vt = Ks + FL_BN * LD;                // [HD][LDT]: V transposed, B of P V
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const bf16 *qh = q + qoff, *kh = k + koff, *vh = v + koff;

    fl_load<HD>(Qs, LD, qh, qs, q0, FL_BM, seqlen);
    __syncthreads();
    u32 qf[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) frag_a(qf[kk], Qs, LD, warp * 16, kk * 16, g, t);

    float o[HD / 8][4];
    zero_acc(o);
    float m[2] = {NEG_INF_F, NEG_INF_F}, l[2] = {0.0f, 0.0f};
    const float sl2 = scale * LOG2E_F;  // scores in log2 units: exp2f is one instruction
    const int row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
    const bool warp_live = q0 + warp * 16 < seqlen;  // warp-uniform

    const int kend = min(seqlen, q0 + FL_BM);  // causal: no query here sees a later key
    for (int k0 = 0; k0 < kend; k0 += FL_BN) {
        __syncthreads();  // every warp is done with the previous tile
        fl_load<HD>(Ks, LD, kh, ks, k0, FL_BN, seqlen);
        fl_load<HD, true>(Vt, LDT, vh, ks, k0, FL_BN, seqlen);
        __syncthreads();
        if (!warp_live) continue;
        float s[FL_BN / 8][4];
        zero_acc(s);
        mma_a_regs<HD>(s, qf, Ks, LD, g, t);
        float mx[2] = {NEG_INF_F, NEG_INF_F};
#pragma unroll
        for (int n = 0; n < FL_BN / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = k0 + n * 8 + 2 * t + (e & 1);
                const float x = (key <= row[e >> 1] && key < seqlen) ? s[n][e] * sl2 : NEG_INF_F;
                s[n][e] = x;
                mx[e >> 1] = fmaxf(mx[e >> 1], x);
            }
        }
        float mref[2], corr[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const float mn = fmaxf(m[i], quad_max(mx[i]));
            // a padding row (past the sequence) has no finite score; 0 keeps exp2f away from NaN
            mref[i] = mn == NEG_INF_F ? 0.0f : mn;
            corr[i] = exp2f(m[i] - mref[i]);
            m[i] = mn;
        }
        float rs[2] = {0.0f, 0.0f};
#pragma unroll
        for (int n = 0; n < FL_BN / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = exp2f(s[n][e] - mref[e >> 1]);
                s[n][e] = p;
                rs[e >> 1] += p;
            }
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) l[i] = l[i] * corr[i] + quad_sum(rs[i]);
#pragma unroll
        for (int n = 0; n < HD / 8; ++n) {
            o[n][0] *= corr[0];
            o[n][1] *= corr[0];
            o[n][2] *= corr[1];
            o[n][3] *= corr[1];
        }
        mma_a_acc<FL_BN>(o, s, Vt, LDT, g, t);
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (row[i] >= seqlen) continue;
        const float inv = 1.0f / l[i];
        const long long tok = seq0 + row[i];
        store_row<HD>(out + tok * qs + (long long)h * HD, o, i, inv, t);
        if (t == 0) lse[tok * hq + h] = (m[i] + __log2f(l[i])) * LN2_F;
    }
}

template <int HD>
__device__ void flash_dq_impl(bf16* dq, const bf16* dout, const bf16* q, const bf16* k,
                              const bf16* v, const float* lse, const float* delta, const int* cu,
                              int ntok, int hq, int hkv, float scale) {
    extern __shared__ __align__(16) unsigned char smem[];
    constexpr int LD = HD + FL_PAD, LDT = FL_BN_DQ + FL_PAD;
    const auto [live, h, kvh, seq0, seqlen, q0, qs, ks, qoff, koff] = q_tile<HD>(cu, ntok, hq, hkv);
    if (!live) return;
    bf16* Qs = reinterpret_cast<bf16*>(smem);  // [BM][LD]
    bf16* dOs = Qs + FL_BM * LD;               // [BM][LD]
    bf16* Ks = dOs + FL_BM * LD;               // [BN][LD]: B of Q K^T
    bf16* Vs = Ks + FL_BN_DQ * LD;             // [BN][LD]: B of dO V^T
    bf16* Kt = Vs + FL_BN_DQ * LD;             // [HD][LDT]: B of dS K
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;

    fl_load<HD>(Qs, LD, q + qoff, qs, q0, FL_BM, seqlen);
    fl_load<HD>(dOs, LD, dout + qoff, qs, q0, FL_BM, seqlen);
    __syncthreads();
    u32 qf[HD / 16][4], df[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
        frag_a(qf[kk], Qs, LD, warp * 16, kk * 16, g, t);
        frag_a(df[kk], dOs, LD, warp * 16, kk * 16, g, t);
    }
    const int row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
    float lrow[2], drow[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const bool ok = row[i] < seqlen;
        const long long li = (long long)(seq0 + row[i]) * hq + h;
        lrow[i] = ok ? lse[li] * LOG2E_F : 0.0f;
        drow[i] = ok ? delta[li] : 0.0f;
    }
    float acc[HD / 8][4];
    zero_acc(acc);
    const float sl2 = scale * LOG2E_F;
    const int wrow0 = q0 + warp * 16;

    const int kend = min(seqlen, q0 + FL_BM);
    for (int k0 = 0; k0 < kend; k0 += FL_BN_DQ) {
        __syncthreads();
        fl_load<HD>(Ks, LD, k + koff, ks, k0, FL_BN_DQ, seqlen);
        fl_load<HD>(Vs, LD, v + koff, ks, k0, FL_BN_DQ, seqlen);
        fl_load<HD, true>(Kt, LDT, k + koff, ks, k0, FL_BN_DQ, seqlen);
        __syncthreads();
        // warp-uniform: the warp's rows are past the sequence, or all precede the tile's keys
        if (wrow0 >= seqlen || k0 > wrow0 + 15) continue;
        float s[FL_BN_DQ / 8][4], dp[FL_BN_DQ / 8][4];
        zero_acc(s);
        zero_acc(dp);
        mma_a_regs2<HD>(s, qf, Ks, dp, df, Vs, LD, g, t);
        // dS = P * (dP - delta), P recomputed from the forward's lse; kept in s
#pragma unroll
        for (int n = 0; n < FL_BN_DQ / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = e >> 1, key = k0 + n * 8 + 2 * t + (e & 1);
                const bool ok = row[i] < seqlen && key <= row[i];
                const float p = ok ? exp2f(s[n][e] * sl2 - lrow[i]) : 0.0f;
                s[n][e] = p * (dp[n][e] - drow[i]);
            }
        }
        mma_a_acc<FL_BN_DQ>(acc, s, Kt, LDT, g, t);
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (row[i] >= seqlen) continue;
        store_row<HD>(dq + (long long)(seq0 + row[i]) * qs + (long long)h * HD, acc, i, scale, t);
    }
}

template <int HD>
__device__ void flash_dkdv_impl(bf16* dk, bf16* dv, const bf16* dout, const bf16* q,
                                const bf16* k, const bf16* v, const float* lse,
                                const float* delta, const int* cu, int ntok, int hq, int hkv,
                                float scale) {
    extern __shared__ __align__(16) unsigned char smem[];
    constexpr int LD = HD + FL_PAD, LDT = FL_BQ_KV + FL_PAD;
    const int kvh = blockIdx.y;
    int seq0, seqlen, k0;
    if (!tile_start(cu, ntok, FL_BM, seq0, seqlen, k0)) return;
    const int group = hq / hkv;
    bf16* Ks = reinterpret_cast<bf16*>(smem);  // [BM][LD]: A of K Q^T
    bf16* Vs = Ks + FL_BM * LD;                // [BM][LD]: A of V dO^T
    bf16* Qs = Vs + FL_BM * LD;                // [BQ][LD]: B of K Q^T
    bf16* dOs = Qs + FL_BQ_KV * LD;            // [BQ][LD]: B of V dO^T
    bf16* Qt = dOs + FL_BQ_KV * LD;            // [HD][LDT]: B of dS^T Q
    bf16* dOt = Qt + HD * LDT;                 // [HD][LDT]: B of P^T dO
    float* Ls = reinterpret_cast<float*>(dOt + HD * LDT);  // [BQ] lse in log2 units
    float* Ds = Ls + FL_BQ_KV;                             // [BQ] delta
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const long long qs = (long long)hq * HD, ks = (long long)hkv * HD;
    const long long koff = (long long)seq0 * ks + (long long)kvh * HD;

    fl_load<HD>(Ks, LD, k + koff, ks, k0, FL_BM, seqlen);
    fl_load<HD>(Vs, LD, v + koff, ks, k0, FL_BM, seqlen);
    const int key[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
    const int wkey0 = k0 + warp * 16;
    float dka[HD / 8][4], dva[HD / 8][4];
    zero_acc(dka);
    zero_acc(dva);
    const float sl2 = scale * LOG2E_F;

    for (int hh = 0; hh < group; ++hh) {
        const int h = kvh * group + hh;
        const long long qoff = (long long)seq0 * qs + (long long)h * HD;
        for (int q0 = k0; q0 < seqlen; q0 += FL_BQ_KV) {  // causal: queries before k0 see no key here
            __syncthreads();
            fl_load<HD>(Qs, LD, q + qoff, qs, q0, FL_BQ_KV, seqlen);
            fl_load<HD>(dOs, LD, dout + qoff, qs, q0, FL_BQ_KV, seqlen);
            fl_load<HD, true>(Qt, LDT, q + qoff, qs, q0, FL_BQ_KV, seqlen);
            fl_load<HD, true>(dOt, LDT, dout + qoff, qs, q0, FL_BQ_KV, seqlen);
            for (int i = threadIdx.x; i < FL_BQ_KV; i += blockDim.x) {
                const bool ok = q0 + i < seqlen;
                const long long li = (long long)(seq0 + q0 + i) * hq + h;
                Ls[i] = ok ? lse[li] * LOG2E_F : 0.0f;
                Ds[i] = ok ? delta[li] : 0.0f;
            }
            __syncthreads();
            // warp-uniform: every query of the tile precedes the warp's keys, or the keys are
            // past the sequence
            if (q0 + FL_BQ_KV - 1 < wkey0 || wkey0 >= seqlen) continue;
            float st[FL_BQ_KV / 8][4], dpt[FL_BQ_KV / 8][4];  // [key][query] tiles
            zero_acc(st);
            zero_acc(dpt);
            {
                // the warp's K and V rows as A fragments, read from smem per query tile (kept
                // in registers they would not leave room for the dK / dV accumulators)
                u32 ka[HD / 16][4], va[HD / 16][4];
#pragma unroll
                for (int kk = 0; kk < HD / 16; ++kk) {
                    frag_a(ka[kk], Ks, LD, warp * 16, kk * 16, g, t);
                    frag_a(va[kk], Vs, LD, warp * 16, kk * 16, g, t);
                }
                mma_a_regs2<HD>(st, ka, Qs, dpt, va, dOs, LD, g, t);
            }
            // P^T into st, dS^T into dpt
#pragma unroll
            for (int n = 0; n < FL_BQ_KV / 8; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = n * 8 + 2 * t + (e & 1), qi = q0 + c, kj = key[e >> 1];
                    const bool ok = qi < seqlen && kj <= qi;
                    const float p = ok ? exp2f(st[n][e] * sl2 - Ls[c]) : 0.0f;
                    st[n][e] = p;
                    dpt[n][e] = p * (dpt[n][e] - Ds[c]);
                }
            }
            mma_a_acc<FL_BQ_KV>(dva, st, dOt, LDT, g, t);
            mma_a_acc<FL_BQ_KV>(dka, dpt, Qt, LDT, g, t);
        }
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (key[i] >= seqlen) continue;
        const long long base = (long long)(seq0 + key[i]) * ks + (long long)kvh * HD;
        store_row<HD>(dk + base, dka, i, scale, t);
        store_row<HD>(dv + base, dva, i, 1.0f, t);
    }
}

#define FLASH_DEF(HD)                                                                              \
    extern "C" __global__ void __launch_bounds__(FL_WARPS * 32)                                    \
        flash_fwd_hd##HD##_bf16(bf16* out, float* lse, const bf16* q, const bf16* k,               \
                                const bf16* v, const int* cu, int ntok, int hq, int hkv,           \
                                float scale) {                                                     \
        flash_fwd_impl<HD>(out, lse, q, k, v, cu, ntok, hq, hkv, scale);                           \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(FL_WARPS * 32) flash_bwd_dq_hd##HD##_bf16(        \
        bf16* dq, const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const float* lse, \
        const float* delta, const int* cu, int ntok, int hq, int hkv, float scale) {               \
        flash_dq_impl<HD>(dq, dout, q, k, v, lse, delta, cu, ntok, hq, hkv, scale);                \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(FL_WARPS * 32) flash_bwd_dkdv_hd##HD##_bf16(      \
        bf16* dk, bf16* dv, const bf16* dout, const bf16* q, const bf16* k, const bf16* v,         \
        const float* lse, const float* delta, const int* cu, int ntok, int hq, int hkv,            \
        float scale) {                                                                             \
        flash_dkdv_impl<HD>(dk, dv, dout, q, k, v, lse, delta, cu, ntok, hq, hkv, scale);          \
    }
FLASH_DEF(32)
FLASH_DEF(64)
FLASH_DEF(128)
