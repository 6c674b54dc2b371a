//! Where an application runs: its device group and mesh (the cards or CPU workers and their
//! parallel layout) and the Ray Serve deployment options the seed's files carry.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::super::de::{env_vars, null_as_default};

/// `device_type`: `cuda` (also `gpu`, any case) or `CPU` (any case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DeviceType {
    #[serde(rename = "cuda")]
    Cuda,
    #[serde(rename = "CPU")]
    Cpu,
}

/// `ranks`: a count, or an explicit list of rank indices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Ranks {
    Count(u32),
    List(Vec<u32>),
}

impl Ranks {
    /// How many ranks (GPUs for a cuda group, worker processes for a CPU group).
    pub fn count(&self) -> u32 {
        match self {
            Ranks::Count(n) => *n,
            // A list longer than u32::MAX cannot come from a YAML file we can read.
            Ranks::List(v) => u32::try_from(v.len()).unwrap_or(u32::MAX),
        }
    }
}

/// Logical device group of an application.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceGroup {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub ranks: Ranks,
    pub device_type: DeviceType,
    #[serde(default = "d_one")]
    pub gpus_per_worker: u32,
    /// Accepted for compatibility; physical devices come from the scheduler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visible_devices: Option<serde_json::Value>,
}

fn d_one() -> u32 {
    1
}

/// Parallel layout. Only `dp_size` is implemented by the engine: validation rejects any other
/// dimension above 1 on a model or sampler application, and on a cuda group requires `dp_size`
/// to equal the number of cards (one data-parallel worker per card).
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceMesh {
    pub device_type: Option<DeviceType>,
    pub world_size: Option<u32>,
    #[serde(default = "d_one")]
    pub dp_size: u32,
    pub fsdp_size: Option<u32>,
    pub tp_size: Option<u32>,
    pub pp_size: Option<u32>,
    pub cp_size: Option<u32>,
    pub ulysses_size: Option<u32>,
    pub sequence_parallel: Option<bool>,
    pub ep_size: Option<u32>,
    pub etp_size: Option<u32>,
    pub ep_fsdp_size: Option<u32>,
    pub vpp_size: Option<u32>,
}

impl DeviceMesh {
    /// A pure data-parallel mesh of `dp_size` ranks.
    pub fn data_parallel(device_type: DeviceType, dp_size: u32) -> Self {
        Self {
            device_type: Some(device_type),
            world_size: None,
            dp_size,
            fsdp_size: None,
            tp_size: None,
            pp_size: None,
            cp_size: None,
            ulysses_size: None,
            sequence_parallel: None,
            ep_size: None,
            etp_size: None,
            ep_fsdp_size: None,
            vpp_size: None,
        }
    }

    /// Product of the mesh dimensions (fsdp × pp × dp × cp × tp); ep and ulysses subdivide
    /// these and do not add ranks. Saturates instead of overflowing.
    pub fn mesh_world_size(&self) -> u64 {
        [Some(self.dp_size), self.fsdp_size, self.pp_size, self.cp_size, self.tp_size]
            .iter()
            .map(|s| u64::from(s.unwrap_or(1)))
            .fold(1u64, u64::saturating_mul)
    }
}

/// A Ray Serve deployment entry; only `deployments[0]` is used.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    pub name: Option<String>,
    pub num_replicas: Option<u32>,
    pub autoscaling_config: Option<AutoscalingConfig>,
    pub max_ongoing_requests: Option<u32>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub ray_actor_options: RayActorOptions,
}

/// Replica bounds of a deployment.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AutoscalingConfig {
    pub min_replicas: Option<u32>,
    pub max_replicas: Option<u32>,
    pub target_ongoing_requests: Option<f64>,
}

/// Resources and environment of an application's process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RayActorOptions {
    #[serde(default)]
    pub num_cpus: f64,
    #[serde(default)]
    pub num_gpus: f64,
    /// Bytes of memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<f64>,
    /// Custom resources, as `ray start --resources`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<BTreeMap<String, f64>>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub runtime_env: RuntimeEnv,
}

/// Environment of an application's process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RuntimeEnv {
    /// `env_vars:` with no value (as the seed writes it) means none; scalar values (numbers,
    /// booleans) are kept as their YAML text.
    #[serde(default, deserialize_with = "env_vars")]
    pub env_vars: BTreeMap<String, String>,
}
