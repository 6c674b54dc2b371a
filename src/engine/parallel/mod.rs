//! Data parallelism over the device seam: one [`ModelRuntime`] per device (card or CPU worker),
//! each holding a replica of every adapter ([`Replicated`]) with its own weights, gradients and
//! Adam moments. A batch is split by tokens into contiguous shards that run concurrently, one per
//! runtime; the shards' gradients are summed on the host; at `optim_step` every replica receives
//! the summed gradient and takes the same AdamW step, so the replicas stay identical (DDP without
//! a master copy: weights and optimizer state never leave the devices between checkpoints).
//!
//! With one runtime nothing is split: the adapter accumulates on its device, and a batch that
//! fails (an error, a panic, non-finite outputs) is rolled back to a snapshot of the gradient
//! taken before it. With several, each replica's gradient buffer holds only the current shard
//! (cleared before the run) and the reduced sum is kept on the host until the step
//! ([`Replicated::pending`]), so a batch whose shard fails adds nothing anywhere. Either way a
//! panic in a runtime becomes an error naming the device instead of unwinding into the caller.
//! `optim_step` is all or nothing too: every replica is copied on its device before the step
//! and put back when any replica's step fails or panics.
//!
//! Several tenants' adapters can share one call ([`DataParallel::forward_backward_many`],
//! [`DataParallel::forward_many`], in `many`): each runtime then runs one pass over the base
//! weights for its shards of every group, with the guarantees above kept per group.
//!
//! Reduction is a host summation in worker order, so repeated runs are bit-identical. It is the
//! only path for now; an NCCL all-reduce of device-resident gradients would replace the
//! download-sum-upload once multi-GPU machines are tested (cudarc's `nccl` feature builds
//! without CUDA).

mod many;

use std::ops::Range;
use std::sync::Arc;

use rayon::prelude::*;

use super::batch::FwdBwdOutput;
use super::cpu::CpuRuntime;
use super::error::{EngineError, Result};
use super::lora::{Adapter, AdapterShape};
use super::loss::{Datum, LossFn};
use super::models::{Model, ModelConfig};
use super::optim::{AdamParams, OptimMetrics};
use super::runtime::ModelRuntime;

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

/// An adapter replicated on every runtime of a [`DataParallel`] pool.
pub struct Replicated<R: ModelRuntime> {
    shape: AdapterShape,
    /// Number of gradient values (what every shard must return).
    grad_len: usize,
    replicas: Vec<R::Adapter>,
    /// With several replicas: the host-reduced gradient accumulated since the last step
    /// (`None` = zero). Unused with one replica, whose device buffer accumulates directly.
    pending: Option<Vec<f32>>,
    /// With one replica: whether its device buffer may hold a non-zero gradient, so a batch
    /// that fails must restore a snapshot rather than just zero the buffer.
    accumulated: bool,
}

impl<R: ModelRuntime> std::fmt::Debug for Replicated<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicated").field("replicas", &self.replicas.len()).finish()
    }
}

impl<R: ModelRuntime> Replicated<R> {
    /// The LoRA configuration, scaling and base model name of the adapter.
    pub fn shape(&self) -> &AdapterShape {
        &self.shape
    }

    /// The replica on runtime `i`.
    pub fn replica(&self, i: usize) -> Option<&R::Adapter> {
        self.replicas.get(i)
    }
}

/// N runtimes (one per device) in data parallel.
pub struct DataParallel<R: ModelRuntime> {
    workers: Vec<R>,
}

impl<R: ModelRuntime> std::fmt::Debug for DataParallel<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.workers.iter().map(|w| w.device_name()).collect();
        f.debug_struct("DataParallel").field("workers", &names).finish()
    }
}

/// The text of a panic payload (`panic!` carries a `&str` or a `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Runs `f` for runtime `w`, turning a panic into an error naming the device (the caller
/// restores whatever state the job may have touched).
fn guarded<R: ModelRuntime, T>(w: &R, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(EngineError::Worker {
            worker: w.device_name(),
            message: format!("panicked: {}", panic_message(&*p)),
        })
    })
}

