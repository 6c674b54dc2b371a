//! Route table of the Tinker API, one file per resource group.

mod checkpoints;
mod futures;
mod rest;
mod sampling;
mod session;
mod training;

pub(crate) use checkpoints::ephemeral_dir;

use actix_web::web;

/// Registers every endpoint (paths relative to the route prefix).
pub fn configure(cfg: &mut web::ServiceConfig) {
    session::configure(cfg);
    training::configure(cfg);
    sampling::configure(cfg);
    futures::configure(cfg);
    rest::configure(cfg);
}
