//! The row-blocked fused head against a naive f64 composition: full logits, log-softmax, loss
//! terms, then `dlogits = Σ coef·(onehot − softmax)` and its products, for every loss, `[N,K]`
//! targets with negative weights, and block sizes that split the rows unevenly; and the
//! segmented (several tenants') pass against each tenant's pass alone.

use super::*;
use crate::engine::cpu::test_util::rand_vec;
use crate::engine::tensor::Tensor;

struct Case {
    rows: usize,
    hidden: usize,
    vocab: usize,
    rank: usize,
    scale: f32,
    k: usize,
}

struct Reference {
    logprobs: Vec<f64>,
    terms: Vec<f64>,
    dh: Vec<f64>,
    grad_a: Vec<f64>,
    grad_b: Vec<f64>,
}

/// Everything in f64 from the materialised `[rows, vocab]` logits.
#[allow(clippy::too_many_arguments)]
fn reference(
    c: &Case,
    h: &[f32],
    w: &[f32],
    a: &[f32],
    b: &[f32],
    tg: &HeadTargets,
    loss: &LossFn,
) -> Reference {
    let (n, hd, v, r, s) = (c.rows, c.hidden, c.vocab, c.rank, c.scale as f64);
    let xa: Vec<f64> = (0..n * r)
        .map(|i| {
            s * (0..hd).map(|d| h[i / r * hd + d] as f64 * a[i % r * hd + d] as f64).sum::<f64>()
        })
        .collect();
    let mut out = Reference {
        logprobs: vec![],
        terms: vec![],
        dh: vec![0.0; n * hd],
        grad_a: vec![0.0; r * hd],
        grad_b: vec![0.0; v * r],
    };
    for row in 0..n {
        let logits: Vec<f64> = (0..v)
            .map(|j| {
                (0..hd).map(|d| h[row * hd + d] as f64 * w[j * hd + d] as f64).sum::<f64>()
                    + (0..r).map(|q| xa[row * r + q] * b[j * r + q] as f64).sum::<f64>()
            })
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + logits.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        let mut dl: Vec<f64> = vec![0.0; v];
        for t in tg.row_ptr[row]..tg.row_ptr[row + 1] {
            let id = tg.targets[t] as usize;
            let lp = logits[id] - lse;
            let (l, g) =
                loss.term(lp, tg.weights[t] as f64, tg.slp[row] as f64, tg.adv[row] as f64);
            out.logprobs.push(lp);
            out.terms.push(l);
            for (j, d) in dl.iter_mut().enumerate() {
                *d += g * (f64::from(u8::from(j == id)) - (logits[j] - lse).exp());
            }
        }
        for (j, &d) in dl.iter().enumerate() {
            for q in 0..r {
                out.grad_b[j * r + q] += d * xa[row * r + q];
            }
            for e in 0..hd {
                out.dh[row * hd + e] += d * w[j * hd + e] as f64;
            }
        }
        for q in 0..r {
            let dxa: f64 = (0..v).map(|j| dl[j] * b[j * r + q] as f64).sum::<f64>() * s;
            for e in 0..hd {
                out.grad_a[q * hd + e] += dxa * h[row * hd + e] as f64;
                out.dh[row * hd + e] += dxa * a[q * hd + e] as f64;
            }
        }
    }
    out
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(1e-3f64, |m, x| m.max(x.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((*g as f64 - w).abs() <= tol * scale, "{what}[{i}]: {g} vs {w}");
    }
}

/// A random `[rank, hidden]` A and `[vocab, rank]` B (zero optimizer state).
fn lora_pair(r: usize, hd: usize, v: usize, seed: u64) -> LoraPair {
    LoraPair::new(
        Tensor::from_parts(vec![r, hd], rand_vec(r * hd, seed)),
        Tensor::from_parts(vec![v, r], rand_vec(v * r, seed + 1)),
    )
}

/// `k` targets a row, each with its weight, and a sampler logprob and advantage per row.
fn rows_of(k: usize, targets: &[u32], weights: &[f32], slp: &[f32], adv: &[f32]) -> TargetRows {
    let mut csr = TargetRows::with_rows(slp.len());
    for (r, (s, a)) in slp.iter().zip(adv).enumerate() {
        let span = r * k..(r + 1) * k;
        csr.push_row(&targets[span.clone()], Some(&weights[span]), *s, *a);
    }
    csr
}

fn check(c: &Case, loss: &LossFn, seed: u64) {
    let (n, hd, v, r) = (c.rows, c.hidden, c.vocab, c.rank);
    let h: Vec<f32> = rand_vec(n * hd, seed).iter().map(|x| 2.0 * x).collect();
    let w = Weight::F32(Tensor::from_parts(vec![v, hd], rand_vec(v * hd, seed + 1)));
    let pair = lora_pair(r, hd, v, seed + 2);
    let targets: Vec<u32> = rand_vec(n * c.k, seed + 4)
        .iter()
        .map(|x| ((x + 1.0) * 0.5 * v as f32) as u32 % v as u32)
        .collect();
    // Weights of both signs (and a zero) for cross-entropy.
    let weights: Vec<f32> =
        rand_vec(n * c.k, seed + 5).iter().map(|x| (x * 4.0).round() / 2.0).collect();
    let slp: Vec<f32> = rand_vec(n, seed + 6).iter().map(|x| x - 4.0).collect();
    let adv = rand_vec(n, seed + 7);
    let csr = rows_of(c.k, &targets, &weights, &slp, &adv);
    let tg = csr.view();
    let want = reference(c, &h, &w.to_f32_cow(), pair.a.w.data(), pair.b.w.data(), &tg, loss);
    let head = Head { w: &w, lora: Some(&pair), scale: c.scale };
    for block in [1, 3, n, n + 5] {
        let (mut ga, mut gb) = (vec![0.0f32; r * hd], vec![0.0f32; v * r]);
        let out = head.loss_pass(&h, n, hd, &tg, loss, true, Some((&mut ga, &mut gb)), block);
        let lp: Vec<f32> = out.logprobs.clone();
        assert_close(&lp, &want.logprobs, 1e-5, "logprobs");
        let terms: Vec<f32> = out.terms.iter().map(|x| *x as f32).collect();
        assert_close(&terms, &want.terms, 1e-5, "terms");
        assert_close(&out.dh, &want.dh, 1e-4, "dh");
        assert_close(&ga, &want.grad_a, 1e-4, "grad_a");
        assert_close(&gb, &want.grad_b, 1e-4, "grad_b");
        // Forward-only gives the same values and no gradient.
        let fwd = head.loss_pass(&h, n, hd, &tg, loss, false, None, block);
        assert_eq!(fwd.logprobs, out.logprobs, "block {block}");
        assert!(fwd.dh.is_empty());
    }
}

#[test]
fn fused_head_matches_naive_for_every_loss() {
    let ce_k = Case { rows: 7, hidden: 5, vocab: 37, rank: 2, scale: 1.5, k: 3 };
    check(&ce_k, &LossFn::CrossEntropy, 100);
    let rl = Case { k: 1, ..ce_k };
    for (i, loss) in [
        LossFn::CrossEntropy,
        LossFn::ImportanceSampling,
        LossFn::Ppo { clip_low: 0.8, clip_high: 1.2 },
        LossFn::Cispo { clip_low: 0.0, clip_high: 4.0 },
        LossFn::Dro { beta: 0.1 },
    ]
    .iter()
    .enumerate()
    {
        check(&rl, loss, 200 + 10 * i as u64);
    }
}

#[test]
fn block_rows_bounds_the_logits_buffer() {
    let w = Weight::F32(Tensor::from_parts(vec![151_936, 1], vec![0.0; 151_936]));
    let head = Head { w: &w, lora: None, scale: 0.0 };
    let rows = head.block_rows();
    assert!(rows * 151_936 * 4 <= HEAD_BLOCK_BYTES && rows >= 64, "{rows}");
    let tiny = Weight::F32(Tensor::from_parts(vec![10, 1], vec![0.0; 10]));
    assert_eq!(Head { w: &tiny, lora: None, scale: 0.0 }.block_rows(), HEAD_MAX_ROWS);
}

/// Several tenants' rows in one segmented pass, with blocks that cut segments apart, give each
/// segment what the one-tenant pass gives it alone: logprobs, loss terms, `∂loss/∂h` and its
/// own lm_head LoRA gradients.
#[test]
fn segmented_pass_matches_each_segment_alone() {
    let (n, hd, v) = (11, 5, 37);
    let h: Vec<f32> = rand_vec(n * hd, 1).iter().map(|x| 2.0 * x).collect();
    let w = Weight::F32(Tensor::from_parts(vec![v, hd], rand_vec(v * hd, 2)));
    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % v as u32).collect();
    let weights = rand_vec(n, 3);
    let slp: Vec<f32> = rand_vec(n, 4).iter().map(|x| x - 4.0).collect();
    let adv = rand_vec(n, 5);
    let (p1, p2) = (lora_pair(2, hd, v, 10), lora_pair(3, hd, v, 20));
    let ppo = LossFn::Ppo { clip_low: 0.8, clip_high: 1.2 };
    // (rows, LoRA, scale, loss): a LoRA tenant, a base-model tenant, another LoRA tenant.
    let tenants = [
        (0..4, Some(&p1), 1.5, LossFn::CrossEntropy),
        (4..5, None, 0.0, ppo),
        (5..n, Some(&p2), 0.5, LossFn::Dro { beta: 0.1 }),
    ];
    let head = Head { w: &w, lora: None, scale: 0.0 };
    for block in [1, 3, 4, n, n + 5] {
        let mut grads: Vec<(Vec<f32>, Vec<f32>)> = tenants
            .iter()
            .map(|t| {
                t.1.map_or((vec![], vec![]), |p| (vec![0.0; p.a.w.len()], vec![0.0; p.b.w.len()]))
            })
            .collect();
        let mut segs: Vec<HeadSegment> = tenants
            .iter()
            .zip(grads.iter_mut())
            .map(|((rows, lora, scale, loss), (ga, gb))| HeadSegment {
                rows: rows.clone(),
                lora: *lora,
                scale: *scale,
                loss,
                lora_grad: lora.map(|_| (ga.as_mut_slice(), gb.as_mut_slice())),
            })
            .collect();
        let csr = rows_of(1, &targets, &weights, &slp, &adv);
        let out = head.segmented_pass(&h, n, hd, &csr.view(), &mut segs, true, block);
        drop(segs);
        for ((rows, lora, scale, loss), (ga, gb)) in tenants.iter().zip(&grads) {
            let (a, b) = (rows.start, rows.end);
            let alone = rows_of(1, &targets[a..b], &weights[a..b], &slp[a..b], &adv[a..b]);
            let tg = alone.view();
            let one = Head { w: &w, lora: *lora, scale: *scale };
            let (mut wa, mut wb) = (vec![0.0f32; ga.len()], vec![0.0f32; gb.len()]);
            let lg = lora.map(|_| (wa.as_mut_slice(), wb.as_mut_slice()));
            let want = one.loss_pass(&h[a * hd..b * hd], b - a, hd, &tg, loss, true, lg, b - a);
            let f64s = |x: &[f32]| x.iter().map(|v| *v as f64).collect::<Vec<_>>();
            let what = |q: &str| format!("block {block} rows {a}..{b} {q}");
            assert_close(&out.logprobs[a..b], &f64s(&want.logprobs), 1e-6, &what("logprobs"));
            let terms: Vec<f32> = out.terms[a..b].iter().map(|x| *x as f32).collect();
            assert_close(&terms, &want.terms, 1e-6, &what("terms"));
            assert_close(&out.dh[a * hd..b * hd], &f64s(&want.dh), 1e-5, &what("dh"));
            assert_close(ga, &f64s(&wa), 1e-5, &what("grad_a"));
            assert_close(gb, &f64s(&wb), 1e-5, &what("grad_b"));
        }
    }
}
