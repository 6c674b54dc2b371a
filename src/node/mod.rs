//! Node agent: spawns, supervises, restarts and stops this node's application children.
//!
//! Each child is this same binary re-executed as `twinkle worker ...` in its own process group
//! (so a terminal's Ctrl-C reaches only `serve`, and stopping a child reaches everything it
//! started), with a parent-death signal so no child outlives a killed head.
//!
//! In a cluster, [`agent`] is the node agent of `twinkle start --head` / `twinkle join`: it
//! heartbeats the head and converges its children and gateway on the head's desired state;
//! [`cluster_cli`] holds the start/join/stop/deploy commands.

pub mod agent;
pub mod cluster_cli;
pub mod gpu_monitor;
pub mod reconcile;
pub mod serve;
pub mod supervise;

pub use supervise::{ChildSpec, RestartPolicy, SupervisorActor, supervise};

/// The CPUs and GPUs this machine offers as a node: the `--num-gpus` / `--num-cpus` flags that
/// `serve`, `start` and `join` share (flattened into each command).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct NodeResources {
    /// GPUs this node offers (default: what NVML reports, limited by CUDA_VISIBLE_DEVICES; a
    /// number takes the first N of CUDA_VISIBLE_DEVICES when set).
    #[arg(long)]
    pub num_gpus: Option<u32>,
    /// CPUs this node offers (default: the CPUs the OS reports).
    #[arg(long)]
    pub num_cpus: Option<f64>,
}

impl NodeResources {
    /// This machine as a node offering these resources (see [`crate::cluster::detect_local_node`]).
    pub fn detect(&self) -> crate::cluster::NodeSpec {
        crate::cluster::detect_local_node(self.num_gpus, self.num_cpus)
    }
}

/// Errors of the node layer.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot find the twinkle binary to re-execute: {0}")]
    CurrentExe(std::io::Error),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot place the applications on this machine:\n{0}")]
    Infeasible(String),
    #[error("invalid deployment: {0}")]
    Invalid(String),
    #[error("{0}")]
    Head(#[from] crate::head::HeadError),
    #[error("{0}")]
    Gateway(#[from] crate::gateway::GatewayError),
    #[error("cannot start the runtime or install signal handlers: {0}")]
    Runtime(std::io::Error),
    #[error("the head refused this node: {0}")]
    Refused(String),
    #[error("cannot reach the head at {0}")]
    Unreachable(String),
    #[error("{0}")]
    Daemon(String),
    /// `serve --wait`: an application failed before every application was running.
    #[error("not ready: {0}")]
    NotReady(String),
    /// `$TWINKLE_HOME` holds this machine's node identity (`node_id`, the agent records): a
    /// second agent from it would register as the same node and replace the running one.
    #[error(
        "{home} already belongs to a running twinkle {role} (pid {pid}{node}); a second agent \
         from the same TWINKLE_HOME would replace it. Set TWINKLE_HOME to another directory to \
         run another agent on this machine, or run `twinkle stop` first"
    )]
    HomeInUse { home: String, role: String, pid: u32, node: String },
}

impl NodeError {
    /// Exit status of `twinkle serve`: 2 for a deployment that can never run as written
    /// (bad config, does not fit), 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            NodeError::Config(_) | NodeError::Infeasible(_) | NodeError::Invalid(_) => 2,
            _ => 1,
        }
    }
}
