//! `CudaModel`: the frozen base model resident on one GPU (weights uploaded once from the host
//! [`Model`], stored as `T` = bf16 or f32), and the device-side decoder layer: forward with saved
//! activations and the explicit backward, mirroring `engine::transformer` step for step.
//!
//! Attention kernels need a head dimension that is a multiple of 32; other head sizes are
//! zero-padded to the next multiple around the attention calls (exact: zero columns add nothing
//! to q·k and produce zero output / gradient columns), with the real `1/sqrt(head_dim)` scale.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, ValidAsZeroBits};
use half::bf16;

use super::launch::{self as k, AttentionShape, DecodeShape, Dtype, RopeDst, RopeIn, RopeShape};
use super::linear::DLinear;
use super::workspace::Buf;
use super::{CudaDevice, CudaError};
use crate::engine::backend::RopeTable;
use crate::engine::lora::Target;
use crate::engine::models::{Model, ModelConfig};
use crate::engine::weight::{Weight, WeightElem};

/// Activation / base-weight storage type of a [`CudaModel`].
pub trait Act: Dtype + ValidAsZeroBits + std::fmt::Debug + WeightElem {
    /// Host f32 -> storage (round to nearest even for bf16).
    fn from_f32(x: f32) -> Self;
    /// out = T(x) on the device.
    fn cast_from_f32(
        dev: &CudaDevice,
        out: &mut CudaViewMut<'_, Self>,
        x: &CudaView<'_, f32>,
    ) -> Result<(), CudaError>;
}

impl Act for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    fn cast_from_f32(
        dev: &CudaDevice,
        out: &mut CudaViewMut<'_, f32>,
        x: &CudaView<'_, f32>,
    ) -> Result<(), CudaError> {
        k::need_len("memcpy_dtod", "x", x.len(), out.len())?;
        dev.stream().memcpy_dtod(x, out).map_err(CudaError::driver("copying f32 buffer"))
    }
}

impl Act for bf16 {
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn cast_from_f32(
        dev: &CudaDevice,
        out: &mut CudaViewMut<'_, bf16>,
        x: &CudaView<'_, f32>,
    ) -> Result<(), CudaError> {
        k::cast_fwd(dev, out, x)
    }
}

pub(crate) type R<T> = Result<T, CudaError>;

/// A workspace buffer of `n` elements with unspecified contents, for outputs that are
/// overwritten completely (see `workspace.rs`).
pub(crate) fn scratch<T: DeviceRepr + Send + 'static>(dev: &CudaDevice, n: usize) -> R<Buf<T>> {
    dev.ws().take(n)
}

/// A zeroed workspace buffer of `n` elements, for outputs that are accumulated into.
pub(crate) fn scratch_zeroed<T: DeviceRepr + ValidAsZeroBits + Send + 'static>(
    dev: &CudaDevice,
    n: usize,
) -> R<Buf<T>> {
    dev.ws().take_zeroed(n)
}

/// Host -> workspace buffer copy (small per-call inputs: ids, positions, targets).
pub(crate) fn upload_ws<T: DeviceRepr + Send + 'static>(dev: &CudaDevice, v: &[T]) -> R<Buf<T>> {
    let mut b = scratch::<T>(dev, v.len())?;
    let mut bv = view_mut(&mut b, 0, v.len())?;
    dev.stream()
        .memcpy_htod(v, &mut bv)
        .map_err(CudaError::driver(format!("uploading {} values", v.len())))?;
    Ok(b)
}

/// A zeroed device buffer of `n` elements that lives outside the workspace (caches, adapters).
pub(crate) fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    n: usize,
) -> R<CudaSlice<T>> {
    // cudarc rejects zero-length allocations on some drivers; keep every buffer non-empty.
    dev.stream()
        .alloc_zeros::<T>(n.max(1))
        .map_err(CudaError::driver(format!("allocating {n} elements")))
}

/// Host -> device copy.
pub(crate) fn upload<T: DeviceRepr>(dev: &CudaDevice, v: &[T]) -> R<CudaSlice<T>> {
    dev.stream().clone_htod(v).map_err(CudaError::driver(format!("uploading {} values", v.len())))
}

