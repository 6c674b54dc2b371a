//! FLOP counts, peak RSS and the printed results of `twinkle bench`.

use serde_json::{Value, json};

use crate::engine::ModelConfig;

/// FLOPs per token of a LoRA training step, following shared/specs/perf-anchors.md §1.2/§1.4:
/// `N` counts every weight that takes part in a matmul (all linears plus the LM head, which is the
/// embedding when tied; the embedding gather is not a matmul).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Flops {
    /// Matmul parameters `N`.
    pub matmul_params: f64,
    /// Attention forward per token: QKᵀ + AV over an average causal context of S/2,
    /// `4·L·d_attn·S/2`.
    pub attn_fwd: f64,
    /// Forward per token: `2N + attn + 2·P_lora`.
    pub forward: f64,
    /// Frozen-base LoRA training per token: `4N + 3·attn + 6·P_lora` (no base weight gradients).
    pub train: f64,
}

/// The counts for model `c` at sequence length `seq` with `lora_params` adapter parameters.
pub fn flops(c: &ModelConfig, seq: usize, lora_params: usize) -> Flops {
    let (h, i, l, v) = (
        c.hidden_size as f64,
        c.intermediate_size as f64,
        c.num_layers as f64,
        c.vocab_size as f64,
    );
    let qd = (c.num_heads * c.head_dim) as f64;
    let kvd = (c.num_kv_heads * c.head_dim) as f64;
    let per_layer = h * qd + 2.0 * h * kvd + qd * h + 3.0 * h * i;
    let n = l * per_layer + v * h;
    let attn = 4.0 * l * qd * seq as f64 / 2.0;
    let p = lora_params as f64;
    Flops {
        matmul_params: n,
        attn_fwd: attn,
        forward: 2.0 * n + attn + 2.0 * p,
        train: 4.0 * n + 3.0 * attn + 6.0 * p,
    }
}

/// Result of `twinkle bench train` (times are per step, averaged).
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub tokens_per_step: usize,
    pub seq: usize,
    pub forward_s: f64,
    pub fwd_bwd_s: f64,
    pub optim_s: f64,
    pub flops: Flops,
    pub lora_params: usize,
    pub peak_rss_bytes: Option<u64>,
}

impl TrainReport {
    /// fwd+bwd+optimizer seconds per step.
    pub fn step_s(&self) -> f64 {
        self.fwd_bwd_s + self.optim_s
    }

    pub fn json(&self) -> Value {
        let t = self.tokens_per_step as f64;
        let j = json!({
            "kind": "train",
            "tokens_per_step": self.tokens_per_step,
            "seq": self.seq,
            "lora_params": self.lora_params,
            "matmul_params": self.flops.matmul_params,
            "gflop_per_token_train": self.flops.train / 1e9,
            "forward_s": self.forward_s,
            "fwd_bwd_s": self.fwd_bwd_s,
            "backward_s_est": (self.fwd_bwd_s - self.forward_s).max(0.0),
            "optim_s": self.optim_s,
            "fwd_bwd_tokens_per_s": t / self.fwd_bwd_s,
            "step_tokens_per_s": t / self.step_s(),
            "forward_tokens_per_s": t / self.forward_s,
            "train_gflops": self.flops.train * t / self.fwd_bwd_s / 1e9,
            "forward_gflops": self.flops.forward * t / self.forward_s / 1e9,
        });
        with_machine(j, self.peak_rss_bytes)
    }

    pub fn text(&self) -> String {
        let j = self.json();
        let f = |k: &str| j[k].as_f64().unwrap_or(f64::NAN);
        format!(
            "train: {} tokens/step (seq {}), LoRA params {}\n\
             fwd+bwd      {:8.1} tokens/s  {:7.1} GFLOP/s  ({:.3} s/step, {:.2} GFLOP/token = 4N+3attn+6P_lora)\n\
             full step    {:8.1} tokens/s  (fwd+bwd+optim {:.3} s)\n\
             split        forward {:.3} s (separate forward-only pass: {:.1} tokens/s, {:.1} GFLOP/s), backward ≈ {:.3} s, optim {:.4} s\n\
             {}",
            self.tokens_per_step,
            self.seq,
            self.lora_params,
            f("fwd_bwd_tokens_per_s"),
            f("train_gflops"),
            self.fwd_bwd_s,
            self.flops.train / 1e9,
            f("step_tokens_per_s"),
            self.step_s(),
            self.forward_s,
            f("forward_tokens_per_s"),
            f("forward_gflops"),
            f("backward_s_est"),
            self.optim_s,
            machine_text(self.peak_rss_bytes),
        )
    }
}

