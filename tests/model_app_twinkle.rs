//! The model application's Twinkle-native layer in process: gradient accumulation and
//! clip-then-step boundaries, loss reductions (CE mean/sum, GRPO with scattered old_logps against
//! hand-derived values), save → resume giving the same loss, tenant isolation, and 4xx for bad
//! class names, paths and scopes, under both route generations.

mod model_app_support;

use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Service, ServiceResponse};
use actix_web::{App, test};
use model_app_support::*;
use serde_json::{Value, json};
use twinkle::apps::model::http::ModelApp;
use twinkle::apps::model::twinkle::TwinkleModel;
use twinkle::apps::twinkle_http::routes;
use twinkle::protocol::twinkle::Auth;

const LORA: &str = r#"{"r": 4, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0, "_TWINKLE_TYPE_": "LoraConfig"}"#;

struct Client<'a, S> {
    app: &'a S,
    token: &'a str,
    scope: &'a str,
    base: &'a str,
}

impl<S> Client<'_, S>
where
    S: Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error>,
{
    async fn call(&self, op: &str, body: Value) -> (u16, Value) {
        let req = test::TestRequest::post()
            .uri(&format!("{}/{op}", self.base))
            .insert_header(("Authorization", format!("Bearer {}", self.token)))
            .insert_header(("X-Twinkle-Session-Id", self.scope))
            .set_json(body)
            .to_request();
        let resp = test::call_service(self.app, req).await;
        let status = resp.status().as_u16();
        let bytes = test::read_body(resp).await;
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn ok(&self, op: &str, body: Value) -> Value {
        let (s, v) = self.call(op, body).await;
        assert_eq!(s, 200, "{op}: {v}");
        v
    }

    async fn adapter(&self, ga: u64) {
        self.ok(
            "add_adapter_to_model",
            json!({"adapter_name": "a", "config": LORA, "gradient_accumulation_steps": ga}),
        )
        .await;
        self.ok(
            "set_optimizer",
            json!({"adapter_name": "a", "optimizer_cls": "AdamW", "lr": 0.02, "weight_decay": 0.0}),
        )
        .await;
    }

    /// `clip_grad_norm` at 1.0: the norm it reports (a string in `result`).
    async fn clip_norm(&self) -> f64 {
        let v = self.ok("clip_grad_norm", json!({"adapter_name": "a", "max_grad_norm": 1.0})).await;
        v["result"].as_str().unwrap().parse().unwrap()
    }

    async fn loss(&self, inputs: &Value) -> f64 {
        let v = self.ok("forward_only", json!({"adapter_name": "a", "inputs": inputs})).await;
        v["loss"].as_f64().or_else(|| v["result"]["loss"].as_f64()).unwrap()
    }
}

/// The Twinkle routes of `tw` under `/m` (with the Gen-1 routes too when `gen1`).
async fn serve(
    tw: &Arc<TwinkleModel>,
    gen1: bool,
) -> impl Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error> + use<>
{
    test::init_service(App::new().configure(|c| routes(c, tw.clone(), "/m", gen1))).await
}

/// A fresh [`layer`] in its own temporary directory (kept alive by the caller), [`serve`]d.
async fn served_layer(
    gen1: bool,
) -> (
    tempfile::TempDir,
    impl Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error>,
) {
    let t = tempfile::tempdir().unwrap();
    let app = serve(&layer(t.path()), gen1).await;
    (t, app)
}

/// Alice's client in scope `s1` of the application `app` (see [`serve`]).
fn alice<S>(app: &S) -> Client<'_, S> {
    Client { app, token: "alice", scope: "s1", base: "/m/twinkle" }
}

/// [`alice`] with adapter `a` added (accumulating over `ga` micro-batches) and its optimizer set.
async fn alice_adapter<S>(app: &S, ga: u64) -> Client<'_, S>
where
    S: Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error>,
{
    let c = alice(app);
    c.adapter(ga).await;
    c
}

fn feature() -> Value {
    let ids: Vec<u32> = SEQ.to_vec();
    let mut labels: Vec<i64> = vec![-100; ids.len()];
    for i in 4..ids.len() - 1 {
        labels[i] = i64::from(ids[i + 1]);
    }
    json!([{"input_ids": ids, "labels": labels}])
}

