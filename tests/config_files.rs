//! The shipped configs load, normalise as documented, round-trip through print-config, and the
//! CLI's check-config / print-config behave (exit codes, env var, formats).

use std::path::{Path, PathBuf};
use std::process::Command;

use twinkle::config::{
    self, Backend, DeviceType, ImportPath, PersistenceMode, ProxyLocation, Ranks, SamplerType,
    ServerConfig, ServerType,
};

const SHIPPED: [&str; 4] =
    ["twinkle-transformers.yaml", "twinkle-megatron.yaml", "tinker.yaml", "three-node-ranks.yaml"];

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config").join(name)
}

fn load(name: &str) -> ServerConfig {
    match config::load_file(&shipped(name)) {
        Ok(c) => c,
        Err(e) => panic!("{name} does not load:\n{e}"),
    }
}

#[test]
fn every_shipped_config_loads() {
    for name in SHIPPED {
        load(name);
    }
}

#[test]
fn transformers_file_reads_as_the_seed_says() {
    let c = load("twinkle-transformers.yaml");
    assert_eq!(c.server_type, ServerType::Twinkle);
    assert_eq!(c.proxy_location, ProxyLocation::EveryNode);
    assert_eq!((c.http_options.host.as_str(), c.http_options.port), ("0.0.0.0", 8000));
    assert_eq!(c.persistence.mode, PersistenceMode::Memory);
    let names: Vec<&str> = c.applications.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["server", "models-Qwen2.5-7B-Instruct", "processor"]);

    let server = c.application("server").expect("server app");
    assert_eq!(server.import_path, ImportPath::Server);
    assert_eq!(server.route_prefix(), "/server");
    assert_eq!(server.demand_inputs().num_cpus, 0.1);
    assert!(server.env_vars().is_empty());

    let model = c.application("models-Qwen2.5-7B-Instruct").expect("model app");
    assert_eq!(model.backend(), Some(Backend::Transformers));
    assert_eq!(model.args.use_megatron, None, "use_megatron is folded into backend");
    assert_eq!(model.model_id(), Some("ms://Qwen/Qwen2.5-7B-Instruct"));
    let adapter = model.args.adapter_config.as_ref().expect("adapter_config");
    assert_eq!(adapter.adapter_timeout, Some(1800.0));
    assert_eq!(adapter.adapter_max_lifetime, Some(36000.0));
    let d = model.demand_inputs();
    assert_eq!((d.device_type, d.ranks, d.num_cpus, d.num_gpus), (DeviceType::Cuda, 2, 0.1, 0.0));
    assert_eq!(model.gpu_count(), 2);
    assert_eq!(model.first_deployment().and_then(|d| d.name.as_deref()), Some("ModelManagement"));
    let mesh = model.args.device_mesh.as_ref().expect("mesh");
    assert_eq!((mesh.dp_size, mesh.tp_size), (2, None));

    let proc_ = c.application("processor").expect("processor app");
    let d = proc_.demand_inputs();
    assert_eq!((d.device_type, d.ranks), (DeviceType::Cpu, 2));
    assert_eq!(proc_.gpu_count(), 0);
    assert_eq!(proc_.args.ncpu_proc_per_node, Some(2));
}

#[test]
fn megatron_file_selects_the_megatron_backend() {
    let c = load("twinkle-megatron.yaml");
    let model = c.application("models-Qwen2.5-7B-Instruct").expect("model app");
    assert_eq!(model.backend(), Some(Backend::Megatron));
    assert_eq!(c.applications.len(), 3);
}

