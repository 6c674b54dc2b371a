// Paged KV cache for sampling: append new keys/values, and single-token decode attention.
//
// Cache layout: k_cache, v_cache [num_slots, Hkv, hd] with num_slots = num_blocks * block_size;
// sequence b's token t lives in slot block_table[b][t / block_size] * block_size + t % block_size.
//
// defines: kv_append_fwd_<dt>(k_cache, v_cache, k[N,Hkv,hd], v, slots[N], N, row)
//            row = Hkv * hd; slot < 0 skips the token (padding). grid N, block 128.
//          decode_split_fwd_<dt>(ws, q[B,Hq,hd], k_cache, v_cache, block_table[B,max_blocks],
//                                ctx_lens[B], hq, hkv, hd, block_size, max_blocks, num_slots,
//                                scale)
//            split-KV ("flash-decoding") phase 1. grid (splits, Hkv * passes, B), block
//            32 * min(group, DEC_HEADS) with group = Hq / Hkv and passes = ceil(group /
//            DEC_HEADS): one block per (split, kv head, sequence) serves up to DEC_HEADS query
//            heads of the kv head's group (one warp each, lanes split the head dim), so each
//            cached K/V row is read from global memory once per kv head rather than once per
//            query head. Static smem: K and V tiles of DEC_TK keys as f32 (2 x 16 x 256 x 4 =
//            32 KiB) and DEC_TK flags. Sequence b's context (ctx_lens[b] clamped to
//            [0, max_blocks * block_size]) is cut into `splits` chunks of max(ceil(len / splits),
//            DEC_MIN_CHUNK) keys; split i streams its chunk tile by tile with an online softmax
//            (log2 domain) and writes its partial state (m, l, acc[hd], f32) to the workspace;
//            a split past the context writes m = -inf, l = 0 and no acc. Table entries pointing
//            outside the cache are skipped (never read out of bounds). hd % 32 == 0, hd <= 256.
//          decode_combine_fwd_<dt>(out[B,Hq,hd], ws, hq, hd, splits)
//            phase 2. grid (Hq, B), block hd: merges the splits' states of one (sequence, head),
//            each weighted by exp2(m_i - m_max); splits with l = 0 are skipped (their acc is
//            never written). An empty context writes zeros.
//
// Workspace ws (f32): [B, Hq, splits, 2] (m, l), then [B, Hq, splits, hd] (acc).

