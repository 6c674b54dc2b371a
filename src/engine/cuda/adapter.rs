//! `CudaAdapter`: a LoRA adapter resident on the GPU — f32 master weights A [r, in] and
//! B [out, r], their accumulated gradients and Adam moments — uploaded from and downloaded to
//! the host [`Adapter`], so checkpoints (PEFT files, optimizer state) stay the CPU code's job.
//! Also the AdamW step on the device, with the CPU's `AdamParams` semantics: two launches for
//! the whole adapter (global gradient norm, then AdamW with the clip factor computed on the
//! device and the gradients zeroed), over a device table of the tensors' addresses, and one
//! download of the norm at the end (which also tells whether the update kernel refused a
//! non-finite gradient).

use cudarc::driver::{CudaSlice, DevicePtr};

use super::launch::{self as k, AdamStep};
use super::model::{Act, CudaModel, R, download, scratch_zeroed, upload, view, zeros};
use super::{CudaDevice, CudaError};
use crate::engine::lora::{Adapter, LoraConfig, LoraPair, Target};
use crate::engine::optim::{AdamParams, OptimMetrics};

/// One LoRA matrix (A or B) on the device with its optimizer state: the four buffers that
/// make one row of the optimizer table.
pub(crate) struct GpuTensor {
    /// f32 master weights.
    pub w: CudaSlice<f32>,
    /// Accumulated gradient.
    pub g: CudaSlice<f32>,
    /// Adam first moment.
    pub m: CudaSlice<f32>,
    /// Adam second moment.
    pub v: CudaSlice<f32>,
}

impl GpuTensor {
    /// Builds the four buffers in table order (weights, gradient, first, second moment).
    fn build(mut make: impl FnMut(usize) -> R<CudaSlice<f32>>) -> R<GpuTensor> {
        Ok(GpuTensor { w: make(0)?, g: make(1)?, m: make(2)?, v: make(3)? })
    }

    /// Weights `w` with a zero gradient and zero moments.
    fn fresh(dev: &CudaDevice, w: CudaSlice<f32>) -> R<GpuTensor> {
        let n = w.len();
        Ok(GpuTensor { w, g: zeros(dev, n)?, m: zeros(dev, n)?, v: zeros(dev, n)? })
    }

    /// The buffers in table order.
    fn buffers(&self) -> [&CudaSlice<f32>; 4] {
        [&self.w, &self.g, &self.m, &self.v]
    }

    /// Uploads host `[weights, gradient, first moment, second moment]`.
    fn up(dev: &CudaDevice, host: [&[f32]; 4]) -> R<GpuTensor> {
        GpuTensor::build(|i| upload(dev, host[i]))
    }

    /// Downloads into host weights (whose length the caller has checked) and
    /// `[gradient, first moment, second moment]`.
    fn down(&self, dev: &CudaDevice, w: &mut [f32], state: [&mut Vec<f32>; 3]) -> R<()> {
        w.copy_from_slice(&download(dev, &self.w.as_view())?);
        for (host, s) in state.into_iter().zip([&self.g, &self.m, &self.v]) {
            *host = download(dev, &s.as_view())?;
        }
        Ok(())
    }

    /// A device-to-device copy of every buffer (no host round trip).
    fn copy(&self, dev: &CudaDevice) -> R<GpuTensor> {
        let src = self.buffers();
        GpuTensor::build(|i| {
            dev.stream().clone_dtod(src[i]).map_err(CudaError::driver("copying an adapter tensor"))
        })
    }
}

/// One LoRA module on the device: A [r, in] and B [out, r].
pub(crate) struct GpuPair {
    pub rank: usize,
    pub a: GpuTensor,
    pub b: GpuTensor,
}

impl GpuPair {
    fn up(dev: &CudaDevice, p: &LoraPair) -> R<GpuPair> {
        Ok(GpuPair {
            rank: p.rank(),
            a: GpuTensor::up(dev, [p.a.w.data(), &p.a.g, &p.a.adam.m, &p.a.adam.v])?,
            b: GpuTensor::up(dev, [p.b.w.data(), &p.b.g, &p.b.adam.m, &p.b.adam.v])?,
        })
    }

