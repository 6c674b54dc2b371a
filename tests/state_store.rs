//! State store tests on real SQLite files in temp dirs: restart loses nothing, dedupe, owner
//! isolation, cursors, terminal-state non-regression, crash recovery, concurrency.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use serde_json::json;
use twinkle::engine::LoraTargets;
use twinkle::state::*;

const ALICE: &str = "a11ce";
const BOB: &str = "b0b";

/// A clock that advances 1 ms per reading, so orderings by time are deterministic.
fn stepping_clock(start: i64) -> Clock {
    let t = Arc::new(AtomicI64::new(start));
    Arc::new(move || t.fetch_add(1, Ordering::SeqCst))
}

fn open(path: &std::path::Path) -> Store {
    Store::open_file(path).expect("open").with_clock(stepping_clock(1_000))
}

fn lora() -> LoraSettings {
    let targets = LoraTargets { train_unembed: false, ..LoraTargets::ALL };
    LoraSettings { rank: 8, seed: Some(3), targets }
}

fn new_run(id: &str, owner: &str) -> NewRun {
    NewRun {
        id: id.into(),
        owner: owner.into(),
        session_id: id.split(':').next().unwrap_or("s").into(),
        base_model: "Qwen/Qwen3-8B".into(),
        lora: lora(),
        optimizer_config: json!({"type": "adamw"}),
        user_metadata: json!({"k": "v"}),
    }
}

fn ckpt(run: &str, kind: &str, name: &str, t: CheckpointType) -> NewCheckpoint {
    NewCheckpoint {
        run_id: run.into(),
        checkpoint_id: format!("{kind}/{name}"),
        checkpoint_type: t,
        tinker_path: format!("tinker://{run}/{kind}/{name}"),
        size_bytes: Some(1024),
        user_metadata: json!({"step": 1}),
        expires_at: None,
        public: false,
    }
}

/// Records checkpoint `kind/name` of ALICE's run `run`: a training one under `weights`, a
/// sampler one under `sampler_weights`.
fn add_ckpt(s: &Store, run: &str, kind: &str, name: &str) {
    let t = if kind == "weights" { CheckpointType::Training } else { CheckpointType::Sampler };
    s.insert_checkpoint(ALICE, &ckpt(run, kind, name, t), false).expect("ckpt");
}

fn fut(id: &str, owner: &str, model: Option<&str>, seq: Option<i64>, kind: &str) -> NewFuture {
    NewFuture {
        request_id: id.into(),
        owner: owner.into(),
        model_id: model.map(String::from),
        seq_id: seq,
        kind: kind.into(),
        sample_sequence_ids: None,
    }
}