/// Device -> host copy.
pub(crate) fn download<T: DeviceRepr + Default + Clone>(
    dev: &CudaDevice,
    v: &CudaView<'_, T>,
) -> R<Vec<T>> {
    let mut out = vec![T::default(); v.len()];
    dev.stream().memcpy_dtoh(v, &mut out).map_err(CudaError::driver("downloading"))?;
    Ok(out)
}

/// `s[a..b]` as a view, with an error instead of cudarc's panic when out of range.
pub(crate) fn view<T>(s: &CudaSlice<T>, a: usize, b: usize) -> R<CudaView<'_, T>> {
    s.try_slice(a..b).ok_or_else(|| out_of_range(a, b, s.len()))
}

/// `s[a..b]` as a mutable view (checked like [`view`]).
pub(crate) fn view_mut<T>(s: &mut CudaSlice<T>, a: usize, b: usize) -> R<CudaViewMut<'_, T>> {
    if a > b || b > s.len() {
        return Err(out_of_range(a, b, s.len()));
    }
    Ok(s.slice_mut(a..b))
}

fn out_of_range(a: usize, b: usize, len: usize) -> CudaError {
    CudaError::Shape { kernel: "slice", msg: format!("range {a}..{b} outside a buffer of {len}") }
}

pub(super) fn up_t<T: Act>(dev: &CudaDevice, v: &[f32]) -> R<CudaSlice<T>> {
    let host: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    upload(dev, &host)
}

/// A host base weight as `T` (a bf16 weight goes up as bf16 without an f32 round trip).
pub(super) fn up_w<T: Act>(dev: &CudaDevice, w: &Weight) -> R<CudaSlice<T>> {
    upload(dev, &T::from_weight(w))
}

pub(crate) struct DLayer<T> {
    pub input_norm: CudaSlice<T>,
    /// [W_q; W_k; W_v] (and the biases likewise): one GEMM gives each row's q, k, then v.
    pub qkv: DLinear<T>,
    pub o: DLinear<T>,
    pub qk_norm: Option<(CudaSlice<T>, CudaSlice<T>)>,
    pub post_norm: CudaSlice<T>,
    /// [W_gate; W_up]: [2 * inter, hidden]; one GEMM gives each row's gate, then its up.
    pub gate_up: DLinear<T>,
    pub down: DLinear<T>,
}

impl<T> DLayer<T> {
    /// The MLP's intermediate size (half the fused gate|up output).
    pub fn inter(&self) -> usize {
        self.gate_up.out / 2
    }
}

/// The base model on one GPU. `T` is the storage / activation type (bf16 for serving; f32 makes
/// the same code path checkable against the golden fixtures at f32 tolerances).
pub struct CudaModel<T: Act = bf16> {
    pub(crate) dev: Arc<CudaDevice>,
    pub(crate) cfg: ModelConfig,
    /// Head dim rounded up to a multiple of 32 (the attention kernels' granularity).
    pub(crate) hdp: usize,
    pub(crate) embed: CudaSlice<T>,
    pub(crate) layers: Vec<DLayer<T>>,
    pub(crate) final_norm: CudaSlice<T>,
    /// `None` when tied to `embed`.
    pub(crate) lm_head: Option<CudaSlice<T>>,
    /// f32 [max_position_embeddings, head_dim / 2].
    pub(crate) cos: CudaSlice<f32>,
    pub(crate) sin: CudaSlice<f32>,
    /// Captured decode steps (`graph.rs`).
    pub(crate) graphs: super::graph::DecodeGraphs,
}

impl<T: Act> std::fmt::Debug for CudaModel<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaModel").field("arch", &self.cfg.arch).field("dev", &self.dev).finish()
    }
}

/// Largest head dimension the attention kernels take (after padding).
const MAX_HEAD_DIM: usize = 256;

