//! Test doubles over the CPU runtime: [`delegate_cpu_runtime!`] writes the `ModelRuntime` methods
//! a wrapper passes through unchanged, so each fault-injecting double spells out only the
//! methods it breaks.

/// Inside `impl ModelRuntime for Wrapper`, forwards each named method to the wrapped
/// `CpuRuntime` in field `$f` (`inner`, or `0` of a tuple struct); `types` writes the associated
/// types of the CPU runtime.
macro_rules! delegate_cpu_runtime {
    ($f:tt => $($m:ident),* $(,)?) => { $( delegate_cpu_runtime!(@ $f $m); )* };
    (@ $f:tt types) => {
        type Adapter = twinkle::engine::Adapter;
        type Cache = twinkle::engine::cpu::CpuCache;
        type Logits = Vec<Vec<f32>>;
    };
    (@ $f:tt device_name) => {
        fn device_name(&self) -> String { self.$f.device_name() }
    };
    (@ $f:tt config) => {
        fn config(&self) -> &twinkle::engine::ModelConfig { self.$f.config() }
    };
    (@ $f:tt upload_adapter) => {
        fn upload_adapter(&self, host: &Self::Adapter) -> twinkle::engine::Result<Self::Adapter> {
            self.$f.upload_adapter(host)
        }
    };
    (@ $f:tt download_adapter) => {
        fn download_adapter(&self, a: &Self::Adapter, host: &mut Self::Adapter)
            -> twinkle::engine::Result<()> {
            self.$f.download_adapter(a, host)
        }
    };
    (@ $f:tt copy_adapter) => {
        fn copy_adapter(&self, a: &Self::Adapter) -> twinkle::engine::Result<Self::Adapter> {
            self.$f.copy_adapter(a)
        }
    };
    (@ $f:tt forward_backward) => {
        fn forward_backward(
            &self, a: &mut Self::Adapter, d: &[twinkle::engine::Datum], l: &twinkle::engine::LossFn,
        ) -> twinkle::engine::Result<twinkle::engine::FwdBwdOutput> {
            self.$f.forward_backward(a, d, l)
        }
    };
    (@ $f:tt forward) => {
        fn forward(
            &self, a: Option<&Self::Adapter>, d: &[twinkle::engine::Datum],
            l: &twinkle::engine::LossFn,
        ) -> twinkle::engine::Result<twinkle::engine::FwdBwdOutput> {
            self.$f.forward(a, d, l)
        }
    };
    (@ $f:tt optim_step) => {
        fn optim_step(&self, a: &mut Self::Adapter, p: &twinkle::engine::AdamParams)
            -> twinkle::engine::Result<twinkle::engine::optim::OptimMetrics> {
            self.$f.optim_step(a, p)
        }
    };
    (@ $f:tt zero_grad) => {
        fn zero_grad(&self, a: &mut Self::Adapter) -> twinkle::engine::Result<()> {
            self.$f.zero_grad(a)
        }
    };
    (@ $f:tt grads_to_host) => {
        fn grads_to_host(&self, a: &Self::Adapter) -> twinkle::engine::Result<Vec<f32>> {
            self.$f.grads_to_host(a)
        }
    };
    (@ $f:tt grads_from_host) => {
        fn grads_from_host(&self, a: &mut Self::Adapter, g: &[f32]) -> twinkle::engine::Result<()> {
            self.$f.grads_from_host(a, g)
        }
    };
    (@ $f:tt new_cache) => {
        fn new_cache(&self, n: usize, len: usize) -> twinkle::engine::Result<Self::Cache> {
            self.$f.new_cache(n, len)
        }
    };
    (@ $f:tt fork_slot) => {
        fn fork_slot(&self, c: &mut Self::Cache, s: usize, d: usize) -> twinkle::engine::Result<()> {
            self.$f.fork_slot(c, s, d)
        }
    };
    (@ $f:tt forward_cached) => {
        fn forward_cached(
            &self, a: Option<&Self::Adapter>, c: &mut Self::Cache, s: &[usize], t: &[&[u32]],
        ) -> twinkle::engine::Result<Self::Logits> {
            self.$f.forward_cached(a, c, s, t)
        }
    };
    (@ $f:tt select_tokens) => {
        fn select_tokens(
            &self, l: &Self::Logits, p: &[twinkle::engine::sampling::SamplingParams], u: &[f32],
        ) -> twinkle::engine::Result<Vec<(u32, f32)>> {
            self.$f.select_tokens(l, p, u)
        }
    };
    (@ $f:tt logits_to_host) => {
        fn logits_to_host(&self, l: &Self::Logits) -> twinkle::engine::Result<Vec<Vec<f32>>> {
            self.$f.logits_to_host(l)
        }
    };
}
