//! Downloading from ModelScope and the Hugging Face Hub against a loopback mock hub
//! (`hub_support`): cache layouts, no traffic once cached, resume, verification, tokens, errors,
//! offline modes, interop with huggingface_hub's cache, one transfer for concurrent downloads,
//! and `twinkle download` as a process.

mod hub_support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};

use hub_support::{ENGINE_FILES, MockHub, tiny_repo};
use twinkle::hub::progress::DownloadProgress;
use twinkle::hub::{
    BarMode, FetchOptions, HfEnv, HubEnv, HubError, MsEnv, needs_download, resolve_or_download,
    resolve_with,
};

fn env(t: &Path, hub: &MockHub) -> HubEnv {
    HubEnv {
        home: Some(t.join("home")),
        hf: HfEnv {
            hub_cache: Some(t.join("hf")),
            endpoint: Some(hub.url.clone()),
            ..HfEnv::default()
        },
        ms: MsEnv {
            cache: Some(t.join("ms")),
            endpoint: Some(hub.url.clone()),
            ..MsEnv::default()
        },
        ..HubEnv::default()
    }
}

fn quiet() -> FetchOptions {
    FetchOptions { bar: BarMode::Off, ..FetchOptions::default() }
}

fn mock() -> MockHub {
    MockHub::start(vec![tiny_repo("Org/Tiny"), tiny_repo("Org/Tiny.Model-0.5B")])
}

/// A temp dir, a mock hub and an environment pointing at both.
fn setup() -> (tempfile::TempDir, MockHub, HubEnv) {
    let t = tempfile::tempdir().unwrap();
    let hub = mock();
    let e = env(t.path(), &hub);
    (t, hub, e)
}

fn err_text(r: Result<PathBuf, HubError>) -> String {
    match r {
        Ok(p) => panic!("expected an error, got {}", p.display()),
        Err(e) => e.to_string(),
    }
}

/// The engine files are in `dir` with the mock's content, and the skipped ones are not.
fn assert_engine_files(dir: &Path, hub: &MockHub, id: &str) {
    for f in &hub.repo(id).files {
        let p = dir.join(&f.path);
        if ENGINE_FILES.contains(&f.path.as_str()) {
            assert_eq!(std::fs::read(&p).unwrap(), f.data, "{}", f.path);
        } else {
            assert!(!p.exists(), "{} should have been skipped", f.path);
        }
    }
}

fn hf_repo_dir(t: &Path) -> PathBuf {
    t.join("hf/models--Org--Tiny")
}

#[test]
fn hf_download_lays_out_the_cache_and_a_second_start_makes_no_request() {
    let (t, hub, e) = setup();
    assert!(needs_download("hf://Org/Tiny", &e));
    let progress = Arc::new(DownloadProgress::new());
    let opts = FetchOptions { progress: Some(progress.clone()), ..quiet() };
    let dir = resolve_or_download("hf://Org/Tiny", &e, &opts).unwrap();
    let commit = hub.repo("Org/Tiny").commit.clone();
    assert_eq!(dir, hf_repo_dir(t.path()).join("snapshots").join(&commit));
    assert_engine_files(&dir, &hub, "Org/Tiny");
    // refs/main holds exactly the commit; blobs are named by sha256 (LFS) or git blob sha1.
    assert_eq!(std::fs::read_to_string(hf_repo_dir(t.path()).join("refs/main")).unwrap(), commit);
    for f in hub.repo("Org/Tiny").files.iter().filter(|f| ENGINE_FILES.contains(&f.path.as_str())) {
        let etag = if f.lfs { f.sha256() } else { f.git_sha1() };
        assert!(hf_repo_dir(t.path()).join("blobs").join(&etag).is_file(), "{}", f.path);
        let link = std::fs::read_link(dir.join(&f.path)).unwrap();
        assert_eq!(link, PathBuf::from(format!("../../blobs/{etag}")));
    }
    let s = progress.snapshot();
    assert_eq!((s.files_done, s.files_total), (6, 6));
    assert_eq!(s.bytes_done, s.bytes_total);
    assert!(s.bytes_total > 420_000);
    // LFS bytes came from the storage host, each file once.
    assert!(hub.requests().iter().any(|r| r.cdn));
    assert_eq!(hub.served("model-00001-of-00002.safetensors"), 300_000);

    hub.clear();
    assert!(!needs_download("hf://Org/Tiny", &e));
    assert_eq!(resolve_or_download("hf://Org/Tiny", &e, &quiet()).unwrap(), dir);
    assert_eq!(resolve_or_download(&format!("hf://Org/Tiny@{commit}"), &e, &quiet()).unwrap(), dir);
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());
}

