//! The model service's combining queue (`batch_window_ms`) on the generated tiny Qwen3:
//! concurrent forward / forward_backward jobs of different tenants run as one batch (checked by
//! the service's batch counters) and give each tenant what it gets running alone (outputs and
//! accumulated gradients within 1e-5 relative, against a second service with batching off); a
//! bad job fails alone with its 4xx; one tenant's jobs keep their order and never share a
//! batch; a lone job does not wait for the window.

mod engine_support;
mod model_app_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::ResponseError;
use engine_support::rel;
use model_app_support::*;
use twinkle::apps::model::{AppError, ModelService};
use twinkle::engine::{Datum, LossInputs};
use twinkle::protocol::internal::*;

const TENANTS: usize = 4;

fn service_with(spill: &std::path::Path, window: Duration) -> Arc<ModelService> {
    service_on(spill, window, 1)
}

/// A service on `workers` data-parallel CPU workers.
fn service_on(spill: &std::path::Path, window: Duration, workers: usize) -> Arc<ModelService> {
    let opts = twinkle::apps::model::ServiceOptions {
        batch_window: window,
        ..options(spill, Duration::from_secs(1800), None)
    };
    Arc::new(ModelService::with_workers(&opts, workers).unwrap())
}

/// Tenant `t`'s data: its own tokens, lengths and per-token weights (its loss parameters);
/// with `rl` also sampler logprobs and advantages.
fn tenant_data(t: usize, rl: bool) -> Vec<Datum> {
    let one = |n: usize, salt: u32| {
        let tokens: Vec<u32> =
            (0..=n as u32).map(|i| (i * 977 + t as u32 * 131 + salt) % 150_000).collect();
        let inputs = LossInputs {
            target_tokens: tokens[1..].to_vec(),
            k: 1,
            weights: Some((0..n).map(|i| 0.5 + ((i + t) % 3) as f32 * 0.25).collect()),
            logprobs: rl.then(|| (0..n).map(|i| -11.0 - (i % 4) as f32 * 0.1).collect()),
            advantages: rl.then(|| (0..n).map(|i| ((i + t) % 5) as f32 * 0.3 - 0.6).collect()),
        };
        Datum { input_tokens: tokens[..n].to_vec(), inputs }
    };
    vec![one(6 + 3 * t, 7), one(11, 29)]
}

/// Tenant `t`'s job: cross_entropy, or PPO with the tenant's own clip thresholds.
fn job(id: &str, t: usize, forward_only: bool, ppo: bool) -> ForwardBackwardRequest {
    let mut req = fwdbwd(id, forward_only, tenant_data(t, ppo));
    if ppo {
        req.loss_fn = "ppo".into();
        req.loss_config = [
            ("clip_low_threshold".to_string(), 0.7 + 0.05 * t as f64),
            ("clip_high_threshold".to_string(), 1.2 + 0.1 * t as f64),
        ]
        .into();
    }
    req
}

/// A long job of its own adapter that keeps the engine busy while the test queues others.
fn holder_job() -> ForwardBackwardRequest {
    let seq: Vec<u32> = (0..300u32).map(|i| (i * 7919) % 150_000).collect();
    fwdbwd("holder", false, (0..3).map(|_| datum(&seq)).collect())
}

/// Both services get the same adapters, each trained one step (so every LoRA B is non-zero and
/// each tenant's LoRA changes its rows' outputs).
fn prepare(svcs: &[&ModelService]) {
    for svc in svcs {
        svc.create_adapter(&create("holder", 4, 100)).unwrap();
        for t in 0..TENANTS {
            let id = format!("tenant{t}");
            svc.create_adapter(&create(&id, 2 + 2 * t, t as u64 + 1)).unwrap();
            svc.forward_backward(&job(&id, t, false, false)).unwrap();
            svc.optim_step(&adam(&id, 1e-2)).unwrap();
        }
    }
}

