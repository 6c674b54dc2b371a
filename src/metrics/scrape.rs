//! Fetching a child's `/metrics` over loopback (for the gateway's node-wide scrape and for the
//! queue depths `twinkle status` shows).

use std::collections::BTreeMap;
use std::time::Duration;

/// A child that does not answer its scrape in this long is left out of that scrape.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest child scrape read.
const MAX_SCRAPE: usize = 8 << 20;

/// The child at `addr`'s exposition text; `None` when it cannot be read (it is then left out).
pub async fn fetch(client: &awc::Client, addr: &str) -> Option<String> {
    let url = format!("http://{addr}/metrics");
    let mut resp = match client.get(&url).timeout(SCRAPE_TIMEOUT).send().await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            tracing::debug!(%addr, status = %r.status(), "child scrape refused");
            return None;
        }
        Err(e) => {
            tracing::debug!(%addr, error = %e, "child scrape failed");
            return None;
        }
    };
    let body = resp.body().limit(MAX_SCRAPE).await.ok()?;
    String::from_utf8(body.to_vec()).ok()
}

/// Jobs waiting in a child's queues (model jobs waiting for a thread and running, server jobs
/// queued), from its scrape.
pub fn queue_depth(text: &str) -> u64 {
    let sum = |name| super::expo::sum(text, name).unwrap_or(0.0);
    let depth = sum("twinkle_model_queue_depth")
        + sum("twinkle_model_jobs_running")
        + sum("twinkle_server_jobs_queued");
    depth.max(0.0) as u64
}

/// The queue depth of every running application of `report` that answers its scrape.
pub async fn queue_depths(report: &crate::head::StatusReport) -> BTreeMap<String, u64> {
    let client = awc::Client::default();
    let running: Vec<(&str, &str)> = report
        .applications
        .iter()
        .filter(|a| a.state == crate::head::AppState::Running)
        .filter_map(|a| Some((a.name.as_str(), a.address.as_deref()?)))
        .collect();
    let texts =
        futures_util::future::join_all(running.iter().map(|(_, addr)| fetch(&client, addr))).await;
    running
        .iter()
        .zip(texts)
        .filter_map(|((app, _), text)| Some((app.to_string(), queue_depth(&text?))))
        .collect()
}
