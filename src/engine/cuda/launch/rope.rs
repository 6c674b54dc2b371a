//! Launcher for `kernels/rope.cu`: rotary position embedding over one layer's q, k and v heads
//! in one launch (q and k rotated, v copied), reading and writing strided tensors, so the fused
//! q|k|v projection is read in place, the attention inputs come out head-padded, and the
//! backward writes straight into the fused gradient.

use cudarc::driver::{CudaView, CudaViewMut, DevicePtrMut, PushKernelArg};

use super::{Dtype, Kernel, grid_stride, int, long, need_len, shape_err, sym};
use crate::engine::cuda::{CudaDevice, CudaError};

/// Which way [`rope`] rotates: the forward, or its gradient (rotation by the negative angle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeDir {
    Forward,
    Backward,
}

/// The inputs of a [`rope`] launch: q, k and v (each view starting at the tensor's first
/// element; they may be windows of one buffer) and their row strides.
pub struct RopeIn<'b, 'i, T> {
    pub t: [&'b CudaView<'i, T>; 3],
    pub ld: [usize; 3],
}

/// An output buffer of a [`rope`] launch and the tensors it holds: (0 q / 1 k / 2 v, row
/// stride, first column). Three compact buffers hold one tensor each at column 0; the fused
/// gradient [rows, q|k|v] holds all three side by side.
pub struct RopeDst<'b, 'o, T> {
    pub buf: &'b mut CudaViewMut<'o, T>,
    pub holds: &'b [(usize, usize, usize)],
}

/// The shape of a [`rope`] launch: `n` rows of (q, kv) `heads` of `hd` values each, whose heads
/// sit `hs` = (input, output) apart inside a row. hs > hd is the attention kernels' padded
/// head dim: an output's padding columns are written as zeros, an input's are not read.
#[derive(Debug, Clone, Copy)]
pub struct RopeShape {
    pub n: usize,
    pub heads: (usize, usize),
    pub hd: usize,
    pub hs: (usize, usize),
}

/// Elements `n` rows `ld` apart, each using its first `extent`, span.
fn span(n: usize, ld: usize, extent: usize) -> usize {
    if n == 0 { 0 } else { (n - 1) * ld + extent }
}

