//! Applications run inside `twinkle worker` children.

pub mod server;
