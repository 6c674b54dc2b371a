//! Launchers for `kernels/loss.cu` (chunked cross-entropy, RL loss variants) and
//! `kernels/adamw.cu`.

use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, LaunchArgs, LaunchConfig, PushKernelArg};

use super::views::Logits;
use super::{
    Args, Dtype, Kernel, blocks, grid_dim, grid_stride, int, long, need_len, per_item_cfg, row_cfg,
    shape_err, sym,
};
use crate::engine::cuda::{CudaDevice, CudaError};
use crate::engine::loss::LossFn;

const XENT_THREADS: u32 = 256;

/// Checks a logits chunk [n, ld] holding `vc` valid columns; returns n.
pub(super) fn chunk_rows(
    k: &'static str,
    len: usize,
    ld: usize,
    vc: usize,
) -> Result<usize, CudaError> {
    if vc == 0 || ld < vc || !len.is_multiple_of(ld) {
        return Err(shape_err(
            k,
            format!("logits of {len} elements is not [n, ld = {ld}] with {vc} <= ld columns"),
        ));
    }
    Ok(len / ld)
}

/// Checks `targets` [n, K] with n >= 1 rows and K >= 1; returns K.
fn targets_per_row(k: &'static str, targets: usize, n: usize) -> Result<usize, CudaError> {
    if n == 0 || !targets.is_multiple_of(n) || targets == 0 {
        return Err(shape_err(k, format!("targets of {targets} elements is not [{n}, K >= 1]")));
    }
    Ok(targets / n)
}

/// The running per-row state of the chunked cross-entropy: max `m` [n], sum-exp `s` [n] and the
/// target logits `tgt` [n, K] (mutable views while [`xent_fwd`] merges chunks in, views for
/// [`xent_finish_fwd`]).
#[derive(Debug, Clone, Copy)]
pub struct XentAcc<V> {
    pub m: V,
    pub s: V,
    pub tgt: V,
}

/// What the cross-entropy backward reads per row besides the logits: targets [n, K], the
/// coefficients [n, K] and the forward's lse [n].
#[derive(Debug, Clone, Copy)]
pub struct XentRows<'r, 'a> {
    pub targets: &'r CudaView<'a, i32>,
    pub coef: &'r CudaView<'a, f32>,
    pub lse: &'r CudaView<'a, f32>,
}

/// Merges one vocabulary chunk of `logits` ([n, ld], its `cols` valid columns being vocabulary
/// columns `v0 .. v0 + cols`) into the running `acc`, picking up the target logits for targets
/// [n, K] inside the chunk. `first` initialises the state.
pub fn xent_fwd<T: Dtype>(
    dev: &CudaDevice,
    acc: XentAcc<&mut CudaViewMut<'_, f32>>,
    logits: Logits<'_, '_, T>,
    v0: usize,
    targets: &CudaView<'_, i32>,
    first: bool,
) -> Result<(), CudaError> {
    let kn = sym!(T, "xent_fwd");
    let XentAcc { m, s, tgt } = acc;
    let (n, vc) = (logits.rows(kn)?, logits.cols);
    need_len(kn, "m", m.len(), n)?;
    need_len(kn, "s", s.len(), n)?;
    let kt = targets_per_row(kn, targets.len(), n)?;
    need_len(kn, "tgt", tgt.len(), n * kt)?;
    let (ldl, v0i, vci, kti, ni) = (
        long(kn, "ld", logits.ld)?,
        int(kn, "v0", v0)?,
        int(kn, "vc", vc)?,
        int(kn, "K", kt)?,
        int(kn, "n", n)?,
    );
    int(kn, "v0 + vc", v0 + vc)?;
    let first = i32::from(first);
    let cfg = row_cfg(kn, n, XENT_THREADS)?;
    // the chunk read once: max, exp and sum (~20 FLOPs an element with the exp)
    let e = (n * vc) as f64;
    let f = Kernel::load(dev, "loss.cu", kn)?.cost(20.0 * e, e * std::mem::size_of::<T>() as f64);
    let l = logits.data;
    // SAFETY: logits [n, ld] with vc <= ld, m/s [n], tgt/targets [n, K] (checked).
    unsafe { f.launch(cfg, (m, s, tgt, l, &ldl, &v0i, &vci, targets, &kti, &ni, &first)) }
}

