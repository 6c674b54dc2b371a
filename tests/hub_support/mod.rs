//! A loopback mock of the Hugging Face Hub and ModelScope download APIs, as
//! `specs/hub-apis.md` documents them: HF model info, `HEAD`/`GET /resolve` with
//! `X-Repo-Commit`/`ETag`/`X-Linked-Etag`/`X-Linked-Size`, 302 to a storage host (a second port,
//! so a different origin) for LFS files, ModelScope's envelope, file listing and `/repo` download,
//! byte ranges (206/416), and errors with `X-Error-Code`. It logs every request and counts the
//! body bytes served per file; switches require a token, drop a connection once, corrupt a file
//! or slow transfers down.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha1::Sha1;
use sha2::{Digest, Sha256};

pub struct MockFile {
    pub path: String,
    pub data: Vec<u8>,
    /// Served by a 302 to the storage host (and checksummed by sha256 on HF).
    pub lfs: bool,
}

impl MockFile {
    pub fn sha256(&self) -> String {
        hex(&Sha256::digest(&self.data))
    }
    pub fn git_sha1(&self) -> String {
        let mut h = Sha1::new();
        h.update(format!("blob {}\0", self.data.len()).as_bytes());
        h.update(&self.data);
        hex(&h.finalize())
    }
}

pub struct MockRepo {
    pub id: String,
    pub commit: String,
    /// Branch/tag names (besides the commit itself) that resolve to `commit`.
    pub revisions: Vec<String>,
    pub files: Vec<MockFile>,
}

#[derive(Default)]
pub struct Switches {
    /// Requests to the hub must carry `Bearer <token>` (or ModelScope's cookie).
    pub token: Option<String>,
    /// The next body of the file with this path stops after N bytes and the connection closes.
    pub drop_after: Option<(String, usize)>,
    /// Bodies of the file with this path have one byte flipped.
    pub corrupt: Option<String>,
    /// Sleep between body chunks (makes downloads overlap in the concurrency test).
    pub slow: bool,
    /// With `slow`: the sleep between 16 KiB chunks (default 5 ms).
    pub chunk_delay: Option<Duration>,
    /// The next N requests (hub or storage) answer 503.
    pub fail_next: u32,
}

/// One request as the mock saw it.
#[derive(Debug, Clone)]
pub struct Logged {
    /// Taken by the storage (CDN) listener rather than the hub API.
    pub cdn: bool,
    pub method: String,
    /// Path and query.
    pub target: String,
    /// Every request header, by lowercase name.
    pub headers: HashMap<String, String>,
}

