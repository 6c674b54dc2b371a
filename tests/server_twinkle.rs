//! The server application's Twinkle-native routes, in process: Gen-2 sessions and heartbeats,
//! run and checkpoint listings over on-disk metadata (owner isolation, cursor, 404/400), bearer
//! authentication, and which routes each `server_type` mounts.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use actix_web::dev::ServiceResponse;
use actix_web::{App, test, web};
use serde_json::{Value, json};
use twinkle::apps::server::upstream::Upstreams;
use twinkle::apps::server::{ServerApp, routes};
use twinkle::config::ServerType;
use twinkle::protocol::tinker::paths::{CheckpointKind, owner_hash};
use twinkle::protocol::twinkle::Auth;
use twinkle::protocol::twinkle::TwinklePath;
use twinkle::protocol::twinkle::runs::{RunMeta, record_checkpoint, write_run};
use twinkle::state::Store;

const SALT: &[u8] = b"test-salt";
/// Nothing listens there: upstream discovery fails fast and lists no model application.
const NO_HEAD: &str = "127.0.0.1:9";

struct Setup {
    _tmp: tempfile::TempDir,
    root: std::path::PathBuf,
    clock: Arc<AtomicI64>,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    Setup { _tmp: tmp, root, clock: Arc::new(AtomicI64::new(1_000_000)) }
}

impl Setup {
    fn app(&self, keys: Option<&[&str]>) -> ServerApp {
        let auth = Auth {
            keys: keys.map(|k| k.iter().map(|s| s.to_string()).collect::<HashSet<_>>()),
            salt: SALT.to_vec(),
            save_root: self.root.clone(),
        };
        let clock = self.clock.clone();
        let store = Store::open_memory()
            .unwrap()
            .with_clock(Arc::new(move || clock.load(Ordering::SeqCst)));
        let mut app = ServerApp::new(store, Upstreams::new(NO_HEAD.into()), auth);
        app.supported_models = vec!["Qwen/Qwen3-0.6B".into()];
        app.twinkle.session_timeout = Duration::from_secs(60);
        app
    }

    /// Writes run `id` of `token` with checkpoints `weights/<name>` for each name.
    fn run(&self, token: &str, id: &str, when: &str, ckpts: &[&str]) {
        let owner = owner_hash(SALT, token);
        let dir = self.root.join(&owner).join(id);
        let mut meta = RunMeta::new_lora(id, "Qwen/Qwen3-0.6B", &owner, 8);
        meta.last_request_time = Some(when.into());
        write_run(&dir, &meta).unwrap();
        for name in ckpts {
            let p = TwinklePath::new(id, CheckpointKind::Weights, name).unwrap();
            let ck = dir.join("weights").join(name);
            std::fs::create_dir_all(&ck).unwrap();
            std::fs::write(ck.join("adapter_model.safetensors"), [0u8; 10]).unwrap();
            record_checkpoint(&dir, &p, &ck, &mut meta).unwrap();
        }
        meta.last_request_time = Some(when.into());
        write_run(&dir, &meta).unwrap();
    }
}

/// The server routes in process (a macro: the service type cannot be named here).
macro_rules! service {
    ($app:expr, $prefix:expr, $server_type:expr) => {{
        let data = web::Data::new($app);
        let prefix: String = $prefix.to_string();
        let server_type: ServerType = $server_type;
        async move {
            test::init_service(
                App::new().configure(move |cfg| routes(cfg, data.clone(), &prefix, server_type)),
            )
            .await
        }
    }};
}

/// Sends a [`test::TestRequest`]; resolves to the status and the JSON body (`null` if none).
macro_rules! call {
    ($svc:expr, $req:expr) => {{
        let req: test::TestRequest = $req;
        async { read(test::call_service($svc, req.to_request()).await).await }
    }};
}

async fn read(resp: ServiceResponse) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body = test::read_body(resp).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// The `key` string of every object in the list `body[list]`.
fn each_str<'a>(body: &'a Value, list: &str, key: &str) -> Vec<&'a str> {
    body[list].as_array().unwrap().iter().map(|r| r[key].as_str().unwrap()).collect()
}

fn bearer(req: test::TestRequest, token: &str) -> test::TestRequest {
    req.insert_header(("Twinkle-Authorization", format!("Bearer {token}")))
        .insert_header(("Authorization", format!("Bearer {token}")))
}

fn get(uri: &str, token: &str) -> test::TestRequest {
    bearer(test::TestRequest::get().uri(uri), token)
}

fn post(uri: &str, token: &str, body: Value) -> test::TestRequest {
    bearer(test::TestRequest::post().uri(uri), token).set_json(body)
}

