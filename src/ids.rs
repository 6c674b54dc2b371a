//! Fresh random values for the whole process: request seeds, opaque ids, internal tokens and
//! salts, all from the operating system's random source through `getrandom`.
//!
//! One source on purpose: ids and tokens are bearer secrets or guessable handles if they come
//! from the clock or the process id, and a single module is the one place to audit that. The
//! helpers are infallible: on Linux `getrandom(2)` only blocks until the kernel pool is
//! initialised and then cannot fail, and where it can fail (no source at all) falling back to a
//! weak source for tokens and salts would be worse than stopping, so they panic with the typed
//! error's message. [`try_fill`] is there for a caller that wants to handle it.

/// The operating system's random source could not be read.
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random source failed: {0}")]
pub struct RandomSourceError(getrandom::Error);

/// Fills `buf` from the operating system's random source.
pub fn try_fill(buf: &mut [u8]) -> Result<(), RandomSourceError> {
    getrandom::fill(buf).map_err(RandomSourceError)
}

/// Fills `buf` from the operating system's random source (see the module docs on failure).
pub fn fill(buf: &mut [u8]) {
    if let Err(e) = try_fill(buf) {
        panic!("{e}");
    }
}

/// `N` random bytes.
pub fn bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    fill(&mut buf);
    buf
}

/// A random 64-bit seed (for a request that did not send one: not reproducible, which is what
/// omitting the seed means).
pub fn seed() -> u64 {
    u64::from_le_bytes(bytes::<8>())
}

/// `n_bytes` random bytes as lowercase hex (`2 * n_bytes` digits).
pub fn hex(n_bytes: usize) -> String {
    let mut buf = vec![0u8; n_bytes];
    fill(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bits of an id or a token: 128, so that guessing one is hopeless and collisions never happen.
const ID_BYTES: usize = 16;

/// A fresh opaque id `{prefix}{32 hex digits}` (128 random bits).
pub fn hex_id(prefix: &str) -> String {
    format!("{prefix}{}", hex(ID_BYTES))
}

/// A fresh bearer token: 128 random bits as 32 hex digits (text, so it travels in headers and
/// environment variables unchanged).
pub fn token() -> String {
    hex(ID_BYTES)
}

/// A fresh salt for keyed hashes: 256 random bits as 64 hex digits (text, so a salt file or the
/// `TWINKLE_TOKEN_SALT` variable hold the same kind of value).
pub fn salt() -> String {
    hex(32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn is_lower_hex(s: &str) -> bool {
        s.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    }

    #[test]
    fn ids_have_the_prefix_and_32_lowercase_hex_digits() {
        let id = hex_id("req-");
        let rest = id.strip_prefix("req-").unwrap();
        assert_eq!(rest.len(), 32);
        assert!(is_lower_hex(rest), "{id}");
        assert_eq!(hex_id("").len(), 32);
    }

    #[test]
    fn tokens_salts_and_hex_have_their_lengths() {
        assert_eq!(token().len(), 32);
        assert!(is_lower_hex(&token()));
        assert_eq!(salt().len(), 64);
        assert!(is_lower_hex(&salt()));
        assert_eq!(hex(4).len(), 8);
        assert_eq!(hex(0), "");
        assert_eq!(bytes::<0>(), [0u8; 0]);
    }

    #[test]
    fn values_do_not_repeat() {
        let ids: HashSet<String> = (0..2000).map(|_| hex_id("x")).collect();
        assert_eq!(ids.len(), 2000);
        let seeds: HashSet<u64> = (0..2000).map(|_| seed()).collect();
        assert_eq!(seeds.len(), 2000);
        let tokens: HashSet<String> = (0..2000).map(|_| token()).collect();
        assert_eq!(tokens.len(), 2000);
        assert_ne!(salt(), salt());
    }

    #[test]
    fn ids_are_unique_across_threads() {
        let all: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..500).map(|_| hex_id("t-")).collect::<Vec<_>>()))
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let unique: HashSet<&String> = all.iter().collect();
        assert_eq!(unique.len(), all.len());
    }

    #[test]
    fn bytes_are_not_all_zero() {
        // 256 zero bits from a working source: probability 2^-256.
        assert_ne!(bytes::<32>(), [0u8; 32]);
    }
}
