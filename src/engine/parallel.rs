//! Data parallelism over device workers: a batch is split by tokens into contiguous shards, each
//! worker (one per device) runs forward/backward on its shard against its replica of the adapter,
//! and the shards' LoRA gradients are summed on the host into the master adapter, whose AdamW
//! step then produces the weights every replica receives.
//!
//! The master adapter (f32 weights, gradients, Adam moments) stays with the caller; a worker only
//! ever holds a copy of the weights. Replicas are refreshed from the master at the start of every
//! call, so one worker pool serves many adapters, and weights changed outside the pool (a loaded
//! checkpoint, a step taken elsewhere) are always picked up. That costs one copy of the LoRA
//! weights per worker per call, small next to a forward/backward over the shard.
//!
//! Reduction is a host summation in worker order, so repeated runs are bit-identical. It is the
//! only path for now: cudarc's `nccl` feature does build without CUDA (with `dynamic-loading`,
//! `cudarc::nccl::sys::is_culib_present()` gates every call), but an NCCL all-reduce needs the
//! gradients resident on the devices, which only a CUDA worker has. A CUDA worker implements
//! [`Worker`] by downloading its shard's gradient into [`ShardOutput::grads`].

use std::ops::Range;
use std::sync::Arc;

use rayon::prelude::*;

use super::error::{EngineError, Result};
use super::lora::Adapter;
use super::loss::{Datum, LossFn};
use super::models::Model;
use super::optim::{AdamParams, OptimMetrics};
use super::train::{FwdBwdOutput, forward, forward_backward};

/// What a worker returns for its shard.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardOutput {
    /// Per-datum outputs of the shard (in shard order) and its loss sum.
    pub output: FwdBwdOutput,
    /// The shard's LoRA gradient, one host f32 vector per tensor in [`gradient_layout`] order;
    /// `None` for a forward-only run.
    pub grads: Option<Vec<Vec<f32>>>,
}

/// One device's worker: holds a replica of the adapter weights and runs shards on them.
///
/// A CUDA implementation keeps the replica on its device, runs its kernels in
/// [`run`](Worker::run) and downloads the shard's gradient into [`ShardOutput::grads`].
pub trait Worker: Send {
    /// A short name for errors and logs (`cpu:0`, `cuda:1`).
    fn name(&self) -> String;

    /// Replaces the replica's weights with the master's (`None`: the base model, no adapter).
    fn set_weights(&mut self, master: Option<&Adapter>) -> Result<()>;

    /// Forward (and with `backward`, backward) over `shard` with the current replica. With
    /// `backward` the returned gradient covers this shard only (not earlier calls).
    fn run(&mut self, shard: &[Datum], loss: &LossFn, backward: bool) -> Result<ShardOutput>;
}

/// Names and lengths of an adapter's gradient tensors in the fixed order workers return them:
/// for each module of [`Adapter::pairs`], `lora_A` then `lora_B`.
pub fn gradient_layout(adapter: &Adapter) -> Vec<(String, usize)> {
    adapter
        .pairs()
        .into_iter()
        .flat_map(|(k, p)| {
            [(format!("{k}.lora_A.weight"), p.a.len()), (format!("{k}.lora_B.weight"), p.b.len())]
        })
        .collect()
}

/// Splits datums of token counts `lens` into exactly `n` contiguous ranges (in order, covering
/// every datum) that minimise the largest shard's token count; trailing ranges may be empty
/// (idle workers) when there are fewer datums than workers.
pub fn split_by_tokens(lens: &[usize], n: usize) -> Vec<Range<usize>> {
    let n = n.max(1);
    let total: usize = lens.iter().sum();
    let largest = lens.iter().copied().max().unwrap_or(0);
    // Greedy packing under a capacity; the smallest feasible capacity is found by bisection.
    let pack = |cap: usize| -> Vec<Range<usize>> {
        let mut ranges = Vec::with_capacity(n);
        let (mut start, mut load) = (0, 0);
        for (i, &l) in lens.iter().enumerate() {
            if load + l > cap && i > start {
                ranges.push(start..i);
                start = i;
                load = 0;
            }
            load += l;
        }
        if start < lens.len() {
            ranges.push(start..lens.len());
        }
        ranges
    };
    let (mut lo, mut hi) = (largest, total.max(largest));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pack(mid).len() <= n {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let mut ranges = pack(lo);
    let end = lens.len();
    ranges.resize(n, end..end);
    ranges
}

/// A CPU worker: its own rayon pool (so workers really run side by side) and an adapter replica.
pub struct CpuWorker {
    index: usize,
    model: Arc<Model>,
    pool: rayon::ThreadPool,
    replica: Option<Adapter>,
}

impl CpuWorker {
    /// Worker `index` over `model` with a pool of `threads` threads (at least one).
    pub fn new(model: Arc<Model>, index: usize, threads: usize) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(move |t| format!("twinkle-dp{index}-{t}"))
            .build()
            .map_err(|e| EngineError::Worker {
                worker: format!("cpu:{index}"),
                message: format!("cannot start its thread pool: {e}"),
            })?;
        Ok(CpuWorker { index, model, pool, replica: None })
    }
}