#[test]
fn restart_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("sub").join("state.db");
    {
        let s = open(&db);
        s.create_session(&NewSession {
            id: "s1".into(),
            owner: ALICE.into(),
            tags: vec!["t1".into()],
            user_metadata: json!({"m": 1}),
            sdk_version: Some("0.38.0".into()),
            project_id: None,
            display_name: Some("d".into()),
        })
        .expect("session");
        s.heartbeat(ALICE, "s1").expect("heartbeat");
        s.insert_run(&new_run("s1:train:0", ALICE)).expect("run");
        add_ckpt(&s, "s1:train:0", "weights", "c1");
        add_ckpt(&s, "s1:train:0", "sampler_weights", "w1");
        s.create_or_get_sampling_session(&NewSamplingSession {
            id: "s1:sample:0".into(),
            session_id: "s1".into(),
            owner: ALICE.into(),
            seq: 0,
            base_model: "Qwen/Qwen3-8B".into(),
            model_path: Some("tinker://s1:train:0/sampler_weights/w1".into()),
        })
        .expect("sampling");
        let mut f = fut("req-1", ALICE, Some("s1:train:0"), Some(1), "forward_backward");
        f.sample_sequence_ids = Some(vec!["x".into()]);
        s.create_future(&f).expect("future");
        s.complete("req-1", &[1, 2, 3, 255], "application/x-protobuf").expect("complete");
        s.create_future(&fut("req-2", ALICE, None, None, "sample")).expect("future");
        s.fail("req-2", "bad prompt", FailureCategory::User).expect("fail");
        assert_eq!(s.next_counter("s1", "sample_seq").expect("counter"), 0);
        assert_eq!(s.next_counter("s1", "sample_seq").expect("counter"), 1);
    }
    let s = open(&db);
    let sess = s.get_session(ALICE, "s1").expect("session persisted");
    assert_eq!(sess.tags, vec!["t1".to_string()]);
    assert_eq!(sess.user_metadata, json!({"m": 1}));
    assert_eq!(sess.sdk_version.as_deref(), Some("0.38.0"));
    assert_eq!(sess.display_name.as_deref(), Some("d"));
    assert!(sess.last_heartbeat > sess.created_at);
    let run = s.get_run(ALICE, "s1:train:0").expect("run persisted");
    assert_eq!(run.lora, lora());
    assert_eq!(run.base_model, "Qwen/Qwen3-8B");
    assert_eq!(run.optimizer_config, json!({"type": "adamw"}));
    assert_eq!(run.user_metadata, json!({"k": "v"}));
    assert_eq!(run.last_checkpoint.as_deref(), Some("weights/c1"));
    assert_eq!(run.last_sampler_checkpoint.as_deref(), Some("sampler_weights/w1"));
    assert!(!run.corrupted);
    let c = s.get_checkpoint(ALICE, "s1:train:0", "weights/c1").expect("ckpt persisted");
    assert_eq!(
        (c.size_bytes, c.checkpoint_type, c.tinker_path.as_str()),
        (Some(1024), CheckpointType::Training, "tinker://s1:train:0/weights/c1")
    );
    assert_eq!(c.user_metadata, json!({"step": 1}));
    let ss = s.get_sampling_session(ALICE, "s1:sample:0").expect("sampling persisted");
    assert_eq!(ss.model_path.as_deref(), Some("tinker://s1:train:0/sampler_weights/w1"));
    let f1 = s.get_future("req-1").expect("future persisted");
    assert_eq!(f1.status, FutureStatus::Complete);
    assert_eq!(f1.result.as_deref(), Some(&[1u8, 2, 3, 255][..]));
    assert_eq!(f1.content_type.as_deref(), Some("application/x-protobuf"));
    assert_eq!(f1.sample_sequence_ids, Some(vec!["x".to_string()]));
    let f2 = s.get_future("req-2").expect("future persisted");
    assert_eq!(
        (f2.status, f2.error.as_deref(), f2.category),
        (FutureStatus::Failed, Some("bad prompt"), Some(FailureCategory::User))
    );
    assert_eq!(s.next_counter("s1", "sample_seq").expect("counter"), 2);
    assert_eq!(
        s.fail_unfinished_on_startup().expect("startup"),
        0,
        "finished futures are left alone"
    );
}

#[test]
fn unfinished_futures_fail_on_startup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("state.db");
    {
        let s = open(&db);
        s.create_future(&fut("p", ALICE, Some("m"), Some(1), "optim_step")).expect("f");
        s.create_future(&fut("r", ALICE, Some("m"), Some(2), "optim_step")).expect("f");
        s.set_running("r").expect("running");
        s.create_future(&fut("c", ALICE, Some("m"), Some(3), "optim_step")).expect("f");
        s.complete("c", b"{}", "application/json").expect("complete");
        // Dropped without finishing p and r: a crash.
    }
    let s = open(&db);
    assert_eq!(s.fail_unfinished_on_startup().expect("startup"), 2);
    for id in ["p", "r"] {
        let f = s.get_future(id).expect("f");
        assert_eq!(f.status, FutureStatus::Failed);
        assert_eq!(f.category, Some(FailureCategory::Server));
        assert_eq!(f.error.as_deref(), Some(UNFINISHED_AT_STARTUP));
    }
    assert_eq!(s.get_future("c").expect("f").status, FutureStatus::Complete);
    // A late worker cannot resurrect a failed future.
    assert!(!s.complete("r", b"late", "application/json").expect("no-op"));
    assert_eq!(s.get_future("r").expect("f").status, FutureStatus::Failed);
}

