//! Parity of the device draw (`sample_fwd`, after `argmax_fwd`, as `CudaModel::select_tokens`
//! runs them) with the host definition `engine::sampling::sample_token`: the token must be EQUAL
//! for every row, parameter set and draw, including draws exactly on a CDF boundary; the logprob
//! agrees to f32 rounding. Rows cover vocabularies of 1, 7, 100, 1000 and 50k, ties, `-inf`
//! masks, -0.0/+0.0, flat and very peaked logits, weight sums beyond 2^64, and the rows both
//! sides reject.

use anyhow::{Result, ensure};
use twinkle::engine::cuda::launch as k;
use twinkle::engine::cuda::{CudaDevice, bf16};
use twinkle::engine::sampling::{Draw, SamplingParams, sample_token};
use twinkle::engine::sampling_weight::{det_exp, token_weight};

use super::{Rng, TestT};

const NEG_INF: f32 = f32::NEG_INFINITY;
/// The largest f32 below 1: the last possible draw.
const U_MAX: f32 = 1.0 - 1.0 / 16_777_216.0;

fn params(temperature: f32, top_k: i64, top_p: f32) -> SamplingParams {
    SamplingParams { temperature, top_k, top_p, ..SamplingParams::new(1) }
}

/// The kept candidates' prefix sums `C(1..=n)` in canonical order and `N`, read literally from
/// the definition (full sort), to place draws exactly on the boundaries `C(i)`.
fn prefix_sums(logits: &[f32], d: &Draw) -> (Vec<u128>, u128) {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // -0.0 == +0.0 and ties by id; valid rows have no NaN
    order.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap().then(a.cmp(&b)));
    if d.top_k > 0 {
        order.truncate(d.top_k as usize);
    }
    let max = f64::from(logits[order[0]]);
    let mut c = 0_u128;
    let sums: Vec<u128> = order
        .iter()
        .map(|&i| {
            c += u128::from(token_weight((f64::from(logits[i]) - max) * d.inv_t));
            c
        })
        .collect();
    let total = c;
    if d.top_p_on() {
        let bound = u128::from(d.top_p24) * total;
        if let Some(n) = sums.iter().position(|&s| s << 24 >= bound) {
            return (sums[..=n].to_vec(), sums[n]);
        }
    }
    (sums, total)
}

/// Draws on both sides of a few boundaries: `m = ceil(C(i) * 2^24 / N)` is the first draw whose
/// target reaches `C(i)` (a later token), `m - 1` the last that stays below. Checks on the host
/// that each pair really straddles a boundary (the two draws pick different tokens).
fn boundary_draws(logits: &[f32], sp: &SamplingParams, d: &Draw, out: &mut Vec<f32>) -> Result<()> {
    let (sums, n) = prefix_sums(logits, d);
    let picks = [0, 1, sums.len() / 2, sums.len().saturating_sub(2)];
    for &i in picks.iter().filter(|&&i| i < sums.len()) {
        let m = (sums[i] << 24).div_ceil(n);
        if m == 0 || m >= 1 << 24 {
            continue;
        }
        let (at, below) = (m as f32 / 16_777_216.0, (m - 1) as f32 / 16_777_216.0);
        let (ta, tb) = (sample_token(logits, sp, at)?.0, sample_token(logits, sp, below)?.0);
        ensure!(ta != tb, "draws {below} and {at} do not straddle a boundary ({ta})");
        out.extend([at, below]);
    }
    Ok(())
}

