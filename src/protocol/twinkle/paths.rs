//! `twinkle://{run_id}/{weights|sampler_weights}/{name}` paths. They are resolved only inside the
//! caller's own owner directory (that is the whole isolation mechanism), with the same validation
//! and on-disk layout as `tinker://` paths; hub ids and raw server paths are refused.

use std::fmt;
use std::path::PathBuf;

use super::caller::{Auth, Caller};
use super::error::TwinkleError;
use crate::protocol::tinker::paths::{CheckpointKind, TinkerPath, checkpoint_dir, run_dir};

/// Scheme prefix of every Twinkle checkpoint path.
pub const SCHEME: &str = "twinkle://";

/// A parsed `twinkle://` checkpoint path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwinklePath(pub TinkerPath);

impl TwinklePath {
    pub fn new(run_id: &str, kind: CheckpointKind, name: &str) -> Result<Self, TwinkleError> {
        if kind == CheckpointKind::ExternalWeights {
            return Err(TwinkleError::bad("twinkle paths name weights or sampler_weights"));
        }
        Ok(TwinklePath(TinkerPath::new(run_id, kind, name)?))
    }

    /// Parses `twinkle://RUN/KIND/NAME` (also `tinker://…`, same layout). `what` names the
    /// request field in errors.
    pub fn parse(what: &str, s: &str) -> Result<Self, TwinkleError> {
        let shown: String = s.chars().take(200).collect();
        let rest = s.strip_prefix(SCHEME).or_else(|| s.strip_prefix("tinker://"));
        let Some(rest) = rest else {
            return Err(TwinkleError::bad(format!(
                "{what} `{shown}`: only twinkle://RUN/weights/NAME or twinkle://RUN/sampler_weights/NAME \
                 paths of your own runs are accepted (hub ids and server paths are not)"
            )));
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let [run, kind, name] = parts[..] else {
            return Err(TwinkleError::bad(format!(
                "{what} `{shown}`: expected exactly three parts, twinkle://RUN/KIND/NAME"
            )));
        };
        let kind = match kind {
            "weights" => CheckpointKind::Weights,
            "sampler_weights" => CheckpointKind::SamplerWeights,
            _ => {
                return Err(TwinkleError::bad(format!(
                    "{what} `{shown}`: the middle part must be weights or sampler_weights"
                )));
            }
        };
        Self::new(run, kind, name).map_err(|e| TwinkleError::bad(format!("{what}: {e}")))
    }

    pub fn run_id(&self) -> &str {
        &self.0.run_id
    }

    pub fn kind(&self) -> CheckpointKind {
        self.0.kind
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// `weights/NAME`: the checkpoint id of the listing routes.
    pub fn checkpoint_id(&self) -> String {
        self.0.checkpoint_id()
    }

    /// The checkpoint directory inside the caller's owner directory.
    pub fn dir(&self, auth: &Auth, caller: &Caller) -> Result<PathBuf, TwinkleError> {
        Ok(checkpoint_dir(&auth.save_root, &caller.owner, &self.0)?)
    }
}

impl fmt::Display for TwinklePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}/{}", self.0.run_id, self.0.kind.dir(), self.0.name)
    }
}

/// The caller's directory of run `run_id`.
pub fn caller_run_dir(auth: &Auth, caller: &Caller, run_id: &str) -> Result<PathBuf, TwinkleError> {
    Ok(run_dir(&auth.save_root, &caller.owner, run_id)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let p = TwinklePath::parse("name", "twinkle://s1-default/weights/ep0").unwrap();
        assert_eq!(
            (p.run_id(), p.kind(), p.name()),
            ("s1-default", CheckpointKind::Weights, "ep0")
        );
        assert_eq!(p.to_string(), "twinkle://s1-default/weights/ep0");
        for bad in [
            "ms://Qwen/Qwen3-0.6B",
            "/etc/passwd",
            "twinkle://../weights/x",
            "twinkle://run/weights/../x",
            "twinkle://run/weights",
            "twinkle://run/external_weights/x",
            "twinkle://run/other/x",
            "twinkle://run/weights/a/b",
        ] {
            let e = TwinklePath::parse("name", bad).unwrap_err();
            assert!(matches!(e, TwinkleError::BadRequest(_)), "{bad}: {e}");
            assert!(e.to_string().starts_with("name"), "{bad}: {e}");
        }
    }
}
