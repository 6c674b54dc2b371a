//! What the gateway asks about applications, as typed actix messages.
//!
//! The gateway owns no application state: it sends [`Lookup`] ("where is `app` now?") and
//! [`ReadyQuery`] ("is every application running?") to whichever actor answers them (the head's
//! registry actor). Defining the messages here, not in the head, keeps the dependency one way:
//! the head implements the gateway's questions, the gateway never names the head.

use actix::{Message, Recipient};

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

/// The gateway's two mailboxes: where lookups and readiness questions go.
#[derive(Clone)]
pub struct Upstreams {
    pub lookup: Recipient<Lookup>,
    pub ready: Recipient<ReadyQuery>,
}

impl Upstreams {
    /// Where `app` is; an answerer that is gone (shutdown) reads as "stopped", never a panic.
    pub async fn lookup(&self, app: &str) -> Upstream {
        self.lookup.send(Lookup(app.to_string())).await.unwrap_or(Upstream::Down("stopped"))
    }

    /// The readiness report; an answerer that is gone reads as nothing ready.
    pub async fn readiness(&self) -> ReadyReport {
        self.ready.send(ReadyQuery).await.unwrap_or_else(|_| ReadyReport {
            waiting: vec![("gateway".to_string(), "stopping")],
            ..ReadyReport::default()
        })
    }
}
