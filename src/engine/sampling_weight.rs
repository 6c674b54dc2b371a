//! The integer token weight of the sampling definition (`engine::sampling`), with an `exp` built
//! from IEEE-754 double additions and multiplications only, so that `kernels/sampling.cu`
//! computes the same bits on the device.
//!
//! Why not `f64::exp`: libm's and CUDA's `exp` are both accurate to about an ulp but not
//! identical, and one differing bit in one weight can move a draw to the neighbouring token.
//! Correctly rounded `+` and `*` are identical everywhere, provided nothing fuses a multiply and
//! an add into an FMA: Rust never contracts floating-point expressions, and the kernel spells
//! every step with `__dmul_rn` / `__dadd_rn`, which nvcc/NVRTC never contract (the CPU emulator
//! defines them with an optimisation barrier for the same reason). Constants are given as bit
//! patterns so no decimal parser is involved. Each step in [`det_exp`] has its twin, in the same
//! order, in `sample_exp` of `kernels/sampling.cu`.

/// Below this scaled logit difference the weight is 0: `exp(-40) * 2^52 ~= 0.019` would round
/// to 0 anyway, so the cutoff changes no weight, it only skips the arithmetic (and keeps the
/// exponent construction in [`det_exp`] far from subnormals).
pub const WEIGHT_CUTOFF: f64 = -40.0;

/// 2^52: the weight of the most likely token (`det_exp(0) == 1` exactly).
pub const WEIGHT_ONE: f64 = 4_503_599_627_370_496.0;

/// log2(e), ln(2) split into a high part with 43 significant bits (so `k * LN2_HI` is exact for
/// |k| < 2^10) and the low remainder, and 1/n! for n = 0..=13 (the Taylor coefficients; on
/// |r| <= ln(2)/2 the first omitted term, r^14/14!, is below 5e-18).
const LOG2E: u64 = 0x3ff7_1547_652b_82fe;
const LN2_HI: u64 = 0x3fe6_2e42_fee0_0000;
const LN2_LO: u64 = 0x3dea_39ef_3579_3c76;
const INV_FACTORIAL: [u64; 14] = [
    0x3ff0_0000_0000_0000,
    0x3ff0_0000_0000_0000,
    0x3fe0_0000_0000_0000,
    0x3fc5_5555_5555_5555,
    0x3fa5_5555_5555_5555,
    0x3f81_1111_1111_1111,
    0x3f56_c16c_16c1_6c17,
    0x3f2a_01a0_1a01_a01a,
    0x3efa_01a0_1a01_a01a,
    0x3ec7_1de3_a556_c734,
    0x3e92_7e4f_b778_9f5c,
    0x3e5a_e645_67f5_44e4,
    0x3e21_eed8_eff8_d898,
    0x3de6_1246_13a8_6d09,
];

/// `exp(d)` for `d` in `[-708, 0]` (0 below, NaN for NaN; `d > 0` is outside the domain and
/// treated as 0, the weights never need it), accurate to a few ulp and bit-identical to the
/// kernel's `sample_exp`:
/// `k = round(d * log2 e)`, `r = d - k ln2` (Cody-Waite, two steps), `exp(r)` by Horner on the
/// degree-13 Taylor polynomial, times `2^k` built from its exponent bits (exact: the result is
/// normal for `d >= -708`).
pub fn det_exp(d: f64) -> f64 {
    if d.is_nan() {
        return d;
    }
    if d < -708.0 {
        return 0.0;
    }
    let d = d.min(0.0);
    // `round` is half away from zero on both sides (CUDA's `round`); any rule would do as long
    // as it is the same one, since it only picks the reduction point.
    let k = (d * f64::from_bits(LOG2E)).round();
    let r = d - k * f64::from_bits(LN2_HI);
    let r = r - k * f64::from_bits(LN2_LO);
    let mut p = f64::from_bits(INV_FACTORIAL[13]);
    for &c in INV_FACTORIAL[..13].iter().rev() {
        p = p * r + f64::from_bits(c);
    }
    // k is an integer in [-1022, 0]: 2^k is the normal double with biased exponent 1023 + k.
    let scale = f64::from_bits(((1023 + k as i64) as u64) << 52);
    p * scale
}

/// The integer weight of a token whose logit minus the row maximum, times `1 / T`, is `d`
/// (computed by the caller as `(f64(logit) - f64(max)) * (1 / f64(T))`):
/// `round(det_exp(d) * 2^52)`, half away from zero, and 0 below [`WEIGHT_CUTOFF`] (which also
/// covers `-inf` logits and the NaN of `-inf - -inf`).
pub fn token_weight(d: f64) -> u64 {
    if !(WEIGHT_CUTOFF..=0.0).contains(&d) {
        return 0;
    }
    (det_exp(d) * WEIGHT_ONE).round() as u64
}

