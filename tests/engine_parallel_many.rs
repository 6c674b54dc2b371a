//! Batched multi-tenant calls over data parallelism (`DataParallel::forward_backward_many`,
//! `forward_many`) against each group run alone through `forward_backward` / `forward`, for 1, 2
//! and 3 CPU workers: the same outputs and accumulated gradients (1e-5 relative), a bad group
//! failing alone with its gradient exactly as before, and a shared pass that panics as a whole
//! falling back to each group alone.

mod engine_support;
#[macro_use]
mod runtime_support;

use std::sync::Arc;

use engine_support::{full_lora, rel, tiny_model};
use twinkle::engine::cpu::CpuRuntime;
use twinkle::engine::parallel::{DataParallel, Replicated};
use twinkle::engine::synth::SynthRng;
use twinkle::engine::{
    Adapter, Datum, EvalGroup, FwdBwdOutput, LossFn, LossInputs, Model, ModelRuntime, Result,
    TrainGroup,
};

fn batch(seed: u64, lens: &[usize], vocab: usize) -> Vec<Datum> {
    let mut rng = SynthRng(seed);
    lens.iter()
        .map(|&n| Datum {
            input_tokens: rng.tokens(n, vocab),
            inputs: LossInputs {
                target_tokens: rng.tokens(n, vocab),
                k: 1,
                weights: Some((0..n).map(|_| 0.5 + rng.next_f32().abs()).collect()),
                logprobs: Some((0..n).map(|_| -2.0 - rng.next_f32().abs()).collect()),
                advantages: Some(rng.vec(n, 1.0)),
            },
        })
        .collect()
}

/// A tenant: its adapter, its batch and its loss.
type Tenant = (Adapter, Vec<Datum>, LossFn);

/// Three tenants: own adapters, batch shapes and losses (two PPO with their own clips).
fn tenants(model: &Model) -> Vec<Tenant> {
    let v = model.config().vocab_size;
    vec![
        (full_lora(model, 1, 11, 0.3), batch(1, &[5, 9, 3], v), LossFn::CrossEntropy),
        (
            full_lora(model, 2, 12, 0.3),
            batch(2, &[7], v),
            LossFn::Ppo { clip_low: 0.8, clip_high: 1.2 },
        ),
        (
            full_lora(model, 3, 13, 0.3),
            batch(3, &[4, 6], v),
            LossFn::Ppo { clip_low: 0.9, clip_high: 1.1 },
        ),
    ]
}

fn assert_close(got: &FwdBwdOutput, want: &FwdBwdOutput, what: &str) {
    assert_eq!(got.per_datum.len(), want.per_datum.len(), "{what}");
    for (g, w) in got.per_datum.iter().zip(&want.per_datum) {
        assert!(rel(&g.logprobs, &w.logprobs) <= 1e-5, "{what}: logprobs");
        assert!(rel(&g.elementwise_loss, &w.elementwise_loss) <= 1e-5, "{what}: losses");
    }
    let e = (got.loss_sum - want.loss_sum).abs() / want.loss_sum.abs().max(1e-30);
    assert!(e <= 1e-5, "{what}: loss_sum {} vs {}", got.loss_sum, want.loss_sum);
}

fn grads<R: ModelRuntime>(dp: &DataParallel<R>, rep: &Replicated<R>) -> Vec<f32> {
    dp.download(rep).unwrap().grads_flat()
}

fn pool(model: &Arc<Model>, workers: usize) -> DataParallel<CpuRuntime> {
    DataParallel::cpu(model.clone(), workers, workers).unwrap()
}

/// Uploads every tenant's adapter and accumulates one earlier batch on tenant 0 (so a group
/// that fails must be rolled back to a non-zero gradient, not just zeroed).
fn upload<R: ModelRuntime>(dp: &DataParallel<R>, ts: &[Tenant]) -> Vec<Replicated<R>> {
    let mut reps: Vec<Replicated<R>> = ts.iter().map(|t| dp.upload(&t.0).unwrap()).collect();
    let earlier = batch(9, &[4, 4], dp.config().vocab_size);
    dp.forward_backward(&mut reps[0], &earlier, &LossFn::CrossEntropy).unwrap();
    reps
}

/// Each tenant's group trained alone on fresh [`upload`]s: the replicas and the results.
fn train_alone<R: ModelRuntime>(
    dp: &DataParallel<R>,
    ts: &[Tenant],
) -> (Vec<Replicated<R>>, Vec<Result<FwdBwdOutput>>) {
    let mut reps = upload(dp, ts);
    let out = reps.iter_mut().zip(ts).map(|(r, t)| dp.forward_backward(r, &t.1, &t.2)).collect();
    (reps, out)
}

/// All tenants' groups trained in one `forward_backward_many` on fresh [`upload`]s.
fn train_shared<R: ModelRuntime>(
    dp: &DataParallel<R>,
    ts: &[Tenant],
) -> (Vec<Replicated<R>>, Vec<Result<FwdBwdOutput>>) {
    let mut reps = upload(dp, ts);
    let mut groups: Vec<TrainGroup<Replicated<R>>> = reps
        .iter_mut()
        .zip(ts)
        .map(|(r, t)| TrainGroup { adapter: r, data: &t.1, loss: &t.2 })
        .collect();
    let out = dp.forward_backward_many(&mut groups);
    (reps, out)
}

