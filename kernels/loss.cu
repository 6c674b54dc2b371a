// Chunked fused cross-entropy over the vocabulary, and the per-token RL loss variants.
//
// The LM head GEMM produces logits one vocabulary chunk at a time ([N, Vc], row stride ld), so
// [N x V] logits never exist. Per row a running (max, sum-exp) pair merges the chunks (online
// log-sum-exp); target logits are picked up by whichever chunk holds them.
//
// defines: xent_fwd_<dt>(m[N], s[N], tgt[N,K], logits[N,ld], ld, v0, vc, targets[N,K], K, N, first)
//            one block (256) per row; first != 0 initialises m/s/tgt.
//          xent_finish_fwd_f32(lse[N], logprob[N,K], m, s, tgt, targets, K, N)
//            lse = m + log(s); logprob = tgt - lse (0 where target < 0).
//          xent_bwd_<dt>(dlogits[N,ldd], ldd, logits[N,ld], ld, v0, vc, targets[N,K], coef[N,K],
//                        lse[N], K, N)
//            dlogits[n,v] = sum_k coef[n,k] * (softmax[n,v] - [v == target[n,k]]), i.e.
//            coef = -dLoss/dlogprob. dlogits may alias logits (same ld).
//          loss_fwd_f32(loss[N], coef[N], logprob[N], sampler_lp[N], adv[N], weights[N] or null,
//                       N, variant, a, b)
//            per-token loss = -objective * w and coef = d objective / d logprob * w for
//            variant 1 importance_sampling, 2 ppo (a = clip low, b = clip high), 3 cispo (a, b),
//            4 dro (a = beta). cross_entropy needs no kernel: coef = weights.
//          loss_term_fwd_f32(out[2, N*K] f64, coef[N,K], logprob[N,K], targets[N,K],
//                            weights[N,K], sampler_lp[N], adv[N], K, N*K, variant, a, b)
//            exactly the engine's LossFn::term, in f64, per target: out[i] = loss term,
//            out[N*K + i] = logprob (widened; one buffer so the host downloads once),
//            coef[i] = -dLoss/dlogprob as f32 (xent_bwd's sign); all 0 where target < 0.
//            variant 0 cross_entropy, 1 importance_sampling, 2 ppo (a = clip low, b = clip
//            high), 3 cispo (a, b), 4 dro (a = beta). Training uses this one, so the step needs
//            no host round trip between the forward and the backward.

#define XENT_THREADS 256

template <typename T>
__device__ void xent_fwd_impl(float* m_run, float* s_run, float* tgt, const T* logits,
                              long long ldl, int v0, int vc, const int* targets, int kt, int n,
                              int first) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= n) return;
    const T* lr = logits + (long long)row * ldl;
    float cm = NEG_INF_F;
    for (int j = threadIdx.x; j < vc; j += blockDim.x) cm = fmaxf(cm, ld(lr + j));
    cm = block_max(cm, scratch);
    float cs = 0.0f;
    for (int j = threadIdx.x; j < vc; j += blockDim.x) cs += __expf(ld(lr + j) - cm);
    cs = block_sum(cs, scratch);
    for (int k = threadIdx.x; k < kt; k += blockDim.x) {
        const int t = targets[(long long)row * kt + k];
        float* dst = tgt + (long long)row * kt + k;
        if (first) *dst = 0.0f;
        if (t >= v0 && t < v0 + vc) *dst = ld(lr + (t - v0));
    }
    if (threadIdx.x == 0) {
        const float m0 = first ? NEG_INF_F : m_run[row];
        const float s0 = first ? 0.0f : s_run[row];
        const float mn = fmaxf(m0, cm);
        // cm is finite unless the whole chunk is -inf; then it contributes nothing.
        const float add = (cm == NEG_INF_F) ? 0.0f : cs * __expf(cm - mn);
        const float keep = (m0 == NEG_INF_F) ? 0.0f : s0 * __expf(m0 - mn);
        m_run[row] = mn;
        s_run[row] = keep + add;
    }
}

extern "C" __global__ void xent_finish_fwd_f32(float* lse, float* logprob, const float* m,
                                               const float* s, const float* tgt,
                                               const int* targets, int kt, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * kt) return;
    const int row = i / kt;
    const float l = m[row] + logf(s[row]);
    if (i % kt == 0) lse[row] = l;
    logprob[i] = targets[i] >= 0 ? tgt[i] - l : 0.0f;
}

