//! Launchers for `kernels/loss.cu` (chunked cross-entropy, RL loss variants) and
//! `kernels/adamw.cu`.

use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, LaunchArgs, LaunchConfig, PushKernelArg};

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

/// Merges one vocabulary chunk of logits ([n, ld], columns `v0 .. v0 + vc` of the vocabulary)
/// into the running per-row (max `m`, sum-exp `s`) and picks up target logits `tgt` [n, K]
/// for targets [n, K] inside the chunk. `first` initialises m, s and tgt.
#[allow(clippy::too_many_arguments)]
pub fn xent_fwd<T: Dtype>(
    dev: &CudaDevice,
    m: &mut CudaViewMut<'_, f32>,
    s: &mut CudaViewMut<'_, f32>,
    tgt: &mut CudaViewMut<'_, f32>,
    logits: &CudaView<'_, T>,
    ld: usize,
    v0: usize,
    vc: usize,
    targets: &CudaView<'_, i32>,
    first: bool,
) -> Result<(), CudaError> {
    let kn = sym!(T, "xent_fwd");
    let n = chunk_rows(kn, logits.len(), ld, vc)?;
    need_len(kn, "m", m.len(), n)?;
    need_len(kn, "s", s.len(), n)?;
    let kt = targets_per_row(kn, targets.len(), n)?;
    need_len(kn, "tgt", tgt.len(), n * kt)?;
    let (ldl, v0i, vci, kti, ni) = (
        long(kn, "ld", ld)?,
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
    // SAFETY: logits [n, ld] with vc <= ld, m/s [n], tgt/targets [n, K] (checked).
    unsafe { f.launch(cfg, (m, s, tgt, logits, &ldl, &v0i, &vci, targets, &kti, &ni, &first)) }
}

/// After the last chunk: lse = m + ln(s) [n]; logprob = tgt - lse [n, K] (0 where target < 0).
pub fn xent_finish_fwd(
    dev: &CudaDevice,
    lse: &mut CudaViewMut<'_, f32>,
    logprob: &mut CudaViewMut<'_, f32>,
    m: &CudaView<'_, f32>,
    s: &CudaView<'_, f32>,
    tgt: &CudaView<'_, f32>,
    targets: &CudaView<'_, i32>,
) -> Result<(), CudaError> {
    let kn = "xent_finish_fwd_f32";
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

#[allow(clippy::too_many_arguments)]
fn xent_bwd_raw<T: Dtype>(
    dev: &CudaDevice,
    dst: &mut CudaViewMut<'_, T>,
    ldd: usize,
    src_ptr: Option<u64>,
    src: Option<&CudaView<'_, T>>,
    ld: usize,
    v0: usize,
    vc: usize,
    targets: &CudaView<'_, i32>,
    coef: &CudaView<'_, f32>,
    lse: &CudaView<'_, f32>,
) -> Result<(), CudaError> {
    let kn = sym!(T, "xent_bwd");
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
    if src.is_none() && src_ptr.is_none() {
        return Err(shape_err(kn, "no logits given"));
    }
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
            match (src, &src_ptr) {
                (Some(s), _) => l.arg(s),
                (None, Some(p)) => l.arg(p),
                (None, None) => unreachable!("refused above"),
            };
            l.arg(&ldl).arg(&v0i).arg(&vci).arg(targets).arg(coef).arg(lse).arg(&kti).arg(&ni);
        })
    }
}

/// dlogits[n, v] = sum_k coef[n, k] (softmax[n, v] - [v == targets[n, k]]) for one chunk
/// (columns v0 .. v0 + vc); coef = -dLoss/dlogprob (for cross-entropy: the weights).
#[allow(clippy::too_many_arguments)]
pub fn xent_bwd<T: Dtype>(
    dev: &CudaDevice,
    dlogits: &mut CudaViewMut<'_, T>,
    ldd: usize,
    logits: &CudaView<'_, T>,
    ld: usize,
    v0: usize,
    vc: usize,
    targets: &CudaView<'_, i32>,
    coef: &CudaView<'_, f32>,
    lse: &CudaView<'_, f32>,
) -> Result<(), CudaError> {
    xent_bwd_raw(dev, dlogits, ldd, None, Some(logits), ld, v0, vc, targets, coef, lse)
}