#[test]
fn tinker_file_reads_as_the_seed_says() {
    let c = load("tinker.yaml");
    assert_eq!(c.server_type, ServerType::Tinker);
    let server = c.application("server").expect("server app");
    assert_eq!(server.route_prefix, "/api/v1");
    let state = server.args.server_config.as_ref().expect("server_config");
    assert_eq!(state.per_token_model_limit, Some(30));
    assert_eq!(state.expiration_timeout, Some(86400.0));

    let model = c.application("models-Qwen2.5-0.5B-Instruct").expect("model app");
    assert_eq!(model.backend(), Some(Backend::Megatron));
    assert!(model.env_vars().is_empty(), "`env_vars:` with no value is empty");

    let sampler = c.application("sampler-Qwen2.5-0.5B-Instruct").expect("sampler app");
    assert_eq!(sampler.args.sampler_type, Some(SamplerType::Vllm));
    let engine = sampler.args.engine_args.as_ref().expect("engine_args");
    assert_eq!(engine.max_model_len, Some(4096));
    assert_eq!(engine.gpu_memory_utilization, Some(0.5));
    assert_eq!(engine.enable_lora, Some(true));
    let d = sampler.demand_inputs();
    assert_eq!((d.device_type, d.ranks, d.num_gpus), (DeviceType::Cuda, 1, 1.0));

    let overridden = c.with_server_type(ServerType::Twinkle);
    assert_eq!(overridden.server_type, ServerType::Twinkle);
}

#[test]
fn three_node_example_derives_model_ids_from_routes() {
    let c = load("three-node-ranks.yaml");
    let model = c.application("models-Qwen2.5-7B-Instruct").expect("model");
    assert_eq!(model.model_id(), Some("ms://Qwen/Qwen2.5-7B-Instruct"));
    assert_eq!(model.gpu_count(), 4);
    let sampler = c.application("sampler-Qwen2.5-7B-Instruct").expect("sampler");
    assert_eq!(sampler.model_id(), Some("ms://Qwen/Qwen2.5-7B-Instruct"));
    assert_eq!(sampler.gpu_count(), 2);
    let proc_ = c.application("processor").expect("processor");
    assert_eq!(proc_.args.device_group.as_ref().map(|g| &g.ranks), Some(&Ranks::Count(0)));
    assert_eq!(proc_.demand_inputs().device_type, DeviceType::Cpu);
    // Defaults: no deployments means no extra resources and no env.
    assert_eq!(proc_.demand_inputs().num_cpus, 0.0);
    assert!(proc_.first_deployment().is_none());
    assert_eq!(c.http_options.port, 8000);
}

#[test]
fn newer_twinkle_keys_load() {
    let text = r#"
http_options: {host: 0.0.0.0, port: 9000}
telemetry: {enabled: true, otlp_endpoint: "http://otel:4317"}
persistence: {mode: file, file_path: /tmp/twinkle-state.db, key_prefix: "demo:"}
applications:
  - name: server
    route_prefix: /api/v1
    import_path: server
    args:
      supported_models: [Acme/Foo-7B, {model_name: Acme/Bar-1B}]
  - name: model-bar
    route_prefix: /api/v1/model/Acme/Bar-1B
    import_path: model
    args: {model_id: /models/bar, device_group: {name: bar, ranks: 1, device_type: CPU}}
  - name: model-foo
    route_prefix: /api/v1/model/Acme/Foo-7B
    import_path: model
    args:
      backend: transformers
      model_id: /models/foo
      device_group: {name: model, ranks: [0, 1], device_type: GPU}
      device_mesh: {device_type: cuda, dp_size: 2}
      max_loras: 4
      max_length: 16384
      queue_config: {rps_limit: 20, max_input_tokens: 16384, execution_timeout: 0}
      adapter_config: {adapter_timeout: 120, adapter_max_lifetime: 36000}
    deployments:
      - name: M
        ray_actor_options:
          num_cpus: 1
          runtime_env:
            env_vars: {TWINKLE_TRUST_REMOTE_CODE: "0", TWINKLE_FAIL_FAST: 0, FLAG: true, V: 1.10, Y: yes}
"#;
    let c = config::load_str(text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.http_options.port, 9000);
    assert!(c.telemetry.enabled);
    assert_eq!(c.persistence.file_path.as_deref(), Some("/tmp/twinkle-state.db"));
    let server = c.application("server").expect("server");
    let names: Vec<&str> = server.args.supported_models.iter().map(|m| m.name()).collect();
    assert_eq!(names, ["Acme/Foo-7B", "Acme/Bar-1B"]);
    let model = c.application("model-foo").expect("model");
    assert_eq!(model.model_id(), Some("/models/foo"), "an explicit model_id wins");
    assert_eq!(model.gpu_count(), 2);
    assert_eq!(model.args.max_loras, Some(4));
    let q = model.args.queue_config.as_ref().expect("queue");
    assert_eq!((q.rps_limit, q.tps_limit, q.execution_timeout), (20.0, 16000.0, 0.0));
    let env: Vec<(&str, &str)> =
        model.env_vars().iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(
        env,
        [
            ("FLAG", "true"),
            ("TWINKLE_FAIL_FAST", "0"),
            ("TWINKLE_TRUST_REMOTE_CODE", "0"),
            ("V", "1.10"),
            ("Y", "yes")
        ]
    );
}