impl<T: Act> CudaModel<T> {
    /// Uploads `model`'s weights to `dev` (converted to `T`) and the RoPE tables.
    pub fn new(dev: Arc<CudaDevice>, model: &Model) -> R<Self> {
        let c = model.config().clone();
        let hdp = c.head_dim.div_ceil(32) * 32;
        if hdp > MAX_HEAD_DIM {
            return Err(CudaError::Shape {
                kernel: "CudaModel",
                msg: format!(
                    "head_dim {} exceeds the attention kernels' {MAX_HEAD_DIM}",
                    c.head_dim
                ),
            });
        }
        let d = &*dev;
        let mut layers = Vec::with_capacity(model.layers.len());
        for lw in &model.layers {
            let qk_norm = match (&lw.q_norm, &lw.k_norm) {
                (Some(q), Some(k)) => Some((up_t(d, q)?, up_t(d, k)?)),
                _ => None,
            };
            layers.push(DLayer {
                input_norm: up_t(d, &lw.input_norm)?,
                qkv: DLinear::fused(d, &[&lw.q, &lw.k, &lw.v])?,
                o: DLinear::new(d, &lw.o)?,
                qk_norm,
                post_norm: up_t(d, &lw.post_norm)?,
                gate_up: DLinear::fused(d, &[&lw.gate, &lw.up])?,
                down: DLinear::new(d, &lw.down)?,
            });
        }
        let embed = up_w(d, &model.embed)?;
        let final_norm = up_t(d, &model.final_norm)?;
        let lm_head = model.lm_head.as_ref().map(|w| up_w(d, w)).transpose()?;
        Self::assemble(dev, c, hdp, embed, layers, final_norm, lm_head)
    }

    /// A model from its uploaded tensors (loaded or synthetic), with the RoPE tables of every
    /// position computed and uploaded here.
    pub(crate) fn assemble(
        dev: Arc<CudaDevice>,
        cfg: ModelConfig,
        hdp: usize,
        embed: CudaSlice<T>,
        layers: Vec<DLayer<T>>,
        final_norm: CudaSlice<T>,
        lm_head: Option<CudaSlice<T>>,
    ) -> R<Self> {
        let positions: Vec<u32> = (0..cfg.max_position_embeddings.max(1) as u32).collect();
        let rope = RopeTable::new(&positions, cfg.head_dim, &cfg.inv_freq);
        let (cos, sin) = (upload(&dev, &rope.cos)?, upload(&dev, &rope.sin)?);
        let graphs = super::graph::DecodeGraphs::from_env();
        Ok(CudaModel { dev, cfg, hdp, embed, layers, final_norm, lm_head, cos, sin, graphs })
    }

