//! Linear layers on the device: [`DLinear`] (one weight, or several that read the same input
//! stacked along the output: q|k|v and gate|up, one GEMM each) and the LoRA-aware forward and
//! backward over it, each target's segmented LoRA working in place on its column window of the
//! output ([`Part`]).

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

use super::launch::{self as k, BLayout, LoraSegs, LoraTensor, SegCall};
use super::model::{Act, CudaModel, R, scratch, up_t, up_w, upload, view, view_mut};
use super::workspace::Buf;
use super::{CudaDevice, CudaError};
use crate::engine::models::Linear;

/// A linear layer on the device: weight [out, in] (HF layout), optional bias [out].
pub(crate) struct DLinear<T> {
    pub w: CudaSlice<T>,
    pub b: Option<CudaSlice<T>>,
    pub inp: usize,
    pub out: usize,
}

impl<T: Act> DLinear<T> {
    pub(super) fn new(dev: &CudaDevice, lin: &Linear) -> R<Self> {
        Ok(DLinear {
            w: up_w(dev, &lin.w)?,
            b: lin.b.as_deref().map(|b| up_t(dev, b)).transpose()?,
            inp: lin.in_dim(),
            out: lin.out_dim(),
        })
    }

    /// Host linears that read the same input as one: weights stacked along the output
    /// ([W_0; W_1; ..]), so one GEMM computes every output side by side (`[rows, out_0 | out_1
    /// | ..]`); see [`Self::stacked`].
    pub(super) fn fused(dev: &CudaDevice, lins: &[&Linear]) -> R<Self> {
        let inp = lins.first().map_or(0, |l| l.in_dim());
        let parts = lins
            .iter()
            .map(|l| {
                let b = l.b.as_deref().map(|b| b.iter().map(|&x| T::from_f32(x)).collect());
                (T::from_weight(&l.w), b)
            })
            .collect::<Vec<_>>();
        Self::stacked(dev, inp, &parts)
    }

    /// Uploads host parts (weight [out_i, inp] and optional bias [out_i] each) stacked along
    /// the output: the fused linear is exactly as large as its parts together. A part without a
    /// bias gets zeros when another has one (adding zero is exact).
    pub(crate) fn stacked(
        dev: &CudaDevice,
        inp: usize,
        parts: &[(impl AsRef<[T]>, Option<Vec<T>>)],
    ) -> R<Self> {
        let shape = |msg: String| CudaError::Shape { kernel: "DLinear::stacked", msg };
        let mut w = Vec::with_capacity(parts.iter().map(|p| p.0.as_ref().len()).sum());
        let mut outs = Vec::with_capacity(parts.len());
        for (pw, _) in parts {
            let pw = pw.as_ref();
            if inp == 0 || !pw.len().is_multiple_of(inp) {
                return Err(shape(format!("a part of {} elements is not [out, {inp}]", pw.len())));
            }
            outs.push(pw.len() / inp);
            w.extend_from_slice(pw);
        }
        let out = outs.iter().sum();
        let b = if parts.iter().any(|p| p.1.is_some()) {
            let mut b = Vec::with_capacity(out);
            for ((_, pb), &o) in parts.iter().zip(&outs) {
                match pb {
                    Some(pb) if pb.len() == o => b.extend_from_slice(pb),
                    Some(pb) => {
                        return Err(shape(format!("a bias of {} for {o} outputs", pb.len())));
                    }
                    None => b.extend(std::iter::repeat_n(T::from_f32(0.0), o)),
                }
            }
            Some(upload(dev, &b)?)
        } else {
            None
        };
        Ok(DLinear { w: upload(dev, &w)?, b, inp, out })
    }
}

/// Each part's LoRA intermediate x A^T [rows, max rank] (None without a LoRA).
pub(crate) type LoraH<const N: usize> = [Option<Buf<f32>>; N];

/// One target's LoRA on its column window of a linear's output: the pass's segments for it
/// (`None`: no adapter there) and the window's first column; the window is as wide as the
/// module's output. A plain linear has one part at column 0, a fused one (q|k|v, gate|up) one
/// part per target.
#[derive(Clone, Copy)]
pub(crate) struct Part<'s, 'a> {
    pub lora: Option<&'s LoraSegs<'a>>,
    pub off: usize,
}

impl<'s, 'a> Part<'s, 'a> {
    pub fn new(lora: Option<&'s LoraSegs<'a>>, off: usize) -> Self {
        Part { lora, off }
    }
}

