//! Wire protocols served by the `server` application.

pub mod tinker;
pub mod twinkle;
