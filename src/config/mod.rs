//! Server configuration: YAML loading, validation with key paths and line numbers, normalisation.
//!
//! [`load_file`] / [`load_str`] run three steps before anything starts:
//! 1. typed parsing (unknown keys, wrong types, missing keys), first error only;
//! 2. semantic checks over the whole file (every problem found is reported);
//! 3. normalisation: defaults filled in, `use_megatron` folded into `backend`, `model_id`
//!    derived from the route when left out. The returned [`ServerConfig`] is that normal form,
//!    which is also what `twinkle print-config` prints.
//!
//! Every problem reads `key.path: what is wrong (line N)`.

mod de;
mod ignored;
pub mod keys;
mod locate;
pub mod naming;
mod normalize;
pub mod schema;
mod validate;

pub use locate::{KeyPath, Seg, line_of};
pub use normalize::{DEFAULT_ADAPTER_TIMEOUT, DEFAULT_MAX_LORAS, DemandInputs, derive_model_id};
pub use schema::*;
pub use validate::{MAX_BATCH_WINDOW_MS, MAX_RESTART_WAIT_S};

use std::fmt;
use std::path::Path;

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path such as `applications[1].args.device_group.ranks`; empty for the whole file.
    pub path: String,
    /// What is wrong and, where useful, what would be right.
    pub message: String,
    /// 1-based line in the file, where known.
    pub line: Option<usize>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        }
        Ok(())
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// The text is not YAML at all.
    #[error("invalid YAML: {message}")]
    Syntax { message: String, line: Option<usize> },
    /// Valid YAML that breaks the schema or its rules; one line per problem, in file order.
    #[error("{}", join_lines(.0))]
    Invalid(Vec<Problem>),
    #[error("cannot render the configuration as {format}: {message}")]
    Render { format: &'static str, message: String },
}

fn join_lines(problems: &[Problem]) -> String {
    problems.iter().map(Problem::to_string).collect::<Vec<_>>().join("\n")
}

impl ConfigError {
    /// The problems of an invalid configuration (empty for other errors).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(p) => p,
            _ => &[],
        }
    }
}

/// Reads, validates and normalises a configuration file.
pub fn load_file(path: &Path) -> Result<ServerConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Io { path: path.display().to_string(), source })?;
    load_str(&text)
}

/// [`load_file`], plus the keys it accepted but does not act on (`ignored.rs`), each with its
/// path, line and what applies instead: `check-config` and `serve` show them as warnings.
pub fn load_file_with_warnings(path: &Path) -> Result<(ServerConfig, Vec<Problem>), ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Io { path: path.display().to_string(), source })?;
    let warnings = ignored::ignored(&parse(&text)?)
        .into_iter()
        .map(|(path, message)| Problem {
            line: line_of(&text, &path),
            path: path.to_string(),
            message,
        })
        .collect();
    Ok((load_str(&text)?, warnings))
}

/// Parses, validates and normalises configuration text (YAML, or JSON, which YAML contains).
pub fn load_str(text: &str) -> Result<ServerConfig, ConfigError> {
    let raw = parse(text)?;
    let mut problems: Vec<Problem> = validate::check(&raw)
        .into_iter()
        .map(|(path, message)| Problem {
            line: line_of(text, &path),
            path: path.to_string(),
            message,
        })
        .collect();
    if !problems.is_empty() {
        problems.sort_by_key(|p| p.line.unwrap_or(0));
        return Err(ConfigError::Invalid(problems));
    }
    Ok(normalize::normalize(raw))
}

/// Step 1: YAML syntax, then the typed schema with the path and line of the first failure.
fn parse(text: &str) -> Result<ServerConfig, ConfigError> {
    let value: serde_norway::Value = serde_norway::from_str(text).map_err(syntax_error)?;
    if value.is_null() {
        return Err(ConfigError::Invalid(vec![Problem {
            path: String::new(),
            message: "the configuration is empty (expected a mapping with `applications`)"
                .to_string(),
            line: None,
        }]));
    }
    let de = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = locate::from_serde_path(e.path());
        let inner = e.inner();
        let message = bare_message(inner);
        // A missing key has no node of its own: report the mapping that lacks it.
        let line = if message.starts_with("missing field") {
            line_of(text, &path)
        } else {
            inner.location().map(|l| l.line()).or_else(|| line_of(text, &path))
        };
        ConfigError::Invalid(vec![Problem {
            path: path.to_string(),
            message: de::humanize(&message),
            line,
        }])
    })
}

/// A failure of the untyped pass: broken YAML, or a key given twice in one mapping (which
/// serde_norway reports as "PATH: duplicate entry with key \"K\"").
fn syntax_error(e: serde_norway::Error) -> ConfigError {
    let line = e.location().map(|l| l.line());
    let full = e.to_string();
    const DUP: &str = "duplicate entry with key ";
    if let Some(at) = full.find(DUP) {
        let path = full[..at].trim_end_matches(": ").to_string();
        let rest = &full[at + DUP.len()..];
        let key = rest.split(" at line ").next().unwrap_or(rest);
        return ConfigError::Invalid(vec![Problem {
            path,
            message: format!("key {key} is given more than once"),
            line,
        }]);
    }
    ConfigError::Syntax { message: full, line }
}

/// serde_norway's Display adds "path: " in front and " at line L column C" behind the message.
fn bare_message(e: &serde_norway::Error) -> String {
    let full = e.to_string();
    let mut msg = full.as_str();
    if let Some(loc) = e.location() {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        msg = msg.strip_suffix(suffix.as_str()).unwrap_or(msg);
    }
    // The path prefix never contains ": " followed by one of serde's message openings, so
    // cutting at the first known opening is safe.
    for opening in [
        "invalid type: ",
        "invalid value: ",
        "unknown field `",
        "unknown variant `",
        "missing field `",
        "duplicate field `",
        "invalid length ",
    ] {
        if let Some(at) = msg.find(opening) {
            return msg[at..].to_string();
        }
    }
    match msg.split_once(": ") {
        // A custom message of ours behind serde_norway's path prefix (which has no spaces).
        Some((prefix, rest)) if !prefix.contains(' ') => rest.to_string(),
        _ => msg.to_string(),
    }
}

impl ServerConfig {
    /// This configuration with `server_type` replaced (the CLI's `--server-type`).
    pub fn with_server_type(mut self, server_type: ServerType) -> Self {
        self.server_type = server_type;
        self
    }

    /// The application called `name`.
    pub fn application(&self, name: &str) -> Option<&Application> {
        self.applications.iter().find(|a| a.name == name)
    }

    /// The configuration as YAML (loads again to the same value).
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        serde_norway::to_string(self)
            .map_err(|e| ConfigError::Render { format: "yaml", message: e.to_string() })
    }

    /// The configuration as pretty JSON (loads again to the same value).
    pub fn to_json(&self) -> Result<String, ConfigError> {
        serde_json::to_string_pretty(self)
            .map_err(|e| ConfigError::Render { format: "json", message: e.to_string() })
    }
}

impl std::str::FromStr for ServerType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "twinkle" => Ok(ServerType::Twinkle),
            "tinker" => Ok(ServerType::Tinker),
            other => Err(format!("unknown server type \"{other}\" (expected twinkle or tinker)")),
        }
    }
}
