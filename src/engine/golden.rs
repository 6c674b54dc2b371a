//! Golden check against a PyTorch fixture case (`model/`, `adapter/`, `case.json`,
//! `expected.safetensors`; format in tests/fixtures/parity/README.md): logits, target logprobs,
//! three losses and their LoRA gradients, two AdamW steps, greedy continuations.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde_json::Value;

use super::cpu::KvCache;
use super::cpu::forward_backward;
use super::error::{EngineError, Result};
use super::lora::Adapter;
use super::loss::{Datum, LossFn, LossInputs};
use super::models::Model;
use super::optim::AdamParams;
use super::tensor::Tensor;
use super::weights;

/// How an error is measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Measure {
    /// max |got − want|.
    Abs,
    /// max |got − want| / |want| (scalars).
    Rel,
    /// max |got − want| / max |want| of the tensor.
    RelToMax,
    /// Number of differing tokens.
    Exact,
}

/// One tensor family's comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub name: String,
    pub measure: Measure,
    pub error: f64,
    pub tolerance: f64,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.error <= self.tolerance
    }
}

/// All checks of one case.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub case: String,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(Check::passed)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "case {}", self.case)?;
        for c in &self.checks {
            let verdict = if c.passed() { "ok" } else { "FAIL" };
            writeln!(
                f,
                "  {:<28} {:>11.3e}  (tol {:.0e}, {:?})  {verdict}",
                c.name, c.error, c.tolerance, c.measure
            )?;
        }
        write!(f, "  => {}", if self.passed() { "PASS" } else { "FAIL" })
    }
}

fn bad(m: impl Into<String>) -> EngineError {
    EngineError::InvalidInput(format!("golden case: {}", m.into()))
}

/// `v` as a list of `what`, each element read by `elem` (`not_elem` names a failure).
fn list_of<T>(
    v: &Value,
    what: &str,
    not_elem: &str,
    elem: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<T>> {
    v.as_array()
        .ok_or_else(|| bad(format!("expected a list of {what}")))?
        .iter()
        .map(|x| elem(x).ok_or_else(|| bad(not_elem)))
        .collect()
}

fn u32s(v: &Value) -> Result<Vec<u32>> {
    list_of(v, "token ids", "token id is not an integer", |x| x.as_u64().map(|x| x as u32))
}

fn f32s(v: &Value) -> Result<Vec<f32>> {
    list_of(v, "numbers", "not a number", |x| x.as_f64().map(|x| x as f32))
}

fn list<'a>(case: &'a Value, key: &str) -> Result<&'a Vec<Value>> {
    case.get(key).and_then(Value::as_array).ok_or_else(|| bad(format!("missing list `{key}`")))
}

fn abs_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    got.iter().zip(want).map(|(a, b)| (*a as f64 - *b as f64).abs()).fold(0.0, f64::max)
}

fn expected<'a>(exp: &'a BTreeMap<String, Tensor>, key: &str) -> Result<&'a Tensor> {
    exp.get(key).ok_or_else(|| bad(format!("expected.safetensors lacks `{key}`")))
}

/// Max over the adapter's tensors of |got − want| / max|want| (`prefix.{key}` in `exp`).
fn tensors_vs(
    got: &BTreeMap<String, Tensor>,
    exp: &BTreeMap<String, Tensor>,
    prefix: &str,
    relative: bool,
) -> Result<f64> {
    let mut worst = 0.0f64;
    let mut seen = 0;
    for (k, t) in got {
        let want = expected(exp, &format!("{prefix}.{k}"))?;
        let scale = if relative {
            want.data().iter().fold(0.0f64, |m, v| m.max(v.abs() as f64)).max(1e-30)
        } else {
            1.0
        };
        worst = worst.max(abs_err(t.data(), want.data()) / scale);
        seen += 1;
    }
    let in_file = exp.keys().filter(|k| k.starts_with(&format!("{prefix}."))).count();
    if seen != in_file {
        return Err(bad(format!("{prefix}: adapter has {seen} tensors, the fixture {in_file}")));
    }
    Ok(worst)
}

fn greedy(model: &Model, adapter: Option<&Adapter>, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
    let mut caches = [KvCache::new(model)];
    let mut next: Vec<u32> = prompt.to_vec();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let logits = model.forward_cached(adapter, &[&next], &mut caches)?;
        let row = logits.first().ok_or_else(|| bad("no logits"))?;
        let best = row
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
        out.push(best.0 as u32);
        next = vec![best.0 as u32];
    }
    Ok(out)
}

