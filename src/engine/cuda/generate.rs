//! Feeding tokens to KV caches on the GPU: prefill of empty slots and incremental decode, each
//! returning the last-position logits of every sequence, and several requests' decode steps
//! (each its own adapter and cache) in one pass over the base weights
//! ([`CudaModel::forward_cached_many_device`]): the rows of all requests go through every GEMM
//! and the output head together, each row with its own request's LoRA (segmented kernels) and
//! its own cache in attention.

use cudarc::driver::CudaSlice;

use super::CudaError;
use super::adapter::CudaAdapter;
use super::decode::{CudaKvCache, invalid};
use super::layer::{DecodeGroup, DecodeRows, KvMode, Pack};
use super::model::{Act, CudaModel, R, scratch, upload_ws, view, view_mut};
use super::segment::{SegLora, SegSpec};
use super::workspace::Buf;
use crate::engine::batch::CachedGroup;

/// The host side of one decode step: what is uploaded before it runs.
pub(crate) struct StepHost<'a, T: Act> {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub specs: Vec<SegSpec<'a>>,
    pub groups: Vec<GroupHost<'a, T>>,
}

/// One cache's rows of a [`StepHost`]: slots, cache rows and context lengths per sequence, the
/// sequence slots fed (whose lengths grow by one when the step succeeds) and the cache.
pub(crate) struct GroupHost<'a, T: Act> {
    pub rows: std::ops::Range<usize>,
    pub idx: DecodeRows<Vec<i32>>,
    /// The split-KV decode's context hint: the longest context rounded up to a power of two
    /// (at least 64), so that it changes rarely and a captured graph (which bakes in the split
    /// count) serves many tokens; correctness never depends on it.
    pub max_ctx: usize,
    pub fed: Vec<usize>,
    pub cache: &'a mut CudaKvCache<T>,
}

/// A staged decode step: packed tokens, LoRA tables, attention groups, sequences fed per group.
pub(crate) type Staged<'a, T> = (Pack, SegLora, KvMode<'a, T>, Vec<Vec<usize>>);

/// After a successful step: each fed sequence holds one more token.
pub(crate) fn finish_step<T: Act>(kv: KvMode<'_, T>, fed: Vec<Vec<usize>>) {
    if let KvMode::Decode(groups) = kv {
        for (g, seqs) in groups.into_iter().zip(fed) {
            g.cache.advance(&seqs);
        }
    }
}

/// One cache's share of a decode step: its adapter, its cache and (slot, token) per sequence.
struct StepGroup<'a, T: Act> {
    adapter: Option<&'a CudaAdapter>,
    cache: &'a mut CudaKvCache<T>,
    items: Vec<(usize, u32)>,
}

