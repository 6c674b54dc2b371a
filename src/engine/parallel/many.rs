//! Several tenants' groups in one call over data parallelism: each runtime runs ONE shared pass
//! over the base weights ([`ModelRuntime::forward_backward_many`] / [`ModelRuntime::forward_many`])
//! for its shards of every group, and each group keeps every guarantee of the one-adapter calls
//! ([`DataParallel::forward_backward`] / [`DataParallel::forward`]): the same token-balanced
//! shards (so a group's result is what it gets alone, to f32 rounding), the same host reduction
//! in worker order, rollback of a failed group's gradient with one worker, nothing added to its
//! pending host sum with several, and a panic turned into an error naming the device.
//!
//! Results are per group: a group with bad input fails alone. When the shared pass fails for
//! another reason (a panic, a device error), the groups it failed are run again alone, so only
//! a group that also fails alone reports an error.

use std::ops::Range;

use super::{
    DataParallel, Replicated, check_finite, check_len, each, guarded, merge, reduce_into, reindex,
};
use crate::engine::batch::{EvalGroup, FwdBwdOutput, TrainGroup};
use crate::engine::error::{EngineError, Result};
use crate::engine::loss::{Datum, LossFn};
use crate::engine::runtime::ModelRuntime;

/// A group's shard on one worker, for the shared training pass.
struct TrainShard<'a, A> {
    group: usize,
    range: Range<usize>,
    replica: &'a mut A,
    data: &'a [Datum],
    loss: &'a LossFn,
    grad_len: usize,
}

/// A group's shard on one worker, for the shared forward pass.
struct EvalShard<'a, A> {
    group: usize,
    range: Range<usize>,
    replica: Option<&'a A>,
    data: &'a [Datum],
    loss: &'a LossFn,
}

/// Per group: its shards' results in worker order.
type Gathered<T> = Vec<Vec<Result<T>>>;

/// One worker's answer: `(group, result)` per shard it ran, or an error that failed it whole.
type WorkerResults<T> = Result<Vec<(usize, Result<T>)>>;

/// A copy of an error that failed a whole pass, for each group it failed (engine errors are not
/// `Clone`; what matters is the device and the message).
fn copy_err(e: &EngineError, worker: &str) -> EngineError {
    match e {
        EngineError::Worker { worker, message } => {
            EngineError::Worker { worker: worker.clone(), message: message.clone() }
        }
        EngineError::Device { device, message } => {
            EngineError::Device { device: device.clone(), message: message.clone() }
        }
        other => EngineError::Worker { worker: worker.to_string(), message: other.to_string() },
    }
}

/// `n` copies of `e` (one per group of a pass that failed as a whole).
fn copies(e: &EngineError, worker: &str, n: usize) -> Vec<Result<FwdBwdOutput>> {
    (0..n).map(|_| Err(copy_err(e, worker))).collect()
}

/// One shard's output as its group's: a datum error renumbered from the shard's datums to the
/// group's, and one output per datum of the shard checked.
fn shard_out<R: ModelRuntime>(
    w: &R,
    range: &Range<usize>,
    out: Result<FwdBwdOutput>,
) -> Result<FwdBwdOutput> {
    let out = out.map_err(|e| reindex(e, range.start))?;
    check_len(w, &out, range.len())?;
    Ok(out)
}

/// A pass's results, checked to be one per group (else every group fails with a worker error).
fn one_per_group(
    worker: &str,
    outs: Result<Vec<Result<FwdBwdOutput>>>,
    n: usize,
) -> Vec<Result<FwdBwdOutput>> {
    match outs {
        Ok(v) if v.len() == n => v,
        Ok(v) => {
            let e = EngineError::Worker {
                worker: worker.to_string(),
                message: format!("returned {} results for {n} groups", v.len()),
            };
            copies(&e, worker, n)
        }
        Err(e) => copies(&e, worker, n),
    }
}