fn delete(uri: &str, token: &str) -> test::TestRequest {
    bearer(test::TestRequest::delete().uri(uri), token)
}

#[actix_web::test]
async fn sessions_heartbeat_expire_and_are_owner_scoped() {
    let s = setup();
    let svc = service!(s.app(None), "/api/v1", ServerType::Tinker).await;
    let (code, body) = call!(
        &svc,
        post("/api/v1/twinkle/create_session", "EMPTY_TOKEN", json!({"metadata": null}))
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let id = body["session_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("session_") && id.len() == 8 + 32, "{id}");
    assert!(id[8..].chars().all(|c| c.is_ascii_hexdigit()), "{id}");

    let hb = |tok: &str, sid: &str| {
        post("/api/v1/twinkle/session_heartbeat", tok, json!({"session_id": sid}))
    };
    assert_eq!(call!(&svc, hb("EMPTY_TOKEN", &id)).await, (200, json!({})));
    let (code, body) = call!(&svc, hb("other", &id)).await;
    assert_eq!(code, 404, "another owner's session: {body}");
    assert!(body["detail"].is_string());
    assert_eq!(call!(&svc, hb("EMPTY_TOKEN", "session_nope")).await.0, 404);

    // 59 s later it is alive; 61 s after that beat it has expired for good.
    s.clock.fetch_add(59_000, Ordering::SeqCst);
    assert_eq!(call!(&svc, hb("EMPTY_TOKEN", &id)).await.0, 200);
    s.clock.fetch_add(61_000, Ordering::SeqCst);
    assert_eq!(call!(&svc, hb("EMPTY_TOKEN", &id)).await.0, 404);
    assert_eq!(call!(&svc, hb("EMPTY_TOKEN", &id)).await.0, 404);

    // Bad bodies are 400 with a detail.
    let (code, body) = call!(&svc, post("/api/v1/twinkle/session_heartbeat", "t", json!({}))).await;
    assert_eq!(code, 400, "{body}");
}

#[actix_web::test]
async fn server_information_routes() {
    let s = setup();
    let svc = service!(s.app(None), "/api/v1", ServerType::Tinker).await;
    let resp = test::call_service(
        &svc,
        test::TestRequest::get().uri("/api/v1/twinkle/healthz").to_request(),
    )
    .await;
    assert_eq!(resp.status(), 200, "healthz needs no token");
    assert_eq!(test::read_body_json::<Value, _>(resp).await, json!({"status": "ok"}));
    assert_eq!(
        call!(&svc, get("/api/v1/twinkle/get_server_capabilities", "t")).await,
        (200, json!({"supported_models": [{"model_name": "Qwen/Qwen3-0.6B"}]}))
    );
    assert_eq!(
        call!(&svc, get("/api/v1/twinkle/capacity_info", "t")).await,
        (200, json!({"max_loras": 0, "used_loras": 0, "free_loras": 0}))
    );
    s.run("t", "r1", "2026-01-01T00:00:00.000Z", &[]);
    let (code, body) = call!(&svc, get("/api/v1/twinkle/status", "t")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["resources"]["training_runs"], 1);
    assert_eq!(body["cleanup"]["expiration_timeout"], 60.0);
    let (code, body) = call!(&svc, get("/api/v1/twinkle/no_such_op", "t")).await;
    assert_eq!(code, 404);
    assert!(body["detail"].is_string());
}

#[actix_web::test]
async fn runs_are_listed_per_owner_with_a_cursor() {
    let s = setup();
    for i in 0..3 {
        s.run("alice", &format!("a{i}-default"), &format!("2026-01-0{}T00:00:00.000Z", i + 1), &[]);
    }
    s.run("bob", "b0-default", "2026-02-01T00:00:00.000Z", &[]);
    let svc = service!(s.app(None), "/api/v1", ServerType::Tinker).await;

    let (code, body) =
        call!(&svc, get("/api/v1/twinkle/training_runs?limit=2&offset=0", "alice")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["cursor"], json!({"limit": 2, "offset": 0, "total_count": 3}));
    let ids = each_str(&body, "training_runs", "training_run_id");
    assert_eq!(ids, ["a2-default", "a1-default"], "most recent first");
    assert_eq!(body["training_runs"][0]["model_owner"], owner_hash(SALT, "alice"));
    assert_ne!(body["training_runs"][0]["model_owner"], "alice");
    let (_, body) =
        call!(&svc, get("/api/v1/twinkle/training_runs?limit=2&offset=2", "alice")).await;
    assert_eq!(body["training_runs"].as_array().unwrap().len(), 1);
    assert_eq!(body["cursor"]["total_count"], 3);

    let (_, body) = call!(&svc, get("/api/v1/twinkle/training_runs", "bob")).await;
    assert_eq!(body["cursor"], json!({"limit": 20, "offset": 0, "total_count": 1}));
    assert_eq!(body["training_runs"][0]["training_run_id"], "b0-default");
    let (_, body) = call!(&svc, get("/api/v1/twinkle/training_runs", "carol")).await;
    assert_eq!(body["training_runs"], json!([]));
    assert_eq!(call!(&svc, get("/api/v1/twinkle/training_runs?limit=x", "bob")).await.0, 400);

    let (code, run) = call!(&svc, get("/api/v1/twinkle/training_runs/b0-default", "bob")).await;
    assert_eq!(code, 200);
    assert_eq!(
        (run["base_model"].as_str(), run["lora_rank"].as_u64()),
        (Some("Qwen/Qwen3-0.6B"), Some(8))
    );
    let (code, body) = call!(&svc, get("/api/v1/twinkle/training_runs/b0-default", "alice")).await;
    assert_eq!(code, 404, "another owner's run: {body}");
    assert_eq!(call!(&svc, get("/api/v1/twinkle/training_runs/nope", "bob")).await.0, 404);
}

#[actix_web::test]
async fn checkpoints_list_delete_path_and_weights_info() {
    let s = setup();
    s.run("alice", "s1-default", "2026-01-01T00:00:00.000Z", &["ep0", "ep1"]);
    let svc = service!(s.app(None), "/api/v1", ServerType::Tinker).await;
    let base = "/api/v1/twinkle";

    let (code, body) =
        call!(&svc, get(&format!("{base}/training_runs/s1-default/checkpoints"), "alice")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["cursor"], Value::Null);
    let ids = each_str(&body, "checkpoints", "checkpoint_id");
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&"weights/ep0") && ids.contains(&"weights/ep1"), "{ids:?}");
    assert_eq!(body["checkpoints"][0]["checkpoint_type"], "training");
    assert_eq!(
        call!(&svc, get(&format!("{base}/training_runs/s1-default/checkpoints"), "bob")).await.0,
        404
    );

    let (code, body) =
        call!(&svc, get(&format!("{base}/checkpoint_path/s1-default/weights/ep0"), "alice")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["twinkle_path"], "twinkle://s1-default/weights/ep0");
    assert_eq!(body["path"], "twinkle://s1-default/weights/ep0");
    // An unknown checkpoint, another owner's, and a kind that is not one.
    for (ckpt, token, want) in
        [("weights/ep9", "alice", 404), ("weights/ep0", "bob", 404), ("other/ep0", "alice", 400)]
    {
        let url = format!("{base}/checkpoint_path/s1-default/{ckpt}");
        assert_eq!(call!(&svc, get(&url, token)).await.0, want, "{url} as {token}");
    }

    let wi = |path: &str, tok: &str| {
        post(&format!("{base}/weights_info"), tok, json!({"twinkle_path": path}))
    };
    let (code, body) = call!(&svc, wi("twinkle://s1-default/weights/ep0", "alice")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body,
        json!({"training_run_id": "s1-default", "base_model": "Qwen/Qwen3-0.6B",
               "model_owner": owner_hash(SALT, "alice"), "is_lora": true, "lora_rank": 8})
    );
    for bad in ["ms://Qwen/Qwen3-0.6B", "twinkle://../x", "/etc/passwd"] {
        let (code, body) = call!(&svc, wi(bad, "alice")).await;
        assert_eq!(code, 400, "{bad}: {body}");
        assert!(body["detail"].as_str().unwrap().contains("twinkle_path"), "{body}");
    }
    assert_eq!(call!(&svc, wi("twinkle://s1-default/weights/ep0", "bob")).await.0, 404);

    // Delete: another owner cannot, traversal is refused, the owner can, once.
    let del = |ck: &str, tok: &str| {
        delete(&format!("{base}/training_runs/s1-default/checkpoints/{ck}"), tok)
    };
    assert_eq!(call!(&svc, del("weights/ep0", "bob")).await.0, 404);
    assert_eq!(call!(&svc, del("weights/..", "alice")).await.0, 400);
    let (code, body) = call!(&svc, del("weights/ep0", "alice")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["success"], true);
    assert!(body["message"].as_str().unwrap().contains("weights/ep0"));
    assert_eq!(call!(&svc, del("weights/ep0", "alice")).await.0, 404);
    let (_, body) =
        call!(&svc, get(&format!("{base}/training_runs/s1-default/checkpoints"), "alice")).await;
    assert_eq!(body["checkpoints"].as_array().unwrap().len(), 1);
    assert!(s.root.join(owner_hash(SALT, "alice")).join("s1-default/weights/ep1").is_dir());
    assert!(!s.root.join(owner_hash(SALT, "alice")).join("s1-default/weights/ep0").exists());
}

