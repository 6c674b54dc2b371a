//! Data parallel over CPU runtimes (the device seam) against the single-engine path: same
//! losses, logprobs, accumulated gradients and post-step weights for 1, 2, 3 and more workers
//! than datums; bit-identical repeats; errors from a shard (or a panicking device) come back as
//! errors and leave the adapter as it was.

mod engine_support;
#[macro_use]
mod runtime_support;

use engine_support::{full_lora, randomize_b, tiny_model};
use twinkle::engine::cpu::CpuRuntime;
use twinkle::engine::parallel::{DataParallel, Replicated, split_by_tokens};
use twinkle::engine::{
    AdamParams, Adapter, Datum, EngineError, FwdBwdOutput, LossFn, Model, ModelRuntime, forward,
    forward_backward,
};

/// The host copy of a replicated adapter.
fn host<R: ModelRuntime>(dp: &DataParallel<R>, rep: &Replicated<R>) -> Adapter {
    dp.download(rep).unwrap()
}

/// Every target, random non-zero B so every gradient is non-trivial.
fn adapter(model: &Model) -> Adapter {
    full_lora(model, 5, 99, 0.3)
}

fn batch(seed: u64, lens: &[usize], vocab: usize) -> Vec<Datum> {
    crate::engine_support::random_batch(seed, lens, vocab, true)
}

const LENS_A: [usize; 5] = [5, 9, 3, 7, 4];
const LENS_B: [usize; 3] = [6, 2, 8];

fn close(got: f64, want: f64, scale: f64, what: &str) {
    let tol = 1e-5 * (want.abs() + scale) + 1e-7;
    assert!((got - want).abs() <= tol, "{what}: got {got}, want {want} (tol {tol})");
}

fn assert_outputs_close(got: &twinkle::engine::FwdBwdOutput, want: &twinkle::engine::FwdBwdOutput) {
    assert_eq!(got.per_datum.len(), want.per_datum.len());
    close(got.loss_sum, want.loss_sum, 0.0, "loss_sum");
    close(got.metrics()["loss:sum"], want.metrics()["loss:sum"], 0.0, "metrics loss:sum");
    for (i, (g, w)) in got.per_datum.iter().zip(&want.per_datum).enumerate() {
        assert_eq!(g.logprobs.len(), w.logprobs.len(), "datum {i}");
        for (j, (a, b)) in g.logprobs.iter().zip(&w.logprobs).enumerate() {
            close(*a as f64, *b as f64, 0.0, &format!("datum {i} logprob {j}"));
        }
        for (j, (a, b)) in g.elementwise_loss.iter().zip(&w.elementwise_loss).enumerate() {
            close(*a as f64, *b as f64, 0.0, &format!("datum {i} loss {j}"));
        }
    }
}

/// Tensor by tensor, each element within 1e-5 of the tensor's largest magnitude.
fn assert_tensors_close(
    got: &std::collections::BTreeMap<String, twinkle::engine::Tensor>,
    want: &std::collections::BTreeMap<String, twinkle::engine::Tensor>,
    what: &str,
) {
    assert_eq!(got.len(), want.len());
    for (k, w) in want {
        let g = &got[k];
        let scale = w.data().iter().fold(0.0f32, |m, x| m.max(x.abs())) as f64;
        assert!(scale > 0.0, "{what} {k} is all zeros: the test would prove nothing");
        for (i, (a, b)) in g.data().iter().zip(w.data()).enumerate() {
            close(*a as f64, *b as f64, scale, &format!("{what} {k}[{i}]"));
        }
    }
}

/// A large `eps` keeps the first Adam step smooth in the gradient (`g / (|g| + eps)`); with a
/// tiny one it is `sign(g)`, which turns a last-bit difference in a near-zero gradient element
/// into a full step of difference and would test the sign of rounding noise instead.
fn adam() -> AdamParams {
    AdamParams { learning_rate: 1e-1, eps: 1.0, weight_decay: 0.01, ..Default::default() }
}

