//! Head: control plane (node registry, child registration, desired state, status).
//!
//! On a single machine (`twinkle serve`) the head lives in the serve process: it owns the
//! [`registry::Registry`], answers children's registrations and `twinkle status` on a loopback
//! control address, and records that address in `$TWINKLE_HOME/serve.json`.
//!
//! In a cluster (`twinkle start --head`) the head is its own daemon: [`cluster`] holds the
//! nodes, their heartbeats and the desired placement of every application, [`cluster_http`]
//! serves it on the control port (token + protocol version checked), and [`cluster_record`]
//! keeps `$TWINKLE_HOME/cluster.json`, the deployment and the pid records `twinkle stop` reads.
//!
//! ## Actors
//!
//! Every piece of the head's mutable state has exactly one owning actor; HTTP handlers,
//! supervisors and the gateway send it typed messages and hold only its address:
//! * [`registry_actor::RegistryActor`] owns a [`registry::Registry`] (application entries with
//!   pid, registration token, state, address, restarts, last exit, download progress; nodes;
//!   GPU samples; the control and gateway addresses). Messages: `Register`, `Progress`,
//!   `Snapshot`, `LocalSnapshot`, `IsRegistered`,
//!   `ChildStarted`, `ChildExited`, `SpawnFailed`, `StartupFailed`, `SetState`, `SetAddresses`,
//!   `SetGpuSamples`, `GpuSamples`, `AddApp`, `RemoveApp`, `SetUpstream`, `SetNodes`,
//!   [`crate::gateway::Lookup`], [`crate::gateway::ReadyQuery`]. After every change it publishes
//!   a [`crate::gateway::UpstreamView`] that the gateway reads without waiting (the view type is
//!   the gateway's, so the gateway never imports the head).
//! * [`cluster_actor::ClusterActor`] owns the [`cluster::ClusterHead`] (nodes, heartbeats, the
//!   deployment, placements: the cluster's desired state) and runs the failure detector.
//!   Messages: `Reset`, `RegisterNode`, `NodeHeartbeat`, `Deploy`, `ClusterStatus`.
//!
//! The node side adds one [`crate::node::SupervisorActor`] per child (owns the process; `Stop`)
//! and a [`crate::node::reconcile::Reconciler`] (owns which children run; `Converge`,
//! `StopAll`, `Report`).

pub mod cluster;
pub mod cluster_actor;
pub mod cluster_http;
pub mod cluster_record;
pub mod control;
pub mod gpu_table;
pub mod registry;
pub mod registry_actor;
pub mod state_file;
pub mod status_cli;

pub use registry::{
    AppState, AppStatus, NodeStatus, RegisterError, RegisterRequest, Registry, StatusReport,
};
pub use registry_actor::RegistryActor;

/// Errors of the head layer (control plane, state file, status client).
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("cannot bind the control plane on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("state file {path}: {source}")]
    StateFile { path: String, source: std::io::Error },
    #[error("state file {path} is not valid: {source}")]
    StateFileFormat { path: String, source: serde_json::Error },
    #[error(
        "no running `twinkle serve` found ({path} does not exist); start one, set TWINKLE_HOME, \
         or pass --address"
    )]
    NotRunning { path: String },
    #[error(
        "another `twinkle serve` (pid {pid}) is using {path}; stop it, or set TWINKLE_HOME to \
         another directory"
    )]
    AlreadyRunning { pid: u32, path: String },
    #[error("cannot reach the head at {addr}: {detail}")]
    Unreachable { addr: String, detail: String },
    #[error("the head at {addr} answered {status}: {body}")]
    BadAnswer { addr: String, status: u16, body: String },
}
