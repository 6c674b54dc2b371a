//! Reliability of the model application (issue #12, items 1 and 5): a job that panics fails
//! alone as a server error and leaves the adapter exactly as before (for 1 and 2 data-parallel
//! workers); loss configurations and Adam hyper-parameters are validated up front (400 naming
//! the field); overflowing results are a clear user error, never `null` in JSON.

mod model_app_support;
#[macro_use]
mod runtime_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{App, ResponseError, test as atest};
use model_app_support::*;
use serde_json::{Value, json};
use twinkle::apps::model::http::{InternalToken, TOKEN_HEADER, routes};
use twinkle::apps::model::{AppError, BaseModel, ModelService};
use twinkle::engine::batch::FwdBwdOutput;
use twinkle::engine::cpu::CpuRuntime;
use twinkle::engine::optim::{AdamParams, OptimMetrics};
use twinkle::engine::parallel::DataParallel;
use twinkle::engine::{Adapter, Datum, LossFn, LossInputs, ModelRuntime};

/// A CPU runtime that, when armed, panics in `forward_backward` AFTER the real computation has
/// added its gradient, or (`armed_step`) in `optim_step` AFTER the real update has moved the
/// weights, moments and step: the worst case, a half-done job.
struct Flaky {
    inner: CpuRuntime,
    armed: Arc<AtomicBool>,
    armed_step: Arc<AtomicBool>,
}

impl ModelRuntime for Flaky {
    delegate_cpu_runtime!(inner => types, device_name, config, upload_adapter,
        download_adapter, copy_adapter, forward, zero_grad, grads_to_host, grads_from_host,
        new_cache, fork_slot, forward_cached, select_tokens, logits_to_host);

    fn forward_backward(
        &self,
        a: &mut Adapter,
        data: &[Datum],
        loss: &LossFn,
    ) -> twinkle::engine::error::Result<FwdBwdOutput> {
        let out = self.inner.forward_backward(a, data, loss)?;
        if self.armed.swap(false, Ordering::SeqCst) {
            panic!("injected fault after the gradient was accumulated");
        }
        Ok(out)
    }
    fn optim_step(
        &self,
        a: &mut Adapter,
        p: &AdamParams,
    ) -> twinkle::engine::error::Result<OptimMetrics> {
        let out = self.inner.optim_step(a, p)?;
        if self.armed_step.swap(false, Ordering::SeqCst) {
            panic!("injected fault after the update was applied");
        }
        Ok(out)
    }
}

/// A service over `workers` flaky runtimes and its two triggers (forward_backward, optim_step).
type Armed = (Arc<AtomicBool>, Arc<AtomicBool>);

fn flaky_service(spill: &std::path::Path, workers: usize) -> (ModelService<Flaky>, Armed) {
    let opts = options(spill, Duration::from_secs(1800), None);
    let base = BaseModel::load(&opts.base_model, &opts.model_dir, None).unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let armed_step = Arc::new(AtomicBool::new(false));
    let runtimes = (0..workers)
        .map(|i| Flaky {
            inner: CpuRuntime::with_threads(base.model.clone(), i, 1).unwrap(),
            armed: armed.clone(),
            armed_step: armed_step.clone(),
        })
        .collect();
    let engine = DataParallel::new(runtimes).unwrap();
    (ModelService::with_engine(&opts, base.served, engine), (armed, armed_step))
}

fn batch() -> Vec<twinkle::engine::Datum> {
    vec![datum(&SEQ), datum(&SEQ[..5]), datum(&SEQ[3..])]
}

fn fb<R: ModelRuntime>(svc: &ModelService<R>, id: &str) -> Result<f64, AppError> {
    Ok(svc.forward_backward(&fwdbwd(id, false, batch()))?.metrics["loss:sum"])
}

fn weights<R: ModelRuntime>(svc: &ModelService<R>, id: &str) -> Vec<f32> {
    let a = svc.download(id).unwrap();
    a.pairs().iter().flat_map(|(_, p)| p.a.w.data().iter().chain(p.b.w.data()).copied()).collect()
}

