//! The server's calls to a model application that restarts (issue #12, item 2), against a fake
//! head and a fake application on loopback: a call waits (bounded) while the head reports the
//! application restarting, a request the application dies while running fails as a server error
//! that says to retry, and a kind nobody serves fails at once; the bound on the wait comes from
//! the server application's `server_config.restart_wait_s`.

mod fake_http_support;

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use twinkle::apps::server::error::JobError;
use twinkle::apps::server::upstream::{DEFAULT_RESTART_WAIT, RESTART_WAIT_ENV, Upstreams};
use twinkle::protocol::internal::{Call, InfoResponse};

use fake_http_support::serve;

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

/// A call to the restarting model fails as a server error saying to retry, after waiting at
/// least `min` (and well under 10 s).
async fn fails_after_waiting(up: &Upstreams, min: Duration) {
    let t0 = Instant::now();
    match up.call("model", "m", &Forward {}).await {
        Err(JobError::Server(m)) => assert!(m.contains("restarting") && m.contains("retry"), "{m}"),
        other => panic!("{other:?}"),
    }
    let waited = t0.elapsed();
    assert!(waited >= min && waited < Duration::from_secs(10), "{waited:?}");
}

#[actix_web::test]
async fn the_wait_is_bounded() {
    let up = Upstreams::new(head(model_app(), Duration::from_secs(3600)))
        .with_restart_wait(Duration::from_millis(600));
    fails_after_waiting(&up, Duration::from_millis(500)).await;
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
    fails_after_waiting(&up, Duration::from_millis(600)).await;

    let c = cfg("        per_token_model_limit: 3\n");
    let up = twinkle::apps::server::upstreams(head, &c.applications[0].args, Some(&c));
    assert_eq!(up.restart_wait(), DEFAULT_RESTART_WAIT);
}