/// After the last chunk: lse = m + ln(s) [n]; logprob = tgt - lse [n, K] (0 where target < 0).
pub fn xent_finish_fwd(
    dev: &CudaDevice,
    (lse, logprob): (&mut CudaViewMut<'_, f32>, &mut CudaViewMut<'_, f32>),
    acc: XentAcc<&CudaView<'_, f32>>,
    targets: &CudaView<'_, i32>,
) -> Result<(), CudaError> {
    let kn = "xent_finish_fwd_f32";
    let XentAcc { m, s, tgt } = acc;
    let n = m.len();
    need_len(kn, "s", s.len(), n)?;
    need_len(kn, "lse", lse.len(), n)?;
    let kt = targets_per_row(kn, targets.len(), n)?;
    need_len(kn, "tgt", tgt.len(), n * kt)?;
    need_len(kn, "logprob", logprob.len(), n * kt)?;
    let (kti, ni) = (int(kn, "K", kt)?, int(kn, "n", n)?);
    int(kn, "n * K", n * kt)?;
    let cfg = per_item_cfg(kn, "blocks", n * kt, 256)?;
    let f = Kernel::load(dev, "loss.cu", kn)?;
    // SAFETY: m/s/lse [n], tgt/targets/logprob [n, K] (checked); one thread per (row, k).
    unsafe { f.launch(cfg, (lse, logprob, m, s, tgt, targets, &kti, &ni)) }
}

