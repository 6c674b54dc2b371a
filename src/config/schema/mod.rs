//! Typed YAML schema of a server configuration: the seed's keys plus the newer Twinkle keys.
//!
//! Every struct rejects unknown keys. Keys that only make sense for some kinds of application
//! live in one [`AppArgs`] struct and are checked against `import_path` by validation, so the
//! seed's files load unchanged and print-config stays one plain struct.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::de::{env_vars, null_as_default, port};

mod placement;
pub use placement::*;

/// Which client protocol the `server` application speaks (`--server-type` overrides it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ServerType {
    #[default]
    Twinkle,
    Tinker,
}

/// Where HTTP gateways run (Ray Serve's `proxy_location`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ProxyLocation {
    #[default]
    EveryNode,
    HeadOnly,
    Disabled,
}

/// The whole configuration file.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default, deserialize_with = "null_as_default")]
    pub server_type: ServerType,
    pub ray_namespace: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub proxy_location: ProxyLocation,
    #[serde(default, deserialize_with = "null_as_default")]
    pub http_options: HttpOptions,
    #[serde(default, deserialize_with = "null_as_default")]
    pub telemetry: Telemetry,
    #[serde(default, deserialize_with = "null_as_default")]
    pub persistence: Persistence,
    /// Accepted for compatibility; queue settings take effect per application (`queue_config`).
    pub task_queue: Option<QueueConfig>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub applications: Vec<Application>,
    /// Timing knobs of the node agent and the head (`crate::timings` lists them and their
    /// defaults); the matching environment variables override them.
    pub timings: Option<TimingsConfig>,
}

/// The config's `timings:` section, seconds each.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimingsConfig {
    pub stop_grace_s: Option<f64>,
    pub register_deadline_s: Option<f64>,
    pub health_period_s: Option<f64>,
    pub health_timeout_s: Option<f64>,
    pub heartbeat_s: Option<f64>,
    pub node_timeout_s: Option<f64>,
    pub gpu_stats_s: Option<f64>,
}

/// Address of the HTTP gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpOptions {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port", deserialize_with = "port")]
    pub port: u16,
}

fn default_host() -> String {
    "127.0.0.1".to_string()
}
fn default_port() -> u16 {
    8000
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self { host: default_host(), port: default_port() }
    }
}

/// OpenTelemetry export settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Telemetry {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_service_name")]
    pub service_name: String,
    #[serde(default = "default_otlp")]
    pub otlp_endpoint: String,
    #[serde(default)]
    pub debug: bool,
    #[serde(default = "default_export_interval")]
    pub export_interval_ms: u64,
    #[serde(default, deserialize_with = "env_vars")]
    pub resource_attributes: BTreeMap<String, String>,
}

fn default_service_name() -> String {
    "twinkle-server".to_string()
}
fn default_otlp() -> String {
    "http://localhost:4317".to_string()
}
fn default_export_interval() -> u64 {
    30_000
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            enabled: false,
            service_name: default_service_name(),
            otlp_endpoint: default_otlp(),
            debug: false,
            export_interval_ms: default_export_interval(),
            resource_attributes: BTreeMap::new(),
        }
    }
}

/// Where durable server state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PersistenceMode {
    #[default]
    Memory,
    File,
    Redis,
}

/// `persistence`: `mode: file` needs `file_path`, `mode: redis` needs `redis_url`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Persistence {
    #[serde(default)]
    pub mode: PersistenceMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    #[serde(default)]
    pub key_prefix: String,
}

/// Per-application task queue and preflight limits (`queue_config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Requests per window per API key.
    #[serde(default = "d_rps")]
    pub rps_limit: f64,
    /// Input tokens per window per API key.
    #[serde(default = "d_tps")]
    pub tps_limit: f64,
    #[serde(default = "d_window")]
    pub window_seconds: f64,
    /// Seconds a task may wait in the queue.
    #[serde(default = "d_queue_timeout")]
    pub queue_timeout: f64,
    /// Seconds a task may run; 0 means no limit.
    #[serde(default = "d_exec_timeout")]
    pub execution_timeout: f64,
    #[serde(default = "d_true")]
    pub enabled: bool,
    #[serde(default = "d_cleanup_mult")]
    pub token_cleanup_multiplier: f64,
    #[serde(default = "d_cleanup_interval")]
    pub token_cleanup_interval: f64,
    #[serde(default = "d_max_input")]
    pub max_input_tokens: u64,
}

