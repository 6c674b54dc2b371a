//! Semantic checks that the typed schema cannot express: per-kind `args` keys, cross-field
//! rules, value ranges, uniqueness. Every problem is collected with its key path.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashSet};

use super::locate::KeyPath;
use super::normalize::derive_model_id;
use super::schema::*;

/// Largest `server_config.restart_wait_s`: a call waiting for a restarting application holds
/// its future (and the key's pending-work quota) that long.
pub const MAX_RESTART_WAIT_S: f64 = 3600.0;
/// Largest model `batch_window_ms`: queued jobs wait up to this long for companions, so a
/// larger value would only add latency.
pub const MAX_BATCH_WINDOW_MS: f64 = 1000.0;

type Issues = Vec<(KeyPath, String)>;

/// Every semantic problem of a parsed configuration.
pub(crate) fn check(cfg: &ServerConfig) -> Issues {
    let mut out = Issues::new();
    let root = KeyPath::root();

    let http = root.key("http_options");
    if cfg.http_options.host.trim().is_empty() {
        out.push((http.key("host"), "must not be empty".to_string()));
    }
    if cfg.telemetry.export_interval_ms == 0 {
        out.push((root.key("telemetry").key("export_interval_ms"), "must be at least 1".into()));
    }
    check_persistence(&cfg.persistence, &root.key("persistence"), &mut out);
    if let Some(q) = &cfg.task_queue {
        check_queue(q, &root.key("task_queue"), &mut out);
    }
    if let Some(t) = &cfg.timings {
        let at = root.key("timings");
        for (k, v) in [
            ("health_period_s", t.health_period_s),
            ("health_timeout_s", t.health_timeout_s),
            ("heartbeat_s", t.heartbeat_s),
            ("node_timeout_s", t.node_timeout_s),
            ("gpu_stats_s", t.gpu_stats_s),
        ] {
            positive(v, &at.key(k), &mut out);
        }
        for (k, v) in
            [("stop_grace_s", t.stop_grace_s), ("register_deadline_s", t.register_deadline_s)]
        {
            if v.is_some_and(|s| !s.is_finite() || s < 0.0) {
                out.push((at.key(k), "must be a number of seconds >= 0".into()));
            }
        }
    }

    let apps = root.key("applications");
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    let mut routes: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, app) in cfg.applications.iter().enumerate() {
        let at = apps.index(i);
        if app.name.trim().is_empty() {
            out.push((at.key("name"), "must not be empty".into()));
        } else if let Some(m) = first_use(&mut names, "application name", &app.name, i) {
            out.push((at.key("name"), m));
        }
        check_route(app, &at, &mut out);
        if let Some(m) = first_use(&mut routes, "route_prefix", &app.route_prefix, i) {
            out.push((at.key("route_prefix"), m));
        }
        check_args(app, &at, &mut out);
        for (j, d) in app.deployments.iter().enumerate() {
            check_deployment(d, &at.key("deployments").index(j), &mut out);
        }
    }
    super::naming::check_supported(cfg, &mut out);
    out
}

/// Records that applications[`i`] uses `value`; when an earlier one did, the message that says
/// so (and `seen` keeps the first).
fn first_use<'a>(
    seen: &mut BTreeMap<&'a str, usize>,
    what: &str,
    value: &'a str,
    i: usize,
) -> Option<String> {
    match seen.entry(value) {
        Entry::Occupied(first) => Some(format!(
            "duplicate {what} \"{value}\" (also used by applications[{}])",
            first.get()
        )),
        Entry::Vacant(slot) => {
            slot.insert(i);
            None
        }
    }
}

