//! The names a model or sampler application is served under, and the load-time check that
//! every `supported_models` entry is one of them.
//!
//! The configuration names a model by its route: `/api/v1/model/acme/llama-tiny` serves
//! `acme/llama-tiny`, whatever `model_id` points at (a hub id, a local directory). That is how
//! the seed's routes name models and what `supported_models` lists, so it is the public name.
//! A route without such a tail falls back to the name derived from `model_id`
//! ([`crate::hub::display_name`]). A model keeps answering to its `model_id` (with or without
//! `ms://` / `hf://`) and to that derived name, so clients and checkpoints that used them keep
//! working.

use super::locate::KeyPath;
use super::normalize::derive_model_id;
use super::schema::{Application, ImportPath, ServerConfig};

/// The route segments that introduce a served name, by kind. An identity application stands
/// in for any kind (the platform tests turn models and samplers into one), so it takes both.
fn markers(kind: ImportPath) -> &'static [&'static str] {
    match kind {
        ImportPath::Model => &["model", "models"],
        ImportPath::Sampler => &["sampler", "samplers"],
        ImportPath::Identity => &["model", "models", "sampler", "samplers"],
        ImportPath::Server | ImportPath::Processor => &[],
    }
}

/// The name `route_prefix` gives an application of `kind`: everything after the first
/// `/model/` or `/models/` segment (`/sampler/` or `/samplers/` for samplers), empty segments
/// and a trailing `/` ignored. `None` when the route has no such segment or nothing after it.
pub fn route_name(kind: ImportPath, route_prefix: &str) -> Option<String> {
    let segs: Vec<&str> = route_prefix.split('/').filter(|s| !s.is_empty()).collect();
    let at = segs.iter().position(|s| markers(kind).contains(s))?;
    let tail = &segs[at + 1..];
    (!tail.is_empty()).then(|| tail.join("/"))
}

/// The public name of an application of `kind` at `route_prefix` loading `model_id`: its
/// [`route_name`], else the name derived from `model_id` (the behaviour before route names).
pub fn served_name(kind: ImportPath, route_prefix: &str, model_id: &str) -> String {
    route_name(kind, route_prefix).unwrap_or_else(|| crate::hub::display_name(model_id))
}

/// Whether a client's `name` designates the model served as `public` from `model_id`: the
/// public name, the `model_id` itself or without its `ms://` / `hf://` scheme, or the name
/// derived from `model_id` (what older clients and saved checkpoints may still carry).
pub fn designates(name: &str, public: &str, model_id: &str) -> bool {
    if name.trim().is_empty() {
        return false;
    }
    let strip = |s: &str| {
        let s = s.trim();
        s.strip_prefix("ms://").or_else(|| s.strip_prefix("hf://")).unwrap_or(s).to_string()
    };
    name == public
        || name == model_id
        || strip(name) == strip(model_id)
        || (!model_id.is_empty() && name == crate::hub::display_name(model_id))
}

impl Application {
    /// `args.model_id`, or the one its route implies when left out (as normalisation fills it).
    fn effective_model_id(&self) -> Option<String> {
        self.args.model_id.clone().or_else(|| derive_model_id(&self.route_prefix))
    }

    /// The public name of a model, sampler (or identity) application; `None` for other kinds
    /// and for one with neither a `model_id` nor a route that implies it.
    pub fn served_name(&self) -> Option<String> {
        if markers(self.import_path).is_empty() {
            return None;
        }
        let id = self.effective_model_id()?;
        Some(served_name(self.import_path, &self.route_prefix, &id))
    }

    /// Whether this application serves the model a client calls `name`.
    pub fn serves(&self, name: &str) -> bool {
        match (self.served_name(), self.effective_model_id()) {
            (Some(public), Some(id)) => designates(name, &public, &id),
            _ => false,
        }
    }
}

