//! Bounded resources of the Tinker API (issue #12, item 4), in process: session tags and
//! metadata caps, the per-key bound on pending futures and the per-key bound on sample requests
//! in flight (429 with Retry-After, the SDK backs off), each refusal naming its limit.

mod fake_http_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actix_web::{App, test, web};
use serde_json::{Value, json};
use twinkle::apps::server::limits::{
    MAX_PENDING_PER_KEY, MAX_SESSION_METADATA_BYTES, MAX_TAGS, SamplingSlots,
};
use twinkle::apps::server::upstream::Upstreams;
use twinkle::apps::server::{ServerApp, routes};
use twinkle::config::ServerType;
use twinkle::protocol::tinker::paths::owner_hash;
use twinkle::protocol::twinkle::Auth;
use twinkle::state::{LoraSettings, NewFuture, NewRun, NewSamplingSession, Store};

const SALT: &[u8] = b"test-salt";
/// Nothing listens there: no model application is ever found (calls fail at once).
const NO_HEAD: &str = "127.0.0.1:9";

fn server(root: &std::path::Path) -> web::Data<ServerApp> {
    web::Data::new(server_at(root, NO_HEAD))
}

fn server_at(root: &std::path::Path, head: &str) -> ServerApp {
    let auth = Auth { keys: None, salt: SALT.to_vec(), save_root: root.to_path_buf() };
    let up = Upstreams::new(head.into()).with_restart_wait(Duration::ZERO);
    ServerApp::new(Store::open_memory().unwrap(), up, auth)
}

fn run_of(key: &str, id: &str) -> NewRun {
    NewRun {
        id: id.into(),
        owner: owner_hash(SALT, key),
        session_id: "sess-1".into(),
        base_model: "qwen3-tiny".into(),
        lora: LoraSettings { rank: 4, ..LoraSettings::default() },
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
    assert!(r.headers().contains_key("retry-after"), "a 429 says when to retry");
    let body: Value = test::read_body_json(r).await;
    assert!(body["detail"].as_str().unwrap().contains(&MAX_PENDING_PER_KEY.to_string()), "{body}");
    let r = test::call_service(&svc, step("tml-b")).await;
    assert_eq!(r.status(), 200, "another key is not held back");
}

/// A loopback server answering every request with `f(request line)`.
fn serve(f: impl Fn(&str) -> Value + Send + Sync + 'static) -> String {
    fake_http_support::serve(move |line| Some(f(line)))
}

/// A fake model application for base model `m` whose `sample` calls are held (counted in
/// `arrived`) until `release` is set; and a fake head pointing at it.
fn held_model_app(arrived: Arc<AtomicUsize>, release: Arc<AtomicBool>) -> String {
    let app = serve(move |line| {
        if line.contains("/_internal/v1/info") {
            let info = twinkle::protocol::internal::InfoResponse {
                base_model: "m".into(),
                vocab_size: 100,
                max_length: 64,
                ..Default::default()
            };
            return serde_json::to_value(info).unwrap();
        }
        if line.contains("/_internal/v1/sample") {
            arrived.fetch_add(1, Ordering::SeqCst);
            while !release.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        json!({"sequences": []})
    });
    serve(move |_| {
        json!({"applications": [{"name": "model", "import_path": "model", "state": "running",
            "address": app}]})
    })
}

/// Sample requests are bounded per key while in flight: with a cap of 2 and the application
/// holding every sample, a key's third `asample` is a 429 with Retry-After naming the limit,
/// another key still samples, and once the held ones finish the key samples again.
#[actix_web::test]
async fn sample_requests_in_flight_are_bounded_per_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (arrived, release) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
    let head = held_model_app(arrived.clone(), release.clone());
    let mut app = server_at(tmp.path(), &head);
    app.sampling = SamplingSlots::new(2);
    let app = web::Data::new(app);
    for key in ["tml-a", "tml-b"] {
        let s = NewSamplingSession {
            id: format!("{key}:sample:0"),
            session_id: format!("{key}-sess"),
            owner: owner_hash(SALT, key),
            seq: 0,
            base_model: "m".into(),
            model_path: None,
        };
        app.disp.store.create_or_get_sampling_session(&s).unwrap();
    }
    let svc = test::init_service(
        App::new().configure(|c| routes(c, app.clone(), "/api/v1", ServerType::Tinker)),
    )
    .await;
    let sample = |key: &str| {
        let body = json!({"num_samples": 1, "sampling_session_id": format!("{key}:sample:0"),
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
            "sampling_params": {"max_tokens": 2}});
        test::TestRequest::post()
            .uri("/api/v1/asample")
            .insert_header(("X-API-Key", key.to_string()))
            .set_json(body)
            .to_request()
    };
    for _ in 0..2 {
        let r = test::call_service(&svc, sample("tml-a")).await;
        assert_eq!(r.status(), 200);
    }
    // Both reach the application and stay there.
    let t0 = Instant::now();
    while arrived.load(Ordering::SeqCst) < 2 {
        assert!(t0.elapsed() < Duration::from_secs(20), "the samples never reached the app");
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    let r = test::call_service(&svc, sample("tml-a")).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"), "a 429 says when to retry");
    let body: Value = test::read_body_json(r).await;
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("max_sampling_requests_per_key") && detail.contains('2'), "{body}");
    let r = test::call_service(&svc, sample("tml-b")).await;
    assert_eq!(r.status(), 200, "another key is not held back");

    // Released, the held requests finish and give their slots back.
    release.store(true, Ordering::SeqCst);
    let owner = owner_hash(SALT, "tml-a");
    let t0 = Instant::now();
    while app.sampling.in_flight(&owner) > 0 {
        assert!(t0.elapsed() < Duration::from_secs(20), "the held samples never finished");
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    let r = test::call_service(&svc, sample("tml-a")).await;
    assert_eq!(r.status(), 200);
}
