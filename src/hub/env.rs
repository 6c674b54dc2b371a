//! The environment model resolution and downloading read ([`HubEnv`]), captured once so tests
//! can pass their own: the home directories, then each hub's variables in its own group.

use std::path::{Path, PathBuf};

use super::id::Hub;

/// The environment resolution and downloading read, captured once so tests can pass their own.
#[derive(Debug, Clone, Default)]
pub struct HubEnv {
    pub home: Option<PathBuf>,
    pub twinkle_home: Option<PathBuf>,
    /// `TWINKLE_OFFLINE` is true: no hub is contacted.
    pub twinkle_offline: bool,
    /// The Hugging Face Hub's variables.
    pub hf: HfEnv,
    /// ModelScope's variables.
    pub ms: MsEnv,
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

fn env_string(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

/// huggingface_hub's truthy values (`1`, `ON`, `YES`, `TRUE`, any case).
fn env_flag(name: &str) -> bool {
    env_string(name)
        .is_some_and(|v| matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"))
}

/// A hub's base URL: `endpoint`, else `default`, without a trailing `/`.
fn base_url(endpoint: Option<&str>, default: &str) -> String {
    endpoint.unwrap_or(default).trim_end_matches('/').to_string()
}

/// The Hugging Face Hub variables, read as huggingface_hub reads them.
#[derive(Debug, Clone, Default)]
pub struct HfEnv {
    /// `HF_HUB_CACHE` (or `HUGGINGFACE_HUB_CACHE`).
    pub hub_cache: Option<PathBuf>,
    /// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`.
    pub home: Option<PathBuf>,
    /// `HF_ENDPOINT` (default `https://huggingface.co`).
    pub endpoint: Option<String>,
    /// `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, else the token file (`HF_TOKEN_PATH`, `$HF_HOME/token`).
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is true.
    pub offline: bool,
}

impl HfEnv {
    /// Reads the Hugging Face variables; `home` (`HOME`) locates the default token file.
    fn from_process(home: Option<&Path>) -> Self {
        // huggingface_hub: HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface.
        let hf_home = env_path("HF_HOME")
            .or_else(|| env_path("XDG_CACHE_HOME").map(|x| x.join("huggingface")));
        let token_file = env_path("HF_TOKEN_PATH").or_else(|| {
            let base = hf_home.clone().or_else(|| home.map(|h| h.join(".cache/huggingface")));
            base.map(|b| b.join("token"))
        });
        let token =
            env_string("HF_TOKEN").or_else(|| env_string("HUGGING_FACE_HUB_TOKEN")).or_else(|| {
                let t = std::fs::read_to_string(token_file?).ok()?;
                Some(t.trim().to_string()).filter(|t| !t.is_empty())
            });
        HfEnv {
            hub_cache: env_path("HF_HUB_CACHE").or_else(|| env_path("HUGGINGFACE_HUB_CACHE")),
            home: hf_home,
            endpoint: env_string("HF_ENDPOINT"),
            token,
            offline: env_flag("HF_HUB_OFFLINE") || env_flag("TRANSFORMERS_OFFLINE"),
        }
    }

    /// The HF Hub base URL, without a trailing `/`.
    pub fn endpoint_url(&self) -> String {
        base_url(self.endpoint.as_deref(), "https://huggingface.co")
    }
}

/// The ModelScope variables, read as the modelscope SDK reads them.
#[derive(Debug, Clone, Default)]
pub struct MsEnv {
    /// `MODELSCOPE_CACHE`.
    pub cache: Option<PathBuf>,
    /// `MODELSCOPE_ENDPOINT` (a full URL), else `MODELSCOPE_DOMAIN` (deprecated; `https://` is
    /// added when it has no scheme), as the current SDK picks it.
    pub endpoint: Option<String>,
    /// `MODELSCOPE_API_TOKEN`.
    pub token: Option<String>,
}

/// The current SDK's choice: `MODELSCOPE_ENDPOINT`, else `MODELSCOPE_DOMAIN` with `https://` added
/// when it has no scheme.
fn ms_endpoint(endpoint: Option<String>, domain: Option<String>) -> Option<String> {
    endpoint.or_else(|| domain.map(|d| if d.contains("://") { d } else { format!("https://{d}") }))
}

impl MsEnv {
    fn from_process() -> Self {
        MsEnv {
            cache: env_path("MODELSCOPE_CACHE"),
            endpoint: ms_endpoint(
                env_string("MODELSCOPE_ENDPOINT"),
                env_string("MODELSCOPE_DOMAIN"),
            ),
            token: env_string("MODELSCOPE_API_TOKEN"),
        }
    }

    /// The ModelScope base URL (default `https://modelscope.cn`), without a trailing `/`.
    pub fn endpoint_url(&self) -> String {
        base_url(self.endpoint.as_deref(), "https://modelscope.cn")
    }
}

impl HubEnv {
    /// Reads `HOME`, `TWINKLE_HOME`, `TWINKLE_OFFLINE` and each hub's cache, endpoint, token and
    /// offline variables (see the field docs of [`HfEnv`] and [`MsEnv`]).
    pub fn from_process() -> Self {
        let home = env_path("HOME");
        HubEnv {
            hf: HfEnv::from_process(home.as_deref()),
            ms: MsEnv::from_process(),
            twinkle_home: env_path("TWINKLE_HOME"),
            twinkle_offline: env_flag("TWINKLE_OFFLINE"),
            home,
        }
    }

    /// ModelScope cache roots of the layout both SDK generations read (`models/Org/Name___`),
    /// in lookup order; the first is where downloads go.
    pub fn modelscope_roots(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        v.extend(self.ms.cache.clone());
        v.extend(self.home.as_ref().map(|h| h.join(".cache/modelscope/hub")));
        v.dedup();
        v
    }

    /// Roots of the newer ModelScope SDK's layout (`models/Org--Name/snapshots/<rev>`).
    pub fn modelscope_new_roots(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        v.extend(self.ms.cache.clone());
        v.extend(self.home.as_ref().map(|h| h.join(".cache/modelscope")));
        v.dedup();
        v
    }

    /// Hugging Face hub cache roots, in lookup order; the first is where downloads go.
    pub fn hf_roots(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        v.extend(self.hf.hub_cache.clone());
        v.extend(self.hf.home.as_ref().map(|h| h.join("hub")));
        v.extend(self.home.as_ref().map(|h| h.join(".cache/huggingface/hub")));
        v.dedup();
        v
    }

    /// Whether downloads from `hub` are forbidden.
    pub fn offline(&self, hub: Hub) -> bool {
        self.twinkle_offline || (hub == Hub::HuggingFace && self.hf.offline)
    }

    /// The variable that made `hub` offline (for error messages).
    pub fn offline_var(&self, hub: Hub) -> &'static str {
        if self.twinkle_offline || hub == Hub::ModelScope {
            "TWINKLE_OFFLINE=1"
        } else {
            "HF_HUB_OFFLINE=1"
        }
    }

    /// Where generated models are cached.
    pub fn generated_root(&self) -> PathBuf {
        match (&self.twinkle_home, &self.home) {
            (Some(t), _) => t.join("models/generated"),
            (None, Some(h)) => h.join(".cache/twinkle/models/generated"),
            (None, None) => PathBuf::from(".twinkle/models/generated"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_follow_the_sdks_precedence() {
        let e = HubEnv::default();
        assert_eq!(e.hf.endpoint_url(), "https://huggingface.co");
        assert_eq!(e.ms.endpoint_url(), "https://modelscope.cn");
        let hf = HfEnv { endpoint: Some("http://m:1/".into()), ..HfEnv::default() };
        assert_eq!(hf.endpoint_url(), "http://m:1");
        let ms = |e: Option<&str>, d: Option<&str>| MsEnv {
            endpoint: ms_endpoint(e.map(Into::into), d.map(Into::into)),
            ..MsEnv::default()
        };
        assert_eq!(ms(None, Some("www.x.cn")).endpoint_url(), "https://www.x.cn");
        assert_eq!(ms(None, Some("http://d")).endpoint_url(), "http://d");
        assert_eq!(ms(Some("http://ep/"), Some("http://d")).endpoint_url(), "http://ep");
    }

    #[test]
    fn offline_per_hub() {
        let e = HubEnv::default();
        assert!(!e.offline(Hub::HuggingFace));
        let e = HubEnv { hf: HfEnv { offline: true, ..HfEnv::default() }, ..e };
        assert!(e.offline(Hub::HuggingFace) && !e.offline(Hub::ModelScope));
        let e = HubEnv { twinkle_offline: true, ..e };
        assert!(e.offline(Hub::ModelScope));
    }
}
