//! Argument groups the launchers share: buffers that always travel together (a K/V pair, the
//! q/k/v of attention and their gradients, logits with their row stride, a pick's token and
//! logprob), so a launcher's signature names each group once.

use cudarc::driver::{CudaView, CudaViewMut};

use super::loss::chunk_rows;
use crate::engine::cuda::CudaError;

/// Keys and values: a paged cache's two halves, or the new rows appended to it.
#[derive(Debug, Clone, Copy)]
pub struct Kv<V> {
    pub k: V,
    pub v: V,
}

/// Attention's queries, keys and values (inputs as views; gradients as mutable views).
#[derive(Debug, Clone, Copy)]
pub struct Qkv<V> {
    pub q: V,
    pub k: V,
    pub v: V,
}

/// Row-major logits [n, ld] of which the first `cols` columns are read: a whole vocabulary
/// (`cols` = vocab) or one chunk of it.
#[derive(Debug, Clone, Copy)]
pub struct Logits<'r, 'a, T> {
    pub data: &'r CudaView<'a, T>,
    pub ld: usize,
    pub cols: usize,
}

impl<T> Logits<'_, '_, T> {
    /// Checks the layout (`cols` <= ld, whole rows) for kernel `k`; returns n.
    pub(super) fn rows(&self, k: &'static str) -> Result<usize, CudaError> {
        chunk_rows(k, self.data.len(), self.ld, self.cols)
    }
}

/// One pick per row: the token id and its logprob, [n] each.
#[derive(Debug)]
pub struct Picks<'r, 'a> {
    pub token: &'r mut CudaViewMut<'a, i32>,
    pub logprob: &'r mut CudaViewMut<'a, f32>,
}
