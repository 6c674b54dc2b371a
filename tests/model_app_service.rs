//! The model application's service on the generated tiny Qwen3: training, checkpoints, idle
//! unload, sampling and validation (library level, no HTTP).

mod model_app_support;

use std::time::Duration;

use actix_web::ResponseError;
use actix_web::http::StatusCode;
use model_app_support::*;
use twinkle::apps::model::{AppError, BaseModel, ModelService};
use twinkle::apps::sampler::SamplerService;
use twinkle::engine::{Datum, LossInputs};
use twinkle::protocol::internal::*;

#[test]
fn training_lowers_the_loss_and_forward_only_keeps_no_gradients() {
    let t = tempfile::tempdir().unwrap();
    let svc = service(t.path());
    svc.create_adapter(&create("s:train:0", 8, 1)).unwrap();
    // forward-only first: no gradients, so optim_step is refused.
    let l0 = loss(&svc, "s:train:0", true);
    assert_eq!(loss(&svc, "s:train:0", true), l0, "forward must not change the adapter");
    let err = svc.optim_step(&adam("s:train:0", 1e-3)).unwrap_err();
    assert!(matches!(err, AppError::BadRequest(ref m) if m.contains("forward_backward")), "{err}");
    // A fresh adapter (B = 0) computes the base model's loss: 11 targets near ln(151936) each.
    let uniform = 11.0 * (151_936f64).ln();
    assert!((l0 - uniform).abs() < 0.05 * uniform, "{l0} vs {uniform}");
    let mut losses = Vec::new();
    for _ in 0..10 {
        losses.push(loss(&svc, "s:train:0", false));
        let m = svc.optim_step(&adam("s:train:0", 5e-3)).unwrap().metrics;
        assert!(m["grad_norm:mean"] > 0.0);
    }
    assert_eq!(losses[0], l0, "forward_backward reports the same loss as forward");
    let last = loss(&svc, "s:train:0", true);
    assert!(last < 0.7 * l0, "loss did not drop enough: {losses:?} then {last}");
    for w in losses.windows(2) {
        assert!(w[1] < w[0], "loss not decreasing: {losses:?}");
    }
    // forward_only between forward_backward and optim_step leaves the pending gradients alone:
    // the step equals one taken without the extra forward.
    let twin = service(t.path());
    for s in [&svc, &twin] {
        s.create_adapter(&create("x", 4, 9)).unwrap();
        loss(s, "x", false);
    }
    loss(&svc, "x", true);
    for s in [&svc, &twin] {
        s.optim_step(&adam("x", 1e-2)).unwrap();
    }
    assert_eq!(loss(&svc, "x", true), loss(&twin, "x", true));
}

#[test]
fn saved_state_resumes_with_identical_losses() {
    let t = tempfile::tempdir().unwrap();
    let svc = service(&t.path().join("spill1"));
    svc.create_adapter(&create("a", 8, 3)).unwrap();
    train(&svc, "a", 3, 1e-2);
    let dir = t.path().join("ckpt/weights/step3");
    let size = svc
        .save(&SaveRequest { model_id: "a".into(), dir: dir.clone(), kind: SaveKind::State })
        .unwrap();
    assert!(size.size_bytes > 0);
    for f in ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    let next = |s: &ModelService, id: &str| {
        let a = loss(s, id, false);
        s.optim_step(&adam(id, 1e-2)).unwrap();
        (a, loss(s, id, true))
    };
    let expected = next(&svc, "a");
    let svc2 = service(&t.path().join("spill2"));
    let create_settings = create("b", 8, 0).lora;
    svc2.load(&LoadRequest {
        model_id: "b".into(),
        dir: dir.clone(),
        with_optimizer: true,
        create: Some(create_settings.clone()),
    })
    .unwrap();
    assert_eq!(next(&svc2, "b"), expected);
    // Without the optimizer, Adam restarts: the first loss is the same, the step is not.
    svc2.load(&LoadRequest {
        model_id: "c".into(),
        dir: dir.clone(),
        with_optimizer: false,
        create: Some(create_settings),
    })
    .unwrap();
    let fresh = next(&svc2, "c");
    assert_eq!(fresh.0, expected.0);
    assert_ne!(fresh.1, expected.1);
    // Load onto an existing adapter replaces its weights.
    svc2.load(&LoadRequest {
        model_id: "c".into(),
        dir: dir.clone(),
        with_optimizer: true,
        create: None,
    })
    .unwrap();
    assert_eq!(next(&svc2, "c"), expected);
    // Overwriting a checkpoint leaves a complete directory and no temp siblings.
    svc.save(&SaveRequest { model_id: "a".into(), dir: dir.clone(), kind: SaveKind::Sampler })
        .unwrap();
    assert!(!dir.join("optimizer.safetensors").exists());
    let names: Vec<String> = std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["step3".to_string()]);
    // A sampler checkpoint cannot restore an optimizer.
    let err = svc2
        .load(&LoadRequest {
            model_id: "d".into(),
            dir,
            with_optimizer: true,
            create: Some(create("d", 8, 0).lora),
        })
        .unwrap_err();
    assert_eq!(err.status_code(), StatusCode::BAD_REQUEST, "{err}");
}