fn check_persistence(p: &Persistence, at: &KeyPath, out: &mut Issues) {
    let blank = |s: &Option<String>| s.as_deref().is_none_or(|v| v.trim().is_empty());
    match p.mode {
        PersistenceMode::File if blank(&p.file_path) => {
            out.push((at.key("mode"), "\"file\" requires file_path to be set".into()));
        }
        PersistenceMode::Redis if blank(&p.redis_url) => {
            out.push((at.key("mode"), "\"redis\" requires redis_url to be set".into()));
        }
        _ => {}
    }
    if p.mode != PersistenceMode::File && p.file_path.is_some() {
        out.push((
            at.key("file_path"),
            "only used with mode: file (set mode: file or remove it)".into(),
        ));
    }
    if p.mode != PersistenceMode::Redis && p.redis_url.is_some() {
        out.push((
            at.key("redis_url"),
            "only used with mode: redis (set mode: redis or remove it)".into(),
        ));
    }
}

fn check_route(app: &Application, at: &KeyPath, out: &mut Issues) {
    let r = &app.route_prefix;
    let at = at.key("route_prefix");
    if !r.starts_with('/') {
        out.push((at, format!("must start with '/', got \"{r}\"")));
    } else if r.len() > 1 && r.ends_with('/') {
        out.push((at, format!("must not end with '/', got \"{r}\"")));
    } else if r.chars().any(char::is_whitespace) {
        out.push((at, format!("must not contain spaces, got \"{r}\"")));
    }
}

fn check_args(app: &Application, at: &KeyPath, out: &mut Issues) {
    let kind = app.import_path;
    let args = &app.args;
    let args_at = at.key("args");
    let allowed = AppArgs::keys_allowed_for(kind);
    for key in args.present_keys() {
        if !allowed.contains(&key) {
            out.push((
                args_at.key(key),
                format!(
                    "not allowed for a {} application (allowed keys: {})",
                    kind.as_str(),
                    allowed.join(", ")
                ),
            ));
        }
    }

    if kind == ImportPath::Model
        && let (Some(backend), Some(mega)) = (args.backend, args.use_megatron)
        && mega != (backend == Backend::Megatron)
    {
        out.push((
            args_at.key("use_megatron"),
            format!(
                "use_megatron: {mega} contradicts backend: {} (give only one of them)",
                serde_name(backend)
            ),
        ));
    }

    if matches!(kind, ImportPath::Model | ImportPath::Sampler) {
        match &args.model_id {
            Some(id) if id.trim().is_empty() => {
                out.push((args_at.key("model_id"), "must not be empty".into()));
            }
            Some(_) => {}
            None if derive_model_id(&app.route_prefix).is_some() => {}
            None => out.push((
                args_at.clone(),
                format!(
                    "model_id is required for a {} application (it may only be left out when \
                     route_prefix ends in /model/<Org>/<Name> or /sampler/<Org>/<Name>)",
                    kind.as_str()
                ),
            )),
        }
        if args.device_group.is_none() {
            out.push((
                args_at.clone(),
                format!("device_group is required for a {} application", kind.as_str()),
            ));
        }
    }

    positive_u32(args.nproc_per_node, &args_at.key("nproc_per_node"), out);
    positive_u32(args.ncpu_proc_per_node, &args_at.key("ncpu_proc_per_node"), out);
    positive_u32(args.max_loras, &args_at.key("max_loras"), out);
    if args.max_length == Some(0) {
        out.push((args_at.key("max_length"), "must be at least 1".into()));
    }
    if let Some(w) = args.batch_window_ms
        && !(w.is_finite() && (0.0..=MAX_BATCH_WINDOW_MS).contains(&w))
    {
        out.push((
            args_at.key("batch_window_ms"),
            format!(
                "must be a number of milliseconds from 0 (batching off) to {MAX_BATCH_WINDOW_MS}, got {w}"
            ),
        ));
    }
    if let Some(group) = &args.device_group {
        check_group(kind, group, &args_at.key("device_group"), out);
    }
    if let Some(mesh) = &args.device_mesh {
        check_mesh(kind, mesh, args.device_group.as_ref(), &args_at, out);
    }
    if let Some(q) = &args.queue_config {
        check_queue(q, &args_at.key("queue_config"), out);
    }
    if let Some(a) = &args.adapter_config {
        check_adapter(a, &args_at.key("adapter_config"), out);
    }
    if let Some(st) = &args.server_config {
        check_server_state(st, &args_at.key("server_config"), out);
    }
    for (j, m) in args.supported_models.iter().enumerate() {
        if m.name().trim().is_empty() {
            out.push((args_at.key("supported_models").index(j), "must not be empty".into()));
        }
    }
    if let Some(keys) = &args.api_keys {
        for (j, k) in keys.iter().enumerate() {
            if k.trim().is_empty() {
                out.push((args_at.key("api_keys").index(j), "must not be empty".into()));
            }
        }
    }
    if let Some(e) = &args.engine_args {
        let e_at = args_at.key("engine_args");
        if let Some(u) = e.gpu_memory_utilization
            && !(u > 0.0 && u <= 1.0)
        {
            out.push((
                e_at.key("gpu_memory_utilization"),
                format!("must be greater than 0 and at most 1, got {u}"),
            ));
        }
        if e.max_model_len == Some(0) {
            out.push((e_at.key("max_model_len"), "must be at least 1".into()));
        }
        positive_u32(e.max_num_seqs, &e_at.key("max_num_seqs"), out);
        positive_u32(e.max_loras, &e_at.key("max_loras"), out);
        positive_u32(e.max_lora_rank, &e_at.key("max_lora_rank"), out);
        positive_u32(e.tensor_parallel_size, &e_at.key("tensor_parallel_size"), out);
        // engine_args is only allowed on a sampler (reported above otherwise), so checking the
        // kind here keeps a misplaced engine_args from being reported twice.
        if kind == ImportPath::Sampler
            && let Some(t) = e.tensor_parallel_size
            && t > 1
        {
            out.push((
                e_at.key("tensor_parallel_size"),
                not_supported_yet("tensor_parallel_size", t),
            ));
        }
    }
}

