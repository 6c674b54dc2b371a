//! Launchers for `kernels/flash.cu`: tensor-core flash attention, the path [`super::attention_fwd`]
//! and [`super::attention_bwd`] take for bf16 at head dims 32, 64 and 128 (attention.cu's CUDA-core
//! kernels keep f32 and the other head dims). Callers have checked every shape already.

use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, LaunchConfig};

use super::attention::{AttentionShape, attention_cost, tile_cfg};
use super::{Dtype, Kernel, int};
use crate::engine::cuda::{CudaDevice, CudaError};

// Tile constants of flash.cu (keep in sync with the #defines there).
const FL_BM: usize = 64;
const FL_BN: usize = 64;
const FL_BN_DQ: usize = 32;
const FL_BQ_KV: usize = 32;
const FL_PAD: usize = 8;
const FL_THREADS: u32 = 128;
const BF16: usize = 2;

/// The (forward, dQ, dK/dV) kernels for head dim `hd`, if flash.cu instantiates it.
fn kernels(hd: usize) -> Option<[&'static str; 3]> {
    match hd {
        32 => Some(["flash_fwd_hd32_bf16", "flash_bwd_dq_hd32_bf16", "flash_bwd_dkdv_hd32_bf16"]),
        64 => Some(["flash_fwd_hd64_bf16", "flash_bwd_dq_hd64_bf16", "flash_bwd_dkdv_hd64_bf16"]),
        128 => {
            Some(["flash_fwd_hd128_bf16", "flash_bwd_dq_hd128_bf16", "flash_bwd_dkdv_hd128_bf16"])
        }
        _ => None,
    }
}

fn fwd_smem(hd: usize) -> usize {
    (FL_BM + FL_BN) * (hd + FL_PAD) * BF16 + hd * (FL_BN + FL_PAD) * BF16
}

fn dq_smem(hd: usize) -> usize {
    (2 * FL_BM + 2 * FL_BN_DQ) * (hd + FL_PAD) * BF16 + hd * (FL_BN_DQ + FL_PAD) * BF16
}

fn dkdv_smem(hd: usize) -> usize {
    (2 * FL_BM + 2 * FL_BQ_KV) * (hd + FL_PAD) * BF16
        + 2 * hd * (FL_BQ_KV + FL_PAD) * BF16
        + 2 * FL_BQ_KV * 4
}

/// Device address of a view, for [`serves`] (event tracking is off, so the guard records
/// nothing).
pub(super) fn addr<P: DevicePtr<T>, T>(dev: &CudaDevice, p: &P) -> u64 {
    p.device_ptr(dev.stream()).0
}

/// Whether flash.cu serves a call: bf16, an instantiated head dim, and every row pointer 16-byte
/// aligned (the kernels move rows as `uint4`; a view at an odd offset takes attention.cu instead).
pub(super) fn serves<T: Dtype>(hd: usize, ptrs: &[u64]) -> bool {
    T::IS_BF16 && kernels(hd).is_some() && ptrs.iter().all(|p| p % 16 == 0)
}

fn cfg(
    f: &Kernel<'_>,
    smem: usize,
    heads: usize,
    s: &AttentionShape,
    batch: usize,
) -> Result<LaunchConfig, CudaError> {
    tile_cfg(f, smem, FL_THREADS, (FL_BM, heads), s, batch)
}

/// Forward: out [t, Hq, hd] and lse [t, Hq] from q, k, v over `batch` packed sequences.
#[allow(clippy::too_many_arguments)]
pub(super) fn fwd<T: Dtype>(
    dev: &CudaDevice,
    out: &mut CudaViewMut<'_, T>,
    lse: &mut CudaViewMut<'_, f32>,
    q: &CudaView<'_, T>,
    k: &CudaView<'_, T>,
    v: &CudaView<'_, T>,
    cu_seqlens: &CudaView<'_, i32>,
    s: &AttentionShape,
    (t, batch): (usize, usize),
) -> Result<(), CudaError> {
    let Some([kn, _, _]) = kernels(s.head_dim) else {
        return Err(super::shape_err("flash_fwd", format!("head_dim {}", s.head_dim)));
    };
    let (fl, by) = attention_cost::<T>(s, t, batch, (4.0, 2.0));
    let f = Kernel::load(dev, "flash.cu", kn)?.cost(fl, by);
    let cfg = cfg(&f, fwd_smem(s.head_dim), s.q_heads, s, batch)?;
    let ti = int(kn, "tokens", t)?;
    let (hq, hkv) = (int(kn, "q_heads", s.q_heads)?, int(kn, "kv_heads", s.kv_heads)?);
    // SAFETY: out/q are [t, hq, hd], k/v [t, hkv, hd], lse [t, hq] (checked by the caller), every
    // pointer 16-byte aligned (serves); cu_seqlens entries are clamped in the kernel; smem
    // matches flash.cu's carve-up (fwd_smem).
    unsafe { f.launch(cfg, (out, lse, q, k, v, cu_seqlens, &ti, &hq, &hkv, &s.scale)) }
}

