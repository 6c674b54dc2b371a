// Token sampling: a pure function of (logits, temperature, top_k, top_p, uniform draw), the same
// definition as the CPU twin (src/engine/sampling.rs):
//   temperature <= 0: greedy, argmax with the lowest index on ties.
//   otherwise x = logit / T; canonical order = descending x, ties by ascending index;
//   top_k in (0, V): keep the first k in canonical order; top_p in (0, 1): of the kept, keep the
//   smallest canonical prefix whose probability mass reaches p (at least one token);
//   renormalise; return the first token in canonical order whose inclusive cumulative mass
//   exceeds u * total (u in [0, 1)).
//
// defines: sample_fwd_<dt>(out[B] int, logits[B,ld], ld, V, temp[B], top_k[B], top_p[B], u[B])
//   one block of 1024 threads per row; thread t owns the contiguous index range
//   [t*C, (t+1)*C), so "ties by index" is a block exclusive scan of per-thread tie counts.
// Thresholds are found by a most-significant-bit-first search over the order-preserving u32 key
// of x (32 passes per threshold, reading the row from L2); no sort, no workspace.

#define SAMPLE_THREADS 1024
#define INT_BIG 0x7fffffff

__device__ int block_sum_i(int v, int* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Exclusive prefix sum over threads in threadIdx order.
__device__ int block_excl_scan(int v, int* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        int y = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += y;
    }
    __syncthreads();
    if (lane == 31) scratch[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        int w = lane < nw ? scratch[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            int y = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += y;
        }
        if (lane < nw) scratch[lane] = w;  // inclusive warp totals
    }
    __syncthreads();
    const int before = warp > 0 ? scratch[warp - 1] : 0;
    return before + inc - v;
}

__device__ u64 block_max_u64(u64 v, u64* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        u64 y = __shfl_xor_sync(0xffffffffu, v, o);
        v = y > v ? y : v;
    }
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0ull;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        u64 y = __shfl_xor_sync(0xffffffffu, v, o);
        v = y > v ? y : v;
    }
    return v;
}

// Membership of one element in the top-k set (K) and the nucleus (P), walking this thread's
// indices in order. An element with key > tau is in; with key == tau it is in while its rank
// among equal keys (by index, counted from `pre`) is below `need`.
struct Sel {
    u32 tk;
    int need_k, pre_k;
    u32 tp;
    int need_p, pre_p;
};

struct Walk {
    int ck = 0, cp = 0;
    __device__ bool in_k(const Sel& s, u32 key) {
        if (key > s.tk) return true;
        if (key < s.tk) return false;
        return s.pre_k + ck++ < s.need_k;
    }
    __device__ bool in_p(const Sel& s, u32 key) {
        if (key > s.tp) return true;
        if (key < s.tp) return false;
        return s.pre_p + cp++ < s.need_p;
    }
};

