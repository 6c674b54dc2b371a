//! The backend boundary: every numeric kernel the engine needs, as one trait over row-major f32
//! slices. Layers call `backend()` and never a concrete implementation, so device dispatch lives
//! here only; a CUDA backend implements the same trait (a missing op is a compile error).

mod cpu;
pub mod profile;
#[cfg(test)]
mod tests;

pub use cpu::Cpu;
pub(crate) use cpu::exp_shift;

/// Shape and layout of one matrix product `out[m,n] (+)= op(a)[m,k] · op(b)[k,n]`.
#[derive(Debug, Clone, Copy)]
pub struct MatMul {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// `a` is stored as `[k, m]` (use its transpose).
    pub trans_a: bool,
    /// `b` is stored as `[n, k]` (use its transpose) — the layout of a `[out, in]` weight.
    pub trans_b: bool,
    /// Add into `out` instead of overwriting it.
    pub accumulate: bool,
}

impl MatMul {
    /// `out[m,n] = x[m,k] · w[n,k]ᵀ`: a linear layer with an HF `[out, in]` weight.
    pub fn linear(m: usize, k: usize, n: usize) -> Self {
        MatMul { m, k, n, trans_a: false, trans_b: true, accumulate: false }
    }
    pub fn acc(mut self) -> Self {
        self.accumulate = true;
        self
    }
}

/// Row strides of `out` (`≥ n`) and of `b` as stored (`≥ n`, or `≥ k` when `trans_b`).
#[derive(Debug, Clone, Copy)]
pub struct Strides {
    pub out: usize,
    pub b: usize,
}

/// Rotary-embedding cos/sin table for a list of positions: row `t` holds the `head_dim/2`
/// angles of position `positions[t]`.
#[derive(Debug, Clone)]
pub struct RopeTable {
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTable {
    /// HF "default" rope: `inv_freq[i] = theta^(-2i/head_dim)`, angles computed in f64.
    pub fn new(positions: &[u32], head_dim: usize, inv_freq: &[f64]) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in inv_freq.iter().take(half) {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        RopeTable { half, cos, sin }
    }
}

/// One sequence's attention problem: `q` `[n_q, n_heads, head_dim]`, `k`/`v`
/// `[n_k, n_kv_heads, head_dim]`, causal with the queries being the LAST `n_q` of the `n_k`
/// positions (training: `n_q == n_k`; decoding with a cache: `n_k = past + n_q`).
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub n_q: usize,
    pub n_k: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// The kernels. All tensors are row-major f32 slices; shapes are given explicitly and checked by
/// the implementation (a mismatch is a programming error inside the engine, not user input).
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;

    /// `out (+)= op(a) · op(b)`, `out` and `b` contiguous.
    fn matmul(&self, out: &mut [f32], a: &[f32], b: &[f32], mm: MatMul) {
        let ld = Strides { out: mm.n, b: if mm.trans_b { mm.k } else { mm.n } };
        self.matmul_ld(out, a, b, mm, ld)
    }

    /// `out (+)= op(a) · op(b)` where `out` and the stored `b` are blocks of wider row-major
    /// matrices (row strides in `ld`): the weight panels of `cpu::wmatmul`.
    fn matmul_ld(&self, out: &mut [f32], a: &[f32], b: &[f32], mm: MatMul, ld: Strides);

    /// RMSNorm over rows of width `dim`: `out = x / sqrt(mean(x²) + eps) * w`; saves `rstd` per row.
    fn rmsnorm_fwd(
        &self,
        x: &[f32],
        w: &[f32],
        dim: usize,
        eps: f32,
        out: &mut [f32],
        rstd: &mut [f32],
    );
    /// Gradient of `rmsnorm_fwd` w.r.t. `x` (the weight is frozen).
    fn rmsnorm_bwd(
        &self,
        dy: &[f32],
        x: &[f32],
        w: &[f32],
        rstd: &[f32],
        dim: usize,
        dx: &mut [f32],
    );

    /// Rotary embedding in place on `x` `[rows, n_heads, head_dim]` (rotate-half layout), row
    /// `t` using table row `t`. `inverse` rotates by the negative angle (the backward pass).
    fn rope(
        &self,
        x: &mut [f32],
        n_heads: usize,
        head_dim: usize,
        table: &RopeTable,
        inverse: bool,
    );

    /// `out = silu(g) * u`.
    fn swiglu_fwd(&self, g: &[f32], u: &[f32], out: &mut [f32]);
    /// Gradients of `swiglu_fwd` w.r.t. `g` and `u`.
    fn swiglu_bwd(&self, dout: &[f32], g: &[f32], u: &[f32], dg: &mut [f32], du: &mut [f32]);

    /// Causal softmax attention of one sequence, scale `1/sqrt(head_dim)`, grouped-query heads.
    /// Writes `out` `[n_q, n_heads, head_dim]` and the per-row log-sum-exp `lse` `[n_heads, n_q]`.
    fn attention_fwd(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: AttnShape,
        out: &mut [f32],
        lse: &mut [f32],
    );
    /// Backward of `attention_fwd` (probabilities recomputed from `lse`); overwrites dq, dk, dv.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        dout: &[f32],
        s: AttnShape,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    );
}

static CPU: Cpu = Cpu;

/// The backend in use. Only the CPU backend exists today; this is the one place a device would
/// be chosen.
pub fn backend() -> &'static dyn Backend {
    &CPU
}
