//! The contract between a node agent (`twinkle serve` / `start` / `join`) and the application
//! children it starts (`twinkle worker`): the environment it sets for them, the registration they
//! send back, their exit codes and the timing of the loopback connections between processes.
//! Both sides import it from here, so neither the node nor the worker layer depends on the other.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The application's config entry as JSON.
pub const APP_SPEC_ENV: &str = "TWINKLE_APP_SPEC";
/// The address a child listens on (default loopback; set by cluster node agents).
pub const BIND_HOST_ENV: &str = "TWINKLE_BIND_HOST";
/// The per-start registration token (not argv: `ps` shows it).
pub const WORKER_TOKEN_ENV: &str = "TWINKLE_WORKER_TOKEN";
/// The per-serve secret that `/_internal/` routes between applications require.
pub const INTERNAL_TOKEN_ENV: &str = "TWINKLE_INTERNAL_TOKEN";
/// The file where a worker writes its startup error before exiting with
/// [`STARTUP_ERROR_EXIT`] (the supervisor shows it in `twinkle status`).
pub const STARTUP_ERROR_FILE_ENV: &str = "TWINKLE_STARTUP_ERROR_FILE";
/// Test hook: milliseconds a worker waits after binding before it registers, so tests can
/// observe the gateway's 503 for an application that is up but not yet registered.
pub const START_DELAY_ENV: &str = "TWINKLE_TEST_WORKER_START_DELAY_MS";

/// Exit code of a worker whose application cannot start with this config (BSD `EX_CONFIG`):
/// the supervisor does not restart it.
pub const STARTUP_ERROR_EXIT: u8 = 78;

/// How long an application worker keeps an idle connection open.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// How long the gateway and the server application keep an idle pooled connection to a worker:
/// well under [`KEEP_ALIVE`], so they never reuse one the worker is closing at that moment (the
/// request would be written, then meet end-of-stream, and read like an application that died
/// while running it: an "interrupted" failure, or a 503, for a request that never ran).
pub const POOL_IDLE: Duration = Duration::from_secs(4);

/// `POST /v1/register` from a child to its head once it listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub app: String,
    pub pid: u32,
    pub port: u16,
    pub token: String,
}

/// `POST /v1/progress` from a child that is still downloading its model, before it listens:
/// the head shows it as `downloading` and waits for it as long as reports keep coming.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressRequest {
    pub app: String,
    pub pid: u32,
    pub token: String,
    pub bytes_done: u64,
    /// 0 while the file list is not known yet.
    pub bytes_total: u64,
}

/// How often a downloading child reports its progress.
pub const PROGRESS_PERIOD: Duration = Duration::from_secs(1);
