//! Conversations → model inputs with assistant-only labels, by round-wise rendering: the chat
//! template is rendered for `messages[..k]` with the generation prompt and for `messages[..=k]`
//! without; when both are prefixes of the whole rendering, the text between them is assistant
//! turn `k` and is trained on. Segments are tokenised one by one and concatenated (their
//! boundaries sit on the template's special tokens), so labels align with tokens exactly. HF
//! `{% generation %}` masks are rarely present in real templates, so they are not relied on.

use serde_json::{Map, Value};

use super::{TokenizeError, Tokenizer};

/// Label of a position without a target (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// How to render a conversation.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// Extra template variables (`enable_thinking`, `tools`).
    pub extra: Map<String, Value>,
    /// Keep at most this many tokens (the tail is cut).
    pub max_length: Option<usize>,
}

/// A rendered conversation: tokens and ROLLED labels (`labels[i]` is the target of position `i`,
/// [`IGNORE`] elsewhere), as Twinkle's templates produce them.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

/// Rolls per-token labels one to the left: position `i` predicts token `i + 1`.
pub fn roll(unrolled: &[i64]) -> Vec<i64> {
    let mut out: Vec<i64> = unrolled.iter().skip(1).copied().collect();
    out.push(IGNORE);
    out
}

/// End of assistant turn `k` in `full` when rendering the conversation up to `k` changes that
/// turn (Qwen3 adds an empty reasoning block to the final assistant turn only): the turn's text
/// content is found after the prompt, followed by the same end-of-turn text as in `through`.
fn turn_end(full: &str, before: &str, through: &str, message: &Value) -> Option<usize> {
    let content = message.get("content").and_then(Value::as_str).filter(|c| !c.is_empty())?;
    let tail = through.strip_prefix(before)?;
    let after = tail.find(content)? + content.len();
    let end_of_turn = &tail[after..];
    let at = before.len() + full.get(before.len()..)?.find(content)? + content.len();
    full[at..].starts_with(end_of_turn).then_some(at + end_of_turn.len())
}

fn is_assistant(m: &Value) -> bool {
    m.get("role").and_then(Value::as_str) == Some("assistant")
}

impl Tokenizer {
    /// Training encoding of `messages`: every assistant turn (its content and the template's
    /// end-of-turn text) is labelled, everything else is [`IGNORE`].
    pub fn encode_for_training(
        &self,
        messages: &[Value],
        opts: &RenderOptions,
    ) -> Result<Encoded, TokenizeError> {
        let full = self.apply_chat_template_json(messages, false, &opts.extra)?;
        // (start, end) byte spans of assistant turns in `full`.
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for k in 0..messages.len() {
            if !is_assistant(&messages[k]) {
                continue;
            }
            let before = self.apply_chat_template_json(&messages[..k], true, &opts.extra)?;
            let through = self.apply_chat_template_json(&messages[..=k], false, &opts.extra)?;
            let floor = spans.last().map_or(0, |s| s.1);
            if !full.starts_with(&before) || before.len() < floor {
                continue;
            }
            if full.starts_with(&through) && through.len() > before.len() {
                spans.push((before.len(), through.len()));
            } else if let Some(end) = turn_end(&full, &before, &through, &messages[k]) {
                spans.push((before.len(), end));
            }
        }
        // A template that rewrites earlier turns (e.g. dropping old reasoning) breaks the prefix
        // property; then at least the final assistant turn is trained on.
        if spans.is_empty()
            && let Some(last) = messages.iter().rposition(is_assistant)
            && last + 1 == messages.len()
        {
            let before = self.apply_chat_template_json(&messages[..last], true, &opts.extra)?;
            if full.starts_with(&before) {
                spans.push((before.len(), full.len()));
            }
        }
        let mut ids = Vec::new();
        let mut unrolled = Vec::new();
        let mut at = 0;
        for (s, e) in spans.iter().copied().chain(std::iter::once((full.len(), full.len()))) {
            let plain = self.encode(&full[at..s], false)?;
            unrolled.extend(std::iter::repeat_n(IGNORE, plain.len()));
            ids.extend(plain);
            let trained = self.encode(&full[s..e], false)?;
            unrolled.extend(trained.iter().map(|&t| i64::from(t)));
            ids.extend(trained);
            at = e;
        }
        let mut labels = roll(&unrolled);
        if let Some(max) = opts.max_length
            && ids.len() > max
        {
            ids.truncate(max);
            labels.truncate(max);
            if let Some(last) = labels.last_mut() {
                *last = IGNORE;
            }
        }
        Ok(Encoded { input_ids: ids, labels })
    }

    /// Generation prompt of `messages` (the template's assistant header appended).
    pub fn encode_prompt(
        &self,
        messages: &[Value],
        opts: &RenderOptions,
    ) -> Result<Vec<u32>, TokenizeError> {
        let text = self.apply_chat_template_json(messages, true, &opts.extra)?;
        let mut ids = self.encode(&text, false)?;
        if let Some(max) = opts.max_length
            && ids.len() > max
        {
            // Keep the end: the generation prompt must stay the last tokens.
            ids.drain(..ids.len() - max);
        }
        Ok(ids)
    }
}