/// The backward into `dst` [n, ldd] from the logits chunk `src` (None: `dst` itself, in place),
/// [n, ld] with `vc` valid columns starting at vocabulary column `v0`; `cols` = (ld, v0, vc).
fn xent_bwd_raw<T: Dtype>(
    dev: &CudaDevice,
    (dst, ldd): (&mut CudaViewMut<'_, T>, usize),
    src: Option<&CudaView<'_, T>>,
    (ld, v0, vc): (usize, usize, usize),
    rows: XentRows<'_, '_>,
) -> Result<(), CudaError> {
    let kn = sym!(T, "xent_bwd");
    let XentRows { targets, coef, lse } = rows;
    let n = chunk_rows(kn, src.map(|s| s.len()).unwrap_or(dst.len()), ld, vc)?;
    if ldd < vc || dst.len() != n * ldd {
        return Err(shape_err(
            kn,
            format!("dlogits of {} elements is not [{n}, ldd = {ldd} >= {vc}]", dst.len()),
        ));
    }
    need_len(kn, "lse", lse.len(), n)?;
    let kt = targets_per_row(kn, targets.len(), n)?;
    need_len(kn, "coef", coef.len(), n * kt)?;
    let (lddl, ldl, v0i, vci, kti, ni) = (
        long(kn, "ldd", ldd)?,
        long(kn, "ld", ld)?,
        int(kn, "v0", v0)?,
        int(kn, "vc", vc)?,
        int(kn, "K", kt)?,
        int(kn, "n", n)?,
    );
    // the in-place form reads the logits through dst's own address
    let src_ptr = if src.is_some() {
        0
    } else {
        let (p, sync) = dst.device_ptr(dev.stream());
        drop(sync);
        p
    };
    let cfg = row_cfg(kn, n, XENT_THREADS)?;
    // the chunk read and its gradient written (an exp and a few FLOPs an element)
    let e = (n * vc) as f64;
    let f =
        Kernel::load(dev, "loss.cu", kn)?.cost(20.0 * e, 2.0 * e * std::mem::size_of::<T>() as f64);
    // SAFETY: logits [n, ld] (or dst itself, same shape, for the in-place form: the kernel reads
    // each element before writing it, in the same thread), dst [n, ldd], targets/coef [n, K],
    // lse [n] (checked).
    unsafe {
        f.launch_with(cfg, |l| {
            l.arg(dst).arg(&lddl);
            match src {
                Some(s) => l.arg(s),
                None => l.arg(&src_ptr),
            };
            l.arg(&ldl).arg(&v0i).arg(&vci).arg(targets).arg(coef).arg(lse).arg(&kti).arg(&ni);
        })
    }
}

/// dlogits[n, v] = sum_k coef[n, k] (softmax[n, v] - [v == targets[n, k]]) for one chunk
/// (the `cols` valid columns of `logits` being vocabulary columns v0 ..); coef =
/// -dLoss/dlogprob (for cross-entropy: the weights).
pub fn xent_bwd<T: Dtype>(
    dev: &CudaDevice,
    (dlogits, ldd): (&mut CudaViewMut<'_, T>, usize),
    logits: Logits<'_, '_, T>,
    v0: usize,
    rows: XentRows<'_, '_>,
) -> Result<(), CudaError> {
    let cols = (logits.ld, v0, logits.cols);
    xent_bwd_raw(dev, (dlogits, ldd), Some(logits.data), cols, rows)
}

/// [`xent_bwd`] overwriting the logits chunk [n, ld] (vocabulary columns `v0 .. v0 + vc`) with
/// its gradient (saves a [n, ld] buffer).
pub fn xent_bwd_inplace<T: Dtype>(
    dev: &CudaDevice,
    (logits, ld): (&mut CudaViewMut<'_, T>, usize),
    (v0, vc): (usize, usize),
    rows: XentRows<'_, '_>,
) -> Result<(), CudaError> {
    xent_bwd_raw(dev, (logits, ld), None, (ld, v0, vc), rows)
}

/// Per-token RL objective (loss = -sum objective); `a`/`b` are the variant's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossVariant {
    /// exp(lp - lp_sampler) * A.
    ImportanceSampling,
    /// min(r A, clamp(r, low, high) A).
    Ppo { clip_low: f32, clip_high: f32 },
    /// stopgrad(clamp(r, low, high)) A lp.
    Cispo { clip_low: f32, clip_high: f32 },
    /// lp A - beta/2 (lp - lp_sampler)^2.
    Dro { beta: f32 },
}

impl LossVariant {
    fn code(self) -> (i32, f32, f32) {
        match self {
            LossVariant::ImportanceSampling => (1, 0.0, 0.0),
            LossVariant::Ppo { clip_low, clip_high } => (2, clip_low, clip_high),
            LossVariant::Cispo { clip_low, clip_high } => (3, clip_low, clip_high),
            LossVariant::Dro { beta } => (4, beta, 0.0),
        }
    }
}

/// The per-token inputs of the RL losses besides the logprobs: the sampler's logprobs and the
/// advantages.
#[derive(Debug, Clone, Copy)]
pub struct RlInputs<'r, 'a> {
    pub sampler_logprob: &'r CudaView<'a, f32>,
    pub advantages: &'r CudaView<'a, f32>,
}

/// loss[n] = -objective * w and coef[n] = d objective / d logprob * w (feed coef to
/// [`xent_bwd`]). `weights` None means 1.
pub fn loss_fwd(
    dev: &CudaDevice,
    (loss, coef): (&mut CudaViewMut<'_, f32>, &mut CudaViewMut<'_, f32>),
    logprob: &CudaView<'_, f32>,
    rl: RlInputs<'_, '_>,
    weights: Option<&CudaView<'_, f32>>,
    variant: LossVariant,
) -> Result<(), CudaError> {
    let kn = "loss_fwd_f32";
    let RlInputs { sampler_logprob, advantages } = rl;
    let n = logprob.len();
    for (name, len) in [
        ("loss", loss.len()),
        ("coef", coef.len()),
        ("sampler_logprob", sampler_logprob.len()),
        ("advantages", advantages.len()),
    ] {
        need_len(kn, name, len, n)?;
    }
    if let Some(w) = weights {
        need_len(kn, "weights", w.len(), n)?;
    }
    if n == 0 {
        return Ok(());
    }
    let ni = int(kn, "n", n)?;
    let (code, a, b) = variant.code();
    let null: u64 = 0;
    let f = Kernel::load(dev, "loss.cu", kn)?;
    // SAFETY: all buffers hold n floats (checked); a null weights pointer means 1 in the kernel.
    unsafe {
        f.launch_with(grid_stride(n), |l| {
            l.arg(loss).arg(coef).arg(logprob).arg(sampler_logprob).arg(advantages);
            match weights {
                Some(w) => l.arg(w),
                None => l.arg(&null),
            };
            l.arg(&ni).arg(&code).arg(&a).arg(&b);
        })
    }
}

/// Per-target terms of `loss` on the device, exactly `LossFn::term` in f64: `out` [2, N*K]
/// receives the loss terms then the logprobs (widened), `coef` [N, K] = -dLoss/dlogprob as f32
/// (what [`xent_bwd`] takes); all 0 where `targets` < 0. `weights` [N, K] (cross-entropy
/// weights), `rl`'s two [N] (zeros where a loss does not read them).
pub fn loss_term_fwd(
    dev: &CudaDevice,
    (out, coef): (&mut CudaViewMut<'_, f64>, &mut CudaViewMut<'_, f32>),
    logprob: &CudaView<'_, f32>,
    (targets, weights): (&CudaView<'_, i32>, &CudaView<'_, f32>),
    rl: RlInputs<'_, '_>,
    loss: &LossFn,
) -> Result<(), CudaError> {
    let kn = "loss_term_fwd_f32";
    let RlInputs { sampler_logprob, advantages } = rl;
    let n = sampler_logprob.len();
    let nk = logprob.len();
    if n == 0 || nk % n != 0 || nk < n {
        return Err(shape_err(kn, format!("logprob of {nk} elements is not [{n}, K >= 1]")));
    }
    need_len(kn, "advantages", advantages.len(), n)?;
    for (name, len) in
        [("coef", coef.len()), ("targets", targets.len()), ("weights", weights.len())]
    {
        need_len(kn, name, len, nk)?;
    }
    need_len(kn, "out", out.len(), 2 * nk)?;
    let (kti, nki) = (int(kn, "K", nk / n)?, int(kn, "N * K", nk)?);
    int(kn, "2 * N * K", 2 * nk)?;
    // an exhaustive match: a new LossFn variant must get a kernel branch
    let (variant, a, b): (i32, f64, f64) = match *loss {
        LossFn::CrossEntropy => (0, 0.0, 0.0),
        LossFn::ImportanceSampling => (1, 0.0, 0.0),
        LossFn::Ppo { clip_low, clip_high } => (2, clip_low, clip_high),
        LossFn::Cispo { clip_low, clip_high } => (3, clip_low, clip_high),
        LossFn::Dro { beta } => (4, beta, 0.0),
    };
    let cfg = per_item_cfg(kn, "blocks", nk, 256)?;
    let f = Kernel::load(dev, "loss.cu", kn)?;
    // SAFETY: out holds 2 N K doubles, coef/logprob/targets/weights N K, sampler_logprob and
    // advantages N (checked); signature (double*, float*, const float*, const int*, const
    // float*, const float*, const float*, int, int, int, double, double); one thread per target.
    unsafe {
        f.launch_with(cfg, |l| {
            (out, coef, logprob, targets, weights, sampler_logprob, advantages).push(l);
            (&kti, &nki, &variant, &a, &b).push(l);
        })
    }
}

/// One AdamW step's hyper-parameters (Tinker AdamParams plus the step and the clip factor).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamStep {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// 1-based step number (for bias correction).
    pub step: u32,
    /// Gradient multiplier: min(1, grad_clip_norm / global_norm), or 1.
    pub grad_scale: f32,
}

/// In-place AdamW over flat f32 buffers p, g, m, v of equal length.
pub fn adamw_fwd(
    dev: &CudaDevice,
    p: &mut CudaViewMut<'_, f32>,
    g: &CudaView<'_, f32>,
    m: &mut CudaViewMut<'_, f32>,
    v: &mut CudaViewMut<'_, f32>,
    h: &AdamStep,
) -> Result<(), CudaError> {
    let kn = "adamw_fwd_f32";
    let n = p.len();
    need_len(kn, "g", g.len(), n)?;
    need_len(kn, "m", m.len(), n)?;
    need_len(kn, "v", v.len(), n)?;
    let (bc1, bc2) = bias_corrections(kn, h)?;
    if n == 0 {
        return Ok(());
    }
    let nl = long(kn, "n", n)?;
    let f = Kernel::load(dev, "adamw.cu", kn)?;
    // SAFETY: p, g, m, v each hold n floats (checked).
    unsafe {
        f.launch_with(grid_stride(n), |l| {
            l.arg(p).arg(g).arg(m).arg(v).arg(&nl);
            push_adam(l, h, &bc1, &bc2);
            l.arg(&h.grad_scale);
        })
    }
}

/// The tensor table of the multi-tensor optimizer kernels (see adamw.cu): `ptrs` [count, 4] =
/// (p, g, m, v) addresses, `lens` [count], `max_len` = the largest of `lens`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TensorTable<'r, 'a> {
    pub ptrs: &'r CudaView<'a, u64>,
    pub lens: &'r CudaView<'a, i64>,
    pub max_len: usize,
}

