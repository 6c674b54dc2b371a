//! Prometheus metrics of one process, and the node-wide scrape the gateway serves.
//!
//! Every process (the `twinkle serve` process with head and gateway, and each application
//! child) keeps one [`Metrics`]: live instruments from the `prometheus-client` crate (HTTP
//! requests and latency, model jobs, tokens, queues) plus gauges that are read when scraped
//! (adapters resident / spilled, futures pending: [`on_scrape`] hooks) and the process's own
//! RSS, CPU seconds and uptime. A child answers `GET /metrics` with its own families in the
//! OpenMetrics text format; the gateway's `GET /metrics` merges every child's answer, its own
//! and the head's registry families (states, restarts, downloads, GPU samples) into one
//! Prometheus text exposition, each child's samples labelled `app="<application>"`
//! ([`expo::merge`]). Labels are bounded: route patterns, operations, statuses, application and
//! card names, never request ids or keys.

pub mod expo;
pub mod logging;
pub mod process;
pub mod request;
pub mod scrape;
pub mod status;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Errors of the metrics layer.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot encode the metrics: {0}")]
    Encode(#[from] std::fmt::Error),
}

/// `route` (the matched route pattern, or `other`), `method` and `status` of a request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub method: String,
    pub status: String,
}

/// `route` and `method` of a request (the latency histogram's labels).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub method: String,
}

/// The application a gateway request was routed to (`none` when no prefix matched) and its status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
    pub status: String,
}

/// A model job's operation (the internal route: `forward_backward`, `optim_step`, `sample`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: String,
}

/// A model job's operation and whether it succeeded (`ok` / `error`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub op: String,
    pub outcome: String,
}

/// Where adapters are: `resident` (in memory) or `spilled` (on disk, reloaded on use).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PlaceLabels {
    pub place: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets: 0.5 ms to about 4.4 minutes, doubling.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 20))
}

/// Every live instrument of this process.
pub struct Metrics {
    /// HTTP and gateway families: every process serves HTTP.
    registry: Registry,
    /// Model families, exported once this process serves model jobs ([`Role::Model`]).
    model_registry: Registry,
    /// Server application families ([`Role::Server`]).
    server_registry: Registry,
    model_role: AtomicBool,
    server_role: AtomicBool,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: Histograms<RouteLabels>,
    pub gateway_requests: Family<UpstreamLabels, Counter>,
    pub gateway_duration: Histograms<UpstreamLabels>,
    /// Model jobs accepted and waiting for a compute thread, or in the forward/forward_backward
    /// combining queue for their batch.
    pub model_queue_depth: Gauge,
    /// Model jobs computing now.
    pub model_jobs_running: Gauge,
    pub model_jobs: Family<OutcomeLabels, Counter>,
    /// From acceptance to answer (waiting included).
    pub model_job_duration: Histograms<OpLabels>,
    /// The engine's compute alone.
    pub engine_step: Histograms<OpLabels>,
    /// Jobs per forward / forward_backward run of the model's combining queue (1: alone).
    pub model_batch_jobs: Histogram,
    pub tokens: Family<OpLabels, Counter>,
    /// Tokens per second of the last job of each operation.
    pub tokens_per_second: Family<OpLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub adapters: Family<PlaceLabels, Gauge>,
    /// Server application: futures pending or running in the store.
    pub futures_pending: Gauge,
    /// Server application: jobs waiting in its per-run FIFOs.
    pub server_jobs_queued: Gauge,
}

/// What a process serves, beyond HTTP: which families its scrape exports (a gateway has no
/// model queue, so it shows none rather than a constant 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Model,
    Server,
}

/// A family of latency histograms with the same buckets.
fn histograms<L: Clone + std::hash::Hash + Eq>() -> Histograms<L> {
    Family::new_with_constructor(seconds_histogram)
}

