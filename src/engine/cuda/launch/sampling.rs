//! Launchers for `kernels/sampling.cu`: greedy argmax and the stochastic draw, both with the
//! one definition of `engine::sampling`.

use cudarc::driver::{CudaView, CudaViewMut};

use super::views::{Logits, Picks};
use super::{Dtype, Kernel, int, long, map_n, need_len, row_cfg, shape_err, sym};
use crate::engine::cuda::{CudaDevice, CudaError};

const ARGMAX_THREADS: u32 = 1024;
const SAMPLE_THREADS: u32 = 1024;

/// The shape both picks share: `logits` [b, ld] with `cols` <= ld valid columns, `picks` [b];
/// returns b and the kernels' (ld, vocab).
fn pick_rows(
    kn: &'static str,
    picks: &Picks<'_, '_>,
    logits: &Logits<'_, '_, impl Dtype>,
) -> Result<(usize, i64, i32), CudaError> {
    let b = logits.rows(kn)?;
    need_len(kn, "out", picks.token.len(), b)?;
    need_len(kn, "logprob", picks.logprob.len(), b)?;
    Ok((b, long(kn, "ld", logits.ld)?, int(kn, "vocab", logits.cols)?))
}

/// Greedy pick per row of `logits` [B, ld] (first `cols` = vocab columns): the token is the
/// argmax (lowest index on ties, as the CPU sampler) and the logprob its log-softmax in the raw
/// distribution (f64 sum).
pub fn argmax_fwd<T: Dtype>(
    dev: &CudaDevice,
    picks: Picks<'_, '_>,
    logits: Logits<'_, '_, T>,
) -> Result<(), CudaError> {
    let kn = sym!(T, "argmax_fwd");
    let (b, ldl, vi) = pick_rows(kn, &picks, &logits)?;
    if b == 0 {
        return Ok(());
    }
    let cfg = row_cfg(kn, b, ARGMAX_THREADS)?;
    // one pass over each row's logits (a compare an element)
    let e = (b * logits.cols) as f64;
    let f = Kernel::load(dev, "sampling.cu", kn)?.cost(e, e * std::mem::size_of::<T>() as f64);
    // SAFETY: logits [b, ld] with vocab <= ld, token and logprob [b] (checked); signature (int*,
    // float*, const T*, long long, int); __launch_bounds__(1024), static shared memory only.
    unsafe { f.launch(cfg, (picks.token, picks.logprob, logits.data, &ldl, &vi)) }
}

/// Stochastic pick per row of `logits` [B, ld] (first `cols` = vocab columns), bit-exactly
/// `engine::sampling::sample_token`: `inv_t` [B] is `Draw::inv_t` (0.0 = greedy row: its pick
/// is left as it is, so run [`argmax_fwd`] first), `params` [B, 3] holds
/// `(Draw::top_k, Draw::top_p24, Draw::m)`. Writes the token (-1 if the row had no usable logits)
/// and its raw logprob (NaN for NaN, `+inf` or all `-inf` rows; callers reject those).
pub fn sample_fwd<T: Dtype>(
    dev: &CudaDevice,
    picks: Picks<'_, '_>,
    logits: Logits<'_, '_, T>,
    (inv_t, params): (&CudaView<'_, f64>, &CudaView<'_, u32>),
) -> Result<(), CudaError> {
    let kn = sym!(T, "sample_fwd");
    let (b, ldl, vi) = pick_rows(kn, &picks, &logits)?;
    need_len(kn, "inv_t", inv_t.len(), b)?;
    let p = b.checked_mul(3).ok_or_else(|| shape_err(kn, format!("{b} rows overflow")))?;
    need_len(kn, "params", params.len(), p)?;
    if b == 0 {
        return Ok(());
    }
    // Small vocabularies need no 1024 threads (whole warps; the kernel takes any such size).
    let vocab = logits.cols;
    let threads = (vocab.div_ceil(32) * 32).min(SAMPLE_THREADS as usize) as u32;
    let cfg = row_cfg(kn, b, threads)?;
    // the row read for the maximum, then again for the weights (an exp ~ 20 FLOPs)
    let e = (b * vocab) as f64;
    let f = Kernel::load(dev, "sampling.cu", kn)?
        .cost(20.0 * e, 2.0 * e * std::mem::size_of::<T>() as f64);
    // SAFETY: logits [b, ld] with vocab <= ld, token, logprob and inv_t [b], params [b, 3]
    // (checked); signature (int*, float*, const T*, long long, int, const double*, const u32*);
    // at most __launch_bounds__(1024) threads, static shared memory only.
    unsafe { f.launch(cfg, (picks.token, picks.logprob, logits.data, &ldl, &vi, inv_t, params)) }
}

/// `out[i] = det_exp(d[i])` (`engine::sampling_weight`) on the device, element-wise: the check
/// that the kernel's exp has the host's bits, on which the draw's parity rests.
pub fn sample_exp_fwd(
    dev: &CudaDevice,
    out: &mut CudaViewMut<'_, f64>,
    d: &CudaView<'_, f64>,
) -> Result<(), CudaError> {
    // SAFETY: signature (double*, const double*, long long); grid-stride loop over indices < n,
    // no shared memory.
    unsafe { map_n(dev, "sampling.cu", "sample_exp_fwd", out, &[("d", d)]) }
}