/// True when `replica` has the same modules, shapes and scaling as `master`, so copying the
/// weights in place makes it an exact replica (the init seed does not matter: weights are
/// overwritten), as when one pool alternates between adapters of one shape.
fn same_layout(replica: &Adapter, master: &Adapter) -> bool {
    replica.scaling() == master.scaling() && gradient_layout(replica) == gradient_layout(master)
}

impl Worker for CpuWorker {
    fn name(&self) -> String {
        format!("cpu:{}", self.index)
    }

    fn set_weights(&mut self, master: Option<&Adapter>) -> Result<()> {
        let Some(master) = master else {
            self.replica = None;
            return Ok(());
        };
        match &mut self.replica {
            Some(r) if same_layout(r, master) => {
                for ((_, dst), (_, src)) in r.pairs_mut().into_iter().zip(master.pairs()) {
                    dst.a.data_mut().copy_from_slice(src.a.data());
                    dst.b.data_mut().copy_from_slice(src.b.data());
                }
            }
            _ => {
                let mut r = master.clone();
                r.zero_grad();
                // A replica never steps: its Adam moments would only take memory.
                for (_, p) in r.pairs_mut() {
                    for m in [&mut p.m_a, &mut p.v_a, &mut p.m_b, &mut p.v_b] {
                        *m = Vec::new();
                    }
                }
                self.replica = Some(r);
            }
        }
        Ok(())
    }

    fn run(&mut self, shard: &[Datum], loss: &LossFn, backward: bool) -> Result<ShardOutput> {
        let model = &self.model;
        match (&mut self.replica, backward) {
            (None, true) => Err(EngineError::InvalidInput(
                "forward_backward needs an adapter (the base model has nothing to train)".into(),
            )),
            (None, false) => {
                let output = self.pool.install(|| forward(model, None, shard, loss))?;
                Ok(ShardOutput { output, grads: None })
            }
            (Some(r), false) => {
                let output = self.pool.install(|| forward(model, Some(r), shard, loss))?;
                Ok(ShardOutput { output, grads: None })
            }
            (Some(r), true) => {
                // Cleared here rather than after the run: a run that failed (or panicked)
                // half-way must not leak into the next shard's gradient.
                r.zero_grad();
                let output =
                    self.pool.install(|| forward_backward(model, Some(r), shard, loss, false))?;
                let mut grads = Vec::new();
                for (_, p) in r.pairs() {
                    grads.push(p.grad_a.clone());
                    grads.push(p.grad_b.clone());
                }
                Ok(ShardOutput { output, grads: Some(grads) })
            }
        }
    }
}

/// N workers in data parallel around a caller-held master adapter.
pub struct DataParallel {
    workers: Vec<Box<dyn Worker>>,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.workers.iter().map(|w| w.name()).collect();
        f.debug_struct("DataParallel").field("workers", &names).finish()
    }
}

impl DataParallel {
    /// A pool over the given workers (at least one).
    pub fn new(workers: Vec<Box<dyn Worker>>) -> Result<Self> {
        if workers.is_empty() {
            return Err(EngineError::InvalidInput(
                "data parallel needs at least one worker".into(),
            ));
        }
        Ok(DataParallel { workers })
    }

