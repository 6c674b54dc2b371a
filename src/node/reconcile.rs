//! The reconciler actor: owns which application children this node runs (one
//! [`SupervisorActor`] each) and converges them on a desired set.
//!
//! `twinkle serve` sends one [`Converge`] with every placement and a [`StopAll`] at shutdown; a
//! cluster node agent sends a [`Converge`] after every heartbeat with what the head assigned it
//! and asks [`Report`] for what its heartbeat carries. A child whose cards or deployment changed
//! is stopped before its replacement starts, so two children never hold the same card.

use std::collections::BTreeMap;

use actix::{
    Actor, ActorFutureExt as _, Addr, AtomicResponse, Context, Handler, Message, ResponseFuture,
    WrapFuture as _,
};
use futures_util::future::join_all;

use super::supervise::{ChildSpec, RestartPolicy, Stop, SupervisorActor};
use crate::head::cluster::ReportedChild;
use crate::head::registry::AppStatus;
use crate::head::registry_actor::{AddApp, RegistryActor, RemoveApp, Snapshot};

/// One child the node should run.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub spec: ChildSpec,
    /// The registry entry it starts with (`starting`).
    pub status: AppStatus,
    /// The deployment it belongs to (0 for `twinkle serve`); a new one restarts the child.
    pub deployment: u64,
}

struct Running {
    supervisor: Addr<SupervisorActor>,
    gpu_ids: Vec<u32>,
    deployment: u64,
}

/// Owns this node's children; see the module docs.
pub struct Reconciler {
    registry: Addr<RegistryActor>,
    policy: RestartPolicy,
    children: BTreeMap<String, Running>,
}

impl Reconciler {
    /// Starts the reconciler on the current arbiter, which must be the main thread's: the
    /// supervisors it starts run there, and the children's parent-death signal is tied to it.
    pub fn spawn(registry: Addr<RegistryActor>, policy: RestartPolicy) -> Addr<Self> {
        Self { registry, policy, children: BTreeMap::new() }.start()
    }

    /// Takes the children to stop out of the map: not wanted any more, or wanted with other
    /// cards or for another deployment.
    fn take_stale(&mut self, wanted: &[Wanted]) -> Vec<(String, Addr<SupervisorActor>)> {
        let stale: Vec<String> = self
            .children
            .iter()
            .filter(|(name, c)| match wanted.iter().find(|w| &w.spec.app == *name) {
                Some(w) => w.status.gpu_ids != c.gpu_ids || w.deployment != c.deployment,
                None => true,
            })
            .map(|(name, _)| name.clone())
            .collect();
        stale
            .into_iter()
            .filter_map(|name| self.children.remove(&name).map(|c| (name, c.supervisor)))
            .collect()
    }

    fn start_missing(&mut self, wanted: Vec<Wanted>) {
        for w in wanted {
            if self.children.contains_key(&w.spec.app) {
                continue;
            }
            let name = w.spec.app.clone();
            let gpu_ids = w.status.gpu_ids.clone();
            // Queued before the supervisor's first report, so the entry exists when it arrives.
            self.registry.do_send(AddApp(w.status));
            let supervisor = SupervisorActor::spawn(w.spec, self.registry.clone(), self.policy);
            tracing::info!(app = %name, gpus = ?gpu_ids, deployment = w.deployment, "child assigned here");
            self.children.insert(name, Running { supervisor, gpu_ids, deployment: w.deployment });
        }
    }
}

impl Actor for Reconciler {
    type Context = Context<Self>;
}

/// Run exactly `wanted` (by application name): stop the stale children, wait until they are
/// reaped, start the missing ones. Answered once done.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Converge(pub Vec<Wanted>);

/// Stop every child; answered once all are reaped.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StopAll;

/// Every child as a cluster heartbeat reports it.
#[derive(Debug, Message)]
#[rtype(result = "Vec<ReportedChild>")]
pub struct Report;

/// Stops `stale` in parallel (their grace periods overlap) and drops their registry entries.
async fn stop_all(stale: Vec<(String, Addr<SupervisorActor>)>, registry: Addr<RegistryActor>) {
    // A supervisor that is already gone has reaped its child: nothing to wait for.
    join_all(stale.iter().map(|(_, s)| s.send(Stop))).await;
    for (name, _) in stale {
        registry.do_send(RemoveApp(name.clone()));
        tracing::info!(app = %name, "child stopped (no longer assigned here)");
    }
}