#[test]
fn modelscope_download_uses_the_layout_both_sdks_read() {
    let (t, hub, e) = setup();
    let id = "ms://Org/Tiny.Model-0.5B";
    let dir = resolve_or_download(id, &e, &quiet()).unwrap();
    let models = t.path().join("ms/models/Org");
    assert_eq!(dir, models.join("Tiny___Model-0___5B"));
    assert_engine_files(&dir, &hub, "Org/Tiny.Model-0.5B");
    assert_eq!(
        std::fs::read_link(models.join("Tiny.Model-0.5B")).unwrap(),
        PathBuf::from("Tiny___Model-0___5B")
    );
    assert!(
        std::fs::read_to_string(dir.join(".mv")).unwrap().starts_with("Revision:master,CreatedAt:")
    );
    assert!(dir.join(".mdl").is_file() && dir.join(".msc").is_file());
    assert!(!t.path().join("ms/models/._____temp/Org/Tiny___Model-0___5B").exists());
    if let Some(py) = hub_support::hf_python() {
        let code = "import pickle,sys; d=sys.argv[1]; print(pickle.load(open(d+'/.mdl','rb'))['id'], sorted(x['Path'] for x in pickle.load(open(d+'/.msc','rb')))[0])";
        let out = std::process::Command::new(py)
            .args(["-c", code, &dir.display().to_string()])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "Org/Tiny.Model-0.5B config.json",
            "{out:?}"
        );
    }
    hub.clear();
    assert_eq!(resolve_or_download(id, &e, &quiet()).unwrap(), dir);
    assert_eq!(resolve_or_download("Org/Tiny.Model-0.5B", &e, &quiet()).unwrap(), dir);
    assert!(hub.requests().is_empty());
    // A bare id that is in no cache downloads from ModelScope.
    let bare = resolve_or_download("Org/Tiny", &e, &quiet()).unwrap();
    assert_eq!(bare, models.join("Tiny"));
    assert!(
        hub.requests().iter().any(|r| r.target.starts_with("/api/v1/models/Org/Tiny/repo/files"))
    );
}

/// The request for `path`'s bytes after the first one, and its Range start.
fn resumed_from(hub: &MockHub, range_seen: impl Fn(&hub_support::Logged) -> bool) -> u64 {
    let ranged: Vec<_> = hub
        .requests()
        .into_iter()
        .filter(|r| range_seen(r) && r.header("range").is_some())
        .collect();
    assert!(!ranged.is_empty(), "no ranged retry in {:?}", hub.requests());
    let range = ranged[0].header("range").unwrap();
    let n = range.strip_prefix("bytes=").and_then(|r| r.strip_suffix('-')).unwrap();
    n.parse().unwrap()
}

