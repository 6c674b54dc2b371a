// Segmented LoRA (S-LoRA / Punica's SGMV idea): the rows of one call are split into contiguous
// segments, each with its own adapter (or none), so several tenants' rows share one pass over
// the base weights and each row gets only its own tenant's LoRA. A single tenant is one segment.
// LoRA is memory bound on the activations: each activation tensor is read once per kernel and
// the tiny f32 adapter weights stay in L1/L2.
//
// With A [r, K] and B [J, r] (PEFT layout, f32 master weights) and s = alpha / r per segment:
//   forward   h = x A^T              (shrink, W = A)
//             y += s h B^T           (expand, W = B)
//   backward  dh = s dy B            (shrink on dy, W = B)
//             dx += dh A             (expand, W = A)
//             dA += dh^T x           (wgrad into dA)
//             dB += s dy^T h         (wgrad into dB)
// so the B side always carries s and the A side 1.
//
// The adapters arrive as a table: per segment LORA_TAB u64 = (A, B, dA, dB addresses, rank,
// scale as f32 bits). `which` picks the tensor (0 A, 1 B, 2 dA, 3 dB); A-side tensors are
// [r, dim] (rank rows contiguous), B-side ones [dim, r]. A segment whose address is 0 or whose
// rank is 0 has no LoRA here: its blocks return at once. `seg` [nseg + 1] holds the segments'
// global row starts; a call covers global rows row_off .. row_off + n (its pointers start at
// row_off), and `col0` offsets the dim index of a B-side tensor (the output head's vocabulary
// chunks). The rank-space tensors (h, dh) are [n, hs]: a row uses its segment's first r columns.
// The row-space tensor (x, y, dy, dx) is a column window of a wider buffer: element (n, j) is at
// n * tld + toff + j, so a fused projection's output ([rows, q|k|v] or [rows, gate|up]) serves
// each target's LoRA in place (a compact tensor has tld = dim, toff = 0).
//
// Each block works inside one segment: the grid's tile axis enumerates every segment's tiles in
// order (seg_tile), so a row's arithmetic is the same whichever other segments share the call.
//
// defines: lora_seg_<dt>(op, f f32, t T, tab, which, seg, nseg, row_off, n, dim, hs, col0,
//                        tld, toff)
//   op 0, shrink: f[n,k] = s * sum_j t[n,j] W(k,j); grid (tiles of 4 rows), block 256
//   op 1, expand: t[n,j] += s * sum_k f[n,k] W(k,j); grid (ceil(dim/256), tiles of 8 rows),
//            block 256, r <= 256
//   op 2, wgrad: dW(k,j) += s * sum_n f[n,k] t[n,j]; grid (ceil(dim/256), ceil(rmax/8),
//            tiles of 512 rows), block 256, atomics across the row tiles

#define LORA_SHRINK_ROWS 4
#define LORA_EXPAND_ROWS 8
#define LORA_MAX_R 256
#define LORA_WGRAD_K 8
#define LORA_WGRAD_NCHUNK 512
#define LORA_TAB 6

// One segment's adapter tensor as a kernel sees it: W(k, j) = w[k * wk + j * wj].
struct SegW {
    float* w;
    long long wk, wj;
    int r;
    float s;
};

// Finds tile `t` of `tile` rows among the segments' parts inside [row_off, row_off + n) and
// the segment's tensor `which`; false when the tile does not exist or its segment has no LoRA.
// Rows come back local to the call: [*r0, *r1).
__device__ __forceinline__ bool seg_tile(const u64* tab, int which, const int* seg,
                                         int nseg, int row_off, int n, int dim, long long col0,
                                         int tile, int t, SegW* out, int* r0, int* r1) {
    for (int sg = 0; sg < nseg; ++sg) {
        const int lo = max(seg[sg], row_off), hi = min(seg[sg + 1], row_off + n);
        if (hi <= lo) continue;
        const int nt = (hi - lo + tile - 1) / tile;
        if (t >= nt) {
            t -= nt;
            continue;
        }
        const u64* e = tab + (long long)sg * LORA_TAB;
        const int r = (int)e[4];
        if (e[which] == 0ull || r <= 0) return false;
        *r0 = lo + t * tile - row_off;
        *r1 = min(hi, lo + (t + 1) * tile) - row_off;
        float* w = reinterpret_cast<float*>(e[which]);
        out->r = r;
        // the B side carries the scale (y += s h B^T, dh = s dy B, dB += s dy^T h)
        out->s = (which == 1 || which == 3) ? __uint_as_float((u32)e[5]) : 1.0f;
        if (which == 0 || which == 2) {  // [r, dim]
            out->w = w;
            out->wk = dim;
            out->wj = 1;
        } else {  // [dim, r], from column col0 on
            out->w = w + col0 * r;
            out->wk = 1;
            out->wj = r;
        }
        return true;
    }
    return false;
}

