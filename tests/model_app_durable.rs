//! Durable adapter snapshots (issue #12, item 2), library level: a model service restarted on
//! the same spill directory serves every live adapter at its last completed optim_step, with
//! identical numbers (each step is on disk before optim_step answers, issue #12 item 9);
//! pending gradients are not kept; unload forgets the snapshot.

mod model_app_support;

use model_app_support::*;
use twinkle::apps::model::AppError;
use twinkle::protocol::internal::*;

/// Weights and Adam moments of every module, in a fixed order.
fn state_of(a: &twinkle::engine::Adapter) -> Vec<(String, Vec<f32>)> {
    a.pairs()
        .into_iter()
        .flat_map(|(k, p)| {
            [
                (format!("{k}.a"), p.a.w.data().to_vec()),
                (format!("{k}.b"), p.b.w.data().to_vec()),
                (format!("{k}.m_a"), p.a.adam.m.clone()),
                (format!("{k}.v_a"), p.a.adam.v.clone()),
                (format!("{k}.m_b"), p.b.adam.m.clone()),
                (format!("{k}.v_b"), p.b.adam.v.clone()),
            ]
        })
        .collect()
}

#[test]
fn a_restarted_service_resumes_every_adapter_at_its_last_step() {
    let t = tempfile::tempdir().unwrap();
    let first = service(t.path());
    first.enable_snapshots();
    for (id, seed) in [("r:train:0", 1), ("r:train:1", 2)] {
        first.create_adapter(&create(id, 4, seed)).unwrap();
        train(&first, id, 2, 5e-3);
    }
    // No flush: every step was written before it was answered.
    // Work since the last step that a crash loses: an accumulated gradient.
    loss(&first, "r:train:0", false);
    let want = first.download("r:train:0").unwrap();
    let want_loss = loss(&first, "r:train:0", true);
    drop(first); // the crash: nothing is flushed at drop

    // A reference that keeps training, without snapshots: the same adapter, one more step.
    let control_dir = tempfile::tempdir().unwrap();
    let control = service(control_dir.path());
    control.create_adapter(&create("r:train:0", 4, 1)).unwrap();
    train(&control, "r:train:0", 3, 5e-3);
    let next_loss = loss(&control, "r:train:0", true);

    let second = service(t.path());
    assert_eq!(second.restore_live(), 2);
    let mut ids = second.info().adapters;
    ids.sort();
    assert_eq!(ids, ["r:train:0", "r:train:1"]);
    assert!(!second.is_resident("r:train:0"), "restored lazily");
    let got = second.download("r:train:0").unwrap();
    assert_eq!(got.step(), want.step());
    assert_eq!(state_of(&got), state_of(&want), "weights and moments");
    assert_eq!(loss(&second, "r:train:0", true), want_loss);
    // The pending gradient is gone: a step needs a new forward_backward.
    let err = second.optim_step(&adam("r:train:0", 5e-3)).unwrap_err();
    assert!(matches!(err, AppError::BadRequest(_)), "{err}");
    loss(&second, "r:train:0", false);
    second.optim_step(&adam("r:train:0", 5e-3)).unwrap();
    assert_eq!(loss(&second, "r:train:0", true), next_loss, "training continues identically");

    // Unload deletes the snapshot: a third life does not bring it back.
    second.unload(&UnloadRequest { model_id: "r:train:1".into() }).unwrap();
    drop(second);
    let third = service(t.path());
    assert_eq!(third.restore_live(), 1);
    assert_eq!(third.info().adapters, ["r:train:0"]);
}