impl<T: Act> CudaModel<T> {
    /// Logits [b, vocab] (f32) of hidden rows `h` [b, hidden], each row with its segment's
    /// lm_head LoRA from `lora` (whose segments cover these b rows).
    pub(crate) fn logits_rows(&self, h: &CudaSlice<T>, b: usize, lora: &SegLora) -> R<Buf<f32>> {
        let (hid, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let hv = view(h, 0, b * hid)?;
        // written by the GEMM (beta = 0); LoRA adds to it
        let mut out = scratch::<f32>(&self.dev, b * v)?;
        let head = lora.head()?;
        let ha = self.head_shrink(&hv, 0..b, head.as_ref())?;
        let lo = head.as_ref().zip(ha.as_ref());
        self.head_chunk(&mut view_mut(&mut out, 0, b * v)?, &hv, 0..b, 0, v, self.head_w(), lo)?;
        Ok(out)
    }

    /// Prefill of empty slots: `items` = (slot, tokens). Returns last-position logits [B, V].
    fn prefill(
        &self,
        ad: Option<&CudaAdapter>,
        cache: &mut CudaKvCache<T>,
        items: &[(usize, &[u32])],
    ) -> R<Buf<f32>> {
        let hid = self.cfg.hidden_size;
        let (mut tokens, mut seqs, mut positions, mut slots) = (vec![], vec![], vec![], vec![]);
        for &(s, t) in items {
            seqs.push((tokens.len(), t.len()));
            tokens.extend_from_slice(t);
            positions.extend(0..t.len() as u32);
            slots.extend((0..t.len()).map(|p| (s * cache.max_len + p) as i32));
        }
        let p = Pack::new(self, &tokens, &seqs, &positions)?;
        let slots = upload_ws(&self.dev, &slots)?;
        let one = |rows| SegLora::new(self, &[SegSpec { rows, adapter: ad, train: false }]);
        let lora = one(0..tokens.len())?;
        let st = self.stack_fwd(&p, &lora, &mut KvMode::Prefill { slots: &slots, cache }, false)?;
        // every row is copied in below
        let mut last = scratch::<T>(&self.dev, items.len() * hid)?;
        for (i, &(start, len)) in seqs.iter().enumerate() {
            let r = start + len - 1;
            self.dev
                .stream()
                .memcpy_dtod(
                    &view(&st.h_final, r * hid, (r + 1) * hid)?,
                    &mut view_mut(&mut last, i * hid, (i + 1) * hid)?,
                )
                .map_err(CudaError::driver("gathering last rows"))?;
        }
        for &(s, t) in items {
            cache.lens[s] += t.len();
        }
        self.logits_rows(&last, items.len(), &one(0..items.len())?)
    }

    /// One new token per listed slot of each group's cache, all groups in one pass. Returns
    /// logits [B, V], the groups' rows in order. Runs as a replay of a captured CUDA graph when
    /// one fits (`graph.rs`), else kernel by kernel.
    fn decode_step(&self, groups: Vec<StepGroup<'_, T>>) -> R<Buf<f32>> {
        let (mut tokens, mut positions, mut specs) = (vec![], vec![], vec![]);
        let mut hosts = Vec::with_capacity(groups.len());
        for g in groups {
            let (c, r0) = (&*g.cache, tokens.len());
            let slot_of = |&(s, _): &(usize, u32)| (s * c.max_len + c.lens[s]) as i32;
            let slots: Vec<i32> = g.items.iter().map(slot_of).collect();
            let table: Vec<i32> = g.items.iter().map(|&(s, _)| s as i32).collect();
            let ctx: Vec<i32> = g.items.iter().map(|&(s, _)| c.lens[s] as i32 + 1).collect();
            positions.extend(g.items.iter().map(|&(s, _)| c.lens[s] as u32));
            tokens.extend(g.items.iter().map(|x| x.1));
            let rows = r0..tokens.len();
            specs.push(SegSpec { rows: rows.clone(), adapter: g.adapter, train: false });
            let fed = g.items.iter().map(|x| x.0).collect();
            let longest = ctx.iter().map(|&c| c as usize).max().unwrap_or(0);
            let max_ctx = longest.next_power_of_two().max(64);
            let idx = DecodeRows { slots, table, ctx };
            hosts.push(GroupHost { rows, idx, max_ctx, fed, cache: g.cache });
        }
        let step = StepHost { tokens, positions, specs, groups: hosts };
        if self.graphs_usable() {
            return self.decode_step_graphed(step);
        }
        self.decode_plain(step)
    }

    /// A decode step launched kernel by kernel.
    pub(crate) fn decode_plain(&self, step: StepHost<'_, T>) -> R<Buf<f32>> {
        let (p, lora, mut kv, fed) = self.stage_step(step)?;
        let st = self.stack_fwd(&p, &lora, &mut kv, false)?;
        finish_step(kv, fed);
        self.logits_rows(&st.h_final, p.rows, &lora)
    }

    /// Uploads a decode step's inputs: the packed tokens, the LoRA tables and each group's
    /// slots, cache rows and context lengths. Returns them with the sequences fed per group.
    pub(crate) fn stage_step<'a>(&self, step: StepHost<'a, T>) -> R<Staged<'a, T>> {
        let dev = &*self.dev;
        let b = step.tokens.len();
        let seqs: Vec<(usize, usize)> = (0..b).map(|i| (i, 1)).collect();
        let p = Pack::new(self, &step.tokens, &seqs, &step.positions)?;
        let lora = SegLora::new(self, &step.specs)?;
        let mut decode = Vec::with_capacity(step.groups.len());
        let mut fed = Vec::with_capacity(step.groups.len());
        for g in step.groups {
            let idx = g.idx.upload(dev)?;
            decode.push(DecodeGroup { rows: g.rows, idx, max_ctx: g.max_ctx, cache: g.cache });
            fed.push(g.fed);
        }
        Ok((p, lora, KvMode::Decode(decode), fed))
    }

    /// Feeds `g.tokens[i]` to cache slot `g.slots[i]` of `g.cache` (prefill when the slot is
    /// empty, one or more tokens later) with `g.adapter`, and returns the logits of each
    /// sequence's last new position, on the device, [n, vocab] f32 in the order given.
    pub fn forward_cached_device(
        &self,
        g: &mut CachedGroup<'_, CudaAdapter, CudaKvCache<T>>,
    ) -> R<CudaSlice<f32>> {
        let _pass = self.dev.ws().pass();
        self.check_feed(g.cache, g.slots, g.tokens)?;
        let (ad, cache, seqs, new_tokens) = (g.adapter, &mut *g.cache, g.slots, g.tokens);
        let n = seqs.len();
        let v = self.cfg.vocab_size;
        // every sequence's row is put below exactly once
        let mut out = scratch::<f32>(&self.dev, n * v)?;
        // copies row j of `logits` to row i of `out` for each (j, i)
        let put = |pairs: &[(usize, usize)], logits: &Buf<f32>, out: &mut Buf<f32>| -> R<()> {
            for &(j, i) in pairs {
                self.dev
                    .stream()
                    .memcpy_dtod(
                        &view(logits, j * v, (j + 1) * v)?,
                        &mut view_mut(out, i * v, (i + 1) * v)?,
                    )
                    .map_err(CudaError::driver("collecting logits"))?;
            }
            Ok(())
        };
        let step = |cache: &mut CudaKvCache<T>, items| {
            self.decode_step(vec![StepGroup { adapter: ad, cache, items }])
        };
        let pre: Vec<usize> = (0..n).filter(|&i| cache.lens[seqs[i]] == 0).collect();
        // the common cases need no regrouping: all prefill, or one token for every sequence
        if pre.len() == n {
            let items: Vec<(usize, &[u32])> =
                seqs.iter().copied().zip(new_tokens.iter().copied()).collect();
            return self.prefill(ad, cache, &items).map(Buf::into_slice);
        }
        if pre.is_empty() && new_tokens.iter().all(|t| t.len() == 1) {
            let items = seqs.iter().zip(new_tokens).map(|(&s, t)| (s, t[0])).collect();
            return step(cache, items).map(Buf::into_slice);
        }
        if !pre.is_empty() {
            let items: Vec<(usize, &[u32])> =
                pre.iter().map(|&i| (seqs[i], new_tokens[i])).collect();
            let logits = self.prefill(ad, cache, &items)?;
            let pairs: Vec<(usize, usize)> = pre.iter().copied().enumerate().collect();
            put(&pairs, &logits, &mut out)?;
        }
        let rest: Vec<usize> = (0..n).filter(|i| !pre.contains(i)).collect();
        let steps = rest.iter().map(|&i| new_tokens[i].len()).max().unwrap_or(0);
        for k in 0..steps {
            let active: Vec<usize> =
                rest.iter().copied().filter(|&i| new_tokens[i].len() > k).collect();
            let logits =
                step(cache, active.iter().map(|&i| (seqs[i], new_tokens[i][k])).collect())?;
            let done: Vec<(usize, usize)> = active
                .iter()
                .enumerate()
                .filter(|&(_, &i)| new_tokens[i].len() == k + 1)
                .map(|(j, &i)| (j, i))
                .collect();
            put(&done, &logits, &mut out)?;
        }
        // the logits leave the engine: detached from the workspace, freed by the caller's drop
        Ok(out.into_slice())
    }

    /// [`Self::forward_cached_device`] of several requests' groups, one result per group in
    /// order. The groups that only decode (one token for each of their sequences, none empty)
    /// share one pass over the base weights; the others (prefills) run one after another. A
    /// group with invalid input fails alone with its cache untouched; when the shared pass
    /// fails, each of its groups gets the error and its caches keep their lengths (what the
    /// pass wrote past them is overwritten by the next token).
    pub fn forward_cached_many_device(
        &self,
        groups: &mut [CachedGroup<'_, CudaAdapter, CudaKvCache<T>>],
    ) -> Vec<R<CudaSlice<f32>>> {
        let mut results: Vec<Option<R<CudaSlice<f32>>>> = groups.iter().map(|_| None).collect();
        let mut shared = Vec::new();
        for (i, g) in groups.iter_mut().enumerate() {
            if let Err(e) = self.check_feed(g.cache, g.slots, g.tokens) {
                results[i] = Some(Err(e));
            } else if g.tokens.iter().all(|t| t.len() == 1)
                && g.slots.iter().all(|&s| g.cache.lens[s] > 0)
            {
                shared.push(i);
            } else {
                results[i] = Some(self.forward_cached_device(g));
            }
        }
        if let [i] = shared[..] {
            results[i] = Some(self.forward_cached_device(&mut groups[i]));
        } else if !shared.is_empty() {
            let _pass = self.dev.ws().pass();
            let mut step = Vec::with_capacity(shared.len());
            for (i, g) in groups.iter_mut().enumerate().filter(|(i, _)| shared.contains(i)) {
                let items = g.slots.iter().zip(g.tokens).map(|(&s, t)| (s, t[0])).collect();
                step.push((i, StepGroup { adapter: g.adapter, cache: &mut *g.cache, items }));
            }
            let sizes: Vec<(usize, usize)> =
                step.iter().map(|(i, g)| (*i, g.items.len())).collect();
            let out = self
                .decode_step(step.into_iter().map(|(_, g)| g).collect())
                .and_then(|logits| self.split_rows(&logits, &sizes));
            let parts: Vec<(usize, R<CudaSlice<f32>>)> = match out {
                Ok(parts) => parts.into_iter().map(|(i, p)| (i, Ok(p))).collect(),
                Err(e) => {
                    let errs = e.for_each_group(sizes.len()).into_iter().map(Err);
                    sizes.iter().map(|s| s.0).zip(errs).collect()
                }
            };
            for (i, r) in parts {
                results[i] = Some(r);
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(invalid("a group was not run".into()))))
            .collect()
    }

    /// Copies consecutive row blocks of `logits` [rows, vocab] out into one slice per group:
    /// `sizes` = (group index, rows).
    fn split_rows(
        &self,
        logits: &Buf<f32>,
        sizes: &[(usize, usize)],
    ) -> R<Vec<(usize, CudaSlice<f32>)>> {
        let v = self.cfg.vocab_size;
        let mut r0 = 0;
        let mut parts = Vec::with_capacity(sizes.len());
        for &(i, n) in sizes {
            let mut part = scratch::<f32>(&self.dev, n * v)?;
            self.dev
                .stream()
                .memcpy_dtod(
                    &view(logits, r0 * v, (r0 + n) * v)?,
                    &mut view_mut(&mut part, 0, n * v)?,
                )
                .map_err(CudaError::driver("splitting logits by request"))?;
            parts.push((i, part.into_slice()));
            r0 += n;
        }
        Ok(parts)
    }

    /// The checks of a feed: slots in range and distinct, tokens present and in the
    /// vocabulary, and room in the slot and the position table.
    fn check_feed(&self, cache: &CudaKvCache<T>, seqs: &[usize], new_tokens: &[&[u32]]) -> R<()> {
        let c = &self.cfg;
        let n = seqs.len();
        if n == 0 || new_tokens.len() != n {
            return Err(invalid(format!(
                "{} token lists for {n} sequences (need >= 1)",
                new_tokens.len()
            )));
        }
        for (i, (&s, t)) in seqs.iter().zip(new_tokens).enumerate() {
            if s >= cache.max_seqs() || seqs[..i].contains(&s) {
                return Err(invalid(format!("sequence slot {s} is out of range or repeated")));
            }
            if t.is_empty() {
                return Err(invalid(format!("sequence {i}: no new tokens")));
            }
            if let Some(bad) = t.iter().find(|&&x| x as usize >= c.vocab_size) {
                return Err(invalid(format!(
                    "sequence {i}: token {bad} is not below the vocabulary size {}",
                    c.vocab_size
                )));
            }
            let end = cache.lens[s] + t.len();
            if end > cache.max_len || end > c.max_position_embeddings {
                return Err(invalid(format!(
                    "sequence {i}: {end} tokens exceed the cache slot ({}) or max_position_embeddings ({})",
                    cache.max_len, c.max_position_embeddings
                )));
            }
        }
        Ok(())
    }
}
