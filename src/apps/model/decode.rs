//! Continuous batching of generation across requests and adapters: the running sequences of
//! every request on one runtime — each with its own adapter (or the base model), sampling
//! parameters, seed and stop rule — go through ONE pass over the base weights per step
//! (`ModelRuntime::forward_cached_many`). A request joins at the next step boundary and leaves
//! as soon as its samples stop; nobody waits for a window.
//!
//! There is no decode thread: the request threads take turns leading. A thread that finds no
//! leader runs passes over all admitted requests until its own request is done, then hands the
//! rest back to the queue and wakes the others, one of which leads next. Tokens do not depend
//! on the company a request keeps: its draws are keyed by (seed, sample, step) and each row's
//! logits come from its own adapter and cache.
//!
//! A request's adapter is borrowed by its thread (the model app holds the adapter's lock for
//! the whole generation, as it did when requests decoded alone) and lent to the leader; see
//! `Lent` for why that is sound.

use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use rayon::prelude::*;

use super::error::AppError;
use super::sample::Generation;
use crate::engine::parallel::panic_message;
use crate::engine::{CachedGroup, ModelRuntime};
use crate::protocol::internal::{SampleRequest, SampleResponse};
use crate::tokenize::Tokenizer;

/// Most sequences in one pass by default (vLLM's `max_num_seqs` default). A request with more
/// samples than this still runs, alone.
pub const DEFAULT_MAX_SEQS: usize = 256;

/// A request's adapter, borrowed by the request's thread and used by the leading thread.
///
/// Sound because the borrow outlives every use: [`DecodeBatcher::generate`] holds the
/// `&R::Adapter` for its whole call and returns only after its request's result is in
/// `State::done`; a job (with its `Lent`) is moved into `done` — and so out of the leader's
/// hands — in the same critical section that publishes the result, and the leader never keeps
/// or requeues a job after that. A panic inside a pass is caught in [`DecodeBatcher::lead`],
/// which then publishes every job it held, so no thread returns early.
struct Lent<A>(*const A);

// SAFETY: the pointee is only read (`&A`), and `A: Sync` makes sharing `&A` across threads
// sound; the lifetime argument is on the type.
unsafe impl<A: Sync> Send for Lent<A> {}

impl<A> Lent<A> {
    fn get(&self) -> &A {
        // SAFETY: the pointer came from a live `&A` whose borrow outlasts this job (see the
        // type's documentation).
        unsafe { &*self.0 }
    }
}

struct Job<R: ModelRuntime> {
    id: u64,
    adapter: Option<Lent<R::Adapter>>,
    generation: Generation<R>,
}

struct State<R: ModelRuntime> {
    next_id: u64,
    /// Requests waiting to be admitted, oldest first (started ones go back to the front when
    /// the leader changes, so they keep their place).
    queue: VecDeque<Job<R>>,
    /// A thread is running passes.
    leading: bool,
    /// Finished requests, for their threads to pick up.
    done: HashMap<u64, Result<Generation<R>, AppError>>,
}

/// Counts of the passes run so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeStats {
    /// Passes over the base weights.
    pub passes: u64,
    /// Sequences fed, summed over the passes.
    pub rows: u64,
    /// Passes that served more than one request.
    pub shared: u64,
}

impl std::iter::Sum for DecodeStats {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |a, s| DecodeStats {
            passes: a.passes + s.passes,
            rows: a.rows + s.rows,
            shared: a.shared + s.shared,
        })
    }
}

/// The decode batcher of one runtime.
pub struct DecodeBatcher<R: ModelRuntime> {
    state: Mutex<State<R>>,
    wake: Condvar,
    max_seqs: usize,
    passes: AtomicU64,
    rows: AtomicU64,
    shared: AtomicU64,
}

impl<R: ModelRuntime> DecodeBatcher<R> {
    /// A batcher admitting up to `max_seqs` running sequences per pass.
    pub fn new(max_seqs: usize) -> Self {
        DecodeBatcher {
            state: Mutex::new(State {
                next_id: 0,
                queue: VecDeque::new(),
                leading: false,
                done: HashMap::new(),
            }),
            wake: Condvar::new(),
            max_seqs: max_seqs.max(1),
            passes: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            shared: AtomicU64::new(0),
        }
    }

    pub fn stats(&self) -> DecodeStats {
        DecodeStats {
            passes: self.passes.load(Ordering::Relaxed),
            rows: self.rows.load(Ordering::Relaxed),
            shared: self.shared.load(Ordering::Relaxed),
        }
    }

