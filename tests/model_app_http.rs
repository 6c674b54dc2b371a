//! The model and sampler applications' internal HTTP routes: token check, status codes and
//! bodies, and `/healthz` answering while a long compute step runs.

mod model_app_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{App, HttpResponse, HttpServer, test, web};
use model_app_support::*;
use serde_json::{Value, json};
use twinkle::apps::model::BaseModel;
use twinkle::apps::model::http::{InternalToken, TOKEN_HEADER, routes};
use twinkle::apps::sampler::{self, SamplerService};

const TOKEN: &str = "s3cret";

#[actix_web::test]
async fn internal_routes_check_the_token_and_answer_json() {
    let t = tempfile::tempdir().unwrap();
    let svc = Arc::new(service(t.path()));
    let tok = InternalToken(TOKEN.into());
    let app =
        test::init_service(App::new().configure(move |cfg| routes(cfg, svc.clone(), tok.clone())))
            .await;

    for header in [None, Some("wrong")] {
        let mut req = test::TestRequest::get().uri("/_internal/v1/info");
        if let Some(h) = header {
            req = req.insert_header((TOKEN_HEADER, h));
        }
        let resp = test::call_service(&app, req.to_request()).await;
        assert_eq!(resp.status(), 403);
        let body: Value = test::read_body_json(resp).await;
        assert_eq!(body["category"], "user");
    }
    let get = |uri: &str| test::TestRequest::get().uri(uri).insert_header((TOKEN_HEADER, TOKEN));
    let post = |uri: &str, body: Value| {
        test::TestRequest::post().uri(uri).insert_header((TOKEN_HEADER, TOKEN)).set_json(body)
    };
    let info: Value =
        test::call_and_read_body_json(&app, get("/_internal/v1/info").to_request()).await;
    assert_eq!(info["vocab_size"], 151_936);
    assert_eq!(info["arch"], "qwen3");
    assert_eq!(info["model_name"], "qwen3-tiny");
    assert_eq!(info["max_rank"], 128);
    assert_eq!(info["eos_token_ids"], json!([151_645, 151_643]));

    let create = json!({"model_id": "s:train:0", "rank": 4, "train_attn": true, "train_mlp": true,
        "train_unembed": false, "seed": 3});
    let resp =
        test::call_service(&app, post("/_internal/v1/create_adapter", create.clone()).to_request())
            .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(test::read_body_json::<Value, _>(resp).await, json!({}));
    let resp =
        test::call_service(&app, post("/_internal/v1/create_adapter", create).to_request()).await;
    assert_eq!(resp.status(), 409);

    let fb = json!({"model_id": "s:train:0", "forward_only": false, "loss_fn": "cross_entropy",
        "data": [{"tokens": [1, 2, 3], "target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 0.0]}]});
    let out: Value = test::call_and_read_body_json(
        &app,
        post("/_internal/v1/forward_backward", fb).to_request(),
    )
    .await;
    assert_eq!(out["outputs"][0]["shape"], json!([3]));
    assert_eq!(out["outputs"][0]["logprobs"].as_array().unwrap().len(), 3);
    // Zero weight: no loss at the last position; loss:sum is the sum of the others.
    assert_eq!(out["outputs"][0]["elementwise_loss"][2], 0.0);
    let lps: Vec<f64> = out["outputs"][0]["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let sum = out["metrics"]["loss:sum"].as_f64().unwrap();
    assert!((sum + lps[0] + lps[1]).abs() < 1e-4, "{sum} {lps:?}");

    let step = json!({"model_id": "s:train:0", "adam_params": {"learning_rate": 1e-3}});
    let m: Value =
        test::call_and_read_body_json(&app, post("/_internal/v1/optim_step", step).to_request())
            .await;
    assert_eq!(m["metrics"]["step:max"], 1.0);

    let bad = json!({"model_id": "s:train:0", "loss_fn": "cross_entropy",
        "data": [{"tokens": [1, 2], "target_tokens": [2]}]});
    let resp =
        test::call_service(&app, post("/_internal/v1/forward_backward", bad).to_request()).await;
    assert_eq!(resp.status(), 400);
    let body: Value = test::read_body_json(resp).await;
    assert_eq!(body["category"], "user");
    assert!(body["detail"].as_str().unwrap().contains("target_tokens"), "{body}");
    let resp =
        test::call_service(&app, post("/_internal/v1/optim_step", json!({"nope": 1})).to_request())
            .await;
    assert_eq!(resp.status(), 400);

    let dir = t.path().join("ckpt/sampler_weights/a");
    let saved: Value = test::call_and_read_body_json(
        &app,
        post("/_internal/v1/save", json!({"model_id": "s:train:0", "dir": dir, "kind": "sampler"}))
            .to_request(),
    )
    .await;
    assert!(saved["size_bytes"].as_u64().unwrap() > 0);
    let sample = json!({"model_id": "s:train:0", "prompt": [1, 2, 3], "num_samples": 2, "max_tokens": 4,
        "temperature": 0.0, "top_k": -1, "top_p": 1.0, "stop": [], "prompt_logprobs": true});
    let s: Value = test::call_and_read_body_json(
        &app,
        post("/_internal/v1/sample", sample.clone()).to_request(),
    )
    .await;
    assert_eq!(s["sequences"].as_array().unwrap().len(), 2);
    assert_eq!(s["sequences"][0]["stop_reason"], "length");
    assert_eq!(s["prompt_logprobs"][0], Value::Null);
    assert!(s["prompt_logprobs"][1].is_number());

    // Optional fields forwarded as null take their defaults; a loss_config key the loss does not
    // take, or a text value, is refused by name rather than silently ignored.
    let nulls = json!({"prompt": [1, 2], "num_samples": null, "max_tokens": null, "temperature": null,
        "top_k": null, "top_p": null, "seed": 1, "stop": []});
    let s0: Value =
        test::call_and_read_body_json(&app, post("/_internal/v1/sample", nulls).to_request()).await;
    assert_eq!(s0["sequences"].as_array().unwrap().len(), 1);
    assert_eq!(s0["sequences"][0]["tokens"].as_array().unwrap().len(), 16);
    assert_eq!(s0["prompt_logprobs"], Value::Null);
    let fo = json!({"model_id": "s:train:0", "forward_only": true, "loss_fn": "ppo",
        "loss_config": {"clip_low_threshold": 0.9, "note": "x"},
        "data": [{"tokens": [1, 2], "target_tokens": [2, 3], "logprobs": [-1.0, -1.0], "advantages": [1.0, 0.5]}]});
    let resp =
        test::call_service(&app, post("/_internal/v1/forward_backward", fo.clone()).to_request())
            .await;
    assert_eq!(resp.status(), 400);
    let body: Value = test::read_body_json(resp).await;
    assert!(body["detail"].as_str().unwrap().contains("loss_config.note"), "{body}");
    let mut fo = fo;
    fo["loss_config"] = json!({"clip_low_threshold": 0.9});
    let resp =
        test::call_service(&app, post("/_internal/v1/forward_backward", fo).to_request()).await;
    assert_eq!(resp.status(), 200);

    // The sampler application: same greedy answer from the saved directory.
    let base = BaseModel::load("generate://qwen3-tiny", &tiny_model_dir(), None).unwrap();
    let sampler_svc = Arc::new(SamplerService::new(base));
    let tok = InternalToken(TOKEN.into());
    let sapp = test::init_service(
        App::new().configure(move |cfg| sampler::routes(cfg, sampler_svc.clone(), tok.clone())),
    )
    .await;
    let mut by_dir = sample.clone();
    by_dir.as_object_mut().unwrap().remove("model_id");
    by_dir["adapter_dir"] = json!(dir);
    let s2: Value =
        test::call_and_read_body_json(&sapp, post("/_internal/v1/sample", by_dir).to_request())
            .await;
    assert_eq!(s2, s);
    let resp =
        test::call_service(&sapp, post("/_internal/v1/create_adapter", json!({})).to_request())
            .await;
    assert_eq!(resp.status(), 404, "the sampler serves only info and sample");

    let resp = test::call_service(
        &app,
        post("/_internal/v1/unload", json!({"model_id": "s:train:0"})).to_request(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let resp = test::call_service(&app, post("/_internal/v1/sample", sample).to_request()).await;
    assert_eq!(resp.status(), 404);
    let body: Value = test::read_body_json(resp).await;
    assert_eq!(body["category"], "user");
}

#[actix_web::test]
async fn healthz_answers_during_a_long_step() {
    let t = tempfile::tempdir().unwrap();
    let svc = Arc::new(service(t.path()));
    svc.create_adapter(&create("a", 8, 1)).unwrap();
    let tok = InternalToken(TOKEN.into());
    // One HTTP worker: if compute ran on it, /healthz would wait for the step.
    let server = HttpServer::new(move || {
        App::new()
            .configure(|cfg| routes(cfg, svc.clone(), tok.clone()))
            .route("/healthz", web::get().to(|| async { HttpResponse::Ok().body("ok") }))
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.addrs()[0];
    let handle = server.run();
    let stop = handle.handle();
    actix_web::rt::spawn(handle);

    let client = awc::Client::builder().timeout(Duration::from_secs(120)).finish();
    let tokens: Vec<u32> = (0..384).map(|i| 100 + i).collect();
    let body = json!({"model_id": "a", "loss_fn": "cross_entropy",
        "data": [{"tokens": tokens, "target_tokens": tokens.iter().map(|t| t + 1).collect::<Vec<_>>()}]});
    let url = format!("http://{addr}/_internal/v1/forward_backward");
    let long = client.post(&url).insert_header((TOKEN_HEADER, TOKEN)).send_json(&body);
    let start = Instant::now();
    let long = actix_web::rt::spawn(async move {
        let r = long.await.map(|r| r.status().as_u16());
        (r, start.elapsed())
    });
    actix_web::rt::time::sleep(Duration::from_millis(150)).await;
    let h = client.get(format!("http://{addr}/healthz")).send().await.unwrap();
    let health_at = start.elapsed();
    assert_eq!(h.status(), 200);
    let (status, long_took) = long.await.unwrap();
    assert_eq!(status.unwrap(), 200);
    assert!(health_at < long_took, "healthz at {health_at:?}, step done at {long_took:?}");
    stop.stop(false).await;
}