/// Buckets of [`weigh_row`]: the nonzero-weight range `d` in `[WEIGHT_CUTOFF, 0]` cut into
/// this many equal slices (`bucket = floor(-d * BUCKETS / 40)`, the last one closed).
pub const BUCKETS: usize = 4096;
/// [`weigh_row`]'s bucket of a token whose weight is 0 (never drawn, so never looked at).
pub const NO_BUCKET: u16 = u16::MAX;

/// The weights of a whole row for the sampler's pass without top-k: for each token `t`,
/// `q = token_weight((f64(logits[t]) - max) * inv_t)`, its bucket (a monotone function of `d`,
/// so buckets in ascending order are runs of the canonical order) into `buckets[t]`
/// ([`NO_BUCKET`] when `q == 0`), and `q` added to `sums[bucket]` (both buffers are sized and
/// cleared here, so a caller may keep them between rows). 32 tokens at a time with the same
/// IEEE operations per token as [`token_weight`] (the SIMD versions only run them side by
/// side), so the weights are bit for bit those of the definition.
///
/// Returns [`exp_sum`]'s sum for the same `d`: with `inv_t == 1` that of the raw logits, so
/// the returned logprob's normaliser comes with the weights instead of from a second pass.
pub fn weigh_row(
    logits: &[f32],
    max: f64,
    inv_t: f64,
    buckets: &mut Vec<u16>,
    sums: &mut Vec<u128>,
) -> f64 {
    buckets.resize(logits.len(), NO_BUCKET);
    sums.clear();
    sums.resize(BUCKETS, 0);
    let (buckets, sums) = (buckets.as_mut_slice(), sums.as_mut_slice());
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512dq") {
            // SAFETY: the CPU has the instructions the function is compiled for.
            return unsafe { weigh_row_avx512(logits, max, inv_t, buckets, sums) };
        }
        if has!("avx2") {
            // SAFETY: as above.
            return unsafe { weigh_row_avx2(logits, max, inv_t, buckets, sums) };
        }
    }
    weigh_row_body(logits, max, inv_t, buckets, sums)
}

/// [`weigh_row_body`] with AVX-512 (F and DQ: the float-integer conversions) enabled.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512DQ.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn weigh_row_avx512(l: &[f32], max: f64, inv_t: f64, b: &mut [u16], s: &mut [u128]) -> f64 {
    weigh_row_body(l, max, inv_t, b, s)
}

/// [`weigh_row_body`] with AVX2 enabled.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn weigh_row_avx2(l: &[f32], max: f64, inv_t: f64, b: &mut [u16], s: &mut [u128]) -> f64 {
    weigh_row_body(l, max, inv_t, b, s)
}

/// Tokens weighed side by side: four registers of eight, so that independent Horner chains hide
/// their latency; also the lanes of [`exp_sum`]'s running sums.
const N: usize = 32;

#[inline(always)]
fn weigh_row_body(
    logits: &[f32],
    max: f64,
    inv_t: f64,
    buckets: &mut [u16],
    sums: &mut [u128],
) -> f64 {
    let per = BUCKETS as f64 / -WEIGHT_CUTOFF;
    let mut lanes = [0.0f64; N];
    for (xs, bs) in logits.chunks(N).zip(buckets.chunks_mut(N)) {
        let d = scaled_diffs(xs, max, inv_t);
        let (q, e) = token_weights(&d);
        add_lanes(&mut lanes, &e, xs.len());
        let mut b = [0usize; N];
        for (bv, &dv) in b.iter_mut().zip(&d) {
            *bv = bucket_of(dv, per);
        }
        for ((out, &qv), &bv) in bs.iter_mut().zip(&q).zip(&b) {
            *out = if qv == 0 { NO_BUCKET } else { bv as u16 };
            sums[bv] += u128::from(qv);
        }
    }
    lane_total(&lanes)
}

/// `((-d * per) as i64).clamp(0, BUCKETS - 1)`, clamped as a float instead (NaN to 0, as `as`
/// does) so that the conversion is [`small_int`]'s and vectorises.
#[inline(always)]
fn bucket_of(d: f64, per: f64) -> usize {
    small_int((-d * per).max(0.0).min((BUCKETS - 1) as f64).trunc()) as usize
}