fn check_group(kind: ImportPath, g: &DeviceGroup, at: &KeyPath, out: &mut Issues) {
    if let Ranks::List(list) = &g.ranks {
        let mut seen = HashSet::new();
        if let Some(dup) = list.iter().find(|r| !seen.insert(**r)) {
            out.push((at.key("ranks"), format!("rank {dup} is listed twice")));
        }
    }
    if g.gpus_per_worker == 0 {
        out.push((at.key("gpus_per_worker"), "must be at least 1".into()));
    }
    match g.device_type {
        DeviceType::Cuda if kind == ImportPath::Processor => out.push((
            at.key("device_type"),
            "the processor runs on CPU: device_type must be CPU".into(),
        )),
        DeviceType::Cuda if g.ranks.count() == 0 => out.push((
            at.key("ranks"),
            "a cuda device_group needs at least one rank (the number of GPUs to use)".into(),
        )),
        DeviceType::Cuda
            if g.gpus_per_worker > 0 && !g.ranks.count().is_multiple_of(g.gpus_per_worker) =>
        {
            out.push((
                at.key("gpus_per_worker"),
                format!(
                    "ranks ({}) must be a multiple of gpus_per_worker ({})",
                    g.ranks.count(),
                    g.gpus_per_worker
                ),
            ));
        }
        _ => {}
    }
}

