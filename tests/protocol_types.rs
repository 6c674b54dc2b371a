//! JSON types against the example bodies of `specs/tinker-protocol.md` (§2, §4–§6, §11).

use serde_json::{Value, json};

use twinkle::engine::LoraTargets;
use twinkle::protocol::tinker::types::*;

fn parse<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap_or_else(|e| panic!("does not parse: {e}"))
}

#[test]
fn session_requests_as_sent_by_the_sdk() {
    let r: CreateSessionRequest =
        parse(json!({"tags":[],"user_metadata":{},"sdk_version":"0.38.0","type":"create_session"}));
    assert_eq!(r.sdk_version.as_deref(), Some("0.38.0"));
    assert!(r.tags.is_empty() && r.user_metadata.is_empty());
    let r: CreateSessionRequest =
        parse(json!({"tags":["a"],"user_metadata":null,"project_id":"p"}));
    assert_eq!((r.tags, r.project_id.as_deref()), (vec!["a".to_string()], Some("p")));
    let r: SessionHeartbeatRequest = parse(json!({"session_id":"s","type":"session_heartbeat"}));
    assert_eq!(r.session_id, "s");
    let r: FinishSessionRequest = parse(json!({"reason":{"type":"success"},"detail":null}));
    assert_eq!(r.reason.map(|x| x.kind).as_deref(), Some("success"));
    let _: SdkVersionRequest = parse(json!({"sdk_version":"0.38.0"}));
    let t: TelemetryRequest = parse(
        json!({"events":[{"x":1}],"platform":"linux","sdk_version":"0.38.0","session_id":"s","process_uuid":"u"}),
    );
    assert_eq!(t.events.len(), 1);
}

#[test]
fn fixed_responses_have_the_exact_shapes() {
    assert_eq!(
        serde_json::to_value(TelemetryResponse::default()).unwrap(),
        json!({"status":"accepted"})
    );
    assert_eq!(serde_json::to_value(Empty {}).unwrap(), json!({}));
    assert_eq!(
        serde_json::to_value(DynamicConfigResponse::default()).unwrap(),
        json!({"refresh_interval_sec":300,"sample_cancel_enabled":false,"sample_cancel_max_batch_size":64})
    );
    let cfg = serde_json::to_value(ClientConfigResponse::default()).unwrap();
    assert_eq!(cfg["pjwt_auth_enabled"], json!(false));
    assert_eq!(
        serde_json::to_value(CreateSessionResponse::new("s")).unwrap(),
        json!({"session_id":"s"})
    );
    let caps = ServerCapabilitiesResponse {
        supported_models: vec![SupportedModel {
            model_name: Some("Qwen/Qwen3-8B".into()),
            max_context_length: Some(32768),
            trainable: Some(true),
            sampleable: Some(true),
        }],
    };
    assert_eq!(
        serde_json::to_value(caps).unwrap(),
        json!({"supported_models":[{"model_name":"Qwen/Qwen3-8B","max_context_length":32768,"trainable":true,"sampleable":true}]})
    );
}

#[test]
fn create_model_and_get_info() {
    let r: CreateModelRequest =
        parse(json!({"session_id": "sess-1", "model_seq_id": 0, "base_model": "Qwen/Qwen3-8B",
        "lora_config": {"rank": 8, "train_unembed": true, "train_mlp": true, "train_attn": true},
        "optimizer_config": {"type": "adamw"}, "type": "create_model"}));
    let lora = r.lora_config.expect("lora");
    assert_eq!((lora.rank, lora.seed, lora.targets.train_mlp), (8, None, true));
    assert_eq!(r.optimizer_config.map(|o| o.kind).as_deref(), Some("adamw"));
    assert!(lora.validate(64).is_ok());
    let defaults: LoraConfig = parse(json!({}));
    let all = LoraTargets { train_unembed: true, train_mlp: true, train_attn: true };
    assert_eq!(defaults, LoraConfig { rank: 32, seed: None, targets: all });
    let some: LoraConfig = parse(json!({"rank": 4, "seed": -2, "train_mlp": false}));
    assert_eq!(
        some,
        LoraConfig { rank: 4, seed: Some(-2), targets: LoraTargets { train_mlp: false, ..all } }
    );
    assert!(
        LoraConfig {
            targets: LoraTargets { train_unembed: false, train_mlp: false, train_attn: false },
            ..defaults
        }
        .validate(64)
        .is_err_and(|e| e.to_string().contains("all false"))
    );
    assert!(LoraConfig { rank: 0, ..defaults }.validate(64).is_err());
    assert!(LoraConfig { rank: 65, ..defaults }.validate(64).is_err());

    let info = GetInfoResponse {
        model_id: "sess-1:train:0".into(),
        model_data: ModelData {
            arch: Some("qwen3".into()),
            model_name: Some("Qwen/Qwen3-8B".into()),
            tokenizer_id: Some("Qwen/Qwen3-8B".into()),
        },
        is_lora: Some(true),
        lora_rank: Some(8),
        model_name: Some("Qwen/Qwen3-8B".into()),
        optimizer_config: Some(OptimizerConfig::default()),
    };
    assert_eq!(
        serde_json::to_value(info).unwrap(),
        json!({"model_id": "sess-1:train:0",
               "model_data": {"arch": "qwen3", "model_name": "Qwen/Qwen3-8B", "tokenizer_id": "Qwen/Qwen3-8B"},
               "is_lora": true, "lora_rank": 8, "model_name": "Qwen/Qwen3-8B",
               "optimizer_config": {"type": "adamw"}})
    );
}

