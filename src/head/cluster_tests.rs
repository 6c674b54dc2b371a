//! Table tests of the head's cluster state on a simulated clock.

use std::collections::BTreeMap;

use super::*;
use crate::cluster::Quantity;

const RANKS: &str = include_str!("../../config/three-node-ranks.yaml");

fn spec(id: &str, gpus: Vec<u32>) -> NodeSpec {
    NodeSpec {
        node_id: id.into(),
        address: "127.0.0.1".into(),
        cpus: Quantity::from_units(8),
        gpu_ids: gpus,
        custom: BTreeMap::new(),
    }
}

fn reg(id: &str, gpus: Vec<u32>) -> NodeRegistration {
    NodeRegistration {
        protocol: PROTOCOL_VERSION,
        node: spec(id, gpus),
        pid: 1,
        gateway_address: None,
        children: vec![],
        is_head: false,
    }
}

fn hb() -> Heartbeat {
    Heartbeat { protocol: PROTOCOL_VERSION, gateway_address: None, children: vec![], gpus: vec![] }
}

fn deploy(h: &mut ClusterHead) -> Result<u64, ClusterError> {
    h.deploy(&DeployRequest {
        protocol: PROTOCOL_VERSION,
        config_yaml: RANKS.to_string(),
        server_type: None,
    })
}

/// (node, gpu ids) of each application, by name.
fn placements(h: &ClusterHead) -> BTreeMap<String, (String, Vec<u32>)> {
    h.status().applications.into_iter().map(|a| (a.name, (a.node, a.gpu_ids))).collect()
}

fn three_nodes(t0: Instant) -> ClusterHead {
    let mut h = ClusterHead::new(Duration::from_secs(3), "127.0.0.1:1".into());
    h.register(&reg("head", vec![0, 1, 2, 3]), t0);
    h.register(&reg("gpu", vec![4, 5, 6, 7]), t0);
    h.register(&reg("cpu", vec![]), t0);
    h
}

#[test]
fn seed_rank_example_spreads_over_three_nodes() {
    let t0 = Instant::now();
    let mut h = three_nodes(t0);
    assert_eq!(deploy(&mut h), Ok(1));
    let p = placements(&h);
    assert_eq!(p["models-Qwen2.5-7B-Instruct"], ("head".into(), vec![0, 1, 2, 3]));
    assert_eq!(p["sampler-Qwen2.5-7B-Instruct"], ("gpu".into(), vec![4, 5]));
    assert_eq!(p["processor"], ("cpu".into(), vec![]));
    let d = h.desired("gpu");
    assert_eq!(d.assignments.len(), 1);
    assert_eq!(d.assignments[0].gpu_ids, vec![4, 5]);
    assert_eq!(d.deployment, 1);
}

/// Three nodes with the deployment placed; at 2 s every node but `silent` heartbeats, so at
/// 4.5 s (past the 3 s timeout) `silent` alone is found dead. Returns the head and its t0.
fn one_node_goes_silent(silent: &str) -> (ClusterHead, Instant) {
    let t0 = Instant::now();
    let mut h = three_nodes(t0);
    assert!(deploy(&mut h).is_ok());
    for node in ["head", "gpu", "cpu"].into_iter().filter(|n| *n != silent) {
        assert!(h.heartbeat(node, &hb(), t0 + Duration::from_secs(2)).is_ok());
    }
    assert_eq!(h.tick(t0 + Duration::from_millis(4500)), vec![silent.to_string()]);
    (h, t0)
}

#[test]
fn dead_node_moves_or_goes_pending_and_comes_back() {
    let (mut h, t0) = one_node_goes_silent("gpu");
    let st = h.status();
    let sampler = st.applications.iter().find(|a| a.name.starts_with("sampler")).cloned();
    let sampler = sampler.expect("sampler listed");
    // The head's 4 cards are all held by the model: nowhere to go, so pending with a reason.
    assert_eq!(sampler.state, AppState::Pending);
    let why = sampler.pending_reason.unwrap_or_default();
    assert!(why.contains("needs 2 GPU"), "{why}");
    assert!(st.nodes.iter().any(|n| n.id == "gpu" && !n.alive));
    // A dead node's heartbeat is refused until it registers again.
    assert!(matches!(
        h.heartbeat("gpu", &hb(), t0 + Duration::from_secs(5)),
        Err(ClusterError::UnknownNode(_))
    ));
    h.register(&reg("gpu", vec![4, 5, 6, 7]), t0 + Duration::from_secs(5));
    assert_eq!(placements(&h)["sampler-Qwen2.5-7B-Instruct"], ("gpu".into(), vec![4, 5]));
}

#[test]
fn dead_cpu_node_moves_processor_elsewhere() {
    let (h, _) = one_node_goes_silent("cpu");
    let (node, gpus) = placements(&h)["processor"].clone();
    assert!(node == "head" || node == "gpu", "{node}");
    assert!(gpus.is_empty());
}

#[test]
fn infeasible_deploy_is_refused_and_changes_nothing() {
    let t0 = Instant::now();
    let mut h = ClusterHead::new(Duration::from_secs(3), String::new());
    h.register(&reg("small", vec![0, 1]), t0);
    let err = deploy(&mut h).expect_err("4 cards on a 2-card cluster");
    let msg = err.to_string();
    assert!(msg.contains("models-Qwen2.5-7B-Instruct") && msg.contains("4 GPU"), "{msg}");
    assert!(h.status().applications.is_empty());
}