#[test]
fn normal_form_round_trips_through_yaml_and_json() {
    for name in SHIPPED {
        let c = load(name);
        let yaml = c.to_yaml().expect("yaml");
        let again = config::load_str(&yaml).unwrap_or_else(|e| panic!("{name} yaml:\n{e}\n{yaml}"));
        assert_eq!(again, c, "{name}: yaml round trip");
        let json = c.to_json().expect("json");
        let again = config::load_str(&json).unwrap_or_else(|e| panic!("{name} json:\n{e}\n{json}"));
        assert_eq!(again, c, "{name}: json round trip");
    }
}

fn twinkle() -> Command {
    Command::new(env!("CARGO_BIN_EXE_twinkle"))
}

#[test]
fn cli_check_config_exit_codes() {
    let ok = twinkle().args(["check-config", "-c"]).arg(shipped("tinker.yaml")).output().unwrap();
    assert_eq!(ok.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "ok");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "applications:\n  - name: a\n    import_path: modle\n").unwrap();
    let out = twinkle().args(["check-config", "--config"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("applications[0].import_path: unknown value \"modle\""), "{err}");
    assert!(err.contains("(line 3)"), "{err}");

    let missing = twinkle().args(["check-config", "-c", "/nonexistent/twinkle.yaml"]).output();
    assert_eq!(missing.unwrap().status.code(), Some(2));

    // The path may come from TWINKLE_SERVER_CONFIG instead of -c.
    let via_env = twinkle()
        .arg("check-config")
        .env("TWINKLE_SERVER_CONFIG", shipped("twinkle-megatron.yaml"))
        .output()
        .unwrap();
    assert_eq!(via_env.status.code(), Some(0));
}

