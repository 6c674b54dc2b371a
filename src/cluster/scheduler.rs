//! All-or-nothing placement of application demands onto nodes, with a spread policy.
//!
//! Pure: no I/O, no clock, no randomness, so every decision is reproducible from a table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::resources::{Allocation, Demand, NodeSpec, Quantity};

/// The outcome of one scheduling attempt; never a bare bool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleResult {
    /// Placed; the resources are now held until [`ClusterState::release`].
    Scheduled(Allocation),
    /// Some node could hold it when idle, but not now: try again after something is released
    /// (or a node joins). The text says what is missing.
    Retry(String),
    /// No node can ever hold it. The text names the application, its demand and every node.
    Infeasible(String),
}

/// A node's totals plus what is still free and who holds what.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeState {
    pub spec: NodeSpec,
    pub alive: bool,
    pub free_cpus: Quantity,
    pub free_gpu_ids: Vec<u32>,
    pub free_custom: BTreeMap<String, Quantity>,
    /// Applications placed here, by name.
    pub apps: Vec<String>,
}

impl NodeState {
    fn new(spec: NodeSpec) -> Self {
        let mut free_gpu_ids = spec.gpu_ids.clone();
        free_gpu_ids.sort_unstable();
        free_gpu_ids.dedup();
        Self {
            free_cpus: spec.cpus,
            free_custom: spec.custom.clone(),
            free_gpu_ids,
            spec,
            alive: true,
            apps: Vec::new(),
        }
    }

    fn fits_now(&self, d: &Demand) -> bool {
        self.alive
            && self.free_gpu_ids.len() >= d.gpus as usize
            && self.free_cpus >= d.cpus
            && d.custom
                .iter()
                .all(|(k, v)| self.free_custom.get(k).copied().unwrap_or_default() >= *v)
    }

    fn fits_when_idle(&self, d: &Demand) -> bool {
        self.alive
            && self.spec.gpu_ids.len() >= d.gpus as usize
            && self.spec.cpus >= d.cpus
            && d.custom
                .iter()
                .all(|(k, v)| self.spec.custom.get(k).copied().unwrap_or_default() >= *v)
    }

    fn describe_free(&self) -> String {
        let mut s = format!(
            "{}: {} GPU free {:?} of {}, {} CPU free of {}",
            self.spec.node_id,
            self.free_gpu_ids.len(),
            self.free_gpu_ids,
            self.spec.gpu_ids.len(),
            self.free_cpus,
            self.spec.cpus
        );
        for (k, v) in &self.free_custom {
            let _ = write!(s, ", {v} {k} free");
        }
        if !self.alive {
            s.push_str(" (dead)");
        }
        s
    }
}

/// Chooses among the nodes that fit a demand right now.
pub trait PlacementPolicy {
    /// Index into `nodes` of the chosen node; only called with at least one candidate.
    fn choose(&self, demand: &Demand, nodes: &[NodeState], candidates: &[usize]) -> usize;
}

/// The seed's rule: each component on a node of its own when possible. Among fitting nodes,
/// prefer the one hosting the fewest applications; CPU-only demands prefer nodes without GPUs
/// (keeping cards free, as Ray avoids GPU nodes for CPU tasks); GPU demands prefer the node
/// whose free cards they fill most tightly (less fragmentation); ties go to node order.
#[derive(Debug, Default, Clone, Copy)]
pub struct SpreadPolicy;

impl PlacementPolicy for SpreadPolicy {
    fn choose(&self, demand: &Demand, nodes: &[NodeState], candidates: &[usize]) -> usize {
        let key = |&i: &usize| {
            let n = &nodes[i];
            let gpu_pref = if demand.gpus == 0 {
                n.spec.gpu_ids.len()
            } else {
                n.free_gpu_ids.len() - demand.gpus as usize
            };
            (n.apps.len(), gpu_pref, i)
        };
        candidates.iter().copied().min_by_key(key).unwrap_or(candidates[0])
    }
}

/// The scheduler's view of the cluster.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterState {
    nodes: Vec<NodeState>,
}

impl ClusterState {
    pub fn new(nodes: Vec<NodeSpec>) -> Self {
        Self { nodes: nodes.into_iter().map(NodeState::new).collect() }
    }

    pub fn nodes(&self) -> &[NodeState] {
        &self.nodes
    }

    /// Adds a node (a join); an existing id is replaced with fresh, fully free resources.
    pub fn add_node(&mut self, spec: NodeSpec) {
        match self.nodes.iter_mut().find(|n| n.spec.node_id == spec.node_id) {
            Some(n) => *n = NodeState::new(spec),
            None => self.nodes.push(NodeState::new(spec)),
        }
    }