/// Runs `f` on each `(runtime, item)` pair on its own thread and returns the results in order;
/// a panicking job becomes an error naming its device instead of unwinding.
fn each<R: ModelRuntime, I: Send, T: Send>(
    workers: &[R],
    items: Vec<I>,
    f: impl Fn(&R, I) -> Result<T> + Sync,
) -> Vec<Result<T>> {
    if workers.len() == 1 || items.len() == 1 {
        return workers.iter().zip(items).map(|(w, i)| guarded(w, || f(w, i))).collect();
    }
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> =
            workers.iter().zip(items).map(|(w, i)| (w, s.spawn(move || f(w, i)))).collect();
        handles
            .into_iter()
            .map(|(w, h)| {
                h.join().unwrap_or_else(|_| {
                    Err(EngineError::Worker {
                        worker: w.device_name(),
                        message: "panicked while running its shard".into(),
                    })
                })
            })
            .collect()
    })
}

impl<R: ModelRuntime> DataParallel<R> {
    /// A pool over the given runtimes (at least one, all of the same model).
    pub fn new(workers: Vec<R>) -> Result<Self> {
        let Some(first) = workers.first() else {
            return Err(EngineError::InvalidInput(
                "data parallel needs at least one worker".into(),
            ));
        };
        if let Some(w) = workers.iter().find(|w| w.config() != first.config()) {
            return Err(EngineError::Worker {
                worker: w.device_name(),
                message: "holds another model than the first worker".into(),
            });
        }
        Ok(DataParallel { workers })
    }

    /// A pool of one runtime (no splitting, no copies).
    pub fn single(worker: R) -> Self {
        DataParallel { workers: vec![worker] }
    }

    pub fn num_workers(&self) -> usize {
        self.workers.len()
    }

    /// Runtime `i` (generation picks one per request).
    pub fn worker(&self, i: usize) -> &R {
        &self.workers[i.min(self.workers.len() - 1)]
    }

    /// The base model's configuration.
    pub fn config(&self) -> &ModelConfig {
        self.workers[0].config()
    }

    /// Places `host` (weights, gradients, moments, step) on every runtime.
    pub fn upload(&self, host: &Adapter) -> Result<Replicated<R>> {
        host.check_fits(self.config())?;
        let items = vec![(); self.workers.len()];
        let replicas = each(&self.workers, items, |w, ()| w.upload_adapter(host))
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        // Several replicas keep the accumulated gradient on the host; one keeps it on its device
        // (uploaded above), so only then is a host copy made.
        let accumulated = host.grads_flat().iter().any(|&x| x != 0.0);
        let pending = (replicas.len() > 1 && accumulated).then(|| host.grads_flat());
        Ok(Replicated {
            shape: host.shape(),
            grad_len: host.num_params(),
            replicas,
            pending,
            accumulated,
        })
    }

    /// A host copy of the adapter: weights, moments and step of the first replica (all are
    /// equal), and the accumulated gradient.
    pub fn download(&self, rep: &Replicated<R>) -> Result<Adapter> {
        let mut host = rep.shape.materialize(self.config())?;
        self.workers[0].download_adapter(&rep.replicas[0], &mut host)?;
        if rep.replicas.len() > 1 {
            match &rep.pending {
                Some(g) => host.set_grads_flat(g)?,
                None => host.zero_grad(),
            }
        }
        Ok(host)
    }