#[test]
fn a_dropped_connection_resumes_from_the_bytes_written() {
    let (_t, hub, e) = setup();
    let shard = "model-00001-of-00002.safetensors";
    let sha = hub.repo("Org/Tiny").files[4].sha256();
    for id in ["hf://Org/Tiny", "ms://Org/Tiny"] {
        hub.clear();
        hub.set(|s| s.drop_after = Some((shard.into(), 100_000)));
        let dir = resolve_or_download(id, &e, &quiet()).unwrap();
        assert_engine_files(&dir, &hub, "Org/Tiny");
        let n = resumed_from(&hub, |r| r.cdn && r.target.contains(&sha));
        assert!(n > 0 && n <= 100_000, "{id}: resumed from {n}");
        // Bytes served for the shard: the first 100 000 plus the rest, not the file twice.
        let served = hub.served(shard);
        assert!(served >= 300_000 && served <= 300_000 + (100_000 - n), "{id}: served {served}");
    }
    // A partial file left by a killed process is continued, not restarted.
    let t2 = tempfile::tempdir().unwrap();
    let e2 = env(t2.path(), &hub);
    let blobs = t2.path().join("hf/models--Org--Tiny/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(
        blobs.join(format!("{sha}.incomplete")),
        &hub.repo("Org/Tiny").files[4].data[..50_000],
    )
    .unwrap();
    hub.clear();
    resolve_or_download("hf://Org/Tiny", &e2, &quiet()).unwrap();
    assert_eq!(resumed_from(&hub, |r| r.cdn && r.target.contains(&sha)), 50_000);
    assert_eq!(hub.served(shard), 250_000);
}

#[test]
fn transient_server_errors_are_retried() {
    let (_t, hub, e) = setup();
    for id in ["hf://Org/Tiny", "ms://Org/Tiny"] {
        // The first two requests (the listing or model info) answer 503.
        hub.set(|s| s.fail_next = 2);
        let n = hub.requests().len();
        resolve_or_download(id, &e, &quiet()).unwrap();
        assert!(hub.requests().len() > n + 2);
    }
}

#[test]
fn a_corrupted_file_is_refused_and_nothing_looks_complete() {
    let (t, hub, e) = setup();
    let shard = "model-00002-of-00002.safetensors";
    hub.set(|s| s.corrupt = Some(shard.into()));
    for id in ["hf://Org/Tiny", "ms://Org/Tiny"] {
        let msg = err_text(resolve_or_download(id, &e, &quiet()));
        assert!(msg.contains(shard) && msg.contains("sha256") && msg.contains("not kept"), "{msg}");
        assert!(needs_download(id, &e), "{id}");
        assert!(resolve_with(id, &e).is_err());
    }
    let snap = hf_repo_dir(t.path()).join("snapshots").join(&hub.repo("Org/Tiny").commit);
    assert!(!snap.join(shard).exists() && !snap.join("config.json").exists());
    let blob = hf_repo_dir(t.path()).join("blobs").join(hub.repo("Org/Tiny").files[5].sha256());
    assert!(!blob.exists());
    let ms_dir = t.path().join("ms/models/Org/Tiny");
    assert!(!ms_dir.join(shard).exists() && !ms_dir.join("config.json").exists());
    // Once the hub serves good bytes, the download completes.
    hub.set(|s| s.corrupt = None);
    resolve_or_download("hf://Org/Tiny", &e, &quiet()).unwrap();
}

