//! What the gateway needs to know about applications, defined by the gateway itself.
//!
//! The gateway owns no application state. Whoever does (the head's registry actor) publishes an
//! [`UpstreamView`] (every application's [`Upstream`] and the [`ReadyReport`]) after each change
//! through an [`UpstreamPublisher`]; the gateway reads the latest view from its [`Upstreams`]
//! without waiting. Reading without an await matters: a request whose body turns out malformed
//! must be answered (400) in the same poll that finds the body broken, or actix drops the
//! connection unanswered. The same questions exist as actix messages ([`Lookup`],
//! [`ReadyQuery`]) for actors that ask them. Defining all of it here, not in the head, keeps
//! the dependency one way: the head implements the gateway's questions, the gateway never
//! names the head.

use std::collections::BTreeMap;

use actix::Message;
use tokio::sync::watch;

/// Where a request for `app` should go (answered with [`Upstream`]).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Upstream")]
pub struct Lookup(pub String);

/// Where an application can be reached now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// Running at this `host:port`.
    At(String),
    /// Failed for good, with the reason: waiting will not help.
    Failed(String),
    /// Not serving yet or any more; the state's name (`starting`, `restarting`, ...).
    Down(&'static str),
}

/// Whether the deployment is ready (answered with [`ReadyReport`]).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "ReadyReport")]
pub struct ReadyQuery;

/// Every application's state, and which keep the deployment from being ready.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadyReport {
    /// Every application with its state's name, in deployment order.
    pub apps: Vec<(String, &'static str)>,
    /// Applications not running (yet or any more), with their state's name.
    pub waiting: Vec<(String, &'static str)>,
    /// Failed applications, with why.
    pub failed: Vec<(String, String)>,
}

impl ReadyReport {
    pub fn is_ready(&self) -> bool {
        self.waiting.is_empty() && self.failed.is_empty()
    }
}

/// A snapshot of every application's upstream and the readiness, as the owner last published.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamView {
    pub upstreams: BTreeMap<String, Upstream>,
    pub ready: ReadyReport,
    /// Applications whose child runs on this node (a cluster node's gateway also routes to
    /// other nodes' children, which their own gateways report).
    pub local: std::collections::BTreeSet<String>,
}

/// The owner's side: publishes a new [`UpstreamView`].
pub struct UpstreamPublisher(watch::Sender<UpstreamView>);

impl UpstreamPublisher {
    /// Replaces the view (readers see it on their next request); unchanged views wake no one.
    pub fn publish(&self, view: UpstreamView) {
        self.0.send_if_modified(|old| {
            let changed = *old != view;
            *old = view;
            changed
        });
    }

    /// Another reader of this publisher's views (one per gateway).
    pub fn subscribe(&self) -> Upstreams {
        Upstreams(self.0.subscribe())
    }
}

/// A publisher and nothing published yet: every application reads as `stopped`.
pub fn upstream_channel() -> UpstreamPublisher {
    UpstreamPublisher(watch::channel(UpstreamView::default()).0)
}

/// The gateway's side: the latest published view, read without waiting.
#[derive(Clone)]
pub struct Upstreams(watch::Receiver<UpstreamView>);

impl Upstreams {
    /// Where `app` is; an application the view does not know reads as `stopped`.
    pub fn lookup(&self, app: &str) -> Upstream {
        self.0.borrow().upstreams.get(app).cloned().unwrap_or(Upstream::Down("stopped"))
    }

    /// The latest readiness report.
    pub fn readiness(&self) -> ReadyReport {
        self.0.borrow().ready.clone()
    }

    /// Every running application of this node with its address (what the gateway's `/metrics`
    /// scrapes: each node's scrape covers its own children, so a cluster is counted once).
    pub fn running(&self) -> Vec<(String, String)> {
        let view = self.0.borrow();
        view.upstreams
            .iter()
            .filter(|(app, _)| view.local.contains(*app))
            .filter_map(|(app, u)| match u {
                Upstream::At(addr) => Some((app.clone(), addr.clone())),
                _ => None,
            })
            .collect()
    }
}
