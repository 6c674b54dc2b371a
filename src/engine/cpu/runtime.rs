//! [`CpuRuntime`]: the device seam on the host. The "device" adapter is the host [`Adapter`]
//! itself, KV-cache slots are per-sequence [`KvCache`]s, and each runtime may own a rayon pool
//! (data-parallel CPU workers run side by side on disjoint threads).

use std::sync::Arc;

use rayon::prelude::*;

use super::decode::DecodeSegment;
use super::kv_cache::KvCache;
use super::train::{forward, forward_backward, forward_backward_many, forward_many};
use crate::engine::batch::{CachedGroup, EvalGroup, FwdBwdOutput, TrainGroup, check_tokens};
use crate::engine::error::{EngineError, Result};
use crate::engine::lora::Adapter;
use crate::engine::loss::{Datum, LossFn};
use crate::engine::models::{Model, ModelConfig};
use crate::engine::optim::{AdamParams, OptimMetrics};
use crate::engine::runtime::ModelRuntime;
use crate::engine::sampling::{SamplingParams, sample_token};

/// The base model on the host CPUs.
pub struct CpuRuntime {
    index: usize,
    model: Arc<Model>,
    /// `None`: the process-wide rayon pool.
    pool: Option<rayon::ThreadPool>,
}

impl std::fmt::Debug for CpuRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuRuntime").field("index", &self.index).finish()
    }
}

/// KV-cache slots of the CPU runtime.
#[derive(Debug)]
pub struct CpuCache {
    slots: Vec<KvCache>,
    max_len: usize,
}

impl CpuRuntime {
    /// The model on the process-wide thread pool.
    pub fn new(model: Arc<Model>) -> Self {
        CpuRuntime { index: 0, model, pool: None }
    }

    /// Worker `index` with its own pool of `threads` threads (at least one).
    pub fn with_threads(model: Arc<Model>, index: usize, threads: usize) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(move |t| format!("twinkle-cpu{index}-{t}"))
            .build()
            .map_err(|e| EngineError::Worker {
                worker: format!("cpu:{index}"),
                message: format!("cannot start its thread pool: {e}"),
            })?;
        Ok(CpuRuntime { index, model, pool: Some(pool) })
    }

    /// The host model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Everything the pass would refuse about one group, checked before any group runs so
    /// that a bad group fails alone.
    fn check_group(&self, g: &CachedGroup<'_, Adapter, CpuCache>) -> Result<()> {
        let (cache, slots, tokens) = (&*g.cache, g.slots, g.tokens);
        let c = self.model.config();
        let n = cache.slots.len();
        if slots.len() != tokens.len() || slots.is_empty() {
            return Err(EngineError::InvalidInput(format!(
                "{} token lists for {} sequences (need >= 1)",
                tokens.len(),
                slots.len()
            )));
        }
        if let Some(a) = g.adapter {
            a.check_compatible(&self.model)?;
        }
        for (i, (&s, t)) in slots.iter().zip(tokens).enumerate() {
            if s >= n || slots[..i].contains(&s) {
                return Err(EngineError::InvalidInput(format!(
                    "sequence slot {s} is out of range or repeated"
                )));
            }
            if t.is_empty() {
                return Err(EngineError::InvalidInput(format!("sequence {i}: no new tokens")));
            }
            check_tokens("tokens", i, t, c.vocab_size)?;
            let end = cache.slots[s].len() + t.len();
            if end > cache.max_len || end > c.max_position_embeddings {
                return Err(EngineError::InvalidInput(format!(
                    "sequence {i}: {end} tokens exceed the cache slot ({}) or max_position_embeddings ({})",
                    cache.max_len, c.max_position_embeddings
                )));
            }
        }
        Ok(())
    }

    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }
}

impl ModelRuntime for CpuRuntime {
    type Adapter = Adapter;
    type Cache = CpuCache;
    type Logits = Vec<Vec<f32>>;

    fn device_name(&self) -> String {
        format!("cpu:{}", self.index)
    }

    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn upload_adapter(&self, host: &Adapter) -> Result<Adapter> {
        host.check_compatible(&self.model)?;
        Ok(host.clone())
    }

    fn download_adapter(&self, adapter: &Adapter, host: &mut Adapter) -> Result<()> {
        if adapter.shape() != host.shape() {
            return Err(EngineError::Adapter(
                "download: the host adapter has another configuration".into(),
            ));
        }
        *host = adapter.clone();
        Ok(())
    }

    fn copy_adapter(&self, adapter: &Adapter) -> Result<Adapter> {
        Ok(adapter.clone())
    }

    fn forward_backward(
        &self,
        adapter: &mut Adapter,
        data: &[Datum],
        loss: &LossFn,
    ) -> Result<FwdBwdOutput> {
        let model = &self.model;
        self.run(|| forward_backward(model, Some(adapter), data, loss, false))
    }

    fn forward(
        &self,
        adapter: Option<&Adapter>,
        data: &[Datum],
        loss: &LossFn,
    ) -> Result<FwdBwdOutput> {
        let model = &self.model;
        self.run(|| forward(model, adapter, data, loss))
    }

