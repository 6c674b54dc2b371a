//! The API keys a deployment accepts: each application's `args.api_keys`, the lines of its
//! `args.api_keys_file` (blank lines and `#` comments skipped) and `TWINKLE_API_KEYS`
//! (comma-separated). The Tinker front and the Twinkle-native layers read them the same way.

use std::collections::HashSet;

use super::AppArgs;

/// Env var: comma-separated accepted API keys (added to the configured ones).
pub const API_KEYS_ENV: &str = "TWINKLE_API_KEYS";

/// An `api_keys_file` that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read api_keys_file {path}: {source}")]
pub struct KeysFileError {
    pub path: String,
    pub source: std::io::Error,
}

/// Keys gathered from config entries and the environment.
#[derive(Debug, Default)]
pub struct AcceptedKeys {
    keys: HashSet<String>,
    /// Whether any source named keys (an empty list still means "only these").
    configured: bool,
}

impl AcceptedKeys {
    /// Adds one application's `api_keys` and `api_keys_file`.
    pub fn add_args(&mut self, args: &AppArgs) -> Result<(), KeysFileError> {
        if let Some(list) = &args.api_keys {
            self.configured = true;
            self.keys.extend(list.iter().map(|k| k.trim().to_string()));
        }
        if let Some(path) = &args.api_keys_file {
            self.configured = true;
            let text = std::fs::read_to_string(path)
                .map_err(|source| KeysFileError { path: path.clone(), source })?;
            let lines = text.lines().map(str::trim);
            self.keys.extend(lines.filter(|l| !l.starts_with('#')).map(String::from));
        }
        Ok(())
    }

    /// Adds `TWINKLE_API_KEYS`; an unset or empty variable adds nothing.
    pub fn add_env(&mut self) {
        let Ok(list) = std::env::var(API_KEYS_ENV) else { return };
        for k in list.split(',').map(str::trim).filter(|k| !k.is_empty()) {
            self.configured = true;
            self.keys.insert(k.to_string());
        }
    }

    /// The accepted keys, or `None` when no source named any (development mode: any `tml-`
    /// key is accepted).
    pub fn finish(mut self) -> Option<HashSet<String>> {
        self.keys.retain(|k| !k.is_empty());
        self.configured.then_some(self.keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_files_and_comments() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "# team\n tml-b \n\ntml-c\n").unwrap();
        let args = AppArgs {
            api_keys: Some(vec![" tml-a".into(), "".into()]),
            api_keys_file: Some(file.display().to_string()),
            ..AppArgs::default()
        };
        let mut k = AcceptedKeys::default();
        k.add_args(&args).unwrap();
        let got = k.finish().unwrap();
        let want: HashSet<String> = ["tml-a", "tml-b", "tml-c"].map(String::from).into();
        assert_eq!(got, want);
        assert_eq!(AcceptedKeys::default().finish(), None);
        let mut empty = AcceptedKeys::default();
        empty.add_args(&AppArgs { api_keys: Some(vec![]), ..AppArgs::default() }).unwrap();
        assert_eq!(empty.finish(), Some(HashSet::new()), "an empty list accepts no key");
        let missing =
            AppArgs { api_keys_file: Some("/nonexistent/keys".into()), ..AppArgs::default() };
        let e = AcceptedKeys::default().add_args(&missing).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/keys"), "{e}");
    }
}