#[actix_web::test]
async fn configured_keys_are_enforced() {
    let s = setup();
    let svc = service!(s.app(Some(&["good"])), "/api/v1", ServerType::Tinker).await;
    let no_token = test::TestRequest::get().uri("/api/v1/twinkle/training_runs");
    let (code, body) = call!(&svc, no_token).await;
    assert_eq!(code, 401, "{body}");
    assert!(body["detail"].is_string());
    assert_eq!(call!(&svc, get("/api/v1/twinkle/training_runs", "bad")).await.0, 401);
    assert_eq!(call!(&svc, post("/api/v1/twinkle/create_session", "bad", json!({}))).await.0, 401);
    assert_eq!(call!(&svc, get("/api/v1/twinkle/training_runs", "good")).await.0, 200);
    // Dev mode: any non-empty token, but not none.
    let dev = service!(s.app(None), "/api/v1", ServerType::Tinker).await;
    let no_token = test::TestRequest::get().uri("/api/v1/twinkle/training_runs");
    assert_eq!(call!(&dev, no_token).await.0, 401);
}

#[actix_web::test]
async fn server_type_selects_gen1_or_tinker_routes() {
    let s = setup();
    s.run("EMPTY_TOKEN", "20261206_020519-feede377-default", "2026-01-01T00:00:00.000Z", &["ep0"]);
    let run = "20261206_020519-feede377-default";

    // server_type: twinkle, the seed's `/server` prefix: Gen-1 REST routes, no Tinker API.
    let g1 = service!(s.app(None), "/server", ServerType::Twinkle).await;
    let (code, body) =
        call!(&g1, get("/server/training_runs?limit=20&offset=0", "EMPTY_TOKEN")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["training_runs"][0]["training_run_id"], run);
    assert_eq!(body["cursor"]["total_count"], 1);
    let resp =
        test::call_service(&g1, test::TestRequest::get().uri("/server/healthz").to_request()).await;
    assert_eq!(resp.status(), 200);
    for url in
        [format!("/server/training_runs/{run}"), format!("/server/training_runs/{run}/checkpoints")]
    {
        assert_eq!(call!(&g1, get(&url, "EMPTY_TOKEN")).await.0, 200, "{url}");
    }
    let (code, body) =
        call!(&g1, get(&format!("/server/checkpoint_path/{run}/weights/ep0"), "EMPTY_TOKEN")).await;
    assert_eq!(
        (code, body["twinkle_path"].clone()),
        (200, json!(format!("twinkle://{run}/weights/ep0")))
    );
    let wi = json!({"twinkle_path": format!("twinkle://{run}/weights/ep0")});
    assert_eq!(call!(&g1, post("/server/weights_info", "EMPTY_TOKEN", wi)).await.0, 200);
    assert_eq!(
        call!(
            &g1,
            delete(&format!("/server/training_runs/{run}/checkpoints/weights/ep0"), "EMPTY_TOKEN")
        )
        .await
        .0,
        200
    );
    // Gen-2 routes stay; the Tinker API is not mounted.
    assert_eq!(call!(&g1, get("/server/twinkle/training_runs", "EMPTY_TOKEN")).await.0, 200);
    let tinker = test::TestRequest::get()
        .uri("/server/get_server_capabilities")
        .insert_header(("X-API-Key", "tml-key"));
    assert_eq!(call!(&g1, tinker).await.0, 404);
    assert_eq!(call!(&g1, post("/server/create_session", "EMPTY_TOKEN", json!({}))).await.0, 404);

    // server_type: tinker: the Tinker API at the prefix (X-API-Key), no Gen-1 routes.
    let tk = service!(s.app(None), "/api/v1", ServerType::Tinker).await;
    let tinker = || {
        test::TestRequest::get()
            .uri("/api/v1/get_server_capabilities")
            .insert_header(("X-API-Key", "tml-key"))
    };
    let (code, body) = call!(&tk, tinker()).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["supported_models"][0]["model_name"], "Qwen/Qwen3-0.6B");
    // `/training_runs` is the Tinker one: it wants X-API-Key, not a bearer token.
    assert_eq!(call!(&tk, get("/api/v1/training_runs", "EMPTY_TOKEN")).await.0, 401);
    assert_eq!(call!(&tk, get("/api/v1/healthz", "EMPTY_TOKEN")).await.0, 404);
    assert_eq!(call!(&tk, get("/api/v1/twinkle/training_runs", "EMPTY_TOKEN")).await.0, 200);
}
