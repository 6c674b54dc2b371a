//! Scheduler tables: the seed's examples, single-node sharing, infeasible and retry cases.

use std::collections::BTreeMap;

use super::*;

fn node(id: &str, gpus: &[u32], cpus: f64) -> NodeSpec {
    NodeSpec {
        node_id: id.to_string(),
        address: format!("10.0.0.{}", id.len()),
        cpus: Quantity::from_f64(cpus),
        gpu_ids: gpus.to_vec(),
        custom: BTreeMap::new(),
    }
}

/// A demand of `gpus` cards and `cpus` with no custom resources.
fn demand(app: &str, gpus: u32, cpus: Quantity) -> Demand {
    Demand { app: app.into(), gpus, cpus, custom: BTreeMap::new() }
}

fn apps(yaml: &str) -> Vec<Application> {
    serde_norway::from_str(yaml).expect("test yaml parses")
}

fn placed(r: &ScheduleResult) -> (&str, &[u32]) {
    match r {
        ScheduleResult::Scheduled(a) => (a.node_id.as_str(), a.gpu_ids.as_slice()),
        other => panic!("expected Scheduled, got {other:?}"),
    }
}

/// The seed's "Node Rank in YAML Configuration" example, verbatim.
const SEED_RANKS: &str = include_str!("testdata/seed_ranks.yaml");

/// The seed's Tinker-compatible applications (server, model ranks 2, sampler ranks 1 + num_gpus 1).
const SEED_TINKER: &str = include_str!("testdata/seed_tinker.yaml");

#[test]
fn demands_follow_ranks_and_actor_options() {
    let a = apps(SEED_TINKER);
    let d: Vec<Demand> = a.iter().map(demand_of).collect();
    assert_eq!((d[0].gpus, d[0].cpus), (0, Quantity::from_f64(0.1)));
    assert_eq!((d[1].gpus, d[1].cpus), (2, Quantity::from_f64(0.1)));
    // ranks 1 and num_gpus 1 are the same card.
    assert_eq!((d[2].gpus, d[2].cpus), (1, Quantity::from_f64(0.1)));
    let r = apps(SEED_RANKS);
    let p = demand_of(&r[2]);
    // CPU group with ranks 0: ncpu_proc_per_node workers, one CPU each.
    assert_eq!((p.gpus, p.cpus), (0, Quantity::from_units(4)));
}

#[test]
fn seed_three_node_example() {
    // CUDA_VISIBLE_DEVICES=0,1,2,3 head; 4,5,6,7 worker; CPU-only worker.
    let mut c = ClusterState::new(vec![
        node("node-0", &[0, 1, 2, 3], 16.0),
        node("node-1", &[4, 5, 6, 7], 16.0),
        node("node-2", &[], 16.0),
    ]);
    let demands: Vec<Demand> = apps(SEED_RANKS).iter().map(demand_of).collect();
    let r = c.schedule_all(&demands);
    assert_eq!(placed(&r[0]), ("node-0", &[0, 1, 2, 3][..]));
    assert_eq!(placed(&r[1]), ("node-1", &[4, 5][..]));
    assert_eq!(placed(&r[2]), ("node-2", &[][..]));
    assert_eq!(c.nodes()[1].free_gpu_ids, vec![6, 7]);
    assert_eq!(c.nodes()[2].free_cpus, Quantity::from_units(12));
}

#[test]
fn single_eight_gpu_node_shares_with_disjoint_cards() {
    let mut c = ClusterState::new(vec![node("node-0", &[0, 1, 2, 3, 4, 5, 6, 7], 32.0)]);
    let mut all = apps(SEED_TINKER);
    all.extend(apps(SEED_RANKS).into_iter().skip(2)); // + processor
    let demands: Vec<Demand> = all.iter().map(demand_of).collect();
    let r = c.schedule_all(&demands);
    let model = placed(&r[1]).1.to_vec();
    let sampler = placed(&r[2]).1.to_vec();
    assert_eq!(model, vec![0, 1]);
    assert_eq!(sampler, vec![2]);
    assert_eq!(placed(&r[0]).1, &[] as &[u32]);
    assert_eq!(placed(&r[3]).1, &[] as &[u32]);
    assert_eq!(c.nodes()[0].free_gpu_ids, vec![3, 4, 5, 6, 7]);
    // 0.1 + 0.1 + 0.1 + 4 CPUs taken, exactly.
    assert_eq!(c.nodes()[0].free_cpus, Quantity::from_f64(32.0 - 4.3));
}

#[test]
fn spread_prefers_empty_nodes_then_tight_fit() {
    let mut c = ClusterState::new(vec![node("a", &[0, 1, 2, 3], 8.0), node("b", &[4, 5], 8.0)]);
    let d = |app: &str, gpus| demand(app, gpus, Quantity::from_f64(0.5));
    // Both empty: the 2-GPU demand fills b exactly.
    assert_eq!(placed(&c.schedule(&d("x", 2))), ("b", &[4, 5][..]));
    // b hosts one app now, a none: a.
    assert_eq!(placed(&c.schedule(&d("y", 1))), ("a", &[0][..]));
    // a fits, b is full.
    assert_eq!(placed(&c.schedule(&d("z", 3))), ("a", &[1, 2, 3][..]));
}