fn moments(a: &Adapter) -> Vec<f32> {
    a.pairs()
        .iter()
        .flat_map(|(_, p)| {
            p.a.adam.m.iter().chain(&p.a.adam.v).chain(&p.b.adam.m).chain(&p.b.adam.v).copied()
        })
        .collect()
}

#[test]
fn a_panicking_job_fails_alone_and_the_adapter_trains_on() {
    for workers in [1, 2] {
        let t = tempfile::tempdir().unwrap();
        let (svc, (armed, _)) = flaky_service(t.path(), workers);
        for id in ["hit", "control"] {
            svc.create_adapter(&create(id, 4, 5)).unwrap();
        }
        // A fresh adapter: the failed batch must leave no gradient at all.
        armed.store(true, Ordering::SeqCst);
        let err = fb(&svc, "hit").unwrap_err();
        assert_eq!(err.status_code(), StatusCode::INTERNAL_SERVER_ERROR, "{err}");
        assert_eq!(err.category(), "server");
        assert!(err.to_string().contains("panicked"), "{err}");
        assert_eq!(svc.grad_norm("hit").unwrap(), 0.0, "{workers} workers");
        let no_grads = svc.optim_step(&adam("hit", 1e-2)).unwrap_err();
        assert!(no_grads.to_string().contains("no gradients"), "{no_grads}");

        // With an accumulated gradient: the failed batch is rolled back to it exactly.
        for id in ["hit", "control"] {
            fb(&svc, id).unwrap();
        }
        armed.store(true, Ordering::SeqCst);
        assert!(fb(&svc, "hit").is_err());
        assert_eq!(svc.grad_norm("hit").unwrap(), svc.grad_norm("control").unwrap());

        // Then both train identically.
        for _ in 0..2 {
            let (a, b) = (fb(&svc, "hit").unwrap(), fb(&svc, "control").unwrap());
            assert_eq!(a, b, "{workers} workers");
            for id in ["hit", "control"] {
                svc.optim_step(&adam(id, 1e-2)).unwrap();
            }
        }
        assert_eq!(weights(&svc, "hit"), weights(&svc, "control"), "{workers} workers");
        let fwd = |id: &str| svc.forward_backward(&fwdbwd(id, true, batch())).unwrap();
        assert_eq!(fwd("hit").metrics, fwd("control").metrics);
    }
}

/// A panic in `optim_step` after the update was applied (with 1 and 2 workers: with 2, one
/// replica panics and the other completes) fails the job alone as a server error; the adapter's
/// weights, moments, step and pending gradient are rolled back, so the retry applies the step
/// once and the adapter then trains exactly like a control that never saw the panic.
#[test]
fn a_panicking_optim_step_is_rolled_back() {
    for workers in [1, 2] {
        let t = tempfile::tempdir().unwrap();
        let (svc, (_, armed_step)) = flaky_service(t.path(), workers);
        for id in ["hit", "control", "bystander"] {
            svc.create_adapter(&create(id, 4, 5)).unwrap();
            fb(&svc, id).unwrap();
        }
        svc.optim_step(&adam("bystander", 1e-2)).unwrap();
        let bystander = (weights(&svc, "bystander"), svc.download("bystander").unwrap().step());
        // A first step for both, so the panicking one has non-zero moments to lose.
        for id in ["hit", "control"] {
            svc.optim_step(&adam(id, 1e-2)).unwrap();
            fb(&svc, id).unwrap();
        }
        let before = weights(&svc, "hit");
        armed_step.store(true, Ordering::SeqCst);
        let err = svc.optim_step(&adam("hit", 1e-2)).unwrap_err();
        assert_eq!(err.status_code(), StatusCode::INTERNAL_SERVER_ERROR, "{err}");
        assert_eq!(err.category(), "server");
        assert!(err.to_string().contains("panicked"), "{workers} workers: {err}");
        assert!(weights(&svc, "hit") == before, "{workers} workers: the weights moved");
        let (hit, control) = (svc.download("hit").unwrap(), svc.download("control").unwrap());
        assert_eq!(hit.step(), 1, "{workers} workers");
        assert!(hit.grads_flat() == control.grads_flat(), "{workers} workers: the gradient");
        assert_eq!(svc.grad_norm("hit").unwrap(), svc.grad_norm("control").unwrap());

        // The retry applies the step once; then both train identically.
        for _ in 0..2 {
            let hit = svc.optim_step(&adam("hit", 1e-2)).unwrap().metrics;
            let control = svc.optim_step(&adam("control", 1e-2)).unwrap().metrics;
            assert_eq!(hit, control, "{workers} workers: step and grad norm");
            let (a, b) = (fb(&svc, "hit").unwrap(), fb(&svc, "control").unwrap());
            assert_eq!(a, b, "{workers} workers");
        }
        let (hit, control) = (svc.download("hit").unwrap(), svc.download("control").unwrap());
        assert_eq!(hit.step(), 3, "{workers} workers");
        assert_eq!(hit.step(), control.step());
        assert!(weights(&svc, "hit") == weights(&svc, "control"), "{workers} workers: weights");
        assert!(moments(&hit) == moments(&control), "{workers} workers: moments");
        // Other adapters were never touched.
        let now = (weights(&svc, "bystander"), svc.download("bystander").unwrap().step());
        assert_eq!(now, bystander, "{workers} workers");
    }
}

