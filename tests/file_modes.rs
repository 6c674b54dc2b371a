//! Private data is owner-only whatever the umask: checkpoints (0700 dirs, 0600 files), the
//! owner salt, `state.db` with its `-wal`/`-shm`, and the `TWINKLE_HOME` serve record.
//!
//! One test in its own binary: it sets the process umask to 0 (the most permissive), which
//! would leak into any test running beside it.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use anyhow::Result;
use nix::sys::stat::{Mode, umask};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777).unwrap_or(0)
}

#[test]
fn private_files_ignore_the_umask() -> Result<()> {
    umask(Mode::empty());
    let dir = tempfile::tempdir()?;
    let root = dir.path();

    // Checkpoints: the run directory, the checkpoint and every file the writer made.
    let ckpt = root.join("save/run-1/weights/step-1");
    twinkle::apps::model::checkpoint::write_dir_atomic(&ckpt, |tmp| {
        std::fs::write(tmp.join("adapter_model.safetensors"), b"w")
            .map_err(|e| twinkle::apps::model::AppError::Internal(e.to_string()))?;
        std::fs::create_dir(tmp.join("sub")).ok();
        std::fs::write(tmp.join("sub/x"), b"x").ok();
        Ok(())
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    for d in ["save", "save/run-1", "save/run-1/weights", "save/run-1/weights/step-1"] {
        assert_eq!(mode(&root.join(d)), 0o700, "{d}");
    }
    assert_eq!(mode(&ckpt.join("adapter_model.safetensors")), 0o600);
    assert_eq!((mode(&ckpt.join("sub")), mode(&ckpt.join("sub/x"))), (0o700, 0o600));

    // The owner salt (`TWINKLE_TOKEN_SALT` is not set, so the file is made).
    let salt_root = root.join("salted");
    std::fs::create_dir(&salt_root)?;
    let salt = twinkle::protocol::twinkle::caller::shared_salt(&salt_root)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(!salt.is_empty());
    assert_eq!(mode(&salt_root.join(".owner-salt")), 0o600);

    // state.db and its WAL files, with the directory it creates.
    let db = root.join("state/sub/state.db");
    let store = twinkle::state::Store::open_file(&db).map_err(|e| anyhow::anyhow!("{e}"))?;
    for p in ["state/sub/state.db", "state/sub/state.db-wal", "state/sub/state.db-shm"] {
        let p = root.join(p);
        assert!(p.exists(), "{} missing", p.display());
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
    assert_eq!(mode(&root.join("state/sub")), 0o700);
    drop(store);

    // Twinkle run/checkpoint metadata beside the weights.
    let meta = root.join("twinkle/owner/run-1/twinkle_run.json");
    twinkle::protocol::twinkle::runs::write_json(&meta, &serde_json::json!({"a": 1}))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!((mode(&root.join("twinkle/owner/run-1")), mode(&meta)), (0o700, 0o600));

    // The serve record in TWINKLE_HOME (it carries the status token).
    let home = root.join("home");
    let rec = twinkle::head::state_file::ServeRecord {
        control_address: "127.0.0.1:1".into(),
        gateway_address: "127.0.0.1:2".into(),
        pid: std::process::id(),
        config: "c.yaml".into(),
        token: "t".into(),
    };
    twinkle::head::state_file::write(&home, &rec).map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!((mode(&home), mode(&home.join("serve.json"))), (0o700, 0o600));
    Ok(())
}