    /// `n` CPU workers over `model`, splitting `threads` threads between them (each gets at
    /// least one).
    pub fn cpu(model: Arc<Model>, n: usize, threads: usize) -> Result<Self> {
        let n = n.max(1);
        let per = (threads / n).max(1);
        let workers = (0..n)
            .map(|i| CpuWorker::new(model.clone(), i, per).map(|w| Box::new(w) as Box<dyn Worker>))
            .collect::<Result<Vec<_>>>()?;
        Self::new(workers)
    }

    pub fn num_workers(&self) -> usize {
        self.workers.len()
    }

    /// Like [`forward_backward`](super::forward_backward) with the master adapter: the batch is
    /// split by tokens over the workers and the shards' gradients are ADDED to the master's
    /// accumulated gradients (only when every shard succeeded) until
    /// [`optim_step`](Self::optim_step). Outputs keep the caller's datum order.
    pub fn forward_backward(
        &mut self,
        master: &mut Adapter,
        data: &[Datum],
        loss: &LossFn,
        forward_only: bool,
    ) -> Result<FwdBwdOutput> {
        if forward_only {
            return self.forward(Some(master), data, loss);
        }
        let shards = self.run_sharded(Some(master), data, loss, true)?;
        let layout = gradient_layout(master);
        let mut grads = Vec::with_capacity(shards.len());
        for (name, s) in &shards {
            let g = s.grads.as_ref().ok_or_else(|| EngineError::Worker {
                worker: name.clone(),
                message: "returned no gradient for a backward run".into(),
            })?;
            let ok = g.len() == layout.len() && g.iter().zip(&layout).all(|(v, l)| v.len() == l.1);
            if !ok {
                return Err(EngineError::Worker {
                    worker: name.clone(),
                    message: "returned a gradient that does not match the adapter's tensors".into(),
                });
            }
            grads.push(g.as_slice());
        }
        reduce_into(master, &grads);
        Ok(merge(shards))
    }

    /// Forward only (no gradients) with the master adapter, or the base model for `None`.
    pub fn forward(
        &mut self,
        master: Option<&Adapter>,
        data: &[Datum],
        loss: &LossFn,
    ) -> Result<FwdBwdOutput> {
        Ok(merge(self.run_sharded(master, data, loss, false)?))
    }

    /// One AdamW step on the master with the reduced gradients. The new weights reach the
    /// replicas at the start of the next call (every call refreshes them from the master).
    pub fn optim_step(
        &mut self,
        master: &mut Adapter,
        params: &AdamParams,
    ) -> Result<OptimMetrics> {
        master.optim_step(params)
    }

    /// Refreshes the busy workers' replicas from the master and runs their shards concurrently.
    /// Returns `(worker name, output)` per non-empty shard, in datum order.
    fn run_sharded(
        &mut self,
        master: Option<&Adapter>,
        data: &[Datum],
        loss: &LossFn,
        backward: bool,
    ) -> Result<Vec<(String, ShardOutput)>> {
        if data.is_empty() {
            return Err(EngineError::InvalidInput("the batch has no datums".into()));
        }
        let lens: Vec<usize> = data.iter().map(|d| d.input_tokens.len()).collect();
        let ranges = split_by_tokens(&lens, self.workers.len());
        let jobs: Vec<(&mut Box<dyn Worker>, Range<usize>)> =
            self.workers.iter_mut().zip(ranges).filter(|(_, r)| !r.is_empty()).collect();
        let job = |w: &mut Box<dyn Worker>, r: Range<usize>| -> Result<(String, ShardOutput)> {
            let name = w.name();
            w.set_weights(master)?;
            let out = w.run(&data[r.clone()], loss, backward).map_err(|e| reindex(e, r.start))?;
            if out.output.per_datum.len() != r.len() {
                return Err(EngineError::Worker {
                    worker: name,
                    message: format!(
                        "returned {} outputs for {} datums",
                        out.output.per_datum.len(),
                        r.len()
                    ),
                });
            }
            Ok((name, out))
        };
        let job = &job;
        let results: Vec<Result<(String, ShardOutput)>> = std::thread::scope(|s| {
            let handles: Vec<_> = jobs
                .into_iter()
                .map(|(w, r)| {
                    let name = w.name();
                    (name, s.spawn(move || job(w, r)))
                })
                .collect();
            // Every thread is joined here, so a panicking worker becomes an error instead of
            // unwinding through the scope.
            handles
                .into_iter()
                .map(|(name, h)| {
                    h.join().unwrap_or_else(|_| {
                        Err(EngineError::Worker {
                            worker: name,
                            message: "panicked while running its shard".into(),
                        })
                    })
                })
                .collect()
        });
        // The first failing shard's error, like the single-engine path reports the first bad
        // datum.
        results.into_iter().collect()
    }
}