fn layer(root: &std::path::Path) -> Arc<TwinkleModel> {
    let svc: Arc<dyn ModelApp> = Arc::new(service(&root.join("spill")));
    let auth = Auth { keys: None, salt: b"test-salt".to_vec(), save_root: root.join("save") };
    Arc::new(TwinkleModel::new(svc, auth, Duration::from_secs(600), 4))
}

#[actix_web::test]
async fn accumulation_clip_step_and_schedules_follow_the_boundaries() {
    let (_t, app) = served_layer(true).await;
    let c = alice_adapter(&app, 2).await;
    c.ok("set_lr_scheduler", json!({"adapter_name": "a", "scheduler_cls": "LinearLR", "start_factor": 0.5, "total_iters": 2})).await;
    let x = feature();
    let l0 = c.loss(&x).await;
    c.ok("forward_backward", json!({"adapter_name": "a", "inputs": x})).await;
    // One micro-batch of two: clip reports a norm, step/zero_grad/lr_step change nothing.
    let norm = c.clip_norm().await;
    assert!(norm > 0.0);
    for op in ["step", "zero_grad", "lr_step"] {
        assert_eq!(c.ok(op, json!({"adapter_name": "a"})).await, Value::Null, "{op}");
    }
    assert_eq!(c.loss(&x).await, l0, "a step off the accumulation boundary changed the weights");
    // The second micro-batch doubles the accumulated gradient (same data, scaled by 1/2 each).
    c.ok("forward_backward", json!({"adapter_name": "a", "inputs": x})).await;
    let norm2 = c.clip_norm().await;
    assert!((norm2 - 2.0 * norm).abs() < 1e-3 * norm2, "{norm} then {norm2}");
    c.ok("step", json!({"adapter_name": "a"})).await;
    c.ok("lr_step", json!({"adapter_name": "a"})).await;
    let l1 = c.loss(&x).await;
    assert!(l1 < l0, "no progress: {l0} -> {l1}");
    let m = c.ok("calculate_metric", json!({"adapter_name": "a", "is_training": true})).await;
    // LinearLR(start 0.5, 2 iters) at scheduler step 0: 0.5 * 0.02.
    assert_eq!(m["result"]["learning rate"], "1.000000e-2", "{m}");
    assert_eq!(m["result"]["iters"], "1");
    let gn: f64 = m["result"]["grad_norm"].as_str().unwrap().parse().unwrap();
    assert!((gn - norm2).abs() < 1e-4 * norm2, "{gn} vs {norm2}");
    // Gen-1 path: the same ops directly under the prefix, `{result: …}` envelopes.
    let g1 = Client { base: "/m", ..c };
    assert_eq!(g1.ok("step", json!({"adapter_name": "a"})).await, json!({"result": null}));
}