impl TensorTable<'_, '_> {
    /// Checks the table and returns its grid (x splits the longest tensor, y = tensor) and the
    /// kernel's count, or None for an empty table.
    fn setup(&self, kn: &'static str) -> Result<Option<(LaunchConfig, i32)>, CudaError> {
        let count = self.lens.len();
        need_len(kn, "ptrs", self.ptrs.len(), 4 * count)?;
        if count == 0 {
            return Ok(None);
        }
        let x = self.max_len.div_ceil(256).clamp(1, 512) as u32;
        let cfg = blocks((x, grid_dim(kn, "tensors", count, 65535)?, 1), 256);
        Ok(Some((cfg, int(kn, "tensors", count)?)))
    }
}

/// acc[0] += sum of g^2 over every tensor of `table`.
///
/// # Safety
/// Every row of `table.ptrs` must address live f32 buffers of the row's length on this device,
/// not written by anything else while the stream runs the kernel.
pub(crate) unsafe fn sumsq_multi_fwd(
    dev: &CudaDevice,
    acc: &mut CudaViewMut<'_, f32>,
    table: TensorTable<'_, '_>,
) -> Result<(), CudaError> {
    let kn = "sumsq_multi_fwd_f32";
    need_len(kn, "acc", acc.len(), 1)?;
    let Some((cfg, nt)) = table.setup(kn)? else {
        return Ok(());
    };
    let (ptrs, lens) = (table.ptrs, table.lens);
    let f = Kernel::load(dev, "adamw.cu", kn)?;
    // SAFETY: acc holds 1 float, ptrs 4 addresses per tensor and lens one length (checked); the
    // addressed buffers are live and sized as lens says (this function's contract).
    unsafe { f.launch(cfg, (acc, ptrs, lens, &nt)) }
}