    /// Samples `req.num_samples` continuations of `req.prompt` (`max_length` bounds prompt plus
    /// generation) with its sequences in the shared passes.
    pub fn generate(
        &self,
        rt: &R,
        adapter: Option<&R::Adapter>,
        tokenizer: Option<&Tokenizer>,
        max_length: usize,
        req: &SampleRequest,
    ) -> Result<SampleResponse, AppError> {
        let generation = Generation::new(rt, tokenizer, max_length, req)?;
        let generation = self.run(rt, tokenizer, adapter, generation)?;
        generation.finish(rt, adapter)
    }

    fn lock(&self) -> MutexGuard<'_, State<R>> {
        // The state is consistent between statements (moves of whole jobs), so a poisoned
        // lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(
        &self,
        rt: &R,
        tokenizer: Option<&Tokenizer>,
        adapter: Option<&R::Adapter>,
        generation: Generation<R>,
    ) -> Result<Generation<R>, AppError> {
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        let adapter = adapter.map(|a| Lent(a as *const R::Adapter));
        st.queue.push_back(Job { id, adapter, generation });
        loop {
            if let Some(result) = st.done.remove(&id) {
                return result;
            }
            if !st.leading {
                st.leading = true;
                drop(st);
                self.lead(rt, tokenizer, id);
                st = self.lock();
                continue;
            }
            st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Runs passes until request `me` is done (or nothing is left), then gives up the lead.
    fn lead(&self, rt: &R, tokenizer: Option<&Tokenizer>, me: u64) {
        let mut running: Vec<Job<R>> = Vec::new();
        loop {
            let mut st = self.lock();
            let mut seqs: usize = running.iter().map(|j| j.generation.width()).sum();
            while let Some(next) = st.queue.front() {
                let width = next.generation.width();
                if !running.is_empty() && seqs + width > self.max_seqs {
                    break;
                }
                seqs += width;
                running.extend(st.queue.pop_front());
            }
            if running.is_empty() {
                st.leading = false;
                self.wake.notify_all();
                return;
            }
            drop(st);
            let outcome = catch_unwind(AssertUnwindSafe(|| self.pass(rt, tokenizer, &mut running)));
            let mut st = self.lock();
            match outcome {
                Ok(errors) => {
                    let mut still = Vec::with_capacity(running.len());
                    for (job, error) in running.drain(..).zip(errors) {
                        match error {
                            Some(e) => drop(st.done.insert(job.id, Err(e))),
                            None if job.generation.finished() => {
                                st.done.insert(job.id, Ok(job.generation));
                            }
                            None => still.push(job),
                        }
                    }
                    running = still;
                }
                Err(payload) => {
                    let message = panic_message(payload.as_ref());
                    for job in running.drain(..) {
                        let e = AppError::Internal(format!("generation panicked: {message}"));
                        st.done.insert(job.id, Err(e));
                    }
                }
            }
            self.wake.notify_all();
            if st.done.contains_key(&me) {
                for job in running.drain(..).rev() {
                    st.queue.push_front(job);
                }
                st.leading = false;
                return;
            }
        }
    }

    /// One pass over every running job: their new tokens through the model together, then each
    /// job's token picks. Returns each job's error, if it failed.
    fn pass(
        &self,
        rt: &R,
        tokenizer: Option<&Tokenizer>,
        running: &mut [Job<R>],
    ) -> Vec<Option<AppError>> {
        let logits = {
            let mut inputs: Vec<_> = running
                .iter_mut()
                .map(|job| {
                    let adapter = job.adapter.as_ref().map(Lent::get);
                    let (cache, slots, tokens) = job.generation.inputs();
                    (adapter, cache, slots, tokens)
                })
                .collect();
            let mut groups: Vec<CachedGroup<'_, R::Adapter, R::Cache>> = inputs
                .iter_mut()
                .map(|(adapter, cache, slots, tokens)| CachedGroup {
                    adapter: *adapter,
                    cache: &mut **cache,
                    slots,
                    tokens: tokens.as_slice(),
                })
                .collect();
            let rows: usize = groups.iter().map(|g| g.slots.len()).sum();
            self.passes.fetch_add(1, Ordering::Relaxed);
            self.rows.fetch_add(rows as u64, Ordering::Relaxed);
            if groups.len() > 1 {
                self.shared.fetch_add(1, Ordering::Relaxed);
            }
            rt.forward_cached_many(&mut groups)
        };
        // Token picks (a softmax over the vocabulary per row) and stop checks are per job:
        // they run side by side.
        running
            .par_iter_mut()
            .zip(logits)
            .map(|(job, logits)| match logits {
                Ok(l) => job.generation.advance(rt, tokenizer, &l).err(),
                Err(e) => Some(e.into()),
            })
            .collect()
    }
}