#[actix_web::test]
async fn losses_match_their_definitions() {
    let (_t, app) = served_layer(false).await;
    let c = alice_adapter(&app, 1).await;
    let x = feature();
    let out = c.ok("forward_only", json!({"adapter_name": "a", "inputs": x})).await;
    let logps: Vec<f64> =
        out["result"]["logps"][0].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let labelled: Vec<f64> = logps.iter().copied().filter(|&l| l != 0.0).collect();
    assert_eq!(labelled.len(), SEQ.len() - 5);
    let mean = -labelled.iter().sum::<f64>() / labelled.len() as f64;
    let ce_mean = out["result"]["loss"].as_f64().unwrap();
    assert!((ce_mean - mean).abs() < 1e-4, "{ce_mean} vs {mean}");
    c.ok(
        "set_loss",
        json!({"adapter_name": "a", "loss_cls": "CrossEntropyLoss", "reduction": "sum"}),
    )
    .await;
    let ce_sum = c.loss(&x).await;
    assert!((ce_sum - mean * labelled.len() as f64).abs() < 1e-3, "{ce_sum}");

    // GRPO at the sampling policy (old_logps = current logps, ratio 1): the loss is minus the
    // mean advantage; advantages +1 and -1 cancel.
    c.ok("set_loss", json!({"adapter_name": "a", "loss_cls": "GRPOLoss", "epsilon": 0.2})).await;
    let two = json!([x[0], x[0]]);
    let grpo = |adv: Value| json!({"adapter_name": "a", "inputs": two, "advantages": adv, "old_logps": [labelled, labelled]});
    let v = c.ok("forward_backward", grpo(json!([1.0, 1.0]))).await;
    assert!((v["result"]["loss"].as_f64().unwrap() + 1.0).abs() < 1e-4, "{v}");
    let v = c.ok("forward_backward", grpo(json!([1.0, -1.0]))).await;
    assert!(v["result"]["loss"].as_f64().unwrap().abs() < 1e-4, "{v}");
    // Old logps 1 nat below the current ones: ratio e > 1.2, clipped for A > 0: -1.2.
    let lower: Vec<f64> = labelled.iter().map(|l| l - 1.0).collect();
    let v = c.ok("forward_backward", json!({"adapter_name": "a", "inputs": [x[0]], "advantages": [1.0], "old_logps": [lower]})).await;
    assert!((v["result"]["loss"].as_f64().unwrap() + 1.2).abs() < 1e-4, "{v}");
    let (s, v) = c
        .call("forward_backward", json!({"adapter_name": "a", "inputs": two, "advantages": [1.0]}))
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("advantages"), "{v}");
}