/// `(f64(x) - max) * inv_t` of a chunk of up to `N` logits (the rest of the array is 0.0, whose
/// results the callers leave out).
#[inline(always)]
fn scaled_diffs(xs: &[f32], max: f64, inv_t: f64) -> [f64; N] {
    let mut d = [0.0f64; N];
    for (dv, &x) in d.iter_mut().zip(xs) {
        *dv = (f64::from(x) - max) * inv_t;
    }
    d
}

/// Adds the first `n` of a chunk's `e` to the running sums, lane `i` taking element `i`.
#[inline(always)]
fn add_lanes(lanes: &mut [f64; N], e: &[f64; N], n: usize) {
    if n == N {
        for (l, &v) in lanes.iter_mut().zip(e) {
            *l += v;
        }
    } else {
        for (l, &v) in lanes.iter_mut().zip(&e[..n]) {
            *l += v;
        }
    }
}

/// The lanes' total in one fixed order: halves added pairwise (lane `i` + lane `i + n/2`) down
/// to one.
#[inline(always)]
fn lane_total(lanes: &[f64; N]) -> f64 {
    let mut v = *lanes;
    let mut n = N;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            v[i] += v[i + n];
        }
    }
    v[0]
}

/// `S = sum of det_exp((f64(x) - max) * inv_t)` over the logits whose scaled difference lies in
/// `[WEIGHT_CUTOFF, 0]`, summed in f64 in one fixed order (token `t` into lane `t % 32`, the
/// lanes then by [`lane_total`]), the same order and operations as [`weigh_row`]'s return
/// value. With `inv_t == 1` and `max` the row maximum, `max + ln S` is the row's
/// log-normaliser: the terms left out are each below `e^-40` of the largest (which is 1), so
/// together below `vocab * 4.3e-18`, far under the f32 resolution of a logprob.
pub fn exp_sum(logits: &[f32], max: f64, inv_t: f64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512dq") {
            // SAFETY: the CPU has the instructions the function is compiled for.
            return unsafe { exp_sum_avx512(logits, max, inv_t) };
        }
        if has!("avx2") {
            // SAFETY: as above.
            return unsafe { exp_sum_avx2(logits, max, inv_t) };
        }
    }
    exp_sum_body(logits, max, inv_t)
}

/// [`exp_sum_body`] with AVX-512 (F and DQ) enabled.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512DQ.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn exp_sum_avx512(logits: &[f32], max: f64, inv_t: f64) -> f64 {
    exp_sum_body(logits, max, inv_t)
}

/// [`exp_sum_body`] with AVX2 enabled.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn exp_sum_avx2(logits: &[f32], max: f64, inv_t: f64) -> f64 {
    exp_sum_body(logits, max, inv_t)
}

#[inline(always)]
fn exp_sum_body(logits: &[f32], max: f64, inv_t: f64) -> f64 {
    let mut lanes = [0.0f64; N];
    for xs in logits.chunks(N) {
        let (_, e) = token_weights(&scaled_diffs(xs, max, inv_t));
        add_lanes(&mut lanes, &e, xs.len());
    }
    lane_total(&lanes)
}

/// `round(x)`, half away from zero, from `trunc` (a single instruction with SSE4.1 and later,
/// where `f64::round` is a library call): `x - trunc(x)` is exact, so the comparison with one
/// half decides the rounding exactly.
#[inline(always)]
fn round_half_away(x: f64) -> f64 {
    let t = x.trunc();
    if (x - t).abs() >= 0.5 { t + 1.0f64.copysign(x) } else { t }
}

/// The integer `v` of an integer-valued double in `[0, 2^52]`, without a conversion
/// instruction: `v + 2^52` is exact (doubles in `[2^52, 2^53]` are the integers) and its bits are
/// those of `2^52` plus `v`. Rust's `as` conversions saturate, and LLVM turns them into scalar
/// code with compare-and-move fix-ups per element, which made them the weighing's bottleneck.
#[inline(always)]
fn small_int(v: f64) -> u64 {
    (v + WEIGHT_ONE).to_bits().wrapping_sub(WEIGHT_ONE.to_bits())
}