fn assert_same(got: &ForwardBackwardResponse, want: &ForwardBackwardResponse, what: &str) {
    assert_eq!(got.outputs.len(), want.outputs.len(), "{what}");
    for (g, w) in got.outputs.iter().zip(&want.outputs) {
        assert_eq!(g.shape, w.shape, "{what}");
        assert!(rel(&g.logprobs, &w.logprobs) <= 1e-5, "{what}: logprobs");
        assert!(rel(&g.elementwise_loss, &w.elementwise_loss) <= 1e-5, "{what}: losses");
    }
    let (g, w) = (got.metrics["loss:sum"], want.metrics["loss:sum"]);
    assert!((g - w).abs() <= 1e-5 * w.abs().max(1e-30), "{what}: loss {g} vs {w}");
}

fn assert_same_grads(svc: &ModelService, reference: &ModelService, id: &str) {
    let got = svc.download(id).unwrap().grads_flat();
    let want = reference.download(id).unwrap().grads_flat();
    assert!(want.iter().any(|v| *v != 0.0), "{id}: no gradient");
    let e = rel(&got, &want);
    assert!(e <= 1e-5, "{id}: gradients differ by {e:.2e} relative");
}

/// A batching service on `workers` workers and its batching-off reference, both [`prepare`]d,
/// spilling under the returned temporary directory.
fn prepared_pair(workers: usize) -> (tempfile::TempDir, Arc<ModelService>, Arc<ModelService>) {
    let tmp = tempfile::tempdir().unwrap();
    let svc = service_on(&tmp.path().join("a"), Duration::from_millis(5), workers);
    let reference = service_on(&tmp.path().join("b"), Duration::ZERO, workers);
    prepare(&[&svc, &reference]);
    (tmp, svc, reference)
}

/// Every tenant's [`job`].
fn tenant_jobs(forward_only: bool, ppo: bool) -> Vec<ForwardBackwardRequest> {
    (0..TENANTS).map(|t| job(&format!("tenant{t}"), t, forward_only, ppo)).collect()
}

/// Starts the holder job and returns once the engine runs it, so what follows queues.
fn start_holder(
    svc: &Arc<ModelService>,
) -> std::thread::JoinHandle<Result<ForwardBackwardResponse, AppError>> {
    let runs = svc.batch_stats().runs;
    let holder = {
        let svc = svc.clone();
        std::thread::spawn(move || svc.forward_backward(&holder_job()))
    };
    while svc.batch_stats().runs == runs {
        std::thread::yield_now();
    }
    holder
}

/// Each result equals what the reference service answers for its job alone.
fn assert_each_alone(
    reference: &ModelService,
    got: &[Result<ForwardBackwardResponse, AppError>],
    jobs: &[ForwardBackwardRequest],
    what: &str,
) {
    for (t, (g, req)) in got.iter().zip(jobs).enumerate() {
        let want = reference.forward_backward(req).unwrap();
        assert_same(g.as_ref().unwrap(), &want, &format!("{what}, tenant {t}"));
    }
}

