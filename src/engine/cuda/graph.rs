//! Decode steps as CUDA graphs: a step's launches (about ten per layer plus the head) are
//! captured once per step shape and replayed for every later token, so a token costs one graph
//! launch instead of hundreds of kernel launches — the launch and driver overhead that bounds
//! batch-1 decode (`../shared/tools/cuda-emu/FINDINGS.md`).
//!
//! What a graph bakes in, and so what keys it ([`GraphKey`]): the number of rows, each group's
//! rows, KV cache (by id, standing for the cache buffers' addresses) and split-KV context hint
//! (a power of two, so a long generation is captured once per doubling), and the LoRA segments
//! with every module's rank per segment (the launch shapes). Everything that changes per token is
//! data in buffers the graph owns, rewritten before each replay: token ids, positions, the LoRA
//! tables (adapter addresses and scales), cache slots, cache rows and context lengths.
//!
//! A shape seen for the first time runs kernel by kernel as usual (a shape that never comes back,
//! as under heavy request churn, costs nothing extra). The second time it runs kernel by kernel
//! with every intermediate taken from a private workspace pool; that run's logits are the step's
//! result. The same step is then captured (nothing executes): it takes the same buffers from the
//! pool in the same order, so the capture allocates nothing and the graph's addresses stay valid
//! for as long as the entry keeps the pool. A capture that fails (an allocation or a host copy
//! inside the captured region) marks the shape plain for good. Up to [`MAX_GRAPHS`] shapes are
//! kept, the least recently used dropped first. `TWINKLE_CUDA_GRAPHS=0` (or
//! [`CudaModel::set_cuda_graphs`]) turns graphs off; they are also off while the profiler runs,
//! which times each kernel on its own. A capture records everything enqueued on the device's one
//! stream, so, like every other use of a device, it relies on the caller serialising access
//! (`CudaRuntime` holds its lock around each call).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaGraph;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};

use super::CudaError;
use super::generate::StepHost;
use super::layer::{DecodeRows, KvMode, Pack};
use super::model::{Act, CudaModel, R, scratch, view, view_mut};
use super::segment::{SegHost, SegLora};
use super::workspace::{Buf, Workspace};

/// Step shapes kept captured per model.
pub const MAX_GRAPHS: usize = 8;

/// What a captured step bakes in (module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
struct GraphKey {
    rows: usize,
    /// (cache id, first row, rows, context hint) per group.
    groups: Vec<(u64, usize, usize, usize)>,
    bounds: Vec<usize>,
    ranks: Vec<Vec<usize>>,
}

/// cudarc's graph handle is not `Send`: CUDA graphs need external serialisation only, which
/// the entry gives (one thread holds an entry at a time: it is taken out of the list to be
/// used).
struct Graph(CudaGraph);

// SAFETY: see `Graph`: an entry (and so its graph) is used by at most one thread at a time.
unsafe impl Send for Graph {}

/// One captured step shape. Field order is drop order: the graph goes before the buffers it
/// reads.
struct Entry {
    key: GraphKey,
    graph: Graph,
    pack: Pack,
    lora: SegLora,
    /// Each group's per-row indices, refilled on a replay.
    inputs: Vec<DecodeRows<Buf<i32>>>,
    logits: Buf<f32>,
    _pool: Arc<Workspace>,
}

#[derive(Default)]
struct Inner {
    /// Most recently used last.
    entries: Vec<Entry>,
    /// Shapes whose capture failed: always run kernel by kernel.
    plain: Vec<GraphKey>,
    /// Shapes seen once (most recent last, at most [`MAX_SEEN`]).
    seen: Vec<GraphKey>,
}

/// Shapes remembered as seen once.
const MAX_SEEN: usize = 32;

/// The captured decode steps of one model (module docs).
pub(crate) struct DecodeGraphs {
    inner: Mutex<Inner>,
    enabled: AtomicBool,
    captures: AtomicU64,
    replays: AtomicU64,
}