#[test]
fn terminal_states_never_regress() {
    let s = Store::open_memory().expect("memory");
    s.create_future(&fut("a", ALICE, None, None, "sample")).expect("f");
    assert!(s.set_running("a").expect("t"));
    assert!(!s.set_running("a").expect("t"), "running twice is a no-op");
    assert!(s.complete("a", b"x", "application/json").expect("t"));
    assert!(!s.fail("a", "late failure", FailureCategory::Server).expect("t"));
    assert!(!s.set_running("a").expect("t"));
    assert!(!s.complete("a", b"y", "application/json").expect("t"));
    let a = s.get_future("a").expect("f");
    assert_eq!(
        (a.status, a.result.as_deref(), a.error),
        (FutureStatus::Complete, Some(&b"x"[..]), None)
    );

    s.create_future(&fut("b", ALICE, None, None, "sample")).expect("f");
    assert!(s.fail("b", "boom", FailureCategory::Unknown).expect("t"));
    assert!(!s.complete("b", b"x", "application/json").expect("t"));
    assert!(!s.set_running("b").expect("t"));
    assert_eq!(s.get_future("b").expect("f").status, FutureStatus::Failed);

    assert!(matches!(s.set_running("nope"), Err(StateError::NotFound { .. })));
    assert!(matches!(s.complete("nope", b"", "x"), Err(StateError::NotFound { .. })));
}

#[test]
fn dedupe_on_model_and_seq() {
    let s = Store::open_memory().expect("memory");
    let (first, created) = s
        .create_or_get_by_seq(&fut("req-a", ALICE, Some("m:train:0"), Some(1), "forward_backward"))
        .expect("f");
    assert!(created);
    // A retried submission with a new request id gets the original future back.
    let (again, created) = s
        .create_or_get_by_seq(&fut("req-b", ALICE, Some("m:train:0"), Some(1), "forward_backward"))
        .expect("f");
    assert!(!created);
    assert_eq!(again.request_id, "req-a");
    assert_eq!(again, first);
    s.complete("req-a", b"done", "application/x-protobuf").expect("c");
    let (done, _) = s
        .create_or_get_by_seq(&fut("req-c", ALICE, Some("m:train:0"), Some(1), "forward_backward"))
        .expect("f");
    assert_eq!((done.request_id.as_str(), done.status), ("req-a", FutureStatus::Complete));
    assert!(matches!(s.get_future("req-b"), Err(StateError::NotFound { .. })));
    // Another seq, or no seq at all, creates new futures.
    assert!(
        s.create_or_get_by_seq(&fut("req-d", ALICE, Some("m:train:0"), Some(2), "optim_step"))
            .expect("f")
            .1
    );
    assert!(
        s.create_or_get_by_seq(&fut("req-e", ALICE, Some("m:train:0"), None, "create_model"))
            .expect("f")
            .1
    );
    assert!(
        s.create_or_get_by_seq(&fut("req-f", ALICE, Some("m:train:0"), None, "create_model"))
            .expect("f")
            .1
    );
    // Same pair from another owner or for another kind of request is a conflict.
    assert!(matches!(
        s.create_or_get_by_seq(&fut("x", BOB, Some("m:train:0"), Some(1), "forward_backward")),
        Err(StateError::Conflict(_))
    ));
    assert!(matches!(
        s.create_or_get_by_seq(&fut("y", ALICE, Some("m:train:0"), Some(1), "optim_step")),
        Err(StateError::Conflict(_))
    ));
    // Reusing a request id is refused.
    assert!(matches!(
        s.create_future(&fut("req-a", ALICE, None, None, "sample")),
        Err(StateError::AlreadyExists { .. })
    ));
}