    fn forward_backward_many(
        &self,
        groups: &mut [TrainGroup<'_, Adapter>],
    ) -> Vec<Result<FwdBwdOutput>> {
        let model = &self.model;
        self.run(|| forward_backward_many(model, groups))
    }

    fn forward_many(&self, groups: &[EvalGroup<'_, Adapter>]) -> Vec<Result<FwdBwdOutput>> {
        let model = &self.model;
        self.run(|| forward_many(model, groups))
    }

    fn optim_step(&self, adapter: &mut Adapter, params: &AdamParams) -> Result<OptimMetrics> {
        self.run(|| adapter.optim_step(params))
    }

    fn zero_grad(&self, adapter: &mut Adapter) -> Result<()> {
        adapter.zero_grad();
        Ok(())
    }

    fn grads_to_host(&self, adapter: &Adapter) -> Result<Vec<f32>> {
        Ok(adapter.grads_flat())
    }

    fn grads_from_host(&self, adapter: &mut Adapter, grads: &[f32]) -> Result<()> {
        adapter.set_grads_flat(grads)
    }

    fn new_cache(&self, max_seqs: usize, max_len: usize) -> Result<CpuCache> {
        if max_seqs == 0 || max_len == 0 {
            return Err(EngineError::InvalidInput(format!(
                "KV cache of {max_seqs} sequences x {max_len} tokens: both must be > 0"
            )));
        }
        Ok(CpuCache { slots: vec![KvCache::new(&self.model); max_seqs], max_len })
    }

    fn fork_slot(&self, cache: &mut CpuCache, src: usize, dst: usize) -> Result<()> {
        let n = cache.slots.len();
        if src >= n || dst >= n || src == dst || !cache.slots[dst].is_empty() {
            return Err(EngineError::InvalidInput(format!(
                "fork_slot {src} -> {dst}: slots must differ, exist (< {n}) and the target be empty"
            )));
        }
        cache.slots[dst] = cache.slots[src].clone();
        Ok(())
    }

    fn forward_cached(
        &self,
        adapter: Option<&Adapter>,
        cache: &mut CpuCache,
        slots: &[usize],
        tokens: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>> {
        let mut group = [CachedGroup { adapter, cache, slots, tokens }];
        self.forward_cached_many(&mut group).pop().unwrap_or_else(|| {
            Err(EngineError::InvalidInput("forward_cached: no result for the group".into()))
        })
    }

    fn forward_cached_many(
        &self,
        groups: &mut [CachedGroup<'_, Adapter, CpuCache>],
    ) -> Vec<Result<Vec<Vec<f32>>>> {
        let mut out: Vec<Result<Vec<Vec<f32>>>> =
            groups.iter().map(|g| self.check_group(g).map(|()| Vec::new())).collect();
        // The valid groups' caches are moved out into one slice for the engine, and back.
        let mut segs = Vec::new();
        let mut caches: Vec<KvCache> = Vec::new();
        let mut tokens: Vec<&[u32]> = Vec::new();
        for (g, r) in groups.iter_mut().zip(&out) {
            if r.is_ok() {
                segs.push(DecodeSegment { adapter: g.adapter, seqs: g.slots.len() });
                caches.extend(g.slots.iter().map(|&s| std::mem::take(&mut g.cache.slots[s])));
                tokens.extend_from_slice(g.tokens);
            }
        }
        if segs.is_empty() {
            return out;
        }
        let model = &self.model;
        let result = self.run(|| model.forward_cached_segments(&segs, &tokens, &mut caches));
        let mut caches = caches.into_iter();
        // The rows are moved out to their groups (a pass's logits are `rows × vocab` floats).
        let mut rows = result.map(Vec::into_iter);
        for (g, r) in groups.iter_mut().zip(out.iter_mut()) {
            if r.is_err() {
                continue;
            }
            for (&s, c) in g.slots.iter().zip(caches.by_ref()) {
                g.cache.slots[s] = c;
            }
            *r = match &mut rows {
                Ok(rows) => Ok(rows.by_ref().take(g.slots.len()).collect()),
                // Every group was checked, so this is the engine's fault, not the caller's.
                Err(e) => Err(EngineError::Worker {
                    worker: self.device_name(),
                    message: format!("the batched decode pass failed: {e}"),
                }),
            };
        }
        out
    }

    fn select_tokens(
        &self,
        logits: &Vec<Vec<f32>>,
        params: &[SamplingParams],
        uniforms: &[f32],
    ) -> Result<Vec<(u32, f32)>> {
        if params.len() != logits.len() || uniforms.len() != logits.len() {
            return Err(EngineError::InvalidInput(format!(
                "{} rows of logits with {} parameter sets and {} draws",
                logits.len(),
                params.len(),
                uniforms.len()
            )));
        }
        // Each row's pick is a pass over the vocabulary: rows run side by side.
        self.run(|| {
            logits
                .par_iter()
                .zip(params)
                .zip(uniforms)
                .map(|((row, p), &u)| {
                    sample_token(row, p, u).map_err(|e| EngineError::InvalidInput(e.to_string()))
                })
                .collect()
        })
    }

    fn logits_to_host(&self, logits: &Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        Ok(logits.clone())
    }
}