#define DEC_TK 16         // keys per shared-memory tile
#define DEC_HEADS 8       // query heads (warps) per phase-1 block
#define DEC_MIN_CHUNK 64  // fewest keys a split covers (launch/decode.rs sizes the split count)
#define DEC_MAX_DPL 8     // head-dim elements per lane (hd <= 256)

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
__device__ void decode_split_impl(float* ws, const T* q, const T* kc, const T* vc,
                                  const int* block_table, const int* ctx_lens, int hq, int hkv,
                                  int hd, int block_size, int max_blocks, long long num_slots,
                                  float scale) {
    // tiles as f32: a bf16 element is converted once here, not once per query head
    __shared__ float sk[DEC_TK * DEC_MAX_DPL * 32];
    __shared__ float sv[DEC_TK * DEC_MAX_DPL * 32];
    __shared__ int s_ok[DEC_TK];
    const int splits = gridDim.x, split = blockIdx.x, b = blockIdx.z;
    const int group = hq / hkv;
    const int passes = (group + DEC_HEADS - 1) / DEC_HEADS;
    const int kvh = blockIdx.y / passes;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const int gi = (blockIdx.y % passes) * DEC_HEADS + warp;  // this warp's head in the group
    const bool active = gi < group;  // the last pass of a group may have idle warps
    const int h = kvh * group + gi;
    const int dpl = hd >> 5;
    const long long len =
        max(0LL, min((long long)ctx_lens[b], (long long)max_blocks * block_size));
    // every sequence has the same number of splits, so a context longer than the launcher's
    // estimate is still covered in full (by longer chunks)
    const long long chunk = max((len + splits - 1) / splits, (long long)DEC_MIN_CHUNK);
    const long long t0 = split * chunk, t1 = min(t0 + chunk, len);
    const long long state = ((long long)b * hq + h) * splits + split;
    float* ws_ml = ws;
    float* ws_acc = ws + 2LL * gridDim.z * hq * splits;
    if (t0 >= t1) {  // block-uniform: no key of this sequence falls in this split
        if (active && lane == 0) {
            ws_ml[2 * state] = NEG_INF_F;
            ws_ml[2 * state + 1] = 0.0f;
        }
        return;
    }

    const float qscale = scale * LOG2E_F;
    float qv[DEC_MAX_DPL], acc[DEC_MAX_DPL];
    const T* qrow = q + ((long long)b * hq + (active ? h : 0)) * hd + lane;
#pragma unroll
    for (int dd = 0; dd < DEC_MAX_DPL; ++dd) {
        qv[dd] = dd < dpl ? ld(qrow + dd * 32) * qscale : 0.0f;
        acc[dd] = 0.0f;
    }
    float m = NEG_INF_F, l = 0.0f;
    const int* table = block_table + (long long)b * max_blocks;
    for (long long tt = t0; tt < t1; tt += DEC_TK) {
        // stage keys tt .. tt + DEC_TK: warp w loads rows w, w + nw, ...; a row past the chunk
        // or whose table entry points outside the cache is zero and flagged off
        for (int j = warp; j < DEC_TK; j += nw) {
            const long long t = tt + j;
            long long slot = -1;
            if (t < t1) {
                slot = (long long)table[t / block_size] * block_size + t % block_size;
                if (slot >= num_slots) slot = -1;
            }
            const long long base = (slot * hkv + kvh) * hd;
            for (int d = lane; d < hd; d += 32) {
                sk[j * hd + d] = slot >= 0 ? ld(kc + base + d) : 0.0f;
                sv[j * hd + d] = slot >= 0 ? ld(vc + base + d) : 0.0f;
            }
            if (lane == 0) s_ok[j] = slot >= 0;
        }
        // tile staged -> read by every warp (barriers stand alone on their line for
        // tools/cuda-emu/mutation-check.sh)
        __syncthreads();
        if (active) {  // warp-uniform
            float sc[DEC_TK];
            float tmax = NEG_INF_F;
#pragma unroll
            for (int j = 0; j < DEC_TK; ++j) {
                float s = 0.0f;
#pragma unroll
                for (int dd = 0; dd < DEC_MAX_DPL; ++dd)
                    if (dd < dpl) s = fmaf(qv[dd], sk[j * hd + dd * 32 + lane], s);
                s = warp_sum(s);
                sc[j] = s_ok[j] ? s : NEG_INF_F;
                tmax = fmaxf(tmax, sc[j]);
            }
            const float m_new = fmaxf(m, tmax);
            // warp-uniform; while no valid key has been seen, exp2(-inf - -inf) would be NaN
            if (m_new != NEG_INF_F) {
                const float corr = exp2f(m - m_new);  // 0 on the first valid tile
                l *= corr;
#pragma unroll
                for (int dd = 0; dd < DEC_MAX_DPL; ++dd) acc[dd] *= corr;
#pragma unroll
                for (int j = 0; j < DEC_TK; ++j) {
                    const float p = exp2f(sc[j] - m_new);  // 0 for a flagged-off row (its V is 0)
                    l += p;
#pragma unroll
                    for (int dd = 0; dd < DEC_MAX_DPL; ++dd)
                        if (dd < dpl) acc[dd] = fmaf(p, sv[j * hd + dd * 32 + lane], acc[dd]);
                }
                m = m_new;
            }
        }
        // every warp is done with the tile before the next one overwrites it
        __syncthreads();
    }
    if (!active) return;
    // a chunk whose every table entry was skipped leaves m = -inf, l = 0: the combine skips it
    if (lane == 0) {
        ws_ml[2 * state] = m;
        ws_ml[2 * state + 1] = l;
    }
    float* arow = ws_acc + state * hd + lane;
#pragma unroll
    for (int dd = 0; dd < DEC_MAX_DPL; ++dd)
        if (dd < dpl) arow[dd * 32] = acc[dd];
}

template <typename T>
__device__ void decode_combine_impl(T* out, const float* ws, int hq, int hd, int splits) {
    const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
    if (d >= hd) return;
    const long long r0 = ((long long)b * hq + h) * splits;
    const float* ml = ws + 2 * r0;
    const float* accs = ws + 2LL * gridDim.y * hq * splits + r0 * hd + d;
    float gm = NEG_INF_F;
    for (int i = 0; i < splits; ++i)
        if (ml[2 * i + 1] > 0.0f) gm = fmaxf(gm, ml[2 * i]);
    float gl = 0.0f, o = 0.0f;
    for (int i = 0; i < splits; ++i) {
        const float li = ml[2 * i + 1];
        if (li > 0.0f) {  // an empty split wrote no acc (the workspace holds garbage there)
            const float w = exp2f(ml[2 * i] - gm);
            gl = fmaf(li, w, gl);
            o = fmaf(accs[(long long)i * hd], w, o);
        }
    }
    st(out + ((long long)b * hq + h) * hd + d, gl > 0.0f ? o / gl : 0.0f);  // len 0 writes zeros
}

#define KV_CACHE_DEF(T, DT)                                                                      \
    extern "C" __global__ void kv_append_fwd_##DT(T* kc, T* vc, const T* k, const T* v,          \
                                                  const int* slots, int n, int row,              \
                                                  long long num_slots) {                         \
        kv_append_impl<T>(kc, vc, k, v, slots, n, row, num_slots);                               \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(DEC_HEADS * 32) decode_split_fwd_##DT(          \
        float* ws, const T* q, const T* kc, const T* vc, const int* block_table,                 \
        const int* ctx_lens, int hq, int hkv, int hd, int block_size, int max_blocks,            \
        long long num_slots, float scale) {                                                      \
        decode_split_impl<T>(ws, q, kc, vc, block_table, ctx_lens, hq, hkv, hd, block_size,      \
                             max_blocks, num_slots, scale);                                      \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(DEC_MAX_DPL * 32)                               \
        decode_combine_fwd_##DT(T* out, const float* ws, int hq, int hd, int splits) {           \
        decode_combine_impl<T>(out, ws, hq, hd, splits);                                         \
    }
FOR_F32_BF16(KV_CACHE_DEF)
