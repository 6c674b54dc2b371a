//! Tokenization for the native protocol: a Hugging Face `tokenizer.json` plus the
//! `tokenizer_config.json` beside it (chat template, special tokens), encode/decode, streaming
//! detokenization and chat-template rendering.

mod chat;
mod stream;
pub mod trajectory;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value as Json;
use thiserror::Error;

pub use chat::ChatMessage;
use chat::ChatTemplate;
pub use stream::IncrementalDecoder;

/// Errors of the tokenization layer.
#[derive(Debug, Error)]
pub enum TokenizeError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot load the tokenizer {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("invalid {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("encoding failed: {0}")]
    Encode(String),
    #[error("decoding failed: {0}")]
    Decode(String),
    #[error("this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)")]
    NoChatTemplate,
    #[error("chat template error: {0}")]
    Template(String),
}

/// A loaded tokenizer with its special tokens and chat template. Immutable and `Send + Sync`.
#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `Err` holds why the template did not compile; reported when a template is needed, so a
    /// model with an odd template still serves token-level requests.
    chat_template: Option<Result<ChatTemplate, String>>,
    eos_token_ids: Vec<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
}

fn read_json(path: &Path) -> Result<Option<Json>, TokenizeError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(TokenizeError::Io { path: path.to_owned(), source }),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizeError::Config { path: path.to_owned(), message: e.to_string() })
}

/// A special token in `tokenizer_config.json` is a string or an `AddedToken`-like object.
fn token_string(value: Option<&Json>) -> Option<String> {
    match value? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_owned),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which "default" is used.
fn template_source(config: &Json) -> Option<String> {
    match config.get("chat_template")? {
        Json::String(s) => Some(s.clone()),
        Json::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Json::as_str)
            .map(str::to_owned),
        _ => None,
    }
}

/// Adds the `added_tokens_decoder` entries of tokenizer_config.json that tokenizer.json lacks
/// (normally it has them all; tokenizer.json wins where both name a token). Each must land on
/// the id the config gives it.
fn add_missing_tokens(
    inner: &mut tokenizers::Tokenizer,
    config: &Json,
    config_path: &Path,
) -> Result<(), TokenizeError> {
    let Some(Json::Object(entries)) = config.get("added_tokens_decoder") else {
        return Ok(());
    };
    let bad = |message: String| TokenizeError::Config { path: config_path.to_owned(), message };
    let mut missing = Vec::new();
    for (id, entry) in entries {
        let id: u32 = id
            .parse()
            .map_err(|_| bad(format!("added_tokens_decoder key {id:?} is not a token id")))?;
        let content = entry
            .get("content")
            .and_then(Json::as_str)
            .ok_or_else(|| bad(format!("added_tokens_decoder[{id}] has no \"content\" string")))?;
        let special = entry.get("special").and_then(Json::as_bool).unwrap_or(false);
        if inner.token_to_id(content).is_none() {
            missing.push((id, content.to_owned(), special));
        }
    }
    missing.sort_unstable();
    for (id, content, special) in missing {
        let token = tokenizers::AddedToken::from(content.clone(), special);
        let added =
            if special { inner.add_special_tokens([token]) } else { inner.add_tokens([token]) };
        added.map_err(|e| bad(format!("cannot add token {content:?}: {e}")))?;
        let got = inner.token_to_id(&content);
        if got != Some(id) {
            return Err(bad(format!(
                "added token {content:?} is declared as id {id} but would get {got:?}; \
                 the ids in added_tokens_decoder must continue the vocabulary"
            )));
        }
    }
    Ok(())
}