fn d_rps() -> f64 {
    100.0
}
fn d_tps() -> f64 {
    16000.0
}
fn d_window() -> f64 {
    1.0
}
fn d_queue_timeout() -> f64 {
    300.0
}
fn d_exec_timeout() -> f64 {
    120.0
}
fn d_true() -> bool {
    true
}
fn d_cleanup_mult() -> f64 {
    10.0
}
fn d_cleanup_interval() -> f64 {
    60.0
}
fn d_max_input() -> u64 {
    16000
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            rps_limit: d_rps(),
            tps_limit: d_tps(),
            window_seconds: d_window(),
            queue_timeout: d_queue_timeout(),
            execution_timeout: d_exec_timeout(),
            enabled: true,
            token_cleanup_multiplier: d_cleanup_mult(),
            token_cleanup_interval: d_cleanup_interval(),
            max_input_tokens: d_max_input(),
        }
    }
}

/// Which built-in component an application runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportPath {
    Server,
    Model,
    Sampler,
    Processor,
    /// Loads nothing and serves only `/healthz` (and a token-gated `/echo`): a placement dry
    /// run of a config, used by the platform tests. It accepts every other kind's `args` and
    /// ignores them, so any application can be turned into one by changing `import_path`.
    Identity,
}

impl ImportPath {
    /// The YAML spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ImportPath::Server => "server",
            ImportPath::Model => "model",
            ImportPath::Sampler => "sampler",
            ImportPath::Processor => "processor",
            ImportPath::Identity => "identity",
        }
    }
}

/// One `applications[]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Application {
    pub name: String,
    /// HTTP mount point; always starts with `/`.
    #[serde(default = "default_route")]
    pub route_prefix: String,
    pub import_path: ImportPath,
    /// Validated against the schema of `import_path` (see [`AppArgs`]).
    #[serde(default, deserialize_with = "null_as_default")]
    pub args: AppArgs,
    /// Only `deployments[0]` is used.
    #[serde(default, deserialize_with = "null_as_default")]
    pub deployments: Vec<Deployment>,
}

fn default_route() -> String {
    "/".to_string()
}

/// `args` of any application kind. Which keys are allowed depends on `import_path` and is
/// checked by validation ([`AppArgs::keys_allowed_for`]).
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AppArgs {
    // server
    pub server_config: Option<ServerStateArgs>,
    /// Base models the server advertises (Tinker `get_server_capabilities`).
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    pub supported_models: Vec<SupportedModel>,
    pub api_keys: Option<Vec<String>>,
    pub api_keys_file: Option<String>,
    // model and sampler
    /// `ms://Org/Name`, `hf://Org/Name`, a bare `Org/Name` or a local path.
    pub model_id: Option<String>,
    // model
    /// Canonical engine selector of a model app; after loading it is always set for models.
    pub backend: Option<Backend>,
    /// The seed's selector; folded into `backend` when the config is loaded.
    pub use_megatron: Option<bool>,
    pub adapter_config: Option<AdapterConfig>,
    pub max_loras: Option<u32>,
    pub max_length: Option<u64>,
    /// Milliseconds queued forward / forward_backward jobs of different adapters wait for each
    /// other to run as one batch (default `apps::model::DEFAULT_BATCH_WINDOW`; 0: off).
    pub batch_window_ms: Option<f64>,
    // sampler
    pub sampler_type: Option<SamplerType>,
    pub engine_args: Option<EngineArgs>,
    // model, sampler (and processor, where it is ignored)
    pub queue_config: Option<QueueConfig>,
    // placement
    pub nproc_per_node: Option<u32>,
    pub ncpu_proc_per_node: Option<u32>,
    pub device_group: Option<DeviceGroup>,
    pub device_mesh: Option<DeviceMesh>,
}

