// AdamW on f32 master weights (PyTorch torch.optim.AdamW semantics, decoupled weight decay).
// adamw_fwd_f32 updates one flat buffer; the *_multi kernels take a device table of an
// adapter's tensors, so a whole optimizer step is two launches (norm, update) regardless of
// the number of LoRA modules, and needs no host round trip for the clip factor.
//
// defines: adamw_fwd_f32(p, g, m, v, n, lr, beta1, beta2, eps, weight_decay, bc1, bc2, gscale)
//   g' = g * gscale (gscale = min(1, clip / global_norm), computed by the caller)
//   p *= 1 - lr * wd;  m = b1 m + (1 - b1) g';  v = b2 v + (1 - b2) g'^2
//   p -= lr * (m / bc1) / (sqrt(v / bc2) + eps)   with bc1 = 1 - b1^t, bc2 = 1 - b2^t
//          sumsq_multi_fwd_f32(acc, ptrs[T*4], lens[T], T): acc[0] += sum over the tensors' g^2
//            grid (x, T), block 256 (blockIdx.y = tensor); ptrs rows are (p, g, m, v) addresses
//          adamw_multi_fwd_f32(ptrs, lens, T, sumsq, clip, lr, b1, b2, eps, wd, bc1, bc2)
//            AdamW on every tensor with gscale = clip / (||g|| + 1e-6) when clip > 0 and
//            ||g|| = sqrt(sumsq[0]) > clip, else 1 (the CPU's rule, in f64), then g = 0
//            (the step's zero_grad). A non-finite sumsq[0] writes nothing (the host refuses
//            the step).

__device__ __forceinline__ void adamw_one(float& p, float g, float& m, float& v, float lr,
                                          float beta1, float beta2, float eps, float wd,
                                          float bc1, float bc2, float gscale) {
    const float gi = g * gscale;
    m = fmaf(beta1, m, (1.0f - beta1) * gi);
    v = fmaf(beta2, v, (1.0f - beta2) * gi * gi);
    const float denom = sqrtf(v / bc2) + eps;
    p = p * (1.0f - lr * wd) - lr * (m / bc1) / denom;
}

extern "C" __global__ void adamw_fwd_f32(float* p, const float* g, float* m, float* v, long long n,
                                         float lr, float beta1, float beta2, float eps, float wd,
                                         float bc1, float bc2, float gscale) {
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long head = 0;
    if (aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v)) {
        head = n / 4 * 4;
        for (long long i = tid * 4; i < head; i += stride * 4) {
            float pp[4], gg[4], mm[4], vv[4];
            ld16(p + i, pp);
            ld16(g + i, gg);
            ld16(m + i, mm);
            ld16(v + i, vv);
#pragma unroll
            for (int j = 0; j < 4; ++j)
                adamw_one(pp[j], gg[j], mm[j], vv[j], lr, beta1, beta2, eps, wd, bc1, bc2, gscale);
            st16(p + i, pp);
            st16(m + i, mm);
            st16(v + i, vv);
        }
    }
    for (long long i = head + tid; i < n; i += stride) {
        float pi = p[i], mi = m[i], vi = v[i];
        adamw_one(pi, g[i], mi, vi, lr, beta1, beta2, eps, wd, bc1, bc2, gscale);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
}

extern "C" __global__ void sumsq_multi_fwd_f32(float* acc, const unsigned long long* ptrs,
                                               const long long* lens, int nt) {
    __shared__ float scratch[32];
    const int t = blockIdx.y;
    if (t >= nt) return;
    const float* g = reinterpret_cast<const float*>(ptrs[t * 4 + 1]);
    const long long n = lens[t];
    float s = 0.0f;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        s = fmaf(g[i], g[i], s);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) atomicAdd(acc, s);
}

extern "C" __global__ void adamw_multi_fwd_f32(const unsigned long long* ptrs,
                                               const long long* lens, int nt,
                                               const float* sumsq, double clip, float lr,
                                               float beta1, float beta2, float eps, float wd,
                                               float bc1, float bc2) {
    const int t = blockIdx.y;
    if (t >= nt) return;
    float* p = reinterpret_cast<float*>(ptrs[t * 4]);
    float* g = reinterpret_cast<float*>(ptrs[t * 4 + 1]);
    float* m = reinterpret_cast<float*>(ptrs[t * 4 + 2]);
    float* v = reinterpret_cast<float*>(ptrs[t * 4 + 3]);
    const long long n = lens[t];
    // A non-finite gradient (inf/NaN anywhere makes the sum of squares inf or NaN) is refused
    // before anything is written, so the host can report it with the adapter unchanged. The
    // comparison is false for NaN as well as for +inf.
    if (!(sumsq[0] <= 3.402823466e+38f)) return;
    const double norm = sqrt((double)sumsq[0]);
    const float gscale = (clip > 0.0 && norm > clip) ? (float)(clip / (norm + 1e-6)) : 1.0f;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float pi = p[i], mi = m[i], vi = v[i];
        adamw_one(pi, g[i], mi, vi, lr, beta1, beta2, eps, wd, bc1, bc2, gscale);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
        g[i] = 0.0f;
    }
}