#[test]
fn optim_step_defaults_and_validation() {
    let r: OptimStepRequest =
        parse(json!({"model_id": "sess-1:train:0", "seq_id": 2, "type": "optim_step",
        "adam_params": {"learning_rate": 0.0001, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12,
                        "weight_decay": 0.0, "grad_clip_norm": 0.0}}));
    assert_eq!(r.seq_id, Some(2));
    assert_eq!(r.adam_params, Some(AdamParams::default()));
    let d: AdamParams = parse(json!({"learning_rate": 0.01}));
    assert_eq!(
        (d.learning_rate, d.beta1, d.beta2, d.eps, d.weight_decay, d.grad_clip_norm),
        (0.01, 0.9, 0.95, 1e-12, 0.0, 0.0)
    );
    assert!(d.validate().is_ok());
    let bad = AdamParams { beta2: 1.0, ..d };
    assert!(bad.validate().unwrap_err().to_string().contains("adam_params.beta2"));
    let alias: OptimStepRequest =
        parse(json!({"model_id": "m", "optim_params": {"learning_rate": 0.5}}));
    assert_eq!(alias.adam_params.map(|a| a.learning_rate), Some(0.5));
    let m = OptimStepResponse { metrics: [("grad_norm:mean".to_string(), 0.41)].into() };
    assert_eq!(serde_json::to_value(m).unwrap(), json!({"metrics": {"grad_norm:mean": 0.41}}));
}

#[test]
fn save_and_load_forms() {
    let r: SaveWeightsRequest = parse(
        json!({"model_id":"m","path":"ckpt-1","seq_id":3,"overwrite":false,"type":"save_weights"}),
    );
    assert_eq!((r.path.as_deref(), r.overwrite), (Some("ckpt-1"), false));
    let named: SaveWeightsForSamplerRequest = parse(
        json!({"model_id":"m","path":"s1","kind":"snapshot","seq_id":4,"type":"save_weights_for_sampler"}),
    );
    assert_eq!(named.form().unwrap(), SamplerSaveForm::Named { name: "s1".into() });
    let eph: SaveWeightsForSamplerRequest =
        parse(json!({"model_id":"m","sampling_session_seq_id":2,"kind":"inflight","seq_id":5}));
    assert_eq!(eph.form().unwrap(), SamplerSaveForm::Ephemeral { sampling_session_seq_id: 2 });
    let neither: SaveWeightsForSamplerRequest = parse(json!({"model_id":"m"}));
    assert!(neither.form().is_err());
    assert_eq!(
        serde_json::to_value(SaveWeightsForSamplerResponse::ephemeral("s:sample:2")).unwrap(),
        json!({"path": null, "sampling_session_id": "s:sample:2"})
    );
    assert_eq!(
        serde_json::to_value(SaveWeightsForSamplerResponse::named("tinker://m/sampler_weights/s1"))
            .unwrap(),
        json!({"path": "tinker://m/sampler_weights/s1"})
    );

    let legacy: LoadWeightsRequest = parse(
        json!({"model_id":"m","path":"tinker://m/weights/x","seq_id":6,"optimizer":true,"type":"load_weights"}),
    );
    assert_eq!(legacy.form().unwrap(), LoadForm::Legacy { model_id: "m".into() });
    assert!(legacy.optimizer);
    let via: LoadWeightsRequest = parse(
        json!({"session_id":"s","model_seq_id":1,"path":"tinker://m/weights/x","optimizer":false,"type":"load_weights"}),
    );
    assert_eq!(
        via.form().unwrap(),
        LoadForm::CreateViaLoad { session_id: "s".into(), model_seq_id: 1 }
    );
    let broken: LoadWeightsRequest = parse(json!({"session_id":"s","path":"tinker://m/weights/x"}));
    assert!(broken.form().is_err());
}