    /// Forward and backward over `data`, split by tokens over the runtimes; the gradients are
    /// ADDED to the adapter's accumulated gradient. The call is all or nothing: when a shard
    /// fails, panics or the outputs are not finite ([`EngineError::NonFinite`]), the
    /// accumulated gradient is exactly what it was before. Outputs keep the caller's datum order.
    pub fn forward_backward(
        &self,
        rep: &mut Replicated<R>,
        data: &[Datum],
        loss: &LossFn,
    ) -> Result<FwdBwdOutput> {
        if rep.replicas.len() == 1 {
            return self.forward_backward_one(rep, data, loss);
        }
        let ranges = self.ranges(data)?;
        let n = rep.grad_len;
        let jobs: Vec<(Range<usize>, &mut R::Adapter)> =
            ranges.into_iter().zip(rep.replicas.iter_mut()).collect();
        let results = each(&self.workers, jobs, |w, (r, replica)| {
            if r.is_empty() {
                return Ok(None);
            }
            // Cleared before the run, so a shard that failed earlier leaves nothing behind.
            w.zero_grad(replica)?;
            let out = w
                .forward_backward(replica, &data[r.clone()], loss)
                .map_err(|e| reindex(e, r.start))?;
            check_len(w, &out, r.len())?;
            let g = w.grads_to_host(replica)?;
            if g.len() != n {
                return Err(EngineError::Worker {
                    worker: w.device_name(),
                    message: "returned a gradient that does not match the adapter's tensors".into(),
                });
            }
            Ok(Some((out, g)))
        });
        let shards: Vec<(FwdBwdOutput, Vec<f32>)> =
            results.into_iter().collect::<Result<Vec<_>>>()?.into_iter().flatten().collect();
        // Checked before the reduction, so an overflowing batch adds nothing.
        shards.iter().try_for_each(|s| check_finite(&s.0))?;
        let grads: Vec<&[f32]> = shards.iter().map(|s| s.1.as_slice()).collect();
        let acc = rep.pending.get_or_insert_with(|| vec![0.0; n]);
        reduce_into(acc, &grads);
        Ok(merge(shards.into_iter().map(|s| s.0)))
    }

    /// One runtime: the device buffer accumulates in place, so a failed batch (error, panic,
    /// non-finite outputs) is rolled back to a snapshot taken before it (a zeroed buffer when
    /// nothing was accumulated, so the common one-batch-per-step loop copies nothing).
    fn forward_backward_one(
        &self,
        rep: &mut Replicated<R>,
        data: &[Datum],
        loss: &LossFn,
    ) -> Result<FwdBwdOutput> {
        let w = &self.workers[0];
        let replica = &mut rep.replicas[0];
        let snapshot = if rep.accumulated { Some(w.grads_to_host(replica)?) } else { None };
        let out = guarded(w, || w.forward_backward(replica, data, loss))
            .and_then(|o| check_finite(&o).map(|()| o));
        match out {
            Ok(out) => {
                rep.accumulated = true;
                Ok(out)
            }
            Err(e) => roll_back(w, replica, snapshot.as_deref(), e),
        }
    }

    /// Forward only (no gradients) with the adapter, or the base model for `None`.
    pub fn forward(
        &self,
        rep: Option<&Replicated<R>>,
        data: &[Datum],
        loss: &LossFn,
    ) -> Result<FwdBwdOutput> {
        if self.workers.len() == 1 {
            let w = &self.workers[0];
            let out = guarded(w, || w.forward(rep.map(|r| &r.replicas[0]), data, loss))?;
            check_finite(&out)?;
            return Ok(out);
        }
        let ranges = self.ranges(data)?;
        let jobs: Vec<(usize, Range<usize>)> = ranges.into_iter().enumerate().collect();
        let results = each(&self.workers, jobs, |w, (i, r)| {
            if r.is_empty() {
                return Ok(None);
            }
            let replica = rep.map(|x| &x.replicas[i]);
            let out =
                w.forward(replica, &data[r.clone()], loss).map_err(|e| reindex(e, r.start))?;
            check_len(w, &out, r.len())?;
            Ok(Some(out))
        });
        let outs = results.into_iter().collect::<Result<Vec<_>>>()?;
        outs.iter().flatten().try_for_each(check_finite)?;
        Ok(merge(outs.into_iter().flatten()))
    }