impl<T: Act> CudaModel<T> {
    /// A part's LoRA on `lin` over `rows`: a scratch for its rank-sized intermediate
    /// [rows, max rank] (rows of segments without a LoRA here are neither written nor read),
    /// and the segment calls of A (the `inp` input columns) and B (the part's window of the
    /// `out` output columns).
    fn lora_plan(
        &self,
        rows: usize,
        lin: &DLinear<T>,
        ls: &LoraSegs<'_>,
        off: usize,
    ) -> R<(Buf<f32>, SegCall, SegCall)> {
        let hs = ls.max_rank();
        let h = scratch::<f32>(&self.dev, rows * hs)?;
        let c_in = SegCall::compact(0..rows, lin.inp, hs, 0);
        let c_out = SegCall::compact(0..rows, ls.dims.1, hs, 0).window(lin.out, off);
        Ok((h, c_in, c_out))
    }

    /// y = x W^T (+ bias) (+ residual), then each part's LoRA added into its column window of
    /// y (+ s (x A^T) B^T, each row with its segment's adapter); returns y and each part's LoRA
    /// intermediate h = x A^T [rows, max rank] (None without a LoRA). The bias and the residual
    /// [rows, out] are cuBLASLt epilogue inputs of the one GEMM, not passes of their own; the
    /// residual is only read (the layer keeps it for the backward).
    pub(crate) fn lin_fwd<const N: usize>(
        &self,
        x: &CudaView<'_, T>,
        rows: usize,
        lin: &DLinear<T>,
        parts: [Part<'_, '_>; N],
        residual: Option<&CudaView<'_, T>>,
    ) -> R<(Buf<T>, LoraH<N>)> {
        let dev = &*self.dev;
        k::need_len("lin_fwd", "x", x.len(), rows * lin.inp)?;
        // the GEMM writes all of y; the LoRA then adds to it
        let mut y = scratch::<T>(dev, rows * lin.out)?;
        let mut yv = view_mut(&mut y, 0, rows * lin.out)?;
        let bias = lin.b.as_ref().map(|b| b.as_view());
        let shape = (rows, lin.out, lin.inp);
        k::matmul_lt(dev, &mut yv, x, &lin.w.as_view(), bias.as_ref(), residual, shape)?;
        let mut hs: LoraH<N> = std::array::from_fn(|_| None);
        for (part, h_out) in parts.iter().zip(hs.iter_mut()) {
            let Some(ls) = part.lora else { continue };
            let (mut h, shrink, expand) = self.lora_plan(rows, lin, ls, part.off)?;
            let mut hv = view_mut(&mut h, 0, rows * ls.max_rank())?;
            // SAFETY: the pass's table addresses its adapters' live tensors (`SegLora::new`).
            unsafe {
                k::lora_seg(dev, k::SegOp::Shrink { h: &mut hv, x }, ls, LoraTensor::A, &shrink)?;
                let hv = hv.as_view();
                k::lora_seg(
                    dev,
                    k::SegOp::Expand { y: &mut yv, h: &hv },
                    ls,
                    LoraTensor::B,
                    &expand,
                )?;
            }
            *h_out = Some(h);
        }
        Ok((y, hs))
    }

    /// Backward of [`Self::lin_fwd`]: `dx (+)= dy W + s (dy B) A` summed over the parts (each
    /// reading its window of `dy`, with its saved intermediate), the LoRA gradients of the
    /// training segments accumulated.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn lin_bwd<const N: usize>(
        &self,
        dy: &CudaView<'_, T>,
        x: &CudaView<'_, T>,
        rows: usize,
        lin: &DLinear<T>,
        parts: [(Part<'_, '_>, Option<&Buf<f32>>); N],
        dx: &mut CudaViewMut<'_, T>,
        accumulate: bool,
    ) -> R<()> {
        let dev = &*self.dev;
        let beta = if accumulate { 1.0 } else { 0.0 };
        k::matmul::<T, T>(
            dev,
            dx,
            dy,
            &lin.w.as_view(),
            BLayout::Kn,
            (rows, lin.inp, lin.out),
            1.0,
            beta,
        )?;
        for (part, h) in parts {
            let (Some(ls), Some(h)) = (part.lora, h) else { continue };
            let hs = ls.max_rank();
            let (mut dh, c_in, c_out) = self.lora_plan(rows, lin, ls, part.off)?;
            let mut dhv = view_mut(&mut dh, 0, rows * hs)?;
            // SAFETY: the pass's table addresses its adapters' live tensors (`SegLora::new`).
            unsafe {
                k::lora_seg(
                    dev,
                    k::SegOp::Shrink { h: &mut dhv, x: dy },
                    ls,
                    LoraTensor::B,
                    &c_out,
                )?;
                let dhv = dhv.as_view();
                k::lora_seg(dev, k::SegOp::Expand { y: dx, h: &dhv }, ls, LoraTensor::A, &c_in)?;
                k::lora_seg(dev, k::SegOp::Wgrad { u: &dhv, v: x }, ls, LoraTensor::GradA, &c_in)?;
                let hv = view(h, 0, rows * hs)?;
                k::lora_seg(dev, k::SegOp::Wgrad { u: &hv, v: dy }, ls, LoraTensor::GradB, &c_out)?;
            }
        }
        Ok(())
    }
}
