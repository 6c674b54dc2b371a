//! The sampler application's Twinkle-native layer in process: both envelopes, `new_input_feature`
//! aligned with the sampled logprobs, `sample_stream` NDJSON deltas adding up to the decoded text,
//! adapter_uri confined to the caller's own checkpoints, per-tenant templates, unsupported
//! sampling parameters as 400.

mod model_app_support;

use std::sync::Arc;

use actix_web::{App, test};
use model_app_support::*;
use serde_json::{Value, json};
use twinkle::apps::model::BaseModel;
use twinkle::apps::sampler::twinkle::TwinkleSampler;
use twinkle::apps::sampler::{SamplerApp, SamplerService};
use twinkle::apps::twinkle_http::routes;
use twinkle::protocol::twinkle::Auth;

fn post(uri: &str, token: &str, body: Value) -> actix_http::Request {
    test::TestRequest::post()
        .uri(uri)
        .insert_header(("Authorization", format!("Bearer {token}")))
        .insert_header(("X-Ray-Serve-Request-Id", "r1"))
        .set_json(body)
        .to_request()
}

#[actix_web::test]
async fn envelopes_stream_adapter_paths_and_templates() {
    let t = tempfile::tempdir().unwrap();
    let base = BaseModel::load("generate://qwen3-tiny", &tiny_model_dir(), None).unwrap();
    let svc: Arc<dyn SamplerApp> = Arc::new(SamplerService::new(base));
    let auth = Auth { keys: None, salt: b"salt".to_vec(), save_root: t.path().to_path_buf() };
    let tw = Arc::new(TwinkleSampler::new(svc, auth));
    let app = test::init_service(App::new().configure(|c| routes(c, tw.clone(), "/s", true))).await;
    let chat = json!([{"messages": [{"role": "user", "content": "hi"}]}]);
    let params = json!({"max_tokens": 5, "temperature": 0.0, "logprobs": 1, "num_samples": 2});

    // A Trajectory before set_template uses the model's own template (Template is the default).
    let v: Value = test::call_and_read_body_json(
        &app,
        post("/s/twinkle/sample", "a", json!({"inputs": chat, "sampling_params": params})),
    )
    .await;
    let seqs = v["samples"][0]["sequences"].as_array().unwrap();
    assert_eq!(seqs.len(), 2);
    let s = &seqs[0];
    let tokens: Vec<i64> =
        s["tokens"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    assert_eq!(tokens.len(), 5);
    assert_eq!(seqs[1]["tokens"], s["tokens"], "greedy samples differ");
    // logprobs: one [[token, lp]] per sampled token.
    for (i, lp) in s["logprobs"].as_array().unwrap().iter().enumerate() {
        assert_eq!(lp[0][0].as_i64().unwrap(), tokens[i]);
        assert!(lp[0][1].as_f64().unwrap() <= 0.0);
    }
    // new_input_feature: prompt + completion, completion labels rolled onto the positions before.
    let f = &s["new_input_feature"];
    let ids: Vec<i64> =
        f["input_ids"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    let labels: Vec<i64> =
        f["labels"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    let p = ids.len() - tokens.len();
    assert_eq!(&ids[p..], &tokens[..]);
    assert!(labels[..p - 1].iter().all(|&l| l == -100));
    assert_eq!(&labels[p - 1..ids.len() - 1], &tokens[..]);
    assert_eq!(labels[ids.len() - 1], -100);

    // sample_stream: NDJSON deltas, the last with the finish reason, adding up to `decoded`.
    let req =
        post("/s/twinkle/sample_stream", "a", json!({"inputs": chat, "sampling_params": params}));
    let resp = test::call_service(&app, req).await;
    assert_eq!(resp.status(), 200);
    let body = String::from_utf8(test::read_body(resp).await.to_vec()).unwrap();
    let lines: Vec<Value> = body.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let text: String = lines.iter().map(|l| l["delta"].as_str().unwrap()).collect();
    assert_eq!(text, s["decoded"].as_str().unwrap());
    assert_eq!(lines.last().unwrap()["finish_reason"], "length");

    // Gen-1: flat sequences across prompts, float logprobs, top-level num_samples.
    let v: Value = test::call_and_read_body_json(
        &app,
        post(
            "/s/sample",
            "a",
            json!({"inputs": [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}],
            "sampling_params": {"max_tokens": 3, "temperature": 0.0}, "num_samples": 2}),
        ),
    )
    .await;
    let flat = v["sequences"].as_array().unwrap();
    assert_eq!(flat.len(), 4);
    assert!(flat[0]["logprobs"][0].is_f64(), "{v}");

    // Per-tenant template settings: b's max_length cuts its prompt, a's does not.
    let set = |tok: &str, body: Value| post("/s/twinkle/set_template", tok, body);
    let ok: Value = test::call_and_read_body_json(
        &app,
        set("b", json!({"template_cls": "Template", "max_length": 3})),
    )
    .await;
    assert_eq!(ok, json!({"status": "ok"}));
    let prompt_len = |v: &Value| {
        let s = &v["samples"][0]["sequences"][0];
        s["new_input_feature"]["input_ids"].as_array().unwrap().len()
            - s["tokens"].as_array().unwrap().len()
    };
    let one = json!({"max_tokens": 1, "temperature": 0.0});
    let va: Value = test::call_and_read_body_json(
        &app,
        post("/s/twinkle/sample", "a", json!({"inputs": chat, "sampling_params": one})),
    )
    .await;
    let vb: Value = test::call_and_read_body_json(
        &app,
        post("/s/twinkle/sample", "b", json!({"inputs": chat, "sampling_params": one})),
    )
    .await;
    assert_eq!(prompt_len(&vb), 3);
    assert_eq!(prompt_len(&va), p);

    // 4xx: another tenant's or a malformed path, unsupported parameters, unknown template.
    for (body, status, needle) in [
        (
            json!({"inputs": chat, "adapter_uri": "twinkle://r1-x/weights/w"}),
            404,
            "no such checkpoint",
        ),
        (json!({"inputs": chat, "adapter_uri": "hf://Qwen/Qwen3"}), 400, "hub ids"),
        (
            json!({"inputs": chat, "sampling_params": {"repetition_penalty": 1.2}}),
            400,
            "repetition_penalty",
        ),
        (json!({"inputs": chat, "sampling_params": {"logprobs": 5}}), 400, "logprobs"),
        (json!({"inputs": [{"input_ids": [999999999]}]}), 400, "input_ids"),
        (json!({"inputs": []}), 400, "inputs"),
    ] {
        let resp = test::call_service(&app, post("/s/twinkle/sample", "a", body.clone())).await;
        assert_eq!(resp.status().as_u16(), status, "{body}");
        let v: Value = test::read_body_json(resp).await;
        assert!(v["detail"].as_str().unwrap().contains(needle), "{body}: {v}");
    }
    let resp =
        test::call_service(&app, set("a", json!({"template_cls": "MyPluginTemplate"}))).await;
    assert_eq!(resp.status(), 400);
}