#[test]
fn sample_request_from_the_spec() {
    let r: SampleRequest = parse(json!({"num_samples": 2,
        "prompt": {"chunks": [{"tokens": [1, 2, 3], "type": "encoded_text"}]},
        "sampling_params": {"max_tokens": 3, "stop": ["\n"], "temperature": 0.7, "top_k": -1, "top_p": 1.0},
        "sampling_session_id": "sess-1:sample:0", "seq_id": 0,
        "prompt_logprobs": false, "topk_prompt_logprobs": 0, "topk_sample_logprobs": 0,
        "prompt_alt_tokens_k": 0, "record_stability_info": false, "type": "sample"}));
    assert_eq!(r.num_samples, 2);
    assert_eq!(r.prompt.text_tokens("prompt").unwrap(), vec![1, 2, 3]);
    assert_eq!(r.sampling_params.max_tokens, Some(3));
    assert_eq!(r.sampling_params.stop, Some(StopCondition::Strings(vec!["\n".into()])));
    assert!(r.validate(16).is_ok());

    let stop = |v: Value| -> Option<StopCondition> {
        let p: SamplingParams = parse(json!({ "stop": v }));
        p.stop
    };
    assert_eq!(stop(json!("END")), Some(StopCondition::Strings(vec!["END".into()])));
    assert_eq!(stop(json!([151645, 2])), Some(StopCondition::Tokens(vec![151645, 2])));
    assert_eq!(stop(json!([])), Some(StopCondition::Tokens(vec![])));
    assert_eq!(stop(Value::Null), None);
    assert!(serde_json::from_value::<SamplingParams>(json!({"stop": [1, "a"]})).is_err());
    assert!(serde_json::from_value::<SamplingParams>(json!({"stop": 5})).is_err());
    let d: SamplingParams = parse(json!({}));
    assert_eq!((d.temperature, d.top_k, d.top_p, d.max_tokens), (1.0, -1, 1.0, None));
}

#[test]
fn sample_request_validation() {
    let base = json!({"prompt": {"chunks": [{"tokens": [1], "type": "encoded_text"}]}, "sampling_params": {}});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        parse::<SampleRequest>(b)
    };
    assert!(with("num_samples", json!(0)).validate(8).is_err());
    assert!(with("num_samples", json!(9)).validate(8).is_err());
    assert!(
        with("prompt_alt_tokens_k", json!(2))
            .validate(8)
            .unwrap_err()
            .to_string()
            .starts_with("prompt_alt_tokens_k")
    );
    assert!(with("prompt_logprobs_last_n", json!(3)).validate(8).is_err());
    assert!(with("topk_prompt_logprobs", json!(5)).validate(8).is_err());
    assert!(with("sampling_params", json!({"temperature": -1.0})).validate(8).is_err());
    assert!(with("sampling_params", json!({"top_p": 0.0})).validate(8).is_err());
    assert!(with("sampling_params", json!({"top_k": -2})).validate(8).is_err());
    // Chunks: image chunks parse but are refused for text-only sampling; unknown types fail to parse.
    let img: ModelInput = parse(
        json!({"chunks": [{"data": "iVBO", "format": "png", "expected_tokens": 256, "type": "image"}]}),
    );
    assert!(img.text_tokens("prompt").unwrap_err().to_string().starts_with("prompt.chunks[0]"));
    assert!(serde_json::from_value::<ModelInput>(json!({"chunks": [{"type": "video"}]})).is_err());
    let untyped: ModelInput = parse(json!({"chunks": [{"tokens": [4, 5]}]}));
    assert_eq!(untyped.text_tokens("p").unwrap(), vec![4, 5]);
    let neg: ModelInput = parse(json!({"chunks": [{"tokens": [4, -5], "type": "encoded_text"}]}));
    assert!(
        neg.text_tokens("prompt")
            .unwrap_err()
            .to_string()
            .starts_with("prompt.chunks[0].tokens[1]")
    );
}