/// [`token_weight`] of `M` values side by side, and each one's `det_exp(d)` (0 out of range),
/// without branches: out-of-range values (NaN,
/// `d > 0`, `d < WEIGHT_CUTOFF`) go through the arithmetic as 0 and get the weight 0 at the end;
/// in-range values see exactly the operations of [`det_exp`] (whose NaN, `-708` and `min(0)`
/// steps are no-ops on `[WEIGHT_CUTOFF, 0]`; a `-0.0` gives the same 1.0 as `+0.0`) and of
/// [`token_weight`].
// Plain loops over arrays, not `array::from_fn`: its closures are not always inlined into the
// `target_feature` callers, and compiled outside them `trunc` becomes a library call.
#[inline(always)]
fn token_weights<const M: usize>(d_in: &[f64; M]) -> ([u64; M], [f64; M]) {
    let mut inside = [false; M];
    let mut d = [0.0f64; M];
    let mut k = [0.0f64; M];
    let mut r = [0.0f64; M];
    let mut p = [f64::from_bits(INV_FACTORIAL[13]); M];
    for i in 0..M {
        inside[i] = (WEIGHT_CUTOFF..=0.0).contains(&d_in[i]);
        d[i] = if inside[i] { d_in[i] } else { 0.0 };
        k[i] = round_half_away(d[i] * f64::from_bits(LOG2E));
        r[i] = d[i] - k[i] * f64::from_bits(LN2_HI);
        r[i] -= k[i] * f64::from_bits(LN2_LO);
    }
    for &c in INV_FACTORIAL[..13].iter().rev() {
        for i in 0..M {
            p[i] = p[i] * r[i] + f64::from_bits(c);
        }
    }
    let mut q = [0u64; M];
    let mut e = [0.0f64; M];
    for i in 0..M {
        let scale = f64::from_bits(small_int(k[i] + 1023.0) << 52);
        let ev = p[i] * scale;
        let v = small_int(round_half_away(ev * WEIGHT_ONE));
        q[i] = if inside[i] { v } else { 0 };
        e[i] = if inside[i] { ev } else { 0.0 };
    }
    (q, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_are_the_intended_values() {
        assert_eq!(f64::from_bits(LOG2E), std::f64::consts::LOG2_E);
        let ln2 = f64::from_bits(LN2_HI) + f64::from_bits(LN2_LO);
        assert_eq!(ln2, std::f64::consts::LN_2);
        // the high part leaves 10 free low bits, so k * LN2_HI is exact for |k| < 2^10
        assert_eq!(LN2_HI & 0x3ff, 0);
        let mut fact = 1.0_f64;
        for (n, &c) in INV_FACTORIAL.iter().enumerate() {
            if n > 0 {
                fact *= n as f64;
            }
            assert_eq!(f64::from_bits(c), 1.0 / fact, "1/{n}!");
        }
    }

    #[test]
    fn det_exp_is_accurate() {
        assert_eq!(det_exp(0.0), 1.0);
        assert_eq!(det_exp(-0.0), 1.0);
        assert_eq!(det_exp(f64::NEG_INFINITY), 0.0);
        assert!(det_exp(f64::NAN).is_nan());
        let mut worst = 0.0_f64;
        // a dense sweep of [-708, 0] plus the points where k changes
        let mut points: Vec<f64> = (0..=200_000).map(|i| -708.0 * f64::from(i) / 2e5).collect();
        points.extend((0..1020).map(|k| -(f64::from(k) + 0.5) * std::f64::consts::LN_2));
        for d in points {
            let (got, want) = (det_exp(d), d.exp());
            let rel = ((got - want) / want).abs();
            worst = worst.max(rel);
            assert!(rel < 4e-16, "det_exp({d}) = {got:e}, exp = {want:e}, relative error {rel:e}");
        }
        eprintln!("det_exp worst relative error {worst:e}");
    }

    #[test]
    fn weights_round_and_cut_off() {
        assert_eq!(token_weight(0.0), 1 << 52);
        assert_eq!(token_weight(-0.0), 1 << 52);
        assert_eq!(token_weight(-std::f64::consts::LN_2), 1 << 51);
        assert_eq!(token_weight(-50.0), 0);
        assert_eq!(token_weight(f64::NEG_INFINITY), 0);
        assert_eq!(token_weight(f64::NAN), 0);
        // exp(d) * 2^52 < 0.5 from d < -53 ln 2 ~= -36.74 on: the cutoff at -40 removes nothing
        assert_eq!(token_weight(-36.8), 0);
        assert_eq!(token_weight(-36.7), 1);
        for i in 0..=40_000 {
            let d = -40.0 * f64::from(i) / 4e4;
            let want = (d.exp() * WEIGHT_ONE).round() as i64;
            let got = token_weight(d) as i64;
            // off by at most one unit only where f64::exp and det_exp straddle a half
            assert!((got - want).abs() <= 1, "d = {d}: {got} vs {want}");
        }
    }

    /// The conversions without `as` equal the saturating ones they replace.
    #[test]
    fn exact_conversions_match_as() {
        let mut ints: Vec<f64> = vec![0.0, -0.0, 1.0, 2.0, 1023.0, 4095.0, WEIGHT_ONE - 1.0];
        ints.push(WEIGHT_ONE);
        let mut rng = crate::engine::synth::SynthRng(5);
        ints.extend(rng.vec(1000, 1.0).iter().map(|&x| (f64::from(x).abs() * WEIGHT_ONE).floor()));
        for v in ints {
            assert_eq!(small_int(v), v as u64, "{v}");
        }
        let per = BUCKETS as f64 / -WEIGHT_CUTOFF;
        let mut ds = vec![0.0, -0.0, 1.0, -1e-300, WEIGHT_CUTOFF, -40.1, -1e300, 5e-324];
        ds.extend([f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -39.99, -0.00976, -0.00977]);
        ds.extend((0..=50_000).map(|i| -41.0 * f64::from(i) / 5e4));
        for d in ds {
            let want = ((-d * per) as i64).clamp(0, BUCKETS as i64 - 1) as usize;
            assert_eq!(bucket_of(d, per), want, "d = {d:e}");
        }
    }

    /// The eight-wide weights equal [`token_weight`] bit for bit, on a dense sweep, at the
    /// rounding points of `k`, at the edges of the range and outside it.
    #[test]
    fn eight_wide_weights_equal_the_scalar_ones() {
        let mut ds: Vec<f64> = (0..=400_000).map(|i| -41.0 * f64::from(i) / 4e5).collect();
        ds.extend((0..60).map(|k| -(f64::from(k) + 0.5) * std::f64::consts::LN_2));
        ds.extend((0..60).map(|k| -(f64::from(k) + 0.5) / f64::from_bits(LOG2E)));
        let edge = [0.0, -0.0, 1e-300, -1e-300, 1.0, WEIGHT_CUTOFF, f64::NAN, f64::INFINITY];
        ds.extend(edge);
        ds.extend([f64::NEG_INFINITY, WEIGHT_CUTOFF.next_down(), WEIGHT_CUTOFF.next_up()]);
        ds.extend([-36.7368005696771, -36.73680056967711, -1e-17, -5e-324]);
        while !ds.len().is_multiple_of(8) {
            ds.push(-1.5);
        }
        for chunk in ds.chunks(8) {
            let d: [f64; 8] = std::array::from_fn(|i| chunk[i]);
            let (got, e) = token_weights(&d);
            for ((g, &ev), &dv) in got.iter().zip(&e).zip(&d) {
                assert_eq!(*g, token_weight(dv), "d = {dv:e}");
                let want = if (WEIGHT_CUTOFF..=0.0).contains(&dv) { det_exp(dv) } else { 0.0 };
                assert_eq!(ev.to_bits(), want.to_bits(), "d = {dv:e}");
            }
        }
    }

    /// `weigh_row` (every path this CPU runs picks one) gives each token its scalar weight,
    /// buckets that never decrease along descending logits, and per-bucket sums of the weights.
    #[test]
    fn row_weights_and_buckets() {
        let mut rng = crate::engine::synth::SynthRng(11);
        let mut logits = rng.vec(1003, 12.0);
        logits[5] = f32::NEG_INFINITY;
        logits[17] = -0.0;
        logits[18] = 0.0;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        for inv_t in [1.0, 1.0 / 0.7, 4.0] {
            let (mut b, mut sums) = (Vec::new(), Vec::new());
            let total = weigh_row(&logits, f64::from(max), inv_t, &mut b, &mut sums);
            // the sum of the exps comes out of the weighing bit for bit as from its own pass
            // (and, the order aside, it is the f64 sum of the in-range exps)
            let alone = exp_sum(&logits, f64::from(max), inv_t);
            assert_eq!(total.to_bits(), alone.to_bits(), "inv_t {inv_t}");
            let libm: f64 = logits
                .iter()
                .map(|&x| (f64::from(x) - f64::from(max)) * inv_t)
                .filter(|d| (WEIGHT_CUTOFF..=0.0).contains(d))
                .map(f64::exp)
                .sum();
            assert!((total - libm).abs() <= 1e-13 * libm, "{total} vs {libm}");
            let mut want = vec![0u128; BUCKETS];
            for (t, &x) in logits.iter().enumerate() {
                let q = token_weight((f64::from(x) - f64::from(max)) * inv_t);
                assert_eq!(q == 0, b[t] == NO_BUCKET, "token {t}");
                if q > 0 {
                    want[b[t] as usize] += u128::from(q);
                }
                for (u, &y) in logits.iter().enumerate() {
                    if y < x && b[u] != NO_BUCKET {
                        assert!(b[u] >= b[t], "{u} below {t}");
                    }
                }
            }
            assert_eq!(sums, want);
        }
    }
}
