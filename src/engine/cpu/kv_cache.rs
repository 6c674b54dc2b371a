//! Per-sequence key/value cache for incremental decoding: keys and values of every past
//! position, per layer, laid out `[pos, kv_heads, head_dim]` (post-rope keys).

use crate::engine::models::Model;

/// The cache of one sequence.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
    pub(crate) len: usize,
    /// Floats per position per layer (`kv_heads · head_dim`) of the model it was made for.
    pub(crate) width: usize,
}

impl KvCache {
    /// An empty cache sized for `model`'s layer count.
    pub fn new(model: &Model) -> Self {
        let c = model.config();
        let n = c.num_layers;
        KvCache {
            k: vec![Vec::new(); n],
            v: vec![Vec::new(); n],
            len: 0,
            width: c.num_kv_heads * c.head_dim,
        }
    }

    /// Positions already cached (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
