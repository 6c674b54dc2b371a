//! Learning-rate schedules of `set_lr_scheduler`, as multipliers of the optimizer's base lr after
//! `n` scheduler steps (torch `LambdaLR` semantics: the factor of step 0 applies before the first
//! `lr_step`). Names and defaults follow torch (`LinearLR`, `ConstantLR`, `StepLR`,
//! `CosineAnnealingLR`) and Twinkle's own (`CosineWarmupScheduler`, `LinearWarmupScheduler`).

use serde_json::{Map, Value};

use super::error::TwinkleError;

/// A schedule with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// No scheduler: the base lr.
    Constant,
    LinearLr {
        start_factor: f64,
        end_factor: f64,
        total_iters: u64,
    },
    ConstantLr {
        factor: f64,
        total_iters: u64,
    },
    StepLr {
        step_size: u64,
        gamma: f64,
    },
    CosineAnnealing {
        t_max: u64,
        eta_min: f64,
    },
    CosineWarmup {
        warmup: u64,
        total: u64,
        cycles: f64,
    },
    LinearWarmup {
        warmup: u64,
        total: u64,
    },
}

/// Names `set_lr_scheduler` accepts.
pub const NAMES: &[&str] = &[
    "LinearLR",
    "ConstantLR",
    "StepLR",
    "CosineAnnealingLR",
    "CosineWarmupScheduler",
    "LinearWarmupScheduler",
];

fn known(kwargs: &Map<String, Value>, allowed: &[&str], cls: &str) -> Result<(), TwinkleError> {
    for k in kwargs.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(TwinkleError::bad(format!(
                "set_lr_scheduler: {cls} has no argument `{k}` (accepted: {allowed:?})"
            )));
        }
    }
    Ok(())
}

fn f(kwargs: &Map<String, Value>, k: &str, d: f64) -> Result<f64, TwinkleError> {
    match kwargs.get(k) {
        None | Some(Value::Null) => Ok(d),
        Some(v) => v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
            TwinkleError::bad(format!("set_lr_scheduler: {k} must be a number, got {v}"))
        }),
    }
}

fn n(kwargs: &Map<String, Value>, k: &str, d: Option<u64>, cls: &str) -> Result<u64, TwinkleError> {
    match kwargs.get(k) {
        None | Some(Value::Null) => d.ok_or_else(|| {
            TwinkleError::bad(format!("set_lr_scheduler: {cls} needs `{k}` (a step count)"))
        }),
        Some(v) => v.as_u64().ok_or_else(|| {
            TwinkleError::bad(format!(
                "set_lr_scheduler: {k} must be a whole number of steps, got {v}"
            ))
        }),
    }
}

impl Schedule {
    /// Builds `scheduler_cls` from its keyword arguments (unknown names and arguments are 400).
    pub fn from_request(cls: &str, kwargs: &Map<String, Value>) -> Result<Self, TwinkleError> {
        let s = match cls {
            "LinearLR" => {
                known(kwargs, &["start_factor", "end_factor", "total_iters"], cls)?;
                Schedule::LinearLr {
                    start_factor: f(kwargs, "start_factor", 1.0 / 3.0)?,
                    end_factor: f(kwargs, "end_factor", 1.0)?,
                    total_iters: n(kwargs, "total_iters", Some(5), cls)?,
                }
            }
            "ConstantLR" => {
                known(kwargs, &["factor", "total_iters"], cls)?;
                Schedule::ConstantLr {
                    factor: f(kwargs, "factor", 1.0 / 3.0)?,
                    total_iters: n(kwargs, "total_iters", Some(5), cls)?,
                }
            }
            "StepLR" => {
                known(kwargs, &["step_size", "gamma"], cls)?;
                Schedule::StepLr {
                    step_size: n(kwargs, "step_size", None, cls)?.max(1),
                    gamma: f(kwargs, "gamma", 0.1)?,
                }
            }
            "CosineAnnealingLR" => {
                known(kwargs, &["T_max", "eta_min"], cls)?;
                // eta_min is absolute in torch; stored relative to the base lr at build time.
                Schedule::CosineAnnealing {
                    t_max: n(kwargs, "T_max", None, cls)?.max(1),
                    eta_min: f(kwargs, "eta_min", 0.0)?,
                }
            }
            "CosineWarmupScheduler" => {
                known(kwargs, &["num_warmup_steps", "num_training_steps", "num_cycles"], cls)?;
                Schedule::CosineWarmup {
                    warmup: n(kwargs, "num_warmup_steps", Some(0), cls)?,
                    total: n(kwargs, "num_training_steps", None, cls)?,
                    cycles: f(kwargs, "num_cycles", 0.5)?,
                }
            }
            "LinearWarmupScheduler" => {
                known(kwargs, &["num_warmup_steps", "num_training_steps"], cls)?;
                Schedule::LinearWarmup {
                    warmup: n(kwargs, "num_warmup_steps", Some(0), cls)?,
                    total: n(kwargs, "num_training_steps", None, cls)?,
                }
            }
            other => {
                return Err(TwinkleError::bad(format!(
                    "set_lr_scheduler: scheduler_cls `{other}` is not available; supported: {}",
                    NAMES.join(", ")
                )));
            }
        };
        Ok(s)
    }