impl Tokenizer {
    /// Loads `tokenizer.json` (required), `tokenizer_config.json`, `chat_template.jinja` and
    /// `generation_config.json` (all optional) from a model directory.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, TokenizeError> {
        let dir = dir.as_ref();
        let tok_path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&tok_path)
            .map_err(|source| TokenizeError::Io { path: tok_path.clone(), source })?;
        let mut inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| TokenizeError::Load { path: tok_path.clone(), message: e.to_string() })?;

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?.unwrap_or(Json::Null);
        add_missing_tokens(&mut inner, &config, &config_path)?;
        let mut template = template_source(&config);
        if template.is_none() {
            let jinja = dir.join("chat_template.jinja");
            match std::fs::read_to_string(&jinja) {
                Ok(text) => template = Some(text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(TokenizeError::Io { path: jinja, source }),
            }
        }
        let bos_token = token_string(config.get("bos_token"));
        let eos_token = token_string(config.get("eos_token"));
        let pad_token = token_string(config.get("pad_token"));

        let mut eos_token_ids = Vec::new();
        if let Some(eos) = &eos_token {
            let id = inner.token_to_id(eos).ok_or_else(|| TokenizeError::Config {
                path: config_path.clone(),
                message: format!("eos_token {eos:?} is not in the vocabulary"),
            })?;
            eos_token_ids.push(id);
        }
        let gen_path = dir.join("generation_config.json");
        if let Some(gen_config) = read_json(&gen_path)? {
            let ids = match gen_config.get("eos_token_id") {
                Some(Json::Array(ids)) => ids.iter().collect(),
                Some(id) if !id.is_null() => vec![id],
                _ => Vec::new(),
            };
            for id in ids {
                let id = id.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| {
                    TokenizeError::Config {
                        path: gen_path.clone(),
                        message: format!("eos_token_id must be a token id, got {id}"),
                    }
                })?;
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }

        Ok(Self {
            inner,
            chat_template: template.map(|t| ChatTemplate::compile(&t)),
            eos_token_ids,
            bos_token,
            eos_token,
            pad_token,
        })
    }

    /// Token ids of `text`. `add_special` applies the tokenizer's post-processor (BOS and the
    /// like; Qwen adds nothing). Special-token strings in `text` become their ids.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizeError> {
        let encoding = self
            .inner
            .encode_fast(text, add_special)
            .map_err(|e| TokenizeError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`; incomplete UTF-8 at the edges decodes as U+FFFD. Ids the tokenizer does not
    /// know (a model's padded embedding rows beyond `vocab_size()`) decode to nothing.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizeError> {
        self.inner.decode(ids, skip_special).map_err(|e| TokenizeError::Decode(e.to_string()))
    }

    /// Renders the chat template for `role`/`content` messages.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizeError> {
        self.apply_chat_template_json(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// Renders the chat template for arbitrary message objects (tool calls, reasoning content)
    /// with extra template variables such as `tools` or `enable_thinking`.
    pub fn apply_chat_template_json<M: Serialize + ?Sized>(
        &self,
        messages: &M,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, Json>,
    ) -> Result<String, TokenizeError> {
        let template = match &self.chat_template {
            None => return Err(TokenizeError::NoChatTemplate),
            Some(Err(why)) => return Err(TokenizeError::Template(why.clone())),
            Some(Ok(t)) => t,
        };
        let mut context = BTreeMap::new();
        for (name, token) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
        ] {
            if let Some(token) = token {
                context.insert(name.to_owned(), chat::to_value(token));
            }
        }
        for (key, value) in extra {
            context.insert(key.clone(), chat::to_value(value));
        }
        context.insert("messages".to_owned(), chat::to_value(messages));
        context.insert("add_generation_prompt".to_owned(), add_generation_prompt.into());
        template.render(context).map_err(TokenizeError::Template)
    }

    /// EOS ids: `eos_token` of tokenizer_config.json first, then `eos_token_id` of
    /// generation_config.json (Qwen3 chat models list `<|im_end|>` and `<|endoftext|>`).
    /// Empty when neither file names one.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Number of token ids the tokenizer knows, added tokens included. A model's embedding
    /// table is often larger (padded, e.g. 151,936 for Qwen3); ids beyond this decode to nothing.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_deref()
    }

    pub fn has_chat_template(&self) -> bool {
        matches!(self.chat_template, Some(Ok(_)))
    }
}
