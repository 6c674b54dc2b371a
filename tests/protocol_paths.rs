//! `tinker://` paths, ids and the save-directory mapping: table tests including traversal attempts.

use std::path::Path;

use twinkle::protocol::tinker::paths::{
    CheckpointKind, PathError, TinkerPath, checkpoint_dir, format_model_id,
    format_sampling_session_id, owner_hash, parse_model_id, parse_sampling_session_id, run_dir,
    validate_session_id,
};

#[test]
fn valid_paths_parse_and_print_back() {
    let cases = [
        (
            "tinker://sess-1:train:0/weights/ckpt-1",
            "sess-1:train:0",
            CheckpointKind::Weights,
            "ckpt-1",
        ),
        (
            "tinker://s:train:12/sampler_weights/step_0005",
            "s:train:12",
            CheckpointKind::SamplerWeights,
            "step_0005",
        ),
        (
            "tinker://a.b:train:3/external_weights/v1.0",
            "a.b:train:3",
            CheckpointKind::ExternalWeights,
            "v1.0",
        ),
    ];
    for (text, run, kind, name) in cases {
        let p = TinkerPath::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!((p.run_id.as_str(), p.kind, p.name.as_str()), (run, kind, name));
        assert_eq!(p.to_string(), text);
    }
    let p = TinkerPath::parse("tinker://r:train:0/weights/x").expect("valid");
    assert_eq!(p.checkpoint_id(), "weights/x");
    assert_eq!(TinkerPath::from_checkpoint_id("r:train:0", "weights/x"), Ok(p));
    assert_eq!(CheckpointKind::SamplerWeights.checkpoint_type(), "sampler");
}

#[test]
fn malformed_and_traversal_paths_are_refused() {
    let bad = [
        "tinker://../../etc/weights/x",
        "tinker://../weights/x",
        "tinker://run/weights/..",
        "tinker://run/weights/.",
        "tinker://run/weights/.hidden",
        "tinker://run/weights/a..b",
        "tinker:///etc/passwd",
        "tinker:///weights/x",
        "tinker://run/weights/",
        "tinker://run//x",
        "tinker://run/weights/x/y",
        "tinker://run/weights",
        "tinker://run/checkpoints/x",
        "tinker://run/weights/a%2F..%2Fb",
        "tinker://run%2F..%2Fx/weights/a",
        "tinker://run/weights/a\\b",
        "tinker://run/weights/a\0b",
        "tinker://run/weights/a b",
        "tinker://run/weights/ünï",
        "/etc/passwd",
        "twinkle://run/weights/x",
        "TINKER://run/weights/x",
        "",
    ];
    for text in bad {
        assert!(TinkerPath::parse(text).is_err(), "accepted {text:?}");
    }
    let long = format!("tinker://run/weights/{}", "a".repeat(129));
    assert!(TinkerPath::parse(&long).is_err());
    assert!(TinkerPath::from_checkpoint_id("r", "weights").is_err());
    assert!(TinkerPath::from_checkpoint_id("r", "weights/../x").is_err());
    assert!(TinkerPath::from_checkpoint_id("../r", "weights/x").is_err());
}

#[test]
fn model_and_sampling_ids() {
    assert_eq!(format_model_id("sess-1", 0), "sess-1:train:0");
    assert_eq!(format_sampling_session_id("sess-1", 7), "sess-1:sample:7");
    let m = parse_model_id("sess-1:train:42").expect("valid");
    assert_eq!((m.session_id.as_str(), m.seq), ("sess-1", 42));
    assert_eq!(parse_sampling_session_id("s:sample:3").expect("valid").seq, 3);
    for bad in [
        "sess-1:sample:0",
        "sess-1:train:",
        "sess-1:train:-1",
        "sess-1:train:+1",
        "a:b:train:1",
        "sess/1:train:0",
        ":train:0",
        "s:train:99999999999999999999999",
        "s:train: 1",
    ] {
        assert!(parse_model_id(bad).is_err(), "accepted {bad:?}");
    }
    assert!(validate_session_id("sess-abc_1.2").is_ok());
    assert!(validate_session_id("a:b").is_err());
}

#[test]
fn owner_hash_is_hmac_sha256() {
    // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
    assert_eq!(
        owner_hash(b"Jefe", "what do ya want for nothing?"),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    assert_ne!(owner_hash(b"salt", "tml-a"), owner_hash(b"salt", "tml-b"));
    assert_ne!(owner_hash(b"salt1", "tml-a"), owner_hash(b"salt2", "tml-a"));
}

#[test]
fn checkpoint_dirs_stay_inside_the_root() {
    let root = tempfile::tempdir().expect("tempdir");
    let ns = owner_hash(b"salt", "tml-local");
    let p = TinkerPath::parse("tinker://s:train:0/weights/ckpt-1").expect("valid");
    let dir = checkpoint_dir(root.path(), &ns, &p).expect("inside");
    assert_eq!(dir, root.path().join(&ns).join("s:train:0").join("weights").join("ckpt-1"));
    assert_eq!(
        run_dir(root.path(), &ns, "s:train:0").expect("ok"),
        root.path().join(&ns).join("s:train:0")
    );

    // Fields set by hand (bypassing parse) are re-validated.
    let forged =
        TinkerPath { run_id: "..".into(), kind: CheckpointKind::Weights, name: "x".into() };
    assert!(checkpoint_dir(root.path(), &ns, &forged).is_err());
    let forged =
        TinkerPath { run_id: "r".into(), kind: CheckpointKind::Weights, name: "/etc".into() };
    assert!(checkpoint_dir(root.path(), &ns, &forged).is_err());
    for bad_ns in ["..", "", "/tmp", "ABC", &ns[..63]] {
        assert!(checkpoint_dir(root.path(), bad_ns, &p).is_err(), "accepted namespace {bad_ns:?}");
    }
    assert!(run_dir(root.path(), &ns, "../x").is_err());
}

#[test]
fn a_symlink_inside_the_root_cannot_lead_outside() {
    let root = tempfile::tempdir().expect("tempdir");
    let outside = tempfile::tempdir().expect("tempdir");
    let ns = owner_hash(b"salt", "tml-local");
    std::fs::create_dir_all(root.path().join(&ns)).expect("mkdir");
    std::os::unix::fs::symlink(outside.path(), root.path().join(&ns).join("r:train:0"))
        .expect("symlink");
    let p = TinkerPath::parse("tinker://r:train:0/weights/x").expect("valid");
    let err = checkpoint_dir(root.path(), &ns, &p).expect_err("escapes through the symlink");
    assert!(matches!(err, PathError::Escapes(_)));
    assert!(Path::new(outside.path()).exists());
    // A dangling symlink is refused too (creating the directory would follow it).
    let gone = outside.path().join("missing");
    std::os::unix::fs::symlink(&gone, root.path().join(&ns).join("d:train:0")).expect("symlink");
    let p = TinkerPath::parse("tinker://d:train:0/weights/x").expect("valid");
    assert!(matches!(checkpoint_dir(root.path(), &ns, &p), Err(PathError::Escapes(_))));
    // Paths that do not exist yet below a real directory are fine.
    let p = TinkerPath::parse("tinker://new:train:0/weights/x").expect("valid");
    assert!(checkpoint_dir(root.path(), &ns, &p).is_ok());
}