/// The reported case at the engine level: a ppo loss whose clip bounds are swapped (refused by
/// `LossFn::from_name`, built directly here) panics inside the CPU head; the panic must not leave
/// the adapter's gradient buffers broken ("matmul shape" on every later batch).
#[test]
fn a_panic_inside_the_cpu_head_leaves_the_adapter_usable() {
    let t = tempfile::tempdir().unwrap();
    let opts = options(t.path(), Duration::from_secs(1800), None);
    let base = BaseModel::load(&opts.base_model, &opts.model_dir, None).unwrap();
    for workers in [1, 2] {
        let engine = DataParallel::cpu(base.model.clone(), workers, 2).unwrap();
        let svc = ModelService::with_engine(&opts, base.served.clone(), engine);
        for id in ["hit", "control"] {
            svc.create_adapter(&create(id, 4, 9)).unwrap();
        }
        let mut host = svc.download("hit").unwrap();
        let engine = DataParallel::cpu(base.model.clone(), workers, 2).unwrap();
        let mut rep = engine.upload(&host).unwrap();
        let d = Datum {
            input_tokens: SEQ[..11].to_vec(),
            inputs: LossInputs {
                target_tokens: SEQ[1..].to_vec(),
                k: 1,
                logprobs: Some(vec![-1.0; 11]),
                advantages: Some(vec![1.0; 11]),
                weights: None,
            },
        };
        let swapped = LossFn::Ppo { clip_low: 5.0, clip_high: 0.1 };
        let err = engine.forward_backward(&mut rep, &[d.clone(), d.clone()], &swapped);
        assert!(err.unwrap_err().to_string().contains("panicked"));
        let ce = LossFn::CrossEntropy;
        let mut fresh = engine.upload(&host).unwrap();
        let a = engine.forward_backward(&mut rep, &[d.clone(), d.clone()], &ce).unwrap();
        let b = engine.forward_backward(&mut fresh, &[d.clone(), d], &ce).unwrap();
        assert_eq!(a.loss_sum, b.loss_sum);
        assert_eq!(engine.grad_norm(&rep).unwrap(), engine.grad_norm(&fresh).unwrap());
        let p = AdamParams { learning_rate: 1e-2, ..Default::default() };
        engine.optim_step(&mut rep, &p).unwrap();
        host = engine.download(&rep).unwrap();
        assert_eq!(host.step(), 1);
    }
}

fn post(uri: &str, body: Value) -> atest::TestRequest {
    atest::TestRequest::post().uri(uri).insert_header((TOKEN_HEADER, "tok")).set_json(body)
}