#[test]
fn futures_bodies() {
    let r: RetrieveFutureRequest =
        parse(json!({"request_id": "req-42", "allow_metadata_only": true}));
    assert!(r.allow_metadata_only);
    let f = UntypedFuture {
        request_id: "req-42".into(),
        model_id: Some("sess-1:train:0".into()),
        sample_sequence_ids: None,
    };
    assert_eq!(
        serde_json::to_value(f).unwrap(),
        json!({"request_id": "req-42", "model_id": "sess-1:train:0"})
    );
    let s = UntypedFuture {
        request_id: "r".into(),
        model_id: None,
        sample_sequence_ids: Some(vec!["a".into(), "b".into()]),
    };
    assert_eq!(
        serde_json::to_value(s).unwrap(),
        json!({"request_id": "r", "sample_sequence_ids": ["a", "b"]})
    );
    assert_eq!(
        serde_json::to_value(TryAgainResponse::new("req-42", QueueState::Active)).unwrap(),
        json!({"type":"try_again","request_id":"req-42","queue_state":"active"})
    );
    assert_eq!(
        serde_json::to_value(QueueState::PausedRateLimit).unwrap(),
        json!("paused_rate_limit")
    );
    let failed = FailedFutureResponse { error: "message".into(), category: ErrorCategory::User };
    assert_eq!(serde_json::to_value(failed).unwrap(), json!({"error":"message","category":"user"}));
    assert!(
        serde_json::from_value::<TryAgainResponse>(
            json!({"type":"other","request_id":"r","queue_state":"active"})
        )
        .is_err()
    );
}

#[test]
fn sampling_session_bodies() {
    let r: CreateSamplingSessionRequest = parse(
        json!({"session_id":"s","sampling_session_seq_id":1,"model_path":"tinker://s:train:0/sampler_weights/a","type":"create_sampling_session"}),
    );
    assert_eq!((r.sampling_session_seq_id, r.source.base_model), (1, None));
    let g = GetSamplerResponse {
        sampler_id: "s:sample:1".into(),
        base_model: "B".into(),
        model_path: None,
    };
    assert_eq!(
        serde_json::to_value(g).unwrap(),
        json!({"sampler_id":"s:sample:1","base_model":"B"})
    );
}

#[test]
fn rest_objects_from_the_spec() {
    let run = json!({"training_run_id": "sess-1:train:0", "base_model": "Qwen/Qwen3-8B", "model_owner": "alice",
        "is_lora": true, "corrupted": false, "lora_rank": 8,
        "last_request_time": "2025-01-01T00:00:00Z",
        "last_checkpoint": null, "last_sampler_checkpoint": null, "user_metadata": null});
    let parsed: TrainingRun = parse(run.clone());
    assert_eq!(serde_json::to_value(&parsed).unwrap(), run);
    let ckpt = json!({"checkpoint_id": "weights/ckpt-1", "checkpoint_type": "training",
        "time": "2025-01-01T00:00:00Z", "tinker_path": "tinker://sess-1:train:0/weights/ckpt-1",
        "size_bytes": 1048576, "public": false, "user_metadata": null, "expires_at": null});
    let parsed: Checkpoint = parse(ckpt.clone());
    assert_eq!(parsed.checkpoint_type, CheckpointType::Training);
    assert_eq!(serde_json::to_value(&parsed).unwrap(), ckpt);
    let list = TrainingRunsResponse {
        training_runs: vec![],
        cursor: Cursor { offset: 0, limit: 20, total_count: 0 },
    };
    assert_eq!(
        serde_json::to_value(list).unwrap(),
        json!({"training_runs": [], "cursor": {"offset": 0, "limit": 20, "total_count": 0}})
    );
    let q: ListQuery =
        serde_json::from_value(json!({"limit": 500, "access_scope": "owned"})).unwrap();
    assert_eq!(q.page(20, 100), (0, 100));
    assert_eq!(ListQuery::default().page(20, 100), (0, 20));
    let wi = WeightsInfoResponse::lora("B", &LoraConfig { rank: 8, ..LoraConfig::default() }, None);
    assert_eq!(
        serde_json::to_value(wi).unwrap(),
        json!({"base_model":"B","is_lora":true,"lora_rank":8,"train_unembed":true,"train_mlp":true,"train_attn":true})
    );
}

#[test]
fn iso8601_timestamps() {
    assert_eq!(iso8601_utc(0), "1970-01-01T00:00:00.000Z");
    // 2025-01-01T00:00:00Z = 1735689600 s.
    assert_eq!(iso8601_utc(1_735_689_600_000), "2025-01-01T00:00:00.000Z");
    // 2024-02-29T12:34:56.789Z (leap day) = 1709210096 s.
    assert_eq!(iso8601_utc(1_709_210_096_789), "2024-02-29T12:34:56.789Z");
    assert_eq!(iso8601_utc(-1), "1969-12-31T23:59:59.999Z");
}