#[test]
fn owners_are_isolated() {
    let s = Store::open_memory().expect("memory");
    s.create_session(&NewSession::new("s1", ALICE)).expect("session");
    s.insert_run(&new_run("s1:train:0", ALICE)).expect("run");
    add_ckpt(&s, "s1:train:0", "weights", "c1");
    s.create_future(&fut("req-1", ALICE, None, None, "sample")).expect("f");

    let nf = |r: Result<_, StateError>| matches!(r, Err(StateError::NotFound { .. }));
    assert!(nf(s.get_session(BOB, "s1").map(|_| ())));
    assert!(nf(s.heartbeat(BOB, "s1")));
    assert!(nf(s.get_run(BOB, "s1:train:0").map(|_| ())));
    assert!(nf(s.list_checkpoints(BOB, "s1:train:0").map(|_| ())));
    assert!(nf(s.get_checkpoint(BOB, "s1:train:0", "weights/c1").map(|_| ())));
    assert!(nf(s.delete_checkpoint(BOB, "s1:train:0", "weights/c1").map(|_| ())));
    assert!(nf(s
        .insert_checkpoint(
            BOB,
            &ckpt("s1:train:0", "weights", "c2", CheckpointType::Training),
            false
        )
        .map(|_| ())));
    assert!(nf(s.get_future_owned(BOB, "req-1").map(|_| ())));
    assert!(nf(s.touch_run(BOB, "s1:train:0")));
    assert_eq!(s.list_runs(BOB, 0, 10).expect("list").1, 0);
    assert_eq!(s.list_user_checkpoints(BOB, 0, 10).expect("list").1, 0);
    assert_eq!(s.list_session_ids(BOB, 0, 10).expect("list").1, 0);
    // Alice still sees everything, and Bob's attempts changed nothing.
    assert_eq!(s.list_checkpoints(ALICE, "s1:train:0").expect("list").len(), 1);
    assert_eq!(s.get_future_owned(ALICE, "req-1").expect("f").owner, ALICE);
    assert!(matches!(
        s.insert_run(&new_run("s1:train:0", BOB)),
        Err(StateError::AlreadyExists { .. })
    ));
    assert_eq!(s.get_run(ALICE, "s1:train:0").expect("run").owner, ALICE);
}

#[test]
fn cursors_page_newest_first() {
    let s = Store::open_memory().expect("memory").with_clock(stepping_clock(0));
    for i in 0..5 {
        s.insert_run(&new_run(&format!("s:train:{i}"), ALICE)).expect("run");
    }
    s.insert_run(&new_run("t:train:0", BOB)).expect("run");
    let ids = |v: Vec<RunRecord>| v.into_iter().map(|r| r.spec.id).collect::<Vec<_>>();
    let (page, total) = s.list_runs(ALICE, 0, 2).expect("list");
    assert_eq!((ids(page), total), (vec!["s:train:4".to_string(), "s:train:3".into()], 5));
    let (page, total) = s.list_runs(ALICE, 4, 2).expect("list");
    assert_eq!((ids(page), total), (vec!["s:train:0".to_string()], 5));
    let (page, total) = s.list_runs(ALICE, 10, 2).expect("list");
    assert_eq!((page.len(), total), (0, 5));
    let (page, _) = s.list_runs(ALICE, 0, u64::MAX).expect("list");
    assert_eq!(page.len(), 5);

    for i in 0..3 {
        add_ckpt(&s, "s:train:0", "weights", &format!("c{i}"));
    }
    add_ckpt(&s, "s:train:1", "sampler_weights", "w");
    let (page, total) = s.list_user_checkpoints(ALICE, 1, 2).expect("list");
    assert_eq!(total, 4);
    assert_eq!(
        page.iter().map(|c| c.checkpoint_id.as_str()).collect::<Vec<_>>(),
        vec!["weights/c2", "weights/c1"]
    );
}