/// Runs every check of the case in `dir`.
pub fn verify(dir: &Path) -> Result<Report> {
    let model = Model::load(&dir.join("model"))?;
    let adapter = Adapter::load_peft(&dir.join("adapter"), &model)?;
    let case_path = dir.join("case.json");
    let text = std::fs::read_to_string(&case_path).map_err(|e| EngineError::io(&case_path, e))?;
    let case: Value = serde_json::from_str(&text)
        .map_err(|e| EngineError::Json { path: case_path.clone(), message: e.to_string() })?;
    let exp = weights::load_f32(&dir.join("expected.safetensors"))?;
    let mut report = Report { case: dir.display().to_string(), checks: Vec::new() };
    let mut add = |name: &str, measure, error, tolerance| {
        report.checks.push(Check { name: name.to_string(), measure, error, tolerance })
    };

    let seqs = list(&case, "sequences")?;
    let mut data = Vec::with_capacity(seqs.len());
    for (i, s) in seqs.iter().enumerate() {
        let at = |k: &str| {
            list(&case, k).and_then(|l| l.get(i).ok_or_else(|| bad(format!("`{k}` too short"))))
        };
        data.push(Datum {
            input_tokens: u32s(s)?,
            inputs: LossInputs {
                target_tokens: u32s(at("target_tokens")?)?,
                k: 1,
                weights: Some(f32s(at("weights")?)?),
                logprobs: Some(f32s(at("sampling_logprobs")?)?),
                advantages: Some(f32s(at("advantages")?)?),
            },
        });
    }

    let mut worst = 0.0f64;
    for (i, d) in data.iter().enumerate() {
        let got = model.logits(Some(&adapter), &d.input_tokens)?;
        worst = worst.max(abs_err(&got, expected(&exp, &format!("logits.{i}"))?.data()));
    }
    add("logits", Measure::Abs, worst, 1e-4);

    let ce = LossFn::CrossEntropy;
    let fwd = forward_backward(&model, None, &data, &ce, true)?;
    let fwd_ad = forward_backward(&model, Some(&mut adapter.clone()), &data, &ce, true)?;
    let mut worst = 0.0f64;
    for (i, o) in fwd_ad.per_datum.iter().enumerate() {
        worst = worst
            .max(abs_err(&o.logprobs, expected(&exp, &format!("target_logprobs.{i}"))?.data()));
    }
    add("target_logprobs", Measure::Abs, worst, 1e-4);
    // The base model must differ from the adapted one, or the adapter was silently ignored.
    let moved = fwd
        .per_datum
        .iter()
        .zip(&fwd_ad.per_datum)
        .any(|(a, b)| abs_err(&a.logprobs, &b.logprobs) > 1e-4);
    add("adapter_changes_output", Measure::Exact, if moved { 0.0 } else { 1.0 }, 0.0);

    let clip = case.get("ppo_clip").and_then(Value::as_f64).unwrap_or(0.2);
    let losses = [
        ("cross_entropy", LossFn::CrossEntropy),
        ("importance_sampling", LossFn::ImportanceSampling),
        ("ppo", LossFn::Ppo { clip_low: 1.0 - clip, clip_high: 1.0 + clip }),
    ];
    for (name, lf) in losses {
        let mut ad = adapter.clone();
        let out = forward_backward(&model, Some(&mut ad), &data, &lf, false)?;
        let want =
            expected(&exp, &format!("loss.{name}"))?.data().first().copied().unwrap_or(f32::NAN)
                as f64;
        let want_json =
            case.get("losses").and_then(|l| l.get(name)).and_then(Value::as_f64).unwrap_or(want);
        let rel = |w: f64| (out.loss_sum - w).abs() / w.abs().max(1e-12);
        add(&format!("loss.{name}"), Measure::Rel, rel(want).max(rel(want_json)), 1e-4);
        add(
            &format!("grad.{name}"),
            Measure::RelToMax,
            tensors_vs(&ad.gradients(), &exp, &format!("grad.{name}"), true)?,
            1e-3,
        );
    }

    let adam: AdamParams = serde_json::from_value(case.get("adam").cloned().unwrap_or(Value::Null))
        .map_err(|e| bad(format!("`adam`: {e}")))?;
    let mut ad = adapter.clone();
    for step in 1..=2 {
        forward_backward(&model, Some(&mut ad), &data, &ce, false)?;
        ad.optim_step(&adam)?;
        add(
            &format!("adam_step{step}"),
            Measure::Abs,
            tensors_vs(&ad.tensors(), &exp, &format!("adam_step{step}"), false)?,
            1e-4,
        );
    }

    if let Some(g) = case.get("greedy") {
        let prompt = u32s(g.get("prompt").unwrap_or(&Value::Null))?;
        for (name, key, ad) in [
            ("greedy.with_adapter", "with_adapter", Some(&adapter)),
            ("greedy.base_model", "base_model", None),
        ] {
            let want = u32s(g.get(key).unwrap_or(&Value::Null))?;
            let got = greedy(&model, ad, &prompt, want.len())?;
            let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            add(name, Measure::Exact, diff as f64, 0.0);
        }
    }
    Ok(report)
}