impl AppArgs {
    /// The `args` keys that are set (not absent, not null), in schema order.
    pub fn present_keys(&self) -> Vec<&'static str> {
        let flags = [
            ("server_config", self.server_config.is_some()),
            ("supported_models", !self.supported_models.is_empty()),
            ("api_keys", self.api_keys.is_some()),
            ("api_keys_file", self.api_keys_file.is_some()),
            ("backend", self.backend.is_some()),
            ("use_megatron", self.use_megatron.is_some()),
            ("adapter_config", self.adapter_config.is_some()),
            ("max_loras", self.max_loras.is_some()),
            ("max_length", self.max_length.is_some()),
            ("batch_window_ms", self.batch_window_ms.is_some()),
            ("model_id", self.model_id.is_some()),
            ("sampler_type", self.sampler_type.is_some()),
            ("engine_args", self.engine_args.is_some()),
            ("queue_config", self.queue_config.is_some()),
            ("nproc_per_node", self.nproc_per_node.is_some()),
            ("ncpu_proc_per_node", self.ncpu_proc_per_node.is_some()),
            ("device_group", self.device_group.is_some()),
            ("device_mesh", self.device_mesh.is_some()),
        ];
        flags.iter().filter(|(_, set)| *set).map(|(k, _)| *k).collect()
    }

    /// The `args` keys an application of kind `kind` accepts.
    pub fn keys_allowed_for(kind: ImportPath) -> &'static [&'static str] {
        match kind {
            ImportPath::Server => {
                &["server_config", "supported_models", "api_keys", "api_keys_file"]
            }
            ImportPath::Model => &[
                "backend",
                "use_megatron",
                "model_id",
                "adapter_config",
                "max_loras",
                "max_length",
                "batch_window_ms",
                "queue_config",
                "nproc_per_node",
                "device_group",
                "device_mesh",
            ],
            ImportPath::Sampler => &[
                "model_id",
                "sampler_type",
                "engine_args",
                "queue_config",
                "nproc_per_node",
                "device_group",
                "device_mesh",
            ],
            ImportPath::Processor => &[
                "nproc_per_node",
                "ncpu_proc_per_node",
                "queue_config",
                "device_group",
                "device_mesh",
            ],
            ImportPath::Identity => &[
                "server_config",
                "supported_models",
                "api_keys",
                "api_keys_file",
                "backend",
                "use_megatron",
                "adapter_config",
                "max_loras",
                "max_length",
                "batch_window_ms",
                "model_id",
                "sampler_type",
                "engine_args",
                "queue_config",
                "nproc_per_node",
                "ncpu_proc_per_node",
                "device_group",
                "device_mesh",
            ],
        }
    }
}

/// Settings of the server application's state (`args.server_config`); they apply server-wide.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ServerStateArgs {
    /// Seconds after which an idle session expires.
    pub expiration_timeout: Option<f64>,
    pub cleanup_interval: Option<f64>,
    /// Most models (adapters) one API key may hold at once.
    pub per_token_model_limit: Option<u32>,
    /// Most input tokens in one forward / forward_backward (default: 32 × the model's context).
    pub max_tokens_per_request: Option<u64>,
    /// Most unfinished sample requests (`asample` futures pending or running) one API key may
    /// have (default `apps::server::limits::DEFAULT_SAMPLING_PER_KEY`).
    pub max_sampling_requests_per_key: Option<u32>,
    /// Seconds a call to a model / sampler application waits for it while it (re)starts
    /// (default 60; `TWINKLE_RESTART_WAIT` overrides it).
    pub restart_wait_s: Option<f64>,
    pub metrics_update_interval: Option<f64>,
    pub actor_name: Option<String>,
}

/// A `supported_models` entry: a bare name or `{model_name: ...}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum SupportedModel {
    Name(String),
    Entry { model_name: String },
}

impl SupportedModel {
    /// The model name either form carries.
    pub fn name(&self) -> &str {
        match self {
            SupportedModel::Name(n) | SupportedModel::Entry { model_name: n } => n,
        }
    }
}

/// Engine selector of a model application (all are served by the native engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Mock,
    Transformers,
    Megatron,
}

/// Engine selector of a sampler application (all are served by the native engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplerType {
    Mock,
    Vllm,
    Torch,
}

/// LoRA adapter lifecycle of a model application.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    /// Seconds an idle adapter stays loaded.
    pub adapter_timeout: Option<f64>,
    /// Seconds an adapter may live at most.
    pub adapter_max_lifetime: Option<f64>,
    /// Whether `optim_step` answers only once the adapter's snapshot is written (default true).
    pub durable_steps: Option<bool>,
}

/// vLLM-style engine arguments of a sampler; the ones our engine understands.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EngineArgs {
    pub max_model_len: Option<u64>,
    pub gpu_memory_utilization: Option<f64>,
    pub enable_lora: Option<bool>,
    pub max_num_seqs: Option<u32>,
    pub max_loras: Option<u32>,
    pub max_lora_rank: Option<u32>,
    pub enable_prefix_caching: Option<bool>,
    pub enforce_eager: Option<bool>,
    pub enable_sleep_mode: Option<bool>,
    pub trust_remote_code: Option<bool>,
    pub dtype: Option<String>,
    pub seed: Option<u64>,
    pub tensor_parallel_size: Option<u32>,
    pub logprobs_mode: Option<String>,
}