/// AdamW over every tensor of the table (as [`sumsq_multi_fwd`]), with the global-norm clip
/// factor computed on the device from `sumsq` [1] and `clip_norm` (0 = off; the CPU's rule),
/// and the gradients zeroed afterwards. `h.grad_scale` is ignored.
///
/// # Safety
/// As [`sumsq_multi_fwd`]; additionally p, m, v and g of each row are written.
pub(crate) unsafe fn adamw_multi_fwd(
    dev: &CudaDevice,
    table: TensorTable<'_, '_>,
    sumsq: &CudaView<'_, f32>,
    clip_norm: f64,
    h: &AdamStep,
) -> Result<(), CudaError> {
    let kn = "adamw_multi_fwd_f32";
    need_len(kn, "sumsq", sumsq.len(), 1)?;
    let (bc1, bc2) = bias_corrections(kn, h)?;
    let Some((cfg, nt)) = table.setup(kn)? else {
        return Ok(());
    };
    let (ptrs, lens) = (table.ptrs, table.lens);
    let f = Kernel::load(dev, "adamw.cu", kn)?;
    // SAFETY: table and sumsq sized as checked; the addressed buffers are live, sized as lens
    // says and not aliased (this function's contract).
    unsafe {
        f.launch_with(cfg, |l| {
            l.arg(ptrs).arg(lens).arg(&nt).arg(sumsq).arg(&clip_norm);
            push_adam(l, h, &bc1, &bc2);
        })
    }
}

/// Pushes the hyper-parameters both AdamW kernels take in the same order: lr, beta1, beta2,
/// eps, weight_decay and the two bias corrections.
fn push_adam<'a>(l: &mut LaunchArgs<'a>, h: &'a AdamStep, bc1: &'a f32, bc2: &'a f32) {
    l.arg(&h.lr).arg(&h.beta1).arg(&h.beta2).arg(&h.eps).arg(&h.weight_decay);
    l.arg(bc1).arg(bc2);
}

/// (1 - beta1^t, 1 - beta2^t) as f32, refusing step 0 and betas >= 1.
fn bias_corrections(kn: &'static str, h: &AdamStep) -> Result<(f32, f32), CudaError> {
    if h.step == 0 {
        return Err(shape_err(kn, "step must be >= 1 (bias correction divides by 1 - beta^step)"));
    }
    let bc1 = 1.0 - (h.beta1 as f64).powi(h.step.min(i32::MAX as u32) as i32);
    let bc2 = 1.0 - (h.beta2 as f64).powi(h.step.min(i32::MAX as u32) as i32);
    if bc1 <= 0.0 || bc2 <= 0.0 {
        return Err(shape_err(kn, format!("beta1 {} / beta2 {} must be < 1", h.beta1, h.beta2)));
    }
    Ok((bc1 as f32, bc2 as f32))
}