fn check_mesh(
    kind: ImportPath,
    m: &DeviceMesh,
    group: Option<&DeviceGroup>,
    args_at: &KeyPath,
    out: &mut Issues,
) {
    let at = args_at.key("device_mesh");
    let sizes = [
        ("dp_size", Some(m.dp_size)),
        ("fsdp_size", m.fsdp_size),
        ("tp_size", m.tp_size),
        ("pp_size", m.pp_size),
        ("cp_size", m.cp_size),
        ("ulysses_size", m.ulysses_size),
        ("ep_size", m.ep_size),
        ("etp_size", m.etp_size),
        ("ep_fsdp_size", m.ep_fsdp_size),
        ("vpp_size", m.vpp_size),
        ("world_size", m.world_size),
    ];
    let mut zero = false;
    for (key, v) in sizes {
        if v == Some(0) {
            zero = true;
            out.push((at.key(key), "must be at least 1".into()));
        }
    }
    if zero {
        return;
    }
    let product = m.mesh_world_size();
    let formula = mesh_formula(m);
    if let Some(w) = m.world_size
        && u64::from(w) != product
    {
        out.push((
            at.key("world_size"),
            format!("world_size {w} does not match {formula} = {product}"),
        ));
    }
    // The engine behind model and sampler applications runs data parallel only (one worker
    // per card, or per CPU worker process), so any other dimension above 1 cannot be served.
    let engine_app = matches!(kind, ImportPath::Model | ImportPath::Sampler);
    if engine_app {
        for (key, v) in &sizes[1..sizes.len() - 1] {
            if let Some(v) = *v
                && v > 1
            {
                out.push((at.key(key), not_supported_yet(key, v)));
            }
        }
    }
    let Some(g) = group else { return };
    if let Some(t) = m.device_type
        && t != g.device_type
    {
        out.push((
            at.key("device_type"),
            format!(
                "device_mesh.device_type {} differs from device_group.device_type {}",
                serde_name(t),
                serde_name(g.device_type)
            ),
        ));
    }
    let ranks = g.ranks.count();
    // On CPU, ranks counts worker processes and dp_size is how many of them run data parallel;
    // only a cuda group ties the mesh to a number of cards.
    if g.device_type != DeviceType::Cuda || ranks == 0 {
        return;
    }
    if engine_app {
        // With every other dimension at 1 (or reported above) the world size is dp_size, so
        // this one check replaces the generic world-size one and nothing is reported twice.
        if m.dp_size != ranks {
            out.push((
                at.key("dp_size"),
                format!(
                    "dp_size {} does not match device_group.ranks = {ranks}: the engine runs one \
                     data-parallel worker per GPU, so dp_size must equal the number of GPUs \
                     (set dp_size: {ranks}, or ranks: {})",
                    m.dp_size, m.dp_size
                ),
            ));
        }
    } else if product != u64::from(ranks) {
        out.push((
            at,
            format!(
                "world size {formula} = {product} does not match device_group.ranks = {ranks} \
                 (each rank is one GPU)"
            ),
        ));
    }
}

/// The message for a parallel dimension the engine does not implement.
fn not_supported_yet(key: &str, v: u32) -> String {
    format!(
        "{key} {v} is not supported yet: only data parallel (dp_size) is implemented \
         (set {key} to 1 or remove it)"
    )
}

/// "dp_size 2 × tp_size 2" over the dimensions that are set.
fn mesh_formula(m: &DeviceMesh) -> String {
    let mut parts = vec![format!("dp_size {}", m.dp_size)];
    for (k, v) in [
        ("fsdp_size", m.fsdp_size),
        ("pp_size", m.pp_size),
        ("cp_size", m.cp_size),
        ("tp_size", m.tp_size),
    ] {
        if let Some(v) = v {
            parts.push(format!("{k} {v}"));
        }
    }
    parts.join(" × ")
}

fn check_adapter(a: &AdapterConfig, at: &KeyPath, out: &mut Issues) {
    positive(a.adapter_timeout, &at.key("adapter_timeout"), out);
    positive(a.adapter_max_lifetime, &at.key("adapter_max_lifetime"), out);
}

fn check_server_state(s: &ServerStateArgs, at: &KeyPath, out: &mut Issues) {
    positive(s.expiration_timeout, &at.key("expiration_timeout"), out);
    positive(s.cleanup_interval, &at.key("cleanup_interval"), out);
    positive(s.metrics_update_interval, &at.key("metrics_update_interval"), out);
    positive_u32(s.per_token_model_limit, &at.key("per_token_model_limit"), out);
    if s.max_tokens_per_request == Some(0) {
        out.push((at.key("max_tokens_per_request"), "must be at least 1".into()));
    }
    positive_u32(s.max_sampling_requests_per_key, &at.key("max_sampling_requests_per_key"), out);
    positive(s.restart_wait_s, &at.key("restart_wait_s"), out);
    // Bounded: a request waits this long holding its client's connection and a queue slot.
    if let Some(w) = s.restart_wait_s
        && w > MAX_RESTART_WAIT_S
    {
        out.push((
            at.key("restart_wait_s"),
            format!("must be at most {MAX_RESTART_WAIT_S} seconds, got {w}"),
        ));
    }
}

