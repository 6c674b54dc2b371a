//! Local node inventory: GPUs from NVML or `--num-gpus`, CPUs from the OS or `--num-cpus`.
//!
//! Never touches CUDA itself (the head must not create a CUDA context: it does not survive fork).

use std::collections::BTreeMap;

use super::resources::{NodeSpec, Quantity};

/// Parses `CUDA_VISIBLE_DEVICES` into physical ids. Entries that are not integers (UUIDs,
/// `MIG-...`) are resolved through `resolve` (NVML uuid → index); an unresolvable entry ends
/// the list, as CUDA itself stops at the first invalid entry.
pub fn parse_visible_devices(value: &str, resolve: &dyn Fn(&str) -> Option<u32>) -> Vec<u32> {
    let mut ids = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let id = match part.parse::<u32>() {
            Ok(i) => Some(i),
            Err(_) => resolve(part),
        };
        match id {
            Some(i) if !ids.contains(&i) => ids.push(i),
            Some(_) => {}
            None => break,
        }
    }
    ids
}

/// GPUs NVML can see, as `(index, uuid)` in PCI order; empty when there is no driver.
fn nvml_gpus() -> Vec<(u32, String)> {
    let Ok(nvml) = nvml_wrapper::Nvml::init() else {
        return Vec::new();
    };
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|i| {
            let dev = nvml.device_by_index(i).ok()?;
            Some((i, dev.uuid().unwrap_or_default()))
        })
        .collect()
}

/// Describes this machine as a node, like `ray start` does.
///
/// * `num_gpus` given: that many cards, taking their physical ids from `CUDA_VISIBLE_DEVICES`
///   when it names enough (so `CUDA_VISIBLE_DEVICES=4,5,6,7 --num-gpus 4` is cards 4–7), else
///   `0..n`.
/// * not given: the cards NVML reports, restricted to `CUDA_VISIBLE_DEVICES` when set; no driver
///   means zero GPUs, which is normal.
pub fn detect_local_node(num_gpus: Option<u32>, num_cpus: Option<f64>) -> NodeSpec {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    detect_with(num_gpus, num_cpus, visible.as_deref(), &nvml_gpus)
}

pub(crate) fn detect_with(
    num_gpus: Option<u32>,
    num_cpus: Option<f64>,
    visible: Option<&str>,
    nvml: &dyn Fn() -> Vec<(u32, String)>,
) -> NodeSpec {
    let gpu_ids = match num_gpus {
        Some(n) => {
            let listed = visible
                .map(|v| parse_visible_devices(v, &|_| None))
                .filter(|ids| ids.len() >= n as usize);
            match listed {
                Some(ids) => ids.into_iter().take(n as usize).collect(),
                None => (0..n).collect(),
            }
        }
        None => {
            let devices = nvml();
            match visible {
                Some(v) => {
                    let resolve = |s: &str| {
                        devices.iter().find(|(_, uuid)| uuid.starts_with(s)).map(|(i, _)| *i)
                    };
                    parse_visible_devices(v, &resolve)
                        .into_iter()
                        .filter(|id| devices.iter().any(|(i, _)| i == id))
                        .collect()
                }
                None => devices.iter().map(|(i, _)| *i).collect(),
            }
        }
    };
    let cpus = num_cpus.unwrap_or_else(|| {
        std::thread::available_parallelism().map(|n| n.get() as f64).unwrap_or(1.0)
    });
    NodeSpec {
        node_id: "node-0".to_string(),
        address: "127.0.0.1".to_string(),
        cpus: Quantity::from_f64(cpus),
        gpu_ids,
        custom: BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_nvml() -> Vec<(u32, String)> {
        Vec::new()
    }

    #[test]
    fn flags_take_ids_from_visible_devices() {
        let n = detect_with(Some(4), Some(8.0), Some("4,5,6,7"), &no_nvml);
        assert_eq!(n.gpu_ids, vec![4, 5, 6, 7]);
        assert_eq!(n.cpus, Quantity::from_units(8));
    }

    #[test]
    fn flags_without_visible_devices_count_from_zero() {
        assert_eq!(detect_with(Some(3), None, None, &no_nvml).gpu_ids, vec![0, 1, 2]);
        assert_eq!(detect_with(Some(0), None, Some("1,2"), &no_nvml).gpu_ids, Vec::<u32>::new());
    }

    #[test]
    fn too_few_visible_devices_for_the_flag_counts_from_zero() {
        assert_eq!(detect_with(Some(3), None, Some("5"), &no_nvml).gpu_ids, vec![0, 1, 2]);
    }

    #[test]
    fn no_driver_is_zero_gpus() {
        let n = detect_with(None, Some(2.0), None, &no_nvml);
        assert!(n.gpu_ids.is_empty());
    }

    #[test]
    fn nvml_restricted_by_visible_devices_and_uuids() {
        let nvml =
            || vec![(0, "GPU-aaa".to_string()), (1, "GPU-bbb".to_string()), (2, "GPU-ccc".into())];
        assert_eq!(detect_with(None, None, None, &nvml).gpu_ids, vec![0, 1, 2]);
        assert_eq!(detect_with(None, None, Some("2,0"), &nvml).gpu_ids, vec![2, 0]);
        assert_eq!(detect_with(None, None, Some("GPU-bbb,7"), &nvml).gpu_ids, vec![1]);
        // CUDA stops at the first invalid entry.
        assert_eq!(detect_with(None, None, Some("1,bogus,2"), &nvml).gpu_ids, vec![1]);
        assert_eq!(detect_with(None, None, Some(""), &nvml).gpu_ids, Vec::<u32>::new());
    }
}