/// Two forward_backward calls accumulated, then one step, through `n` workers and through the
/// plain engine.
fn compare_with_single(n: usize, loss: LossFn) {
    let (_tmp, model) = tiny_model();
    let vocab = model.config().vocab_size;
    let (a, b) = (batch(1, &LENS_A, vocab), batch(2, &LENS_B, vocab));

    let mut single = adapter(&model);
    let ra = forward_backward(&model, Some(&mut single), &a, &loss, false).unwrap();
    let rb = forward_backward(&model, Some(&mut single), &b, &loss, false).unwrap();
    let grads_single = single.gradients();
    single.optim_step(&adam()).unwrap();

    let dp = DataParallel::cpu(model.clone(), n, 2).unwrap();
    let mut master = dp.upload(&adapter(&model)).unwrap();
    assert_eq!(dp.num_workers(), n);
    let da = dp.forward_backward(&mut master, &a, &loss).unwrap();
    let db = dp.forward_backward(&mut master, &b, &loss).unwrap();
    assert_outputs_close(&da, &ra);
    assert_outputs_close(&db, &rb);
    assert_tensors_close(&host(&dp, &master).gradients(), &grads_single, "accumulated gradient");
    let before = host(&dp, &master).tensors();
    let m = dp.optim_step(&mut master, &adam()).unwrap();
    assert_eq!(m.step, 1);
    let after_step = host(&dp, &master);
    assert!(after_step.gradients().values().all(|t| t.data().iter().all(|g| *g == 0.0)));
    let moved = after_step
        .tensors()
        .iter()
        .any(|(k, t)| t.data().iter().zip(before[k].data()).any(|(a, b)| (a - b).abs() > 1e-4));
    assert!(moved, "the step did not move the weights: the comparison below would be vacuous");
    assert_tensors_close(&after_step.tensors(), &single.tensors(), "weights after the step");

    // Every replica stepped: a forward after the step matches the stepped engine.
    let after = dp.forward(Some(&master), &a, &loss).unwrap();
    let want = forward(&model, Some(&single), &a, &loss).unwrap();
    assert_outputs_close(&after, &want);
}

#[test]
fn one_to_more_workers_than_datums_match_the_engine_cross_entropy() {
    // With 4, more workers than LENS_B's 3 datums: one worker stays idle on that call.
    for n in [1, 2, 3, 4] {
        compare_with_single(n, LossFn::CrossEntropy);
    }
}

#[test]
fn two_and_three_workers_match_the_engine_ppo() {
    let ppo = LossFn::from_name("ppo", &Default::default()).unwrap();
    compare_with_single(2, ppo);
    compare_with_single(3, LossFn::ImportanceSampling);
}

#[test]
fn one_pool_serves_several_adapters_in_turn() {
    let (_tmp, model) = tiny_model();
    let vocab = model.config().vocab_size;
    let (a, b) = (batch(8, &LENS_A, vocab), batch(9, &LENS_B, vocab));
    let loss = LossFn::CrossEntropy;
    let dp = DataParallel::cpu(model.clone(), 2, 2).unwrap();
    // Same shape, different weights: one must never be computed with the other's replica.
    let first_host = adapter(&model);
    let mut second_host = first_host.clone();
    randomize_b(&mut second_host, 3, 0.3);
    let (mut first_ref, mut second_ref) = (first_host.clone(), second_host.clone());
    let mut first = dp.upload(&first_host).unwrap();
    let mut second = dp.upload(&second_host).unwrap();
    for data in [&a, &b] {
        let got1 = dp.forward_backward(&mut first, data, &loss).unwrap();
        let got2 = dp.forward_backward(&mut second, data, &loss).unwrap();
        let want1 = forward_backward(&model, Some(&mut first_ref), data, &loss, false).unwrap();
        let want2 = forward_backward(&model, Some(&mut second_ref), data, &loss, false).unwrap();
        assert_outputs_close(&got1, &want1);
        assert_outputs_close(&got2, &want2);
        assert!((got1.loss_sum - got2.loss_sum).abs() > 1e-3);
    }
    let (g1, g2) = (host(&dp, &first).gradients(), host(&dp, &second).gradients());
    assert_tensors_close(&g1, &first_ref.gradients(), "first's gradient");
    assert_tensors_close(&g2, &second_ref.gradients(), "second's gradient");
}

#[test]
fn repeated_runs_are_bit_identical() {
    let (_tmp, model) = tiny_model();
    let data = batch(3, &LENS_A, model.config().vocab_size);
    let run = || {
        let dp = DataParallel::cpu(model.clone(), 3, 3).unwrap();
        let mut master = dp.upload(&adapter(&model)).unwrap();
        let out = dp.forward_backward(&mut master, &data, &LossFn::CrossEntropy).unwrap();
        let grads = host(&dp, &master).gradients();
        dp.optim_step(&mut master, &adam()).unwrap();
        (out, grads, host(&dp, &master).tensors())
    };
    let (o1, g1, w1) = run();
    let (o2, g2, w2) = run();
    assert_eq!(o1, o2);
    assert_eq!(g1, g2);
    assert_eq!(w1, w2);
}

#[test]
fn forward_only_leaves_the_gradient_alone_and_serves_the_base_model() {
    let (_tmp, model) = tiny_model();
    let data = batch(4, &LENS_A, model.config().vocab_size);
    let dp = DataParallel::cpu(model.clone(), 2, 2).unwrap();
    let master = dp.upload(&adapter(&model)).unwrap();
    let got = dp.forward(Some(&master), &data, &LossFn::CrossEntropy).unwrap();
    let want = forward(&model, Some(&adapter(&model)), &data, &LossFn::CrossEntropy).unwrap();
    assert_outputs_close(&got, &want);
    assert!(host(&dp, &master).gradients().values().all(|t| t.data().iter().all(|g| *g == 0.0)));

    let base = dp.forward(None, &data, &LossFn::CrossEntropy).unwrap();
    let want = forward(&model, None, &data, &LossFn::CrossEntropy).unwrap();
    assert_outputs_close(&base, &want);
    // The adapter changes the outputs, so the two comparisons above are not the same check.
    assert!((base.loss_sum - got.loss_sum).abs() > 1e-4);
}