template <typename T>
__device__ void lora_shrink_impl(float* h, const T* x, const SegW& w, int n0, int n1, int kdim,
                                 int hs, long long tld) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nwarps = blockDim.x >> 5;
    for (int k = warp; k < w.r; k += nwarps) {
        float acc[LORA_SHRINK_ROWS];
#pragma unroll
        for (int i = 0; i < LORA_SHRINK_ROWS; ++i) acc[i] = 0.0f;
        const float* wrow = w.w + (long long)k * w.wk;
        for (int j = lane; j < kdim; j += 32) {
            const float wv = wrow[(long long)j * w.wj];
#pragma unroll
            for (int i = 0; i < LORA_SHRINK_ROWS; ++i)
                if (n0 + i < n1) acc[i] = fmaf(ld(x + (long long)(n0 + i) * tld + j), wv, acc[i]);
        }
#pragma unroll
        for (int i = 0; i < LORA_SHRINK_ROWS; ++i) {
            const float v = warp_sum(acc[i]);
            if (lane == 0 && n0 + i < n1) h[(long long)(n0 + i) * hs + k] = v * w.s;
        }
    }
}

template <typename T>
__device__ void lora_expand_impl(T* y, const float* h, const SegW& w, int n0, int n1, int jdim,
                                 int hs, long long tld) {
    __shared__ float hsm[LORA_EXPAND_ROWS][LORA_MAX_R];
    for (int idx = threadIdx.x; idx < LORA_EXPAND_ROWS * w.r; idx += blockDim.x) {
        const int i = idx / w.r, k = idx - i * w.r;
        hsm[i][k] = (n0 + i < n1) ? h[(long long)(n0 + i) * hs + k] : 0.0f;
    }
    __syncthreads();
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= jdim) return;
    float acc[LORA_EXPAND_ROWS];
#pragma unroll
    for (int i = 0; i < LORA_EXPAND_ROWS; ++i) acc[i] = 0.0f;
    const float* wcol = w.w + (long long)j * w.wj;
    for (int k = 0; k < w.r; ++k) {
        const float wv = wcol[(long long)k * w.wk];
#pragma unroll
        for (int i = 0; i < LORA_EXPAND_ROWS; ++i) acc[i] = fmaf(hsm[i][k], wv, acc[i]);
    }
#pragma unroll
    for (int i = 0; i < LORA_EXPAND_ROWS; ++i) {
        if (n0 + i < n1) {
            T* p = y + (long long)(n0 + i) * tld + j;
            st(p, ld(p) + w.s * acc[i]);
        }
    }
}

template <typename T>
__device__ void lora_wgrad_impl(const float* u, const T* v, const SegW& w, int n0, int n1,
                                int jdim, int hs, long long tld) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int k0 = blockIdx.y * LORA_WGRAD_K;
    if (j >= jdim || k0 >= w.r) return;
    float acc[LORA_WGRAD_K];
#pragma unroll
    for (int i = 0; i < LORA_WGRAD_K; ++i) acc[i] = 0.0f;
    for (int t = n0; t < n1; ++t) {
        const float vv = ld(v + (long long)t * tld + j);
        const float* urow = u + (long long)t * hs + k0;
#pragma unroll
        for (int i = 0; i < LORA_WGRAD_K; ++i)
            if (k0 + i < w.r) acc[i] = fmaf(urow[i], vv, acc[i]);
    }
#pragma unroll
    for (int i = 0; i < LORA_WGRAD_K; ++i)
        if (k0 + i < w.r)
            atomicAdd(w.w + (long long)(k0 + i) * w.wk + (long long)j * w.wj, w.s * acc[i]);
}

// One entry point for the three products (op 0 shrink, 1 expand, 2 wgrad), so the segment
// lookup and the argument list exist once. (Every op's blocks reserve the expand's 8 KB static
// tile; at 256 threads a block that does not need it loses no occupancy to it on sm_80+.) `f` is the f32 rank-space operand (h / dh: written
// by shrink, read by expand; u: read by wgrad) and `t` the T row-space one (x / dy: read by
// shrink and wgrad; y / dx: accumulated by expand). The tile axis is x for shrink, y for expand
// and z for wgrad (their grids in the header).
template <typename T>
__device__ void lora_seg_impl(int op, float* f, T* t, const u64* tab, int which,
                              const int* seg, int nseg, int row_off, int n, int dim, int hs,
                              long long col0, long long tld, long long toff) {
    const int tile = op == 0 ? LORA_SHRINK_ROWS : (op == 1 ? LORA_EXPAND_ROWS : LORA_WGRAD_NCHUNK);
    const int t_idx = op == 0 ? blockIdx.x : (op == 1 ? blockIdx.y : blockIdx.z);
    SegW w;
    int n0, n1;
    if (!seg_tile(tab, which, seg, nseg, row_off, n, dim, col0, tile, t_idx, &w, &n0, &n1))
        return;
    t += toff;
    if (op == 0) {
        lora_shrink_impl<T>(f, t, w, n0, n1, dim, hs, tld);
    } else if (op == 1) {
        lora_expand_impl<T>(t, f, w, n0, n1, dim, hs, tld);
    } else {
        lora_wgrad_impl<T>(f, t, w, n0, n1, dim, hs, tld);
    }
}

#define LORA_DEF(T, DT)                                                                          \
    extern "C" __global__ void lora_seg_##DT(int op, float* f, T* t, const u64* tab, int which, \
                                             const int* seg, int nseg, int row_off, int n,      \
                                             int dim, int hs, long long col0, long long tld,    \
                                             long long toff) {                                  \
        lora_seg_impl<T>(op, f, t, tab, which, seg, nseg, row_off, n, dim, hs, col0, tld, toff); \
    }
FOR_F32_BF16(LORA_DEF)
