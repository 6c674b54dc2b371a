// AdamW on f32 master weights (PyTorch torch.optim.AdamW semantics, decoupled weight decay),
// over one flat buffer: an adapter's LoRA tensors are carved from one allocation, so a single
// launch updates all of them.
//
// defines: adamw_fwd_f32(p, g, m, v, n, lr, beta1, beta2, eps, weight_decay, bc1, bc2, gscale)
//   g' = g * gscale (gscale = min(1, clip / global_norm), computed by the caller)
//   p *= 1 - lr * wd;  m = b1 m + (1 - b1) g';  v = b2 v + (1 - b2) g'^2
//   p -= lr * (m / bc1) / (sqrt(v / bc2) + eps)   with bc1 = 1 - b1^t, bc2 = 1 - b2^t

extern "C" __global__ void adamw_fwd_f32(float* p, const float* g, float* m, float* v, long long n,
                                         float lr, float beta1, float beta2, float eps, float wd,
                                         float bc1, float bc2, float gscale) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float gi = g[i] * gscale;
        const float mi = fmaf(beta1, m[i], (1.0f - beta1) * gi);
        const float vi = fmaf(beta2, v[i], (1.0f - beta2) * gi * gi);
        m[i] = mi;
        v[i] = vi;
        const float denom = sqrtf(vi / bc2) + eps;
        p[i] = p[i] * (1.0f - lr * wd) - lr * (mi / bc1) / denom;
    }
}