#[test]
fn private_repos_name_the_token_variable_and_the_token_stays_with_the_hub() {
    let t = tempfile::tempdir().unwrap();
    let hub = mock();
    hub.set(|s| s.token = Some("secret".into()));
    let mut e = env(t.path(), &hub);
    let msg = err_text(resolve_or_download("hf://Org/Tiny", &e, &quiet()));
    assert!(msg.contains("HF_TOKEN") && msg.contains("401") && msg.contains("Org/Tiny"), "{msg}");
    let msg = err_text(resolve_or_download("ms://Org/Tiny", &e, &quiet()));
    assert!(
        msg.contains("MODELSCOPE_API_TOKEN") && msg.contains("401") && msg.contains("ModelScope"),
        "{msg}"
    );
    let mut wrong = e.clone();
    wrong.hf.token = Some("nope".into());
    let msg = err_text(resolve_or_download("hf://Org/Tiny", &wrong, &quiet()));
    assert!(msg.contains("refused") && msg.contains("HF_TOKEN"), "{msg}");

    e.hf.token = Some("secret".into());
    e.ms.token = Some("secret".into());
    hub.clear();
    resolve_or_download("hf://Org/Tiny", &e, &quiet()).unwrap();
    resolve_or_download("ms://Org/Tiny", &e, &quiet()).unwrap();
    let reqs = hub.requests();
    assert!(
        reqs.iter().filter(|r| !r.cdn).all(|r| r.header("authorization") == Some("Bearer secret"))
    );
    assert!(
        reqs.iter()
            .filter(|r| !r.cdn && r.target.contains("/api/v1/"))
            .all(|r| r.header("cookie") == Some("m_session_id=secret"))
    );
    // The storage host (another origin) never sees the token.
    assert!(reqs.iter().any(|r| r.cdn));
    assert!(
        reqs.iter()
            .filter(|r| r.cdn)
            .all(|r| r.header("authorization").is_none() && r.header("cookie").is_none())
    );
}

#[test]
fn missing_repos_and_revisions_say_which_hub_id_and_revision() {
    let (t, _hub, mut e) = setup();
    let cases = [
        ("hf://Org/Nope", &["Hugging Face Hub", "Org/Nope", "`main`"][..]),
        ("hf://Org/Tiny@v9", &["Hugging Face Hub", "Org/Tiny", "no revision `v9`"]),
        ("ms://Org/Nope", &["ModelScope", "Org/Nope", "does not exist", "`master`"]),
        ("ms://Org/Tiny@v9", &["ModelScope", "Org/Tiny", "no revision `v9`"]),
    ];
    for (id, words) in cases {
        let msg = err_text(resolve_or_download(id, &e, &quiet()));
        for w in words {
            assert!(msg.contains(w), "{id}: `{w}` not in: {msg}");
        }
    }
    // With a token the Hub answers 404 RepoNotFound for a missing repo.
    e.hf.token = Some("t".into());
    let msg = err_text(resolve_or_download("hf://Org/Nope", &e, &quiet()));
    assert!(
        msg.contains("does not exist") && msg.contains("Org/Nope") && msg.contains("`main`"),
        "{msg}"
    );
    // A tag downloads and is recorded in refs/.
    let dir = resolve_or_download(
        "hf://Org/Tiny",
        &e,
        &FetchOptions { revision: Some("v1.0".into()), ..quiet() },
    )
    .unwrap();
    let refs = std::fs::read_to_string(hf_repo_dir(t.path()).join("refs/v1.0")).unwrap();
    assert!(dir.ends_with(&refs));
    let msg = err_text(resolve_or_download(
        "hf://Org/Tiny@v1.0",
        &e,
        &FetchOptions { revision: Some("main".into()), ..quiet() },
    ));
    assert!(msg.contains("two revisions"), "{msg}");
}

#[test]
fn offline_modes_use_the_cache_only() {
    let t = tempfile::tempdir().unwrap();
    let hub = mock();
    let online = env(t.path(), &hub);
    let mut hf_off = online.clone();
    hf_off.hf.offline = true;
    let all_off = HubEnv { twinkle_offline: true, ..online.clone() };
    let msg = err_text(resolve_or_download("hf://Org/Tiny", &hf_off, &quiet()));
    assert!(msg.contains("HF_HUB_OFFLINE=1") && msg.contains("models--Org--Tiny"), "{msg}");
    let msg = err_text(resolve_or_download("ms://Org/Tiny", &all_off, &quiet()));
    assert!(msg.contains("TWINKLE_OFFLINE=1") && msg.contains("ModelScope"), "{msg}");
    let msg = err_text(resolve_or_download("hf://Org/Tiny", &all_off, &quiet()));
    assert!(msg.contains("TWINKLE_OFFLINE=1"), "{msg}");
    assert!(hub.requests().is_empty());
    let hf = resolve_or_download("hf://Org/Tiny", &online, &quiet()).unwrap();
    let ms = resolve_or_download("ms://Org/Tiny", &online, &quiet()).unwrap();
    hub.clear();
    assert_eq!(resolve_or_download("hf://Org/Tiny", &hf_off, &quiet()).unwrap(), hf);
    assert_eq!(resolve_or_download("hf://Org/Tiny", &all_off, &quiet()).unwrap(), hf);
    assert_eq!(resolve_or_download("ms://Org/Tiny", &all_off, &quiet()).unwrap(), ms);
    assert!(hub.requests().is_empty());
}

