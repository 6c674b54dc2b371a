//! The cluster head actor: the only owner of the [`ClusterHead`] (nodes, heartbeats, the
//! deployment and every application's placement: the cluster's desired state).
//!
//! The control port's handlers send it [`RegisterNode`], [`NodeHeartbeat`], [`Deploy`] and
//! [`ClusterStatus`]; its own timer is the failure detector (nodes silent for the timeout are
//! marked dead and their applications rescheduled). [`ClusterHead`] stays pure (no I/O, time
//! passed in), so its scheduling is unit-tested on a simulated clock; this actor only adds the
//! clock and the mailbox.

use std::time::{Duration, Instant};

use actix::{Actor, AsyncContext as _, Context, Handler, Message, MessageResult};

use super::cluster::{
    ClusterError, ClusterHead, DeployRequest, DeploymentRecord, DesiredState, Heartbeat,
    NodeRegistration,
};
use super::registry::StatusReport;

/// How often silent nodes are looked for.
const DETECT_EVERY: Duration = Duration::from_millis(250);

/// Owns the [`ClusterHead`]; see the module docs.
pub struct ClusterActor {
    head: ClusterHead,
}

impl ClusterActor {
    /// Starts the actor (and its failure detector) on the current arbiter.
    pub fn spawn(head: ClusterHead) -> actix::Addr<Self> {
        Self { head }.start()
    }
}

impl Actor for ClusterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(DETECT_EVERY, |act, _| {
            for id in act.head.tick(Instant::now()) {
                tracing::warn!(node = %id, "node missed heartbeats: marked dead, rescheduling");
            }
        });
    }
}

/// Replaces the head's state: its control address once bound, and the deployment a restarted
/// head recorded (restored; `Err` says why it could not be).
#[derive(Debug, Message)]
#[rtype(result = "Result<(), ClusterError>")]
pub struct Reset {
    pub timeout: Duration,
    pub control_address: String,
    pub restore: Option<DeploymentRecord>,
}

/// A node agent (re-)registers; answers its node id and the node timeout.
#[derive(Debug, Message)]
#[rtype(result = "(String, Duration)")]
pub struct RegisterNode(pub NodeRegistration);

/// A node's heartbeat; answers what it should run.
#[derive(Debug, Message)]
#[rtype(result = "Result<DesiredState, ClusterError>")]
pub struct NodeHeartbeat {
    pub node: String,
    pub heartbeat: Heartbeat,
}

/// A new deployment; answers its version and the record to persist.
#[derive(Debug, Message)]
#[rtype(result = "Result<(u64, Option<DeploymentRecord>), ClusterError>")]
pub struct Deploy(pub DeployRequest);

/// `GET /v1/status` of the cluster.
#[derive(Debug, Message)]
#[rtype(result = "StatusReport")]
pub struct ClusterStatus;

impl Handler<Reset> for ClusterActor {
    type Result = Result<(), ClusterError>;
    fn handle(&mut self, m: Reset, _: &mut Context<Self>) -> Self::Result {
        self.head = ClusterHead::new(m.timeout, m.control_address);
        match m.restore {
            Some(rec) => self.head.restore(&rec, Instant::now()),
            None => Ok(()),
        }
    }
}

impl Handler<RegisterNode> for ClusterActor {
    type Result = MessageResult<RegisterNode>;
    fn handle(&mut self, m: RegisterNode, _: &mut Context<Self>) -> Self::Result {
        let id = self.head.register(&m.0, Instant::now());
        MessageResult((id, self.head.timeout()))
    }
}

impl Handler<NodeHeartbeat> for ClusterActor {
    type Result = Result<DesiredState, ClusterError>;
    fn handle(&mut self, m: NodeHeartbeat, _: &mut Context<Self>) -> Self::Result {
        self.head.heartbeat(&m.node, &m.heartbeat, Instant::now())
    }
}

impl Handler<Deploy> for ClusterActor {
    type Result = Result<(u64, Option<DeploymentRecord>), ClusterError>;
    fn handle(&mut self, m: Deploy, _: &mut Context<Self>) -> Self::Result {
        let version = self.head.deploy(&m.0)?;
        Ok((version, self.head.deployment_record()))
    }
}

impl Handler<ClusterStatus> for ClusterActor {
    type Result = MessageResult<ClusterStatus>;
    fn handle(&mut self, _: ClusterStatus, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.head.status())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::cluster::{NodeSpec, Quantity};
    use crate::head::cluster::PROTOCOL_VERSION;

    fn node(id: &str) -> NodeRegistration {
        NodeRegistration {
            protocol: PROTOCOL_VERSION,
            node: NodeSpec {
                node_id: id.into(),
                address: "127.0.0.1".into(),
                cpus: Quantity::from_units(8),
                gpu_ids: vec![0, 1, 2, 3, 4, 5, 6, 7],
                custom: BTreeMap::new(),
            },
            pid: 1,
            gateway_address: None,
            children: vec![],
            is_head: true,
        }
    }

    fn heartbeat() -> Heartbeat {
        Heartbeat {
            protocol: PROTOCOL_VERSION,
            gateway_address: None,
            children: vec![],
            gpus: vec![],
        }
    }

    #[test]
    fn register_deploy_heartbeat_and_the_failure_detector() {
        actix::System::new().block_on(async {
            let timeout = Duration::from_millis(300);
            let head = ClusterActor::spawn(ClusterHead::new(timeout, String::new()));
            let reset = Reset { timeout, control_address: "127.0.0.1:1".into(), restore: None };
            head.send(reset).await.expect("alive").expect("nothing to restore");
            let (id, t) = head.send(RegisterNode(node("n1"))).await.expect("alive");
            assert_eq!((id.as_str(), t), ("n1", timeout));
            let yaml = include_str!("../../config/three-node-ranks.yaml").to_string();
            let req =
                DeployRequest { protocol: PROTOCOL_VERSION, config_yaml: yaml, server_type: None };
            let (version, record) = head.send(Deploy(req)).await.expect("alive").expect("fits");
            assert_eq!(record.map(|r| r.version), Some(version));
            let hb = NodeHeartbeat { node: "n1".into(), heartbeat: heartbeat() };
            let desired = head.send(hb).await.expect("alive").expect("known node");
            assert!(!desired.assignments.is_empty());
            let status = head.send(ClusterStatus).await.expect("alive");
            assert_eq!(status.control_address, "127.0.0.1:1");
            assert!(status.nodes.iter().all(|n| n.alive));
            // Silent past the timeout: the detector marks it dead, its heartbeat is refused.
            tokio::time::sleep(timeout + 2 * DETECT_EVERY).await;
            let status = head.send(ClusterStatus).await.expect("alive");
            assert!(status.nodes.iter().all(|n| !n.alive), "{:?}", status.nodes);
            let hb = NodeHeartbeat { node: "n1".into(), heartbeat: heartbeat() };
            let refused = head.send(hb).await.expect("alive");
            assert_eq!(refused, Err(ClusterError::UnknownNode("n1".into())));
        });
    }
}