template <typename T>
__device__ void sample_impl(int* out, const T* logits, long long ldl, int vocab,
                            const float* temps, const int* topks, const float* topps,
                            const float* uniforms) {
    __shared__ float scf[32];
    __shared__ int sci[32];
    __shared__ u64 scu[32];
    const int b = blockIdx.x;
    const T* row = logits + (long long)b * ldl;
    const int chunk = (vocab + blockDim.x - 1) / blockDim.x;
    const int beg = min(vocab, (int)threadIdx.x * chunk);
    const int end = min(vocab, beg + chunk);

    // argmax of the raw logits, lowest index on ties: max of (key << 32 | ~index)
    u64 best = 0;
    for (int i = beg; i < end; ++i) {
        u64 c = ((u64)float_key(ld(row + i)) << 32) | (u64)(0xffffffffu - (u32)i);
        best = c > best ? c : best;
    }
    best = block_max_u64(best, scu);
    const int amax = (int)(0xffffffffu - (u32)(best & 0xffffffffull));
    const float temp = temps[b];
    if (!(temp > 0.0f)) {
        if (threadIdx.x == 0) out[b] = amax;
        return;
    }
    auto xval = [&](int i) { return ld(row + i) / temp; };
    const float mx = xval(amax);
    const int k = topks[b];
    const float p = topps[b];
    const float u = uniforms[b];

    // count / mass of {members, key >= t} for a stage: 0 = all, 1 = top-k set, 2 = nucleus
    auto pass = [&](const Sel& s, int stage, u32 t, bool want_mass, int* cnt_out, float* mass_out) {
        Walk w;
        int c = 0;
        float m = 0.0f;
        for (int i = beg; i < end; ++i) {
            const float x = xval(i);
            const u32 key = float_key(x);
            bool member = true;
            if (stage >= 1) member = w.in_k(s, key);
            if (stage >= 2 && member) member = w.in_p(s, key);
            if (member && key >= t) {
                ++c;
                if (want_mass) m += __expf(x - mx);
            }
        }
        if (cnt_out) *cnt_out = block_sum_i(c, sci);
        if (mass_out) *mass_out = block_sum(m, scf);
    };
    // per-thread exclusive prefix of #{members of `stage`, key == t}
    auto tie_prefix = [&](const Sel& s, int stage, u32 t) {
        Walk w;
        int c = 0;
        for (int i = beg; i < end; ++i) {
            const u32 key = float_key(xval(i));
            bool member = true;
            if (stage >= 1) member = w.in_k(s, key);
            if (stage >= 2 && member) member = w.in_p(s, key);
            if (member && key == t) ++c;
        }
        return block_excl_scan(c, sci);
    };

    Sel sel;
    sel.tk = 0u;
    sel.need_k = INT_BIG;
    sel.pre_k = 0;
    sel.tp = 0u;
    sel.need_p = INT_BIG;
    sel.pre_p = 0;

    // top-k: tau = the k-th largest key; keep keys above it and the first (k - #above) ties
    if (k > 0 && k < vocab) {
        u32 t = 0u;
        for (int bit = 31; bit >= 0; --bit) {
            const u32 cand = t | (1u << bit);
            int c;
            pass(sel, 0, cand, false, &c, nullptr);
            if (c >= k) t = cand;
        }
        int above = 0;
        if (t != 0xffffffffu) pass(sel, 0, t + 1u, false, &above, nullptr);
        const int pre = tie_prefix(sel, 0, t);
        sel.tk = t;
        sel.need_k = k - above;
        sel.pre_k = pre;
    }

    // top-p: tau = the largest key whose inclusive mass reaches p * Z
    if (p > 0.0f && p < 1.0f) {
        float z;
        pass(sel, 1, 0u, true, nullptr, &z);
        const float target = p * z;
        u32 t = 0u;
        for (int bit = 31; bit >= 0; --bit) {
            const u32 cand = t | (1u << bit);
            float m;
            pass(sel, 1, cand, true, nullptr, &m);
            if (m >= target) t = cand;
        }
        float above = 0.0f;
        if (t != 0xffffffffu) pass(sel, 1, t + 1u, true, nullptr, &above);
        int ties_ge = 0, ties_gt = 0;
        pass(sel, 1, t, false, &ties_ge, nullptr);
        if (t != 0xffffffffu) pass(sel, 1, t + 1u, false, &ties_gt, nullptr);
        const int ties = ties_ge - ties_gt;
        const float q = __expf(key_float(t) - mx);
        int need = q > 0.0f ? (int)ceilf((target - above) / q) : 1;
        need = max(1, min(need, ties));
        const int pre = tie_prefix(sel, 1, t);
        sel.tp = t;
        sel.need_p = need;
        sel.pre_p = pre;
    }

    // invert the CDF: tau = the largest key whose inclusive mass exceeds u * Z'
    float zf;
    pass(sel, 2, 0u, true, nullptr, &zf);
    // mass(key >= 0) is zf exactly (same reduction), so target < zf keeps the search non-empty
    const float target = fminf(u * zf, nextafterf(zf, 0.0f));
    u32 t = 0u;
    for (int bit = 31; bit >= 0; --bit) {
        const u32 cand = t | (1u << bit);
        float m;
        pass(sel, 2, cand, true, nullptr, &m);
        if (m > target) t = cand;
    }
    float above = 0.0f;
    int ties_ge = 0, ties_gt = 0;
    pass(sel, 2, t, false, &ties_ge, nullptr);
    if (t != 0xffffffffu) {
        pass(sel, 2, t + 1u, true, &ties_gt, &above);
    }
    const int ties = ties_ge - ties_gt;
    const float q = __expf(key_float(t) - mx);
    int j = q > 0.0f ? (int)floorf((target - above) / q) : 0;
    j = max(0, min(j, ties - 1));
    const int pre = tie_prefix(sel, 2, t);

    // the owner of tie number j (among members with key == t, by index) writes the answer
    Walk w;
    int c = pre;
    for (int i = beg; i < end; ++i) {
        const u32 key = float_key(xval(i));
        bool member = w.in_k(sel, key);
        if (member) member = w.in_p(sel, key);
        if (member && key == t) {
            if (c == j) out[b] = i;
            ++c;
        }
    }
}

#define SAMPLING_DEF(T, DT)                                                                      \
    extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_fwd_##DT(                \
        int* out, const T* logits, long long ldl, int vocab, const float* temps,                 \
        const int* topks, const float* topps, const float* uniforms) {                           \
        sample_impl<T>(out, logits, ldl, vocab, temps, topks, topps, uniforms);                  \
    }
FOR_F32_BF16(SAMPLING_DEF)