/// Elements per task of the host reduction.
const REDUCE_CHUNK: usize = 1 << 14;

/// Host all-reduce: per element, the shards' values summed in worker order, then added to what
/// the master accumulated before. Elements are independent, so splitting them over threads keeps
/// the result bit-identical from run to run. `grads` match `gradient_layout(master)`.
fn reduce_into(master: &mut Adapter, grads: &[&[Vec<f32>]]) {
    let mut t = 0;
    for (_, p) in master.pairs_mut() {
        for dst in [&mut p.grad_a, &mut p.grad_b] {
            let srcs: Vec<&[f32]> = grads.iter().map(|g| g[t].as_slice()).collect();
            dst.par_chunks_mut(REDUCE_CHUNK).enumerate().for_each(|(c, out)| {
                let base = c * REDUCE_CHUNK;
                for (i, d) in out.iter_mut().enumerate() {
                    let mut sum = 0.0f32;
                    for g in &srcs {
                        sum += g[base + i];
                    }
                    *d += sum;
                }
            });
            t += 1;
        }
    }
}

/// Concatenates shard outputs (already in datum order) and sums their losses.
fn merge(shards: Vec<(String, ShardOutput)>) -> FwdBwdOutput {
    let mut per_datum = Vec::new();
    let mut loss_sum = 0.0;
    for (_, s) in shards {
        per_datum.extend(s.output.per_datum);
        loss_sum += s.output.loss_sum;
    }
    FwdBwdOutput { per_datum, loss_sum }
}

/// Shard-local datum indices in input errors (`datum 2: ...`) become batch indices.
fn reindex(e: EngineError, offset: usize) -> EngineError {
    let EngineError::InvalidInput(msg) = &e else { return e };
    let Some(rest) = msg.strip_prefix("datum ") else { return e };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    match rest[..digits].parse::<usize>() {
        Ok(i) if rest[digits..].starts_with(':') => {
            EngineError::InvalidInput(format!("datum {}{}", i + offset, &rest[digits..]))
        }
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(lens: &[usize], ranges: &[Range<usize>]) -> Vec<usize> {
        ranges.iter().map(|r| lens[r.clone()].iter().sum()).collect()
    }

    #[test]
    fn split_is_contiguous_complete_and_balanced() {
        let lens = [5, 1, 1, 1, 1, 1];
        let r = split_by_tokens(&lens, 2);
        assert_eq!(r, vec![0..1, 1..6]);
        let lens = [3, 3, 3, 3];
        assert_eq!(split_by_tokens(&lens, 2), vec![0..2, 2..4]);
        assert_eq!(loads(&lens, &split_by_tokens(&lens, 3)), vec![6, 6, 0]);
        // Best max load for [4,2,2,2,6] over 3 shards is 6: [4,2] [2,2] [6].
        let lens = [4, 2, 2, 2, 6];
        assert_eq!(loads(&lens, &split_by_tokens(&lens, 3)), vec![6, 4, 6]);
    }

    #[test]
    fn more_workers_than_datums_leaves_idle_workers() {
        let r = split_by_tokens(&[7, 2], 4);
        assert_eq!(r, vec![0..1, 1..2, 2..2, 2..2]);
        assert_eq!(split_by_tokens(&[7], 1), vec![0..1]);
        assert_eq!(split_by_tokens(&[], 2), vec![0..0, 0..0]);
    }

    #[test]
    fn input_errors_name_the_batch_index() {
        let e = reindex(EngineError::InvalidInput("datum 1: model_input is empty".into()), 3);
        assert_eq!(e.to_string(), "invalid input: datum 4: model_input is empty");
        let e = reindex(EngineError::InvalidInput("no tokens".into()), 3);
        assert_eq!(e.to_string(), "invalid input: no tokens");
    }
}
