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

use super::launch as k;
use super::model::{Act, CudaModel, R, download, scratch, upload_ws, view, view_mut, zeros};
use super::{CudaDevice, CudaError};
use crate::engine::EngineError;
use crate::engine::sampling::SamplingParams;

/// KV cache of up to `max_seqs` sequences of up to `max_len` tokens each, on one GPU.
pub struct CudaKvCache<T: Act = bf16> {
    k: Vec<CudaSlice<T>>,
    v: Vec<CudaSlice<T>>,
    pub(crate) lens: Vec<usize>,
    pub(crate) max_len: usize,
    /// Unique per cache for the process's life: a captured decode graph (`graph.rs`) bakes in
    /// the addresses of exactly this cache's buffers.
    pub(crate) id: u64,
}

impl<T: Act> std::fmt::Debug for CudaKvCache<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaKvCache")
            .field("lens", &self.lens)
            .field("max_len", &self.max_len)
            .finish()
    }
}

pub(crate) fn invalid(msg: String) -> CudaError {
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
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(CudaKvCache { k, v, lens: vec![0; max_seqs], max_len, id })
    }

    /// Tokens cached for sequence slot `seq` (0 for an unknown slot).
    pub fn len(&self, seq: usize) -> usize {
        self.lens.get(seq).copied().unwrap_or(0)
    }

    /// True when no slot holds tokens.
    pub fn is_empty(&self) -> bool {
        self.lens.iter().all(|&l| l == 0)
    }

    /// After a decode step that fed one token to each of `seqs`: each holds one more.
    pub(crate) fn advance(&mut self, seqs: &[usize]) {
        for &s in seqs {
            if let Some(l) = self.lens.get_mut(s) {
                *l += 1;
            }
        }
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
        let cache = k::Kv { k: &mut kc.as_view_mut(), v: &mut vc.as_view_mut() };
        k::kv_append_fwd(dev, cache, k::Kv { k, v }, slots, row)?;
        Ok((kc, vc))
    }
}

impl<T: Act> CudaModel<T> {
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
        // tokens then logprobs (as f32 bits) in one buffer: one download, the step's one sync
        let mut picks = scratch::<i32>(&self.dev, 2 * n)?;
        {
            let mut whole = view_mut(&mut picks, 0, 2 * n)?;
            let (mut tv, mut rest) = whole.split_at_mut(n);
            // SAFETY: i32 and f32 have the same size and every bit pattern is a valid f32.
            let mut lpv = unsafe { rest.transmute_mut::<f32>(n) }
                .ok_or_else(|| invalid("logprob view".into()))?;
            let logits = k::Logits { data: &lv, ld: v, cols: v };
            let picks = k::Picks { token: &mut tv, logprob: &mut lpv };
            k::argmax_fwd::<f32>(&self.dev, picks, logits)?;
            if inv_t.iter().any(|&x| x != 0.0) {
                let (dt, dp) = (upload_ws(&self.dev, &inv_t)?, upload_ws(&self.dev, &ints)?);
                let (dt, dp) = (view(&dt, 0, n)?, view(&dp, 0, 3 * n)?);
                let picks = k::Picks { token: &mut tv, logprob: &mut lpv };
                k::sample_fwd::<f32>(&self.dev, picks, logits, (&dt, &dp))?;
            }
        }
        let host = download(&self.dev, &view(&picks, 0, 2 * n)?)?;
        let (tok, lp) = host.split_at(n);
        let lp: Vec<f32> = lp.iter().map(|&b| f32::from_bits(b as u32)).collect();
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
