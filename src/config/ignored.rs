//! Keys the configuration accepts, because the seed's files and the Python server's carry them,
//! but that this server does not act on. Silently accepting them would let an operator believe,
//! say, that `queue_config.rps_limit` rate-limits a key; so `twinkle check-config` and `twinkle
//! serve` name each one (key path and line) with what applies instead. They are warnings, not
//! errors: the same file still starts.

use super::locate::KeyPath;
use super::schema::{ServerConfig, Telemetry};

/// Every accepted-but-ignored key of a parsed (not yet normalised) configuration, with why.
pub(crate) fn ignored(cfg: &ServerConfig) -> Vec<(KeyPath, String)> {
    let root = KeyPath::root();
    let mut out = Vec::new();
    if cfg.telemetry != Telemetry::default() {
        out.push((
            root.key("telemetry"),
            "is not acted on: there is no OpenTelemetry export; the logs go to stderr".into(),
        ));
    }
    if cfg.task_queue.is_some() {
        out.push((root.key("task_queue"), QUEUE.into()));
    }
    for (i, app) in cfg.applications.iter().enumerate() {
        let args = root.key("applications").index(i).key("args");
        if app.args.queue_config.is_some() {
            out.push((args.key("queue_config"), QUEUE.into()));
        }
        // `sampler_type` (vllm or torch) names the engine this server replaces with its own for
        // both values, as the README says: not worth a warning on every seed file.
        let ranks = app.args.device_group.as_ref().map(|g| g.ranks.count());
        if let (Some(n), Some(r)) = (app.args.nproc_per_node, ranks)
            && n != r
            && r > 0
        {
            out.push((
                args.key("nproc_per_node"),
                format!(
                    "is {n} but device_group.ranks is {r}: the worker count is device_group.ranks \
                     (one worker per card); nproc_per_node changes nothing"
                ),
            ));
        }
        if let Some(e) = &app.args.engine_args {
            let set = [
                ("gpu_memory_utilization", e.gpu_memory_utilization.is_some()),
                // LoRA sampling is always on: only `false` asks for something else.
                ("enable_lora", e.enable_lora == Some(false)),
                ("max_loras", e.max_loras.is_some()),
                ("max_lora_rank", e.max_lora_rank.is_some()),
                ("enable_prefix_caching", e.enable_prefix_caching.is_some()),
                ("enforce_eager", e.enforce_eager.is_some()),
                ("enable_sleep_mode", e.enable_sleep_mode.is_some()),
                ("trust_remote_code", e.trust_remote_code.is_some()),
                ("dtype", e.dtype.is_some()),
                ("seed", e.seed.is_some()),
                ("tensor_parallel_size", e.tensor_parallel_size.is_some()),
                ("logprobs_mode", e.logprobs_mode.is_some()),
            ];
            for (k, _) in set.iter().filter(|(_, s)| *s) {
                out.push((
                    args.key("engine_args").key(k),
                    "is a vLLM setting this server's sampler does not have; of engine_args only \
                     max_model_len applies"
                        .into(),
                ));
            }
        }
    }
    out
}

const QUEUE: &str = "is not applied (no rate limits or queue/execution timeouts from it); the \
                     per-key bounds are server_config.max_tokens_per_request, \
                     max_sampling_requests_per_key and the 64 pending futures per key (README)";