    fn down(&self, dev: &CudaDevice, p: &mut LoraPair) -> R<()> {
        if self.a.w.len() != p.a.w.len() || self.b.w.len() != p.b.w.len() {
            return Err(mismatch("download"));
        }
        self.a.down(dev, p.a.w.data_mut(), [&mut p.a.g, &mut p.a.adam.m, &mut p.a.adam.v])?;
        self.b.down(dev, p.b.w.data_mut(), [&mut p.b.g, &mut p.b.adam.m, &mut p.b.adam.v])
    }

    /// A device-to-device copy of every buffer (no host round trip).
    fn copy(&self, dev: &CudaDevice) -> R<GpuPair> {
        Ok(GpuPair { rank: self.rank, a: self.a.copy(dev)?, b: self.b.copy(dev)? })
    }

    fn grads(&self) -> [&CudaSlice<f32>; 2] {
        [&self.a.g, &self.b.g]
    }

    fn grads_mut(&mut self) -> [&mut CudaSlice<f32>; 2] {
        [&mut self.a.g, &mut self.b.g]
    }
}

fn mismatch(what: &str) -> CudaError {
    CudaError::Shape {
        kernel: "CudaAdapter",
        msg: format!("{what}: the host adapter's modules differ from the device adapter's"),
    }
}

/// Device table of every (weight, gradient, first moment, second moment) quadruple of an
/// adapter for the multi-tensor optimizer kernels: rows of 4 addresses, a length per row.
struct OptimTable {
    ptrs: CudaSlice<u64>,
    lens: CudaSlice<i64>,
    max_len: usize,
}

/// A LoRA adapter on the GPU.
pub struct CudaAdapter {
    pub(crate) scaling: f32,
    pub(crate) step: u64,
    /// `layers[l][slot]`, slots in `Target::LAYER` order.
    pub(crate) layers: Vec<[Option<GpuPair>; 7]>,
    pub(crate) lm_head: Option<GpuPair>,
    /// Built on the first optimizer step. The addresses stay valid: a `GpuPair`'s buffers are
    /// never replaced (uploads and zeroing write into them), and they live as long as `self`.
    table: Option<OptimTable>,
}

impl std::fmt::Debug for CudaAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaAdapter").field("step", &self.step).finish()
    }
}

impl CudaAdapter {
    /// Uploads `host` (weights, accumulated gradients, Adam moments, step) for `model`.
    pub fn upload<T: Act>(model: &CudaModel<T>, host: &Adapter) -> R<CudaAdapter> {
        let c = model.config();
        let dev = &*model.dev;
        let check = |t: Target, p: &LoraPair| {
            let (inp, out) = t.dims(c);
            let r = p.rank();
            if p.a.w.len() != r * inp || p.b.w.len() != out * r {
                return Err(CudaError::Engine(crate::engine::EngineError::Adapter(format!(
                    "adapter module {} does not fit this model ({}x{} expected)",
                    t.name(),
                    out,
                    inp
                ))));
            }
            Ok(())
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let mut slots: [Option<GpuPair>; 7] = Default::default();
            for (i, t) in Target::LAYER.into_iter().enumerate() {
                if let Some(p) = host.layer(l, t) {
                    check(t, p)?;
                    slots[i] = Some(GpuPair::up(dev, p)?);
                }
            }
            layers.push(slots);
        }
        let lm_head = match host.lm_head() {
            Some(p) => {
                check(Target::LmHead, p)?;
                Some(GpuPair::up(dev, p)?)
            }
            None => None,
        };
        Ok(CudaAdapter { scaling: host.scaling(), step: host.step(), layers, lm_head, table: None })
    }

