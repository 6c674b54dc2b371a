//! Hand-computed cases for `sample_token`, its errors, `Stop` parsing and `StopChecker`.

use twinkle::engine::sampling::{
    SamplingError, SamplingParams, Stop, StopChecker, StopDecision, StopReason, sample_token,
    token_logprob, top_logprobs,
};

fn params(temperature: f32, top_k: i64, top_p: f32) -> SamplingParams {
    SamplingParams { temperature, top_k, top_p, ..SamplingParams::new(16) }
}

fn pick(logits: &[f32], p: &SamplingParams, u: f32) -> u32 {
    sample_token(logits, p, u).map(|(t, _)| t).unwrap_or(u32::MAX)
}

/// Asserts that each `(draw, token)` of `draws` picks `token` from `logits` under `p`.
fn assert_draws(logits: &[f32], p: &SamplingParams, draws: &[(f32, u32)]) {
    for &(u, want) in draws {
        assert_eq!(pick(logits, p, u), want, "u={u} under {p:?}");
    }
}

/// ln of probabilities, so the softmax of these logits is the given distribution.
fn ln(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|p| p.ln() as f32).collect()
}

/// log_softmax computed by hand in f64.
fn log_softmax(logits: &[f32], t: usize) -> f64 {
    let z: f64 = logits.iter().map(|&x| f64::from(x).exp()).sum();
    f64::from(logits[t]) - z.ln()
}

#[test]
fn greedy_picks_lowest_index_among_ties() -> anyhow::Result<()> {
    let logits = [1.0, 3.0, 3.0, 2.0];
    let (t, lp) = sample_token(&logits, &params(0.0, -1, 1.0), 0.999)?;
    assert_eq!(t, 1);
    assert!((f64::from(lp) - log_softmax(&logits, 1)).abs() < 1e-6);
    // Greedy ignores the draw entirely.
    assert_eq!(pick(&logits, &params(0.0, -1, 1.0), 0.0), 1);
    assert_eq!(pick(&[-5.0], &params(0.0, 3, 0.5), 0.5), 0);
    Ok(())
}

#[test]
fn top_k_one_equals_greedy() {
    let cases: [&[f32]; 4] = [
        &[0.5, 2.0, -1.0, 2.0],
        &[7.0, 7.0, 7.0],
        &[f32::NEG_INFINITY, -3.0, -2.5, -2.5],
        &[0.0, 0.1, 0.2, 0.3, 0.4, 0.4],
    ];
    for logits in cases {
        let greedy = pick(logits, &params(0.0, -1, 1.0), 0.0);
        for u in [0.0, 0.3, 0.7, 0.999_999] {
            assert_eq!(pick(logits, &params(1.3, 1, 1.0), u), greedy, "{logits:?} u={u}");
            assert_eq!(pick(logits, &params(0.2, 1, 0.9), u), greedy, "{logits:?} u={u}");
        }
    }
}

#[test]
fn uniform_draws_at_cdf_boundaries() {
    // Equal logits give unnormalised probabilities of exactly 1, so the boundaries are exact.
    let two = [0.0, 0.0];
    let p = params(1.0, -1, 1.0);
    assert_eq!(pick(&two, &p, 0.0), 0);
    assert_eq!(pick(&two, &p, 0.5 - 1.0 / 16_777_216.0), 0);
    assert_eq!(pick(&two, &p, 0.5), 1, "a draw on the boundary goes to the later token");
    let below = |u: f32| u - 1.0 / 16_777_216.0;
    let four = [3.0, 3.0, 3.0, 3.0];
    let draws =
        [(below(0.25), 0), (0.25, 1), (0.5, 2), (below(0.75), 2), (0.75, 3), (below(1.0), 3)];
    assert_draws(&four, &p, &draws);
    // -0.0 and +0.0 are the same logit: ordered by id, whatever the sign bit.
    let zeros = [0.0, -0.0, f32::NEG_INFINITY, -1.0];
    assert_eq!(pick(&zeros, &params(0.0, -1, 1.0), 0.0), 0);
    let signed = [-1.0, 0.0, -0.0];
    assert_eq!(pick(&signed, &params(1.0, 1, 1.0), 0.9), 1);
    assert_eq!(pick(&[-0.0, 0.0], &p, 0.49), 0);
    assert_eq!(pick(&[-0.0, 0.0], &p, 0.5), 1);
}

