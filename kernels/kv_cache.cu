// Paged KV cache for sampling: append new keys/values, and single-token decode attention.
//
// Cache layout: k_cache, v_cache [num_slots, Hkv, hd] with num_slots = num_blocks * block_size;
// sequence b's token t lives in slot block_table[b][t / block_size] * block_size + t % block_size.
//
// defines: kv_append_fwd_<dt>(k_cache, v_cache, k[N,Hkv,hd], v, slots[N], N, row)
//            row = Hkv * hd; slot < 0 skips the token (padding). grid N, block 128.
//          decode_attention_fwd_<dt>(out[B,Hq,hd], q[B,Hq,hd], k_cache, v_cache,
//                                    block_table[B,max_blocks], ctx_lens[B], hq, hkv, hd,
//                                    block_size, max_blocks, num_slots, scale)
//            table entries pointing outside the cache are skipped (never read out of bounds).
//            grid (Hq, B), block 128 (4 warps). Each warp streams every 4th key with an online
//            softmax (lanes split the head dim, so cache reads are coalesced), then the four
//            partial states are merged through shared memory. hd % 32 == 0, hd <= 256.

#define DEC_WARPS 4
#define DEC_MAX_DPL 8

template <typename T>
__device__ void kv_append_impl(T* kc, T* vc, const T* k, const T* v, const int* slots, int n,
                               int row, long long num_slots) {
    int t = blockIdx.x;
    if (t >= n) return;
    int slot = slots[t];
    if (slot < 0 || slot >= num_slots) return;
    const T* ks = k + (long long)t * row;
    const T* vs = v + (long long)t * row;
    T* kd = kc + (long long)slot * row;
    T* vd = vc + (long long)slot * row;
    for (int i = threadIdx.x; i < row; i += blockDim.x) {
        kd[i] = ks[i];
        vd[i] = vs[i];
    }
}

template <typename T>
__device__ void decode_impl(T* out, const T* q, const T* kc, const T* vc, const int* block_table,
                            const int* ctx_lens, int hq, int hkv, int hd, int block_size,
                            int max_blocks, long long num_slots, float scale) {
    __shared__ float sm_m[DEC_WARPS], sm_l[DEC_WARPS];
    __shared__ float sm_acc[DEC_WARPS][DEC_MAX_DPL * 32];
    const int h = blockIdx.x, b = blockIdx.y;
    const int kvh = h / (hq / hkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int dpl = hd >> 5;
    const int len = min(ctx_lens[b], max_blocks * block_size);
    const float qscale = scale * LOG2E_F;

    float qv[DEC_MAX_DPL], acc[DEC_MAX_DPL];
    const T* qrow = q + ((long long)b * hq + h) * hd + lane;
#pragma unroll
    for (int dd = 0; dd < DEC_MAX_DPL; ++dd) {
        qv[dd] = dd < dpl ? ld(qrow + dd * 32) * qscale : 0.0f;
        acc[dd] = 0.0f;
    }
    float m = NEG_INF_F, l = 0.0f;
    const int* table = block_table + (long long)b * max_blocks;
    for (int t = warp; t < len; t += DEC_WARPS) {
        const long long slot = (long long)table[t / block_size] * block_size + t % block_size;
        if (slot < 0 || slot >= num_slots) continue;  // warp-uniform; a bad table entry is skipped
        const long long base = (slot * hkv + kvh) * hd + lane;
        float s = 0.0f;
#pragma unroll
        for (int dd = 0; dd < DEC_MAX_DPL; ++dd)
            if (dd < dpl) s = fmaf(qv[dd], ld(kc + base + dd * 32), s);
        s = warp_sum(s);
        const float m_new = fmaxf(m, s);
        const float corr = exp2f(m - m_new);
        const float p = exp2f(s - m_new);
        l = l * corr + p;
#pragma unroll
        for (int dd = 0; dd < DEC_MAX_DPL; ++dd)
            if (dd < dpl) acc[dd] = fmaf(p, ld(vc + base + dd * 32), acc[dd] * corr);
        m = m_new;
    }
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int dd = 0; dd < DEC_MAX_DPL; ++dd)
        if (dd < dpl) sm_acc[warp][dd * 32 + lane] = acc[dd];
    __syncthreads();
    if (warp != 0) return;
    float gm = NEG_INF_F;
    for (int w = 0; w < DEC_WARPS; ++w) gm = fmaxf(gm, sm_m[w]);
    float gl = 0.0f;
    float w_scale[DEC_WARPS];
    for (int w = 0; w < DEC_WARPS; ++w) {
        // a warp that saw no key has m = -inf and l = 0: its weight is exactly 0
        w_scale[w] = sm_l[w] > 0.0f ? exp2f(sm_m[w] - gm) : 0.0f;
        gl += sm_l[w] * w_scale[w];
    }
    const float inv = gl > 0.0f ? 1.0f / gl : 0.0f;  // len == 0 writes zeros
    T* orow = out + ((long long)b * hq + h) * hd + lane;
#pragma unroll
    for (int dd = 0; dd < DEC_MAX_DPL; ++dd) {
        if (dd < dpl) {
            float o = 0.0f;
            for (int w = 0; w < DEC_WARPS; ++w) o = fmaf(sm_acc[w][dd * 32 + lane], w_scale[w], o);
            st(orow + dd * 32, o * inv);
        }
    }
}

#define KV_CACHE_DEF(T, DT)                                                                      \
    extern "C" __global__ void kv_append_fwd_##DT(T* kc, T* vc, const T* k, const T* v,          \
                                                  const int* slots, int n, int row,              \
                                                  long long num_slots) {                         \
        kv_append_impl<T>(kc, vc, k, v, slots, n, row, num_slots);                                       \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32) decode_attention_fwd_##DT(      \
        T* out, const T* q, const T* kc, const T* vc, const int* block_table,                    \
        const int* ctx_lens, int hq, int hkv, int hd, int block_size, int max_blocks,            \
        long long num_slots, float scale) {                                                      \
        decode_impl<T>(out, q, kc, vc, block_table, ctx_lens, hq, hkv, hd, block_size,           \
                       max_blocks, num_slots, scale);                                                    \
    }
FOR_F32_BF16(KV_CACHE_DEF)