#[test]
fn a_bad_datum_in_one_shard_is_an_error_with_its_batch_index() {
    let (_tmp, model) = tiny_model();
    let vocab = model.config().vocab_size;
    let mut data = batch(5, &LENS_A, vocab);
    data[3].input_tokens[2] = vocab as u32 + 7;
    let dp = DataParallel::cpu(model.clone(), 3, 3).unwrap();
    let mut master = dp.upload(&adapter(&model)).unwrap();
    let err = dp.forward_backward(&mut master, &data, &LossFn::CrossEntropy).unwrap_err();
    assert!(matches!(err, EngineError::InvalidInput(_)), "{err}");
    assert!(err.to_string().contains("data[3].model_input[2]"), "{err}");
    // Good shards ran, but nothing reached the accumulated gradient.
    assert!(host(&dp, &master).gradients().values().all(|t| t.data().iter().all(|g| *g == 0.0)));

    // The pool is still usable.
    let good = batch(6, &LENS_B, vocab);
    dp.forward_backward(&mut master, &good, &LossFn::CrossEntropy).unwrap();
    assert!(host(&dp, &master).gradients().values().any(|t| t.data().iter().any(|g| *g != 0.0)));

    let err = dp.forward_backward(&mut master, &[], &LossFn::CrossEntropy).unwrap_err();
    assert!(err.to_string().contains("no datums"), "{err}");
}

/// A CPU runtime that can stand in for a broken device: it panics, or returns a gradient of
/// the wrong shape, when its `broken` mode says so.
struct Flaky {
    inner: CpuRuntime,
    broken: Option<bool>,
}

impl Flaky {
    fn fail(&self) -> twinkle::engine::Result<()> {
        if self.broken == Some(true) {
            panic!("device lost");
        }
        Ok(())
    }
}

impl ModelRuntime for Flaky {
    delegate_cpu_runtime!(inner => types, config, upload_adapter, download_adapter,
        copy_adapter, optim_step, zero_grad, grads_from_host, new_cache, fork_slot, forward_cached,
        select_tokens, logits_to_host);

    fn device_name(&self) -> String {
        if self.broken.is_some() { "fake:1".into() } else { self.inner.device_name() }
    }
    fn forward_backward(
        &self,
        a: &mut Adapter,
        d: &[Datum],
        l: &LossFn,
    ) -> twinkle::engine::Result<FwdBwdOutput> {
        self.fail()?;
        self.inner.forward_backward(a, d, l)
    }
    fn forward(
        &self,
        a: Option<&Adapter>,
        d: &[Datum],
        l: &LossFn,
    ) -> twinkle::engine::Result<FwdBwdOutput> {
        self.fail()?;
        self.inner.forward(a, d, l)
    }
    fn grads_to_host(&self, a: &Adapter) -> twinkle::engine::Result<Vec<f32>> {
        match self.broken {
            Some(false) => Ok(vec![0.0; 3]),
            _ => self.inner.grads_to_host(a),
        }
    }
}

#[test]
fn a_panicking_or_misbehaving_worker_is_an_error_not_a_crash() {
    let (_tmp, model) = tiny_model();
    let data = batch(7, &LENS_A, model.config().vocab_size);
    for panics in [true, false] {
        let good =
            Flaky { inner: CpuRuntime::with_threads(model.clone(), 0, 1).unwrap(), broken: None };
        let bad = Flaky {
            inner: CpuRuntime::with_threads(model.clone(), 1, 1).unwrap(),
            broken: Some(panics),
        };
        let dp = DataParallel::new(vec![good, bad]).unwrap();
        let mut master = dp.upload(&adapter(&model)).unwrap();
        let err = dp.forward_backward(&mut master, &data, &LossFn::CrossEntropy).unwrap_err();
        assert!(
            matches!(err, EngineError::Worker { ref worker, .. } if worker == "fake:1"),
            "{err}"
        );
        let want = if panics { "panicked" } else { "does not match" };
        assert!(err.to_string().contains(want), "{err}");
        assert!(
            host(&dp, &master).gradients().values().all(|t| t.data().iter().all(|g| *g == 0.0))
        );
    }
    assert!(DataParallel::<CpuRuntime>::new(Vec::new()).is_err());
}

#[test]
fn split_balances_tokens_over_workers() {
    let r = split_by_tokens(&LENS_A, 2);
    assert_eq!(r, vec![0..2, 2..5]); // 14 and 14 tokens
    // Over 3 workers the best contiguous split of [5,9,3,7,4] is [5] [9,3] [7,4].
    assert_eq!(split_by_tokens(&LENS_A, 3), vec![0..1, 1..3, 3..5]);
}
