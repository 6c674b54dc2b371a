//! Twinkle in Rust: a training-as-a-service server for LLMs (library half of the `twinkle` binary).

pub mod apps;
pub mod bench;
pub mod cluster;
pub mod config;
pub mod contract;
pub mod engine;
pub mod gateway;
pub mod head;
pub mod hub;
pub mod ids;
pub mod metrics;
pub mod node;
pub mod private_fs;
pub mod progress;
pub mod protocol;
pub mod state;
pub mod timings;
pub mod tokenize;
pub mod worker;