/// Runs one batch (one row per case, all the same logits) through the kernels and compares
/// every row with `sample_token`. Returns the number of rows compared.
fn check_batch<T: TestT>(
    dev: &CudaDevice,
    name: &str,
    logits: &[f32],
    cases: &[(SamplingParams, f32)],
) -> Result<usize> {
    let s = dev.stream();
    let (v, b) = (logits.len(), cases.len());
    let row: Vec<T> = logits.iter().map(|&x| T::from_f(f64::from(x))).collect();
    // what the device sees, for the host reference
    let host: Vec<f32> = row.iter().map(|x| x.to_f() as f32).collect();
    let all: Vec<T> = (0..b).flat_map(|_| row.iter().copied()).collect();
    let (mut inv_t, mut ints) = (vec![0.0_f64; b], vec![0_u32; 3 * b]);
    for (i, (p, u)) in cases.iter().enumerate() {
        if let Some(d) = p.draw(*u)? {
            inv_t[i] = d.inv_t;
            ints[3 * i..3 * i + 3].copy_from_slice(&[d.top_k, d.top_p24, d.m]);
        }
    }
    let dl = s.clone_htod(&all)?;
    let (dt, dp) = (s.clone_htod(&inv_t)?, s.clone_htod(&ints)?);
    let mut tok = s.alloc_zeros::<i32>(b)?;
    let mut lp = s.alloc_zeros::<f32>(b)?;
    let (mut tv, mut lv) = (tok.as_view_mut(), lp.as_view_mut());
    let dl = dl.as_view();
    let logits = k::Logits { data: &dl, ld: v, cols: v };
    k::argmax_fwd(dev, k::Picks { token: &mut tv, logprob: &mut lv }, logits)?;
    let picks = k::Picks { token: &mut tv, logprob: &mut lv };
    k::sample_fwd(dev, picks, logits, (&dt.as_view(), &dp.as_view()))?;
    let (tok, lp) = (s.clone_dtoh(&tok)?, s.clone_dtoh(&lp)?);
    for (i, (p, u)) in cases.iter().enumerate() {
        let what =
            || format!("{name} (vocab {v}) T={} k={} p={} u={u}", p.temperature, p.top_k, p.top_p);
        match sample_token(&host, p, *u) {
            Ok((want, want_lp)) => {
                ensure!(tok[i] == want as i32, "{}: device {} != host {want}", what(), tok[i]);
                ensure!(
                    (lp[i] - want_lp).abs() <= 1e-5 * want_lp.abs().max(1.0),
                    "{}: logprob {} vs {want_lp}",
                    what(),
                    lp[i]
                );
            }
            // the rows the host rejects must not look usable on the device
            Err(_) => ensure!(
                tok[i] < 0 || !lp[i].is_finite(),
                "{}: host rejects the row, device gave token {} logprob {}",
                what(),
                tok[i],
                lp[i]
            ),
        }
    }
    Ok(b)
}

/// Rows: (name, logits, full parameter cross or a few cases).
fn rows(r: &mut Rng) -> Vec<(&'static str, Vec<f32>, bool)> {
    let grid = |r: &mut Rng, n: usize, step: f64, span: f64| -> Vec<f32> {
        (0..n).map(|_| ((r.uniform() * span / step).floor() * step - span / 2.0) as f32).collect()
    };
    let mut masked = grid(r, 100, 0.5, 12.0);
    for i in (0..100).step_by(7) {
        masked[i] = NEG_INF;
    }
    let mut big = grid(r, 50_000, 0.25, 16.0);
    big[31_337] = 9.0; // one clear favourite far from the start
    big[77] = NEG_INF;
    vec![
        ("single", vec![0.5], true),
        ("ties", vec![1.0, 3.0, 3.0, 2.0, 3.0, NEG_INF, 0.0], true),
        ("signed zeros", vec![0.0, -0.0, 0.0, -1.0, NEG_INF, -0.0, 0.0], true),
        ("flat", vec![-2.5; 7], true),
        ("peaked", vec![-3.0, 45.0, 0.0, 44.9, -1e30, 1e-3, 45.0 - 36.0], true),
        ("masked", masked, true),
        ("random", (0..1000).map(|_| ((r.uniform() * 2.0 - 1.0) * 8.0) as f32).collect(), false),
        ("large", big, false),
        // two nearby values, 25k tokens each: a search bucket's weight sum passes 2^64
        ("two values", (0..50_000).map(|i| if i % 2 == 0 { -1e-7 } else { 0.0 }).collect(), false),
    ]
}