    /// One AdamW step on every replica with the summed gradient, which is then cleared. All or
    /// nothing: each replica is copied on its device first, and when any replica's step fails
    /// or panics (possibly half-way through the update) every replica is put back to its copy,
    /// so weights, moments, step and the pending gradient are exactly as before and a retry
    /// applies the step once.
    pub fn optim_step(&self, rep: &mut Replicated<R>, params: &AdamParams) -> Result<OptimMetrics> {
        let saved = each(&self.workers, rep.replicas.iter().collect(), |w, r| w.copy_adapter(r))
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let out = if rep.replicas.len() == 1 {
            let w = &self.workers[0];
            guarded(w, || w.optim_step(&mut rep.replicas[0], params))
        } else {
            let pending = rep.pending.as_deref();
            let jobs: Vec<&mut R::Adapter> = rep.replicas.iter_mut().collect();
            let results = each(&self.workers, jobs, |w, replica| {
                match pending {
                    Some(g) => w.grads_from_host(replica, g)?,
                    None => w.zero_grad(replica)?,
                }
                w.optim_step(replica, params)
            });
            results.into_iter().collect::<Result<Vec<_>>>().and_then(|m| {
                m.into_iter().next().ok_or_else(|| EngineError::InvalidInput("no replicas".into()))
            })
        };
        match out {
            Ok(m) => {
                rep.pending = None;
                rep.accumulated = false;
                Ok(m)
            }
            Err(e) => {
                // The copies are whole adapters: swapping them in restores everything the step
                // may have touched (with several replicas the shard buffers are scratch anyway;
                // the pending host gradient was never cleared).
                rep.replicas = saved;
                Err(e)
            }
        }
    }

    /// Global L2 norm of the gradient accumulated since the last step (what the next step
    /// would clip), without changing it.
    pub fn grad_norm(&self, rep: &Replicated<R>) -> Result<f64> {
        let sq = |g: &[f32]| g.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
        if rep.replicas.len() == 1 {
            return Ok(sq(&self.workers[0].grads_to_host(&rep.replicas[0])?).sqrt());
        }
        Ok(rep.pending.as_deref().map_or(0.0, sq).sqrt())
    }

    /// Drops the gradient accumulated since the last step.
    pub fn zero_grad(&self, rep: &mut Replicated<R>) -> Result<()> {
        rep.pending = None;
        rep.accumulated = false;
        for (w, replica) in self.workers.iter().zip(rep.replicas.iter_mut()) {
            w.zero_grad(replica)?;
        }
        Ok(())
    }

    /// Token-balanced contiguous shards, one per runtime (some may be empty).
    fn ranges(&self, data: &[Datum]) -> Result<Vec<Range<usize>>> {
        if data.is_empty() {
            return Err(EngineError::InvalidInput("data: the batch has no datums".into()));
        }
        let lens: Vec<usize> = data.iter().map(|d| d.input_tokens.len()).collect();
        Ok(split_by_tokens(&lens, self.workers.len()))
    }
}

impl DataParallel<CpuRuntime> {
    /// `n` CPU runtimes over `model`, splitting `threads` threads between them (each gets at
    /// least one); `n == 1` uses the process-wide pool.
    pub fn cpu(model: Arc<Model>, n: usize, threads: usize) -> Result<Self> {
        let n = n.max(1);
        if n == 1 {
            return Self::new(vec![CpuRuntime::new(model)]);
        }
        let per = (threads / n).max(1);
        let workers = (0..n)
            .map(|i| CpuRuntime::with_threads(model.clone(), i, per))
            .collect::<Result<Vec<_>>>()?;
        Self::new(workers)
    }
}

/// Puts a replica's gradient back to `snapshot` (zero when `None`) after the batch that failed
/// with `e`, and returns `e` (or an error naming both when the restore fails too).
fn roll_back<R: ModelRuntime, T>(
    w: &R,
    replica: &mut R::Adapter,
    snapshot: Option<&[f32]>,
    e: EngineError,
) -> Result<T> {
    let restored = match snapshot {
        Some(g) => guarded(w, || w.grads_from_host(replica, g)),
        None => guarded(w, || w.zero_grad(replica)),
    };
    match restored {
        Ok(()) => Err(e),
        Err(r) => Err(EngineError::Worker {
            worker: w.device_name(),
            message: format!("cannot restore the gradient ({r}) after: {e}"),
        }),
    }
}