template <typename T>
__device__ void xent_bwd_impl(T* dlogits, long long ldd, const T* logits, long long ldl, int v0,
                              int vc, const int* targets, const float* coef, const float* lse,
                              int kt, int n) {
    const int row = blockIdx.x;
    if (row >= n) return;
    const int* tr = targets + (long long)row * kt;
    const float* cr = coef + (long long)row * kt;
    float csum = 0.0f;
    for (int k = 0; k < kt; ++k) csum += tr[k] >= 0 ? cr[k] : 0.0f;
    const float l = lse[row];
    const T* lr = logits + (long long)row * ldl;
    T* dr = dlogits + (long long)row * ldd;
    for (int j = threadIdx.x; j < vc; j += blockDim.x) {
        float g = csum * __expf(ld(lr + j) - l);
        const int v = v0 + j;
        for (int k = 0; k < kt; ++k) g -= (tr[k] == v) ? cr[k] : 0.0f;
        st(dr + j, g);
    }
}

extern "C" __global__ void loss_fwd_f32(float* loss, float* coef, const float* lp,
                                        const float* slp, const float* adv, const float* weights,
                                        int n, int variant, float a, float b) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float w = weights ? weights[i] : 1.0f;
    const float A = adv[i];
    const float r = __expf(lp[i] - slp[i]);
    float obj = 0.0f, g = 0.0f;
    if (variant == 1) {  // importance sampling
        obj = r * A;
        g = r * A;
    } else if (variant == 2) {  // ppo: min(r A, clamp(r, a, b) A)
        const float rc = fminf(fmaxf(r, a), b);
        const float un = r * A, cl = rc * A;
        obj = fminf(un, cl);
        // the clipped branch has zero gradient when the clamp is active
        g = (un <= cl) ? r * A : ((r >= a && r <= b) ? r * A : 0.0f);
    } else if (variant == 3) {  // cispo: stopgrad(clamp(r, a, b)) A logprob
        const float rc = fminf(fmaxf(r, a), b);
        obj = rc * A * lp[i];
        g = rc * A;
    } else if (variant == 4) {  // dro: logprob A - beta/2 (logprob - sampler_lp)^2
        const float dlt = lp[i] - slp[i];
        obj = lp[i] * A - 0.5f * a * dlt * dlt;
        g = A - a * dlt;
    }
    loss[i] = -obj * w;
    coef[i] = g * w;
}

// Rust's f64::clamp: NaN passes through.
__device__ __forceinline__ double clamp_d(double x, double lo, double hi) {
    return x < lo ? lo : (x > hi ? hi : x);
}

extern "C" __global__ void loss_term_fwd_f32(double* out, float* coef, const float* lp,
                                             const int* targets, const float* weights,
                                             const float* slp, const float* adv, int kt, int nk,
                                             int variant, double a, double b) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nk) return;
    const bool valid = targets[i] >= 0;
    const double x = valid ? (double)lp[i] : 0.0;
    double l = 0.0, g = 0.0;
    if (valid) {
        const int row = i / kt;
        const double w = (double)weights[i], s = (double)slp[row], A = (double)adv[row];
        // the same expressions, in the same order, as LossFn::term (src/engine/loss.rs)
        if (variant == 0) {  // cross_entropy
            l = -w * x;
            g = -w;
        } else if (variant == 1) {  // importance_sampling
            const double r = exp(x - s);
            l = -r * A;
            g = -r * A;
        } else if (variant == 2) {  // ppo
            const double r = exp(x - s);
            const double un = r * A;
            const double cl = clamp_d(r, a, b) * A;
            if (un <= cl) {
                l = -un;
                g = -un;
            } else {  // the clamped branch is constant in lp where it is the smaller one
                l = -cl;
                g = 0.0;
            }
        } else if (variant == 3) {  // cispo
            const double r = clamp_d(exp(x - s), a, b);
            l = -r * A * x;
            g = -r * A;
        } else if (variant == 4) {  // dro
            const double d = x - s;
            l = -(x * A - 0.5 * a * d * d);
            g = -(A - a * d);
        }
    }
    out[i] = l;
    out[nk + i] = x;
    coef[i] = -(float)g;
}

#define XENT_DEF(T, DT)                                                                         \
    extern "C" __global__ void xent_fwd_##DT(float* m, float* s, float* tgt, const T* logits,  \
                                             long long ldl, int v0, int vc, const int* targets, \
                                             int kt, int n, int first) {                        \
        xent_fwd_impl<T>(m, s, tgt, logits, ldl, v0, vc, targets, kt, n, first);                \
    }                                                                                           \
    extern "C" __global__ void xent_bwd_##DT(T* dlogits, long long ldd, const T* logits,       \
                                             long long ldl, int v0, int vc, const int* targets, \
                                             const float* coef, const float* lse, int kt,       \
                                             int n) {                                           \
        xent_bwd_impl<T>(dlogits, ldd, logits, ldl, v0, vc, targets, coef, lse, kt, n);         \
    }
FOR_F32_BF16(XENT_DEF)
