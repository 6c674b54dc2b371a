//! Every timing knob of the node agents, the head and their children in one value, resolved in
//! one place: the built-in default, then the config's `timings:` section (`twinkle serve`), then
//! the matching environment variable (an operator's or a test's override; `twinkle start` and
//! `twinkle join` have no config and read only the environment).
//!
//! | key (`timings.`)       | env var                        | default | what |
//! |------------------------|--------------------------------|---------|------|
//! | `stop_grace_s`         | `TWINKLE_STOP_GRACE_S`         | 10      | SIGTERM → SIGKILL grace of a child |
//! | `register_deadline_s`  | `TWINKLE_REGISTER_DEADLINE_S`  | 60      | a child not registered by then is restarted |
//! | `health_period_s`      | `TWINKLE_HEALTH_PERIOD_S`      | 10      | `/healthz` probe period of a registered child |
//! | `health_timeout_s`     | `TWINKLE_HEALTH_TIMEOUT_S`     | 10      | one probe's timeout (3 misses = hung) |
//! | `heartbeat_s`          | `TWINKLE_HEARTBEAT_S`          | 1       | node agent → head heartbeat period |
//! | `node_timeout_s`       | `TWINKLE_NODE_TIMEOUT_S`       | 10      | a node silent this long is dead |
//! | `gpu_stats_s`          | `TWINKLE_GPU_STATS_S`          | 5       | NVML sampling period |

use std::time::Duration;

use crate::config::TimingsConfig;

/// The resolved timings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timings {
    pub stop_grace: Duration,
    pub register_deadline: Duration,
    pub health_period: Duration,
    pub health_timeout: Duration,
    pub heartbeat: Duration,
    pub node_timeout: Duration,
    pub gpu_stats: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            stop_grace: Duration::from_secs(10),
            register_deadline: Duration::from_secs(60),
            health_period: Duration::from_secs(10),
            health_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(1),
            node_timeout: Duration::from_secs(10),
            gpu_stats: Duration::from_secs(5),
        }
    }
}

/// Seconds from `v` when it is a finite number `>= 0` (`> 0` unless `zero_ok`).
fn secs(v: Option<f64>, zero_ok: bool) -> Option<Duration> {
    v.filter(|s| s.is_finite() && (*s > 0.0 || (zero_ok && *s == 0.0))).map(Duration::from_secs_f64)
}

fn env(name: &str) -> Option<f64> {
    std::env::var(name).ok()?.trim().parse().ok()
}

impl Timings {
    /// Defaults, then `cfg`, then the environment.
    pub fn resolve(cfg: Option<&TimingsConfig>) -> Self {
        let d = Timings::default();
        let c = cfg.cloned().unwrap_or_default();
        // A zero stop grace or register deadline is meaningful (kill at once, restart at once);
        // a zero period is not.
        let pick = |key: Option<f64>, var: &str, zero_ok: bool, default: Duration| {
            secs(env(var), zero_ok).or(secs(key, zero_ok)).unwrap_or(default)
        };
        Timings {
            stop_grace: pick(c.stop_grace_s, "TWINKLE_STOP_GRACE_S", true, d.stop_grace),
            register_deadline: pick(
                c.register_deadline_s,
                "TWINKLE_REGISTER_DEADLINE_S",
                true,
                d.register_deadline,
            ),
            health_period: pick(
                c.health_period_s,
                "TWINKLE_HEALTH_PERIOD_S",
                false,
                d.health_period,
            ),
            health_timeout: pick(
                c.health_timeout_s,
                "TWINKLE_HEALTH_TIMEOUT_S",
                false,
                d.health_timeout,
            ),
            heartbeat: pick(c.heartbeat_s, "TWINKLE_HEARTBEAT_S", false, d.heartbeat),
            node_timeout: pick(c.node_timeout_s, "TWINKLE_NODE_TIMEOUT_S", false, d.node_timeout),
            gpu_stats: pick(c.gpu_stats_s, "TWINKLE_GPU_STATS_S", false, d.gpu_stats),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_values_override_defaults() {
        let cfg =
            TimingsConfig { heartbeat_s: Some(0.25), gpu_stats_s: Some(0.0), ..Default::default() };
        let t = Timings::resolve(Some(&cfg));
        assert_eq!(t.heartbeat, Duration::from_millis(250));
        // A zero period is not taken; the default stays.
        assert_eq!(t.gpu_stats, Timings::default().gpu_stats);
        assert_eq!(t.node_timeout, Timings::default().node_timeout);
    }
}
