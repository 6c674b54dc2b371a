//! The model application with 2 data-parallel CPU workers against 1: same losses, logprobs and
//! trained weights (within f32 summation tolerance) through create / forward_backward /
//! optim_step / forward.

mod model_app_support;

use std::time::Duration;

use model_app_support::*;
use twinkle::apps::model::{CPU_WORKERS_ENV, ModelService, parse_cpu_workers};
use twinkle::protocol::internal::*;

fn batch() -> Vec<twinkle::engine::Datum> {
    // Uneven lengths so the token split is not just "half the datums each".
    vec![datum(&SEQ), datum(&SEQ[..5]), datum(&SEQ[3..]), datum(&SEQ[..8]), datum(&SEQ[2..9])]
}

/// An `eps` above the gradient elements (the summed loss gives a gradient norm near 200) makes
/// Adam's step about `lr · g / eps`, smooth in the gradient. With a tiny `eps` the first step is
/// `lr · sign(g)`: the test would compare the sign of rounding noise in near-zero gradient
/// elements rather than the data-parallel reduction, and large sign steps make the tiny model
/// diverge.
fn smooth_adam() -> OptimStepRequest {
    let p = twinkle::engine::AdamParams { learning_rate: 0.1, eps: 100.0, ..Default::default() };
    OptimStepRequest { model_id: "a".into(), adam_params: p }
}

fn run(svc: &ModelService) -> Vec<ForwardBackwardResponse> {
    svc.create_adapter(&create("a", 8, 17)).unwrap();
    let mut out = Vec::new();
    for step in 0..2 {
        out.push(svc.forward_backward(&fwdbwd("a", false, batch())).unwrap());
        // A second accumulated batch before the step.
        out.push(svc.forward_backward(&fwdbwd("a", false, batch()[1..3].to_vec())).unwrap());
        let m = svc.optim_step(&smooth_adam()).unwrap();
        assert_eq!(m.metrics["step:max"], (step + 1) as f64);
    }
    out.push(svc.forward_backward(&fwdbwd("a", true, batch())).unwrap());
    out
}

fn close(got: f64, want: f64, what: &str) {
    let tol = 1e-5 * want.abs() + 1e-6;
    assert!((got - want).abs() <= tol, "{what}: got {got}, want {want}");
}

#[test]
fn two_workers_train_like_one() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = options(tmp.path(), Duration::from_secs(1800), None);
    let one = run(&ModelService::with_workers(&opts, 1).unwrap());
    let two = run(&ModelService::with_workers(&opts, 2).unwrap());
    // Training moved the loss: the comparison covers the updated weights, not just the start.
    assert!((one[0].metrics["loss:sum"] - one[4].metrics["loss:sum"]).abs() > 1e-3);
    for (i, (a, b)) in two.iter().zip(&one).enumerate() {
        close(a.metrics["loss:sum"], b.metrics["loss:sum"], &format!("call {i} loss:sum"));
        assert_eq!(a.outputs.len(), b.outputs.len());
        for (d, (x, y)) in a.outputs.iter().zip(&b.outputs).enumerate() {
            assert_eq!(x.shape, y.shape);
            for (j, (p, q)) in x.logprobs.iter().zip(&y.logprobs).enumerate() {
                close(*p as f64, *q as f64, &format!("call {i} datum {d} logprob {j}"));
            }
        }
    }
}

#[test]
fn the_worker_count_setting_is_checked() {
    assert_eq!(parse_cpu_workers(None).unwrap(), 1);
    assert_eq!(parse_cpu_workers(Some(" ")).unwrap(), 1);
    assert_eq!(parse_cpu_workers(Some("3")).unwrap(), 3);
    for bad in ["0", "two", "-1"] {
        let e = parse_cpu_workers(Some(bad)).unwrap_err().to_string();
        assert!(e.contains(CPU_WORKERS_ENV) && e.contains("at least 1"), "{e}");
    }
}