    /// A fresh adapter made on the device (A ~ U(+-1/sqrt(in)), B = 0, as `Adapter::new`, from
    /// another random stream): for benchmarks of models that exist only on the GPU.
    pub fn fresh<T: Act>(model: &CudaModel<T>, cfg: &LoraConfig) -> R<CudaAdapter> {
        cfg.check(usize::MAX).map_err(CudaError::Engine)?;
        let c = model.config();
        let dev = &*model.dev;
        let mut rng = crate::engine::synth::SynthRng(cfg.seed);
        let r = cfg.rank;
        let mut make = |t: Target| -> R<GpuPair> {
            let (inp, out) = t.dims(c);
            let bound = 1.0 / (inp as f32).sqrt();
            let a: Vec<f32> = (0..r * inp).map(|_| rng.next_f32() * bound).collect();
            Ok(GpuPair {
                rank: r,
                a: GpuTensor::fresh(dev, upload(dev, &a)?)?,
                b: GpuTensor::fresh(dev, zeros(dev, out * r)?)?,
            })
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for _ in 0..c.num_layers {
            let mut slots: [Option<GpuPair>; 7] = Default::default();
            for (i, t) in Target::LAYER.into_iter().enumerate() {
                if cfg.targets.contains(&t) {
                    slots[i] = Some(make(t)?);
                }
            }
            layers.push(slots);
        }
        let lm_head =
            if cfg.targets.contains(&Target::LmHead) { Some(make(Target::LmHead)?) } else { None };
        Ok(CudaAdapter { scaling: cfg.alpha / r as f32, step: 0, layers, lm_head, table: None })
    }

    /// Number of trainable parameters (all A and B entries).
    pub fn num_params(&self) -> usize {
        self.grad_len()
    }

    /// Copies weights, gradients, moments and the step back into `host` (the adapter this one
    /// was uploaded from, or one of the same configuration).
    pub fn download_into(&self, dev: &CudaDevice, host: &mut Adapter) -> R<()> {
        for (l, slots) in self.layers.iter().enumerate() {
            for (i, t) in Target::LAYER.into_iter().enumerate() {
                match (&slots[i], host.layer_mut(l, t)) {
                    (Some(g), Some(p)) => g.down(dev, p)?,
                    (None, None) => {}
                    _ => return Err(mismatch("download")),
                }
            }
        }
        match (&self.lm_head, host.lm_head_mut()) {
            (Some(g), Some(p)) => g.down(dev, p)?,
            (None, None) => {}
            _ => return Err(mismatch("download")),
        }
        host.step = self.step;
        Ok(())
    }

    /// A copy of this adapter on the same device (weights, gradients, moments, step). Its
    /// optimizer table is rebuilt on its first step: the addresses are its own.
    pub fn copy_on_device(&self, dev: &CudaDevice) -> R<CudaAdapter> {
        let layers = self
            .layers
            .iter()
            .map(|slots| {
                let mut out: [Option<GpuPair>; 7] = Default::default();
                for (o, p) in out.iter_mut().zip(slots) {
                    *o = p.as_ref().map(|p| p.copy(dev)).transpose()?;
                }
                Ok(out)
            })
            .collect::<R<Vec<_>>>()?;
        let lm_head = self.lm_head.as_ref().map(|p| p.copy(dev)).transpose()?;
        Ok(CudaAdapter { scaling: self.scaling, step: self.step, layers, lm_head, table: None })
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// `alpha / r`.
    pub fn scaling(&self) -> f32 {
        self.scaling
    }

    /// Every module in the host adapter's `pairs()` order (layers, then lm_head).
    fn pairs(&self) -> impl Iterator<Item = &GpuPair> {
        self.layers.iter().flat_map(|s| s.iter().flatten()).chain(self.lm_head.as_ref())
    }

    fn pairs_mut(&mut self) -> impl Iterator<Item = &mut GpuPair> {
        self.layers.iter_mut().flat_map(|s| s.iter_mut().flatten()).chain(self.lm_head.as_mut())
    }

    /// Number of gradient values (`sum of |A| + |B|`), the length of [`Self::grads_to_host`].
    pub fn grad_len(&self) -> usize {
        self.pairs().map(|p| p.a.g.len() + p.b.g.len()).sum()
    }

    /// All accumulated gradients as one host vector (per module A then B, in `pairs()` order):
    /// what a data-parallel worker all-reduces.
    pub fn grads_to_host(&self, dev: &CudaDevice) -> R<Vec<f32>> {
        let mut out = Vec::with_capacity(self.grad_len());
        for p in self.pairs() {
            for g in p.grads() {
                out.extend(download(dev, &g.as_view())?);
            }
        }
        Ok(out)
    }

    /// Replaces the accumulated gradients with `grads` (layout of [`Self::grads_to_host`]).
    pub fn grads_from_host(&mut self, dev: &CudaDevice, grads: &[f32]) -> R<()> {
        if grads.len() != self.grad_len() {
            return Err(CudaError::Shape {
                kernel: "grads_from_host",
                msg: format!("{} values for {} gradient entries", grads.len(), self.grad_len()),
            });
        }
        let mut off = 0;
        for p in self.pairs_mut() {
            for g in p.grads_mut() {
                let n = g.len();
                dev.stream()
                    .memcpy_htod(&grads[off..off + n], g)
                    .map_err(CudaError::driver("uploading gradients"))?;
                off += n;
            }
        }
        Ok(())
    }

    /// Clears the accumulated gradients.
    pub fn zero_grad(&mut self, dev: &CudaDevice) -> R<()> {
        for p in self.pairs_mut() {
            for g in p.grads_mut() {
                dev.stream().memset_zeros(g).map_err(CudaError::driver("zeroing gradients"))?;
            }
        }
        Ok(())
    }

    /// The optimizer table (built once; see [`OptimTable`]).
    fn table(&mut self, dev: &CudaDevice) -> R<&OptimTable> {
        if self.table.is_none() {
            let stream = dev.stream();
            let (mut ptrs, mut lens) = (Vec::new(), Vec::new());
            for p in self.pairs() {
                for t in [&p.a, &p.b] {
                    for s in t.buffers() {
                        // event tracking is off (device.rs), so the guard records nothing
                        let (ptr, _guard) = s.device_ptr(stream);
                        ptrs.push(ptr);
                    }
                    lens.push(i64::try_from(t.w.len()).map_err(|_| mismatch("optimizer table"))?);
                }
            }
            let max_len = lens.iter().copied().max().unwrap_or(0) as usize;
            self.table =
                Some(OptimTable { ptrs: upload(dev, &ptrs)?, lens: upload(dev, &lens)?, max_len });
        }
        self.table.as_ref().ok_or_else(|| mismatch("optimizer table"))
    }

    /// One AdamW step with the accumulated gradients (global-norm clip as the CPU's
    /// `Adapter::optim_step`), then zeroes them. A non-finite gradient (inf/NaN anywhere, or a
    /// sum of squares that overflows f32) is refused like the CPU path refuses it: the update
    /// kernel sees the non-finite norm on the device and writes nothing, so weights, moments,
    /// gradients and step are unchanged, and the error is the CPU's `NonFinite` user error.
    pub fn optim_step(&mut self, dev: &CudaDevice, p: &AdamParams) -> R<OptimMetrics> {
        p.validate()?;
        let step = self.step + 1;
        let h = AdamStep {
            lr: p.learning_rate as f32,
            beta1: p.beta1 as f32,
            beta2: p.beta2 as f32,
            eps: p.eps as f32,
            weight_decay: p.weight_decay as f32,
            step: u32::try_from(step).unwrap_or(u32::MAX),
            grad_scale: 1.0,
        };
        let mut acc = scratch_zeroed::<f32>(dev, 1)?;
        let t = self.table(dev)?;
        let (ptrs, lens) = (t.ptrs.as_view(), t.lens.as_view());
        // SAFETY: the table addresses this adapter's own tensors (see `OptimTable`), which
        // `&mut self` keeps alive and unaliased while the stream runs the two kernels.
        unsafe {
            let table = k::TensorTable { ptrs: &ptrs, lens: &lens, max_len: t.max_len };
            k::sumsq_multi_fwd(dev, &mut acc.as_view_mut(), table)?;
            k::adamw_multi_fwd(dev, table, &acc.as_view(), p.grad_clip_norm, &h)?;
        }
        // the step's one synchronisation, after everything is queued
        let sq = download(dev, &view(&acc, 0, 1)?)?.first().copied().unwrap_or(0.0);
        let grad_norm = (sq as f64).sqrt();
        if !grad_norm.is_finite() {
            return Err(CudaError::Engine(crate::engine::optim::non_finite_gradient(grad_norm)));
        }
        self.step = step;
        Ok(OptimMetrics { grad_norm, step, learning_rate: p.learning_rate })
    }
}
