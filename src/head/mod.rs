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
