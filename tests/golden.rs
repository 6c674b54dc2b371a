//! The engine against PyTorch golden data (tests/fixtures/parity, see its README): every case
//! must meet the README tolerances for logits, logprobs, losses, gradients, AdamW steps and
//! greedy tokens.

use std::path::PathBuf;

use twinkle::engine::golden::{Measure, verify};

fn case(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity").join(name)
}

fn check(name: &str) {
    let report = verify(&case(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    println!("{report}");
    let families: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
    for want in [
        "logits",
        "target_logprobs",
        "loss.cross_entropy",
        "grad.cross_entropy",
        "loss.importance_sampling",
        "grad.importance_sampling",
        "loss.ppo",
        "grad.ppo",
        "adam_step1",
        "adam_step2",
        "greedy.with_adapter",
        "greedy.base_model",
    ] {
        assert!(families.contains(&want), "{name}: family {want} was not checked");
    }
    for c in &report.checks {
        // The README tolerances, restated here so a change in the verifier cannot loosen them.
        let tol = match (c.name.split('.').next().unwrap_or(""), c.measure) {
            ("logits" | "target_logprobs", Measure::Abs) => 1e-4,
            ("loss", Measure::Rel) => 1e-4,
            ("grad", Measure::RelToMax) => 1e-3,
            ("adam_step1" | "adam_step2", Measure::Abs) => 1e-4,
            (_, Measure::Exact) => 0.0,
            other => panic!("unexpected check {other:?}"),
        };
        assert!(c.error <= tol, "{name}: {} error {} > {tol}", c.name, c.error);
    }
    assert!(report.passed());
}

#[test]
fn qwen2_tiny_matches_pytorch() {
    check("qwen2-tiny");
}

#[test]
fn qwen3_tiny_matches_pytorch() {
    check("qwen3-tiny");
}

#[test]
fn qwen2_tiny_bf16_matches_pytorch() {
    check("qwen2-tiny-bf16");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

#[test]
fn verify_golden_cli_passes_and_fails() {
    let bin = env!("CARGO_BIN_EXE_twinkle");
    let ok = std::process::Command::new(bin)
        .arg("verify-golden")
        .arg(case("qwen2-tiny-bf16"))
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stdout));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("PASS"));

    // A case whose reference greedy continuation is wrong must make the command fail.
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("case");
    copy_dir(&case("qwen2-tiny-bf16"), &bad);
    let path = bad.join("case.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let first = v["greedy"]["base_model"][0].as_u64().unwrap();
    v["greedy"]["base_model"][0] = serde_json::json!((first + 1) % 256);
    std::fs::write(&path, v.to_string()).unwrap();
    let out = std::process::Command::new(bin).arg("verify-golden").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("greedy.base_model") && text.contains("FAIL"), "{text}");
}
