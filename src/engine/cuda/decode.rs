//! Generation on the GPU: a KV cache resident on the device, prefill and incremental decode
//! returning each sequence's last-position logits, and token selection with the one sampling
//! definition of `engine::sampling`, on the device (greedy and stochastic rows alike: the draw
//! uses the same integer arithmetic and the same bit-exact `exp` as the CPU code, so both
//! backends pick the same token from the same draw).
//!
//! Cache layout: per layer k / v [max_seqs * max_len, kv_heads, hdp]; sequence slot `s` owns
//! rows `s * max_len ..`, which the decode kernel sees as one cache block of `max_len` tokens.

use cudarc::driver::{CudaSlice, CudaView};
use half::bf16;

use super::adapter::CudaAdapter;
use super::launch::{self as k, BLayout, LoraLayout};
use super::layer::{KvMode, Pack};
use super::model::{Act, CudaModel, R, download, scratch, upload_ws, view, view_mut, zeros};
use super::workspace::Buf;
use super::{CudaDevice, CudaError};
use crate::engine::EngineError;
use crate::engine::sampling::SamplingParams;

/// KV cache of up to `max_seqs` sequences of up to `max_len` tokens each, on one GPU.
pub struct CudaKvCache<T: Act = bf16> {
    k: Vec<CudaSlice<T>>,
    v: Vec<CudaSlice<T>>,
    lens: Vec<usize>,
    max_len: usize,
}

impl<T: Act> std::fmt::Debug for CudaKvCache<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaKvCache")
            .field("lens", &self.lens)
            .field("max_len", &self.max_len)
            .finish()
    }
}

fn invalid(msg: String) -> CudaError {
    CudaError::Engine(EngineError::InvalidInput(msg))
}

impl<T: Act> CudaKvCache<T> {
    /// Allocates the cache for `model` (all sequence slots empty).
    pub fn new(model: &CudaModel<T>, max_seqs: usize, max_len: usize) -> R<Self> {
        let c = model.config();
        let row = c.num_kv_heads * model.hdp;
        let slots = max_seqs.checked_mul(max_len).filter(|&s| s > 0 && s <= i32::MAX as usize);
        let Some(slots) = slots else {
            return Err(invalid(format!(
                "KV cache of {max_seqs} sequences x {max_len} tokens: both must be > 0 and the product fit i32"
            )));
        };
        let mut k = Vec::with_capacity(c.num_layers);
        let mut v = Vec::with_capacity(c.num_layers);
        for _ in 0..c.num_layers {
            k.push(zeros::<T>(&model.dev, slots * row)?);
            v.push(zeros::<T>(&model.dev, slots * row)?);
        }
        Ok(CudaKvCache { k, v, lens: vec![0; max_seqs], max_len })
    }

    /// Tokens cached for sequence slot `seq` (0 for an unknown slot).
    pub fn len(&self, seq: usize) -> usize {
        self.lens.get(seq).copied().unwrap_or(0)
    }

    /// True when no slot holds tokens.
    pub fn is_empty(&self) -> bool {
        self.lens.iter().all(|&l| l == 0)
    }

    /// Empties slot `seq` for a new sequence.
    pub fn reset(&mut self, seq: usize) {
        if let Some(l) = self.lens.get_mut(seq) {
            *l = 0;
        }
    }

    /// Tokens per sequence slot.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Number of sequence slots.
    pub fn max_seqs(&self) -> usize {
        self.lens.len()
    }

    /// Copies the cached positions of slot `src` into the empty slot `dst` (every layer's keys
    /// and values), so several samples continue one prefill.
    pub fn fork_slot(&mut self, model: &CudaModel<T>, src: usize, dst: usize) -> R<()> {
        let n = self.lens.len();
        if src >= n || dst >= n || src == dst || self.lens[dst] != 0 {
            return Err(invalid(format!(
                "fork_slot {src} -> {dst}: slots must differ, exist (< {n}) and the target be empty"
            )));
        }
        let row = model.config().num_kv_heads * model.hdp;
        let (len, max) = (self.lens[src], self.max_len);
        let (a, b) = (src * max * row, dst * max * row);
        let stream = model.dev.stream();
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            // The slots are disjoint ranges of one buffer: split it between them to copy on
            // the device.
            let mut whole = view_mut(buf, 0, buf.len())?;
            let (mut lo, mut hi) = whole.split_at_mut(a.max(b));
            let (from, mut to) = if a < b {
                (lo.slice(a..a + len * row), hi.slice_mut(0..len * row))
            } else {
                (hi.slice(0..len * row), lo.slice_mut(b..b + len * row))
            };
            stream
                .memcpy_dtod(&from, &mut to)
                .map_err(CudaError::driver("copying a KV-cache slot"))?;
        }
        self.lens[dst] = len;
        Ok(())
    }

    /// Writes `k` and `v` ([slots.len(), row] each) into layer `l` at `slots`, as prefill and
    /// decode both do before attending; returns that layer's (k, v) caches.
    pub(crate) fn append(
        &mut self,
        dev: &CudaDevice,
        l: usize,
        slots: &CudaView<'_, i32>,
        k: &CudaView<'_, T>,
        v: &CudaView<'_, T>,
        row: usize,
    ) -> R<(&CudaSlice<T>, &CudaSlice<T>)> {
        let (Some(kc), Some(vc)) = (self.k.get_mut(l), self.v.get_mut(l)) else {
            return Err(invalid(format!("KV cache has no layer {l}")));
        };
        k::kv_append_fwd(dev, &mut kc.as_view_mut(), &mut vc.as_view_mut(), k, v, slots, row)?;
        Ok((kc, vc))
    }
}