    /// The model's configuration (as the host model's).
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device this model lives on.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// The output projection [vocab, hidden].
    pub(crate) fn head_w(&self) -> &CudaSlice<T> {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    pub(crate) fn attn_shape(&self, max_seqlen: usize) -> AttentionShape {
        let c = &self.cfg;
        AttentionShape {
            q_heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: self.hdp,
            max_seqlen,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        }
    }

    pub(crate) fn decode_shape(&self, block_size: usize, max_context: usize) -> DecodeShape {
        let c = &self.cfg;
        DecodeShape {
            q_heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: self.hdp,
            block_size,
            max_blocks: 1,
            max_context,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        }
    }

    /// `x` [rows, heads * head_dim] -> [rows, heads * hdp] (zero-padded), or a copy-free
    /// pass-through when no padding is needed (`None`).
    pub(crate) fn pad(&self, x: &CudaSlice<T>, rows_heads: usize) -> R<Option<Buf<T>>> {
        let hd = self.cfg.head_dim;
        if self.hdp == hd {
            return Ok(None);
        }
        // copy_cols writes every column (the padding as zeros)
        let mut out = scratch::<T>(&self.dev, rows_heads * self.hdp)?;
        k::copy_cols_fwd(
            &self.dev,
            &mut out.as_view_mut(),
            self.hdp,
            &view(x, 0, rows_heads * hd)?,
            hd,
        )?;
        Ok(Some(out))
    }

    /// Inverse of [`Self::pad`]: [rows * heads, hdp] -> [rows * heads, head_dim], or `None`
    /// when no padding is needed (the padded buffer already is the unpadded tensor: no copy).
    pub(crate) fn unpad(&self, x: &CudaSlice<T>, rows_heads: usize) -> R<Option<Buf<T>>> {
        let hd = self.cfg.head_dim;
        if self.hdp == hd {
            return Ok(None);
        }
        let mut out = scratch::<T>(&self.dev, rows_heads * hd)?;
        k::copy_cols_fwd(
            &self.dev,
            &mut out.as_view_mut(),
            hd,
            &view(x, 0, rows_heads * self.hdp)?,
            self.hdp,
        )?;
        Ok(Some(out))
    }

    /// RMSNorm of `x` [n, d] with weight `w` [d]: (out, rstd).
    pub(crate) fn rmsnorm(&self, x: &CudaView<'_, T>, w: &CudaSlice<T>) -> R<(Buf<T>, Buf<f32>)> {
        let d = w.len();
        let n = x.len() / d.max(1);
        let mut out = scratch::<T>(&self.dev, x.len())?;
        let mut rstd = scratch::<f32>(&self.dev, n)?;
        k::rmsnorm_fwd(
            &self.dev,
            &mut view_mut(&mut out, 0, x.len())?,
            &mut view_mut(&mut rstd, 0, n)?,
            x,
            None,
            &w.as_view(),
            self.cfg.rms_norm_eps,
        )?;
        Ok((out, rstd))
    }

    /// dx = rmsnorm_bwd(dy) for x [n, d] with the saved rstd [n].
    pub(crate) fn rmsnorm_bwd(
        &self,
        dy: &CudaView<'_, T>,
        x: &CudaView<'_, T>,
        w: &CudaSlice<T>,
        rstd: &CudaSlice<f32>,
    ) -> R<Buf<T>> {
        let n = x.len() / w.len().max(1);
        let mut dx = scratch::<T>(&self.dev, x.len())?;
        k::rmsnorm_bwd(
            &self.dev,
            &mut view_mut(&mut dx, 0, x.len())?,
            dy,
            x,
            None,
            &w.as_view(),
            &view(rstd, 0, n)?,
        )?;
        Ok(dx)
    }

    /// RMSNorm over the `heads` heads of each of `rows` rows `ld` apart (`x` starting at the
    /// first head: one tensor's window of the fused q|k|v projection), with weight `w` [hd]:
    /// (compact out [rows, heads, hd], rstd [rows * heads]).
    pub(crate) fn rmsnorm_heads(
        &self,
        x: &CudaView<'_, T>,
        ld: usize,
        rows: usize,
        heads: usize,
        w: &CudaSlice<T>,
    ) -> R<(Buf<T>, Buf<f32>)> {
        let n = rows * heads;
        let ne = n * w.len();
        let mut out = scratch::<T>(&self.dev, ne)?;
        let mut rstd = scratch::<f32>(&self.dev, n)?;
        k::rmsnorm_fwd(
            &self.dev,
            &mut view_mut(&mut out, 0, ne)?,
            &mut view_mut(&mut rstd, 0, n)?,
            x,
            Some(k::RowMap { per: heads, ld }),
            &w.as_view(),
            self.cfg.rms_norm_eps,
        )?;
        Ok((out, rstd))
    }

    /// Backward of [`Self::rmsnorm_heads`]: writes `dx`, laid out as `x` (`(ld, rows, heads)`),
    /// from the compact `dy` and the saved rstd.
    pub(crate) fn rmsnorm_heads_bwd(
        &self,
        dx: &mut CudaViewMut<'_, T>,
        dy: &CudaView<'_, T>,
        x: &CudaView<'_, T>,
        (ld, rows, heads): (usize, usize, usize),
        w: &CudaSlice<T>,
        rstd: &CudaSlice<f32>,
    ) -> R<()> {
        let map = Some(k::RowMap { per: heads, ld });
        let rstd = view(rstd, 0, rows * heads)?;
        k::rmsnorm_bwd(&self.dev, dx, dy, x, map, &w.as_view(), &rstd)
    }

    /// RoPE over a layer's q, k and v in one launch (see [`k::rope`]) at positions `pos`
    /// [rows]; heads sit `hs` = (input, output) apart inside a row.
    pub(crate) fn rope(
        &self,
        dir: k::RopeDir,
        out: &mut [RopeDst<'_, '_, T>],
        inp: &RopeIn<'_, '_, T>,
        pos: &CudaSlice<i32>,
        rows: usize,
        hs: (usize, usize),
    ) -> R<()> {
        let c = &self.cfg;
        let shape = RopeShape { n: rows, heads: (c.num_heads, c.num_kv_heads), hd: c.head_dim, hs };
        let tables = (&self.cos.as_view(), &self.sin.as_view(), &view(pos, 0, rows)?);
        k::rope(&self.dev, dir, out, inp, tables, &shape)
    }
}

/// Index of a per-layer target in `Target::LAYER` (the adapter's slot order).
pub(crate) fn slot(t: Target) -> usize {
    Target::LAYER.iter().position(|&x| x == t).unwrap_or(0)
}
