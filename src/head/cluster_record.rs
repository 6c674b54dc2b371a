//! `$TWINKLE_HOME/cluster.json` (the cluster this machine's commands talk to, like Ray's current
//! cluster file) and `$TWINKLE_HOME/agents/*.json` (the agents started here, for `twinkle stop`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::HeadError;

/// What `twinkle start --head` / `join` record about the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// The head's control address `HOST:PORT`.
    pub address: String,
    pub token: String,
}

/// One agent process started on this machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub pid: u32,
    /// `head` or `node`.
    pub role: String,
    pub node_id: String,
    pub address: String,
}

pub fn cluster_file(home: &Path) -> PathBuf {
    home.join("cluster.json")
}

fn agents_dir(home: &Path) -> PathBuf {
    home.join("agents")
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> HeadError + '_ {
    move |source| HeadError::StateFile { path: path.display().to_string(), source }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), HeadError> {
    if let Some(dir) = path.parent() {
        crate::private_fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let text = serde_json::to_string_pretty(value).map_err(|source| {
        HeadError::StateFileFormat { path: path.display().to_string(), source }
    })?;
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    // The cluster token is a credential: owner-only, like an ssh key.
    crate::private_fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Reads the cluster record; `None` when there is none or it is unreadable.
pub fn read_cluster(home: &Path) -> Option<ClusterRecord> {
    let text = std::fs::read_to_string(cluster_file(home)).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn write_cluster(home: &Path, rec: &ClusterRecord) -> Result<(), HeadError> {
    write_json(&cluster_file(home), rec)
}

pub fn remove_cluster(home: &Path) {
    let _ = std::fs::remove_file(cluster_file(home));
}

fn deployment_file(home: &Path) -> PathBuf {
    home.join("deployment.json")
}

/// The head's persisted deployment (kept across head restarts, removed by `twinkle stop`).
pub fn read_deployment(home: &Path) -> Option<super::cluster::DeploymentRecord> {
    let text = std::fs::read_to_string(deployment_file(home)).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn write_deployment(
    home: &Path,
    rec: &super::cluster::DeploymentRecord,
) -> Result<(), HeadError> {
    write_json(&deployment_file(home), rec)
}

pub fn remove_deployment(home: &Path) {
    let _ = std::fs::remove_file(deployment_file(home));
}

fn agent_file(home: &Path, pid: u32) -> PathBuf {
    agents_dir(home).join(format!("{pid}.json"))
}

pub fn write_agent(home: &Path, rec: &AgentRecord) -> Result<(), HeadError> {
    write_json(&agent_file(home, rec.pid), rec)
}

pub fn remove_agent(home: &Path, pid: u32) {
    let _ = std::fs::remove_file(agent_file(home, pid));
}

/// Every agent recorded on this machine (unreadable files are skipped).
pub fn read_agents(home: &Path) -> Vec<AgentRecord> {
    let Ok(dir) = std::fs::read_dir(agents_dir(home)) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| serde_json::from_str(&t).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_roundtrip() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(read_cluster(dir.path()).is_none());
        let rec = ClusterRecord { address: "127.0.0.1:6379".into(), token: "t".into() };
        assert!(write_cluster(dir.path(), &rec).is_ok());
        assert_eq!(read_cluster(dir.path()), Some(rec));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(cluster_file(dir.path())).map(|m| m.permissions().mode());
        assert_eq!(mode.ok().map(|m| m & 0o777), Some(0o600));
        let a =
            AgentRecord { pid: 42, role: "node".into(), node_id: "n".into(), address: "a".into() };
        assert!(write_agent(dir.path(), &a).is_ok());
        assert_eq!(read_agents(dir.path()), vec![a]);
        remove_agent(dir.path(), 42);
        assert!(read_agents(dir.path()).is_empty());
    }
}
