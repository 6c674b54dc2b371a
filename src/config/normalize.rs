//! Normal form of a validated configuration (defaults filled in) and the small accessors other
//! layers read applications through.

use std::collections::BTreeMap;

use super::schema::*;

/// Default idle time before an adapter is unloaded (seconds).
pub const DEFAULT_ADAPTER_TIMEOUT: f64 = 1800.0;
/// Default longest life of an adapter (seconds).
pub const DEFAULT_ADAPTER_MAX_LIFETIME: f64 = 36000.0;
/// Default LoRA slots of a model application.
pub const DEFAULT_MAX_LORAS: u32 = 5;

/// `ms://Org/Name` from a route that ends in `/model/Org/Name` (also `/models/`, `/sampler/`),
/// the way the reference builds its model-id aliases; `None` for any other route.
pub fn derive_model_id(route_prefix: &str) -> Option<String> {
    let segs: Vec<&str> = route_prefix.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        [.., kind, org, name] if matches!(*kind, "model" | "models" | "sampler" | "samplers") => {
            Some(format!("ms://{org}/{name}"))
        }
        _ => None,
    }
}

/// Fills in every default so the result says exactly what will run.
pub(crate) fn normalize(mut cfg: ServerConfig) -> ServerConfig {
    for app in &mut cfg.applications {
        normalize_app(app);
    }
    cfg
}

fn normalize_app(app: &mut Application) {
    let kind = app.import_path;
    let args = &mut app.args;
    match kind {
        ImportPath::Server => {
            let s = args.server_config.get_or_insert_with(ServerStateArgs::default);
            s.expiration_timeout.get_or_insert(86_400.0);
            s.cleanup_interval.get_or_insert(3_600.0);
            s.per_token_model_limit.get_or_insert(30);
            s.metrics_update_interval.get_or_insert(15.0);
        }
        ImportPath::Model => {
            let backend = args.backend.unwrap_or(if args.use_megatron == Some(true) {
                Backend::Megatron
            } else {
                Backend::Transformers
            });
            args.backend = Some(backend);
            args.use_megatron = None;
            let a = args.adapter_config.get_or_insert_with(AdapterConfig::default);
            a.adapter_timeout.get_or_insert(DEFAULT_ADAPTER_TIMEOUT);
            a.adapter_max_lifetime.get_or_insert(DEFAULT_ADAPTER_MAX_LIFETIME);
            args.max_loras.get_or_insert(DEFAULT_MAX_LORAS);
            args.queue_config.get_or_insert_with(QueueConfig::default);
        }
        ImportPath::Sampler => {
            args.sampler_type.get_or_insert(SamplerType::Vllm);
            args.queue_config.get_or_insert_with(QueueConfig::default);
        }
        ImportPath::Processor | ImportPath::Identity => {}
    }
    if matches!(kind, ImportPath::Model | ImportPath::Sampler) && args.model_id.is_none() {
        args.model_id = derive_model_id(&app.route_prefix);
    }
    if let Some(group) = &args.device_group {
        let mesh = args.device_mesh.get_or_insert_with(|| {
            DeviceMesh::data_parallel(group.device_type, group.ranks.count().max(1))
        });
        mesh.device_type.get_or_insert(group.device_type);
    }
}

/// The configured inputs of an application's resource demand, read as written (the
/// scheduler's `cluster::demand_of` decides how they combine).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DemandInputs {
    /// `device_group.device_type`; CPU when the application has no device group.
    pub device_type: DeviceType,
    /// `device_group.ranks` as a count: GPUs for cuda, worker processes for CPU (0 = none).
    pub ranks: u32,
    /// `deployments[0].ray_actor_options.num_cpus` (0 when not given).
    pub num_cpus: f64,
    /// `deployments[0].ray_actor_options.num_gpus` (0 when not given).
    pub num_gpus: f64,
}

static NO_ENV: BTreeMap<String, String> = BTreeMap::new();

impl Application {
    /// `deployments[0]`, the only deployment entry that is used.
    pub fn first_deployment(&self) -> Option<&Deployment> {
        self.deployments.first()
    }

    /// Environment variables for this application's process (`deployments[0]`'s
    /// `ray_actor_options.runtime_env.env_vars`); empty when none are given.
    pub fn env_vars(&self) -> &BTreeMap<String, String> {
        self.first_deployment().map_or(&NO_ENV, |d| &d.ray_actor_options.runtime_env.env_vars)
    }

    /// The HTTP mount point.
    pub fn route_prefix(&self) -> &str {
        &self.route_prefix
    }

    /// Device type and rank count of the device group, and the process's own
    /// `num_cpus` / `num_gpus` from `deployments[0].ray_actor_options`.
    pub fn demand_inputs(&self) -> DemandInputs {
        let group = self.args.device_group.as_ref();
        let opts = self.first_deployment().map(|d| &d.ray_actor_options);
        DemandInputs {
            device_type: group.map_or(DeviceType::Cpu, |g| g.device_type),
            ranks: group.map_or(0, |g| g.ranks.count()),
            num_cpus: opts.map_or(0.0, |o| o.num_cpus),
            num_gpus: opts.map_or(0.0, |o| o.num_gpus),
        }
    }

    /// GPUs this application's device group needs (0 for CPU groups and no group).
    pub fn gpu_count(&self) -> u32 {
        let d = self.demand_inputs();
        if d.device_type == DeviceType::Cuda { d.ranks } else { 0 }
    }

    /// The engine of a model application (`None` for other kinds). Set after loading.
    pub fn backend(&self) -> Option<Backend> {
        self.args.backend
    }

    /// `args.model_id` (derived from the route when left out); `None` for server/processor.
    pub fn model_id(&self) -> Option<&str> {
        self.args.model_id.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::derive_model_id;

    #[test]
    fn model_id_from_route() {
        assert_eq!(
            derive_model_id("/api/v1/model/Qwen/Qwen2.5-0.5B-Instruct").as_deref(),
            Some("ms://Qwen/Qwen2.5-0.5B-Instruct")
        );
        assert_eq!(
            derive_model_id("/models/Qwen/Qwen2.5-7B-Instruct").as_deref(),
            Some("ms://Qwen/Qwen2.5-7B-Instruct")
        );
        assert_eq!(derive_model_id("/sampler/Qwen").as_deref(), None);
        assert_eq!(derive_model_id("/api/v1/model/A/B/C").as_deref(), None);
        assert_eq!(derive_model_id("/").as_deref(), None);
    }
}