/// One problem per `supported_models` entry of a server application that no model, sampler or
/// identity application serves: the server would advertise a model every request for which
/// fails.
pub(crate) fn check_supported(cfg: &ServerConfig, out: &mut Vec<(KeyPath, String)>) {
    // A model and its sampler usually share a name: list it once.
    let mut served: Vec<String> = Vec::new();
    for name in cfg.applications.iter().filter_map(Application::served_name) {
        if !served.contains(&name) {
            served.push(name);
        }
    }
    for (i, app) in cfg.applications.iter().enumerate() {
        let at = KeyPath::root().key("applications").index(i).key("args").key("supported_models");
        for (j, m) in app.args.supported_models.iter().enumerate() {
            let name = m.name();
            if name.trim().is_empty() || cfg.applications.iter().any(|a| a.serves(name)) {
                continue;
            }
            let listed = if served.is_empty() {
                "none is configured".to_string()
            } else {
                format!("served: {}", served.join(", "))
            };
            out.push((
                at.index(j),
                format!(
                    "\"{name}\" is not served by any model or sampler application ({listed}); \
                     a model is named by its route_prefix after /model/ (or its model_id)"
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_names_by_kind() {
        let m = ImportPath::Model;
        let s = ImportPath::Sampler;
        assert_eq!(
            route_name(m, "/api/v1/model/acme/llama-tiny").as_deref(),
            Some("acme/llama-tiny")
        );
        assert_eq!(
            route_name(m, "/models/Qwen/Qwen2.5-7B-Instruct").as_deref(),
            Some("Qwen/Qwen2.5-7B-Instruct")
        );
        assert_eq!(route_name(m, "/api/v1/model/qwen3-tiny").as_deref(), Some("qwen3-tiny"));
        assert_eq!(
            route_name(s, "/api/v1/sampler/acme/llama-tiny").as_deref(),
            Some("acme/llama-tiny")
        );
        assert_eq!(route_name(s, "/samplers/qwen3-tiny").as_deref(), Some("qwen3-tiny"));
        // A model's marker does not name a sampler, nor the other way round.
        assert_eq!(route_name(s, "/api/v1/model/acme/x"), None);
        assert_eq!(route_name(m, "/samplers/acme/x"), None);
        // The first marker wins, so a name may itself contain `model`.
        assert_eq!(route_name(m, "/model/org/model").as_deref(), Some("org/model"));
    }

    #[test]
    fn route_without_a_tail_has_no_name() {
        let m = ImportPath::Model;
        for r in ["/", "/api/v1", "/model", "/api/v1/model/", "/processors", ""] {
            assert_eq!(route_name(m, r), None, "{r}");
        }
        assert_eq!(route_name(ImportPath::Server, "/api/v1/model/x"), None);
        assert_eq!(route_name(ImportPath::Processor, "/models/x"), None);
    }

    #[test]
    fn trailing_slash_and_empty_segments_are_ignored() {
        let m = ImportPath::Model;
        assert_eq!(
            route_name(m, "/api/v1/model/acme/llama-tiny/").as_deref(),
            Some("acme/llama-tiny")
        );
        assert_eq!(route_name(m, "//models//acme/x").as_deref(), Some("acme/x"));
    }

    #[test]
    fn served_name_falls_back_to_the_model_id() {
        let m = ImportPath::Model;
        assert_eq!(
            served_name(m, "/api/v1/model/acme/llama-tiny", "/data/ckpt/model"),
            "acme/llama-tiny"
        );
        assert_eq!(served_name(m, "/api/v1", "ms://Qwen/Qwen3-0.6B"), "Qwen/Qwen3-0.6B");
        assert_eq!(served_name(m, "/x", "generate://qwen3-tiny"), "qwen3-tiny");
        assert_eq!(served_name(m, "/x", "/no/such/dir/llama"), "llama");
    }

    #[test]
    fn unserved_entry_lists_each_served_name_once() {
        let text = "applications:
  - {name: server, route_prefix: /api/v1, import_path: server, args: {supported_models: [acme/x]}}
  - {name: m, route_prefix: /api/v1/model/acme/y, import_path: model, args: {model_id: /d/model}}
  - {name: s, route_prefix: /api/v1/sampler/acme/y, import_path: sampler, args: {model_id: /d/model}}
";
        let cfg: ServerConfig = serde_norway::from_str(text).expect("parses");
        let mut out = Vec::new();
        check_supported(&cfg, &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].0.to_string(), "applications[0].args.supported_models[0]");
        assert!(out[0].1.contains("(served: acme/y);"), "{}", out[0].1);
    }

    #[test]
    fn designates_public_name_and_model_id() {
        let (public, id) = ("acme/llama-tiny", "/no/such/ckpt/model");
        assert!(designates("acme/llama-tiny", public, id));
        assert!(designates("/no/such/ckpt/model", public, id));
        assert!(designates("model", public, id), "the name derived from the directory");
        assert!(!designates("acme/other", public, id));
        let (public, id) = ("Qwen/Qwen3-4B", "ms://Qwen/Qwen3-4B");
        for n in ["Qwen/Qwen3-4B", "ms://Qwen/Qwen3-4B", "hf://Qwen/Qwen3-4B"] {
            assert!(designates(n, public, id), "{n}");
        }
        assert!(!designates("", "x", ""));
    }
}
