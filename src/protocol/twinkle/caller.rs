//! Who is calling and in which scope: the bearer token (`Twinkle-Authorization` first, then
//! `Authorization`) is the tenant, stored only as its keyed hash (the owner directory shared with
//! the Tinker API); the adapter scope is the session (`X-Twinkle-Session-Id`, Gen-2) or the
//! client's request id (`X-Ray-Serve-Request-Id` / `x-request-id`, Gen-1 and session-less Gen-2).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use actix_web::HttpRequest;

use super::error::TwinkleError;
use crate::protocol::tinker::paths::owner_hash;

/// Env var: comma-separated accepted tokens (shared with the Tinker API's keys).
pub use crate::config::keys::API_KEYS_ENV;
use crate::config::keys::AcceptedKeys;
/// Env var: the owner-hash salt (else the `.owner-salt` file in the save root).
pub const SALT_ENV: &str = "TWINKLE_TOKEN_SALT";
/// Longest scope or adapter name accepted (they become directory names).
const MAX_SCOPE: usize = 96;

/// Which tokens are accepted and how owners are hashed.
#[derive(Debug, Clone)]
pub struct Auth {
    /// `None`: development mode, any non-empty token is a tenant of its own.
    pub keys: Option<HashSet<String>>,
    pub salt: Vec<u8>,
    /// Where runs and checkpoints live (`{root}/{owner}/{run}/…`).
    pub save_root: PathBuf,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// HMAC of the token: the owner directory name, never the token itself.
    pub owner: String,
    /// Session id or request id; `None` when the request carried neither.
    pub scope: Option<String>,
}

fn header<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
}

fn bearer(value: &str) -> &str {
    let v = value.trim();
    match v.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        _ => v,
    }
}

/// Checks a scope or adapter name: it becomes part of a run id and a directory name.
pub fn check_name(what: &str, value: &str) -> Result<(), TwinkleError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_SCOPE
        && !value.starts_with('.')
        && !value.contains("..")
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        let shown: String = value.chars().take(100).collect();
        Err(TwinkleError::bad(format!(
            "{what} `{shown}` is invalid: use 1..={MAX_SCOPE} letters, digits, `-`, `_`, `.` \
             (no leading `.`, no `..`)"
        )))
    }
}

impl Auth {
    /// The caller of `req`, or 401.
    pub fn caller(&self, req: &HttpRequest) -> Result<Caller, TwinkleError> {
        let token = header(req, "twinkle-authorization")
            .or_else(|| header(req, "authorization"))
            .map(bearer)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                TwinkleError::Unauthorized(
                    "missing token: send `Twinkle-Authorization: Bearer <token>` \
                     (twinkle_client: api_key / TWINKLE_SERVER_TOKEN)"
                        .into(),
                )
            })?;
        if let Some(keys) = &self.keys
            && !keys.contains(token)
        {
            return Err(TwinkleError::Unauthorized(
                "the token is not accepted by this server".into(),
            ));
        }
        let scope = header(req, "x-twinkle-session-id")
            .or_else(|| header(req, "x-ray-serve-request-id"))
            .or_else(|| header(req, "x-request-id"))
            .map(str::to_string);
        Ok(Caller { owner: owner_hash(&self.salt, token), scope })
    }

    /// The owner directory of `caller` (`{root}/{owner}`).
    pub fn owner_dir(&self, caller: &Caller) -> PathBuf {
        self.save_root.join(&caller.owner)
    }

    /// Accepted tokens from the whole deployment's config (every application's `api_keys` and
    /// `api_keys_file`: the model and sampler apps authenticate the same tenants as the server
    /// app) plus `TWINKLE_API_KEYS`; the salt from `TWINKLE_TOKEN_SALT` or the shared salt file.
    pub fn load(config: Option<&Path>, save_root: &Path) -> Result<Self, TwinkleError> {
        let mut keys = AcceptedKeys::default();
        if let Some(path) = config {
            let cfg = crate::config::load_file(path)
                .map_err(|e| TwinkleError::Internal(format!("cannot read the config: {e}")))?;
            for app in &cfg.applications {
                keys.add_args(&app.args).map_err(|e| TwinkleError::Internal(e.to_string()))?;
            }
        }
        keys.add_env();
        crate::private_fs::create_dir_all(save_root).map_err(|e| {
            TwinkleError::Internal(format!("cannot create {}: {e}", save_root.display()))
        })?;
        let save_root = save_root.canonicalize().unwrap_or_else(|_| save_root.to_path_buf());
        let salt = shared_salt(&save_root)?;
        Ok(Auth { keys: keys.finish(), salt, save_root })
    }
}

/// `TWINKLE_TOKEN_SALT`, else the save root's `.owner-salt`, created once. Several applications
/// may start together; the file is created exclusively and the loser reads the winner's salt.
pub fn shared_salt(root: &Path) -> Result<Vec<u8>, TwinkleError> {
    if let Ok(s) = std::env::var(SALT_ENV)
        && !s.is_empty()
    {
        return Ok(s.into_bytes());
    }
    let file = root.join(".owner-salt");
    let io = |e: std::io::Error| {
        TwinkleError::Internal(format!("cannot use the salt file {}: {e}", file.display()))
    };
    for _ in 0..50 {
        if let Ok(s) = std::fs::read_to_string(&file)
            && !s.trim().is_empty()
        {
            return Ok(s.trim().as_bytes().to_vec());
        }
        let salt = crate::ids::salt();
        // The salt keys every owner token: 0600 whatever the umask.
        match crate::private_fs::open_write(&file, true) {
            Ok(mut f) => {
                use std::io::Write as _;
                f.write_all(salt.as_bytes()).map_err(io)?;
                return Ok(salt.into_bytes());
            }
            // Another process is writing it: read it on the next round.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(io(e)),
        }
    }
    Err(TwinkleError::Internal(format!("the salt file {} stays empty", file.display())))
}

impl Caller {
    /// The server-side adapter id (= training run id) of the client's short `adapter_name`:
    /// `{scope}-{adapter_name}`; 400 without a scope header.
    pub fn adapter_id(&self, adapter_name: &str) -> Result<String, TwinkleError> {
        check_name("adapter_name", adapter_name)?;
        let scope = self.scope.as_deref().ok_or_else(|| {
            TwinkleError::bad(
                "no adapter scope: send X-Twinkle-Session-Id (Gen-2) or X-Ray-Serve-Request-Id",
            )
        })?;
        check_name("session/request id", scope)?;
        Ok(format!("{scope}-{adapter_name}"))
    }
}