/// [`xent_bwd`] overwriting the logits chunk with its gradient (saves a [n, ld] buffer).
#[allow(clippy::too_many_arguments)]
pub fn xent_bwd_inplace<T: Dtype>(
    dev: &CudaDevice,
    logits: &mut CudaViewMut<'_, T>,
    ld: usize,
    v0: usize,
    vc: usize,
    targets: &CudaView<'_, i32>,
    coef: &CudaView<'_, f32>,
    lse: &CudaView<'_, f32>,
) -> Result<(), CudaError> {
    let (ptr, sync) = logits.device_ptr(dev.stream());
    drop(sync);
    xent_bwd_raw(dev, logits, ld, Some(ptr), None, ld, v0, vc, targets, coef, lse)
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

/// loss[n] = -objective * w and coef[n] = d objective / d logprob * w (feed coef to
/// [`xent_bwd`]). `weights` None means 1.
#[allow(clippy::too_many_arguments)]
pub fn loss_fwd(
    dev: &CudaDevice,
    loss: &mut CudaViewMut<'_, f32>,
    coef: &mut CudaViewMut<'_, f32>,
    logprob: &CudaView<'_, f32>,
    sampler_logprob: &CudaView<'_, f32>,
    advantages: &CudaView<'_, f32>,
    weights: Option<&CudaView<'_, f32>>,
    variant: LossVariant,
) -> Result<(), CudaError> {
    let kn = "loss_fwd_f32";
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
/// weights), `sampler_logprob` and `advantages` [N] (zeros where a loss does not read them).
#[allow(clippy::too_many_arguments)]
pub fn loss_term_fwd(
    dev: &CudaDevice,
    out: &mut CudaViewMut<'_, f64>,
    coef: &mut CudaViewMut<'_, f32>,
    logprob: &CudaView<'_, f32>,
    targets: &CudaView<'_, i32>,
    weights: &CudaView<'_, f32>,
    sampler_logprob: &CudaView<'_, f32>,
    advantages: &CudaView<'_, f32>,
    loss: &LossFn,
) -> Result<(), CudaError> {
    let kn = "loss_term_fwd_f32";
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

/// Checks a tensor table of the multi-tensor optimizer kernels (`ptrs` [count, 4], `lens`
/// [count]) and returns its grid (x splits the longest tensor, y = tensor) and the kernel's
/// count, or None for an empty table.
fn multi_setup(
    kn: &'static str,
    ptrs: usize,
    count: usize,
    max_len: usize,
) -> Result<Option<(LaunchConfig, i32)>, CudaError> {
    need_len(kn, "ptrs", ptrs, 4 * count)?;
    if count == 0 {
        return Ok(None);
    }
    let x = max_len.div_ceil(256).clamp(1, 512) as u32;
    let cfg = blocks((x, grid_dim(kn, "tensors", count, 65535)?, 1), 256);
    Ok(Some((cfg, int(kn, "tensors", count)?)))
}

/// acc[0] += sum of g^2 over every tensor of a table `ptrs` [count, 4] = (p, g, m, v)
/// addresses, `lens` [count] (see adamw.cu); `max_len` = the largest of `lens`.
///
/// # Safety
/// Every row of `ptrs` must address live f32 buffers of the row's length on this device,
/// not written by anything else while the stream runs the kernel.
pub(crate) unsafe fn sumsq_multi_fwd(
    dev: &CudaDevice,
    acc: &mut CudaViewMut<'_, f32>,
    ptrs: &CudaView<'_, u64>,
    lens: &CudaView<'_, i64>,
    max_len: usize,
) -> Result<(), CudaError> {
    let kn = "sumsq_multi_fwd_f32";
    need_len(kn, "acc", acc.len(), 1)?;
    let Some((cfg, nt)) = multi_setup(kn, ptrs.len(), lens.len(), max_len)? else {
        return Ok(());
    };
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
    ptrs: &CudaView<'_, u64>,
    lens: &CudaView<'_, i64>,
    max_len: usize,
    sumsq: &CudaView<'_, f32>,
    clip_norm: f64,
    h: &AdamStep,
) -> Result<(), CudaError> {
    let kn = "adamw_multi_fwd_f32";
    need_len(kn, "sumsq", sumsq.len(), 1)?;
    let (bc1, bc2) = bias_corrections(kn, h)?;
    let Some((cfg, nt)) = multi_setup(kn, ptrs.len(), lens.len(), max_len)? else {
        return Ok(());
    };
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