#[test]
fn cpu_only_demands_avoid_gpu_nodes() {
    let mut c = ClusterState::new(vec![node("gpu", &[0, 1], 8.0), node("cpu", &[], 8.0)]);
    let d = demand("processor", 0, Quantity::from_units(2));
    assert_eq!(placed(&c.schedule(&d)).0, "cpu");
}

#[test]
fn infeasible_names_app_demand_and_every_node() {
    let mut c = ClusterState::new(vec![node("node-0", &[0, 1], 4.0), node("node-1", &[], 2.0)]);
    let d = demand("models-big", 4, Quantity::from_f64(0.1));
    match c.schedule(&d) {
        ScheduleResult::Infeasible(msg) => {
            assert!(msg.contains("\"models-big\""), "{msg}");
            assert!(msg.contains("4 GPU, 0.1 CPU"), "{msg}");
            assert!(msg.contains("node-0: 2 GPU free [0, 1] of 2, 4 CPU free of 4"), "{msg}");
            assert!(msg.contains("node-1: 0 GPU free [] of 0, 2 CPU free of 2"), "{msg}");
            assert!(msg.contains("no node can ever provide it"), "{msg}");
        }
        other => panic!("expected Infeasible, got {other:?}"),
    }
    // Nothing was taken.
    assert_eq!(c.nodes()[0].free_gpu_ids, vec![0, 1]);
}

#[test]
fn busy_is_retry_and_release_makes_room() {
    let mut c = ClusterState::new(vec![node("n", &[0, 1], 4.0)]);
    let d = |app: &str| demand(app, 2, Quantity::from_f64(0.1));
    let ScheduleResult::Scheduled(first) = c.schedule(&d("a")) else { panic!("a not placed") };
    match c.schedule(&d("b")) {
        ScheduleResult::Retry(msg) => {
            assert!(msg.contains("\"b\" needs 2 GPU"), "{msg}");
            assert!(msg.contains("n: 0 GPU free [] of 2"), "{msg}");
        }
        other => panic!("expected Retry, got {other:?}"),
    }
    c.release(&first);
    assert_eq!(placed(&c.schedule(&d("b"))), ("n", &[0, 1][..]));
}

#[test]
fn schedule_all_is_all_or_nothing() {
    let mut c = ClusterState::new(vec![node("n", &[0, 1, 2], 4.0)]);
    let d = |app: &str, gpus| demand(app, gpus, Quantity::from_f64(0.1));
    let r = c.schedule_all(&[d("a", 2), d("b", 2)]);
    assert!(matches!(r[0], ScheduleResult::Scheduled(_)));
    assert!(matches!(r[1], ScheduleResult::Retry(_)));
    assert_eq!(c.nodes()[0].free_gpu_ids, vec![0, 1, 2]);
    assert_eq!(c.nodes()[0].free_cpus, Quantity::from_units(4));
    assert!(c.nodes()[0].apps.is_empty());
}

#[test]
fn largest_first_avoids_fragmentation() {
    // In YAML order, spread would put p and q on separate nodes and leave no room for r;
    // placing the 4-card demand first fits all three.
    let mut c =
        ClusterState::new(vec![node("a", &[0, 1, 2, 3], 8.0), node("b", &[4, 5, 6, 7], 8.0)]);
    let d = |app: &str, gpus| demand(app, gpus, Quantity::ZERO);
    let r = c.schedule_all(&[d("p", 2), d("q", 2), d("r", 4)]);
    assert_eq!(placed(&r[2]), ("a", &[0, 1, 2, 3][..]));
    assert_eq!(placed(&r[0]), ("b", &[4, 5][..]));
    assert_eq!(placed(&r[1]), ("b", &[6, 7][..]));
}

#[test]
fn custom_resources_and_dead_nodes() {
    let mut n0 = node("n0", &[], 4.0);
    n0.custom.insert("accelerator_x".into(), Quantity::from_units(1));
    let mut c = ClusterState::new(vec![n0, node("n1", &[], 4.0)]);
    let mut custom = BTreeMap::new();
    custom.insert("accelerator_x".to_string(), Quantity::from_units(1));
    let d = Demand { app: "c".into(), gpus: 0, cpus: Quantity::from_units(1), custom };
    assert_eq!(placed(&c.schedule(&d)).0, "n0");
    c.set_alive("n1", false);
    let plain = demand("p", 0, Quantity::from_units(4));
    // n1 is dead and n0 has only 3 CPUs free: retry (n0 could hold it when idle).
    assert!(matches!(c.schedule(&plain), ScheduleResult::Retry(_)));
}

#[test]
fn quantities_are_exact() {
    let mut q = Quantity::ZERO;
    for _ in 0..10 {
        q = q + Quantity::from_f64(0.1);
    }
    assert_eq!(q, Quantity::from_units(1));
    assert_eq!(Quantity::from_f64(0.25).to_string(), "0.25");
    assert_eq!(Quantity::from_f64(3.0).to_string(), "3");
    assert_eq!(Quantity::from_f64(-1.0), Quantity::ZERO);
}