/// Keys accepted for compatibility but not acted on are named (path and line) with what applies
/// instead; the file still checks out (exit 0). Keys this server does use are not named.
#[test]
fn cli_check_config_warns_about_ignored_keys() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("ignored.yaml");
    // Both applications on the generated tiny model, `extra` closing their `args`.
    let app = |kind: &str, nproc: u32, ranks: u32, extra: &str| {
        format!(
            "  - name: {kind}\n    route_prefix: /api/v1/{kind}/m\n    import_path: {kind}\n    \
             args:\n      model_id: generate://qwen3-tiny\n      nproc_per_node: {nproc}\n      \
             device_group: {{name: {kind}, ranks: {ranks}, device_type: cuda}}\n{extra}"
        )
    };
    let text = "telemetry:\n  enabled: true\napplications:\n".to_string()
        + &app("model", 4, 2, "      queue_config:\n        rps_limit: 5\n")
        + &app(
            "sampler",
            1,
            1,
            "      engine_args:\n        max_model_len: 4096\n        enforce_eager: true\n        \
             enable_lora: true\n",
        );
    std::fs::write(&cfg, text).unwrap();
    let out = twinkle().args(["check-config", "-c"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    // Lines of `text`: an entry's first 7 lines end with its device_group, then come its extras.
    for (path, line) in [
        ("telemetry", 1),
        ("applications[0].args.nproc_per_node", 9),
        ("applications[0].args.queue_config", 11),
        ("applications[1].args.engine_args.enforce_eager", 22),
    ] {
        let want = format!("warning: {path}: ");
        let hit = err.lines().find(|l| l.starts_with(&want));
        assert!(hit.is_some_and(|l| l.ends_with(&format!("(line {line})"))), "{path}:\n{err}");
    }
    assert_eq!(err.lines().count(), 4, "only the ignored keys:\n{err}");
    let shipped = twinkle().args(["check-config", "-c"]).arg(shipped("quickstart.yaml")).output();
    assert!(shipped.unwrap().stderr.is_empty());
}

#[test]
fn cli_print_config_output_loads_again() {
    let dir = tempfile::tempdir().unwrap();
    for format in ["yaml", "json"] {
        let out = twinkle()
            .args(["print-config", "-c"])
            .arg(shipped("twinkle-transformers.yaml"))
            .args(["--format", format])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        let printed = dir.path().join(format!("printed.{format}"));
        std::fs::write(&printed, &out.stdout).unwrap();
        let check = twinkle().args(["check-config", "-c"]).arg(&printed).output().unwrap();
        assert_eq!(check.status.code(), Some(0), "{}", String::from_utf8_lossy(&check.stderr));
        let reloaded = config::load_file(&printed).unwrap();
        assert_eq!(reloaded, load("twinkle-transformers.yaml"));
    }
    let text = String::from_utf8(
        twinkle()
            .args(["print-config", "-c"])
            .arg(shipped("twinkle-megatron.yaml"))
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(text.contains("backend: megatron"), "{text}");
    assert!(!text.contains("use_megatron"), "{text}");
    assert!(text.starts_with("server_type: twinkle\n"), "{text}");

    let overridden = twinkle()
        .args(["print-config", "--server-type", "tinker", "-c"])
        .arg(shipped("twinkle-megatron.yaml"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&overridden.stdout).starts_with("server_type: tinker\n"));
}

/// The newer-format example of the design study (specs/twinkle-server.md §1.9).
const SPEC_EXAMPLE: &str = r#"
ray_namespace: demo
proxy_location: EveryNode
http_options: {host: 0.0.0.0, port: 8000}
telemetry: {enabled: true, otlp_endpoint: http://otel:4317}
persistence: {mode: redis, redis_url: redis://localhost:6380, key_prefix: "demo:"}
applications:
  - name: server
    route_prefix: /api/v1
    import_path: server
    args:
      server_config: {per_token_model_limit: 3}
      supported_models: [Acme/Foo-7B]
    deployments: [{name: Gw, max_ongoing_requests: 50, ray_actor_options: {num_cpus: 0.1}}]
  - name: model-foo
    route_prefix: /api/v1/model/Acme/Foo-7B        # must equal client model id / supported_models entry
    import_path: model
    args:
      backend: transformers
      model_id: ms://Acme/Foo-7B
      nproc_per_node: 2
      device_group: {name: model, ranks: 2, device_type: cuda}
      device_mesh: {device_type: cuda, dp_size: 2}
      max_loras: 4
      max_length: 16384
      queue_config: {rps_limit: 20, tps_limit: 200000, max_input_tokens: 16384, execution_timeout: 0}
      adapter_config: {adapter_timeout: 120, adapter_max_lifetime: 36000}
    deployments: [{name: ModelManagement, ray_actor_options: {num_cpus: 0.1,
                   runtime_env: {env_vars: {TWINKLE_TRUST_REMOTE_CODE: "0", TWINKLE_FAIL_FAST: "0"}}}}]
  - name: sampler-foo
    route_prefix: /api/v1/sampler/Acme/Foo-7B
    import_path: sampler
    args:
      model_id: ms://Acme/Foo-7B
      nproc_per_node: 2
      sampler_type: vllm
      engine_args: {max_model_len: 8192, gpu_memory_utilization: 0.8, enable_lora: true, max_loras: 4}
      device_group: {name: sampler, ranks: 2, device_type: cuda, gpus_per_worker: 2}
      device_mesh: {device_type: cuda, dp_size: 1, tp_size: 2}
  - name: processor
    route_prefix: /api/v1/processor
    import_path: processor
    args:
      ncpu_proc_per_node: 2
      device_group: {name: proc, ranks: 2, device_type: CPU}
      device_mesh: {device_type: CPU, dp_size: 2}
"#;

/// The study's sampler asks for tensor parallel (`dp_size: 1, tp_size: 2` on two cards), which
/// the engine does not implement: the example is rejected at exactly those keys.
#[test]
fn newer_format_example_rejects_tensor_parallel() {
    let err = config::load_str(SPEC_EXAMPLE).unwrap_err();
    let got: Vec<String> = err.problems().iter().map(ToString::to_string).collect();
    assert_eq!(got.len(), 2, "{err}");
    assert!(got.iter().all(|p| p.starts_with("applications[2].args.device_mesh.")), "{err}");
    assert!(got.iter().any(|p| p.contains("tp_size 2 is not supported yet")), "{err}");
    assert!(
        got.iter().any(|p| p.contains("dp_size 1 does not match device_group.ranks = 2")),
        "{err}"
    );
}

#[test]
fn newer_format_example_loads() {
    // Data parallel over the sampler's two cards instead of the study's tensor parallel.
    let text = SPEC_EXAMPLE.replace("dp_size: 1, tp_size: 2", "dp_size: 2");
    let c = config::load_str(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.ray_namespace.as_deref(), Some("demo"));
    assert_eq!(c.persistence.mode, PersistenceMode::Redis);
    assert_eq!(c.persistence.redis_url.as_deref(), Some("redis://localhost:6380"));
    let model = c.application("model-foo").expect("model");
    assert_eq!(model.backend(), Some(Backend::Transformers));
    assert_eq!(model.env_vars().get("TWINKLE_FAIL_FAST").map(String::as_str), Some("0"));
    let sampler = c.application("sampler-foo").expect("sampler");
    let group = sampler.args.device_group.as_ref().expect("group");
    assert_eq!((group.ranks.count(), group.gpus_per_worker), (2, 2));
    let gw = c.application("server").expect("server");
    assert_eq!(gw.first_deployment().and_then(|d| d.max_ongoing_requests), Some(50));
}

/// Model and sampler applications are served under the name their route gives (what the seed's
/// routes and `supported_models` say), whatever `model_id` points at.
#[test]
fn shipped_configs_serve_under_their_route_names() {
    for (file, app, name) in [
        ("tinker.yaml", "models-Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
        ("tinker.yaml", "sampler-Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
        ("twinkle-transformers.yaml", "models-Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct"),
        ("three-node-ranks.yaml", "sampler-Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct"),
        ("quickstart.yaml", "model-qwen3-tiny", "qwen3-tiny"),
        ("quickstart-sampler.yaml", "sampler-qwen3-tiny", "qwen3-tiny"),
        ("quickstart-twinkle.yaml", "samplers-qwen3-tiny", "qwen3-tiny"),
    ] {
        let c = load(file);
        let a = c.application(app).unwrap_or_else(|| panic!("{file}: no {app}"));
        assert_eq!(a.served_name().as_deref(), Some(name), "{file} {app}");
        assert!(a.serves(name) && a.serves(a.model_id().unwrap_or_default()), "{file} {app}");
    }
    assert_eq!(load("tinker.yaml").application("server").and_then(|a| a.served_name()), None);
}

/// The motivating case: a checkpoint in a local directory called `model`, served (and listed)
/// as `acme/llama-tiny`.
#[test]
fn local_directory_model_is_named_by_its_route() {
    let text = r#"
applications:
  - name: server
    route_prefix: /api/v1
    import_path: server
    args: {supported_models: [acme/llama-tiny]}
  - name: models-llama-tiny
    route_prefix: /api/v1/model/acme/llama-tiny
    import_path: model
    args: {model_id: /data/ckpt/llama-tiny/model, device_group: {name: m, ranks: 1, device_type: CPU}}
"#;
    let c = config::load_str(text).unwrap_or_else(|e| panic!("{e}"));
    let model = c.application("models-llama-tiny").expect("model");
    assert_eq!(model.served_name().as_deref(), Some("acme/llama-tiny"));
    assert!(model.serves("/data/ckpt/llama-tiny/model"), "its model_id still designates it");
    let unserved = text
        .replace("[acme/llama-tiny]", "[acme/llama-tiny, model]")
        .replace("/data/ckpt/llama-tiny/model", "ms://acme/llama-tiny");
    let err = config::load_str(&unserved).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.starts_with("applications[0].args.supported_models[1]: \"model\""), "{err}");
    assert!(err.ends_with("(line 6)"), "{err}");
}