/// Runs `jobs` concurrently while the holder job keeps the engine busy, so they queue and are
/// taken together; returns each job's result in order.
fn run_queued(
    svc: &Arc<ModelService>,
    jobs: Vec<ForwardBackwardRequest>,
    queued: usize,
) -> Vec<Result<ForwardBackwardResponse, AppError>> {
    let holder = start_holder(svc);
    let threads: Vec<_> = jobs
        .into_iter()
        .map(|req| {
            let svc = svc.clone();
            std::thread::spawn(move || svc.forward_backward(&req))
        })
        .collect();
    // Every good job queues behind the holder (a bad one fails before queueing).
    let deadline = Instant::now() + Duration::from_secs(30);
    while svc.queued_jobs() < queued && !holder.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(!holder.is_finished(), "the holder job ended before the others queued");
    holder.join().unwrap().unwrap();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn concurrent_training_of_tenants_is_one_batch_equal_to_each_alone() {
    let (_tmp, svc, reference) = prepared_pair(1);
    for ppo in [false, true] {
        let jobs = tenant_jobs(false, ppo);
        let before = svc.batch_stats();
        let got = run_queued(&svc, jobs.clone(), TENANTS);
        let after = svc.batch_stats();
        assert_eq!(after.combined_jobs - before.combined_jobs, TENANTS as u64, "{after:?}");
        assert_eq!(after.runs - before.runs, 2, "the holder, then one batch: {after:?}");
        reference.forward_backward(&holder_job()).unwrap();
        assert_each_alone(&reference, &got, &jobs, &format!("ppo {ppo}"));
        for t in 0..TENANTS {
            assert_same_grads(&svc, &reference, &format!("tenant{t}"));
        }
        assert_same_grads(&svc, &reference, "holder");
    }
    // Pending gradients are set per adapter: each one's step applies its batched gradient.
    for t in 0..TENANTS {
        let id = format!("tenant{t}");
        for s in [&svc, &reference] {
            s.optim_step(&adam(&id, 1e-2)).unwrap();
        }
        let (a, b) = (loss(&svc, &id, true), loss(&reference, &id, true));
        assert!((a - b).abs() <= 1e-4 * b.abs(), "{id}: after the step {a} vs {b}");
    }
    assert_eq!(svc.queued_jobs(), 0);
}

#[test]
fn batches_on_two_data_parallel_workers_equal_each_job_alone() {
    let (_tmp, svc, reference) = prepared_pair(2);
    for forward_only in [false, true] {
        let jobs = tenant_jobs(forward_only, true);
        let before = svc.batch_stats().combined_jobs;
        let got = run_queued(&svc, jobs.clone(), TENANTS);
        assert_eq!(svc.batch_stats().combined_jobs - before, TENANTS as u64);
        reference.forward_backward(&holder_job()).unwrap();
        assert_each_alone(&reference, &got, &jobs, &format!("forward_only {forward_only}"));
    }
    for t in 0..TENANTS {
        assert_same_grads(&svc, &reference, &format!("tenant{t}"));
    }
}

#[test]
fn concurrent_forwards_are_one_batch_equal_to_each_alone() {
    let (_tmp, svc, reference) = prepared_pair(1);
    let mut jobs = tenant_jobs(true, false);
    // One tenant asks for the base model (disable_lora): its rows must not get its LoRA.
    jobs[2].disable_lora = true;
    let got = run_queued(&svc, jobs.clone(), TENANTS);
    let stats = svc.batch_stats();
    assert_eq!(stats.combined_jobs, TENANTS as u64, "{stats:?}");
    assert_each_alone(&reference, &got, &jobs, "forward");
    let lora = reference.forward_backward(&job("tenant2", 2, true, false)).unwrap();
    let base = got[2].as_ref().unwrap();
    assert!(rel(&base.outputs[0].logprobs, &lora.outputs[0].logprobs) > 1e-4, "LoRA not off");
}

#[test]
fn a_bad_job_fails_alone_while_the_others_batch() {
    let (_tmp, svc, reference) = prepared_pair(1);
    let mut jobs = tenant_jobs(false, false);
    // Tenant 1: a token outside the vocabulary; tenant 3: weights of the wrong length.
    jobs[1].data[0].input_tokens[1] = 151_936 + 5;
    jobs[3].data[1].inputs.weights = Some(vec![1.0; 3]);
    let got = run_queued(&svc, jobs.clone(), TENANTS - 2);
    for t in [1, 3] {
        let err = got[t].as_ref().unwrap_err();
        assert!(err.status_code().is_client_error(), "tenant {t}: {err}");
        let want = if t == 1 { "vocabulary" } else { "weights" };
        assert!(err.to_string().contains(want), "tenant {t}: {err}");
    }
    assert_eq!(svc.batch_stats().combined_jobs, 2, "{:?}", svc.batch_stats());
    for t in [0, 2] {
        let want = reference.forward_backward(&jobs[t]).unwrap();
        assert_same(got[t].as_ref().unwrap(), &want, &format!("tenant {t}"));
        assert_same_grads(&svc, &reference, &format!("tenant{t}"));
    }
    // The failed tenants accumulated nothing: a step is refused for lack of gradients.
    for t in [1, 3] {
        let err = svc.optim_step(&adam(&format!("tenant{t}"), 1e-2)).unwrap_err();
        assert!(err.to_string().contains("no gradients"), "{err}");
    }
    // An unknown adapter fails alone too (404), before queueing.
    let err = svc.forward_backward(&job("nobody", 0, false, false)).unwrap_err();
    assert_eq!(err.status_code().as_u16(), 404, "{err}");
}

#[test]
fn one_tenants_jobs_never_share_a_batch_and_keep_their_order() {
    let (_tmp, svc, reference) = prepared_pair(1);
    // Tenant 0 twice (different data), back to back, then tenant 1.
    let first = job("tenant0", 0, false, false);
    let second = job("tenant0", 3, false, false);
    let other = job("tenant1", 1, false, false);
    let runs = svc.batch_stats().runs;
    let holder = start_holder(&svc);
    let mut threads = Vec::new();
    for (k, req) in [first.clone(), second.clone(), other.clone()].into_iter().enumerate() {
        let svc2 = svc.clone();
        threads.push(std::thread::spawn(move || svc2.forward_backward(&req)));
        // Queued in this order (the queue is FIFO per arrival).
        while svc.queued_jobs() < k + 1 && !holder.is_finished() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert!(!holder.is_finished(), "the holder job ended before the others queued");
    holder.join().unwrap().unwrap();
    let got: Vec<_> = threads.into_iter().map(|t| t.join().unwrap().unwrap()).collect();
    let stats = svc.batch_stats();
    // holder; [tenant0 #1, tenant1]; [tenant0 #2].
    assert_eq!(stats.runs - runs, 3, "{stats:?}");
    assert_eq!(stats.combined_jobs, 2, "{stats:?}");
    assert_eq!(stats.largest, 2, "{stats:?}");
    reference.forward_backward(&holder_job()).unwrap();
    for (g, req) in got.iter().zip([&first, &second, &other]) {
        let want = reference.forward_backward(req).unwrap();
        assert_same(g, &want, &req.model_id);
    }
    // Both of tenant 0's gradients accumulated (the sum of the two jobs).
    assert_same_grads(&svc, &reference, "tenant0");
    assert_same_grads(&svc, &reference, "tenant1");
}

#[test]
fn a_lone_job_does_not_wait_for_the_window() {
    let tmp = tempfile::tempdir().unwrap();
    let window = Duration::from_secs(3);
    let svc = service_with(tmp.path(), window);
    svc.create_adapter(&create("solo", 4, 1)).unwrap();
    let started = Instant::now();
    for forward_only in [false, true, false] {
        svc.forward_backward(&job("solo", 0, forward_only, false)).unwrap();
    }
    let took = started.elapsed();
    assert!(took < window / 2, "three lone jobs took {took:?} with a {window:?} window");
    let stats = svc.batch_stats();
    assert_eq!((stats.runs, stats.combined_jobs, stats.largest), (3, 0, 1), "{stats:?}");
}

#[test]
fn batching_off_runs_every_job_directly() {
    let tmp = tempfile::tempdir().unwrap();
    let svc = service_with(tmp.path(), Duration::ZERO);
    svc.create_adapter(&create("a", 4, 1)).unwrap();
    loss(&svc, "a", false);
    assert_eq!(svc.batch_stats(), Default::default());
    assert_eq!(svc.queued_jobs(), 0);
}

#[test]
fn the_window_setting_maps_to_a_duration() {
    use twinkle::apps::batch_window;
    assert_eq!(batch_window(None), twinkle::apps::model::DEFAULT_BATCH_WINDOW);
    assert_eq!(batch_window(Some(0.0)), Duration::ZERO);
    assert_eq!(batch_window(Some(2.5)), Duration::from_micros(2500));
    assert_eq!(batch_window(Some(-1.0)), twinkle::apps::model::DEFAULT_BATCH_WINDOW);
    assert_eq!(batch_window(Some(1e9)), Duration::from_secs(1));
}
