//! The combining queue in front of the engine's forward / forward_backward: jobs of different
//! adapters that are compatible (same class) and arrive within a short window run as ONE batch
//! (one pass over the base weights for all their tokens), each job getting its own result.
//!
//! Rules: a job that finds the engine idle and nobody waiting runs at once on its own thread
//! (a lone job is never delayed). Otherwise it queues; when the engine is free, one waiting
//! thread leads: it waits until the oldest queued job has waited the window (jobs queued behind
//! a running batch usually have, so they go at once), then takes from the queue front the jobs
//! of the front job's class, at most one per key (adapter) and never one behind an earlier job
//! of its key that stays queued, so each key's jobs run in arrival order. The leader runs the
//! batch for everyone in it and hands each thread its result.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most jobs in one batch (bounds a batch's memory; the rest wait for the next one).
pub const MAX_BATCH_JOBS: usize = 64;

/// A queued job: its key (adapter id), its class (only jobs of one class share a batch) and the
/// payload the batch runner receives.
struct Entry<J> {
    ticket: u64,
    key: String,
    class: String,
    at: Instant,
    job: J,
}

struct State<J, O> {
    /// A job or a batch is running, or a leader is collecting one.
    busy: bool,
    queue: VecDeque<Entry<J>>,
    done: HashMap<u64, O>,
    next_ticket: u64,
}

/// Counts of what the queue did (for tests and logs): every run, alone or batched.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Batches run from the queue (any size) plus jobs run at once.
    pub runs: AtomicU64,
    /// Jobs that ran in a batch of two or more.
    pub combined_jobs: AtomicU64,
    /// The largest batch so far.
    pub largest: AtomicU64,
}

/// A combining queue of jobs `J` with results `O` (see the module doc).
pub struct Combiner<J, O> {
    window: Duration,
    state: Mutex<State<J, O>>,
    cv: Condvar,
    stats: QueueStats,
}

impl<J, O> std::fmt::Debug for Combiner<J, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Combiner").field("window", &self.window).finish()
    }
}

/// Clears `busy` and wakes the waiters when a run ends, also when it unwinds (else every
/// queued job would wait forever).
struct Release<'a, J, O>(&'a Combiner<J, O>);

impl<J, O> Drop for Release<'_, J, O> {
    fn drop(&mut self) {
        self.0.lock().busy = false;
        self.0.cv.notify_all();
    }
}

impl<J, O> Combiner<J, O> {
    pub fn new(window: Duration) -> Self {
        Combiner {
            window,
            state: Mutex::new(State {
                busy: false,
                queue: VecDeque::new(),
                done: HashMap::new(),
                next_ticket: 0,
            }),
            cv: Condvar::new(),
            stats: QueueStats::default(),
        }
    }

    pub fn stats(&self) -> &QueueStats {
        &self.stats
    }

    /// Jobs waiting in the queue now (not those running).
    pub fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    fn lock(&self) -> MutexGuard<'_, State<J, O>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, size: usize) {
        self.stats.runs.fetch_add(1, Ordering::Relaxed);
        if size > 1 {
            self.stats.combined_jobs.fetch_add(size as u64, Ordering::Relaxed);
        }
        self.stats.largest.fetch_max(size as u64, Ordering::Relaxed);
        crate::metrics::global().model_batch_jobs.observe(size as f64);
    }

    /// Runs one job of `key` and `class`: `alone` at once when the engine is idle and nobody
    /// waits (the caller's own thread, its own borrowed data), else `job()` is queued and run
    /// in a batch by `run` (on whichever waiting thread leads; one result per job, in order).
    /// `lost` makes the result of a job whose batch panicked or returned too few results.
    pub fn submit(
        &self,
        key: &str,
        class: &str,
        job: impl FnOnce() -> J,
        alone: impl FnOnce() -> O,
        run: &dyn Fn(Vec<J>) -> Vec<O>,
        lost: &dyn Fn(String) -> O,
    ) -> O {
        let mut st = self.lock();
        if !st.busy && st.queue.is_empty() {
            st.busy = true;
            drop(st);
            let _release = Release(self);
            self.record(1);
            return alone();
        }
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        let entry = Entry {
            ticket,
            key: key.to_string(),
            class: class.to_string(),
            at: Instant::now(),
            job: job(),
        };
        st.queue.push_back(entry);
        // Waiting in the queue is queueing, not computing (the HTTP layer counts the job as
        // running from here on); the leader moves it back when the job enters a batch.
        let metrics = crate::metrics::global();
        metrics.model_jobs_running.dec();
        metrics.model_queue_depth.inc();
        loop {
            if let Some(out) = st.done.remove(&ticket) {
                return out;
            }
            if !st.busy && !st.queue.is_empty() {
                st = self.lead(st, run, lost);
                continue;
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Collects a batch (after the window) and runs it; returns with the state locked again
    /// and the batch's results posted.
    fn lead<'a>(
        &'a self,
        mut st: MutexGuard<'a, State<J, O>>,
        run: &dyn Fn(Vec<J>) -> Vec<O>,
        lost: &dyn Fn(String) -> O,
    ) -> MutexGuard<'a, State<J, O>> {
        st.busy = true;
        let release = Release(self);
        let oldest = st.queue.front().map_or_else(Instant::now, |e| e.at);
        let wait = (oldest + self.window).saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            // Companions arriving meanwhile queue behind (busy is set), and join below.
            drop(st);
            std::thread::sleep(wait);
            st = self.lock();
        }
        let batch = take(&mut st.queue, MAX_BATCH_JOBS);
        drop(st);
        let metrics = crate::metrics::global();
        let n = batch.len() as i64;
        metrics.model_queue_depth.dec_by(n);
        metrics.model_jobs_running.inc_by(n);
        self.record(batch.len());
        let tickets: Vec<u64> = batch.iter().map(|e| e.ticket).collect();
        let jobs: Vec<J> = batch.into_iter().map(|e| e.job).collect();
        let outs = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(jobs)))
            .map_err(|p| crate::engine::parallel::panic_message(&*p));
        let outs: Vec<O> = match outs {
            Ok(v) if v.len() == tickets.len() => v,
            Ok(v) => {
                let m =
                    format!("the batch returned {} results for {} jobs", v.len(), tickets.len());
                tickets.iter().map(|_| lost(m.clone())).collect()
            }
            Err(m) => {
                tracing::error!(panic = %m, "a batch of model jobs panicked");
                tickets.iter().map(|_| lost(format!("the batch panicked: {m}"))).collect()
            }
        };
        let mut st = self.lock();
        st.done.extend(tickets.into_iter().zip(outs));
        drop(st);
        // Clears busy and wakes everyone: the batch's threads take their results, and one of
        // the others leads the next batch.
        drop(release);
        self.lock()
    }
}