/// Through the internal HTTP route: swapped ppo bounds, unknown keys and bad Adam parameters are
/// 400s naming the field; an overflowing loss is a 400 `user` error (not `null`), nothing is
/// accumulated, and the adapter keeps training.
#[actix_web::test]
async fn bad_numbers_are_refused_with_the_field_named() {
    let t = tempfile::tempdir().unwrap();
    let svc = Arc::new(service(t.path()));
    let tok = InternalToken("tok".into());
    let app =
        atest::init_service(App::new().configure(move |cfg| routes(cfg, svc.clone(), tok.clone())))
            .await;
    let create = json!({"model_id": "m", "rank": 4, "train_attn": true, "train_mlp": true,
        "train_unembed": true, "seed": 3});
    let resp = atest::call_service(&app, post("/_internal/v1/create_adapter", create).to_request());
    assert_eq!(resp.await.status(), 200);
    let d = serde_json::to_value(datum(&SEQ)).unwrap();
    let mut rl = d.clone();
    rl["logprobs"] = json!(vec![-1.0; 11]);
    rl["advantages"] = json!(vec![1.0; 11]);
    let fb = |loss: &str, config: Value, data: Value| {
        json!({"model_id": "m", "forward_only": false, "loss_fn": loss, "loss_config": config,
            "data": [data]})
    };
    let cases = [
        (
            fb("ppo", json!({"clip_low_threshold": 5.0, "clip_high_threshold": 0.1}), rl.clone()),
            "clip_high_threshold",
        ),
        (fb("cispo", json!({"clip_low_threshold": -1.0}), rl.clone()), "clip_low_threshold"),
        (fb("dro", json!({"beta": -2.0}), rl.clone()), "loss_fn_config.beta"),
        (fb("ppo", json!({"epsilon": 0.2}), rl.clone()), "loss_fn_config.epsilon"),
        (fb("ppo", json!({"clip_low_threshold": "low"}), rl.clone()), "clip_low_threshold"),
        (fb("cross_entropy", json!({"beta": 1.0}), d.clone()), "loss_fn_config.beta"),
    ];
    for (body, field) in cases {
        let resp =
            atest::call_service(&app, post("/_internal/v1/forward_backward", body).to_request())
                .await;
        assert_eq!(resp.status(), 400, "{field}");
        let body: Value = atest::read_body_json(resp).await;
        assert_eq!(body["category"], "user");
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains(field), "{field}: {detail}");
    }

    // f32 weights near the type's maximum: each term −w·lp overflows f32 to inf.
    let mut huge = d.clone();
    huge["weights"] = json!(vec![3.0e38f32; 11]);
    let fwd_bwd = |d: Value| {
        post("/_internal/v1/forward_backward", fb("cross_entropy", Value::Null, d)).to_request()
    };
    let resp = atest::call_service(&app, fwd_bwd(huge)).await;
    assert_eq!(resp.status(), 400);
    let body: Value = atest::read_body_json(resp).await;
    assert_eq!(body["category"], "user");
    assert!(body["detail"].as_str().unwrap().contains("overflowed"), "{body}");
    // Nothing was accumulated: optim_step has no gradient to apply.
    let step = |lr: f64| {
        post(
            "/_internal/v1/optim_step",
            json!({"model_id": "m", "adam_params": {"learning_rate": lr}}),
        )
        .to_request()
    };
    let resp = atest::call_service(&app, step(1e-3)).await;
    assert_eq!(resp.status(), 400);
    let body: Value = atest::read_body_json(resp).await;
    assert!(body["detail"].as_str().unwrap().contains("no gradients"), "{body}");

    // A normal batch then trains; an absurd learning rate is refused before anything moves.
    let resp = atest::call_service(&app, fwd_bwd(d)).await;
    assert_eq!(resp.status(), 200);
    let body: Value = atest::read_body_json(resp).await;
    assert!(body["metrics"]["loss:sum"].as_f64().unwrap().is_finite());
    for lr in [1e308, 11.0] {
        let resp = atest::call_service(&app, step(lr)).await;
        assert_eq!(resp.status(), 400);
        let body: Value = atest::read_body_json(resp).await;
        assert!(body["detail"].as_str().unwrap().contains("adam_params.learning_rate"), "{body}");
    }
    let resp = atest::call_service(&app, step(1e-3)).await;
    assert_eq!(resp.status(), 200);
}