#[actix_web::test]
async fn save_resume_isolation_and_bad_names() {
    let (_t, app) = served_layer(true).await;
    let c = alice_adapter(&app, 1).await;
    let x = feature();
    for _ in 0..3 {
        c.ok("forward_backward", json!({"adapter_name": "a", "inputs": x})).await;
        c.ok("clip_grad_and_step", json!({"adapter_name": "a", "max_grad_norm": 1.0})).await;
    }
    let saved = c.ok("save", json!({"adapter_name": "a", "name": "ep0", "save_optimizer": true, "consumed_train_samples": 3})).await;
    assert_eq!(saved["twinkle_path"], "twinkle://s1-a/weights/ep0");
    let g1 = Client { base: "/m", ..c };
    let saved1 = g1.ok("save", json!({"adapter_name": "a", "name": "ep0b"})).await;
    assert_eq!(saved1["result"], "twinkle://s1-a/weights/ep0b", "{saved1}");
    let l = c.loss(&x).await;

    // A new session resumes: same loss, same step count.
    let c2 = Client { scope: "s2", ..c };
    c2.adapter(1).await;
    assert_ne!(c2.loss(&x).await, l);
    let r = c2
        .ok(
            "resume_from_checkpoint",
            json!({"adapter_name": "a", "name": "twinkle://s1-a/weights/ep0"}),
        )
        .await;
    assert_eq!(
        r["result"],
        json!({"cur_step": 3, "consumed_train_samples": 3, "gradient_accumulation_steps": 1})
    );
    assert_eq!(c2.loss(&x).await, l);

    // Another tenant: the adapter and the path do not exist for it.
    let eve = Client { token: "eve", ..c };
    let (s, _) = eve.call("forward_only", json!({"adapter_name": "a", "inputs": x})).await;
    assert_eq!(s, 404);
    eve.adapter(1).await;
    let (s, v) =
        eve.call("load", json!({"adapter_name": "a", "name": "twinkle://s1-a/weights/ep0"})).await;
    assert_eq!(s, 404, "{v}");

    for (op, body, needle) in [
        ("set_loss", json!({"loss_cls": "DPOLoss"}), "DPOLoss"),
        ("set_template", json!({"template_cls": "ms://someone/plugin"}), "template_cls"),
        ("set_lr_scheduler", json!({"scheduler_cls": "OneCycleLR"}), "OneCycleLR"),
        ("set_optimizer", json!({"optimizer_cls": "SGD"}), "SGD"),
        ("load", json!({"name": "ms://Qwen/Qwen3-0.6B"}), "hub ids"),
        ("load", json!({"name": "twinkle://../weights/x"}), "name"),
        ("resume_from_checkpoint", json!({"name": "/etc/passwd"}), "name"),
        (
            "forward_backward",
            json!({"inputs": [{"input_ids": [1, 2], "labels": [-100]}]}),
            "labels",
        ),
        (
            "forward_backward",
            json!({"inputs": [{"messages": [{"role": "user", "content": "x"}]}]}),
            "set_template",
        ),
        (
            "add_adapter_to_model",
            json!({"adapter_name": "b", "config": r#"{"r": 4, "use_dora": true}"#}),
            "DoRA",
        ),
        ("add_adapter_to_model", json!({"adapter_name": "../x", "config": LORA}), "adapter_name"),
    ] {
        let mut body = body;
        if body.get("adapter_name").is_none() {
            body["adapter_name"] = json!("a");
        }
        let (s, v) = c.call(op, body.clone()).await;
        assert_eq!(s, 400, "{op} {body}: {v}");
        assert!(v["detail"].as_str().unwrap().contains(needle), "{op}: {v}");
    }
    let (s, v) = c.call("upload_to_hub", json!({"adapter_name": "a"})).await;
    assert_eq!(s, 501, "{v}");
    // No scope header at all: 400 naming the headers.
    let req = test::TestRequest::post()
        .uri("/m/twinkle/forward_only")
        .insert_header(("Authorization", "Bearer alice"))
        .set_json(json!({"adapter_name": "a", "inputs": x}))
        .to_request();
    let resp = test::call_service(&app, req).await;
    assert_eq!(resp.status(), 400);
}

#[actix_web::test]
async fn state_dict_heartbeat_and_idle_expiry() {
    let t = tempfile::tempdir().unwrap();
    let svc: Arc<dyn ModelApp> = Arc::new(service(&t.path().join("spill")));
    let auth = Auth { keys: None, salt: b"s".to_vec(), save_root: t.path().join("save") };
    let tw = Arc::new(TwinkleModel::new(svc.clone(), auth, Duration::from_millis(300), 4));
    let app = serve(&tw, true).await;
    let c = alice_adapter(&app, 1).await;
    // PEFT tensor names with [out, in] rows: lora_A is [r, in], lora_B [out, r].
    let sd = c.ok("get_state_dict", json!({"adapter_name": "a"})).await;
    let sd = sd["result"].as_object().unwrap();
    let a = &sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    assert_eq!(a.as_array().unwrap().len(), 4, "rank rows");
    let b = &sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"];
    assert_eq!(b[0].as_array().unwrap().len(), 4, "rank columns");
    assert!(!sd.keys().any(|k| k.starts_with("base_model.model.lm_head")));
    // Heartbeats (Gen-1) keep the adapter; without them it expires and is unloaded.
    let g1 = Client { base: "/m", ..c };
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(g1.ok("heartbeat", json!({"adapter_name": "a"})).await, json!({"status": "ok"}));
        assert_eq!(tw.sweep(), 0);
    }
    std::thread::sleep(Duration::from_millis(350));
    assert_eq!(tw.sweep(), 1);
    assert!(svc.info().adapters.is_empty(), "{:?}", svc.info().adapters);
    let (s, _) = g1.call("heartbeat", json!({"adapter_name": "a"})).await;
    assert_eq!(s, 404);
}

/// A restarted model application (same spill directory: snapshots + journals) serves the same
/// Twinkle adapter to the same caller: same weights, same step count, same optimizer and
/// schedule settings; an engine adapter of Twinkle shape with no journal is unloaded.
#[actix_web::test]
async fn a_restarted_application_keeps_twinkle_adapters() {
    let t = tempfile::tempdir().unwrap();
    let spill = t.path().join("spill");
    let auth =
        || Auth { keys: None, salt: b"test-salt".to_vec(), save_root: t.path().join("save") };
    let start = || {
        let svc = Arc::new(service(&spill));
        svc.restore_live();
        svc.enable_snapshots();
        let app: Arc<dyn ModelApp> = svc.clone();
        let tw = TwinkleModel::new(app, auth(), Duration::from_secs(600), 4)
            .with_journal(spill.join(twinkle::apps::model::twinkle::JOURNAL_DIR));
        let restored = tw.restore();
        (svc, Arc::new(tw), restored)
    };
    let x = feature();
    let orphan = format!("{}/gone-a", "cd".repeat(32));
    let (before, metric) = {
        let (svc, tw, restored) = start();
        assert_eq!(restored, 0);
        let app = serve(&tw, true).await;
        let c = alice_adapter(&app, 1).await;
        c.ok("set_lr_scheduler", json!({"adapter_name": "a", "scheduler_cls": "LinearLR", "start_factor": 0.5, "total_iters": 4})).await;
        for _ in 0..2 {
            c.ok("forward_backward", json!({"adapter_name": "a", "inputs": x})).await;
            c.ok("clip_grad_and_step", json!({"adapter_name": "a"})).await;
        }
        svc.create_adapter(&create(&orphan, 4, 7)).unwrap();
        assert_eq!(svc.flush_snapshots(), 2);
        let m = c.ok("calculate_metric", json!({"adapter_name": "a", "is_training": true})).await;
        (c.loss(&x).await, m)
    };
    assert_eq!(metric["result"]["iters"], "2", "{metric}");

    let (svc, tw, restored) = start();
    assert_eq!(restored, 1);
    assert!(!svc.info().adapters.contains(&orphan), "the orphan was not unloaded");
    let app = serve(&tw, true).await;
    let c = alice(&app);
    assert_eq!(c.loss(&x).await, before, "the restored adapter differs");
    // Another tenant still cannot see it.
    let bob = Client { token: "bob", ..c };
    assert_eq!(bob.call("forward_only", json!({"adapter_name": "a", "inputs": x})).await.0, 404);
    c.ok("forward_backward", json!({"adapter_name": "a", "inputs": x})).await;
    c.ok("clip_grad_and_step", json!({"adapter_name": "a"})).await;
    let m = c.ok("calculate_metric", json!({"adapter_name": "a", "is_training": true})).await;
    assert_eq!(m["result"]["iters"], "3", "{m}");
    // The third step ran at LinearLR(0.5 → 1 over 4 steps) scheduler step 2:
    // 0.02 * (0.5 + 0.5 * 2/4); a schedule restarted from 0 would have used 0.02 * 0.5.
    assert_eq!(m["result"]["learning rate"], "1.500000e-2", "{m}");
    assert!(c.loss(&x).await < before);
}

/// `adapter_max_lifetime`: an adapter that old expires even while its client keeps calling (as
/// the Python server's countdown does); a younger one stays.
#[actix_web::test]
async fn adapters_past_their_maximum_lifetime_expire_while_active() {
    let life = Duration::from_secs(2);
    let t = tempfile::tempdir().unwrap();
    let svc: Arc<dyn ModelApp> = Arc::new(service(&t.path().join("spill")));
    let auth = Auth { keys: None, salt: b"s".to_vec(), save_root: t.path().join("save") };
    let tw = TwinkleModel::new(svc.clone(), auth, Duration::from_secs(600), 4)
        .with_max_lifetime(Some(life));
    let tw = Arc::new(tw);
    let app = serve(&tw, true).await;
    let old = alice(&app);
    let t_old = std::time::Instant::now();
    old.adapter(1).await;
    std::thread::sleep(Duration::from_millis(1200));
    let young = Client { scope: "s2", ..old };
    let t_young = std::time::Instant::now();
    young.adapter(1).await;
    // Active and younger than the lifetime: both stay.
    assert_eq!(old.ok("heartbeat", json!({"adapter_name": "a"})).await["status"], "ok");
    assert_eq!(tw.sweep(), 0);
    std::thread::sleep(
        (t_old + life + Duration::from_millis(100))
            .saturating_duration_since(std::time::Instant::now()),
    );
    assert_eq!(old.ok("heartbeat", json!({"adapter_name": "a"})).await["status"], "ok");
    assert!(t_young.elapsed() < life, "the machine stalled; the test cannot tell the two apart");
    assert_eq!(tw.sweep(), 1);
    assert_eq!(old.call("heartbeat", json!({"adapter_name": "a"})).await.0, 404);
    assert_eq!(young.ok("heartbeat", json!({"adapter_name": "a"})).await["status"], "ok");
    assert_eq!(svc.info().adapters.len(), 1);
}
