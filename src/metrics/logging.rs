//! Log output of every twinkle process: human-readable text, or one JSON object per line
//! (`--log-format json`), with the request span's `request_id` in either.
//!
//! The format reaches the children through `TWINKLE_LOG_FORMAT` in the environment they
//! inherit, as the other `TWINKLE_*` settings do.

use std::io::IsTerminal as _;

/// The environment variable that carries the format to the children.
pub const LOG_FORMAT_ENV: &str = "TWINKLE_LOG_FORMAT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `2026-01-01T00:00:00Z  INFO request{request_id=…}: target: message key=value`.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`, `span`, `spans`).
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Logs to stderr at `level` (RUST_LOG syntax; a bare level also quiets actix's per-worker
/// start/stop lines) in `format`.
pub fn init(level: &str, format: LogFormat) {
    let spec =
        if level.contains('=') { level.to_string() } else { format!("{level},actix_server=warn") };
    let filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(true).try_init(),
    };
}