impl Logged {
    /// The value of header `name` (lowercase), if the request sent it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

struct State {
    repos: Vec<MockRepo>,
    switches: Mutex<Switches>,
    log: Mutex<Vec<Logged>>,
    served: Mutex<HashMap<String, u64>>,
    cdn_url: String,
}

pub struct MockHub {
    pub url: String,
    pub cdn_url: String,
    state: Arc<State>,
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Deterministic pseudo-random bytes.
pub fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A small model repo: config, tokenizer files, a sharded safetensors pair + index (LFS), and
/// files the downloader must skip (a .bin weight, a README, .gitattributes).
pub fn tiny_repo(id: &str) -> MockRepo {
    let f = |path: &str, data: Vec<u8>, lfs| MockFile { path: path.into(), data, lfs };
    let index = r#"{"metadata":{},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#;
    MockRepo {
        id: id.into(),
        commit: hex(&Sha1::digest(id.as_bytes())),
        revisions: vec!["main".into(), "master".into(), "v1.0".into()],
        files: vec![
            f("config.json", br#"{"model_type":"qwen3","hidden_size":8}"#.to_vec(), false),
            f("tokenizer.json", bytes(3000, 1), false),
            f("tokenizer_config.json", br#"{"chat_template":"{{ messages }}"}"#.to_vec(), false),
            f("model.safetensors.index.json", index.as_bytes().to_vec(), false),
            f("model-00001-of-00002.safetensors", bytes(300_000, 2), true),
            f("model-00002-of-00002.safetensors", bytes(120_000, 3), true),
            f("pytorch_model.bin", bytes(50_000, 4), true),
            f("README.md", b"# tiny\n".to_vec(), false),
            f(".gitattributes", b"*.safetensors filter=lfs\n".to_vec(), false),
        ],
    }
}

/// The files the downloader is expected to fetch from [`tiny_repo`].
pub const ENGINE_FILES: [&str; 6] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
];

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let escaped = (b[i] == b'%' && i + 2 < b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        if let Some(v) = escaped {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Req {
    method: String,
    path: String,
    query: HashMap<String, String>,
    headers: HashMap<String, String>,
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The file these body bytes belong to (for the served-bytes count and the switches).
    file: Option<String>,
    /// The full length when `body` is a range of the file.
    content_length: usize,
}

fn resp(status: u16, headers: Vec<(&str, String)>, body: Vec<u8>) -> Resp {
    let content_length = body.len();
    Resp {
        status,
        headers: headers.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        body,
        file: None,
        content_length,
    }
}

fn json(status: u16, v: serde_json::Value, extra: Vec<(&str, String)>) -> Resp {
    let mut h = vec![("Content-Type", "application/json".to_string())];
    h.extend(extra);
    resp(status, h, v.to_string().into_bytes())
}

fn ms_env(status: u16, code: i64, data: serde_json::Value, message: &str) -> Resp {
    json(
        status,
        serde_json::json!({"Code": code, "Data": data, "Message": message, "RequestId": "mock", "Success": code == 200}),
        vec![],
    )
}

impl State {
    fn repo(&self, org: &str, name: &str) -> Option<&MockRepo> {
        self.repos.iter().find(|r| r.id == format!("{org}/{name}"))
    }

    fn authorized(&self, req: &Req) -> Result<(), bool> {
        let sw = self.switches.lock().unwrap();
        let Some(t) = &sw.token else { return Ok(()) };
        let bearer = req.headers.get("authorization").map(String::as_str);
        let cookie = req.headers.get("cookie").map(String::as_str);
        if bearer == Some(&format!("Bearer {t}")) || cookie == Some(&format!("m_session_id={t}")) {
            Ok(())
        } else {
            Err(bearer.is_some() || cookie.is_some())
        }
    }

    /// The body (or its requested range) of `file`.
    fn file_body(&self, file: &MockFile, req: &Req, mut headers: Vec<(&str, String)>) -> Resp {
        let len = file.data.len();
        headers.push(("Accept-Ranges", "bytes".into()));
        let range = req.headers.get("range").and_then(|r| {
            let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
            let a: usize = a.parse().ok()?;
            let b: usize = if b.is_empty() { len.saturating_sub(1) } else { b.parse().ok()? };
            Some((a, b.min(len.saturating_sub(1))))
        });
        let mut r = match range {
            Some((a, _)) if a >= len => {
                headers.push(("Content-Range", format!("bytes */{len}")));
                return resp(416, headers, vec![]);
            }
            Some((a, b)) => {
                headers.push(("Content-Range", format!("bytes {a}-{b}/{len}")));
                resp(206, headers, file.data[a..=b].to_vec())
            }
            None => resp(200, headers, file.data.clone()),
        };
        if self.switches.lock().unwrap().corrupt.as_deref() == Some(&file.path)
            && !r.body.is_empty()
        {
            let mid = r.body.len() / 2;
            r.body[mid] ^= 0xff;
        }
        r.content_length = r.body.len();
        r.file = Some(file.path.clone());
        if req.method == "HEAD" {
            r.body.clear();
        }
        r
    }

    fn lfs_redirect(&self, file: &MockFile, mut h: Vec<(&str, String)>) -> Resp {
        h.push(("Location", format!("{}/blob/{}", self.cdn_url, file.sha256())));
        resp(302, h, vec![])
    }

    fn route_cdn(&self, req: &Req) -> Resp {
        let sha = req.path.strip_prefix("/blob/").unwrap_or("");
        let file = self.repos.iter().flat_map(|r| &r.files).find(|f| f.sha256() == sha);
        match file {
            Some(f) => self.file_body(f, req, vec![("ETag", format!("\"{}\"", f.sha256()))]),
            None => resp(404, vec![], b"no such blob".to_vec()),
        }
    }

    fn route_hub(&self, req: &Req) -> Resp {
        let parts: Vec<&str> = req.path.trim_start_matches('/').splitn(6, '/').collect();
        match parts.as_slice() {
            ["api", "v1", "models", org, name, rest] => {
                self.ms(req, &pct_decode(org), &pct_decode(name), Some(rest))
            }
            ["api", "v1", "models", org, name] => {
                self.ms(req, &pct_decode(org), &pct_decode(name), None)
            }
            ["api", "models", org, name, "revision", rev] => {
                self.hf_info(req, org, name, &pct_decode(rev))
            }
            ["api", "models", org, name, "tree", rev] => {
                self.hf_tree(req, org, name, &pct_decode(rev))
            }
            [org, name, "resolve", rev, path @ ..] => {
                let path = pct_decode(&path.join("/"));
                self.hf_resolve(req, org, name, &pct_decode(rev), &path)
            }
            _ => resp(404, vec![], b"no route".to_vec()),
        }
    }

    fn hf_err(&self, req: &Req, org: &str, name: &str, rev: &str) -> Result<&MockRepo, Resp> {
        let code = |status, c: &str, m: &str| {
            json(
                status,
                serde_json::json!({"error": m}),
                vec![("X-Error-Code", c.into()), ("X-Error-Message", m.into())],
            )
        };
        let repo = match (self.authorized(req), self.repo(org, name)) {
            (Err(true), _) => {
                return Err(json(
                    401,
                    serde_json::json!({"error": "Invalid credentials in Authorization header"}),
                    vec![("X-Error-Message", "Invalid credentials in Authorization header".into())],
                ));
            }
            // Anonymous requests for a missing or private repo get 401 RepoNotFound.
            (Err(false), _) => return Err(code(401, "RepoNotFound", "Repository not found")),
            (Ok(()), None) if !req.headers.contains_key("authorization") => {
                return Err(code(401, "RepoNotFound", "Repository not found"));
            }
            (Ok(()), None) => return Err(code(404, "RepoNotFound", "Repository not found")),
            (Ok(()), Some(r)) => r,
        };
        if rev != repo.commit && !repo.revisions.iter().any(|r| r == rev) {
            return Err(code(404, "RevisionNotFound", &format!("Invalid rev id: {rev}")));
        }
        Ok(repo)
    }

    fn hf_info(&self, req: &Req, org: &str, name: &str, rev: &str) -> Resp {
        let repo = match self.hf_err(req, org, name, rev) {
            Ok(r) => r,
            Err(e) => return e,
        };
        let siblings: Vec<_> =
            repo.files.iter().map(|f| serde_json::json!({"rfilename": f.path})).collect();
        json(
            200,
            serde_json::json!({"id": repo.id, "sha": repo.commit, "siblings": siblings, "private": false}),
            vec![],
        )
    }

    /// `/api/models/{id}/tree/{rev}?recursive=true` (huggingface_hub ≥ 1.0 lists files with it).
    fn hf_tree(&self, req: &Req, org: &str, name: &str, rev: &str) -> Resp {
        let repo = match self.hf_err(req, org, name, rev) {
            Ok(r) => r,
            Err(e) => return e,
        };
        let entries: Vec<_> = repo
            .files
            .iter()
            .map(|f| {
                let mut e = serde_json::json!({"type": "file", "path": f.path, "size": f.data.len(), "oid": f.git_sha1()});
                if f.lfs {
                    e["lfs"] = serde_json::json!({"oid": f.sha256(), "size": f.data.len(), "pointerSize": 134});
                }
                e
            })
            .collect();
        json(200, serde_json::Value::Array(entries), vec![])
    }

    fn hf_resolve(&self, req: &Req, org: &str, name: &str, rev: &str, path: &str) -> Resp {
        let repo = match self.hf_err(req, org, name, rev) {
            Ok(r) => r,
            Err(e) => return e,
        };
        let Some(file) = repo.files.iter().find(|f| f.path == path) else {
            return json(
                404,
                serde_json::json!({"error": "Entry not found"}),
                vec![
                    ("X-Error-Code", "EntryNotFound".into()),
                    ("X-Repo-Commit", repo.commit.clone()),
                ],
            );
        };
        let mut h = vec![("X-Repo-Commit", repo.commit.clone())];
        if file.lfs {
            h.push(("X-Linked-Etag", format!("\"{}\"", file.sha256())));
            h.push(("X-Linked-Size", file.data.len().to_string()));
            h.push(("ETag", format!("\"{}\"", file.git_sha1())));
            return self.lfs_redirect(file, h);
        }
        h.push(("ETag", format!("\"{}\"", file.git_sha1())));
        self.file_body(file, req, h)
    }

    fn ms(&self, req: &Req, org: &str, name: &str, rest: Option<&str>) -> Resp {
        if self.authorized(req).is_err() {
            return ms_env(401, 10010901, serde_json::Value::Null, "Unauthorized: please log in");
        }
        let Some(repo) = self.repo(org, name) else {
            return ms_env(
                404,
                10010205001,
                serde_json::Value::Null,
                &format!("model {org}/{name} not exists"),
            );
        };
        let rev = req.query.get("Revision").cloned().unwrap_or_else(|| "master".into());
        let known = rev == repo.commit || repo.revisions.contains(&rev);
        match rest {
            None => ms_env(200, 200, serde_json::json!({"Name": name, "Path": org}), "success"),
            Some(_) if !known => ms_env(
                404,
                10010205002,
                serde_json::Value::Null,
                &format!("revision {rev} not exists"),
            ),
            Some("repo/files") => {
                let mut files: Vec<_> = repo
                    .files
                    .iter()
                    .map(|f| {
                        serde_json::json!({"Name": f.path.rsplit('/').next(), "Path": f.path, "Type": "blob",
                            "Size": f.data.len(), "Sha256": f.sha256(), "IsLFS": f.lfs, "Revision": repo.commit,
                            "Mode": "33188", "CommitMessage": "init", "CommittedDate": 1726665606, "InCheck": false})
                    })
                    .collect();
                files.push(
                    serde_json::json!({"Name": "onnx", "Path": "onnx", "Type": "tree", "Size": 0}),
                );
                ms_env(200, 200, serde_json::json!({"Files": files}), "success")
            }
            Some("repo") => {
                let path = req.query.get("FilePath").cloned().unwrap_or_default();
                match repo.files.iter().find(|f| f.path == path) {
                    Some(f) if f.lfs => self.lfs_redirect(f, vec![]),
                    Some(f) => self.file_body(f, req, vec![]),
                    None => ms_env(404, 10010205003, serde_json::Value::Null, "file not exists"),
                }
            }
            Some(_) => resp(404, vec![], b"no route".to_vec()),
        }
    }
}

fn read_req(stream: &TcpStream) -> Option<Req> {
    let mut r = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut it = line.split_whitespace();
    let method = it.next()?.to_string();
    let target = it.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (pct_decode(k), pct_decode(v)))
        .collect();
    Some(Req { method, path: path.to_string(), query, headers })
}

fn reason(s: u16) -> &'static str {
    match s {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        503 => "Service Unavailable",
        _ => "Other",
    }
}

fn serve_conn(state: &State, mut stream: TcpStream, cdn: bool) {
    let Some(req) = read_req(&stream) else { return };
    state.log.lock().unwrap().push(Logged {
        cdn,
        method: req.method.clone(),
        target: req.path.clone()
            + &req.query.iter().map(|(k, v)| format!("&{k}={v}")).collect::<String>(),
        headers: req.headers.clone(),
    });
    let fail = {
        let mut sw = state.switches.lock().unwrap();
        let f = sw.fail_next > 0;
        sw.fail_next = sw.fail_next.saturating_sub(1);
        f
    };
    let r = if fail {
        resp(503, vec![], b"try again".to_vec())
    } else if cdn {
        state.route_cdn(&req)
    } else {
        state.route_hub(&req)
    };
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        r.status,
        reason(r.status),
        r.content_length
    );
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    let mut limit = r.body.len();
    let mut slow = None;
    if let Some(f) = &r.file {
        let mut sw = state.switches.lock().unwrap();
        slow = sw.slow.then(|| sw.chunk_delay.unwrap_or(Duration::from_millis(5)));
        if let Some((p, n)) = sw.drop_after.clone()
            && &p == f
            && !r.body.is_empty()
        {
            limit = n.min(limit);
            sw.drop_after = None;
        }
    }
    for chunk in r.body[..limit].chunks(16 << 10) {
        // Counted before writing: the client may finish (and the test look) before we return.
        if let Some(f) = &r.file {
            *state.served.lock().unwrap().entry(f.clone()).or_default() += chunk.len() as u64;
        }
        if stream.write_all(chunk).is_err() {
            break;
        }
        if let Some(d) = slow {
            std::thread::sleep(d);
        }
    }
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Both);
}

fn listen(state: Arc<State>, listener: TcpListener, cdn: bool) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let st = Arc::clone(&state);
            std::thread::spawn(move || serve_conn(&st, conn, cdn));
        }
    });
}