fn greedy(prompt: &[u32], n: usize) -> SampleRequest {
    let mut r = SampleRequest::new(prompt.to_vec(), n);
    r.temperature = 0.0;
    r.stop = Some(serde_json::json!([]));
    r
}

#[test]
fn sampler_app_matches_model_app_and_seeds_reproduce() {
    let t = tempfile::tempdir().unwrap();
    let svc = service(t.path());
    svc.create_adapter(&create("m", 8, 5)).unwrap();
    train(&svc, "m", 3, 2e-2);
    let dir = t.path().join("sampler_weights/s1");
    svc.save(&SaveRequest { model_id: "m".into(), dir: dir.clone(), kind: SaveKind::Sampler })
        .unwrap();
    let prompt = &SEQ[..5];
    let mut from_model = greedy(prompt, 8);
    from_model.model_id = Some("m".into());
    let a = svc.sample(&from_model).unwrap();
    let base = BaseModel::load("generate://qwen3-tiny", &tiny_model_dir(), None).unwrap();
    let sampler = SamplerService::new(base);
    let mut from_dir = greedy(prompt, 8);
    from_dir.adapter_dir = Some(dir.clone());
    let b = sampler.sample(&from_dir).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.sequences[0].tokens.len(), 8);
    assert_eq!(a.sequences[0].stop_reason, StopReasonJson::Length);
    // The trained adapter changes the greedy continuation of the base model.
    assert_ne!(svc.sample(&greedy(prompt, 8)).unwrap(), a);
    // The model app also samples from a directory, with the same result.
    assert_eq!(svc.sample(&from_dir).unwrap(), a);
    assert!(sampler.info().adapters.contains(&dir.display().to_string()));
    // A re-save into the same directory (ephemeral sampler weights) is picked up, not cached.
    loss(&svc, "m", false);
    svc.optim_step(&adam("m", 2e-2)).unwrap();
    svc.save(&SaveRequest { model_id: "m".into(), dir: dir.clone(), kind: SaveKind::Sampler })
        .unwrap();
    let a2 = svc.sample(&from_model).unwrap();
    assert_ne!(a2, a, "another step changes the greedy text");
    assert_eq!(sampler.sample(&from_dir).unwrap(), a2);
    let mut bad = greedy(prompt, 2);
    bad.model_id = Some("m".into());
    assert_eq!(sampler.sample(&bad).unwrap_err().status_code(), StatusCode::BAD_REQUEST);

    // Seeds: same seed, same tokens (in both apps); other seed, other tokens.
    let mut r = SampleRequest::new(prompt.to_vec(), 6);
    r.num_samples = 3;
    r.seed = Some(42);
    r.stop = Some(serde_json::json!([]));
    let s1 = sampler.sample(&r).unwrap();
    assert_eq!(sampler.sample(&r).unwrap(), s1);
    assert_eq!(svc.sample(&r).unwrap(), s1);
    let toks: Vec<&Vec<u32>> = s1.sequences.iter().map(|s| &s.tokens).collect();
    assert!(toks[0] != toks[1] && toks[1] != toks[2], "{toks:?}");
    r.seed = Some(43);
    assert_ne!(sampler.sample(&r).unwrap(), s1);
    for s in &s1.sequences {
        assert_eq!(s.tokens.len(), s.logprobs.len());
        assert!(s.logprobs.iter().all(|l| *l < 0.0 && l.is_finite()));
    }
}