/// One launch over a layer's q, k and v heads: q and k rotated by the angles at `pos` [n]
/// (HF rotate_half), or back for [`RopeDir::Backward`] (the inputs then are output
/// gradients), v copied; cos/sin are f32 tables [P, hd/2]. Every tensor is checked to lie in
/// its buffer, and the tensors sharing an output buffer to be disjoint.
pub fn rope<T: Dtype>(
    dev: &CudaDevice,
    dir: RopeDir,
    out: &mut [RopeDst<'_, '_, T>],
    inp: &RopeIn<'_, '_, T>,
    (cos, sin, pos): (&CudaView<'_, f32>, &CudaView<'_, f32>, &CudaView<'_, i32>),
    sh: &RopeShape,
) -> Result<(), CudaError> {
    let k = match dir {
        RopeDir::Forward => sym!(T, "rope_fwd"),
        RopeDir::Backward => sym!(T, "rope_bwd"),
    };
    let (hd, (hs_i, hs_o), n) = (sh.hd, sh.hs, sh.n);
    if hd == 0 || !hd.is_multiple_of(2) || hs_i < hd || hs_o < hd || !hs_o.is_multiple_of(2) {
        return Err(shape_err(k, format!("head_dim {hd} (even, > 0) in heads of {hs_i}/{hs_o}")));
    }
    let half = hd / 2;
    if cos.len() != sin.len() || cos.len() % half != 0 || cos.is_empty() {
        return Err(shape_err(
            k,
            format!("cos/sin must both be [P, {half}], got {} and {}", cos.len(), sin.len()),
        ));
    }
    need_len(k, "pos", pos.len(), n)?;
    let heads = [sh.heads.0, sh.heads.1, sh.heads.1];
    for ((x, &ld), &h) in inp.t.iter().zip(&inp.ld).zip(&heads) {
        let extent = if h == 0 { 0 } else { (h - 1) * hs_i + hd };
        if ld < extent || x.len() < span(n, ld, extent) {
            return Err(shape_err(k, format!("an input of {} for {n} rows of {ld}", x.len())));
        }
    }
    check_outputs(k, out, n, heads.map(|h| h * hs_o))?;
    let total = n * (heads[0] + 2 * heads[1]);
    if total == 0 {
        return Ok(());
    }
    let p = cos.len() / half;
    let mut lds = [0i64; 6];
    for (i, &ld) in inp.ld.iter().enumerate() {
        lds[i] = long(k, "ld", ld)?;
    }
    for d in out.iter() {
        for &(t, ld, _) in d.holds {
            lds[3 + t] = long(k, "ld", ld)?;
        }
    }
    let ints = [
        int(k, "hs", hs_i)?,
        int(k, "hs", hs_o)?,
        int(k, "n", n)?,
        int(k, "heads", heads[0])?,
        int(k, "kv heads", heads[1])?,
        int(k, "head_dim", hd)?,
        int(k, "positions", p)?,
    ];
    // inputs read, outputs written (padding included); a rotation is 6 FLOPs per pair
    let (e_in, e_out) = ((total * hd) as f64, (total * hs_o) as f64);
    let f = Kernel::load(dev, "rope.cu", k)?
        .cost(3.0 * e_in, (e_in + e_out) * std::mem::size_of::<T>() as f64);
    // The outputs go to the kernel as addresses: several tensors may share a buffer (checked
    // disjoint above), which one borrow of it covers; each record marks its buffer written.
    let stream = dev.stream();
    let sz = std::mem::size_of::<T>() as u64;
    let mut ptrs = [0u64; 3];
    let mut records = Vec::with_capacity(out.len());
    for d in out.iter_mut() {
        let (base, record) = d.buf.device_ptr_mut(stream);
        for &(t, _, off) in d.holds {
            ptrs[t] = base + off as u64 * sz;
        }
        records.push(record);
    }
    let [qi, ki, vi] = inp.t;
    let (c, s) = (cos, sin);
    // SAFETY: every tensor's rows lie inside its buffer and tensors sharing one are disjoint
    // (checked); the kernel clamps positions into [0, p); the argument list is its signature.
    let launched = unsafe {
        f.launch_with(grid_stride(total * (hs_o / 2)), |a| {
            a.arg(&ptrs[0]).arg(&ptrs[1]).arg(&ptrs[2]).arg(qi).arg(ki).arg(vi);
            for ld in &lds {
                a.arg(ld);
            }
            a.arg(&ints[0]).arg(&ints[1]).arg(c).arg(s).arg(pos);
            for v in &ints[2..] {
                a.arg(v);
            }
        })
    };
    drop(records);
    launched
}

/// Checks that `out` holds q, k and v once each (a tensor without heads may be absent), every
/// tensor's `n` rows of `width[t]` inside its buffer, and the tensors of a buffer disjoint.
fn check_outputs<T>(
    k: &'static str,
    out: &[RopeDst<'_, '_, T>],
    n: usize,
    width: [usize; 3],
) -> Result<(), CudaError> {
    let mut held = [0usize; 3];
    for d in out {
        let mut cols: Vec<(usize, usize)> = Vec::with_capacity(d.holds.len());
        for &(t, ld, off) in d.holds {
            let Some(w) = width.get(t).copied() else {
                return Err(shape_err(k, format!("output tensor {t} (0 q, 1 k, 2 v)")));
            };
            held[t] += 1;
            if off + w > ld || d.buf.len() < off + span(n, ld, w) {
                return Err(shape_err(
                    k,
                    format!("tensor {t}: {n} rows of columns {off}+{w} of {ld} in {}", d.buf.len()),
                ));
            }
            cols.push((off, off + w));
        }
        cols.sort_unstable();
        let lds_agree = d.holds.windows(2).all(|h| h[0].1 == h[1].1);
        if !lds_agree || cols.windows(2).any(|c| c[0].1 > c[1].0) {
            return Err(shape_err(k, "tensors sharing an output buffer overlap".to_string()));
        }
    }
    for t in 0..3 {
        if held[t] > 1 || (held[t] == 0 && width[t] > 0) {
            return Err(shape_err(k, format!("output tensor {t} held {} times", held[t])));
        }
    }
    Ok(())
}
