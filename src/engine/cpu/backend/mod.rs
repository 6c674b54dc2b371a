//! The host kernels every CPU layer needs (matrix products, RMSNorm, RoPE, SwiGLU, attention)
//! over row-major f32 slices, and the shapes they take. Layers reach them through `backend()`.
//! The GPU engine is not a second implementation of these kernels: it sits behind the runtime
//! seam (`engine::runtime::ModelRuntime`), whole layers at a time, so these are plain methods of
//! [`Cpu`] rather than a trait with a single implementation.

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

/// One sequence's attention inputs, laid out as [`AttnShape`] says.
#[derive(Debug, Clone, Copy)]
pub struct Qkv<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
}

static CPU: Cpu = Cpu;

/// The host kernels.
pub fn backend() -> &'static Cpu {
    &CPU
}