/// Every listed row with the full parameter cross (temperature x top_k x top_p), each set with
/// one of the draws 0, U_MAX or random in turn and every fourth set also with the boundary
/// draws; the big rows get a sparse subset of the cross (the emulator runs this in seconds).
pub fn sample_parity<T: TestT>(dev: &CudaDevice) -> Result<()> {
    let mut r = Rng(97);
    let mut compared = 0;
    for (name, logits, full) in rows(&mut r) {
        let v = logits.len() as i64;
        let mut cases = Vec::new();
        let temps = [0.3, 0.7, 1.0, 1.5];
        let ks = [-1, 0, 1, 5, v - 1, v + 3];
        let ps = [1.0, 0.9, 0.5, 1e-6];
        let mut set = 0;
        for &t in &temps {
            for &kk in &ks {
                for &p in &ps {
                    set += 1;
                    if !full && set % 13 != 0 {
                        continue;
                    }
                    let sp = params(t, kk, p);
                    let Some(d) = sp.draw(0.0)? else { continue };
                    let mut us = vec![[0.0, U_MAX, r.uniform() as f32 * U_MAX][set % 3]];
                    if !full || set % 4 == 0 {
                        boundary_draws(&logits, &sp, &d, &mut us)?;
                    }
                    cases.extend(us.into_iter().map(|u| (sp.clone(), u)));
                }
            }
        }
        // a greedy row in the same launch must keep the argmax kernel's pick
        cases.push((params(0.0, -1, 1.0), 0.5));
        compared += check_batch::<T>(dev, name, &logits, &cases)?;
    }
    // rows both sides reject: NaN, +inf, everything masked
    let sp = params(1.0, -1, 1.0);
    for (name, l) in [
        ("nan", vec![0.0, f32::NAN, 1.0]),
        ("+inf", vec![0.0, f32::INFINITY, 1.0]),
        ("all masked", vec![NEG_INF; 5]),
    ] {
        check_batch::<T>(dev, name, &l, &[(sp.clone(), 0.3), (params(0.7, 2, 0.5), 0.9)])?;
    }
    eprintln!("  sample_fwd: {compared} draws equal to the host's");
    Ok(())
}

/// The same on bf16 logits (the kernel's other instantiation), a few rows.
pub fn sample_parity_bf16(dev: &CudaDevice) -> Result<()> {
    let mut r = Rng(5);
    let logits: Vec<f32> = (0..300).map(|_| ((r.uniform() * 2.0 - 1.0) * 6.0) as f32).collect();
    let mut cases = Vec::new();
    for (t, kk, p) in [(1.0, -1, 1.0), (0.7, 5, 0.9), (1.5, 0, 0.5), (0.3, 299, 1e-6)] {
        for u in [0.0, 0.25, 0.5, 0.99, U_MAX] {
            cases.push((params(t, kk, p), u));
        }
    }
    check_batch::<bf16>(dev, "bf16", &logits, &cases)?;
    Ok(())
}

/// The device's exp (`sample_exp_fwd`) against the host's `det_exp`, bit for bit, over a dense
/// sweep of [-708, 0], the reduction's switch points and random arguments. Counts the arguments
/// where `det_exp` differs from libm's `exp`: there a device using its own `exp` would differ.
pub fn exp_bits(dev: &CudaDevice) -> Result<()> {
    let s = dev.stream();
    let mut r = Rng(3);
    let mut d: Vec<f64> = (0..=100_000).map(|i| -40.0 * f64::from(i) / 1e5).collect();
    d.extend((0..=20_000).map(|i| -708.0 * f64::from(i) / 2e4));
    d.extend((0..1020).flat_map(|k| {
        let x = -(f64::from(k) + 0.5) * std::f64::consts::LN_2;
        [x, f64::from_bits(x.to_bits() - 1), f64::from_bits(x.to_bits() + 1)]
    }));
    d.extend((0..100_000).map(|_| -40.0 * r.uniform()));
    d.extend([0.0, -0.0, -1e-300, -5e-324]);
    let dd = s.clone_htod(&d)?;
    let mut out = s.alloc_zeros::<f64>(d.len())?;
    k::sample_exp_fwd(dev, &mut out.as_view_mut(), &dd.as_view())?;
    let got = s.clone_dtoh(&out)?;
    let mut libm_differs = 0;
    for (&x, &g) in d.iter().zip(&got) {
        let want = det_exp(x);
        ensure!(g.to_bits() == want.to_bits(), "exp({x:e}): device {g:e} != host {want:e}");
        libm_differs += usize::from(want != x.exp());
    }
    eprintln!(
        "  sample_exp_fwd: {} arguments bit-equal ({libm_differs} differ from libm exp)",
        d.len()
    );
    Ok(())
}
