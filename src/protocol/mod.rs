//! Wire protocols served by the `server` application.

pub mod tinker;
