//! Durable adapter snapshots (issue #12, item 2), library level: a model service restarted on
//! the same spill directory serves every live adapter at its last completed optim_step, with
//! identical numbers; pending gradients are not kept; unload forgets the snapshot.

mod model_app_support;

use model_app_support::*;
use twinkle::apps::model::AppError;
use twinkle::apps::model::types::*;

/// Weights and Adam moments of every module, in a fixed order.
fn state_of(a: &twinkle::engine::Adapter) -> Vec<(String, Vec<f32>)> {
    a.pairs()
        .into_iter()
        .flat_map(|(k, p)| {
            [
                (format!("{k}.a"), p.a.data().to_vec()),
                (format!("{k}.b"), p.b.data().to_vec()),
                (format!("{k}.m_a"), p.m_a.clone()),
                (format!("{k}.v_a"), p.v_a.clone()),
                (format!("{k}.m_b"), p.m_b.clone()),
                (format!("{k}.v_b"), p.v_b.clone()),
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
        for _ in 0..2 {
            loss(&first, id, false);
            first.optim_step(&adam(id, 5e-3)).unwrap();
        }
    }
    assert_eq!(first.flush_snapshots(), 2, "one coalesced write per adapter");
    // Work since the last step that a crash loses: an accumulated gradient.
    loss(&first, "r:train:0", false);
    let want = first.download("r:train:0").unwrap();
    let want_loss = loss(&first, "r:train:0", true);
    // A reference that keeps training: one more step from the snapshotted state.
    first.zero_grad("r:train:0").unwrap();
    loss(&first, "r:train:0", false);
    first.optim_step(&adam("r:train:0", 5e-3)).unwrap();
    let next_loss = loss(&first, "r:train:0", true);
    drop(first); // the crash: nothing is flushed at drop

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
