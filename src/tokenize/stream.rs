//! Incremental detokenization: turns generated token ids into text deltas for streaming and stop
//! strings, never emitting half of a multi-byte UTF-8 character.
//!
//! Byte-level BPE tokens can end in the middle of a character, and some decoders change a
//! token's text depending on what precedes it (a leading-space marker is dropped at the start).
//! So each step decodes a short window twice — `ids[prefix..read]` (already emitted) and
//! `ids[prefix..]` — and emits the difference once the new text no longer ends in U+FFFD (the
//! lossy decoder's mark for an incomplete character). The window then slides forward.

use super::{TokenizeError, Tokenizer};

const REPLACEMENT: char = '\u{FFFD}';

/// Per-sequence state; pass the same [`Tokenizer`] to every call.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix: usize,
    /// End of what has been emitted.
    read: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    pub fn new(skip_special_tokens: bool) -> Self {
        Self { skip_special_tokens, ..Self::default() }
    }

    /// Starts after `context` (for example the prompt's last few tokens) without emitting it, so
    /// the first generated token decodes as it would mid-text.
    pub fn with_context(context: &[u32], skip_special_tokens: bool) -> Self {
        Self { ids: context.to_vec(), prefix: 0, read: context.len(), skip_special_tokens }
    }

    /// Adds one token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, TokenizeError> {
        self.ids.push(id);
        let (done, all) = self.window(tokenizer)?;
        if all.len() <= done.len() || all.ends_with(REPLACEMENT) {
            return Ok(String::new());
        }
        match all.get(done.len()..) {
            Some(delta) => {
                let delta = delta.to_owned();
                self.prefix = self.read;
                self.read = self.ids.len();
                Ok(delta)
            }
            // The decoder rewrote earlier text so the lengths do not line up; wait for more.
            None => Ok(String::new()),
        }
    }

    /// Emits whatever is still held back (an incomplete character comes out as U+FFFD).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String, TokenizeError> {
        let (done, all) = self.window(tokenizer)?;
        let delta = all.get(done.len()..).unwrap_or_default().to_owned();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(delta)
    }

    fn window(&self, tokenizer: &Tokenizer) -> Result<(String, String), TokenizeError> {
        let done = tokenizer.decode(&self.ids[self.prefix..self.read], self.skip_special_tokens)?;
        let all = tokenizer.decode(&self.ids[self.prefix..], self.skip_special_tokens)?;
        Ok((done, all))
    }
}