#[test]
fn huggingface_hub_reads_our_cache() {
    let (t, _hub, e) = setup();
    let dir = resolve_or_download("hf://Org/Tiny", &e, &quiet()).unwrap();
    let Some(py) = hub_support::hf_python() else { return };
    let code = "from huggingface_hub import snapshot_download; print(snapshot_download('Org/Tiny', local_files_only=True))";
    let out = std::process::Command::new(py)
        .args(["-c", code])
        .env("HF_HUB_CACHE", t.path().join("hf"))
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env_remove("HF_HOME")
        .env_remove("HF_ENDPOINT")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()), dir);
}

#[test]
fn a_cache_huggingface_hub_downloaded_is_used_without_network() {
    let (t, hub, e) = setup();
    let Some(py) = hub_support::hf_python() else { return };
    let code =
        "from huggingface_hub import snapshot_download; print(snapshot_download('Org/Tiny'))";
    let out = std::process::Command::new(py)
        .args(["-c", code])
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_HUB_CACHE", t.path().join("hf"))
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("HF_HUB_DISABLE_XET", "1")
        .env_remove("HF_HOME")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let theirs = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
    hub.clear();
    assert!(!needs_download("hf://Org/Tiny", &e));
    assert_eq!(resolve_or_download("hf://Org/Tiny", &e, &quiet()).unwrap(), theirs);
    assert!(hub.requests().is_empty());
}

#[test]
fn caches_written_by_the_python_clients_are_found_without_network() {
    let (t, hub, e) = setup();
    // huggingface_hub: blobs + relative symlinks + refs without a newline, two revisions.
    let repo = t.path().join("hf/models--Org--Hand");
    let (c1, c2) = ("1".repeat(40), "2".repeat(40));
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("blobs/aaaa"), "{}").unwrap();
    for (c, r) in [(&c1, "main"), (&c2, "v2")] {
        std::fs::create_dir_all(repo.join("snapshots").join(c)).unwrap();
        std::os::unix::fs::symlink(
            "../../blobs/aaaa",
            repo.join("snapshots").join(c).join("config.json"),
        )
        .unwrap();
        std::fs::write(repo.join("refs").join(r), c).unwrap();
    }
    assert_eq!(
        resolve_or_download("hf://Org/Hand", &e, &quiet()).unwrap(),
        repo.join("snapshots").join(&c1)
    );
    assert_eq!(
        resolve_or_download("hf://Org/Hand@v2", &e, &quiet()).unwrap(),
        repo.join("snapshots").join(&c2)
    );
    assert_eq!(
        resolve_or_download(&format!("hf://Org/Hand@{c2}"), &e, &quiet()).unwrap(),
        repo.join("snapshots").join(&c2)
    );
    // ModelScope ≥ 1.38's layout, under $MODELSCOPE_CACHE and under ~/.cache/modelscope.
    for (root, name) in
        [(t.path().join("ms"), "New"), (t.path().join("home/.cache/modelscope"), "Home")]
    {
        let snap = root.join(format!("models/Org--{name}/snapshots/master"));
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        assert_eq!(resolve_or_download(&format!("ms://Org/{name}"), &e, &quiet()).unwrap(), snap);
        assert!(!needs_download(&format!("Org/{name}"), &e));
    }
    // The old layout records its revision in `.mv`: another revision is not taken from it.
    let old = t.path().join("ms/models/Org/Old___1");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("config.json"), "{}").unwrap();
    std::fs::write(old.join(".mv"), "Revision:master,CreatedAt:1").unwrap();
    assert_eq!(resolve_or_download("ms://Org/Old.1", &e, &quiet()).unwrap(), old);
    assert_eq!(resolve_or_download("ms://Org/Old.1@master", &e, &quiet()).unwrap(), old);
    assert!(needs_download("ms://Org/Old.1@v2", &e));
    assert!(hub.requests().is_empty());
}