#[test]
fn batched_training_matches_each_group_alone_on_1_2_and_3_workers() {
    let (_tmp, model) = tiny_model();
    let ts = tenants(&model);
    for workers in [1, 2, 3] {
        let dp = pool(&model, workers);
        let (alone, want) = train_alone(&dp, &ts);
        let (shared, got) = train_shared(&dp, &ts);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let what = format!("{workers} workers, group {i}");
            assert_close(g.as_ref().unwrap(), w.as_ref().unwrap(), &what);
            let (gg, wg) = (grads(&dp, &shared[i]), grads(&dp, &alone[i]));
            assert!(wg.iter().any(|v| *v != 0.0), "{what}: no gradient");
            assert!(rel(&gg, &wg) <= 1e-5, "{what}: grads {}", rel(&gg, &wg));
        }
    }
}

#[test]
fn a_bad_group_fails_alone_and_keeps_its_gradient() {
    let (_tmp, model) = tiny_model();
    let mut ts = tenants(&model);
    // Group 0 (with an earlier gradient) names a token outside the vocabulary.
    ts[0].1[1].input_tokens[2] = model.config().vocab_size as u32;
    for workers in [1, 2] {
        let dp = pool(&model, workers);
        // What the earlier batch left on group 0: every fresh upload starts from it.
        let before = grads(&dp, &upload(&dp, &ts)[0]);
        let (alone, want) = train_alone(&dp, &ts);
        let (shared, got) = train_shared(&dp, &ts);
        let (Err(g), Err(w)) = (&got[0], &want[0]) else { panic!("group 0 must fail: {got:?}") };
        assert_eq!(g.to_string(), w.to_string());
        assert!(g.to_string().contains("data[1].model_input[2]"), "{g}");
        assert_eq!(
            grads(&dp, &shared[0]),
            before,
            "{workers} workers: the failed group's gradient"
        );
        for i in 1..3 {
            assert_close(got[i].as_ref().unwrap(), want[i].as_ref().unwrap(), "good group");
            assert!(rel(&grads(&dp, &shared[i]), &grads(&dp, &alone[i])) <= 1e-5);
        }
    }
}

#[test]
fn batched_forward_matches_alone_including_the_base_model() {
    let (_tmp, model) = tiny_model();
    let ts = tenants(&model);
    for workers in [1, 2] {
        let dp = pool(&model, workers);
        let reps: Vec<Replicated<CpuRuntime>> =
            ts.iter().map(|t| dp.upload(&t.0).unwrap()).collect();
        let mut groups: Vec<EvalGroup<Replicated<CpuRuntime>>> = reps
            .iter()
            .zip(&ts)
            .map(|(r, t)| EvalGroup { adapter: Some(r), data: &t.1, loss: &t.2 })
            .collect();
        groups.push(EvalGroup { adapter: None, data: &ts[0].1, loss: &LossFn::CrossEntropy });
        let got = dp.forward_many(&groups);
        for (i, (g, grp)) in got.iter().zip(&groups).enumerate() {
            let want = dp.forward(grp.adapter, grp.data, grp.loss).unwrap();
            assert_close(g.as_ref().unwrap(), &want, &format!("{workers} workers, group {i}"));
        }
    }
}

/// A CPU runtime whose shared passes panic (a device failing on the large batch) while its
/// one-group calls work.
struct SharedPanics(CpuRuntime);

impl ModelRuntime for SharedPanics {
    delegate_cpu_runtime!(0 => types, config, upload_adapter, download_adapter,
        copy_adapter, forward_backward, forward, optim_step, zero_grad, grads_to_host,
        grads_from_host, new_cache, fork_slot, forward_cached, select_tokens, logits_to_host);

    fn device_name(&self) -> String {
        "fake:0".into()
    }
    fn forward_backward_many(
        &self,
        groups: &mut [TrainGroup<'_, Adapter>],
    ) -> Vec<Result<FwdBwdOutput>> {
        // Half-way through: the first group's gradient is already touched.
        if let Some(g) = groups.first_mut() {
            let _ = self.0.forward_backward(g.adapter, g.data, g.loss);
        }
        panic!("out of device memory")
    }
    fn forward_many(&self, _: &[EvalGroup<'_, Adapter>]) -> Vec<Result<FwdBwdOutput>> {
        panic!("out of device memory")
    }
}

#[test]
fn a_shared_pass_that_panics_falls_back_to_each_group_alone() {
    let (_tmp, model) = tiny_model();
    let ts = tenants(&model);
    let reference = pool(&model, 1);
    let (alone, want) = train_alone(&reference, &ts);
    let dp = DataParallel::single(SharedPanics(CpuRuntime::new(model.clone())));
    let (shared, got) = train_shared(&dp, &ts);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        // Rolled back, then run alone: exactly the alone result, not twice the gradient.
        assert_eq!(g.as_ref().unwrap(), w.as_ref().unwrap(), "group {i}");
        assert_eq!(grads(&dp, &shared[i]), grads(&reference, &alone[i]), "group {i}");
    }
    let evals: Vec<EvalGroup<Replicated<SharedPanics>>> = shared
        .iter()
        .zip(&ts)
        .map(|(r, t)| EvalGroup { adapter: Some(r), data: &t.1, loss: &t.2 })
        .collect();
    assert!(dp.forward_many(&evals).iter().all(|r| r.is_ok()));
}