#[test]
fn canonical_order_is_by_probability_not_index() {
    // p = [0.2, 0.5, 0.3]: canonical order is token 1 (0.5), token 2 (0.3), token 0 (0.2).
    let logits = ln(&[0.2, 0.5, 0.3]);
    assert_draws(
        &logits,
        &params(1.0, -1, 1.0),
        &[(0.0, 1), (0.49, 1), (0.51, 2), (0.79, 2), (0.81, 0)],
    );
}

#[test]
fn temperature_reshapes_the_distribution() {
    // p = [0.25, 0.75]. Order: token 1 then token 0.
    let logits = [0.0, 3.0_f32.ln()];
    // T = 1: token 1 covers u < 0.75.
    assert_draws(&logits, &params(1.0, -1, 1.0), &[(0.74, 1), (0.76, 0)]);
    // T = 0.5 squares the odds: p ∝ [1, 9], token 1 covers u < 0.9.
    assert_draws(&logits, &params(0.5, -1, 1.0), &[(0.85, 1), (0.91, 0)]);
    // T = 2 takes the square root: p1 = √3/(1+√3) ≈ 0.634.
    assert_draws(&logits, &params(2.0, -1, 1.0), &[(0.62, 1), (0.65, 0)]);
}

#[test]
fn logprob_is_of_the_raw_distribution() -> anyhow::Result<()> {
    let logits = [0.0, 3.0_f32.ln()];
    for (t, k, p, u) in [(0.5, -1, 1.0, 0.1), (2.0, 1, 1.0, 0.9), (1.0, -1, 0.5, 0.3)] {
        let (tok, lp) = sample_token(&logits, &params(t, k, p), u)?;
        assert_eq!(tok, 1);
        assert!((f64::from(lp) - 0.75_f64.ln()).abs() < 1e-6, "T={t}: {lp}");
    }
    let (tok, lp) = sample_token(&logits, &params(4.0, -1, 1.0), 0.99)?;
    assert_eq!(tok, 0);
    assert!((f64::from(lp) - 0.25_f64.ln()).abs() < 1e-6);
    assert!((f64::from(token_logprob(&logits, 0)?) - 0.25_f64.ln()).abs() < 1e-6);
    Ok(())
}

#[test]
fn top_p_keeps_the_smallest_sufficient_prefix() {
    // Canonical order: token 0 (0.5), token 1 (0.3), token 2 (0.2).
    let logits = ln(&[0.5, 0.3, 0.2]);
    // top_p 0.4: only token 0 survives, whatever the draw.
    assert_draws(&logits, &params(1.0, -1, 0.4), &[(0.0, 0), (0.5, 0), (0.999, 0)]);
    // top_p 0.6: tokens 0 and 1, renormalised to 0.625 / 0.375.
    assert_draws(&logits, &params(1.0, -1, 0.6), &[(0.62, 0), (0.63, 1), (0.999, 1)]);
    // top_p 0.85: all three, unchanged.
    assert_draws(&logits, &params(1.0, -1, 0.85), &[(0.79, 1), (0.81, 2)]);
    // Applied after temperature: at T = 0.5, p ∝ [25, 9, 4]/38, the head is 0.658 ≥ 0.6.
    assert_eq!(pick(&logits, &params(0.5, -1, 0.6), 0.999), 0);
}

#[test]
fn top_k_keeps_the_k_most_likely_with_index_tie_break() {
    // p = [0.2, 0.5, 0.3], top_k 2 keeps tokens 1 and 2 renormalised to 0.625 / 0.375.
    let logits = ln(&[0.2, 0.5, 0.3]);
    assert_draws(&logits, &params(1.0, 2, 1.0), &[(0.62, 1), (0.63, 2), (0.999, 2)]);
    // top_k larger than the vocabulary is no limit.
    assert_eq!(pick(&logits, &params(1.0, 10, 1.0), 0.81), 0);
    // Ties: tokens 1, 2, 3 share the top logit; top_k 2 keeps 1 and 2 at 1/2 each.
    let tied = [1.0, 2.0, 2.0, 2.0, 0.0];
    assert_draws(&tied, &params(1.0, 2, 1.0), &[(0.49, 1), (0.5, 2), (0.999, 2)]);
    // top_k then top_p: top_k 3 of the tied case keeps 1, 2, 3 at 1/3; top_p 0.5 keeps two.
    assert_eq!(pick(&tied, &params(1.0, 3, 0.5), 0.999), 2);
}