impl DecodeGraphs {
    /// On unless `TWINKLE_CUDA_GRAPHS=0`.
    pub(crate) fn from_env() -> Self {
        let off = std::env::var("TWINKLE_CUDA_GRAPHS").is_ok_and(|v| v == "0");
        DecodeGraphs {
            inner: Mutex::default(),
            enabled: AtomicBool::new(!off),
            captures: AtomicU64::new(0),
            replays: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the entry for `key` out of the list (it goes back with [`Self::put`]).
    fn take(&self, key: &GraphKey) -> Option<Entry> {
        let mut g = self.lock();
        let i = g.entries.iter().position(|e| &e.key == key)?;
        Some(g.entries.remove(i))
    }

    fn put(&self, e: Entry) {
        let evicted = {
            let mut g = self.lock();
            g.entries.push(e);
            let over = g.entries.len().saturating_sub(MAX_GRAPHS);
            g.entries.drain(..over).collect::<Vec<_>>()
        };
        // freed outside the lock: dropping a graph and its pool are driver calls
        drop(evicted);
    }

    fn is_plain(&self, key: &GraphKey) -> bool {
        self.lock().plain.contains(key)
    }

    /// True when `key` was seen before (and forgets it: it is about to be captured); else
    /// remembers it.
    fn seen_before(&self, key: &GraphKey) -> bool {
        let mut g = self.lock();
        if let Some(i) = g.seen.iter().position(|k| k == key) {
            g.seen.remove(i);
            return true;
        }
        g.seen.push(key.clone());
        let over = g.seen.len().saturating_sub(MAX_SEEN);
        g.seen.drain(..over);
        false
    }
}

impl<T: Act> CudaModel<T> {
    /// Turns captured decode steps on or off (off drops every captured step).
    pub fn set_cuda_graphs(&self, on: bool) {
        self.graphs.enabled.store(on, Ordering::Relaxed);
        if !on {
            let all = std::mem::take(&mut self.graphs.lock().entries);
            drop(all);
        }
    }

    /// (steps captured, steps replayed) since the model was created.
    pub fn cuda_graph_stats(&self) -> (u64, u64) {
        let g = &self.graphs;
        (g.captures.load(Ordering::Relaxed), g.replays.load(Ordering::Relaxed))
    }

    pub(crate) fn graphs_usable(&self) -> bool {
        self.graphs.enabled.load(Ordering::Relaxed) && !self.dev.profiler().is_on()
    }

    fn graph_key(&self, step: &StepHost<'_, T>, tables: &SegHost) -> GraphKey {
        let (bounds, ranks) = (tables.bounds.clone(), tables.ranks.clone());
        let groups = step
            .groups
            .iter()
            .map(|g| (g.cache.id, g.rows.start, g.rows.len(), g.max_ctx))
            .collect();
        GraphKey { rows: step.tokens.len(), groups, bounds, ranks }
    }

    /// [`Self::decode_step`]'s graph path: a replay when this shape is captured, else a plain
    /// run that also captures it.
    pub(crate) fn decode_step_graphed(&self, step: StepHost<'_, T>) -> R<Buf<f32>> {
        // the LoRA tables' host side, computed once: their shapes key the graph, their
        // contents refill it
        let tables = SegLora::host(self, &step.specs)?;
        let key = self.graph_key(&step, &tables);
        if let Some(mut e) = self.graphs.take(&key) {
            let out = self.replay(&mut e, step, &tables)?;
            // an entry whose replay failed is dropped (its buffers' state is unknown)
            self.graphs.put(e);
            return Ok(out);
        }
        if self.graphs.is_plain(&key) || !self.graphs.seen_before(&key) {
            return self.decode_plain(step);
        }
        let pool = Workspace::new(self.dev.stream().clone());
        let redirect = self.dev.ws().redirect(&pool);
        let (p, lora, mut kv, fed) = self.stage_step(step)?;
        let b = p.rows;
        let first = {
            let st = self.stack_fwd(&p, &lora, &mut kv, false)?;
            self.logits_rows(&st.h_final, b, &lora)?
        };
        drop(redirect);
        // the result leaves in a buffer of the device's own pool; `first` returns to `pool`
        let out = self.copy_logits(&first, b)?;
        drop(first);
        let captured = {
            let _redirect = self.dev.ws().redirect(&pool);
            self.capture(&p, &lora, &mut kv, b)
        };
        let KvMode::Decode(groups) = kv else {
            return Err(CudaError::Shape { kernel: "graph", msg: "not a decode step".into() });
        };
        let mut inputs = Vec::with_capacity(groups.len());
        for (g, seqs) in groups.into_iter().zip(fed) {
            g.cache.advance(&seqs);
            inputs.push(g.idx);
        }
        match captured {
            Ok((graph, logits)) => {
                self.graphs.captures.fetch_add(1, Ordering::Relaxed);
                let graph = Graph(graph);
                self.graphs.put(Entry { key, graph, pack: p, lora, inputs, logits, _pool: pool });
            }
            Err(e) => {
                tracing::warn!("decode step not captured as a CUDA graph: {e}");
                self.graphs.lock().plain.push(key);
            }
        }
        Ok(out)
    }

    /// Records the step (nothing runs) and instantiates it. The capture is ended on every path.
    fn capture(
        &self,
        p: &Pack,
        lora: &SegLora,
        kv: &mut KvMode<'_, T>,
        b: usize,
    ) -> R<(CudaGraph, Buf<f32>)> {
        let stream = self.dev.stream();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(CudaError::driver("beginning a graph capture"))?;
        let run = self.stack_fwd(p, lora, kv, false).and_then(|st| {
            let logits = self.logits_rows(&st.h_final, b, lora);
            drop(st);
            logits
        });
        let graph = stream.end_capture(CUgraphInstantiate_flags(0));
        let logits = run?;
        let graph = graph.map_err(CudaError::driver("ending a graph capture"))?;
        let graph = graph.ok_or_else(|| CudaError::Shape {
            kernel: "graph",
            msg: "the capture recorded nothing".into(),
        })?;
        Ok((graph, logits))
    }

    /// Rewrites the entry's inputs for `step` and launches its graph.
    fn replay(&self, e: &mut Entry, step: StepHost<'_, T>, tables: &SegHost) -> R<Buf<f32>> {
        let stream = self.dev.stream();
        let to_i32 = |v: &[u32]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
        let e_in = || CudaError::driver("staging a graph replay's inputs");
        // tokens are below the vocabulary and positions below max_position_embeddings
        // (check_feed), so both fit an i32
        stream.memcpy_htod(&to_i32(&step.tokens), &mut *e.pack.ids).map_err(e_in())?;
        stream.memcpy_htod(&to_i32(&step.positions), &mut *e.pack.pos).map_err(e_in())?;
        e.lora.refill(self, tables)?;
        for (g, dst) in step.groups.iter().zip(e.inputs.iter_mut()) {
            for (host, buf) in g.idx.parts().into_iter().zip(dst.parts_mut()) {
                stream.memcpy_htod(host, &mut **buf).map_err(e_in())?;
            }
        }
        e.graph.0.launch().map_err(CudaError::driver("launching a decode graph"))?;
        self.graphs.replays.fetch_add(1, Ordering::Relaxed);
        let out = self.copy_logits(&e.logits, step.tokens.len())?;
        for g in step.groups {
            g.cache.advance(&g.fed);
        }
        Ok(out)
    }

    /// A copy of logits [b, vocab] in a buffer of the device's pool.
    fn copy_logits(&self, src: &Buf<f32>, b: usize) -> R<Buf<f32>> {
        let n = b * self.cfg.vocab_size;
        let mut out = scratch::<f32>(&self.dev, n)?;
        self.dev
            .stream()
            .memcpy_dtod(&view(src, 0, n)?, &mut view_mut(&mut out, 0, n)?)
            .map_err(CudaError::driver("copying a step's logits"))?;
        Ok(out)
    }
}
