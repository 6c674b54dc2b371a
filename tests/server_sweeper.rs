//! Server housekeeping, in process: finished futures are pruned after the retention period
//! (a later poll answers 410), expired checkpoints lose their record and files, and a finished
//! or silent session takes its `save_weights_and_get_sampling_client` snapshots with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use actix_web::{App, test, web};
use serde_json::json;
use twinkle::apps::server::sweeper::{Swept, sweep_once};
use twinkle::apps::server::upstream::Upstreams;
use twinkle::apps::server::{ServerApp, routes};
use twinkle::config::ServerType;
use twinkle::engine::LoraTargets;
use twinkle::protocol::tinker::paths::owner_hash;
use twinkle::protocol::twinkle::Auth;
use twinkle::state::*;

const SALT: &[u8] = b"sweep-salt";
const KEY: &str = "tml-sweeper";
const NO_HEAD: &str = "127.0.0.1:9";
const RUN: &str = "s1:train:0";

fn ckpt(name: &str, expires_at: Option<i64>) -> NewCheckpoint {
    NewCheckpoint {
        run_id: RUN.into(),
        checkpoint_id: format!("weights/{name}"),
        checkpoint_type: CheckpointType::Training,
        tinker_path: format!("tinker://{RUN}/weights/{name}"),
        size_bytes: Some(1),
        user_metadata: json!({}),
        expires_at,
        public: false,
    }
}

fn fut(id: &str, owner: &str) -> NewFuture {
    NewFuture {
        request_id: id.into(),
        owner: owner.into(),
        model_id: None,
        seq_id: None,
        kind: "sample".into(),
        sample_sequence_ids: None,
    }
}