#[test]
fn checkpoint_overwrite_delete_and_last_pointers() {
    let s = Store::open_memory().expect("memory").with_clock(stepping_clock(0));
    s.insert_run(&new_run("s:train:0", ALICE)).expect("run");
    let c1 = ckpt("s:train:0", "weights", "c1", CheckpointType::Training);
    s.insert_checkpoint(ALICE, &c1, false).expect("c1");
    add_ckpt(&s, "s:train:0", "weights", "c2");
    assert_eq!(
        s.get_run(ALICE, "s:train:0").expect("run").last_checkpoint.as_deref(),
        Some("weights/c2")
    );
    assert!(matches!(
        s.insert_checkpoint(ALICE, &c1, false),
        Err(StateError::AlreadyExists { .. })
    ));
    let replaced = NewCheckpoint { user_metadata: json!({"v": 2}), ..c1.clone() };
    s.insert_checkpoint(ALICE, &replaced, true).expect("overwrite");
    assert_eq!(
        s.get_checkpoint(ALICE, "s:train:0", "weights/c1").expect("c").user_metadata,
        json!({"v": 2})
    );
    assert_eq!(s.list_checkpoints(ALICE, "s:train:0").expect("list").len(), 2);
    assert_eq!(
        s.get_run(ALICE, "s:train:0").expect("run").last_checkpoint.as_deref(),
        Some("weights/c1")
    );
    let gone = s.delete_checkpoint(ALICE, "s:train:0", "weights/c1").expect("delete");
    assert_eq!(gone.tinker_path, "tinker://s:train:0/weights/c1");
    assert_eq!(
        s.get_run(ALICE, "s:train:0").expect("run").last_checkpoint.as_deref(),
        Some("weights/c2")
    );
    s.delete_checkpoint(ALICE, "s:train:0", "weights/c2").expect("delete");
    assert_eq!(s.get_run(ALICE, "s:train:0").expect("run").last_checkpoint, None);
    assert!(matches!(
        s.delete_checkpoint(ALICE, "s:train:0", "weights/c2"),
        Err(StateError::NotFound { .. })
    ));

    s.insert_checkpoint(ALICE, &NewCheckpoint { expires_at: Some(50), ..c1 }, false).expect("c");
    assert!(s.set_checkpoint_public(ALICE, "s:train:0", "weights/c1", true).expect("pub"));
    assert!(!s.set_checkpoint_public(ALICE, "s:train:0", "weights/c1", true).expect("pub"));
    assert_eq!(s.expired_checkpoints(49).expect("exp").len(), 0);
    assert_eq!(s.expired_checkpoints(50).expect("exp").len(), 1);
    s.set_checkpoint_expiry(ALICE, "s:train:0", "weights/c1", None).expect("ttl");
    assert_eq!(s.expired_checkpoints(i64::MAX).expect("exp").len(), 0);
}

#[test]
fn sampling_sessions_dedupe_and_sessions_finish() {
    let s = Store::open_memory().expect("memory");
    let ns = NewSamplingSession {
        id: "s:sample:0".into(),
        session_id: "s".into(),
        owner: ALICE.into(),
        seq: 0,
        base_model: "B".into(),
        model_path: None,
    };
    assert!(s.create_or_get_sampling_session(&ns).expect("c").1);
    assert!(!s.create_or_get_sampling_session(&ns).expect("again").1);
    let other = NewSamplingSession { id: "other".into(), ..ns.clone() };
    assert!(matches!(s.create_or_get_sampling_session(&other), Err(StateError::Conflict(_))));
    assert!(matches!(s.get_sampling_session(BOB, "s:sample:0"), Err(StateError::NotFound { .. })));
    assert_eq!(
        s.list_sampling_session_ids(ALICE, "s").expect("ids"),
        vec!["s:sample:0".to_string()]
    );

    s.create_session(&NewSession::new("s", ALICE)).expect("session");
    s.finish_session(ALICE, "s", "success").expect("finish");
    s.finish_session(ALICE, "s", "errored").expect("finish twice is fine");
    assert_eq!(s.get_session(ALICE, "s").expect("s").finish_reason.as_deref(), Some("success"));
    assert!(matches!(s.finish_session(BOB, "s", "success"), Err(StateError::NotFound { .. })));
}

#[test]
fn concurrent_inserts_from_many_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("state.db");
    let s = Arc::new(open(&db));
    let mut handles = Vec::new();
    for t in 0..8 {
        let s = Arc::clone(&s);
        handles.push(std::thread::spawn(move || {
            let mut created = 0;
            for i in 0..50 {
                // Every thread submits the same 50 (model, seq) pairs: exactly one wins each.
                let f = fut(&format!("req-{t}-{i}"), ALICE, Some("m"), Some(i), "forward_backward");
                let (rec, new) = s.create_or_get_by_seq(&f).expect("dedupe");
                created += usize::from(new);
                s.set_running(&rec.request_id).expect("running");
                s.create_future(&fut(&twinkle::ids::hex_id("req-"), ALICE, None, None, "sample"))
                    .expect("unique");
            }
            created
        }));
    }
    let created: usize = handles.into_iter().map(|h| h.join().expect("thread")).sum();
    assert_eq!(created, 50);
    drop(s);
    // All rows survive a reopen: 50 deduped + 8 × 50 unique.
    let s = open(&db);
    assert_eq!(s.fail_unfinished_on_startup().expect("startup"), 450);
}

