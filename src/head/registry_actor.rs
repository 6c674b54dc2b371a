//! The registry actor: the only owner of a [`Registry`] (children, their tokens, pids, states
//! and addresses, the node list, GPU samples, the control and gateway addresses).
//!
//! Supervisors report lifecycle events to it ([`ChildStarted`], [`ChildExited`], ...), the
//! control plane forwards registrations ([`Register`]) and status reads ([`Snapshot`]), and the
//! gateway reads the [`UpstreamView`] it publishes after every change (actors may also ask
//! [`Lookup`] / [`ReadyQuery`]). Every message is handled to completion before the next, which
//! is what the old lock guaranteed, without a lock.

use actix::{Actor, Addr, Context, Handler, Message, MessageResult};

use super::gpu_table::GpuSample;
use super::registry::{
    AppState, AppStatus, NodeStatus, RegisterError, Registration, Registry, StatusReport,
};
use crate::contract::{ProgressRequest, RegisterRequest};
use crate::gateway::{Lookup, ReadyQuery, UpstreamPublisher, UpstreamView, Upstreams};

/// Messages the mailbox holds before senders wait for room.
const MAILBOX: usize = 1 << 16;

/// Owns one [`Registry`]; see the module docs.
pub struct RegistryActor {
    reg: Registry,
    /// Where the gateway's view of the applications goes after every change.
    view: UpstreamPublisher,
}

impl RegistryActor {
    /// Starts the actor on the current arbiter (an actix `System` must be running).
    pub fn spawn(reg: Registry) -> Addr<Self> {
        Self::spawn_with_view(reg).0
    }

    /// Starts the actor and returns, with its address, the gateway's reader of its views.
    pub fn spawn_with_view(reg: Registry) -> (Addr<Self>, Upstreams) {
        let view = crate::gateway::upstream_channel();
        let reader = view.subscribe();
        let actor = Self { reg, view };
        actor.publish();
        (actor.start(), reader)
    }

    /// Publishes the gateway's view of the current registry.
    fn publish(&self) {
        let ready = self.reg.readiness();
        let upstreams =
            ready.apps.iter().map(|(name, _)| (name.clone(), self.reg.lookup(name))).collect();
        let local = self.reg.local_apps();
        self.view.publish(UpstreamView { upstreams, ready, local });
    }
}

impl Actor for RegistryActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // A burst (registrations, status polls, supervisors' events, `Lookup` / `ReadyQuery`
        // from actors) should queue in the mailbox rather than park each sender (the default
        // capacity is 16). Well below actix's own limit, which also counts senders.
        ctx.set_mailbox_capacity(MAILBOX);
    }
}

/// A child's registration (`POST /v1/register`); answers its address.
#[derive(Debug, Message)]
#[rtype(result = "Result<String, RegisterError>")]
pub struct Register(pub RegisterRequest);

/// The whole `GET /v1/status` answer.
#[derive(Debug, Message)]
#[rtype(result = "StatusReport")]
pub struct Snapshot;

/// Whether the current child of the application has registered.
#[derive(Debug, Message)]
#[rtype(result = "Registration")]
pub struct IsRegistered(pub String);

/// A new child exists; it is `starting` until it registers with `token`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ChildStarted {
    pub app: String,
    pub pid: Option<u32>,
    pub token: String,
}

/// The child ended and will be restarted; answers the restart count.
#[derive(Debug, Message)]
#[rtype(result = "u32")]
pub struct ChildExited {
    pub app: String,
    pub how: String,
}

/// The binary could not be spawned; answers the restart count.
#[derive(Debug, Message)]
#[rtype(result = "u32")]
pub struct SpawnFailed {
    pub app: String,
    pub why: String,
}

/// The child reported a permanent startup error: `failed`, not restarted.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StartupFailed {
    pub app: String,
    pub why: String,
}

/// The application's lifecycle state changed (`stopping`, `stopped`).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetState {
    pub app: String,
    pub state: AppState,
}

/// The bound control-plane and gateway addresses, for status.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetAddresses {
    pub control: String,
    pub gateway: String,
}

/// The latest NVML samples of a node (sent by the GPU monitor thread).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetGpuSamples {
    pub node: String,
    pub samples: Vec<GpuSample>,
}

/// The latest NVML samples of a node.
#[derive(Debug, Message)]
#[rtype(result = "Vec<GpuSample>")]
pub struct GpuSamples(pub String);

/// A cluster node agent was assigned an application.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct AddApp(pub AppStatus);

/// An application's child was stopped for good.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct RemoveApp(pub String);

/// A cluster gateway's route: `app` is reachable at `address` (`None`: down).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetUpstream {
    pub app: String,
    pub address: Option<String>,
}

/// The node list changed.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetNodes(pub Vec<NodeStatus>);

/// One `Handler` per message, each a call on the registry: `change` re-publishes the gateway's
/// view after the call (so no change can forget it), `set` changes what the view does not show,
/// `read` answers without changing anything.
macro_rules! on {
    (change $msg:ty, $m:pat_param => $res:ty: |$reg:ident| $body:expr) => {
        impl Handler<$msg> for RegistryActor {
            type Result = $res;
            fn handle(&mut self, $m: $msg, _: &mut Context<Self>) -> Self::Result {
                let $reg = &mut self.reg;
                let out = $body;
                self.publish();
                out
            }
        }
    };
    (set $msg:ty, $m:pat_param => |$reg:ident| $body:expr) => {
        impl Handler<$msg> for RegistryActor {
            type Result = ();
            fn handle(&mut self, $m: $msg, _: &mut Context<Self>) -> Self::Result {
                let $reg = &mut self.reg;
                $body
            }
        }
    };
    (read $msg:ty, $m:pat_param => |$reg:ident| $body:expr) => {
        impl Handler<$msg> for RegistryActor {
            type Result = MessageResult<$msg>;
            fn handle(&mut self, $m: $msg, _: &mut Context<Self>) -> Self::Result {
                let $reg = &self.reg;
                MessageResult($body)
            }
        }
    };
}