/// Sorts per-worker shard results (`Ok` lists of `(group, result)`, or an error that failed the
/// whole worker and so every group with a shard on it) into per-group lists in worker order.
fn gather<T>(
    per_worker: Vec<WorkerResults<T>>,
    on_worker: &[Vec<usize>],
    groups: usize,
    workers: &[String],
) -> Gathered<T> {
    let mut out: Gathered<T> = (0..groups).map(|_| Vec::new()).collect();
    for (w, res) in per_worker.into_iter().enumerate() {
        match res {
            Ok(list) => list.into_iter().for_each(|(g, r)| out[g].push(r)),
            Err(e) => {
                for &g in &on_worker[w] {
                    out[g].push(Err(copy_err(&e, &workers[w])));
                }
            }
        }
    }
    out
}

/// The bookkeeping of a shared pass split over the runtimes: their names, a result slot per
/// group, each runtime's shards and the group of each of them.
struct Split<S> {
    names: Vec<String>,
    results: Vec<Option<Result<FwdBwdOutput>>>,
    jobs: Vec<Vec<S>>,
    on_worker: Vec<Vec<usize>>,
}

impl<S> Split<S> {
    fn new<R: ModelRuntime>(workers: &[R], groups: usize) -> Self {
        let nw = workers.len();
        Split {
            names: workers.iter().map(|w| w.device_name()).collect(),
            results: (0..groups).map(|_| None).collect(),
            jobs: (0..nw).map(|_| Vec::new()).collect(),
            on_worker: vec![Vec::new(); nw],
        }
    }
}

/// Group `i`'s result of a shared pass, or when the pass failed it for a reason that is not
/// the group's own input, the result of `alone(i)`.
fn retry_alone(
    first: Vec<Result<FwdBwdOutput>>,
    mut alone: impl FnMut(usize) -> Result<FwdBwdOutput>,
) -> Vec<Result<FwdBwdOutput>> {
    first
        .into_iter()
        .enumerate()
        .map(|(i, r)| match r {
            Err(e) if !e.is_user_error() => {
                tracing::warn!(error = %e, "the shared pass failed a group; running it alone");
                alone(i)
            }
            r => r,
        })
        .collect()
}

impl<R: ModelRuntime> DataParallel<R> {
    /// [`forward_backward`](Self::forward_backward) of several groups (distinct adapters, each
    /// its own datums and loss), sharing each runtime's pass over the base weights: one result
    /// per group, each as if the group ran alone, and each all or nothing for its own adapter.
    pub fn forward_backward_many(
        &self,
        groups: &mut [TrainGroup<'_, Replicated<R>>],
    ) -> Vec<Result<FwdBwdOutput>> {
        if let [g] = groups {
            return vec![self.forward_backward(g.adapter, g.data, g.loss)];
        }
        let first = if self.workers.len() == 1 {
            self.train_shared_one(groups)
        } else {
            self.train_shared_split(groups)
        };
        // Whatever the shared pass failed that is not the group's own fault is retried alone
        // (its gradient is already back to what it was before the pass).
        retry_alone(first, |i| {
            let g = &mut groups[i];
            self.forward_backward(g.adapter, g.data, g.loss)
        })
    }

    /// One runtime: its buffers accumulate in place, so each group's gradient is snapshotted
    /// (when it holds one) and a group that fails is put back, as `forward_backward_one` does.
    fn train_shared_one(
        &self,
        groups: &mut [TrainGroup<'_, Replicated<R>>],
    ) -> Vec<Result<FwdBwdOutput>> {
        let w = &self.workers[0];
        let mut results: Vec<Option<Result<FwdBwdOutput>>> = groups.iter().map(|_| None).collect();
        let mut taken = Vec::with_capacity(groups.len());
        let mut inner = Vec::with_capacity(groups.len());
        for (i, g) in groups.iter_mut().enumerate() {
            let rep = &mut *g.adapter;
            let snapshot = if rep.accumulated {
                match w.grads_to_host(&rep.replicas[0]) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        results[i] = Some(Err(e));
                        continue;
                    }
                }
            } else {
                None
            };
            taken.push((i, snapshot));
            inner.push(TrainGroup { adapter: &mut rep.replicas[0], data: g.data, loss: g.loss });
        }
        let n = inner.len();
        let outs = guarded(w, || Ok(w.forward_backward_many(&mut inner)));
        drop(inner);
        let outs = one_per_group(&w.device_name(), outs, n);
        for ((i, snapshot), out) in taken.into_iter().zip(outs) {
            let rep = &mut *groups[i].adapter;
            let out = out.and_then(|o| check_finite(&o).map(|()| o));
            results[i] = Some(match out {
                Ok(o) => {
                    rep.accumulated = true;
                    Ok(o)
                }
                Err(e) => super::roll_back(w, &mut rep.replicas[0], snapshot.as_deref(), e),
            });
        }
        results.into_iter().map(|r| r.unwrap_or_else(|| Err(no_result()))).collect()
    }