fn check_queue(q: &QueueConfig, at: &KeyPath, out: &mut Issues) {
    non_negative(q.rps_limit, &at.key("rps_limit"), out);
    non_negative(q.tps_limit, &at.key("tps_limit"), out);
    positive(Some(q.window_seconds), &at.key("window_seconds"), out);
    non_negative(q.queue_timeout, &at.key("queue_timeout"), out);
    non_negative(q.execution_timeout, &at.key("execution_timeout"), out);
    positive(Some(q.token_cleanup_multiplier), &at.key("token_cleanup_multiplier"), out);
    positive(Some(q.token_cleanup_interval), &at.key("token_cleanup_interval"), out);
    if q.max_input_tokens == 0 {
        out.push((at.key("max_input_tokens"), "must be at least 1".into()));
    }
}

fn check_deployment(d: &Deployment, at: &KeyPath, out: &mut Issues) {
    positive_u32(d.num_replicas, &at.key("num_replicas"), out);
    positive_u32(d.max_ongoing_requests, &at.key("max_ongoing_requests"), out);
    if let Some(a) = &d.autoscaling_config {
        check_autoscaling(a, &at.key("autoscaling_config"), out);
    }
    let o = &d.ray_actor_options;
    let o_at = at.key("ray_actor_options");
    non_negative(o.num_cpus, &o_at.key("num_cpus"), out);
    non_negative(o.num_gpus, &o_at.key("num_gpus"), out);
    if let Some(m) = o.memory {
        non_negative(m, &o_at.key("memory"), out);
    }
    if let Some(res) = &o.resources {
        for (name, v) in res {
            non_negative(*v, &o_at.key("resources").key(name), out);
        }
    }
    let env_at = o_at.key("runtime_env").key("env_vars");
    for name in o.runtime_env.env_vars.keys() {
        if !valid_env_name(name) {
            out.push((
                env_at.key(name),
                format!(
                    "\"{name}\" is not a valid environment variable name (letters, digits and \
                     '_', not starting with a digit)"
                ),
            ));
        }
    }
}

fn check_autoscaling(a: &AutoscalingConfig, at: &KeyPath, out: &mut Issues) {
    positive_u32(a.max_replicas, &at.key("max_replicas"), out);
    positive(a.target_ongoing_requests, &at.key("target_ongoing_requests"), out);
    if let (Some(min), Some(max)) = (a.min_replicas, a.max_replicas)
        && min > max
    {
        out.push((
            at.key("min_replicas"),
            format!("min_replicas ({min}) is greater than max_replicas ({max})"),
        ));
    }
}

fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn non_negative(v: f64, at: &KeyPath, out: &mut Issues) {
    if !v.is_finite() {
        out.push((at.clone(), format!("expected a finite number, got {v}")));
    } else if v < 0.0 {
        out.push((at.clone(), format!("must not be negative, got {v}")));
    }
}

fn positive(v: Option<f64>, at: &KeyPath, out: &mut Issues) {
    let Some(v) = v else { return };
    if !v.is_finite() {
        out.push((at.clone(), format!("expected a finite number, got {v}")));
    } else if v <= 0.0 {
        out.push((at.clone(), format!("must be greater than 0, got {v}")));
    }
}

fn positive_u32(v: Option<u32>, at: &KeyPath, out: &mut Issues) {
    if v == Some(0) {
        out.push((at.clone(), "must be at least 1".into()));
    }
}

/// The YAML spelling of a unit enum value.
fn serde_name<T: serde::Serialize>(v: T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::from("?"),
    }
}

#[cfg(test)]
mod tests {
    use super::valid_env_name;

    #[test]
    fn env_names() {
        assert!(valid_env_name("TWINKLE_FAIL_FAST"));
        assert!(valid_env_name("_x1"));
        assert!(!valid_env_name("1X"));
        assert!(!valid_env_name("A-B"));
        assert!(!valid_env_name(""));
    }
}