on!(change Register, m => Result<String, RegisterError>: |reg| reg.register(&m.0));
on!(read Snapshot, _ => |reg| reg.snapshot());

/// [`Snapshot`] of this node's own applications only (its gateway's metrics).
#[derive(Debug, Message)]
#[rtype(result = "StatusReport")]
pub struct LocalSnapshot;

on!(read LocalSnapshot, _ => |reg| reg.local_snapshot());
on!(read IsRegistered, m => |reg| reg.registration(&m.0));

/// A downloading child's progress report (`POST /v1/progress`).
#[derive(Debug, Message)]
#[rtype(result = "Result<(), RegisterError>")]
pub struct Progress(pub ProgressRequest);

impl Handler<Progress> for RegistryActor {
    type Result = Result<(), RegisterError>;
    fn handle(&mut self, m: Progress, _: &mut Context<Self>) -> Self::Result {
        let r = self.reg.progress(&m.0);
        if r.is_ok() {
            self.publish();
        }
        r
    }
}

on!(change ChildStarted, m => (): |reg| reg.child_started(&m.app, m.pid, m.token));
on!(change ChildExited, m => u32: |reg| reg.child_exited(&m.app, m.how));
on!(change SpawnFailed, m => u32: |reg| reg.spawn_failed(&m.app, m.why));
on!(change StartupFailed, m => (): |reg| reg.startup_failed(&m.app, m.why));
on!(change SetState, m => (): |reg| reg.set_state(&m.app, m.state));
on!(set SetAddresses, m => |reg| reg.set_addresses(m.control, m.gateway));
on!(set SetGpuSamples, m => |reg| reg.set_gpu_samples(&m.node, m.samples));
on!(read GpuSamples, m => |reg| reg.gpu_samples(&m.0));
on!(change AddApp, m => (): |reg| reg.add_app(m.0));
on!(change RemoveApp, m => (): |reg| reg.remove_app(&m.0));
on!(change SetUpstream, m => (): |reg| reg.set_upstream(&m.app, m.address));
on!(set SetNodes, m => |reg| reg.set_nodes(m.0));
on!(read Lookup, m => |reg| reg.lookup(&m.0));
on!(read ReadyQuery, _ => |reg| reg.readiness());

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::Upstream;

    fn app(name: &str) -> AppStatus {
        AppStatus::new(name, "model", "/m", "node-0", vec![], 0.1)
    }

    #[test]
    fn register_then_status_lookup_and_readiness_show_it() {
        actix::System::new().block_on(async {
            let reg = Registry::new("twinkle".into(), None, vec![], vec![app("m")]);
            let (addr, up) = RegistryActor::spawn_with_view(reg);
            assert_eq!(up.lookup("m"), Upstream::Down("starting"));
            addr.send(ChildStarted { app: "m".into(), pid: Some(7), token: "t".into() })
                .await
                .expect("registry alive");
            let bad = RegisterRequest { app: "m".into(), pid: 7, port: 9, token: "no".into() };
            let refused = addr.send(Register(bad)).await.expect("registry alive");
            assert_eq!(refused, Err(RegisterError::BadToken("m".into())));
            assert!(!addr.send(IsRegistered("m".into())).await.expect("registry alive").registered);
            let ok = RegisterRequest { app: "m".into(), pid: 7, port: 9, token: "t".into() };
            let got = addr.send(Register(ok)).await.expect("registry alive");
            assert_eq!(got.as_deref(), Ok("127.0.0.1:9"));
            assert!(addr.send(IsRegistered("m".into())).await.expect("registry alive").registered);
            let snap = addr.send(Snapshot).await.expect("registry alive");
            assert_eq!(snap.applications[0].state, AppState::Running);
            assert_eq!(snap.applications[0].address.as_deref(), Some("127.0.0.1:9"));
            assert_eq!(up.lookup("m"), Upstream::At("127.0.0.1:9".into()));
            // A route to another node's child is forwarded to but not scraped here.
            addr.send(SetUpstream { app: "remote".into(), address: Some("10.0.0.2:7".into()) })
                .await
                .expect("registry alive");
            assert_eq!(up.lookup("remote"), Upstream::At("10.0.0.2:7".into()));
            assert_eq!(up.running(), vec![("m".to_string(), "127.0.0.1:9".to_string())]);
            let local = addr.send(LocalSnapshot).await.expect("registry alive");
            let names: Vec<&str> = local.applications.iter().map(|a| a.name.as_str()).collect();
            assert_eq!(names, ["m"]);
            assert!(up.readiness().is_ready());
            let n = addr
                .send(ChildExited { app: "m".into(), how: "signal 9".into() })
                .await
                .expect("registry alive");
            assert_eq!(n, 1);
            assert_eq!(up.lookup("m"), Upstream::Down("restarting"));
            let ready = up.readiness();
            assert_eq!(ready.waiting, vec![("m".to_string(), "restarting")]);
        });
    }
}