    /// Takes exactly `alloc`'s resources on its node (a child that already runs there, learned
    /// back by a restarted head). False, and nothing taken, when they are not all free.
    pub fn reserve(&mut self, alloc: &Allocation) -> bool {
        let Some(node) = self.nodes.iter_mut().find(|n| n.spec.node_id == alloc.node_id) else {
            return false;
        };
        let gpus_free = alloc.gpu_ids.iter().all(|g| node.free_gpu_ids.contains(g));
        let custom_free =
            alloc.custom.iter().all(|(k, v)| node.free_custom.get(k).is_some_and(|f| f >= v));
        if !node.alive || !gpus_free || node.free_cpus < alloc.cpus || !custom_free {
            return false;
        }
        node.free_gpu_ids.retain(|g| !alloc.gpu_ids.contains(g));
        node.free_cpus = node.free_cpus.saturating_sub(alloc.cpus);
        for (k, v) in &alloc.custom {
            if let Some(free) = node.free_custom.get_mut(k) {
                *free = free.saturating_sub(*v);
            }
        }
        node.apps.push(alloc.app.clone());
        true
    }

    /// Marks a node dead or alive; a dead node receives nothing new.
    pub fn set_alive(&mut self, node_id: &str, alive: bool) {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.spec.node_id == node_id) {
            n.alive = alive;
        }
    }

    /// Places one demand with the default [`SpreadPolicy`].
    pub fn schedule(&mut self, demand: &Demand) -> ScheduleResult {
        self.schedule_with(demand, &SpreadPolicy)
    }

    pub fn schedule_with(
        &mut self,
        demand: &Demand,
        policy: &dyn PlacementPolicy,
    ) -> ScheduleResult {
        let candidates: Vec<usize> =
            (0..self.nodes.len()).filter(|&i| self.nodes[i].fits_now(demand)).collect();
        if candidates.is_empty() {
            let ever = self.nodes.iter().any(|n| n.fits_when_idle(demand));
            let msg = self.explain(demand, ever);
            return if ever { ScheduleResult::Retry(msg) } else { ScheduleResult::Infeasible(msg) };
        }
        let idx = policy.choose(demand, &self.nodes, &candidates);
        let node = &mut self.nodes[idx];
        let gpu_ids: Vec<u32> = node.free_gpu_ids.drain(..demand.gpus as usize).collect();
        node.free_cpus = node.free_cpus.saturating_sub(demand.cpus);
        for (k, v) in &demand.custom {
            if let Some(free) = node.free_custom.get_mut(k) {
                *free = free.saturating_sub(*v);
            }
        }
        node.apps.push(demand.app.clone());
        ScheduleResult::Scheduled(Allocation {
            app: demand.app.clone(),
            node_id: node.spec.node_id.clone(),
            gpu_ids,
            cpus: demand.cpus,
            custom: demand.custom.clone(),
        })
    }

    /// Returns an allocation's resources to its node.
    pub fn release(&mut self, alloc: &Allocation) {
        let Some(node) = self.nodes.iter_mut().find(|n| n.spec.node_id == alloc.node_id) else {
            return;
        };
        for g in &alloc.gpu_ids {
            if node.spec.gpu_ids.contains(g) && !node.free_gpu_ids.contains(g) {
                node.free_gpu_ids.push(*g);
            }
        }
        node.free_gpu_ids.sort_unstable();
        node.free_cpus = (node.free_cpus + alloc.cpus).min(node.spec.cpus);
        for (k, v) in &alloc.custom {
            if let (Some(free), Some(total)) =
                (node.free_custom.get_mut(k), node.spec.custom.get(k))
            {
                *free = (*free + *v).min(*total);
            }
        }
        if let Some(pos) = node.apps.iter().position(|a| a == &alloc.app) {
            node.apps.remove(pos);
        }
    }

    /// Places a whole deployment: largest GPU demands first (fewer dead ends from
    /// fragmentation), results in input order. All-or-nothing: if any demand is not
    /// `Scheduled`, everything placed by this call is released again.
    pub fn schedule_all(&mut self, demands: &[Demand]) -> Vec<ScheduleResult> {
        let mut order: Vec<usize> = (0..demands.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse((demands[i].gpus, demands[i].cpus)));
        let mut results: Vec<Option<ScheduleResult>> = vec![None; demands.len()];
        for i in order {
            results[i] = Some(self.schedule(&demands[i]));
        }
        let results: Vec<ScheduleResult> = results.into_iter().flatten().collect();
        if results.iter().any(|r| !matches!(r, ScheduleResult::Scheduled(_))) {
            for r in &results {
                if let ScheduleResult::Scheduled(a) = r {
                    self.release(a);
                }
            }
        }
        results
    }

    fn explain(&self, demand: &Demand, ever: bool) -> String {
        let mut s = format!("application \"{}\" needs {}; ", demand.app, demand);
        if ever {
            s.push_str("no node has that free right now");
        } else {
            s.push_str("no node can ever provide it");
        }
        if self.nodes.is_empty() {
            s.push_str(" (the cluster has no nodes)");
            return s;
        }
        s.push_str(" — ");
        let parts: Vec<String> = self.nodes.iter().map(NodeState::describe_free).collect();
        s.push_str(&parts.join("; "));
        s
    }
}
