//! Typed YAML schema of a server configuration: the seed's keys plus the newer Twinkle keys.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Which client protocol the `server` application speaks.
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default)]
    pub server_type: ServerType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ray_namespace: Option<String>,
    #[serde(default)]
    pub proxy_location: ProxyLocation,
    #[serde(default)]
    pub http_options: HttpOptions,
    #[serde(default)]
    pub telemetry: Telemetry,
    #[serde(default)]
    pub persistence: Persistence,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_queue: Option<QueueConfig>,
    #[serde(default)]
    pub applications: Vec<Application>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpOptions {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
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
    #[serde(default)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PersistenceMode {
    #[default]
    Memory,
    File,
    Redis,
}

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
    #[serde(default = "d_rps")]
    pub rps_limit: f64,
    #[serde(default = "d_tps")]
    pub tps_limit: f64,
    #[serde(default = "d_window")]
    pub window_seconds: f64,
    #[serde(default = "d_queue_timeout")]
    pub queue_timeout: f64,
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
}

impl ImportPath {
    pub fn as_str(self) -> &'static str {
        match self {
            ImportPath::Server => "server",
            ImportPath::Model => "model",
            ImportPath::Sampler => "sampler",
            ImportPath::Processor => "processor",
        }
    }
}

/// One `applications[]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Application {
    pub name: String,
    #[serde(default = "default_route")]
    pub route_prefix: String,
    pub import_path: ImportPath,
    /// Validated against the schema of `import_path` (see [`AppArgs`]).
    #[serde(default)]
    pub args: AppArgs,
    #[serde(default)]
    pub deployments: Vec<Deployment>,
}

fn default_route() -> String {
    "/".to_string()
}

/// `args` of any application kind; which keys are allowed depends on `import_path` and is
/// checked by validation (one struct keeps print-config simple and the YAML unchanged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AppArgs {
    // server
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_config: Option<ServerStateArgs>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supported_models: Vec<SupportedModel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys_file: Option<String>,
    // model / sampler
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_megatron: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_config: Option<AdapterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_loras: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampler_type: Option<SamplerType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_args: Option<EngineArgs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_config: Option<QueueConfig>,
    // placement
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nproc_per_node: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ncpu_proc_per_node: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_group: Option<DeviceGroup>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_mesh: Option<DeviceMesh>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ServerStateArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration_timeout: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup_interval: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_token_model_limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_update_interval: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_name: Option<String>,
}

/// A `supported_models` entry: a bare name or `{model_name: ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SupportedModel {
    Name(String),
    Entry { model_name: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Mock,
    Transformers,
    Megatron,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplerType {
    Mock,
    Vllm,
    Torch,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_timeout: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_max_lifetime: Option<f64>,
}

/// vLLM-style engine arguments of a sampler; the ones our engine understands are typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EngineArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_utilization: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_lora: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_num_seqs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_loras: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lora_rank: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_prefix_caching: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforce_eager: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_sleep_mode: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_remote_code: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensor_parallel_size: Option<u32>,
}

/// `device_type`: `cuda`/`gpu` or `CPU` (any case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceType {
    Cuda,
    Cpu,
}

impl<'de> Deserialize<'de> for DeviceType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.to_ascii_lowercase().as_str() {
            "cuda" | "gpu" => Ok(DeviceType::Cuda),
            "cpu" => Ok(DeviceType::Cpu),
            _ => Err(serde::de::Error::invalid_value(
                serde::de::Unexpected::Str(&s),
                &"one of `cuda`, `gpu`, `CPU`",
            )),
        }
    }
}

/// `ranks`: a count, or an explicit list of rank indices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Ranks {
    Count(u32),
    List(Vec<u32>),
}

impl Ranks {
    pub fn count(&self) -> u32 {
        match self {
            Ranks::Count(n) => *n,
            Ranks::List(v) => v.len() as u32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceGroup {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub ranks: Ranks,
    pub device_type: DeviceType,
    #[serde(default = "d_one")]
    pub gpus_per_worker: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visible_devices: Option<serde_json::Value>,
}

fn d_one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceMesh {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_type: Option<DeviceType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<u32>,
    #[serde(default = "d_one")]
    pub dp_size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsdp_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tp_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pp_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cp_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ulysses_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence_parallel: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ep_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etp_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ep_fsdp_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpp_size: Option<u32>,
}

/// A Ray Serve deployment entry; only `deployments[0]` is used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling_config: Option<AutoscalingConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ongoing_requests: Option<u32>,
    #[serde(default)]
    pub ray_actor_options: RayActorOptions,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AutoscalingConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_replicas: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replicas: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ongoing_requests: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RayActorOptions {
    #[serde(default)]
    pub num_cpus: f64,
    #[serde(default)]
    pub num_gpus: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<BTreeMap<String, f64>>,
    #[serde(default)]
    pub runtime_env: RuntimeEnv,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RuntimeEnv {
    /// `env_vars:` with no value (as the seed writes it) means none.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub env_vars: BTreeMap<String, String>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    Ok(Option::<BTreeMap<String, String>>::deserialize(d)?.unwrap_or_default())
}