/// Registers `metric` under `name` and hands it back (the registry keeps a clone; both count
/// the same values).
fn reg<M: prometheus_client::registry::Metric + Clone>(
    r: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    r.register(name, help, metric.clone());
    metric
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let mut model_registry = Registry::default();
        let mut server_registry = Registry::default();
        let (r, m, s) = (&mut registry, &mut model_registry, &mut server_registry);
        // Names carry their unit; the crate adds `_total` to counters.
        Metrics {
            http_requests: reg(
                r,
                "twinkle_http_requests",
                "HTTP requests answered",
                Family::default(),
            ),
            http_duration: reg(
                r,
                "twinkle_http_request_duration_seconds",
                "HTTP request latency (to the response head)",
                histograms(),
            ),
            gateway_requests: reg(
                r,
                "twinkle_gateway_requests",
                "Requests the gateway forwarded, by upstream application",
                Family::default(),
            ),
            gateway_duration: reg(
                r,
                "twinkle_gateway_request_duration_seconds",
                "Gateway latency to the upstream's response head",
                histograms(),
            ),
            model_queue_depth: reg(
                m,
                "twinkle_model_queue_depth",
                "Model jobs accepted and waiting (for a compute thread or their batch)",
                Gauge::default(),
            ),
            model_jobs_running: reg(
                m,
                "twinkle_model_jobs_running",
                "Model jobs computing now",
                Gauge::default(),
            ),
            model_jobs: reg(m, "twinkle_model_jobs", "Model jobs finished", Family::default()),
            model_job_duration: reg(
                m,
                "twinkle_model_job_duration_seconds",
                "Model job latency from acceptance to answer",
                histograms(),
            ),
            engine_step: reg(
                m,
                "twinkle_engine_step_seconds",
                "Engine compute time of one job",
                histograms(),
            ),
            model_batch_jobs: reg(
                m,
                "twinkle_model_batch_jobs",
                "Jobs per forward/forward_backward batch (1: a job that ran alone)",
                Histogram::new(exponential_buckets(1.0, 2.0, 7)),
            ),
            tokens: reg(m, "twinkle_model_tokens", "Tokens processed", Family::default()),
            tokens_per_second: reg(
                m,
                "twinkle_engine_tokens_per_second",
                "Tokens per second of the last job of each operation",
                Family::default(),
            ),
            adapters: reg(m, "twinkle_model_adapters", "LoRA adapters by place", Family::default()),
            futures_pending: reg(
                s,
                "twinkle_server_futures_pending",
                "Futures pending or running",
                Gauge::default(),
            ),
            server_jobs_queued: reg(
                s,
                "twinkle_server_jobs_queued",
                "Jobs waiting in the server's per-run queues",
                Gauge::default(),
            ),
            registry,
            model_registry,
            server_registry,
            model_role: AtomicBool::new(false),
            server_role: AtomicBool::new(false),
        }
    }

    /// This process serves `role`: its families are exported from now on.
    pub fn serves(&self, role: Role) {
        let flag = match role {
            Role::Model => &self.model_role,
            Role::Server => &self.server_role,
        };
        flag.store(true, Ordering::Relaxed);
    }

    /// Records one finished model job: its latency, compute time and tokens.
    pub fn record_job(&self, op: &str, ok: bool, total: Duration, compute: Duration, tokens: u64) {
        let op_l = OpLabels { op: op.to_string() };
        let outcome = if ok { "ok" } else { "error" };
        self.model_jobs
            .get_or_create(&OutcomeLabels { op: op.to_string(), outcome: outcome.into() })
            .inc();
        self.model_job_duration.get_or_create(&op_l).observe(total.as_secs_f64());
        self.engine_step.get_or_create(&op_l).observe(compute.as_secs_f64());
        if tokens > 0 {
            self.tokens.get_or_create(&op_l).inc_by(tokens);
            let secs = compute.as_secs_f64();
            if secs > 0.0 {
                self.tokens_per_second.get_or_create(&op_l).set(tokens as f64 / secs);
            }
        }
    }

    /// This process's families in the OpenMetrics text format (after running the scrape hooks).
    pub fn encode(&self) -> Result<String, MetricsError> {
        let hooks = HOOKS.lock().unwrap_or_else(|p| p.into_inner());
        for hook in hooks.iter() {
            hook(self);
        }
        drop(hooks);
        let mut out = String::new();
        prometheus_client::encoding::text::encode_registry(&mut out, &self.registry)?;
        if self.model_role.load(Ordering::Relaxed) {
            prometheus_client::encoding::text::encode_registry(&mut out, &self.model_registry)?;
        }
        if self.server_role.load(Ordering::Relaxed) {
            prometheus_client::encoding::text::encode_registry(&mut out, &self.server_registry)?;
        }
        out.push_str(&process::render());
        prometheus_client::encoding::text::encode_eof(&mut out)?;
        Ok(out)
    }
}

/// A job counted in a gauge until it leaves (or is dropped: a job the blocking pool refused,
/// or one whose compute panicked), so the gauge never drifts.
pub struct GaugeSlot(Option<&'static Gauge>);

impl GaugeSlot {
    pub fn enter(g: &'static Gauge) -> Self {
        g.inc();
        GaugeSlot(Some(g))
    }

    pub fn leave(&mut self) {
        if let Some(g) = self.0.take() {
            g.dec();
        }
    }
}

impl Drop for GaugeSlot {
    fn drop(&mut self) {
        self.leave();
    }
}

/// A gauge refreshed when this process is scraped.
pub type ScrapeHook = Box<dyn Fn(&Metrics) + Send + Sync>;

static HOOKS: Mutex<Vec<ScrapeHook>> = Mutex::new(Vec::new());
static METRICS: OnceLock<Metrics> = OnceLock::new();

/// This process's metrics.
pub fn global() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

/// Runs `hook` before every scrape of this process (to read gauges from their owners).
pub fn on_scrape(hook: ScrapeHook) {
    HOOKS.lock().unwrap_or_else(|p| p.into_inner()).push(hook);
}

/// The content type of [`Metrics::encode`]'s output.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the gateway's merged scrape.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /metrics` of a child: this process's families.
pub async fn child_metrics() -> actix_web::HttpResponse {
    match global().encode() {
        Ok(text) => actix_web::HttpResponse::Ok().content_type(OPENMETRICS).body(text),
        Err(e) => actix_web::HttpResponse::InternalServerError()
            .json(serde_json::json!({"detail": e.to_string()})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_feed_counters_histograms_and_rates() {
        let m = Metrics::new();
        assert!(!m.encode().expect("encodes").contains("twinkle_model_jobs"));
        m.serves(Role::Model);
        m.record_job(
            "forward_backward",
            true,
            Duration::from_millis(30),
            Duration::from_millis(20),
            40,
        );
        m.record_job(
            "forward_backward",
            false,
            Duration::from_millis(5),
            Duration::from_millis(1),
            0,
        );
        let text = m.encode().expect("encodes");
        assert!(text.contains("twinkle_model_tokens_total{op=\"forward_backward\"} 40"), "{text}");
        assert!(
            text.contains("twinkle_model_jobs_total{op=\"forward_backward\",outcome=\"error\"} 1")
        );
        assert!(
            text.contains("twinkle_model_job_duration_seconds_count{op=\"forward_backward\"} 2")
        );
        assert!(text.contains("twinkle_engine_tokens_per_second{op=\"forward_backward\"} 2000"));
        assert!(text.contains("twinkle_process_resident_memory_bytes"));
        assert!(text.trim_end().ends_with("# EOF"));
    }
}