/// Backward: dq, dk, dv from dout and the forward's inputs, lse and `delta` (= rowsum(dO * O),
/// computed by the caller). Two kernels, so nothing is accumulated with atomics.
#[allow(clippy::too_many_arguments)]
pub(super) fn bwd<T: Dtype>(
    dev: &CudaDevice,
    (dq, dk, dv): (&mut CudaViewMut<'_, T>, &mut CudaViewMut<'_, T>, &mut CudaViewMut<'_, T>),
    dout: &CudaView<'_, T>,
    (q, k, v): (&CudaView<'_, T>, &CudaView<'_, T>, &CudaView<'_, T>),
    (lse, delta): (&CudaView<'_, f32>, &CudaView<'_, f32>),
    cu_seqlens: &CudaView<'_, i32>,
    s: &AttentionShape,
    (t, batch): (usize, usize),
) -> Result<(), CudaError> {
    let Some([_, kq, kkv]) = kernels(s.head_dim) else {
        return Err(super::shape_err("flash_bwd", format!("head_dim {}", s.head_dim)));
    };
    let ti = int(kq, "tokens", t)?;
    let (hq, hkv) = (int(kq, "q_heads", s.q_heads)?, int(kq, "kv_heads", s.kv_heads)?);

    // dQ: Q K^T, dO V^T and dS K per pair (6 FLOPs per dim); reads q, dout, k, v, writes dq
    let (fl, by) = attention_cost::<T>(s, t, batch, (6.0, 3.0));
    let f = Kernel::load(dev, "flash.cu", kq)?.cost(fl, by);
    let c = cfg(&f, dq_smem(s.head_dim), s.q_heads, s, batch)?;
    // SAFETY: dq/dout/q are [t, hq, hd], k/v [t, hkv, hd], lse/delta [t, hq] (checked by the
    // caller), pointers 16-byte aligned (serves); smem matches flash.cu (dq_smem).
    unsafe {
        f.launch(c, (dq, dout, q, k, v, lse, delta, cu_seqlens, &ti, &hq, &hkv, &s.scale))?;
    }

    // dK/dV: K Q^T, V dO^T, P^T dO and dS^T Q per pair (8 FLOPs per dim)
    let (fl, by) = attention_cost::<T>(s, t, batch, (8.0, 4.0));
    let f = Kernel::load(dev, "flash.cu", kkv)?.cost(fl, by);
    let c = cfg(&f, dkdv_smem(s.head_dim), s.kv_heads, s, batch)?;
    // SAFETY: as above, dk/dv [t, hkv, hd]; smem matches flash.cu (dkdv_smem).
    unsafe {
        f.launch(c, (dk, dv, dout, q, k, v, lse, delta, cu_seqlens, &ti, &hq, &hkv, &s.scale))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_fits_every_sm80_plus_card() {
        // hd 128: Q + K tiles of 64 x 136 and V^T 128 x 72
        assert_eq!(fwd_smem(128), 128 * 136 * 2 + 128 * 72 * 2);
        for hd in [32, 64, 128] {
            assert!(kernels(hd).is_some());
            // 99 KiB: the opt-in limit of sm_86 / sm_89, the smallest of the sm_80+ family
            for (what, b) in [("fwd", fwd_smem(hd)), ("dq", dq_smem(hd)), ("dkdv", dkdv_smem(hd))] {
                assert!(b <= 99 * 1024, "{what} hd {hd}: {b} B");
            }
        }
        assert!(kernels(96).is_none() && kernels(256).is_none());
    }
}