#[actix_web::test]
async fn futures_are_pruned_ttls_enforced_and_snapshots_go_with_their_session() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let owner = owner_hash(SALT, KEY);
    let clock = Arc::new(AtomicI64::new(1_000_000));
    let c = clock.clone();
    let store =
        Store::open_memory().unwrap().with_clock(Arc::new(move || c.load(Ordering::SeqCst)));
    let auth = Auth { keys: None, salt: SALT.to_vec(), save_root: root.clone() };
    let mut app = ServerApp::new(store, Upstreams::new(NO_HEAD.into()), auth);
    app.housekeeping.future_retention = Duration::from_secs(10);
    app.housekeeping.session_timeout = Duration::from_secs(60);
    let app = web::Data::new(app);

    let o = owner.clone();
    app.disp
        .db(move |s| {
            s.create_session(&NewSession::new("s1", &o))?;
            s.insert_run(&NewRun {
                id: RUN.into(),
                owner: o.clone(),
                session_id: "s1".into(),
                base_model: "Qwen/Qwen3-0.6B".into(),
                lora: LoraSettings {
                    rank: 8,
                    seed: None,
                    targets: LoraTargets { train_unembed: false, ..LoraTargets::ALL },
                },
                optimizer_config: json!({}),
                user_metadata: json!({}),
            })?;
            s.insert_checkpoint(&o, &ckpt("keep", None), false)?;
            s.insert_checkpoint(&o, &ckpt("old", Some(1_005_000)), false)?;
            s.create_or_get_sampling_session(&NewSamplingSession {
                id: "s1:sample:0".into(),
                session_id: "s1".into(),
                owner: o.clone(),
                seq: 0,
                base_model: "Qwen/Qwen3-0.6B".into(),
                model_path: None,
            })?;
            s.create_future(&fut("req-done", &o))?;
            s.complete("req-done", b"{}", "application/json")?;
            s.create_future(&fut("req-pending", &o))?;
            Ok(())
        })
        .await
        .unwrap();
    let ck = |name: &str| root.join(&owner).join(RUN).join("weights").join(name);
    for name in ["keep", "old"] {
        std::fs::create_dir_all(ck(name)).unwrap();
        std::fs::write(ck(name).join("adapter_model.safetensors"), b"w").unwrap();
    }
    let snapshot = root.join(&owner).join("ephemeral").join("s1:sample:0");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::write(snapshot.join("adapter_model.safetensors"), b"w").unwrap();

    // Within the retention period and before the TTL: nothing goes.
    let a = app.clone();
    let swept = app.disp.db(move |s| sweep_once(&a, s)).await.unwrap();
    assert_eq!(swept, Swept::default());

    // 20 s later: the finished future and the expired checkpoint are gone, the rest stays.
    clock.fetch_add(20_000, Ordering::SeqCst);
    let a = app.clone();
    let swept = app.disp.db(move |s| sweep_once(&a, s)).await.unwrap();
    assert_eq!(swept, Swept { futures: 1, checkpoints: 1, snapshots: 0 });
    assert!(!ck("old").exists(), "expired checkpoint files remain");
    assert!(ck("keep").join("adapter_model.safetensors").exists());
    let o = owner.clone();
    let left = app
        .disp
        .db(move |s| {
            Ok((
                s.get_checkpoint(&o, RUN, "weights/old").is_err(),
                s.get_checkpoint(&o, RUN, "weights/keep").is_ok(),
                s.get_future("req-done").is_err(),
                s.get_future("req-pending").is_ok(),
            ))
        })
        .await
        .unwrap();
    assert_eq!(left, (true, true, true, true));

    let data = app.clone();
    let svc = test::init_service(
        App::new().configure(move |cfg| routes(cfg, data.clone(), "/api/v1", ServerType::Tinker)),
    )
    .await;
    // A pruned future is "gone" (retryable), not a fatal 404.
    let req = test::TestRequest::post()
        .uri("/api/v1/retrieve_future")
        .insert_header(("x-api-key", KEY))
        .set_payload(json!({"request_id": "req-done"}).to_string());
    assert_eq!(test::call_service(&svc, req.to_request()).await.status().as_u16(), 410);

    // Finishing the session deletes its sampling snapshots.
    let req = test::TestRequest::post()
        .uri("/api/v1/sessions/s1/finish")
        .insert_header(("x-api-key", KEY))
        .set_payload(json!({"reason": {"type": "success"}, "detail": null}).to_string());
    assert_eq!(test::call_service(&svc, req.to_request()).await.status().as_u16(), 204);
    assert!(!snapshot.exists(), "snapshot outlived its session");
    assert!(ck("keep").exists(), "named checkpoints stay");

    // A session that goes silent (its client crashed) loses its snapshots at the next sweep;
    // a live one keeps them, and so does a fresh snapshot no sampling session claims yet.
    let o = owner.clone();
    app.disp
        .db(move |s| {
            for id in ["s2", "s3"] {
                s.create_session(&NewSession::new(id, &o))?;
                s.create_or_get_sampling_session(&NewSamplingSession {
                    id: format!("{id}:sample:0"),
                    session_id: id.into(),
                    owner: o.clone(),
                    seq: 0,
                    base_model: "Qwen/Qwen3-0.6B".into(),
                    model_path: None,
                })?;
            }
            Ok(())
        })
        .await
        .unwrap();
    let snap = |sid: &str| root.join(&owner).join("ephemeral").join(sid);
    for sid in ["s2:sample:0", "s3:sample:0", "unclaimed"] {
        std::fs::create_dir_all(snap(sid)).unwrap();
    }
    clock.fetch_add(100_000, Ordering::SeqCst);
    let o = owner.clone();
    app.disp.db(move |s| s.heartbeat(&o, "s3")).await.unwrap();
    let a = app.clone();
    let swept = app.disp.db(move |s| sweep_once(&a, s)).await.unwrap();
    assert_eq!(swept.snapshots, 1, "{swept:?}");
    assert!(!snap("s2:sample:0").exists(), "a silent session's snapshot remains");
    assert!(snap("s3:sample:0").exists() && snap("unclaimed").exists());
}