#[test]
fn stops_and_prompt_logprobs() {
    let t = tempfile::tempdir().unwrap();
    let svc = service(t.path());
    let tok = svc.base().tokenizer.clone().unwrap();
    let prompt = SEQ[..4].to_vec();
    // Seeded sampling (a random model's greedy text just repeats one token).
    let seeded = |n: usize| {
        let mut r = SampleRequest::new(prompt.clone(), n);
        r.seed = Some(7);
        r.stop = Some(serde_json::json!([]));
        r
    };
    let full = svc.sample(&seeded(10)).unwrap().sequences.remove(0);
    assert_eq!((full.tokens.len(), full.stop_reason), (10, StopReasonJson::Length));

    // Stop token: the first generated id not seen before position j ends the sequence there.
    let j = (1..10).find(|&j| !full.tokens[..j].contains(&full.tokens[j])).unwrap();
    let mut r = seeded(10);
    r.stop = Some(serde_json::json!([full.tokens[j]]));
    let s = svc.sample(&r).unwrap().sequences.remove(0);
    assert_eq!(s.tokens, full.tokens[..=j]);
    assert_eq!(s.logprobs, full.logprobs[..=j]);
    assert_eq!(s.stop_reason, StopReasonJson::Stop);

    // Stop string: text first completed by token j (not present in the text before it).
    let found = (1..10).find_map(|j| {
        let before = tok.decode(&full.tokens[..j], true).unwrap();
        let upto = tok.decode(&full.tokens[..=j], true).unwrap();
        let added = upto.strip_prefix(before.as_str())?.trim_end_matches('\u{FFFD}');
        let stop: String = added.chars().filter(|c| !c.is_whitespace()).take(2).collect();
        (!stop.is_empty()
            && !before.contains(&stop)
            && upto.contains(&stop)
            && !before.contains('\u{FFFD}'))
        .then_some((j, stop))
    });
    let (j, stop) = found.expect("no usable stop string in the greedy text");
    let mut r = seeded(10);
    r.stop = Some(serde_json::json!([stop]));
    let s = svc.sample(&r).unwrap().sequences.remove(0);
    assert_eq!(s.tokens, full.tokens[..=j], "stop {stop:?}");
    assert_eq!(s.stop_reason, StopReasonJson::Stop);

    // prompt_logprobs: null first, then the forward pass's next-token logprobs.
    let mut r = greedy(&prompt, 3);
    r.prompt_logprobs = true;
    let out = svc.sample(&r).unwrap();
    let pl = out.prompt_logprobs.unwrap();
    assert_eq!(pl.len(), prompt.len());
    assert_eq!(pl[0], None);
    svc.create_adapter(&create("z", 4, 1)).unwrap();
    let fwd = svc.forward_backward(&fwdbwd("z", true, vec![datum(&prompt)])).unwrap();
    let expect: Vec<Option<f32>> = fwd.outputs[0].logprobs.iter().map(|&x| Some(x)).collect();
    assert_eq!(pl[1..], expect[..]);
    // Sampled logprobs (KV-cached decode) agree with a full forward over prompt + generation.
    let mut seq = prompt.clone();
    seq.extend(&full.tokens);
    let whole = svc.forward_backward(&fwdbwd("z", true, vec![datum(&seq)])).unwrap();
    let tail = &whole.outputs[0].logprobs[prompt.len() - 1..];
    for (a, b) in tail.iter().zip(&full.logprobs) {
        assert!((a - b).abs() < 1e-4, "{tail:?} vs {:?}", full.logprobs);
    }
}