#[test]
fn memory_store_is_shared_across_threads() {
    let s = Arc::new(Store::open_memory().expect("memory"));
    let writer = {
        let s = Arc::clone(&s);
        std::thread::spawn(move || {
            s.create_future(&fut("req-x", ALICE, None, None, "sample")).map(|_| ())
        })
    };
    writer.join().expect("thread").expect("insert");
    assert_eq!(s.get_future("req-x").expect("visible").kind, "sample");
}

#[test]
fn schema_version_is_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("state.db");
    drop(open(&db));
    let conn = rusqlite::Connection::open(&db).expect("raw");
    let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).expect("version");
    assert_eq!(v, SCHEMA_VERSION);
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).expect("mode");
    assert_eq!(mode, "wal");
    conn.pragma_update(None, "user_version", 99).expect("bump");
    drop(conn);
    assert!(matches!(Store::open_file(&db), Err(StateError::SchemaVersion { found: 99, .. })));
}

#[test]
fn ids_are_unique_and_well_formed() {
    let a = twinkle::ids::hex_id("req-");
    let b = twinkle::ids::hex_id("req-");
    assert_ne!(a, b);
    assert_eq!(a.len(), 4 + 32);
    assert!(a[4..].bytes().all(|c| c.is_ascii_hexdigit()));
}

#[test]
fn records_render_as_rest_objects() {
    use twinkle::protocol::tinker::types::ErrorCategory;
    use twinkle::protocol::tinker::views::{checkpoint_view, training_run_view};
    // 1735689600000 ms = 2025-01-01T00:00:00Z.
    let s = Store::open_memory().expect("memory").with_clock(Arc::new(|| 1_735_689_600_000));
    let run = s.insert_run(&new_run("s:train:0", ALICE)).expect("run");
    let c = s
        .insert_checkpoint(
            ALICE,
            &ckpt("s:train:0", "weights", "c1", CheckpointType::Training),
            false,
        )
        .expect("c");
    let v = serde_json::to_value(checkpoint_view(&c)).expect("json");
    assert_eq!(
        v,
        json!({"checkpoint_id": "weights/c1", "checkpoint_type": "training", "time": "2025-01-01T00:00:00.000Z",
               "tinker_path": "tinker://s:train:0/weights/c1", "size_bytes": 1024, "public": false,
               "user_metadata": {"step": 1}, "expires_at": null})
    );
    let r = serde_json::to_value(training_run_view(&run, Some(&c), None)).expect("json");
    assert_eq!(r["training_run_id"], json!("s:train:0"));
    assert_eq!(r["model_owner"], json!(ALICE));
    assert_eq!(r["lora_rank"], json!(8));
    assert_eq!(r["last_request_time"], json!("2025-01-01T00:00:00.000Z"));
    assert_eq!(r["last_checkpoint"]["checkpoint_id"], json!("weights/c1"));
    assert_eq!(r["last_sampler_checkpoint"], json!(null));
    assert_eq!(ErrorCategory::from(FailureCategory::Server), ErrorCategory::Server);
    assert_eq!(FailureCategory::parse("Server"), FailureCategory::Unknown);
}

#[test]
fn store_from_persistence_config() {
    use twinkle::config::schema::{Persistence, PersistenceMode};
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = Persistence { mode: PersistenceMode::Memory, ..Persistence::default() };
    assert_eq!(Store::from_config(&mem).expect("memory").location(), ":memory:");
    let path = dir.path().join("x").join("state.sqlite");
    let file = Persistence {
        mode: PersistenceMode::File,
        file_path: Some(path.display().to_string()),
        ..Persistence::default()
    };
    Store::from_config(&file).expect("file");
    assert!(path.exists());
    let no_path = Persistence { mode: PersistenceMode::File, ..Persistence::default() };
    assert!(matches!(Store::from_config(&no_path), Err(StateError::MissingFilePath)));
    let redis = Persistence { mode: PersistenceMode::Redis, ..Persistence::default() };
    assert!(matches!(Store::from_config(&redis), Err(StateError::UnsupportedMode(_))));
}