#[test]
fn an_adapter_lost_without_a_snapshot_is_an_unknown_adapter_until_a_load_reattaches_it() {
    let t = tempfile::tempdir().unwrap();
    let first = service(&t.path().join("spill"));
    first.create_adapter(&create("lost", 4, 5)).unwrap();
    loss(&first, "lost", false);
    first.optim_step(&adam("lost", 5e-3)).unwrap();
    let ckpt = t.path().join("ckpt");
    let save = SaveRequest { model_id: "lost".into(), dir: ckpt.clone(), kind: SaveKind::State };
    first.save(&save).unwrap();
    let want = loss(&first, "lost", true);
    drop(first); // snapshots were never enabled: nothing to restore

    let second = service(&t.path().join("spill"));
    assert_eq!(second.restore_live(), 0);
    let err = second.optim_step(&adam("lost", 5e-3)).unwrap_err();
    assert!(matches!(err, AppError::UnknownAdapter(_)), "{err}");
    let load =
        LoadRequest { model_id: "lost".into(), dir: ckpt, with_optimizer: true, create: None };
    second.load(&load).unwrap();
    assert_eq!(loss(&second, "lost", true), want);
}

/// The step recorded in adapter `id`'s snapshot under `spill`, if one is written.
fn snapshot_step(spill: &std::path::Path, id: &str) -> Option<u64> {
    let meta = spill
        .join(twinkle::apps::model::durable::LIVE_DIR)
        .join(twinkle::apps::model::durable::key(id))
        .join("optimizer_state.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(meta).ok()?).ok()?;
    v["step"].as_u64()
}

#[test]
fn an_answered_optim_step_is_on_disk_even_while_the_background_writer_races_it() {
    // No writer thread and no flush: whatever is on disk was written before optim_step answered.
    let t = tempfile::tempdir().unwrap();
    let svc = service(t.path());
    svc.enable_snapshots();
    let ids = ["d:train:0", "d:train:1"];
    for (i, id) in ids.iter().enumerate() {
        svc.create_adapter(&create(id, 4, 10 + i as u64)).unwrap();
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        // A background writer snapshotting both adapters as fast as it can: it must never put
        // an older step over the one an answer promised.
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for id in ids {
                    svc.snapshot_now(id).unwrap();
                }
            }
        });
        let trainers: Vec<_> = ids
            .iter()
            .map(|id| {
                let svc = &svc;
                let dir = t.path();
                s.spawn(move || {
                    for step in 1..=6 {
                        loss(svc, id, false);
                        svc.optim_step(&adam(id, 5e-3)).unwrap();
                        assert_eq!(snapshot_step(dir, id), Some(step), "{id} after step {step}");
                    }
                })
            })
            .collect();
        for h in trainers {
            h.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    for id in ids {
        assert_eq!(snapshot_step(t.path(), id), Some(6));
        assert_eq!(svc.download(id).unwrap().step(), 6);
    }
    // An unloaded adapter's snapshot is gone and a late write does not bring it back.
    svc.unload(&UnloadRequest { model_id: ids[0].into() }).unwrap();
    svc.snapshot_now(ids[0]).unwrap();
    assert_eq!(snapshot_step(t.path(), ids[0]), None);
}

/// `adapter_config.durable_steps: false`: optim_step answers without writing; the background
/// writer (here driven by `flush_snapshots`) writes the latest state once for a burst of steps.
#[test]
fn without_durable_steps_the_background_writer_snapshots_the_latest_step() {
    let t = tempfile::tempdir().unwrap();
    let mut opts = options(t.path(), std::time::Duration::from_secs(1800), None);
    opts.adapters.durable_steps = false;
    let svc = twinkle::apps::model::ModelService::new(&opts).unwrap();
    svc.enable_snapshots();
    let id = "r:train:0";
    svc.create_adapter(&create(id, 4, 1)).unwrap();
    assert_eq!(svc.flush_snapshots(), 1);
    train(&svc, id, 3, 5e-3);
    assert_eq!(snapshot_step(t.path(), id), Some(0), "a step was written before its answer");
    assert_eq!(svc.flush_snapshots(), 1, "three steps, one write");
    assert_eq!(snapshot_step(t.path(), id), Some(3));
}