#[test]
fn bad_requests_are_user_errors_naming_the_field() {
    let t = tempfile::tempdir().unwrap();
    let svc = ModelService::new(&options(t.path(), Duration::from_secs(60), Some(32))).unwrap();
    assert_eq!(svc.info().max_length, 32);
    let code = |e: AppError| (e.status_code(), e.to_string());
    svc.create_adapter(&create("a", 4, 1)).unwrap();
    let (c, m) = code(svc.create_adapter(&create("a", 4, 1)).unwrap_err());
    assert_eq!(c, StatusCode::CONFLICT, "{m}");
    for rank in [0, 129] {
        let (c, m) = code(svc.create_adapter(&create("r", rank, 1)).unwrap_err());
        assert!(c == StatusCode::BAD_REQUEST && m.contains("rank"), "{m}");
    }
    let short = |tokens: Vec<u32>, target_tokens: Vec<u32>| Datum {
        input_tokens: tokens,
        inputs: LossInputs { target_tokens, k: 1, ..Default::default() },
    };
    let cases: Vec<(Vec<Datum>, &str)> = vec![
        (vec![], "data"),
        (vec![datum(&[1, 2, 151_936])], "target_tokens"),
        (vec![datum(&[151_936, 2, 3])], "model_input"),
        (vec![short(vec![1, 2], vec![2])], "target_tokens"),
        (vec![short(vec![1], vec![u32::MAX])], "target_tokens"),
        (vec![datum(&[5; 34])], "max_length"),
    ];
    for (data, field) in cases {
        let (c, m) = code(svc.forward_backward(&fwdbwd("a", false, data)).unwrap_err());
        assert!(c == StatusCode::BAD_REQUEST && m.contains(field), "{field}: {m}");
    }
    let mut req = fwdbwd("a", false, vec![datum(&[1, 2, 3])]);
    req.loss_fn = "hinge".into();
    let (c, m) = code(svc.forward_backward(&req).unwrap_err());
    assert!(c == StatusCode::BAD_REQUEST && m.contains("hinge"), "{m}");
    let (c, _) =
        code(svc.forward_backward(&fwdbwd("nobody", false, vec![datum(&[1, 2])])).unwrap_err());
    assert_eq!(c, StatusCode::NOT_FOUND);
    let mut s = SampleRequest::new(vec![1; 32], 4);
    assert_eq!(code(svc.sample(&s).unwrap_err()).0, StatusCode::BAD_REQUEST);
    s.prompt = vec![151_936];
    assert!(code(svc.sample(&s).unwrap_err()).1.contains("prompt[0]"));
    s.prompt = vec![1];
    s.top_p = 0.0;
    assert!(code(svc.sample(&s).unwrap_err()).1.contains("top_p"));
    // max_tokens is clamped to what max_length leaves.
    let mut s = greedy(&[1; 30], 100);
    s.model_id = Some("a".into());
    assert_eq!(svc.sample(&s).unwrap().sequences[0].tokens.len(), 2);
    svc.unload(&UnloadRequest { model_id: "a".into() }).unwrap();
    assert_eq!(
        code(svc.unload(&UnloadRequest { model_id: "a".into() }).unwrap_err()).0,
        StatusCode::NOT_FOUND
    );
    assert!(svc.info().adapters.is_empty());
}

#[test]
fn idle_adapters_spill_and_reload_transparently() {
    let t = tempfile::tempdir().unwrap();
    let spill = t.path().join("spill");
    let svc = ModelService::new(&options(&spill, Duration::from_millis(200), None)).unwrap();
    let twin = service(&t.path().join("other"));
    for s in [&twin, &svc] {
        s.create_adapter(&create("s:train:7", 8, 11)).unwrap();
        loss(s, "s:train:7", false);
        s.optim_step(&adam("s:train:7", 1e-2)).unwrap();
        // Pending gradients at unload time must survive it.
        loss(s, "s:train:7", false);
    }
    assert_eq!(svc.sweep_idle(), 0, "not idle yet");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(svc.sweep_idle(), 1);
    assert!(!svc.is_resident("s:train:7"));
    assert!(std::fs::read_dir(&spill).unwrap().count() == 1);
    assert_eq!(svc.info().adapters, vec!["s:train:7".to_string()]);
    for s in [&svc, &twin] {
        s.optim_step(&adam("s:train:7", 1e-2)).unwrap();
    }
    assert!(svc.is_resident("s:train:7"));
    assert_eq!(loss(&svc, "s:train:7", true), loss(&twin, "s:train:7", true));
    assert_eq!(std::fs::read_dir(&spill).unwrap().count(), 0, "spill copy removed on reload");
    // The background sweeper does the same on its own.
    let svc = std::sync::Arc::new(svc);
    svc.spawn_sweeper(Duration::from_millis(50));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!svc.is_resident("s:train:7"));
    assert_eq!(loss(&svc, "s:train:7", true), loss(&twin, "s:train:7", true));
}

#[test]
fn max_loras_keeps_only_the_most_recent_adapters_in_memory() {
    let t = tempfile::tempdir().unwrap();
    let mut o = options(&t.path().join("spill"), Duration::from_secs(1800), None);
    o.adapters.max_loras = Some(2);
    let svc = ModelService::new(&o).unwrap();
    let twin = service(&t.path().join("other"));
    for id in ["a", "b"] {
        for s in [&svc, &twin] {
            s.create_adapter(&create(id, 4, 2)).unwrap();
            loss(s, id, false);
        }
    }
    svc.create_adapter(&create("c", 4, 2)).unwrap();
    assert!(!svc.is_resident("a") && svc.is_resident("b") && svc.is_resident("c"));
    // Using "a" brings it back (with its pending gradients) and pushes out "b", now the oldest.
    for s in [&svc, &twin] {
        s.optim_step(&adam("a", 1e-2)).unwrap();
    }
    assert!(svc.is_resident("a") && !svc.is_resident("b") && svc.is_resident("c"));
    assert_eq!(loss(&svc, "a", true), loss(&twin, "a", true));
    assert_eq!(svc.info().adapters, vec!["a".to_string(), "b".into(), "c".into()]);
}