    /// Several runtimes: every group is split like `forward_backward` splits it; each runtime
    /// runs its shards of all groups in one shared pass (its buffers cleared first, so they
    /// hold only this pass), and a group whose shards all succeed adds their sum, in worker
    /// order, to its pending host gradient.
    fn train_shared_split(
        &self,
        groups: &mut [TrainGroup<'_, Replicated<R>>],
    ) -> Vec<Result<FwdBwdOutput>> {
        let Split { names, mut results, mut jobs, mut on_worker } =
            Split::<TrainShard<R::Adapter>>::new(&self.workers, groups.len());
        for (i, g) in groups.iter_mut().enumerate() {
            let ranges = match self.ranges(g.data) {
                Ok(r) => r,
                Err(e) => {
                    results[i] = Some(Err(e));
                    continue;
                }
            };
            let (data, loss, grad_len) = (g.data, g.loss, g.adapter.grad_len);
            for ((w, range), replica) in ranges.into_iter().enumerate().zip(&mut g.adapter.replicas)
            {
                if !range.is_empty() {
                    on_worker[w].push(i);
                    jobs[w].push(TrainShard { group: i, range, replica, data, loss, grad_len });
                }
            }
        }
        let per_worker = each(&self.workers, jobs, |w, mut shards| {
            for s in shards.iter_mut() {
                w.zero_grad(s.replica)?;
            }
            let mut tg: Vec<TrainGroup<R::Adapter>> = shards
                .iter_mut()
                .map(|s| TrainGroup {
                    adapter: &mut *s.replica,
                    data: &s.data[s.range.clone()],
                    loss: s.loss,
                })
                .collect();
            let outs = w.forward_backward_many(&mut tg);
            drop(tg);
            let outs = one_per_group(&w.device_name(), Ok(outs), shards.len());
            Ok(shards
                .iter()
                .zip(outs)
                .map(|(s, o)| {
                    let r = shard_out(w, &s.range, o).and_then(|out| {
                        let g = w.grads_to_host(&*s.replica)?;
                        if g.len() != s.grad_len {
                            return Err(EngineError::Worker {
                                worker: w.device_name(),
                                message: "returned a gradient that does not match the adapter's \
                                          tensors"
                                    .into(),
                            });
                        }
                        Ok((out, g))
                    });
                    (s.group, r)
                })
                .collect::<Vec<_>>())
        });
        let gathered = gather(per_worker, &on_worker, groups.len(), &names);
        for (i, shards) in gathered.into_iter().enumerate() {
            if results[i].is_some() {
                continue;
            }
            let shards = shards.into_iter().collect::<Result<Vec<_>>>().and_then(|s| {
                // Checked before the reduction, so an overflowing group adds nothing.
                s.iter().try_for_each(|x| check_finite(&x.0)).map(|()| s)
            });
            results[i] = Some(shards.map(|shards| {
                let rep = &mut *groups[i].adapter;
                let n = rep.grad_len;
                let grads: Vec<&[f32]> = shards.iter().map(|s| s.1.as_slice()).collect();
                reduce_into(rep.pending.get_or_insert_with(|| vec![0.0; n]), &grads);
                merge(shards.into_iter().map(|s| s.0))
            }));
        }
        results.into_iter().map(|r| r.unwrap_or_else(|| Err(no_result()))).collect()
    }

    /// [`forward`](Self::forward) of several groups (each its adapter or the base model, its
    /// datums and loss) sharing each runtime's pass over the base weights; one result per group.
    pub fn forward_many(
        &self,
        groups: &[EvalGroup<'_, Replicated<R>>],
    ) -> Vec<Result<FwdBwdOutput>> {
        if let [g] = groups {
            return vec![self.forward(g.adapter, g.data, g.loss)];
        }
        let first = if self.workers.len() == 1 {
            let w = &self.workers[0];
            let inner: Vec<EvalGroup<R::Adapter>> = groups
                .iter()
                .map(|g| EvalGroup {
                    adapter: g.adapter.map(|r| &r.replicas[0]),
                    data: g.data,
                    loss: g.loss,
                })
                .collect();
            let outs = guarded(w, || Ok(w.forward_many(&inner)));
            one_per_group(&w.device_name(), outs, inner.len())
                .into_iter()
                .map(|o| o.and_then(|o| check_finite(&o).map(|()| o)))
                .collect()
        } else {
            self.eval_shared_split(groups)
        };
        retry_alone(first, |i| {
            let g = &groups[i];
            self.forward(g.adapter, g.data, g.loss)
        })
    }

    /// Several runtimes: the shards of every group, one shared forward pass per runtime.
    fn eval_shared_split(
        &self,
        groups: &[EvalGroup<'_, Replicated<R>>],
    ) -> Vec<Result<FwdBwdOutput>> {
        let Split { names, mut results, mut jobs, mut on_worker } =
            Split::<EvalShard<R::Adapter>>::new(&self.workers, groups.len());
        for (i, g) in groups.iter().enumerate() {
            match self.ranges(g.data) {
                Ok(ranges) => {
                    for (w, range) in ranges.into_iter().enumerate() {
                        if !range.is_empty() {
                            let replica = g.adapter.map(|r| &r.replicas[w]);
                            on_worker[w].push(i);
                            let (data, loss) = (g.data, g.loss);
                            jobs[w].push(EvalShard { group: i, range, replica, data, loss });
                        }
                    }
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let per_worker = each(&self.workers, jobs, |w, shards| {
            let eg: Vec<EvalGroup<R::Adapter>> = shards
                .iter()
                .map(|s| EvalGroup {
                    adapter: s.replica,
                    data: &s.data[s.range.clone()],
                    loss: s.loss,
                })
                .collect();
            let outs = one_per_group(&w.device_name(), Ok(w.forward_many(&eg)), shards.len());
            Ok(shards
                .iter()
                .zip(outs)
                .map(|(s, o)| (s.group, shard_out(w, &s.range, o)))
                .collect::<Vec<_>>())
        });
        let gathered = gather(per_worker, &on_worker, groups.len(), &names);
        for (i, shards) in gathered.into_iter().enumerate() {
            if results[i].is_none() {
                let outs = shards
                    .into_iter()
                    .collect::<Result<Vec<_>>>()
                    .and_then(|s| s.iter().try_for_each(check_finite).map(|()| s));
                results[i] = Some(outs.map(|s| merge(s.into_iter())));
            }
        }
        results.into_iter().map(|r| r.unwrap_or_else(|| Err(no_result()))).collect()
    }
}

/// A group left without a result (a bug): not the caller's fault, so it is retried alone.
fn no_result() -> EngineError {
    EngineError::Worker {
        worker: "data parallel".into(),
        message: "the shared pass produced no result for this group".into(),
    }
}
