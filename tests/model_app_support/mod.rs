//! Shared setup of the model application tests: the generated tiny Qwen3 and services on it.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use twinkle::apps::model::{AdapterPolicy, ModelService, ServiceOptions};
use twinkle::engine::{Datum, LoraTargets, LossInputs};
use twinkle::hub::{HubEnv, resolve_with};
use twinkle::protocol::internal::*;

/// The generated tiny model, cached under the system temp dir (generation is atomic, so parallel
/// tests and runs share it safely).
pub fn tiny_model_dir() -> PathBuf {
    let env = HubEnv {
        twinkle_home: Some(std::env::temp_dir().join("twinkle-test-home")),
        ..HubEnv::default()
    };
    resolve_with("generate://qwen3-tiny", &env).unwrap()
}

pub fn options(
    spill: &std::path::Path,
    timeout: Duration,
    max_length: Option<usize>,
) -> ServiceOptions {
    ServiceOptions {
        base_model: "generate://qwen3-tiny".into(),
        model_dir: tiny_model_dir(),
        max_length,
        spill_dir: spill.to_path_buf(),
        adapters: AdapterPolicy { idle_timeout: timeout, ..Default::default() },
        batch_window: twinkle::apps::model::DEFAULT_BATCH_WINDOW,
    }
}

pub fn service(spill: &std::path::Path) -> ModelService {
    ModelService::new(&options(spill, Duration::from_secs(1800), None)).unwrap()
}

pub fn create(id: &str, rank: usize, seed: u64) -> CreateAdapterRequest {
    CreateAdapterRequest {
        model_id: id.into(),
        lora: LoraSettings { rank, alpha: 32.0, targets: LoraTargets::ALL, seed: Some(seed) },
    }
}

/// A next-token datum over a fixed token sequence.
pub fn datum(seq: &[u32]) -> Datum {
    Datum {
        input_tokens: seq[..seq.len() - 1].to_vec(),
        inputs: LossInputs { target_tokens: seq[1..].to_vec(), k: 1, ..Default::default() },
    }
}

pub const SEQ: [u32; 12] = [9707, 11, 1879, 0, 198, 40, 1079, 264, 1273, 13, 151645, 198];

pub fn fwdbwd(id: &str, forward_only: bool, data: Vec<Datum>) -> ForwardBackwardRequest {
    ForwardBackwardRequest {
        model_id: id.into(),
        forward_only,
        disable_lora: false,
        loss_fn: "cross_entropy".into(),
        loss_config: Default::default(),
        data,
    }
}

pub fn adam(id: &str, lr: f64) -> OptimStepRequest {
    let p = twinkle::engine::AdamParams { learning_rate: lr, ..Default::default() };
    OptimStepRequest { model_id: id.into(), adam_params: p }
}

/// `steps` training steps of adapter `id`: forward_backward on [`SEQ`], then Adam at `lr`.
pub fn train(svc: &ModelService, id: &str, steps: usize, lr: f64) {
    for _ in 0..steps {
        loss(svc, id, false);
        svc.optim_step(&adam(id, lr)).unwrap();
    }
}

pub fn loss(svc: &ModelService, id: &str, forward_only: bool) -> f64 {
    svc.forward_backward(&fwdbwd(id, forward_only, vec![datum(&SEQ)])).unwrap().metrics["loss:sum"]
}
