//! The processor application over HTTP, in process: the Gen-2 (`/api/v1/processor/twinkle/*`) and
//! Gen-1 (`/processors/*`) routes through the recorded client flow — create Dataset →
//! set_template (`generate://qwen3-tiny`) → map(SelfCognitionProcessor) → encode → DataLoader →
//! `__iter__` → `__next__` until 410 — plus auth, tenancy, heartbeats and error bodies.

use std::sync::Arc;

use actix_web::{App, test};
use serde_json::{Value, json};
use twinkle::apps::processor::{Limits, ProcessorApp, Registry, routes};
use twinkle::protocol::twinkle::Auth;
use twinkle::protocol::twinkle::wire::{Input, inputs};

fn rows_file(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("self_cognition.jsonl");
    let text: String = (0..10)
        .map(|i| {
            json!({"query": format!("Who are you? ({i})"),
                "response": "I am {{NAME}}, trained by {{AUTHOR}}.", "tag": "en"})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&p, text).unwrap();
    p
}

fn meta(path: &std::path::Path, stop: usize) -> String {
    json!({"dataset_id": path.to_str().unwrap(), "data": null,
        "data_slice": {"_slice_type_": "range", "start": 0, "stop": stop, "step": 1},
        "split": "train", "subset_name": "default", "_TWINKLE_TYPE_": "DatasetMeta"})
    .to_string()
}

#[actix_web::test]
async fn processor_flow_over_both_route_generations() {
    let t = tempfile::tempdir().unwrap();
    // The data root is this test's own temp dir, with TWINKLE_HOME inside it (so the private
    // directory check is reached) and the repository certainly outside it (a checkout may
    // itself live under /tmp, so the system temp dir cannot be the root).
    let home = t.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    // SAFETY: the only test in this binary; no other thread reads the environment concurrently.
    unsafe { std::env::set_var("TWINKLE_HOME", &home) };
    let data = rows_file(t.path());
    let auth = Auth { keys: None, salt: b"test-salt".to_vec(), save_root: t.path().join("save") };
    let app = Arc::new(ProcessorApp {
        auth,
        registry: Arc::new(Registry::new(Limits {
            // The dataset lives in the temp dir: the data root (TWINKLE_DATA_DIR in the application).
            data_root: Some(t.path().to_path_buf()),
            ..Limits::default()
        })),
    });
    let (a2, a1) = (app.clone(), app.clone());
    let svc = test::init_service(App::new().configure(move |cfg| {
        routes(cfg, a2.clone(), "/api/v1/processor");
        routes(cfg, a1.clone(), "/processors");
    }))
    .await;
    let post = |uri: &str, token: Option<&str>, body: Value| {
        let mut r = test::TestRequest::post().uri(uri).set_json(body);
        if let Some(tok) = token {
            r = r
                .insert_header(("Authorization", format!("Bearer {tok}")))
                .insert_header(("Twinkle-Authorization", format!("Bearer {tok}")));
        }
        r.to_request()
    };
    macro_rules! send {
        ($uri:expr, $tok:expr, $body:expr) => {{
            let resp = test::call_service(&svc, post($uri, $tok, $body)).await;
            let status = resp.status().as_u16();
            let body: Value = test::read_body_json(resp).await;
            (status, body)
        }};
    }
    const G2: &str = "/api/v1/processor/twinkle";
    let tok = Some("EMPTY_TOKEN");

    // Gen-2: the recorded twinkle-kit 0.5.1 calls.
    let (s, b) = send!(
        &format!("{G2}/create"),
        tok,
        json!({"processor_type": "dataset",
        "class_type": "Dataset", "dataset_meta": meta(&data, 10)})
    );
    assert_eq!(s, 200, "{b}");
    let ds = b["processor_id"].as_str().unwrap().to_string();
    // Files outside the data root, or inside TWINKLE_HOME (inside the root here), are refused.
    let private = rows_file(&home);
    for (path, needle) in [
        (private, "private"),
        (
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("assets/tokenizer/qwen3/tokenizer_config.json"),
            "outside",
        ),
    ] {
        let (s, b) = send!(
            &format!("{G2}/create"),
            tok,
            json!({"processor_type": "dataset", "class_type": "Dataset", "dataset_meta": meta(&path, 10)})
        );
        assert_eq!(s, 400, "{b}");
        assert!(b["detail"].as_str().unwrap().contains(needle), "{b}");
    }
    assert!(ds.starts_with("pid:") && ds.len() == 36);
    let call = |f: &str, extra: Value| {
        let mut body = json!({"processor_id": ds, "function": f});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let (s, b) = send!(
        &format!("{G2}/call"),
        tok,
        call(
            "set_template",
            json!({
        "template_func": "Template", "model_id": "generate://qwen3-tiny", "max_length": 512})
        )
    );
    assert_eq!((s, b), (200, json!({"result": null})));
    let (s, b) = send!(
        &format!("{G2}/call"),
        tok,
        call(
            "map",
            json!({
        "preprocess_func": "SelfCognitionProcessor", "dataset_meta": null,
        "init_args": {"model_name": "Twinkly", "model_author": "ModelScope"}})
        )
    );
    assert_eq!((s, &b), (200, &json!({"result": null})));
    let (_, b) = send!(&format!("{G2}/call"), tok, call("__getitem__", json!({"idx": 0})));
    assert_eq!(b["result"]["messages"][2]["content"], "I am Twinkly, trained by ModelScope.");
    let (s, _) = send!(
        &format!("{G2}/call"),
        tok,
        call(
            "encode",
            json!({
        "add_generation_prompt": false, "batched": true})
        )
    );
    assert_eq!(s, 200);
    let (_, b) = send!(&format!("{G2}/call"), tok, call("__len__", json!({})));
    assert_eq!(b, json!({"result": 10}));

    // Tenancy and auth.
    let (s, b) = send!(&format!("{G2}/call"), Some("other"), call("__len__", json!({})));
    assert_eq!(s, 404);
    assert!(b["detail"].as_str().unwrap().contains(&ds), "{b}");
    let (s, b) = send!(&format!("{G2}/call"), None, call("__len__", json!({})));
    assert_eq!(s, 401, "{b}");
    let (s, b) = send!(
        &format!("{G2}/create"),
        tok,
        json!({"processor_type": "template",
        "class_type": "Qwen3_5Template"})
    );
    assert_eq!(s, 400);
    assert!(b["detail"].as_str().unwrap().starts_with(
        "template.Qwen3_5Template is not available on this server; available: dataset.Dataset"
    ));
    let bad = test::TestRequest::post()
        .uri(&format!("{G2}/call"))
        .insert_header(("Authorization", "Bearer EMPTY_TOKEN"))
        .insert_header(("Content-Type", "application/json"))
        .set_payload("{not json")
        .to_request();
    let resp = test::call_service(&svc, bad).await;
    assert_eq!(resp.status(), 400);
    let b: Value = test::read_body_json(resp).await;
    assert!(b["detail"].as_str().unwrap().contains("bad JSON"));

    // DataLoader over the encoded dataset: 4 + 4 + 2, then 410.
    let (s, b) = send!(
        &format!("{G2}/create"),
        tok,
        json!({"processor_type": "dataloader",
        "class_type": "DataLoader", "dataset": ds, "batch_size": 4})
    );
    assert_eq!(s, 200, "{b}");
    let dl = b["processor_id"].as_str().unwrap().to_string();
    let dl_call = |f: &str| json!({"processor_id": dl, "function": f});
    let (_, b) = send!(&format!("{G2}/call"), tok, dl_call("__len__"));
    assert_eq!(b, json!({"result": 3}));
    let (s, b) = send!(&format!("{G2}/call"), tok, dl_call("__iter__"));
    assert_eq!((s, b), (200, json!({"result": "ok"})));
    let mut sizes = Vec::new();
    loop {
        let (s, b) = send!(&format!("{G2}/call"), tok, dl_call("__next__"));
        if s == 410 {
            assert!(b["detail"].as_str().unwrap().contains("exhausted"), "{b}");
            break;
        }
        assert_eq!(s, 200, "{b}");
        // What the client passes straight to model.forward_backward.
        let batch = inputs(&b["result"]).unwrap();
        for item in &batch {
            let Input::Feature(f) = item else { panic!("not an InputFeature: {item:?}") };
            let labels = f.labels.as_ref().unwrap();
            assert_eq!(labels.len(), f.input_ids.len());
            assert!(labels.iter().any(|&l| l != -100));
        }
        sizes.push(batch.len());
        assert!(sizes.len() <= 3);
    }
    assert_eq!(sizes, vec![4, 4, 2]);
    let (_, b) = send!(&format!("{G2}/call"), tok, dl_call("get_state"));
    assert_eq!(b["result"]["consumed_train_samples"], 10);

    // Gen-1: the recorded twinkle-kit 0.1.3 calls under /processors, and its heartbeat with
    // `pid:`-prefixed ids (renewing both processors; the bare form works too).
    let (s, b) = send!(
        "/processors/create",
        tok,
        json!({"processor_type": "dataset",
        "class_type": "Dataset", "dataset_meta": meta(&data, 3)})
    );
    assert_eq!(s, 200, "{b}");
    let ds1 = b["processor_id"].as_str().unwrap().to_string();
    let (s, b) = send!(
        "/processors/call",
        tok,
        json!({"processor_id": ds1, "function": "map",
        "preprocess_func": "SelfCognitionProcessor", "dataset_meta": null,
        "init_args": {"model_name": "a", "model_author": "b"}})
    );
    assert_eq!((s, b), (200, json!({"result": null})));
    let (s, b) = send!(
        "/processors/create",
        tok,
        json!({"processor_type": "dataloader",
        "class_type": "DataLoader", "dataset": ds1, "batch_size": 4})
    );
    assert_eq!(s, 200);
    let dl1 = b["processor_id"].as_str().unwrap().to_string();
    let hb = format!("{ds1},{}", dl1.trim_start_matches("pid:"));
    let (s, b) = send!("/processors/heartbeat", tok, json!({"processor_id": hb}));
    assert_eq!((s, b), (200, json!({"status": "ok"})));
    let (s, _) = send!(&format!("{G2}/heartbeat"), tok, json!({"processor_id": dl1}));
    assert_eq!(s, 200);
    let (s, _) =
        send!("/processors/call", tok, json!({"processor_id": dl1, "function": "__iter__"}));
    assert_eq!(s, 200);
    let (s, b) =
        send!("/processors/call", tok, json!({"processor_id": dl1, "function": "__next__"}));
    assert_eq!(s, 200);
    assert_eq!(b["result"].as_array().unwrap().len(), 3);
    assert_eq!(b["result"][0]["messages"][2]["content"], "I am a, trained by b.");
    let (s, _) =
        send!("/processors/call", tok, json!({"processor_id": dl1, "function": "__next__"}));
    assert_eq!(s, 410);
    let (s, b) = send!("/processors/heartbeat", tok, json!({"processor_id": "pid:deadbeef"}));
    assert_eq!(s, 404);
    assert!(b["detail"].as_str().unwrap().contains("pid:deadbeef"));
}