    /// The lr after `step` scheduler steps for base lr `base`.
    pub fn lr(&self, base: f64, step: u64) -> f64 {
        let t = step as f64;
        match *self {
            Schedule::Constant => base,
            Schedule::LinearLr { start_factor, end_factor, total_iters } => {
                let k = if total_iters == 0 { 1.0 } else { (t / total_iters as f64).min(1.0) };
                base * (start_factor + (end_factor - start_factor) * k)
            }
            Schedule::ConstantLr { factor, total_iters } => {
                if step < total_iters {
                    base * factor
                } else {
                    base
                }
            }
            Schedule::StepLr { step_size, gamma } => base * gamma.powi((step / step_size) as i32),
            Schedule::CosineAnnealing { t_max, eta_min } => {
                // torch's closed form (its recursive update equals it for constant base lr).
                eta_min
                    + (base - eta_min) * (1.0 + (std::f64::consts::PI * t / t_max as f64).cos())
                        / 2.0
            }
            Schedule::CosineWarmup { warmup, total, cycles } => {
                if step < warmup {
                    return base * t / (warmup.max(1) as f64);
                }
                let progress =
                    (step - warmup) as f64 / (total.saturating_sub(warmup).max(1) as f64);
                base * (0.5 * (1.0 + (std::f64::consts::PI * cycles * 2.0 * progress).cos()))
                    .max(0.0)
            }
            Schedule::LinearWarmup { warmup, total } => {
                if step < warmup {
                    return base * t / (warmup.max(1) as f64);
                }
                let left = total as f64 - t;
                base * (left / (total.saturating_sub(warmup).max(1) as f64)).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn build(cls: &str, v: Value) -> Schedule {
        Schedule::from_request(cls, v.as_object().unwrap()).unwrap()
    }

    #[test]
    fn torch_linear_lr_defaults() {
        // torch.optim.lr_scheduler.LinearLR(opt) with lr 0.3: 0.1, 0.14, 0.18, 0.22, 0.26, 0.3, 0.3
        let s = build("LinearLR", json!({}));
        let got: Vec<f64> = (0..7).map(|i| s.lr(0.3, i)).collect();
        for (g, w) in got.iter().zip([0.1, 0.14, 0.18, 0.22, 0.26, 0.3, 0.3]) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
    }

    #[test]
    fn warmup_schedules() {
        let c = build(
            "CosineWarmupScheduler",
            json!({"num_warmup_steps": 2, "num_training_steps": 10}),
        );
        assert_eq!(c.lr(1.0, 0), 0.0);
        assert_eq!(c.lr(1.0, 1), 0.5);
        assert!((c.lr(1.0, 2) - 1.0).abs() < 1e-12);
        assert!((c.lr(1.0, 6) - 0.5).abs() < 1e-12);
        assert!(c.lr(1.0, 10).abs() < 1e-12);
        let l = build(
            "LinearWarmupScheduler",
            json!({"num_warmup_steps": 2, "num_training_steps": 10}),
        );
        assert!((l.lr(1.0, 6) - 0.5).abs() < 1e-12);
        assert_eq!(l.lr(1.0, 12), 0.0);
        let s = build("StepLR", json!({"step_size": 2, "gamma": 0.5}));
        assert_eq!(s.lr(1.0, 3), 0.5);
    }

    #[test]
    fn unknown_names_and_arguments_are_400() {
        let e = Schedule::from_request("OneCycleLR", &Map::new()).unwrap_err();
        assert!(e.to_string().contains("OneCycleLR") && e.to_string().contains("LinearLR"));
        let e = Schedule::from_request("LinearLR", json!({"warmup": 3}).as_object().unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("warmup"));
        assert!(Schedule::from_request("CosineWarmupScheduler", &Map::new()).is_err());
    }
}