impl Handler<Converge> for Reconciler {
    // Atomic: no other message (a second Converge, a Report) sees the half-converged map.
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, m: Converge, _: &mut Context<Self>) -> Self::Result {
        let stale = self.take_stale(&m.0);
        let stopping = stop_all(stale, self.registry.clone());
        AtomicResponse::new(Box::pin(
            stopping.into_actor(self).map(move |(), act, _| act.start_missing(m.0)),
        ))
    }
}

impl Handler<StopAll> for Reconciler {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _: StopAll, _: &mut Context<Self>) -> Self::Result {
        let all: Vec<_> = std::mem::take(&mut self.children)
            .into_iter()
            .map(|(n, c)| (n, c.supervisor))
            .collect();
        // At shutdown the registry keeps the entries: status shows them `stopped`.
        let stopping = async move {
            join_all(all.iter().map(|(_, s)| s.send(Stop))).await;
        };
        AtomicResponse::new(Box::pin(stopping.into_actor(self)))
    }
}

impl Handler<Report> for Reconciler {
    type Result = ResponseFuture<Vec<ReportedChild>>;

    fn handle(&mut self, _: Report, _: &mut Context<Self>) -> Self::Result {
        let ours: BTreeMap<String, (Vec<u32>, u64)> = self
            .children
            .iter()
            .map(|(n, c)| (n.clone(), (c.gpu_ids.clone(), c.deployment)))
            .collect();
        let registry = self.registry.clone();
        Box::pin(async move {
            let Ok(snap) = registry.send(Snapshot).await else { return Vec::new() };
            snap.applications
                .into_iter()
                .filter_map(|a| {
                    let (gpu_ids, deployment) = ours.get(&a.name)?.clone();
                    Some(ReportedChild {
                        app: a.name,
                        gpu_ids,
                        pid: a.pid,
                        state: a.state,
                        address: a.address,
                        restarts: a.restarts,
                        last_exit: a.last_exit,
                        deployment,
                        download: a.download,
                    })
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::head::registry::{AppState, Registry};

    fn wanted(app: &str, deployment: u64) -> Wanted {
        Wanted {
            spec: ChildSpec {
                app: app.into(),
                exe: "/bin/sh".into(),
                args: vec!["-c".into(), "sleep 30".into()],
                env: vec![],
            },
            status: AppStatus::new(app, "model", &format!("/{app}"), "node-0", vec![], 0.1),
            deployment,
        }
    }

    /// The reported children once every one has a pid (at most 10 s).
    async fn started(rec: &Addr<Reconciler>, n: usize) -> Vec<ReportedChild> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = rec.send(Report).await.expect("reconciler alive");
            if (r.len() == n && r.iter().all(|c| c.pid.is_some())) || Instant::now() > deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn converge_starts_missing_restarts_changed_and_stops_unwanted() {
        actix::System::new().block_on(async {
            let reg = Registry::new("twinkle".into(), None, vec![], vec![]);
            let registry = RegistryActor::spawn(reg);
            let policy = RestartPolicy { stop_grace: Duration::from_secs(2), ..Default::default() };
            let rec = Reconciler::spawn(registry.clone(), policy);
            rec.send(Converge(vec![wanted("a", 1), wanted("b", 1)])).await.expect("alive");
            let first = started(&rec, 2).await;
            let pid = |r: &[ReportedChild], app: &str| r.iter().find(|c| c.app == app)?.pid;
            assert!(pid(&first, "a").is_some() && pid(&first, "b").is_some(), "{first:?}");
            // `a` moves to deployment 2 (restarted), `b` is no longer wanted (stopped).
            rec.send(Converge(vec![wanted("a", 2)])).await.expect("alive");
            let second = started(&rec, 1).await;
            assert_eq!(second.len(), 1, "{second:?}");
            assert_eq!(second[0].deployment, 2);
            assert_ne!(pid(&second, "a"), pid(&first, "a"));
            let snap = registry.send(Snapshot).await.expect("alive");
            let names: Vec<&str> = snap.applications.iter().map(|a| a.name.as_str()).collect();
            assert_eq!(names, ["a"]);
            rec.send(StopAll).await.expect("alive");
            let snap = registry.send(Snapshot).await.expect("alive");
            assert_eq!(snap.applications[0].state, AppState::Stopped);
            assert!(rec.send(Report).await.expect("alive").is_empty());
        });
    }
}
