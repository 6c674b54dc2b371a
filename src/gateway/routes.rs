//! Route table: longest `route_prefix` wins, matching whole path segments only.

use super::GatewayError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Normalised: starts with '/', no trailing '/' except the root itself.
    pub prefix: String,
    pub app: String,
}

/// Prefixes sorted longest first, so the first match is the longest.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

/// `"/api/v1/"` → `"/api/v1"`, `""` → `"/"`; a prefix must start with '/'.
pub fn normalize_prefix(app: &str, prefix: &str) -> Result<String, GatewayError> {
    let p = prefix.trim();
    if p.is_empty() {
        return Ok("/".to_string());
    }
    if !p.starts_with('/') {
        return Err(GatewayError::BadPrefix { app: app.to_string(), prefix: prefix.to_string() });
    }
    let t = p.trim_end_matches('/');
    Ok(if t.is_empty() { "/".to_string() } else { t.to_string() })
}

fn matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

impl RouteTable {
    /// Builds the table from `(app, route_prefix)` pairs; duplicate prefixes are an error.
    pub fn new<'a>(
        apps: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, GatewayError> {
        let mut routes: Vec<Route> = Vec::new();
        for (app, prefix) in apps {
            let prefix = normalize_prefix(app, prefix)?;
            if let Some(other) = routes.iter().find(|r| r.prefix == prefix) {
                return Err(GatewayError::DuplicatePrefix {
                    first: other.app.clone(),
                    second: app.to_string(),
                    prefix,
                });
            }
            routes.push(Route { prefix, app: app.to_string() });
        }
        // The seed's 3-node example mounts its sampler at `/sampler/…` while the twinkle-kit 0.1.x
        // client calls `/samplers/…`: each such prefix also answers under its twin, unless another
        // application owns the twin.
        let twins: Vec<Route> = routes
            .iter()
            .filter_map(|r| {
                let twin = if let Some(rest) = r.prefix.strip_prefix("/samplers/") {
                    format!("/sampler/{rest}")
                } else {
                    format!("/samplers/{}", r.prefix.strip_prefix("/sampler/")?)
                };
                Some(Route { prefix: twin, app: r.app.clone() })
            })
            .collect();
        for twin in twins {
            if !routes.iter().any(|r| r.prefix == twin.prefix) {
                routes.push(twin);
            }
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Ok(Self { routes })
    }

    /// The application serving `path`, by longest segment-aware prefix.
    pub fn lookup(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| matches(&r.prefix, path))
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        RouteTable::new([
            ("server", "/api/v1"),
            ("model", "/api/v1/model/Qwen/Qwen2.5-0.5B-Instruct/"),
            ("sampler", "/api/v1/sampler/Qwen/Qwen2.5-0.5B-Instruct"),
        ])
        .expect("valid table")
    }

    fn app_of(t: &RouteTable, path: &str) -> Option<String> {
        t.lookup(path).map(|r| r.app.clone())
    }

    #[test]
    fn longest_prefix_wins_on_segment_boundaries() {
        let t = table();
        assert_eq!(app_of(&t, "/api/v1/healthz").as_deref(), Some("server"));
        assert_eq!(app_of(&t, "/api/v1").as_deref(), Some("server"));
        assert_eq!(
            app_of(&t, "/api/v1/model/Qwen/Qwen2.5-0.5B-Instruct/forward").as_deref(),
            Some("model")
        );
        assert_eq!(
            app_of(&t, "/api/v1/model/Qwen/Qwen2.5-0.5B-Instruct").as_deref(),
            Some("model")
        );
        // Not a segment boundary: falls back to the shorter prefix.
        assert_eq!(
            app_of(&t, "/api/v1/model/Qwen/Qwen2.5-0.5B-Instruct-2/x").as_deref(),
            Some("server")
        );
        assert_eq!(app_of(&t, "/api/v10"), None);
        let seed = RouteTable::new([("sampler", "/sampler/Qwen/Q"), ("other", "/samplers/X")])
            .expect("valid table");
        assert_eq!(app_of(&seed, "/samplers/Qwen/Q/sample").as_deref(), Some("sampler"));
        assert_eq!(app_of(&seed, "/sampler/Qwen/Q/sample").as_deref(), Some("sampler"));
        assert_eq!(app_of(&seed, "/sampler/X/sample").as_deref(), Some("other"));
        assert_eq!(app_of(&t, "/other"), None);
        assert_eq!(app_of(&t, "/"), None);
    }

    #[test]
    fn root_prefix_catches_everything_else() {
        let t = RouteTable::new([("root", "/"), ("p", "/p")]).expect("valid table");
        assert_eq!(app_of(&t, "/p/x").as_deref(), Some("p"));
        assert_eq!(app_of(&t, "/px").as_deref(), Some("root"));
        assert_eq!(app_of(&t, "/").as_deref(), Some("root"));
    }

    #[test]
    fn bad_and_duplicate_prefixes_are_errors() {
        assert!(matches!(RouteTable::new([("a", "api")]), Err(GatewayError::BadPrefix { .. })));
        assert!(matches!(
            RouteTable::new([("a", "/x/"), ("b", "/x")]),
            Err(GatewayError::DuplicatePrefix { .. })
        ));
        assert_eq!(normalize_prefix("a", "").ok().as_deref(), Some("/"));
        assert_eq!(normalize_prefix("a", "///").ok().as_deref(), Some("/"));
    }
}
