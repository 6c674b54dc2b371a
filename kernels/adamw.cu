// AdamW on f32 master weights (PyTorch torch.optim.AdamW semantics, decoupled weight decay),
// over one flat buffer: an adapter's LoRA tensors are carved from one allocation, so a single
// launch updates all of them.
//
// defines: adamw_fwd_f32(p, g, m, v, n, lr, beta1, beta2, eps, weight_decay, bc1, bc2, gscale)
//   g' = g * gscale (gscale = min(1, clip / global_norm), computed by the caller)
//   p *= 1 - lr * wd;  m = b1 m + (1 - b1) g';  v = b2 v + (1 - b2) g'^2
//   p -= lr * (m / bc1) / (sqrt(v / bc2) + eps)   with bc1 = 1 - b1^t, bc2 = 1 - b2^t

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