#[test]
fn top_logprobs_in_canonical_order() -> anyhow::Result<()> {
    let logits = ln(&[0.2, 0.5, 0.3, 0.0]);
    let top = top_logprobs(&logits, 2)?;
    assert_eq!(top.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 2]);
    assert!((f64::from(top[0].1) - 0.5_f64.ln()).abs() < 1e-6);
    assert!((f64::from(top[1].1) - 0.3_f64.ln()).abs() < 1e-6);
    // k beyond the vocabulary returns everything; the zero-probability token comes last.
    let all = top_logprobs(&logits, 10)?;
    assert_eq!(all.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 2, 0, 3]);
    assert_eq!(all[3].1, f32::NEG_INFINITY);
    assert!(top_logprobs(&logits, 0)?.is_empty());
    // Ties by id.
    let tied = top_logprobs(&[1.0, 2.0, 2.0, 2.0], 2)?;
    assert_eq!(tied.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(
        token_logprob(&logits, 4),
        Err(SamplingError::TokenOutOfRange { token: 4, vocab: 4 })
    );
    Ok(())
}

#[test]
fn masked_tokens_are_never_sampled() -> anyhow::Result<()> {
    let logits = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
    for u in [0.0, 0.5, 0.999_999] {
        let (t, lp) = sample_token(&logits, &params(1.0, -1, 1.0), u)?;
        assert_eq!((t, lp), (1, 0.0));
    }
    Ok(())
}

#[test]
fn bad_inputs_are_errors() {
    let ok = [0.0, 1.0];
    let e = |l: &[f32], p: &SamplingParams, u: f32| sample_token(l, p, u).err();
    assert_eq!(e(&[], &params(1.0, -1, 1.0), 0.5), Some(SamplingError::EmptyLogits));
    assert!(matches!(
        e(&[0.0, f32::NAN], &params(1.0, -1, 1.0), 0.5),
        Some(SamplingError::BadLogit { index: 1, .. })
    ));
    assert!(matches!(
        e(&[f32::INFINITY], &params(0.0, -1, 1.0), 0.5),
        Some(SamplingError::BadLogit { index: 0, .. })
    ));
    assert_eq!(
        e(&[f32::NEG_INFINITY; 3], &params(1.0, -1, 1.0), 0.5),
        Some(SamplingError::AllMasked)
    );
    assert_eq!(e(&ok, &params(-0.1, -1, 1.0), 0.5), Some(SamplingError::InvalidTemperature(-0.1)));
    assert!(matches!(
        e(&ok, &params(f32::NAN, -1, 1.0), 0.5),
        Some(SamplingError::InvalidTemperature(_))
    ));
    assert_eq!(e(&ok, &params(1.0, -2, 1.0), 0.5), Some(SamplingError::InvalidTopK(-2)));
    assert_eq!(e(&ok, &params(1.0, -1, 0.0), 0.5), Some(SamplingError::InvalidTopP(0.0)));
    assert_eq!(e(&ok, &params(1.0, -1, 1.5), 0.5), Some(SamplingError::InvalidTopP(1.5)));
    assert_eq!(e(&ok, &params(1.0, -1, 1.0), 1.0), Some(SamplingError::InvalidUniform(1.0)));
    assert_eq!(e(&ok, &params(1.0, -1, 1.0), -0.1), Some(SamplingError::InvalidUniform(-0.1)));
    let zero_len = SamplingParams { max_tokens: 0, ..params(1.0, -1, 1.0) };
    assert_eq!(e(&ok, &zero_len, 0.5), Some(SamplingError::InvalidMaxTokens));
    let empty_stop =
        SamplingParams { stop: Stop::Strings(vec!["".into()]), ..params(1.0, -1, 1.0) };
    assert!(matches!(empty_stop.validate(), Err(SamplingError::InvalidStop(_))));
    // top_k 0 means off, like -1.
    assert_eq!(pick(&ok, &params(1.0, 0, 1.0), 0.999), 0);
}

