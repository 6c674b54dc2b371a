//! Several tenants in one pass on the CUDA runtime (`forward_backward_many`, `forward_many`,
//! `forward_cached_many`: segmented LoRA over shared base GEMMs) against each group run alone on
//! the same runtime: outputs and accumulated gradients within 1e-5 relative (f32 storage), a bad
//! group failing alone with its adapter untouched, and in decoding the same logits (1e-5) and
//! the same greedy and seeded tokens, with every request's cache advanced exactly as alone.

use anyhow::{Result, ensure};
use twinkle::engine::cuda::CudaRuntime;
use twinkle::engine::lora::{LoraConfig, Target};
use twinkle::engine::sampling::SamplingParams;
use twinkle::engine::{
    Adapter, Datum, EvalGroup, FwdBwdOutput, LossFn, Model, ModelRuntime, TrainGroup,
};

use super::decode_groups;

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0.0f64, |s, v| s.max(v.abs() as f64)).max(1e-30);
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max) / scale
}

/// Adapters of different ranks and targets (the segments of one pass differ in both).
fn adapters(model: &Model) -> Result<Vec<Adapter>> {
    let mut all = Target::LAYER.to_vec();
    all.push(Target::LmHead);
    let cfgs = [
        LoraConfig { rank: 4, alpha: 8.0, targets: all.clone(), seed: 1 },
        LoraConfig {
            rank: 8,
            alpha: 4.0,
            targets: vec![Target::Q, Target::V, Target::Down],
            seed: 2,
        },
        LoraConfig { rank: 2, alpha: 16.0, targets: all, seed: 3 },
    ];
    cfgs.iter()
        .enumerate()
        .map(|(i, c)| {
            let mut a = Adapter::new(model, c)?;
            crate::engine_support::randomize_b(&mut a, 20 + i as u64, 0.3);
            Ok(a)
        })
        .collect()
}

fn outputs_close(name: &str, got: &FwdBwdOutput, want: &FwdBwdOutput) -> Result<()> {
    let lp =
        |o: &FwdBwdOutput| o.per_datum.iter().flat_map(|d| d.logprobs.clone()).collect::<Vec<_>>();
    let el = |o: &FwdBwdOutput| {
        o.per_datum.iter().flat_map(|d| d.elementwise_loss.clone()).collect::<Vec<_>>()
    };
    let e = rel(&lp(got), &lp(want)).max(rel(&el(got), &el(want)));
    let l = (got.loss_sum - want.loss_sum).abs() / want.loss_sum.abs().max(1e-30);
    ensure!(e <= 1e-5 && l <= 1e-5, "{name}: outputs differ by {e:.2e}, loss by {l:.2e}");
    Ok(())
}

pub fn many_equals_alone(model: &std::sync::Arc<Model>) -> Result<()> {
    let rt = CudaRuntime::<f32>::new(0, model)?;
    let v = model.config().vocab_size;
    let hosts = adapters(model)?;
    let data: Vec<Vec<Datum>> = [(1, vec![5, 9, 3]), (2, vec![7]), (3, vec![4, 6])]
        .into_iter()
        .map(|(s, l)| crate::engine_support::random_batch(s, &l, v, true))
        .collect();
    let mut bad = data[1].clone();
    bad[0].input_tokens[2] = v as u32 + 5;
    let losses = [
        LossFn::CrossEntropy,
        LossFn::Ppo { clip_low: 0.8, clip_high: 1.2 },
        LossFn::Ppo { clip_low: 0.9, clip_high: 1.1 },
    ];

    // training: alone, then together (fresh uploads of the same hosts)
    let mut alone = Vec::new();
    let mut grads_alone = Vec::new();
    for ((h, d), l) in hosts.iter().zip(&data).zip(&losses) {
        let mut a = rt.upload_adapter(h)?;
        alone.push(rt.forward_backward(&mut a, d, l)?);
        grads_alone.push(rt.grads_to_host(&a)?);
    }
    let mut ups = hosts.iter().map(|h| rt.upload_adapter(h)).collect::<Result<Vec<_>, _>>()?;
    let (first, rest) = ups.split_at_mut(1);
    let (second, third) = rest.split_at_mut(1);
    let mut groups = vec![
        TrainGroup { adapter: &mut first[0], data: &data[0], loss: &losses[0] },
        TrainGroup { adapter: &mut second[0], data: &bad, loss: &losses[1] },
        TrainGroup { adapter: &mut third[0], data: &data[2], loss: &losses[2] },
    ];
    let out = rt.forward_backward_many(&mut groups);
    ensure!(out.len() == 3, "{} results for 3 groups", out.len());
    match &out[1] {
        Err(e) if e.is_user_error() => {}
        other => anyhow::bail!("the bad group: {other:?}"),
    }
    for i in [0, 2] {
        let got = out[i].as_ref().map_err(|e| anyhow::anyhow!("group {i}: {e}"))?;
        outputs_close(&format!("train group {i}"), got, &alone[i])?;
        let e = rel(&rt.grads_to_host(&ups[i])?, &grads_alone[i]);
        ensure!(e <= 1e-5, "group {i}: gradients differ by {e:.2e}");
    }
    ensure!(
        rt.grads_to_host(&ups[1])?.iter().all(|&g| g == 0.0),
        "the failed group's adapter got gradients"
    );

    // evaluation, with a base-model group among them
    let evals = [Some(&ups[0]), None, Some(&ups[2])];
    let groups: Vec<EvalGroup<'_, _>> = evals
        .iter()
        .zip(&data)
        .zip(&losses)
        .map(|((a, d), l)| EvalGroup { adapter: *a, data: d, loss: l })
        .collect();
    let out = rt.forward_many(&groups);
    for (i, g) in groups.iter().enumerate() {
        let want = rt.forward(g.adapter, g.data, g.loss)?;
        let got = out[i].as_ref().map_err(|e| anyhow::anyhow!("eval group {i}: {e}"))?;
        outputs_close(&format!("eval group {i}"), got, &want)?;
    }
    decode_many(&rt, &ups)
}