#[test]
fn alive_node_re_registering_keeps_its_placements() {
    let t0 = Instant::now();
    let mut h = three_nodes(t0);
    assert!(deploy(&mut h).is_ok());
    let before = placements(&h);
    h.register(&reg("gpu", vec![4, 5, 6, 7]), t0 + Duration::from_secs(1));
    assert_eq!(placements(&h), before);
}

#[test]
fn restarted_head_adopts_reported_children_then_places_the_rest() {
    let t0 = Instant::now();
    let mut h = ClusterHead::new(Duration::from_secs(3), String::new());
    let rec = DeploymentRecord {
        version: 7,
        config_yaml: RANKS.to_string(),
        server_type: ServerType::Twinkle,
    };
    assert!(h.restore(&rec, t0).is_ok());
    // The head's own node registers first, with nothing running: nothing is placed yet.
    h.register(&reg("head", vec![0, 1, 2, 3]), t0);
    assert!(h.status().applications.iter().all(|a| a.state == AppState::Pending));
    // The GPU node still runs the sampler on cards 6,7 (of deployment 7): adopted as is.
    let mut r = reg("gpu", vec![4, 5, 6, 7]);
    r.children = vec![ReportedChild {
        app: "sampler-Qwen2.5-7B-Instruct".into(),
        gpu_ids: vec![6, 7],
        pid: Some(99),
        state: AppState::Running,
        address: Some("127.0.0.1:5".into()),
        restarts: 0,
        last_exit: None,
        deployment: 7,
        download: None,
    }];
    h.register(&r, t0 + Duration::from_secs(1));
    h.register(&reg("cpu", vec![]), t0 + Duration::from_secs(1));
    let p = placements(&h);
    assert_eq!(p["sampler-Qwen2.5-7B-Instruct"], ("gpu".into(), vec![6, 7]));
    assert_eq!(p["models-Qwen2.5-7B-Instruct"].0, "");
    // After the recovery window the rest is placed as usual; the deployment keeps its number.
    let t1 = t0 + Duration::from_secs(3);
    assert!(h.heartbeat("head", &hb(), t1).is_ok());
    assert!(h.heartbeat("gpu", &hb(), t1).is_ok());
    assert!(h.heartbeat("cpu", &hb(), t1).is_ok());
    assert!(h.tick(t0 + Duration::from_millis(3500)).is_empty());
    let p = placements(&h);
    assert_eq!(p["models-Qwen2.5-7B-Instruct"], ("head".into(), vec![0, 1, 2, 3]));
    assert_eq!(p["processor"], ("cpu".into(), vec![]));
    assert_eq!(h.desired("gpu").deployment, 7);
}

/// A node's heartbeat carries its NVML samples; status joins them with the placements, per
/// node, and forgets them when the node dies.
#[test]
fn heartbeat_gpu_samples_reach_status_with_their_holders() {
    let t0 = Instant::now();
    let mut h = three_nodes(t0);
    assert!(deploy(&mut h).is_ok());
    let sample = |id: u32, used: u64| GpuSample {
        id,
        name: Some("Fake A100".into()),
        memory_used_mib: Some(used),
        memory_total_mib: Some(40960),
        utilization_pct: Some(50),
    };
    let t1 = t0 + Duration::from_secs(1);
    let with_gpus = Heartbeat { gpus: vec![sample(4, 100), sample(6, 300)], ..hb() };
    assert!(h.heartbeat("gpu", &with_gpus, t1).is_ok());
    assert!(h.heartbeat("head", &hb(), t1).is_ok());
    assert!(h.heartbeat("cpu", &hb(), t1).is_ok());
    let st = h.status();
    let gpu = st.nodes.iter().find(|n| n.id == "gpu").expect("gpu node");
    let rows: Vec<(u32, Option<u64>, Option<&str>)> = gpu
        .gpus
        .iter()
        .map(|g| (g.sample.id, g.sample.memory_used_mib, g.app.as_deref()))
        .collect();
    let sampler = Some("sampler-Qwen2.5-7B-Instruct");
    assert_eq!(
        rows,
        [(4, Some(100), sampler), (5, None, sampler), (6, Some(300), None), (7, None, None)]
    );
    // The head node sent no samples: its cards are listed, held by the model, figures unknown.
    let head = st.nodes.iter().find(|n| n.id == "head").expect("head node");
    assert!(head.gpus.iter().all(|g| g.sample.memory_used_mib.is_none()));
    assert!(head.gpus.iter().all(|g| g.app.as_deref() == Some("models-Qwen2.5-7B-Instruct")));
    assert!(st.nodes.iter().find(|n| n.id == "cpu").is_some_and(|n| n.gpus.is_empty()));

    assert!(h.heartbeat("head", &hb(), t0 + Duration::from_secs(4)).is_ok());
    h.tick(t0 + Duration::from_millis(4500));
    let st = h.status();
    let gpu = st.nodes.iter().find(|n| n.id == "gpu").expect("gpu node");
    assert!(!gpu.alive && gpu.gpus.iter().all(|g| g.sample.memory_used_mib.is_none()));
}