#[test]
fn stop_parses_every_wire_form() -> anyhow::Result<()> {
    use serde_json::json;
    assert_eq!(Stop::from_json(None)?, Stop::Eos);
    assert_eq!(Stop::from_json(Some(&json!(null)))?, Stop::Eos);
    assert_eq!(Stop::from_json(Some(&json!("\n")))?, Stop::Strings(vec!["\n".into()]));
    assert_eq!(
        Stop::from_json(Some(&json!(["a", "bc"])))?,
        Stop::Strings(vec!["a".into(), "bc".into()])
    );
    assert_eq!(Stop::from_json(Some(&json!([151645, 7])))?, Stop::Tokens(vec![151645, 7]));
    assert_eq!(Stop::from_json(Some(&json!([])))?, Stop::Strings(vec![]));
    assert!(Stop::from_json(Some(&json!(["a", 1]))).is_err());
    assert!(Stop::from_json(Some(&json!([-1]))).is_err());
    assert!(Stop::from_json(Some(&json!([4294967296_u64]))).is_err());
    assert!(Stop::from_json(Some(&json!(3))).is_err());
    Ok(())
}

const EOS: [u32; 2] = [151645, 151643];

fn stop_at(d: usize) -> Option<StopDecision> {
    Some(StopDecision { reason: StopReason::Stop, keep: d })
}

#[test]
fn stop_checker_eos_and_length() {
    let mut c = StopChecker::new(&Stop::Eos, &EOS, 5);
    assert!(!c.needs_text());
    assert_eq!(c.push(10, ""), None);
    assert_eq!(c.push(11, ""), None);
    assert_eq!(c.push(151643, ""), stop_at(3));
    // Once decided, later pushes change nothing.
    assert_eq!(c.push(12, ""), stop_at(3));
    assert_eq!(c.generated(), 3);

    let mut c = StopChecker::new(&Stop::Eos, &EOS, 2);
    assert_eq!(c.push(1, ""), None);
    assert_eq!(c.push(2, ""), Some(StopDecision { reason: StopReason::Length, keep: 2 }));

    // EOS on the last allowed token is a stop, not a length cut.
    let mut c = StopChecker::new(&Stop::Eos, &EOS, 1);
    assert_eq!(c.push(151645, ""), stop_at(1));
}

#[test]
fn stop_checker_empty_list_ignores_eos() {
    for stop in [Stop::Strings(vec![]), Stop::Tokens(vec![])] {
        let mut c = StopChecker::new(&stop, &EOS, 3);
        assert_eq!(c.push(151645, "x"), None);
        assert_eq!(c.push(151643, "y"), None);
        assert_eq!(c.push(151645, "z"), Some(StopDecision { reason: StopReason::Length, keep: 3 }));
    }
}

#[test]
fn stop_checker_tokens_and_eos() {
    let mut c = StopChecker::new(&Stop::Tokens(vec![42]), &EOS, 10);
    assert_eq!(c.push(41, ""), None);
    assert_eq!(c.push(42, ""), stop_at(2));
    let mut c = StopChecker::new(&Stop::Tokens(vec![42]), &EOS, 10);
    assert_eq!(c.push(151643, ""), stop_at(1));
}

#[test]
fn stop_checker_strings_across_tokens() {
    let stop = Stop::Strings(vec!["\n\n".into(), "END".into()]);
    let mut c = StopChecker::new(&stop, &EOS, 100);
    assert!(c.needs_text());
    assert_eq!(c.push(1, "hello"), None);
    assert_eq!(c.push(2, " E"), None);
    assert_eq!(c.push(3, "N"), None);
    assert_eq!(c.push(4, "Dx"), stop_at(4), "END completed by the fourth token");

    let mut c = StopChecker::new(&stop, &EOS, 100);
    assert_eq!(c.push(1, "a\n"), None);
    assert_eq!(c.push(2, ""), None, "an empty delta (incomplete UTF-8) changes nothing");
    assert_eq!(c.push(3, "\nb"), stop_at(3));

    // Multi-byte text around the tail cut: the stop string straddles non-ASCII characters.
    let mut c = StopChecker::new(&Stop::Strings(vec!["é🎉".into()]), &EOS, 100);
    assert_eq!(c.push(1, "ééééé"), None);
    assert_eq!(c.push(2, "🎉🎉"), stop_at(2));

    // Strings stop at EOS too.
    let mut c = StopChecker::new(&stop, &EOS, 100);
    assert_eq!(c.push(151645, ""), stop_at(1));
}
