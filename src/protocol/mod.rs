//! Wire protocols served by the `server` application.

pub mod http_error;
pub mod internal;
pub mod tinker;
pub mod twinkle;
