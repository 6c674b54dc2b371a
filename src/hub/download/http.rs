//! The blocking HTTP client both hubs use (ureq over rustls/ring): the token goes only to the
//! hub's own origin, redirects are followed by hand so that rule holds across them, and transport
//! failures become [`DownloadError::Transport`] (the caller decides whether to retry).

use std::time::Duration;

use ureq::http::{HeaderMap, Response, StatusCode};

use super::DownloadError;

/// A response from the hub or a storage host.
pub(crate) type Resp = Response<ureq::Body>;

/// JSON answers larger than this are refused (listings of huge repos stay far below it).
const JSON_LIMIT: u64 = 64 << 20;
/// Tries of a metadata request (transport errors, 429 and 5xx are retried).
const METADATA_TRIES: u32 = 3;
/// How many redirects one request may follow (renames plus the storage hop).
const MAX_REDIRECTS: usize = 5;

/// One hub's client: base URL, token and the agent.
pub(crate) struct Client {
    agent: ureq::Agent,
    origin: String,
    token: Option<String>,
    /// ModelScope also sends the token as the `m_session_id` cookie.
    cookie: bool,
}

/// `scheme://host[:port]` of an absolute URL (the comparison key for sending the token).
pub(crate) fn origin_of(url: &str) -> &str {
    let after = url.find("://").map_or(0, |i| i + 3);
    match url[after..].find(['/', '?', '#']) {
        Some(i) => &url[..after + i],
        None => url,
    }
}

/// Percent-encodes `s`, keeping RFC 3986 unreserved characters and those in `safe`
/// (Python's `quote(s, safe=…)`).
pub(crate) fn quote(s: &str, safe: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let c = b as char;
        if c.is_ascii_alphanumeric() || "-._~".contains(c) || (b < 128 && safe.contains(c)) {
            out.push(c);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A header's value as text.
pub(crate) fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

pub(crate) fn is_redirect(s: StatusCode) -> bool {
    matches!(s.as_u16(), 301 | 302 | 303 | 307 | 308)
}

impl Client {
    pub(crate) fn new(endpoint: &str, token: Option<String>, cookie: bool) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .max_redirects(0)
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(20)))
            // A stalled transfer counts as a dropped connection (then resumed), never a hang.
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_recv_body(None)
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(concat!("twinkle/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Client { agent, origin: origin_of(endpoint).to_string(), token, cookie }
    }

    pub(crate) fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Sends one request (no redirect following). `Authorization` only to the hub's origin.
    pub(crate) fn send(
        &self,
        method: &str,
        url: &str,
        range_from: u64,
    ) -> Result<Resp, DownloadError> {
        let mut req = ureq::http::Request::builder()
            .method(method)
            .uri(url)
            .header("Accept-Encoding", "identity");
        if range_from > 0 {
            req = req.header("Range", format!("bytes={range_from}-"));
        }
        if let Some(t) = self.token.as_deref().filter(|_| origin_of(url) == self.origin) {
            req = req.header("Authorization", format!("Bearer {t}"));
            if self.cookie {
                req = req.header("Cookie", format!("m_session_id={t}"));
            }
        }
        let req = req
            .body(())
            .map_err(|e| DownloadError::Transport { url: url.into(), detail: e.to_string() })?;
        self.agent
            .run(req)
            .map_err(|e| DownloadError::Transport { url: url.into(), detail: e.to_string() })
    }

    /// [`Self::send`] for metadata requests (listings, `HEAD`): a transport error, 429 or 5xx is
    /// retried a few times with backoff, as the official clients do.
    pub(crate) fn send_retrying(&self, method: &str, url: &str) -> Result<Resp, DownloadError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let r = self.send(method, url, 0);
            let retry = match &r {
                Err(DownloadError::Transport { .. }) => true,
                Ok(resp) => matches!(resp.status().as_u16(), 429 | 500..=599),
                Err(_) => false,
            };
            if !retry || tries >= METADATA_TRIES {
                return r;
            }
            std::thread::sleep(Duration::from_millis(200 << (tries - 1)));
        }
    }

    /// Sends a request and follows redirects by hand (the token stays with the hub's origin);
    /// returns the final answer and its URL.
    pub(crate) fn send_following(
        &self,
        method: &str,
        url: &str,
        range_from: u64,
    ) -> Result<(Resp, String), DownloadError> {
        self.follow(url, |u| self.send(method, u, range_from))
    }

    /// Follows redirects from `url`, sending each hop with `send`.
    fn follow(
        &self,
        url: &str,
        send: impl Fn(&str) -> Result<Resp, DownloadError>,
    ) -> Result<(Resp, String), DownloadError> {
        let mut url = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let resp = send(&url)?;
            if !is_redirect(resp.status()) {
                return Ok((resp, url));
            }
            url = self.location(&resp, &url)?;
        }
        Err(DownloadError::Protocol { url, detail: format!("more than {MAX_REDIRECTS} redirects") })
    }

    /// The absolute target of a redirect answer (relative `Location`s resolve against `base`).
    pub(crate) fn location(&self, resp: &Resp, base: &str) -> Result<String, DownloadError> {
        let loc = header(resp.headers(), "location").ok_or_else(|| DownloadError::Protocol {
            url: base.into(),
            detail: format!("{} without a Location header", resp.status()),
        })?;
        Ok(if loc.contains("://") {
            loc.to_string()
        } else if loc.starts_with('/') {
            format!("{}{loc}", origin_of(base))
        } else {
            let dir = base.rsplit_once('/').map_or(base, |(d, _)| d);
            format!("{dir}/{loc}")
        })
    }

    /// GETs `url` (following redirects) and parses a JSON body of any status; returns the status,
    /// headers and the value (`Null` when the body is not JSON).
    pub(crate) fn get_json(
        &self,
        url: &str,
    ) -> Result<(StatusCode, HeaderMap, serde_json::Value), DownloadError> {
        let (mut resp, url) = self.follow(url, |u| self.send_retrying("GET", u))?;
        let status = resp.status();
        let text =
            resp.body_mut().with_config().limit(JSON_LIMIT).read_to_string().map_err(|e| {
                DownloadError::Transport { url: url.clone(), detail: e.to_string() }
            })?;
        let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        Ok((status, resp.headers().clone(), value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_and_quoting() {
        assert_eq!(origin_of("http://127.0.0.1:80/a/b?c"), "http://127.0.0.1:80");
        assert_eq!(origin_of("https://hf.co"), "https://hf.co");
        assert_eq!(quote("refs/pr/1", ""), "refs%2Fpr%2F1");
        assert_eq!(quote("a b/c.json", "/"), "a%20b/c.json");
    }
}
