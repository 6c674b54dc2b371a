//! Per-request and per-key resource bounds of the Tinker API (issue #12, item 4). A refusal is a
//! 4xx whose message names the limit: 400 for a request that can never pass (too many tokens,
//! too much session metadata), 429 for a key with too much queued work (the SDK retries 429
//! with backoff, so it is backpressure, not an error). Sample requests have their own per-key
//! bound on what is in flight ([`SamplingSlots`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::error::ApiError;

/// Most tags on one session.
pub const MAX_TAGS: usize = 100;
/// Most bytes of one tag.
pub const MAX_TAG_BYTES: usize = 256;
/// Most bytes of a session's `user_metadata` (as JSON) plus its tags.
pub const MAX_SESSION_METADATA_BYTES: usize = 64 << 10;
/// Most unfinished futures (pending or running) one API key may have.
pub const MAX_PENDING_PER_KEY: usize = 64;
/// Without `server_config.max_sampling_requests_per_key`: unfinished sample requests one API
/// key may have. Each may ask for up to 128 sequences, so this bounds a key's share of the
/// sampling work the server has handed to the applications (beside the overall pending bound).
pub const DEFAULT_SAMPLING_PER_KEY: usize = 16;
/// Without `server_config.max_tokens_per_request`, a forward / forward_backward may carry this
/// many full-length sequences of the model's context.
pub const DEFAULT_BATCH_SEQUENCES: u64 = 32;

/// Refuses session tags / metadata over the bounds (they are stored and kept for the session's
/// lifetime, so an unbounded body is unbounded state).
pub fn check_session(tags: &[String], metadata: &serde_json::Value) -> Result<(), ApiError> {
    if tags.len() > MAX_TAGS {
        return Err(ApiError::BadRequest(format!(
            "tags: {} tags exceed the limit of {MAX_TAGS}",
            tags.len()
        )));
    }
    if let Some((i, t)) = tags.iter().enumerate().find(|(_, t)| t.len() > MAX_TAG_BYTES) {
        return Err(ApiError::BadRequest(format!(
            "tags[{i}]: {} bytes exceed the limit of {MAX_TAG_BYTES} bytes per tag",
            t.len()
        )));
    }
    let total = metadata.to_string().len() + tags.iter().map(String::len).sum::<usize>();
    if total > MAX_SESSION_METADATA_BYTES {
        return Err(ApiError::BadRequest(format!(
            "user_metadata: tags and metadata take {total} bytes, over the limit of \
             {MAX_SESSION_METADATA_BYTES} bytes"
        )));
    }
    Ok(())
}

/// The token cap of one forward / forward_backward: the configured one, else
/// [`DEFAULT_BATCH_SEQUENCES`] × the model's context (none when the context is unknown).
pub fn token_cap(configured: Option<u64>, max_length: Option<u64>) -> Option<u64> {
    configured.or_else(|| max_length.map(|m| m.saturating_mul(DEFAULT_BATCH_SEQUENCES)))
}

/// Refuses a batch of `tokens` input tokens over `cap`.
pub fn check_tokens(tokens: u64, cap: Option<u64>) -> Result<(), ApiError> {
    match cap {
        Some(cap) if tokens > cap => Err(ApiError::BadRequest(format!(
            "data: the batch has {tokens} tokens, over the limit of {cap} per request \
             (server_config.max_tokens_per_request); split it into several forward_backward calls \
             before one optim_step"
        ))),
        _ => Ok(()),
    }
}

/// Refuses new work for a key that already has `unfinished` futures pending or running.
pub fn check_pending(unfinished: usize) -> Result<(), ApiError> {
    if unfinished >= MAX_PENDING_PER_KEY {
        return Err(ApiError::TooManyRequests(format!(
            "this API key has {unfinished} requests pending, the limit is {MAX_PENDING_PER_KEY}: \
             wait for some to finish"
        )));
    }
    Ok(())
}

/// In-flight sample requests per key (from submission until the job finished), counted in
/// memory: sample jobs run unqueued as soon as they are submitted, so this is what bounds how
/// much sampling one key has running at once. A [`SamplingPermit`] holds one unit and gives it
/// back when dropped, whichever way the request ends.
#[derive(Debug, Clone)]
pub struct SamplingSlots {
    cap: usize,
    in_flight: Arc<Mutex<HashMap<String, usize>>>,
}

/// One in-flight sample request of a key (see [`SamplingSlots`]).
#[derive(Debug)]
pub struct SamplingPermit {
    owner: String,
    in_flight: Arc<Mutex<HashMap<String, usize>>>,
}

impl SamplingSlots {
    /// At most `cap` (at least 1) sample requests in flight per key.
    pub fn new(cap: usize) -> Self {
        SamplingSlots { cap: cap.max(1), in_flight: Arc::default() }
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// A slot for `owner`, or 429 naming the limit when the key already has `cap` in flight.
    pub fn acquire(&self, owner: &str) -> Result<SamplingPermit, ApiError> {
        // The map only holds counters, each updated whole: a poisoned lock is still consistent.
        let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(owner.to_string()).or_insert(0);
        if *n >= self.cap {
            return Err(ApiError::TooManyRequests(format!(
                "this API key has {n} sample requests in flight, the limit is {} \
                 (server_config.max_sampling_requests_per_key): wait for some to finish",
                self.cap
            )));
        }
        *n += 1;
        Ok(SamplingPermit { owner: owner.to_string(), in_flight: self.in_flight.clone() })
    }

    /// Sample requests `owner` has in flight.
    pub fn in_flight(&self, owner: &str) -> usize {
        let map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        map.get(owner).copied().unwrap_or(0)
    }
}

impl Default for SamplingSlots {
    fn default() -> Self {
        Self::new(DEFAULT_SAMPLING_PER_KEY)
    }
}

impl Drop for SamplingPermit {
    fn drop(&mut self) {
        let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.owner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_name_their_limit() {
        let many: Vec<String> = (0..=MAX_TAGS).map(|i| i.to_string()).collect();
        let e = check_session(&many, &serde_json::json!({})).unwrap_err().to_string();
        assert!(e.contains("100"), "{e}");
        let big = serde_json::json!({"x": "a".repeat(MAX_SESSION_METADATA_BYTES)});
        let e = check_session(&[], &big).unwrap_err().to_string();
        assert!(e.contains("65536"), "{e}");
        assert!(check_session(&["t".into()], &serde_json::json!({"a": 1})).is_ok());
        assert_eq!(token_cap(None, Some(100)), Some(3200));
        assert_eq!(token_cap(Some(7), Some(100)), Some(7));
        assert!(check_tokens(3200, Some(3200)).is_ok());
        assert!(check_tokens(3201, Some(3200)).unwrap_err().to_string().contains("3200"));
        assert!(matches!(check_pending(MAX_PENDING_PER_KEY), Err(ApiError::TooManyRequests(_))));
        assert!(check_pending(MAX_PENDING_PER_KEY - 1).is_ok());
    }

    #[test]
    fn sampling_slots_are_per_key_and_given_back() {
        let slots = SamplingSlots::new(2);
        let a = slots.acquire("a").unwrap();
        let b = slots.acquire("a").unwrap();
        let e = slots.acquire("a").unwrap_err();
        assert!(matches!(e, ApiError::TooManyRequests(_)));
        assert!(e.to_string().contains("max_sampling_requests_per_key"), "{e}");
        assert!(slots.acquire("other").is_ok(), "another key is not held back");
        drop(a);
        let c = slots.acquire("a").unwrap();
        drop((b, c));
        assert_eq!(slots.in_flight("a"), 0);
    }
}