#[test]
fn concurrent_downloads_of_one_model_share_one_transfer() {
    let t = tempfile::tempdir().unwrap();
    let hub = Arc::new(mock());
    hub.set(|s| s.slow = true);
    for (id, lock) in [
        ("hf://Org/Tiny", "hf/.locks/models--Org--Tiny/twinkle.lock"),
        ("ms://Org/Tiny", "ms/.lock/Org___Tiny"),
    ] {
        hub.clear();
        let e = env(t.path(), &hub);
        // Another process holds the model's lock: both downloads wait for it.
        let lock = t.path().join(lock);
        std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
        let file = std::fs::File::create(&lock).unwrap();
        let held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).unwrap();
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (e, b) = (e.clone(), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    b.wait();
                    resolve_or_download(id, &e, &quiet())
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(hub.requests().is_empty(), "{id}: a download ran while the lock was held");
        drop(held);
        let dirs: Vec<PathBuf> = threads.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
        assert_eq!(dirs[0], dirs[1]);
        for f in
            hub.repo("Org/Tiny").files.iter().filter(|f| ENGINE_FILES.contains(&f.path.as_str()))
        {
            assert_eq!(
                hub.served(&f.path),
                f.data.len() as u64,
                "{id}: {} fetched more than once",
                f.path
            );
        }
    }
}

fn twinkle(t: &Path, hub: &MockHub, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_twinkle"));
    for v in [
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HOME",
        "HF_TOKEN",
        "HF_HUB_OFFLINE",
        "MODELSCOPE_CACHE",
        "MODELSCOPE_API_TOKEN",
        "MODELSCOPE_DOMAIN",
        "TWINKLE_OFFLINE",
        "XDG_CACHE_HOME",
    ] {
        cmd.env_remove(v);
    }
    cmd.args(["download"])
        .args(args)
        .env("HOME", t)
        .env("HF_ENDPOINT", &hub.url)
        .env("MODELSCOPE_ENDPOINT", &hub.url)
        .output()
        .unwrap()
}

#[test]
fn twinkle_download_runs_as_a_process() {
    let t = tempfile::tempdir().unwrap();
    let hub = mock();
    let out = twinkle(t.path(), &hub, &["ms://Org/Tiny", "--progress", "lines"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(dir, t.path().join(".cache/modelscope/hub/models/Org/Tiny"));
    assert_engine_files(&dir, &hub, "Org/Tiny");
    assert!(String::from_utf8_lossy(&out.stderr).contains("downloaded Org/Tiny"));

    let out = twinkle(
        t.path(),
        &hub,
        &[
            "hf://Org/Tiny",
            "--revision",
            "v1.0",
            "--include",
            "*.md",
            "--include",
            "config.json",
            "--progress",
            "bars",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(dir.starts_with(t.path().join(".cache/huggingface/hub/models--Org--Tiny/snapshots")));
    assert!(dir.join("README.md").is_file() && dir.join("config.json").is_file());
    assert!(!dir.join("tokenizer.json").exists());

    let out = twinkle(t.path(), &hub, &["ms://Org/Nope"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Org/Nope") && err.contains("does not exist") && err.contains("ModelScope"),
        "{err}"
    );
    let out = twinkle(t.path(), &hub, &["not a model id"]);
    assert_ne!(out.status.code(), Some(0));
}
