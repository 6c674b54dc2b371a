//! The server's calls to a model application that restarts (issue #12, item 2), against a fake
//! head and a fake application on loopback: a call waits (bounded) while the head reports the
//! application restarting, a request the application dies while running fails as a server error
//! that says to retry, and a kind nobody serves fails at once; the bound on the wait comes from
//! the server application's `server_config.restart_wait_s`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use twinkle::apps::server::error::JobError;
use twinkle::apps::server::upstream::{DEFAULT_RESTART_WAIT, RESTART_WAIT_ENV, Upstreams};
use twinkle::protocol::internal::{Call, InfoResponse};

/// Reads one HTTP/1.1 request; returns its request line.
fn read_request(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).unwrap_or(0) == 0 {
            break;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let len = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(str::to_string))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    let _ = s.read_exact(&mut body);
    head.lines().next().unwrap_or_default().to_string()
}

fn answer(s: &mut TcpStream, body: &serde_json::Value) {
    let b = body.to_string();
    let _ = write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
        b.len()
    );
}

/// A fake server answering each request with `f(request line)` (`None`: close without answer).
fn serve(f: impl Fn(&str) -> Option<serde_json::Value> + Send + Sync + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let f = std::sync::Arc::new(f);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let f = f.clone();
            std::thread::spawn(move || {
                let line = read_request(&mut s);
                if let Some(v) = f(&line) {
                    answer(&mut s, &v);
                }
            });
        }
    });
    addr
}

/// A model application that dies (closes without answering) while running `die`.
fn model_app() -> String {
    serve(|line| {
        if line.contains("/_internal/v1/die") {
            None
        } else if line.contains("/_internal/v1/info") {
            let info = InfoResponse { base_model: "m".into(), ..InfoResponse::default() };
            Some(serde_json::to_value(info).unwrap())
        } else {
            Some(json!({"ok": true}))
        }
    })
}

/// A head reporting the application `restarting` until `back_after`, then running at `app`.
fn head(app: String, back_after: Duration) -> String {
    let t0 = Instant::now();
    serve(move |_| {
        let entry = if t0.elapsed() < back_after {
            json!({"name": "model", "import_path": "model", "state": "restarting"})
        } else {
            json!({"name": "model", "import_path": "model", "state": "running", "address": app})
        };
        Some(json!({"applications": [entry]}))
    })
}

/// Calls of routes only the fake application has (it answers JSON, which the client reads by
/// the answer's content type).
#[derive(Serialize, Deserialize)]
struct Forward {}
impl Call for Forward {
    const ROUTE: &'static str = "forward";
    type Answer = serde_json::Value;
}
#[derive(Serialize, Deserialize)]
struct Die {}
impl Call for Die {
    const ROUTE: &'static str = "die";
    type Answer = serde_json::Value;
}

#[actix_web::test]
async fn calls_wait_for_a_restarting_application_and_report_lost_requests() {
    let up = Upstreams::new(head(model_app(), Duration::from_millis(800)))
        .with_restart_wait(Duration::from_secs(20));
    let t0 = Instant::now();
    let v = up.call("model", "m", &Forward {}).await.unwrap();
    assert_eq!(v, json!({"ok": true}));
    assert!(t0.elapsed() >= Duration::from_millis(700), "it waited for the application");

    match up.call("model", "m", &Die {}).await {
        Err(JobError::Server(m)) => {
            assert!(m.contains("interrupted") && m.contains("retry"), "{m}")
        }
        other => panic!("a lost request is a server error, got {other:?}"),
    }

    let t0 = Instant::now();
    match up.call("sampler", "m", &Forward {}).await {
        Err(JobError::Server(m)) => assert!(m.contains("no running sampler"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "nothing to wait for");
}

#[actix_web::test]
async fn the_wait_is_bounded() {
    let up = Upstreams::new(head(model_app(), Duration::from_secs(3600)))
        .with_restart_wait(Duration::from_millis(600));
    let t0 = Instant::now();
    match up.call("model", "m", &Forward {}).await {
        Err(JobError::Server(m)) => assert!(m.contains("restarting") && m.contains("retry"), "{m}"),
        other => panic!("{other:?}"),
    }
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(500) && waited < Duration::from_secs(10), "{waited:?}");
}

/// The server application's `server_config.restart_wait_s` is the bound the server's upstream
/// client waits for (the same construction `apps::server::build` uses), and the default is 60 s.
#[actix_web::test]
async fn the_wait_bound_comes_from_the_config() {
    // The override would make this test meaningless; nothing in this suite sets it.
    assert!(std::env::var_os(RESTART_WAIT_ENV).is_none(), "unset {RESTART_WAIT_ENV} to run this");
    let cfg = |wait: &str| {
        let text = format!(
            "applications:\n  - name: server\n    route_prefix: /api/v1\n    import_path: server\n    args:\n      server_config:\n{wait}"
        );
        twinkle::config::load_str(&text).unwrap_or_else(|e| panic!("{e}"))
    };
    let head = head(model_app(), Duration::from_secs(3600));
    let c = cfg("        restart_wait_s: 0.7\n");
    let up = twinkle::apps::server::upstreams(head.clone(), &c.applications[0].args, Some(&c));
    assert_eq!(up.restart_wait(), Duration::from_millis(700));
    let t0 = Instant::now();
    match up.call("model", "m", &Forward {}).await {
        Err(JobError::Server(m)) => assert!(m.contains("restarting") && m.contains("retry"), "{m}"),
        other => panic!("{other:?}"),
    }
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(600) && waited < Duration::from_secs(10), "{waited:?}");

    let c = cfg("        per_token_model_limit: 3\n");
    let up = twinkle::apps::server::upstreams(head, &c.applications[0].args, Some(&c));
    assert_eq!(up.restart_wait(), DEFAULT_RESTART_WAIT);
}