fn check_len<R: ModelRuntime>(w: &R, out: &FwdBwdOutput, want: usize) -> Result<()> {
    if out.per_datum.len() != want {
        return Err(EngineError::Worker {
            worker: w.device_name(),
            message: format!("returned {} outputs for {want} datums", out.per_datum.len()),
        });
    }
    Ok(())
}

/// Refuses outputs with an infinite or NaN loss or logprob: JSON cannot carry them (they would
/// become `null`) and a gradient taken through them is garbage. A user error: the weights have
/// diverged or the inputs (weights, advantages) are too large.
fn check_finite(out: &FwdBwdOutput) -> Result<()> {
    let bad = |v: &[f32]| v.iter().position(|x| !x.is_finite());
    let found = out.per_datum.iter().enumerate().find_map(|(i, d)| {
        bad(&d.logprobs).map(|p| (i, "logprobs", p, d.logprobs[p])).or_else(|| {
            bad(&d.elementwise_loss).map(|p| (i, "elementwise_loss", p, d.elementwise_loss[p]))
        })
    });
    if let Some((i, what, p, v)) = found {
        return Err(EngineError::NonFinite(format!(
            "the computation overflowed: datum {i} {what}[{p}] is {v}; the weights have diverged \
             (lower the learning rate, or load an earlier checkpoint) or the loss inputs \
             (weights, advantages) are too large; nothing was accumulated"
        )));
    }
    if !out.loss_sum.is_finite() {
        return Err(EngineError::NonFinite(format!(
            "the computation overflowed: the summed loss is {}; the loss inputs (weights, \
             advantages) are too large or the weights have diverged; nothing was accumulated",
            out.loss_sum
        )));
    }
    Ok(())
}

/// Elements per task of the host reduction.
const REDUCE_CHUNK: usize = 1 << 14;

/// Host all-reduce: per element, the shards' values summed in worker order, then added to what
/// was accumulated before. Elements are independent, so splitting them over threads keeps the
/// result bit-identical from run to run.
fn reduce_into(acc: &mut [f32], grads: &[&[f32]]) {
    acc.par_chunks_mut(REDUCE_CHUNK).enumerate().for_each(|(c, out)| {
        let base = c * REDUCE_CHUNK;
        for (i, d) in out.iter_mut().enumerate() {
            let mut sum = 0.0f32;
            for g in grads {
                sum += g[base + i];
            }
            *d += sum;
        }
    });
}

/// Concatenates shard outputs (already in datum order) and sums their losses.
fn merge(shards: impl Iterator<Item = FwdBwdOutput>) -> FwdBwdOutput {
    let mut per_datum = Vec::new();
    let mut loss_sum = 0.0;
    for s in shards {
        per_datum.extend(s.per_datum);
        loss_sum += s.loss_sum;
    }
    FwdBwdOutput { per_datum, loss_sum }
}

/// Shard-local datum indices in input errors (`datum 2: ...`) become batch indices.
fn reindex(e: EngineError, offset: usize) -> EngineError {
    let EngineError::InvalidInput(msg) = &e else { return e };
    let Some(rest) = msg.strip_prefix("data[") else { return e };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    match rest[..digits].parse::<usize>() {
        Ok(i) if rest[digits..].starts_with(']') => {
            EngineError::InvalidInput(format!("data[{}{}", i + offset, &rest[digits..]))
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
        let e = reindex(EngineError::InvalidInput("data[1].model_input is empty".into()), 3);
        assert_eq!(e.to_string(), "invalid input: data[4].model_input is empty");
        let e = reindex(EngineError::InvalidInput("no tokens".into()), 3);
        assert_eq!(e.to_string(), "invalid input: no tokens");
    }
}