impl<T: Act> CudaModel<T> {
    /// Logits [b, vocab] (f32) of hidden rows `h` [b, hidden].
    fn logits_rows(&self, h: &CudaSlice<T>, b: usize, ad: Option<&CudaAdapter>) -> R<Buf<f32>> {
        let dev = &*self.dev;
        let (hid, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let hv = view(h, 0, b * hid)?;
        // written by the GEMM (beta = 0); LoRA adds to it
        let mut out = scratch::<f32>(dev, b * v)?;
        let mut ov = view_mut(&mut out, 0, b * v)?;
        k::matmul::<T, f32>(
            dev,
            &mut ov,
            &hv,
            &self.head_w().as_view(),
            BLayout::Nk,
            (b, v, hid),
            1.0,
            0.0,
        )?;
        if let Some((p, s)) = ad.and_then(|a| a.lm_head.as_ref().map(|p| (p, a.scaling))) {
            let mut ha = scratch::<f32>(dev, b * p.rank)?;
            let mut hav = view_mut(&mut ha, 0, b * p.rank)?;
            k::lora_shrink_fwd(dev, &mut hav, &hv, &p.a.as_view(), LoraLayout::Rows, p.rank, 1.0)?;
            k::lora_expand_fwd::<f32>(
                dev,
                &mut ov,
                &hav.as_view(),
                &p.b.as_view(),
                LoraLayout::Cols,
                p.rank,
                s,
            )?;
        }
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
        let st = self.stack_fwd(&p, ad, &mut KvMode::Prefill { slots: &slots, cache }, false)?;
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
        self.logits_rows(&last, items.len(), ad)
    }

    /// One new token per listed slot. Returns logits [B, V].
    fn decode_step(
        &self,
        ad: Option<&CudaAdapter>,
        cache: &mut CudaKvCache<T>,
        items: &[(usize, u32)],
    ) -> R<Buf<f32>> {
        let b = items.len();
        let tokens: Vec<u32> = items.iter().map(|x| x.1).collect();
        let positions: Vec<u32> = items.iter().map(|&(s, _)| cache.lens[s] as u32).collect();
        let seqs: Vec<(usize, usize)> = (0..b).map(|i| (i, 1)).collect();
        let slots: Vec<i32> =
            items.iter().map(|&(s, _)| (s * cache.max_len + cache.lens[s]) as i32).collect();
        let table: Vec<i32> = items.iter().map(|&(s, _)| s as i32).collect();
        let ctx: Vec<i32> = items.iter().map(|&(s, _)| cache.lens[s] as i32 + 1).collect();
        let p = Pack::new(self, &tokens, &seqs, &positions)?;
        let (slots, table, ctx) = (
            upload_ws(&self.dev, &slots)?,
            upload_ws(&self.dev, &table)?,
            upload_ws(&self.dev, &ctx)?,
        );
        let mut kv = KvMode::Decode { slots: &slots, table: &table, ctx: &ctx, cache };
        let st = self.stack_fwd(&p, ad, &mut kv, false)?;
        for &(s, _) in items {
            cache.lens[s] += 1;
        }
        self.logits_rows(&st.h_final, b, ad)
    }

    /// Feeds `new_tokens[i]` to cache slot `seqs[i]` (prefill when the slot is empty, one or
    /// more tokens later) and returns the logits of each sequence's last new position, on the
    /// device, [n, vocab] f32 in the order given.
    pub fn forward_cached_device(
        &self,
        ad: Option<&CudaAdapter>,
        cache: &mut CudaKvCache<T>,
        seqs: &[usize],
        new_tokens: &[&[u32]],
    ) -> R<CudaSlice<f32>> {
        let out = self.forward_cached_inner(ad, cache, seqs, new_tokens);
        self.dev.ws().end_pass();
        // the logits leave the engine: detached from the workspace, freed by the caller's drop
        out.map(Buf::into_slice)
    }

    fn forward_cached_inner(
        &self,
        ad: Option<&CudaAdapter>,
        cache: &mut CudaKvCache<T>,
        seqs: &[usize],
        new_tokens: &[&[u32]],
    ) -> R<Buf<f32>> {
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
        let v = c.vocab_size;
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
        let pre: Vec<usize> = (0..n).filter(|&i| cache.lens[seqs[i]] == 0).collect();
        // the common cases need no regrouping: all prefill, or one token for every sequence
        if pre.len() == n {
            let items: Vec<(usize, &[u32])> =
                seqs.iter().copied().zip(new_tokens.iter().copied()).collect();
            return self.prefill(ad, cache, &items);
        }
        if pre.is_empty() && new_tokens.iter().all(|t| t.len() == 1) {
            let items: Vec<(usize, u32)> =
                seqs.iter().zip(new_tokens).map(|(&s, t)| (s, t[0])).collect();
            return self.decode_step(ad, cache, &items);
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
        for step in 0..steps {
            let active: Vec<usize> =
                rest.iter().copied().filter(|&i| new_tokens[i].len() > step).collect();
            let items: Vec<(usize, u32)> =
                active.iter().map(|&i| (seqs[i], new_tokens[i][step])).collect();
            let logits = self.decode_step(ad, cache, &items)?;
            let done: Vec<(usize, usize)> = active
                .iter()
                .enumerate()
                .filter(|&(_, &i)| new_tokens[i].len() == step + 1)
                .map(|(j, &i)| (j, i))
                .collect();
            put(&done, &logits, &mut out)?;
        }
        Ok(out)
    }

    /// [`Self::forward_cached_device`] with the logits downloaded: `[vocab]` per sequence (the
    /// CPU engine's `Model::forward_cached` contract).
    pub fn forward_cached(
        &self,
        ad: Option<&CudaAdapter>,
        cache: &mut CudaKvCache<T>,
        seqs: &[usize],
        new_tokens: &[&[u32]],
    ) -> R<Vec<Vec<f32>>> {
        let logits = self.forward_cached_device(ad, cache, seqs, new_tokens)?;
        let v = self.cfg.vocab_size;
        let host = download(&self.dev, &view(&logits, 0, seqs.len() * v)?)?;
        Ok(host.chunks(v).map(|r| r.to_vec()).collect())
    }

    /// Picks one token per row of device logits [n, vocab] with `engine::sampling`'s definition,
    /// on the device: every row's argmax (the greedy pick and the validity check), then one
    /// launch drawing every row with temperature > 0 bit-exactly as `sample_token` would.
    /// Parameters and draws are validated on the host first. Returns (token, logprob of the raw
    /// distribution).
    pub fn select_tokens(
        &self,
        logits: &CudaSlice<f32>,
        params: &[SamplingParams],
        uniforms: &[f32],
    ) -> R<Vec<(u32, f32)>> {
        let n = params.len();
        let v = self.cfg.vocab_size;
        if uniforms.len() != n {
            return Err(invalid(format!("{} draws for {n} rows", uniforms.len())));
        }
        // The kernel's parameters: 1/T (0.0 marks a greedy row) and (top_k, p24, m), exactly
        // the numbers `sample_token` derives with the same `SamplingParams::draw`.
        let (mut inv_t, mut ints) = (vec![0.0_f64; n], vec![0_u32; 3 * n]);
        for (i, (p, &u)) in params.iter().zip(uniforms).enumerate() {
            if let Some(d) = p.draw(u).map_err(|e| invalid(e.to_string()))? {
                inv_t[i] = d.inv_t;
                ints[3 * i..3 * i + 3].copy_from_slice(&[d.top_k, d.top_p24, d.m]);
            }
        }
        let lv = view(logits, 0, n * v)?;
        let mut tok = scratch::<i32>(&self.dev, n)?;
        let mut lp = scratch::<f32>(&self.dev, n)?;
        let (mut tv, mut lpv) = (view_mut(&mut tok, 0, n)?, view_mut(&mut lp, 0, n)?);
        k::argmax_fwd::<f32>(&self.dev, &mut tv, &mut lpv, &lv, v, v)?;
        if inv_t.iter().any(|&x| x != 0.0) {
            let (dt, dp) = (upload_ws(&self.dev, &inv_t)?, upload_ws(&self.dev, &ints)?);
            let (dt, dp) = (view(&dt, 0, n)?, view(&dp, 0, 3 * n)?);
            k::sample_fwd::<f32>(&self.dev, &mut tv, &mut lpv, &lv, v, v, &dt, &dp)?;
        }
        let tok = download(&self.dev, &view(&tok, 0, n)?)?;
        let lp = download(&self.dev, &view(&lp, 0, n)?)?;
        let mut out = Vec::with_capacity(n);
        for (i, (&t, &l)) in tok.iter().zip(&lp).enumerate() {
            // Both kernels give a NaN logprob for NaN, +inf or all -inf rows (which the CPU
            // sampler rejects); a usable row's pick always has a finite one.
            match u32::try_from(t) {
                Ok(t) if (t as usize) < v && l.is_finite() => out.push((t, l)),
                _ => return Err(invalid(format!("row {i}: logits are NaN, +inf or all -inf"))),
            }
        }
        Ok(out)
    }
}
