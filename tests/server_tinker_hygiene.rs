//! Protocol hygiene of the server application's Tinker routes, in process: every error is JSON
//! that names the field, unknown futures answer 410 (retryable) rather than 404, and
//! `save_weights_for_sampler` / `sessions/{id}/finish` refuse what the SDK never sends.

use std::collections::HashSet;

use actix_web::dev::ServiceResponse;
use actix_web::{App, test, web};
use serde_json::{Value, json};
use twinkle::apps::server::upstream::Upstreams;
use twinkle::apps::server::{ServerApp, routes};
use twinkle::config::ServerType;
use twinkle::protocol::twinkle::Auth;
use twinkle::state::{NewFuture, Store};

/// Nothing listens there: upstream discovery fails fast.
const NO_HEAD: &str = "127.0.0.1:9";
const KEY: &str = "tml-hygiene";

fn app(root: &std::path::Path) -> ServerApp {
    let auth = Auth { keys: None::<HashSet<String>>, salt: b"s".to_vec(), save_root: root.into() };
    let store = Store::open_memory().unwrap();
    // A future that a restart cut short (file persistence keeps it, failed).
    let owner = twinkle::protocol::tinker::paths::owner_hash(b"s", KEY);
    store
        .create_future(&NewFuture {
            request_id: "req-cut".into(),
            owner,
            model_id: None,
            seq_id: None,
            kind: "sample".into(),
            sample_sequence_ids: None,
        })
        .unwrap();
    assert_eq!(store.fail_unfinished_on_startup().unwrap(), 1);
    ServerApp::new(store, Upstreams::new(NO_HEAD.into()), auth)
}

async fn read<B: actix_web::body::MessageBody>(resp: ServiceResponse<B>) -> (u16, String, Value) {
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = test::read_body(resp).await;
    (status, ct, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn post(uri: &str, body: impl Into<Vec<u8>>) -> test::TestRequest {
    test::TestRequest::post()
        .uri(uri)
        .insert_header(("x-api-key", KEY))
        .insert_header(("content-type", "application/json"))
        .set_payload(body.into())
}

fn detail(v: &Value) -> &str {
    v["detail"].as_str().unwrap_or_default()
}

#[actix_web::test]
async fn tinker_errors_are_json_name_the_field_and_unknown_futures_are_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let data = web::Data::new(app(tmp.path()));
    let svc = test::init_service(
        App::new()
            .wrap(twinkle::worker::json_errors::middleware())
            .configure(move |cfg| routes(cfg, data.clone(), "/api/v1", ServerType::Tinker)),
    )
    .await;

    // An unknown (lost or pruned) future: 410, which the SDK retries; never a fatal 404.
    let req = post("/api/v1/retrieve_future", json!({"request_id": "req-nope"}).to_string());
    let (status, ct, v) = read(test::call_service(&svc, req.to_request()).await).await;
    assert_eq!((status, ct.as_str()), (410, "application/json"), "{v}");
    assert_eq!(v["request_id"], "req-nope");
    // So is one whose server application restarted before it finished.
    let req = post("/api/v1/retrieve_future", json!({"request_id": "req-cut"}).to_string());
    let (status, _, v) = read(test::call_service(&svc, req.to_request()).await).await;
    assert_eq!(status, 410, "{v}");

    // A wrong type names the field, not only serde's line and column.
    let req = post("/api/v1/retrieve_future", json!({"request_id": 5}).to_string());
    let (status, _, v) = read(test::call_service(&svc, req.to_request()).await).await;
    assert_eq!(status, 400, "{v}");
    assert!(detail(&v).contains("`request_id`"), "{v}");

    // save_weights_for_sampler: an unknown kind is refused before anything else.
    let body = json!({"model_id": "m", "sampling_session_seq_id": 1, "kind": "bogus"});
    let req = post("/api/v1/save_weights_for_sampler", body.to_string());
    let (status, _, v) = read(test::call_service(&svc, req.to_request()).await).await;
    assert_eq!(status, 400, "{v}");
    assert!(detail(&v).contains("kind"), "{v}");

    // sessions/{id}/finish: garbage is refused, a reason the SDK never sends too.
    for body in ["not json", "[1,2]", r#"{"reason": "x"}"#, r#"{"reason": {"type": "nope"}}"#] {
        let req = post("/api/v1/sessions/s-1/finish", body);
        let (status, ct, v) = read(test::call_service(&svc, req.to_request()).await).await;
        assert_eq!((status, ct.as_str()), (400, "application/json"), "{body}: {v}");
        assert!(!detail(&v).is_empty(), "{body}: {v}");
    }

    // A query string error is JSON too (actix's own answer is plain text).
    let req = test::TestRequest::get()
        .uri("/api/v1/training_runs?limit=lots")
        .insert_header(("x-api-key", KEY));
    let (status, ct, v) = read(test::call_service(&svc, req.to_request()).await).await;
    assert_eq!((status, ct.as_str()), (400, "application/json"), "{v}");
    assert!(!detail(&v).is_empty(), "{v}");

    // A body over the limit: 413 JSON.
    let req = post("/api/v1/retrieve_future", vec![b' '; (64 << 20) + 1]);
    let (status, ct, v) = read(test::call_service(&svc, req.to_request()).await).await;
    assert_eq!((status, ct.as_str()), (413, "application/json"), "{v}");
}