/// Result of `twinkle bench sample`.
#[derive(Debug, Clone)]
pub struct SampleReport {
    pub batch: usize,
    pub prompt: usize,
    pub prefill_s: f64,
    /// Seconds of each decode step (one token for every sequence).
    pub step_s: Vec<f64>,
    pub peak_rss_bytes: Option<u64>,
}

impl SampleReport {
    pub fn json(&self) -> Value {
        let decode_s: f64 = self.step_s.iter().sum();
        let steps = self.step_s.len() as f64;
        let mut sorted = self.step_s.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
        let j = json!({
            "kind": "sample",
            "batch": self.batch,
            "prompt": self.prompt,
            "max_tokens": self.step_s.len(),
            "prefill_s": self.prefill_s,
            "prefill_tokens_per_s": (self.batch * self.prompt) as f64 / self.prefill_s,
            "decode_s": decode_s,
            "decode_tokens_per_s": self.batch as f64 * steps / decode_s,
            "step_ms_mean": decode_s / steps * 1e3,
            "step_ms_median": median * 1e3,
        });
        with_machine(j, self.peak_rss_bytes)
    }

    pub fn text(&self) -> String {
        let j = self.json();
        let f = |k: &str| j[k].as_f64().unwrap_or(f64::NAN);
        format!(
            "sample: batch {}, prompt {}, {} decode steps (greedy, no adapter)\n\
             prefill      {:8.1} tokens/s  ({:.3} s)\n\
             decode       {:8.1} tokens/s  (per step: mean {:.2} ms, median {:.2} ms; one token per sequence)\n\
             {}",
            self.batch,
            self.prompt,
            self.step_s.len(),
            f("prefill_tokens_per_s"),
            self.prefill_s,
            f("decode_tokens_per_s"),
            f("step_ms_mean"),
            f("step_ms_median"),
            machine_text(self.peak_rss_bytes),
        )
    }
}

/// `j` (a report's JSON object) with the machine fields every report ends with: peak RSS in
/// MiB and the load averages.
pub(super) fn with_machine(mut j: Value, peak_rss_bytes: Option<u64>) -> Value {
    j["peak_rss_mib"] = json!(peak_rss_bytes.map(|b| b as f64 / 1048576.0));
    j["loadavg"] = json!(loadavg());
    j
}

/// The lines every report's text ends with (the text form of [`with_machine`]).
pub(super) fn machine_text(peak_rss_bytes: Option<u64>) -> String {
    format!("peak RSS     {}\nloadavg      {}", mib(peak_rss_bytes), loadavg())
}

fn mib(b: Option<u64>) -> String {
    b.map_or_else(|| "n/a".into(), |b| format!("{:.0} MiB", b as f64 / 1048576.0))
}

/// The 1/5/15-minute load averages (`/proc/loadavg`), or "n/a".
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

/// Peak resident set size (`VmHWM` of /proc/self/status), Linux only.
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Resets the peak-RSS mark to the current RSS (Linux ≥ 4.0; ignored elsewhere).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::synth::SynthSpec;

    #[test]
    fn qwen05b_counts_match_the_perf_anchor_table() {
        // perf-anchors §1.3/§1.4: N = 0.494B; LoRA (without adapter terms) 2.04 GF/token at seq
        // 512 and 2.24 at 2048.
        let c = crate::engine::cuda::spec_config(&SynthSpec::qwen2_5_0_5b());
        let f512 = flops(&c, 512, 0);
        let f2048 = flops(&c, 2048, 0);
        assert!((f512.matmul_params / 1e9 - 0.494).abs() < 0.001, "{}", f512.matmul_params);
        assert!((f512.train / 1e9 - 2.04).abs() < 0.01, "{}", f512.train);
        assert!((f2048.train / 1e9 - 2.24).abs() < 0.01, "{}", f2048.train);
    }
}
