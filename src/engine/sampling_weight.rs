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
}