/// Tokens per request per sequence.
type Picks = Vec<Vec<Vec<u32>>>;
/// Logits rows per request, in feeding order.
type Rows = Vec<Vec<Vec<f32>>>;

/// Three requests (own adapter, own cache, 1 or 2 sequences) decoding 6 tokens together vs
/// alone: the same logits and picks, greedy and seeded.
fn decode_many(
    rt: &CudaRuntime<f32>,
    ads: &[<CudaRuntime<f32> as ModelRuntime>::Adapter],
) -> Result<()> {
    let v = rt.config().vocab_size;
    let prompts: Vec<Vec<u32>> =
        (0..3).map(|i| (0..5 + i).map(|t| ((t * 7 + i * 13) % v) as u32).collect()).collect();
    let seqs = [vec![0usize], vec![0, 1], vec![1]];
    let params = [
        SamplingParams { temperature: 0.0, ..SamplingParams::new(8) },
        SamplingParams { temperature: 1.0, ..SamplingParams::new(8) },
        SamplingParams { temperature: 0.7, top_k: 5, ..SamplingParams::new(8) },
    ];
    // (tokens, logits rows) per request, for `together` = shared passes or one by one
    let run = |together: bool| -> Result<(Picks, Rows)> {
        let mut caches = (0..3).map(|_| rt.new_cache(2, 32)).collect::<Result<Vec<_>, _>>()?;
        let mut toks: Vec<Vec<Vec<u32>>> = seqs.iter().map(|s| vec![vec![]; s.len()]).collect();
        let mut rows: Vec<Vec<Vec<f32>>> = vec![vec![]; 3];
        for r in 0..3 {
            let ins: Vec<&[u32]> = seqs[r].iter().map(|_| prompts[r].as_slice()).collect();
            let lg = rt.forward_cached(Some(&ads[r]), &mut caches[r], &seqs[r], &ins)?;
            let u: Vec<f32> = (0..seqs[r].len()).map(|j| 0.1 + 0.3 * j as f32).collect();
            let ps = vec![params[r].clone(); seqs[r].len()];
            for (j, (t, _)) in rt.select_tokens(&lg, &ps, &u)?.into_iter().enumerate() {
                toks[r][j].push(t);
            }
        }
        for step in 0..6 {
            let last: Vec<Vec<[u32; 1]>> =
                toks.iter().map(|ts| ts.iter().map(|t| [t[t.len() - 1]]).collect()).collect();
            let ins: Vec<Vec<&[u32]>> =
                last.iter().map(|l| l.iter().map(|t| t.as_slice()).collect()).collect();
            let logits = if together {
                let mut groups = decode_groups(ads, &mut caches, &seqs, &ins, |_| true);
                rt.forward_cached_many(&mut groups).into_iter().collect::<Result<Vec<_>, _>>()?
            } else {
                let mut out = Vec::new();
                for (r, c) in caches.iter_mut().enumerate() {
                    out.push(rt.forward_cached(Some(&ads[r]), c, &seqs[r], &ins[r])?);
                }
                out
            };
            for (r, lg) in logits.iter().enumerate() {
                rows[r].extend(rt.logits_to_host(lg)?);
                let u: Vec<f32> = (0..seqs[r].len())
                    .map(|j| ((step * 3 + j + r) % 10) as f32 / 10.0 + 0.05)
                    .collect();
                let ps = vec![params[r].clone(); seqs[r].len()];
                for (j, (t, _)) in rt.select_tokens(lg, &ps, &u)?.into_iter().enumerate() {
                    toks[r][j].push(t);
                }
            }
        }
        Ok((toks, rows))
    };
    let (t_alone, l_alone) = run(false)?;
    let (t_many, l_many) = run(true)?;
    for r in 0..3 {
        for (i, (a, b)) in l_many[r].iter().zip(&l_alone[r]).enumerate() {
            let e = rel(a, b);
            ensure!(e <= 1e-5, "request {r} logits row {i} differ by {e:.2e}");
        }
    }
    ensure!(t_many == t_alone, "decoded tokens: together {t_many:?} vs alone {t_alone:?}");
    Ok(())
}
