//! Bad configurations are rejected with the key path, a readable message and the right line.
//!
//! Each row edits numbered lines of one valid base file, so every expected line number can be
//! checked by counting the lines of `BASE` below.

use twinkle::config::{self, ConfigError};

/// A valid file; line numbers on the right are what the table refers to.
const BASE: &str = "\
server_type: twinkle
http_options:
  host: 0.0.0.0
  port: 8000
persistence:
  mode: memory
applications:
  - name: server
    route_prefix: /api/v1
    import_path: server
    args:
      server_config:
        per_token_model_limit: 30
  - name: model
    route_prefix: /api/v1/model/Qwen/Qwen2.5-0.5B
    import_path: model
    args:
      model_id: ms://Qwen/Qwen2.5-0.5B
      device_group:
        name: model
        ranks: 2
        device_type: cuda
      device_mesh:
        device_type: cuda
        dp_size: 2
    deployments:
      - name: ModelManagement
        ray_actor_options:
          num_cpus: 0.1
          runtime_env:
            env_vars:
              TWINKLE_FAIL_FAST: \"0\"
";
//  1 server_type        9 route_prefix      17 args             25 dp_size
//  2 http_options      10 import_path       18 model_id         26 deployments
//  3 host              11 args              19 device_group     27 - name
//  4 port              12 server_config     20 name             28 ray_actor_options
//  5 persistence       13 per_token_…       21 ranks            29 num_cpus
//  6 mode              14 - name: model     22 device_type      30 runtime_env
//  7 applications      15 route_prefix      23 device_mesh      31 env_vars
//  8 - name: server    16 import_path       24 device_type      32 TWINKLE_FAIL_FAST

/// BASE with the given 1-based lines replaced (a replacement may span several lines; only
/// lines after it shift).
fn edit(edits: &[(usize, &str)]) -> String {
    let mut lines: Vec<String> = BASE.lines().map(str::to_string).collect();
    for (n, text) in edits {
        lines[n - 1] = text.to_string();
    }
    lines.join("\n") + "\n"
}