impl MockHub {
    pub fn start(repos: Vec<MockRepo>) -> Self {
        let hub = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://127.0.0.1:{}", hub.local_addr().unwrap().port());
        let cdn_url = format!("http://127.0.0.1:{}", cdn.local_addr().unwrap().port());
        let state = Arc::new(State {
            repos,
            switches: Mutex::new(Switches::default()),
            log: Mutex::new(Vec::new()),
            served: Mutex::new(HashMap::new()),
            cdn_url: cdn_url.clone(),
        });
        listen(Arc::clone(&state), hub, false);
        listen(Arc::clone(&state), cdn, true);
        MockHub { url, cdn_url, state }
    }

    pub fn set(&self, f: impl FnOnce(&mut Switches)) {
        f(&mut self.state.switches.lock().unwrap());
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.state.log.lock().unwrap().clear();
        self.state.served.lock().unwrap().clear();
    }

    /// Body bytes of `path` served so far (all requests, hub and storage).
    pub fn served(&self, path: &str) -> u64 {
        self.state.served.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    pub fn repo(&self, id: &str) -> &MockRepo {
        self.state.repos.iter().find(|r| r.id == id).unwrap()
    }
}

/// The venv python with huggingface_hub (`TWINKLE_VENV`, else `~/.cache/twinkle/venv`), or None
/// (the test prints SKIP and passes) unless `TWINKLE_REQUIRE_SDK=1`.
pub fn hf_python() -> Option<PathBuf> {
    let venv = std::env::var_os("TWINKLE_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/twinkle/venv")));
    let py = venv.map(|v| v.join("bin/python"));
    let ok = py.as_ref().is_some_and(|p| {
        std::process::Command::new(p)
            .args(["-c", "import huggingface_hub"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if ok {
        return py;
    }
    assert!(
        std::env::var("TWINKLE_REQUIRE_SDK").as_deref() != Ok("1"),
        "the venv with huggingface_hub is missing (run scripts/setup-venv.sh)"
    );
    eprintln!("SKIP: no venv with huggingface_hub (run scripts/setup-venv.sh)");
    None
}
