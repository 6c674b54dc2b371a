//! Cluster resources and the Ray-style scheduler (pure: no I/O, no clock), plus local-node detection.

pub mod detect;
pub mod resources;
pub mod scheduler;

pub use detect::{detect_local_node, parse_visible_devices};
pub use resources::{Allocation, Demand, NodeSpec, Quantity};
pub use scheduler::{ClusterState, NodeState, PlacementPolicy, ScheduleResult, SpreadPolicy};

use crate::config::{Application, DeviceType};

/// The resources an application needs.
///
/// GPUs: `device_group.ranks` cards for a cuda group, or `ray_actor_options.num_gpus` rounded up
/// to whole cards, whichever is larger. The two describe the same cards: the Python reference's
/// replica actor and its rank workers live in one process here, and the seed's sampler
/// (`ranks: 1` plus `num_gpus: 1`, "needs independent GPU") means one card, not two.
/// CPUs: `ray_actor_options.num_cpus` plus one CPU per worker of a CPU device group
/// (`ranks`, or `ncpu_proc_per_node` when ranks is 0 as in the seed's processor example).
pub fn demand_of(app: &Application) -> Demand {
    let opts = app.deployments.first().map(|d| &d.ray_actor_options);
    let num_cpus = opts.map(|o| o.num_cpus).unwrap_or(0.0);
    let num_gpus = opts.map(|o| o.num_gpus).unwrap_or(0.0);
    let custom = opts
        .and_then(|o| o.resources.as_ref())
        .map(|r| r.iter().map(|(k, v)| (k.clone(), Quantity::from_f64(*v))).collect())
        .unwrap_or_default();
    let mut gpus = if num_gpus > 0.0 && num_gpus.is_finite() { num_gpus.ceil() as u32 } else { 0 };
    let mut cpu_workers = 0u32;
    if let Some(group) = &app.args.device_group {
        match group.device_type {
            DeviceType::Cuda => gpus = gpus.max(group.ranks.count()),
            DeviceType::Cpu => {
                cpu_workers = match group.ranks.count() {
                    0 => app.args.ncpu_proc_per_node.unwrap_or(1),
                    n => n,
                }
            }
        }
    }
    Demand {
        app: app.name.clone(),
        gpus,
        cpus: Quantity::from_f64(num_cpus) + Quantity::from_units(cpu_workers),
        custom,
    }
}

#[cfg(test)]
mod tests;