fn error_of(text: &str) -> String {
    match config::load_str(text) {
        Ok(_) => panic!("accepted a bad config:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn base_is_valid() {
    let c = config::load_str(BASE).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.applications.len(), 2);
}

/// (what is wrong, line edits of BASE, expected text of the error).
type Row = (&'static str, &'static [(usize, &'static str)], &'static str);

#[test]
fn table_of_bad_configs() {
    #[rustfmt::skip]
    let table: &[Row] = &[
        ("unknown top-level key",
         &[(1, "sever_type: twinkle")],
         "sever_type: unknown key (allowed keys: server_type, ray_namespace, proxy_location, http_options, telemetry, persistence, task_queue, applications, timings) (line 1)"),
        ("unknown nested key",
         &[(20, "        nmae: model")],
         "applications[1].args.device_group.nmae: unknown key (allowed keys: name, ranks, device_type, gpus_per_worker, visible_devices) (line 20)"),
        ("unknown args key",
         &[(18, "      modle_id: x")],
         "applications[1].args.modle_id: unknown key (allowed keys: server_config, "),
        ("wrong type ranks: two",
         &[(21, "        ranks: two")],
         "applications[1].args.device_group.ranks: expected an integer, got \"two\" (line 21)"),
        ("negative ranks",
         &[(21, "        ranks: -2")],
         "applications[1].args.device_group.ranks: expected a non-negative integer, got -2 (line 21)"),
        ("missing name",
         &[(8, "  - import_path: server"), (10, "    # name left out")],
         "applications[0]: missing required key \"name\" (line 8)"),
        ("missing import_path",
         &[(16, "    # import_path left out")],
         "applications[1]: missing required key \"import_path\" (line 14)"),
        ("bad import_path",
         &[(16, "    import_path: modle")],
         "applications[1].import_path: unknown value \"modle\", expected one of: server, model, sampler, processor, identity (line 16)"),
        ("bad device_type",
         &[(22, "        device_type: tpu")],
         "applications[1].args.device_group.device_type: expected one of cuda, gpu, CPU, got \"tpu\" (line 22)"),
        ("negative num_cpus",
         &[(29, "          num_cpus: -1")],
         "applications[1].deployments[0].ray_actor_options.num_cpus: must not be negative, got -1 (line 29)"),
        ("port 70000",
         &[(4, "  port: 70000")],
         "http_options.port: expected a port number between 1 and 65535, got 70000 (line 4)"),
        ("port 0",
         &[(4, "  port: 0")],
         "http_options.port: expected a port number between 1 and 65535, got 0 (line 4)"),
        ("port as text",
         &[(4, "  port: eighty")],
         "http_options.port: expected a port number between 1 and 65535, got \"eighty\" (line 4)"),
        ("duplicate application name",
         &[(14, "  - name: server")],
         "applications[1].name: duplicate application name \"server\" (also used by applications[0]) (line 14)"),
        ("duplicate route_prefix",
         &[(15, "    route_prefix: /api/v1")],
         "applications[1].route_prefix: duplicate route_prefix \"/api/v1\" (also used by applications[0]) (line 15)"),
        ("route_prefix without leading slash",
         &[(9, "    route_prefix: api/v1")],
         "applications[0].route_prefix: must start with '/', got \"api/v1\" (line 9)"),
        ("file persistence without file_path",
         &[(6, "  mode: file")],
         "persistence.mode: \"file\" requires file_path to be set (line 6)"),
        ("redis persistence without redis_url",
         &[(6, "  mode: redis")],
         "persistence.mode: \"redis\" requires redis_url to be set (line 6)"),
        ("file_path without file mode",
         &[(6, "  mode: memory\n  file_path: /tmp/x.db")],
         "persistence.file_path: only used with mode: file (set mode: file or remove it) (line 7)"),
        ("sampler_type on a model app",
         &[(18, "      sampler_type: vllm")],
         "applications[1].args.sampler_type: not allowed for a model application (allowed keys: backend, use_megatron, model_id, adapter_config, max_loras, max_length, batch_window_ms, queue_config, nproc_per_node, device_group, device_mesh) (line 18)"),
        ("batch_window_ms negative",
         &[(18, "      model_id: ms://Qwen/Qwen2.5-0.5B\n      batch_window_ms: -1")],
         "applications[1].args.batch_window_ms: must be a number of milliseconds from 0 (batching off) to 1000, got -1 (line 19)"),
        ("batch_window_ms too large",
         &[(18, "      model_id: ms://Qwen/Qwen2.5-0.5B\n      batch_window_ms: 5000")],
         "applications[1].args.batch_window_ms: must be a number of milliseconds from 0 (batching off) to 1000, got 5000 (line 19)"),
        ("batch_window_ms on a server app",
         &[(13, "        per_token_model_limit: 30\n      batch_window_ms: 2")],
         "applications[0].args.batch_window_ms: not allowed for a server application"),
        ("max_tokens_per_request zero",
         &[(13, "        max_tokens_per_request: 0")],
         "applications[0].args.server_config.max_tokens_per_request: must be at least 1 (line 13)"),
        ("max_tokens_per_request not a number",
         &[(13, "        max_tokens_per_request: lots")],
         "applications[0].args.server_config.max_tokens_per_request"),
        ("max_sampling_requests_per_key zero",
         &[(13, "        max_sampling_requests_per_key: 0")],
         "applications[0].args.server_config.max_sampling_requests_per_key: must be at least 1 (line 13)"),
        ("restart_wait_s zero",
         &[(13, "        restart_wait_s: 0")],
         "applications[0].args.server_config.restart_wait_s: must be greater than 0, got 0 (line 13)"),
        ("restart_wait_s over the bound",
         &[(13, "        restart_wait_s: 86400")],
         "applications[0].args.server_config.restart_wait_s: must be at most 3600 seconds, got 86400 (line 13)"),
        ("restart_wait_s not a number",
         &[(13, "        restart_wait_s: soon")],
         "applications[0].args.server_config.restart_wait_s"),
        ("timings: a zero period",
         &[(6, "  mode: memory\ntimings: {heartbeat_s: 0}")],
         "timings.heartbeat_s: must be greater than 0, got 0 (line 7)"),
        ("timings: a negative grace",
         &[(6, "  mode: memory\ntimings:\n  stop_grace_s: -1")],
         "timings.stop_grace_s: must be a number of seconds >= 0 (line 8)"),
        ("timings: an unknown knob",
         &[(6, "  mode: memory\ntimings: {tick_s: 1}")],
         "timings.tick_s: unknown key (allowed keys: stop_grace_s, register_deadline_s, health_period_s, health_timeout_s, heartbeat_s, node_timeout_s, gpu_stats_s) (line 7)"),
        ("server_config on a model app",
         &[(18, "      server_config: {per_token_model_limit: 3}")],
         "applications[1].args.server_config: not allowed for a model application"),
        ("device_group on a server app",
         &[(12, "      device_group: {ranks: 1, device_type: cuda}"), (13, "")],
         "applications[0].args.device_group: not allowed for a server application (allowed keys: server_config, supported_models, api_keys, api_keys_file) (line 12)"),
        ("model without model_id",
         &[(15, "    route_prefix: /train"), (18, "      # model_id left out")],
         "applications[1].args: model_id is required for a model application (it may only be left out when route_prefix ends in /model/<Org>/<Name> or /sampler/<Org>/<Name>) (line 17)"),
        ("model without device_group",
         &[(19, "      # no group"), (20, ""), (21, ""), (22, "")],
         "applications[1].args: device_group is required for a model application (line 17)"),
        ("dp_size differs from the number of cards",
         &[(25, "        dp_size: 4")],
         "applications[1].args.device_mesh.dp_size: dp_size 4 does not match device_group.ranks = 2: the engine runs one data-parallel worker per GPU, so dp_size must equal the number of GPUs (set dp_size: 2, or ranks: 4) (line 25)"),
        ("tp_size above 1 is one error, not also a world-size one",
         &[(25, "        dp_size: 2\n        tp_size: 2")],
         "applications[1].args.device_mesh.tp_size: tp_size 2 is not supported yet: only data parallel (dp_size) is implemented (set tp_size to 1 or remove it) (line 26)"),
        ("mesh size zero",
         &[(25, "        dp_size: 0")],
         "applications[1].args.device_mesh.dp_size: must be at least 1 (line 25)"),
        ("use_megatron contradicts backend",
         &[(18, "      use_megatron: true\n      backend: transformers")],
         "applications[1].args.use_megatron: use_megatron: true contradicts backend: transformers (give only one of them) (line 18)"),
        ("bad env var name",
         &[(32, "              1BAD: \"0\"")],
         "applications[1].deployments[0].ray_actor_options.runtime_env.env_vars.1BAD: \"1BAD\" is not a valid environment variable name (letters, digits and '_', not starting with a digit) (line 32)"),
        ("env var with a list value",
         &[(32, "              A: [1, 2]")],
         "applications[1].deployments[0].ray_actor_options.runtime_env.env_vars.A: expected a string, number or boolean, got a list (line 32)"),
        ("wrong type inside a flow mapping",
         &[(19, "      device_group: {name: model, ranks: two, device_type: cuda}"), (20, ""), (21, ""), (22, "")],
         "applications[1].args.device_group.ranks: expected an integer, got \"two\" (line 19)"),
        ("dp_size mismatch in a flow mapping",
         &[(23, ""), (24, "      device_mesh: {device_type: cuda,"), (25, "                    dp_size: 3}")],
         "applications[1].args.device_mesh.dp_size: dp_size 3 does not match device_group.ranks = 2: the engine runs one data-parallel worker per GPU, so dp_size must equal the number of GPUs (set dp_size: 2, or ranks: 3) (line 25)"),
        ("mesh without dp_size on two cards",
         &[(25, "        # dp_size left out")],
         "applications[1].args.device_mesh.dp_size: dp_size 1 does not match device_group.ranks = 2: the engine runs one data-parallel worker per GPU, so dp_size must equal the number of GPUs (set dp_size: 2, or ranks: 1) (line 23)"),
        ("pp_size above 1",
         &[(25, "        dp_size: 2\n        pp_size: 4")],
         "applications[1].args.device_mesh.pp_size: pp_size 4 is not supported yet: only data parallel (dp_size) is implemented (set pp_size to 1 or remove it) (line 26)"),
        ("ep_size above 1 (does not add ranks)",
         &[(25, "        dp_size: 2\n        ep_size: 2")],
         "applications[1].args.device_mesh.ep_size: ep_size 2 is not supported yet: only data parallel (dp_size) is implemented (set ep_size to 1 or remove it) (line 26)"),
        ("cp_size above 1",
         &[(25, "        dp_size: 2\n        cp_size: 2")],
         "applications[1].args.device_mesh.cp_size: cp_size 2 is not supported yet: only data parallel (dp_size) is implemented (set cp_size to 1 or remove it) (line 26)"),
        ("fsdp_size above 1",
         &[(25, "        dp_size: 2\n        fsdp_size: 2")],
         "applications[1].args.device_mesh.fsdp_size: fsdp_size 2 is not supported yet: only data parallel (dp_size) is implemented (set fsdp_size to 1 or remove it) (line 26)"),
        ("ulysses_size above 1",
         &[(25, "        dp_size: 2\n        ulysses_size: 2")],
         "applications[1].args.device_mesh.ulysses_size: ulysses_size 2 is not supported yet: only data parallel (dp_size) is implemented (set ulysses_size to 1 or remove it) (line 26)"),
        ("etp_size above 1",
         &[(25, "        dp_size: 2\n        etp_size: 2")],
         "applications[1].args.device_mesh.etp_size: etp_size 2 is not supported yet: only data parallel (dp_size) is implemented (set etp_size to 1 or remove it) (line 26)"),
        ("ep_fsdp_size above 1",
         &[(25, "        dp_size: 2\n        ep_fsdp_size: 2")],
         "applications[1].args.device_mesh.ep_fsdp_size: ep_fsdp_size 2 is not supported yet: only data parallel (dp_size) is implemented (set ep_fsdp_size to 1 or remove it) (line 26)"),
        ("vpp_size above 1",
         &[(25, "        dp_size: 2\n        vpp_size: 2")],
         "applications[1].args.device_mesh.vpp_size: vpp_size 2 is not supported yet: only data parallel (dp_size) is implemented (set vpp_size to 1 or remove it) (line 26)"),
        ("tp_size above 1 on a CPU model",
         &[(22, "        device_type: CPU"), (24, "        device_type: CPU"), (25, "        dp_size: 2\n        tp_size: 2")],
         "applications[1].args.device_mesh.tp_size: tp_size 2 is not supported yet: only data parallel (dp_size) is implemented (set tp_size to 1 or remove it) (line 26)"),
        ("sampler with tensor_parallel_size 2",
         &[(15, "    route_prefix: /api/v1/sampler/Qwen/Qwen2.5-0.5B"), (16, "    import_path: sampler"),
           (18, "      model_id: ms://Qwen/Qwen2.5-0.5B\n      engine_args: {max_model_len: 4096, tensor_parallel_size: 2}")],
         "applications[1].args.engine_args.tensor_parallel_size: tensor_parallel_size 2 is not supported yet: only data parallel (dp_size) is implemented (set tensor_parallel_size to 1 or remove it) (line 19)"),
        ("sampler with tp_size 2",
         &[(15, "    route_prefix: /api/v1/sampler/Qwen/Qwen2.5-0.5B"), (16, "    import_path: sampler"),
           (25, "        dp_size: 2\n        tp_size: 2")],
         "applications[1].args.device_mesh.tp_size: tp_size 2 is not supported yet: only data parallel (dp_size) is implemented (set tp_size to 1 or remove it) (line 26)"),
        ("env var given twice",
         &[(32, "              TWINKLE_FAIL_FAST: \"0\"\n              TWINKLE_FAIL_FAST: \"1\"")],
         "applications[1].deployments[0].ray_actor_options.runtime_env.env_vars: key \"TWINKLE_FAIL_FAST\" is given more than once (line 32)"),
        ("unknown server_type",
         &[(1, "server_type: tinkr")],
         "server_type: unknown value \"tinkr\", expected one of: twinkle, tinker (line 1)"),
        ("num_cpus as text",
         &[(29, "          num_cpus: lots")],
         "applications[1].deployments[0].ray_actor_options.num_cpus: expected a number, got \"lots\" (line 29)"),
        ("applications not a list",
         &[(7, "applications: none-here"), (8, ""), (9, ""), (10, ""), (11, ""), (12, ""), (13, ""),
           (14, ""), (15, ""), (16, ""), (17, ""), (18, ""), (19, ""), (20, ""), (21, ""), (22, ""),
           (23, ""), (24, ""), (25, ""), (26, ""), (27, ""), (28, ""), (29, ""), (30, ""), (31, ""), (32, "")],
         "applications: expected a list, got \"none-here\" (line 7)"),
        ("cuda processor",
         &[(16, "    import_path: processor"), (15, "    route_prefix: /api/v1/processor"), (18, "      ncpu_proc_per_node: 2")],
         "applications[1].args.device_group.device_type: the processor runs on CPU: device_type must be CPU (line 22)"),
        ("supported_models entry no application serves",
         &[(13, "        per_token_model_limit: 30\n      supported_models: [acme/llama-tiny]")],
         "applications[0].args.supported_models[0]: \"acme/llama-tiny\" is not served by any model or sampler application (served: Qwen/Qwen2.5-0.5B); a model is named by its route_prefix after /model/ (or its model_id) (line 14)"),
        ("second supported_models entry unserved",
         &[(13, "        per_token_model_limit: 30\n      supported_models:\n        - Qwen/Qwen2.5-0.5B\n        - {model_name: acme/other}")],
         "applications[0].args.supported_models[1]: \"acme/other\" is not served by any model or sampler application (served: Qwen/Qwen2.5-0.5B); a model is named by its route_prefix after /model/ (or its model_id) (line 16)"),
        ("supported_models named after a model's directory, not its route",
         &[(13, "        per_token_model_limit: 30\n      supported_models: [llama-tiny]"),
           (15, "    route_prefix: /api/v1/model/acme/llama-tiny"),
           (18, "      model_id: /data/ckpt/llama-tiny/model")],
         "applications[0].args.supported_models[0]: \"llama-tiny\" is not served by any model or sampler application (served: acme/llama-tiny); a model is named by its route_prefix after /model/ (or its model_id) (line 14)"),
    ];
    assert!(table.len() >= 12);
    let mut failures = Vec::new();
    for (what, edits, expected) in table {
        let got = error_of(&edit(edits));
        if !got.contains(expected) {
            failures.push(format!("{what}:\n  expected: {expected}\n  got:      {got}"));
        }
    }
    assert!(failures.is_empty(), "{} rows failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn batch_window_ms_from_zero_to_the_bound_loads() {
    for w in ["0", "2", "0.5", "1000"] {
        let text = edit(&[(
            18,
            &format!("      model_id: ms://Qwen/Qwen2.5-0.5B\n      batch_window_ms: {w}"),
        )]);
        let cfg = config::load_str(&text).unwrap_or_else(|e| panic!("{w}: {e}"));
        assert_eq!(cfg.applications[1].args.batch_window_ms, Some(w.parse().unwrap()));
    }
}

#[test]
fn every_semantic_problem_is_reported_in_file_order() {
    let text =
        edit(&[(29, "          num_cpus: -1"), (14, "  - name: server"), (6, "  mode: file")]);
    let err = config::load_str(&text).unwrap_err();
    let lines: Vec<Option<usize>> = err.problems().iter().map(|p| p.line).collect();
    assert_eq!(lines, [Some(6), Some(14), Some(29)], "{err}");
    assert_eq!(err.to_string().lines().count(), 3);
}

#[test]
fn yaml_syntax_errors_name_the_line() {
    let err = config::load_str(&edit(&[(3, "  host: [0.0.0.0")])).unwrap_err();
    match &err {
        ConfigError::Syntax { line, .. } => assert!(line.is_some(), "{err}"),
        other => panic!("expected a syntax error, got {other}"),
    }
    assert!(err.to_string().starts_with("invalid YAML: "), "{err}");
}

#[test]
fn empty_file_is_rejected() {
    assert!(error_of("# nothing\n").contains("the configuration is empty"));
}

/// Exactly one error per problem: a dp/ranks mismatch next to an unsupported dimension is two
/// problems, and the generic world-size message is never added on top.
#[test]
fn unsupported_mesh_reports_each_problem_once() {
    let text = edit(&[
        (21, "        ranks: 4"),
        (25, "        dp_size: 1\n        tp_size: 2\n        pp_size: 2"),
    ]);
    let err = config::load_str(&text).unwrap_err();
    let got: Vec<String> = err.problems().iter().map(ToString::to_string).collect();
    assert_eq!(got.len(), 3, "{err}");
    assert!(got[0].starts_with("applications[1].args.device_mesh.dp_size: dp_size 1 does not match device_group.ranks = 4"), "{err}");
    assert!(
        got[1].starts_with(
            "applications[1].args.device_mesh.tp_size: tp_size 2 is not supported yet"
        ),
        "{err}"
    );
    assert!(
        got[2].starts_with(
            "applications[1].args.device_mesh.pp_size: pp_size 2 is not supported yet"
        ),
        "{err}"
    );
    assert!(!err.to_string().contains("world size"), "{err}");
}

#[test]
fn parallel_dimensions_of_one_load() {
    let text = edit(&[(
        25,
        "        dp_size: 2\n        tp_size: 1\n        pp_size: 1\n        ep_size: 1\n        world_size: 2",
    )]);
    let c = config::load_str(&text).unwrap_or_else(|e| panic!("{e}"));
    let mesh = c.applications[1].args.device_mesh.as_ref().unwrap();
    assert_eq!((mesh.dp_size, mesh.tp_size, mesh.pp_size), (2, Some(1), Some(1)));
}

/// On CPU, ranks counts worker processes and dp_size is free: no card check.
#[test]
fn cpu_dp_size_is_not_tied_to_ranks() {
    let text = edit(&[
        (22, "        device_type: CPU"),
        (24, "        device_type: CPU"),
        (25, "        dp_size: 4"),
    ]);
    config::load_str(&text).unwrap_or_else(|e| panic!("{e}"));
}

/// A `supported_models` entry is served when it is a model's route name (whatever `model_id`
/// points at) or its `model_id`, with or without the hub scheme.
#[test]
fn supported_models_served_by_route_name_or_model_id() {
    for (name, route, model_id) in [
        ("acme/llama-tiny", "/api/v1/model/acme/llama-tiny", "/data/ckpt/llama-tiny/model"),
        ("Qwen/Qwen2.5-0.5B", "/api/v1/model/Qwen/Qwen2.5-0.5B", "ms://Qwen/Qwen2.5-0.5B"),
        ("ms://Qwen/Qwen2.5-0.5B", "/api/v1/model/Qwen/Qwen2.5-0.5B", "ms://Qwen/Qwen2.5-0.5B"),
        ("Qwen/Qwen2.5-0.5B", "/api/v1/llm", "ms://Qwen/Qwen2.5-0.5B"),
    ] {
        let text = edit(&[
            (13, &format!("        per_token_model_limit: 30\n      supported_models: [{name}]")),
            (15, &format!("    route_prefix: {route}")),
            (18, &format!("      model_id: {model_id}")),
        ]);
        let c = config::load_str(&text).unwrap_or_else(|e| panic!("{name} at {route}: {e}"));
        let model = &c.applications[1];
        assert!(model.serves(name), "{name} at {route}");
    }
}
