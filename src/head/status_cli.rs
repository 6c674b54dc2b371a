//! `twinkle status`: asks the head for its status and prints it like `ray status`
//! (`--watch`: again every few seconds, redrawn in place on a terminal).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::HeadError;
use super::gpu_table::{self, GpuStatus};
use super::registry::StatusReport;
use crate::hub::progress::human_bytes;

/// The status with each running application's queue depth (jobs waiting or computing), which
/// the head adds from the children's scrapes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    #[serde(flatten)]
    pub report: StatusReport,
    #[serde(default)]
    pub queues: BTreeMap<String, u64>,
}

impl StatusView {
    /// `report` with each running child's queue depth, from its own scrape (left out when it
    /// does not answer); children in cluster mode are scraped at their node's address.
    pub async fn with_queues(report: StatusReport) -> Self {
        let queues = crate::metrics::scrape::queue_depths(&report).await;
        StatusView { report, queues }
    }
}

/// GETs `http://{addr}/v1/status` with `token` (the serve's internal token or the cluster
/// token; must run inside an actix/tokio runtime).
pub async fn fetch(addr: &str, token: &str) -> Result<StatusReport, HeadError> {
    fetch_view(addr, token).await.map(|v| v.report)
}

/// [`fetch`] with the queue depths.
pub async fn fetch_view(addr: &str, token: &str) -> Result<StatusView, HeadError> {
    let client = awc::Client::builder().timeout(Duration::from_secs(10)).finish();
    let url = format!("http://{addr}/v1/status");
    let unreachable = |detail: String| HeadError::Unreachable { addr: addr.to_string(), detail };
    let req = client.get(&url).insert_header((super::cluster::TOKEN_HEADER, token));
    let mut resp = req.send().await.map_err(|e| unreachable(e.to_string()))?;
    let body = resp.body().limit(16 << 20).await.map_err(|e| unreachable(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(HeadError::BadAnswer {
            addr: addr.to_string(),
            status: resp.status().as_u16(),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    serde_json::from_slice(&body).map_err(|e| unreachable(format!("bad status JSON: {e}")))
}

/// Resources are fixed-point 1/10000 units: print at most 4 decimals, no float noise.
fn fmt_num(x: f64) -> String {
    let s = format!("{x:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn fmt_ids(ids: &[u32]) -> String {
    if ids.is_empty() {
        "-".to_string()
    } else {
        ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
    }
}

/// One line per card: live NVML figures (`n/a` when unknown) and the application holding it.
fn render_gpus(out: &mut String, gpus: &[GpuStatus]) {
    if gpus.is_empty() {
        return;
    }
    let _ = writeln!(out, "     {:<4} {:<28} {:<20} {:>4}  APP", "GPU", "NAME", "MEMORY", "UTIL");
    for g in gpus {
        let _ = writeln!(
            out,
            "     {:<4} {:<28} {:<20} {:>4}  {}",
            g.sample.id,
            g.sample.name.as_deref().unwrap_or("n/a"),
            gpu_table::fmt_memory(&g.sample),
            gpu_table::fmt_util(&g.sample),
            g.app.as_deref().unwrap_or("-")
        );
    }
}

/// The human-readable report: nodes with totals and per-application allocations, then one
/// line per application.
pub fn render(s: &StatusReport) -> String {
    render_view(&StatusView { report: s.clone(), queues: BTreeMap::new() })
}

/// The status as text (or pretty JSON).
fn text_of(view: &StatusView, json: bool) -> String {
    if json {
        // A plain data struct serialises whatever its values.
        format!("{}\n", serde_json::to_string_pretty(view).unwrap_or_default())
    } else {
        render_view(view)
    }
}

/// `twinkle status`: prints the status once, or with `every` again and again (`--watch`) until
/// stdout closes. A head that stops answering is shown as such while watched.
pub fn show(addr: &str, token: &str, json: bool, every: Option<Duration>) -> Result<(), HeadError> {
    use std::io::{IsTerminal as _, Write as _};
    let system = actix_web::rt::System::new();
    let Some(every) = every else {
        let view = system.block_on(fetch_view(addr, token))?;
        print!("{}", text_of(&view, json));
        return Ok(());
    };
    let terminal = std::io::stdout().is_terminal();
    loop {
        let text = match system.block_on(fetch_view(addr, token)) {
            Ok(view) => text_of(&view, json),
            Err(e) => format!("twinkle status: {e}\n"),
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        let frame = watch_frame(&text, terminal, now.map_or(0, |d| d.as_secs()));
        let mut out = std::io::stdout().lock();
        // A closed stdout (`| head`) ends the watch quietly.
        if out.write_all(frame.as_bytes()).and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
        drop(out);
        std::thread::sleep(every);
    }
}

/// One `--watch` frame: on a terminal the screen is cleared and redrawn in place; otherwise
/// frames follow each other, each headed by the time it was taken.
pub fn watch_frame(text: &str, terminal: bool, unix_s: u64) -> String {
    if terminal {
        format!("\x1b[H\x1b[2J{text}")
    } else {
        format!("--- {unix_s} (unix time)\n{text}\n")
    }
}

/// [`render`] with a QUEUE column (`-` when the application did not say).
pub fn render_view(v: &StatusView) -> String {
    let s = &v.report;
    let mut out = String::new();
    let _ = writeln!(out, "======== Twinkle status ({} server) ========", s.server_type);
    let _ = writeln!(out, "Head pid {}  control {}", s.head_pid, s.control_address);
    let _ = writeln!(out, "Gateway http://{}", s.gateway_address);
    if let Some(ns) = &s.namespace {
        let _ = writeln!(out, "Namespace {ns}");
    }
    let _ = writeln!(out, "\nNodes");
    let _ = writeln!(out, "------");
    for n in &s.nodes {
        let get =
            |m: &std::collections::BTreeMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);
        let (cpu_t, gpu_t) = (get(&n.resources, "CPU"), get(&n.resources, "GPU"));
        let (cpu_f, gpu_f) = (get(&n.available, "CPU"), get(&n.available, "GPU"));
        let _ =
            writeln!(out, " {} ({}) {}", n.id, n.address, if n.alive { "alive" } else { "DEAD" });
        let _ = writeln!(
            out,
            "   {}/{} CPU   {}/{} GPU used   GPU ids [{}]",
            fmt_num(cpu_t - cpu_f),
            fmt_num(cpu_t),
            fmt_num(gpu_t - gpu_f),
            fmt_num(gpu_t),
            fmt_ids(&n.gpu_ids)
        );
        for a in s.applications.iter().filter(|a| a.node == n.id) {
            let _ = writeln!(
                out,
                "     {:<40} {} CPU  GPU [{}]",
                a.name,
                fmt_num(a.cpus),
                fmt_ids(&a.gpu_ids)
            );
        }
        render_gpus(&mut out, &n.gpus);
    }
    let _ = writeln!(out, "\nApplications");
    let _ = writeln!(out, "------------");
    let _ = writeln!(
        out,
        " {:<32} {:<10} {:>8} {:>8} {:>6}  {:<9} {:<21} ROUTE",
        "NAME", "STATE", "PID", "RESTARTS", "QUEUE", "GPUS", "ADDRESS"
    );
    for a in &s.applications {
        let _ = writeln!(
            out,
            " {:<32} {:<10} {:>8} {:>8} {:>6}  {:<9} {:<21} {}",
            a.name,
            a.state.as_str(),
            a.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            a.restarts,
            v.queues.get(&a.name).map_or_else(|| "-".to_string(), u64::to_string),
            fmt_ids(&a.gpu_ids),
            a.address.as_deref().unwrap_or("-"),
            a.route_prefix
        );
        // Its cards' live figures, next to it, where NVML has them (the node section lists
        // every card, `n/a` included).
        let cards: Vec<String> = s
            .nodes
            .iter()
            .flat_map(|n| &n.gpus)
            .filter(|g| {
                g.app.as_deref() == Some(a.name.as_str()) && g.sample.memory_total_mib.is_some()
            })
            .map(|g| {
                format!(
                    "{} {} {}",
                    g.sample.id,
                    gpu_table::fmt_memory(&g.sample),
                    gpu_table::fmt_util(&g.sample).trim()
                )
            })
            .collect();
        if !cards.is_empty() {
            let _ = writeln!(out, "   cards: {}", cards.join(", "));
        }
        if let Some(how) = &a.last_exit {
            let _ = writeln!(out, "   last exit: {how}");
        }
        if let Some(why) = &a.pending_reason {
            let _ = writeln!(out, "   pending: {why}");
        }
        match &a.download {
            // No size yet: listing the files, or waiting for another download of the model.
            Some(d) if d.bytes_total == 0 => {
                let _ = writeln!(out, "   downloading: size not known yet");
            }
            Some(d) => {
                let (done, total) = (human_bytes(d.bytes_done), human_bytes(d.bytes_total));
                let _ = writeln!(out, "   downloading: {:.1}% ({done} of {total})", d.percent);
            }
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::head::gpu_table::{GpuSample, GpuStatus};
    use crate::head::registry::{AppState, AppStatus, NodeStatus};

    #[test]
    fn render_shows_allocations_and_states() {
        let res = |c: f64, g: f64| BTreeMap::from([("CPU".to_string(), c), ("GPU".to_string(), g)]);
        let s = StatusReport {
            server_type: "tinker".into(),
            namespace: None,
            head_pid: 7,
            control_address: "127.0.0.1:1".into(),
            gateway_address: "127.0.0.1:8000".into(),
            nodes: vec![NodeStatus {
                id: "node-0".into(),
                address: "127.0.0.1".into(),
                resources: res(4.0, 8.0),
                available: res(3.5, 5.0),
                gpu_ids: (0..8).collect(),
                alive: true,
                gpus: vec![
                    GpuStatus {
                        sample: GpuSample::known(0, "NVIDIA H100 80GB HBM3", 1234, 81559, 37),
                        app: Some("model".into()),
                    },
                    GpuStatus { sample: GpuSample::unknown(7), app: None },
                ],
            }],
            applications: vec![
                AppStatus {
                    name: "model".into(),
                    import_path: "model".into(),
                    route_prefix: "/m".into(),
                    node: "node-0".into(),
                    gpu_ids: vec![0, 1, 2],
                    cpus: 0.5,
                    pid: Some(99),
                    state: AppState::Restarting,
                    restarts: 2,
                    address: None,
                    last_exit: Some("signal 9".into()),
                    pending_reason: None,
                    download: None,
                },
                AppStatus {
                    state: AppState::Downloading,
                    download: Some(crate::head::registry::DownloadStatus::new(3 << 29, 2 << 30)),
                    ..AppStatus::new("sampler", "sampler", "/s", "node-0", vec![3], 1.0)
                },
            ],
        };
        let text = render(&s);
        assert!(text.contains("0.5/4 CPU   3/8 GPU used   GPU ids [0,1,2,3,4,5,6,7]"), "{text}");
        assert!(text.contains("model                                    0.5 CPU  GPU [0,1,2]"));
        assert!(text.contains("restarting"));
        assert!(text.contains("last exit: signal 9"));
        assert!(text.contains("downloading: 75.0% (1.5 GiB of 2.0 GiB)"), "{text}");
        assert!(text.contains(" sampler                          downloading"), "{text}");
        let gpu_lines = [
            "     GPU  NAME                         MEMORY               UTIL  APP\n",
            "     0    NVIDIA H100 80GB HBM3        1234/81559 MiB        37%  model\n",
            "     7    n/a                          n/a                   n/a  -\n",
        ];
        for line in gpu_lines {
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
        assert!(text.contains("   cards: 0 1234/81559 MiB 37%\n"), "{text}");
    }

    #[test]
    fn queues_show_per_application_and_watch_frames_redraw_or_follow() {
        let report = StatusReport {
            server_type: "tinker".into(),
            namespace: None,
            head_pid: 1,
            control_address: "127.0.0.1:1".into(),
            gateway_address: "127.0.0.1:2".into(),
            nodes: vec![],
            applications: vec![
                AppStatus::new("model", "model", "/m", "n", vec![], 1.0),
                AppStatus::new("server", "server", "/", "n", vec![], 1.0),
            ],
        };
        let view = StatusView { report, queues: BTreeMap::from([("model".to_string(), 3)]) };
        let text = render_view(&view);
        assert!(
            text.contains(" model                            starting          -        0      3"),
            "{text}"
        );
        assert!(
            text.contains(" server                           starting          -        0      -"),
            "{text}"
        );
        let json = serde_json::to_value(&view).expect("serialises");
        assert_eq!(json["queues"]["model"], 3);
        assert_eq!(json["applications"][0]["name"], "model");
        assert!(watch_frame("x", true, 5).starts_with("\x1b[H\x1b[2J"));
        assert_eq!(watch_frame("x", false, 5), "--- 5 (unix time)\nx\n");
    }
}
