//! Bounded resources of the Tinker API (issue #12, item 4), in process: session tags and
//! metadata caps, the per-key bound on pending futures (429, the SDK backs off), each refusal
//! naming its limit.

use std::sync::Arc;

use actix_web::{App, test, web};
use serde_json::{Value, json};
use twinkle::apps::server::limits::{MAX_PENDING_PER_KEY, MAX_SESSION_METADATA_BYTES, MAX_TAGS};
use twinkle::apps::server::upstream::Upstreams;
use twinkle::apps::server::{ServerApp, routes};
use twinkle::config::ServerType;
use twinkle::protocol::tinker::paths::owner_hash;
use twinkle::protocol::twinkle::Auth;
use twinkle::state::{LoraSettings, NewFuture, NewRun, Store};

const SALT: &[u8] = b"test-salt";
/// Nothing listens there: no model application is ever found (calls fail at once).
const NO_HEAD: &str = "127.0.0.1:9";

fn server(root: &std::path::Path) -> web::Data<ServerApp> {
    let auth = Auth { keys: None, salt: SALT.to_vec(), save_root: root.to_path_buf() };
    let up = Upstreams::new(NO_HEAD.into()).with_restart_wait(std::time::Duration::ZERO);
    web::Data::new(ServerApp::new(Store::open_memory().unwrap(), up, auth))
}

fn run_of(key: &str, id: &str) -> NewRun {
    NewRun {
        id: id.into(),
        owner: owner_hash(SALT, key),
        session_id: "sess-1".into(),
        base_model: "qwen3-tiny".into(),
        lora: LoraSettings {
            rank: 4,
            seed: None,
            train_unembed: true,
            train_mlp: true,
            train_attn: true,
        },
        optimizer_config: Value::Null,
        user_metadata: json!({}),
    }
}

#[actix_web::test]
async fn sessions_and_pending_work_are_bounded_per_key() {
    let tmp = tempfile::tempdir().unwrap();
    let app = server(tmp.path());
    let store: Arc<Store> = app.disp.store.clone();
    let svc = test::init_service(
        App::new().configure(|c| routes(c, app.clone(), "/api/v1", ServerType::Tinker)),
    )
    .await;
    let post = |key: &str, path: &str, body: Value| {
        test::TestRequest::post()
            .uri(&format!("/api/v1/{path}"))
            .insert_header(("X-API-Key", key.to_string()))
            .set_json(body)
            .to_request()
    };

    // Session tags and metadata.
    let tags: Vec<String> = (0..=MAX_TAGS).map(|i| format!("t{i}")).collect();
    let r = test::call_service(&svc, post("tml-a", "create_session", json!({"tags": tags}))).await;
    assert_eq!(r.status(), 400);
    let body: Value = test::read_body_json(r).await;
    assert!(body["detail"].as_str().unwrap().contains(&MAX_TAGS.to_string()), "{body}");
    let big = json!({"user_metadata": {"blob": "x".repeat(MAX_SESSION_METADATA_BYTES)}});
    let r = test::call_service(&svc, post("tml-a", "create_session", big)).await;
    assert_eq!(r.status(), 400);
    let body: Value = test::read_body_json(r).await;
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains(&MAX_SESSION_METADATA_BYTES.to_string()), "{body}");
    let ok = json!({"tags": ["a", "b"], "user_metadata": {"k": "v"}});
    let r = test::call_service(&svc, post("tml-a", "create_session", ok)).await;
    assert_eq!(r.status(), 200);

    // Pending futures: key a has the maximum queued, key b has none.
    for key in ["tml-a", "tml-b"] {
        store.insert_run(&run_of(key, &format!("{key}:train:0"))).unwrap();
    }
    for i in 0..MAX_PENDING_PER_KEY {
        store
            .create_future(&NewFuture {
                request_id: format!("req-{i}"),
                owner: owner_hash(SALT, "tml-a"),
                model_id: Some("tml-a:train:0".into()),
                seq_id: None,
                kind: "forward_backward".into(),
                sample_sequence_ids: None,
            })
            .unwrap();
    }
    let step = |key: &str| post(key, "optim_step", json!({"model_id": format!("{key}:train:0")}));
    let r = test::call_service(&svc, step("tml-a")).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    let body: Value = test::read_body_json(r).await;
    assert!(body["detail"].as_str().unwrap().contains(&MAX_PENDING_PER_KEY.to_string()), "{body}");
    let r = test::call_service(&svc, step("tml-b")).await;
    assert_eq!(r.status(), 200, "another key is not held back");
}
