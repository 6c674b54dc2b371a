//! Decode steps replayed from captured CUDA graphs (`engine/cuda/graph.rs`) against the same
//! steps run kernel by kernel: bitwise the same logits (the same kernels read the same inputs),
//! a new capture at the second step of every new shape (a second request joins, one leaves, an
//! adapter of another rank), replays otherwise, and every cache advanced exactly as without.

use anyhow::{Result, ensure};
use twinkle::engine::cuda::CudaRuntime;
use twinkle::engine::lora::{LoraConfig, Target};
use twinkle::engine::{Adapter, Model, ModelRuntime};

use super::decode_groups;

/// Every logits row in feeding order, and each cache's final lengths.
type Outcome = (Vec<Vec<f32>>, Vec<Vec<usize>>);

/// Runs the schedule: request 0 (two sequences) alone, then with request 1, then alone again,
/// then with request 2 (another rank); greedy picks fed back. Returns every logits row in order
/// and each cache's final lengths.
fn schedule(
    rt: &CudaRuntime<f32>,
    ads: &[<CudaRuntime<f32> as ModelRuntime>::Adapter],
) -> Result<Outcome> {
    let v = rt.config().vocab_size;
    let seqs = [vec![0usize, 1], vec![0], vec![1]];
    let mut caches = (0..3).map(|_| rt.new_cache(2, 40)).collect::<Result<Vec<_>, _>>()?;
    let mut last: Vec<Vec<u32>> = vec![vec![]; 3];
    let mut rows = Vec::new();
    for r in 0..3 {
        let prompt: Vec<u32> = (0..4 + r).map(|t| ((t * 11 + r * 5) % v) as u32).collect();
        let ins: Vec<&[u32]> = seqs[r].iter().map(|_| prompt.as_slice()).collect();
        let lg = rt.forward_cached(Some(&ads[r]), &mut caches[r], &seqs[r], &ins)?;
        for row in rt.logits_to_host(&lg)? {
            last[r].push(argmax(&row));
        }
    }
    let phases: [&[usize]; 4] = [&[0], &[0, 1], &[0], &[0, 2]];
    for active in phases {
        for _ in 0..4 {
            let toks: Vec<Vec<[u32; 1]>> =
                last.iter().map(|l| l.iter().map(|&t| [t]).collect()).collect();
            let ins: Vec<Vec<&[u32]>> =
                toks.iter().map(|l| l.iter().map(|t| t.as_slice()).collect()).collect();
            let mut groups = decode_groups(ads, &mut caches, &seqs, &ins, |r| active.contains(&r));
            let out = rt.forward_cached_many(&mut groups);
            for (&r, lg) in active.iter().zip(out) {
                let host = rt.logits_to_host(&lg?)?;
                last[r] = host.iter().map(|row| argmax(row)).collect();
                rows.extend(host);
            }
        }
    }
    let lens = caches.iter().map(|c| (0..2).map(|s| c.len(s)).collect()).collect();
    Ok((rows, lens))
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

pub fn graphs_equal_plain(model: &std::sync::Arc<Model>) -> Result<()> {
    let rt = CudaRuntime::<f32>::new(0, model)?;
    let mut all = Target::LAYER.to_vec();
    all.push(Target::LmHead);
    let ranks = [4, 4, 8];
    let mut ads = Vec::new();
    for (i, r) in ranks.iter().enumerate() {
        let cfg = LoraConfig { rank: *r, alpha: 8.0, targets: all.clone(), seed: i as u64 + 1 };
        let mut a = Adapter::new(model, &cfg)?;
        crate::engine_support::randomize_b(&mut a, 40 + i as u64, 0.3);
        ads.push(rt.upload_adapter(&a)?);
    }

    rt.model().set_cuda_graphs(false);
    let (want, want_lens) = schedule(&rt, &ads)?;
    ensure!(rt.model().cuda_graph_stats() == (0, 0), "graphs ran while turned off");

    rt.model().set_cuda_graphs(true);
    let (got, got_lens) = schedule(&rt, &ads)?;
    let (captures, replays) = rt.model().cuda_graph_stats();
    // shapes: request 0 alone, 0 + 1, 0 + 2 (ranks differ), each captured at its second step;
    // request 0 alone comes back as replays
    ensure!(captures == 3, "{captures} captures, expected 3");
    ensure!(replays == 16 - 6, "{replays} replays, expected 10 (16 steps, 3 seen, 3 captured)");
    ensure!(got.len() == want.len(), "{} logits rows vs {}", got.len(), want.len());
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        ensure!(a == b, "logits row {i} differs between the graph replay and the plain run");
    }
    ensure!(got_lens == want_lens, "cache lengths {got_lens:?} vs {want_lens:?}");
    Ok(())
}