/// The next batch from the queue front: jobs of the front job's class, one per key, none
/// behind an earlier job of its key that stays queued; at most `max`.
fn take<J>(queue: &mut VecDeque<Entry<J>>, max: usize) -> Vec<Entry<J>> {
    let Some(class) = queue.front().map(|e| e.class.clone()) else { return Vec::new() };
    let mut keys = HashSet::new();
    let mut blocked = HashSet::new();
    let mut batch = Vec::new();
    let mut rest = VecDeque::with_capacity(queue.len());
    for e in queue.drain(..) {
        let fits = batch.len() < max
            && e.class == class
            && !keys.contains(&e.key)
            && !blocked.contains(&e.key);
        if fits {
            keys.insert(e.key.clone());
            batch.push(e);
        } else {
            blocked.insert(e.key.clone());
            rest.push_back(e);
        }
    }
    *queue = rest;
    batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn entry(ticket: u64, key: &str, class: &str) -> Entry<u64> {
        Entry { ticket, key: key.into(), class: class.into(), at: Instant::now(), job: ticket }
    }

    #[test]
    fn a_batch_takes_one_job_per_key_of_the_front_class_in_order() {
        let mut q: VecDeque<Entry<u64>> = [
            entry(0, "a", "fb"),
            entry(1, "b", "fwd"),
            entry(2, "a", "fb"),
            entry(3, "c", "fb"),
            entry(4, "b", "fb"),
            entry(5, "d", "fb"),
        ]
        .into();
        let b: Vec<u64> = take(&mut q, 8).into_iter().map(|e| e.ticket).collect();
        // a's second job waits (same key); b's fb waits behind b's queued forward.
        assert_eq!(b, vec![0, 3, 5]);
        let rest: Vec<u64> = q.iter().map(|e| e.ticket).collect();
        assert_eq!(rest, vec![1, 2, 4]);
        let b: Vec<u64> = take(&mut q, 8).into_iter().map(|e| e.ticket).collect();
        assert_eq!(b, vec![1]);
        let b: Vec<u64> = take(&mut q, 1).into_iter().map(|e| e.ticket).collect();
        assert_eq!(b, vec![2]);
    }

    #[test]
    fn a_lone_job_runs_at_once_and_queued_jobs_combine() {
        let c: Arc<Combiner<u64, u64>> = Arc::new(Combiner::new(Duration::from_secs(5)));
        let started = Instant::now();
        let out = c.submit("a", "x", || 1, || 10, &|v| v, &|_| 0);
        assert_eq!(out, 10);
        assert!(started.elapsed() < Duration::from_secs(1), "a lone job waited the window");

        // Hold the engine with a slow lone job; three others queue and run as one batch.
        let c = Arc::new(Combiner::<u64, u64>::new(Duration::from_millis(20)));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let holder = {
            let c = c.clone();
            std::thread::spawn(move || {
                c.submit("h", "x", || 0, || rx.recv().map_or(0, |()| 7), &|v| v, &|_| 0)
            })
        };
        while !c.lock().busy {
            std::thread::yield_now();
        }
        let batches = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (1..=3u64)
            .map(|i| {
                let (c, batches) = (c.clone(), batches.clone());
                std::thread::spawn(move || {
                    let run = |v: Vec<u64>| {
                        batches.lock().unwrap().push(v.clone());
                        v.iter().map(|x| x * 100).collect()
                    };
                    c.submit(&format!("k{i}"), "x", || i, || 0, &run, &|_| 0)
                })
            })
            .collect();
        while c.lock().queue.len() < 3 {
            std::thread::yield_now();
        }
        tx.send(()).unwrap();
        assert_eq!(holder.join().unwrap(), 7);
        let outs: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(outs, vec![100, 200, 300]);
        let batches = batches.lock().unwrap();
        assert_eq!(batches.len(), 1, "{batches:?}");
        assert_eq!(batches[0].len(), 3);
        assert_eq!(c.stats().combined_jobs.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_panicking_batch_fails_its_jobs_and_frees_the_queue() {
        let c = Arc::new(Combiner::<u64, Result<u64, String>>::new(Duration::ZERO));
        c.lock().busy = true;
        let t = {
            let c = c.clone();
            std::thread::spawn(move || {
                c.submit("a", "x", || 1, || Ok(0), &|_| panic!("boom"), &|m| Err(m))
            })
        };
        while c.lock().queue.is_empty() {
            std::thread::yield_now();
        }
        drop(Release(&*c));
        let got = t.join().unwrap();
        assert!(got.as_ref().is_err_and(|m| m.contains("boom")), "{got:?}");
        assert_eq!(c.submit("a", "x", || 1, || Ok(5), &|_| vec![], &|m| Err(m)), Ok(5));
    }
}
