//! Incremental decoding on the host: the new tokens of many sequences, each group of them with
//! its own adapter (several tenants' requests), in one pass over the base weights. The rows of
//! each group get only their own adapter's LoRA (the segmented linears of `segment.rs`), and
//! each sequence attends to its own cache, so a sequence's logits do not depend on what else
//! is in the pass.

use super::backend::RopeTable;
use super::kv_cache::KvCache;
use super::rowdot::{BaseRows, xwt_fixed_rows};
use super::segment::Segment;
use super::train::head_of;
use super::transformer::Packed;
use crate::engine::batch::check_tokens;
use crate::engine::error::{EngineError, Result};
use crate::engine::lora::Adapter;
use crate::engine::models::Model;

/// Sequences `seqs` (consecutive, counted from where the previous group ended) use `adapter`.
#[derive(Clone, Copy, Debug)]
pub struct DecodeSegment<'a> {
    pub adapter: Option<&'a Adapter>,
    pub seqs: usize,
}

impl Model {
    /// Incremental decoding: feeds `new_tokens[i]` to sequence `i` (prefill when its cache is
    /// empty, one or more tokens later), appends to `caches[i]`, and returns the logits of each
    /// sequence's last new position (`[vocab]` per sequence).
    pub fn forward_cached(
        &self,
        adapter: Option<&Adapter>,
        new_tokens: &[&[u32]],
        caches: &mut [KvCache],
    ) -> Result<Vec<Vec<f32>>> {
        let seg = DecodeSegment { adapter, seqs: new_tokens.len() };
        self.forward_cached_segments(&[seg], new_tokens, caches)
    }

    /// [`forward_cached`](Self::forward_cached) over groups of sequences with different
    /// adapters: `segs` cover `new_tokens` (and `caches`) in order. Nothing is computed or
    /// appended when any input is invalid.
    pub fn forward_cached_segments(
        &self,
        segs: &[DecodeSegment],
        new_tokens: &[&[u32]],
        caches: &mut [KvCache],
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        for a in segs.iter().filter_map(|s| s.adapter) {
            a.check_compatible(self)?;
        }
        let covered: usize = segs.iter().map(|s| s.seqs).sum();
        if new_tokens.len() != caches.len() || covered != caches.len() {
            return Err(EngineError::InvalidInput(format!(
                "{} token lists for {} caches ({covered} in the adapter segments)",
                new_tokens.len(),
                caches.len()
            )));
        }
        let mut tokens = Vec::new();
        let mut seqs = Vec::new();
        let mut positions = Vec::new();
        for (i, (t, cache)) in new_tokens.iter().zip(caches.iter()).enumerate() {
            if t.is_empty() {
                return Err(EngineError::InvalidInput(format!("sequence {i}: no new tokens")));
            }
            if cache.k.len() != c.num_layers || cache.width != c.num_kv_heads * c.head_dim {
                return Err(EngineError::InvalidInput(format!(
                    "sequence {i}: cache built for another model"
                )));
            }
            check_tokens("tokens", i, t, c.vocab_size)?;
            if cache.len + t.len() > c.max_position_embeddings {
                return Err(EngineError::InvalidInput(format!(
                    "sequence {i}: exceeds max_position_embeddings {}",
                    c.max_position_embeddings
                )));
            }
            seqs.push((tokens.len(), t.len()));
            tokens.extend_from_slice(t);
            positions.extend(cache.len as u32..(cache.len + t.len()) as u32);
        }
        let rows = tokens.len();
        let packed = Packed {
            seqs: &seqs,
            rope: RopeTable::new(&positions, c.head_dim, &c.inv_freq),
            rows,
            base: BaseRows::for_decode(&seqs),
        };
        // Row ranges of each adapter segment, from its sequences' rows.
        let mut row_segs = Vec::with_capacity(segs.len());
        let mut first = 0;
        for s in segs {
            let seq_range = &seqs[first..first + s.seqs];
            let start = seq_range.first().map_or(0, |&(r, _)| r);
            let end = seq_range.last().map_or(start, |&(r, n)| r + n);
            row_segs.push(Segment { rows: start..end, adapter: s.adapter });
            first += s.seqs;
        }
        let st = self.forward_stack(&tokens, &packed, &row_segs, Some(caches), false);
        // The head: one base product over every sequence's last row (fixed-order, so a row's
        // logits do not depend on the others), then each segment's lm_head LoRA on its rows.
        let (h, v) = (c.hidden_size, c.vocab_size);
        let mut last = Vec::with_capacity(seqs.len() * h);
        for &(start, len) in &seqs {
            last.extend_from_slice(&st.h_final[(start + len - 1) * h..(start + len) * h]);
        }
        // Each sequence's logits are written in place into the vector it is returned in
        // (`vocab` floats a row: a pass of 8 used to fill one buffer and copy it out, ~1 ms).
        let mut out: Vec<Vec<f32>> = (0..seqs.len()).map(|_| vec![0.0f32; v]).collect();
        {
            let xs: Vec<&[f32]> = last.chunks(h).collect();
            let mut ys: Vec<&mut [f32]> = out.iter_mut().map(Vec::as_mut_slice).collect();
            xwt_fixed_rows(&mut ys, &xs, self.head_weight());
        }
        let mut first = 0;
        for s in segs {
            let head = head_of(self, s.adapter);
            let rows = first..first + s.seqs;
            if head.lora.is_some() && !rows.is_empty() {
                // The segment's rows as one product, as in a contiguous pass.
                let xa = head.xa(&last[rows.start * h..rows.end * h], s.seqs, h);
                let mut block: Vec<f32> = out[rows.clone()].concat();
                head.add_lora(&xa, s.seqs, &mut block);
                for (o, b) in out[rows].iter_mut().zip(block.chunks(v)) {
                    o.copy_from_slice(b);
                }
            }
            first += s.seqs;
        }
        Ok(out)
    }
}
