//! [`SegLora`]: the adapters of one pass as the segmented LoRA kernels read them. The pass's rows
//! are split into contiguous segments (one per tenant's group; a single tenant is one segment),
//! and for every LoRA module of the model (each layer's seven targets, then the output head)
//! the device holds one table row per segment with its tensors' addresses, rank and scale. It is
//! built and uploaded once per pass (one small copy), so every launch of the pass is one kernel
//! for all tenants.

use std::ops::Range;

use cudarc::driver::{CudaSlice, DevicePtr};

use super::CudaError;
use super::adapter::{CudaAdapter, GpuPair};
use super::launch::{LORA_MAX_RANK, LORA_TAB_STRIDE, LoraSegs};
use super::model::{Act, CudaModel, R, upload, view};
use crate::engine::lora::Target;

/// One segment of a pass: its rows, its adapter (None: the base model) and whether its LoRA
/// gradients are accumulated.
pub(crate) struct SegSpec<'a> {
    pub rows: Range<usize>,
    pub adapter: Option<&'a CudaAdapter>,
    pub train: bool,
}

/// The device tables of one pass (see the module doc).
pub(crate) struct SegLora {
    /// Segment starts and the end [nseg + 1], host and device.
    bounds: Vec<usize>,
    seg: CudaSlice<i32>,
    /// [modules][nseg][LORA_TAB_STRIDE]
    tab: CudaSlice<u64>,
    /// ranks[module][segment] (0: none).
    ranks: Vec<Vec<usize>>,
    /// (in, out) per module.
    dims: Vec<(usize, usize)>,
    layers: usize,
}

/// The host half of [`SegLora`], computed from the specs: the launch shapes (bounds, ranks)
/// and the contents of the two device tables.
pub(crate) struct SegHost {
    pub bounds: Vec<usize>,
    pub ranks: Vec<Vec<usize>>,
    dims: Vec<(usize, usize)>,
    layers: usize,
    seg: Vec<i32>,
    tab: Vec<u64>,
}

impl SegLora {
    /// The tables for `specs`, whose rows must tile 0..rows in order. A training segment's
    /// gradient addresses are written by the backward kernels: the caller must hold that
    /// adapter mutably for the whole pass (and nothing else may touch it on another stream).
    pub fn new<T: Act>(m: &CudaModel<T>, specs: &[SegSpec<'_>]) -> R<SegLora> {
        let SegHost { bounds, ranks, dims, layers, seg, tab } = Self::host(m, specs)?;
        let dev = &*m.dev;
        Ok(SegLora {
            seg: upload(dev, &seg)?,
            tab: upload(dev, &tab)?,
            bounds,
            ranks,
            dims,
            layers,
        })
    }

    /// Rewrites the device tables with `h`'s contents in place (no allocation, so a captured
    /// graph that reads them stays valid). The segments and every module's ranks must be those
    /// the tables were built with: only addresses and scales may change.
    pub fn refill<T: Act>(&mut self, m: &CudaModel<T>, h: &SegHost) -> R<()> {
        if h.bounds != self.bounds || h.ranks != self.ranks {
            return Err(shape_err("refill: the segments or ranks differ from the tables'"));
        }
        let stream = m.dev.stream();
        let e = || CudaError::driver("refilling the LoRA segment tables");
        stream.memcpy_htod(&h.seg, &mut self.seg).map_err(e())?;
        stream.memcpy_htod(&h.tab, &mut self.tab).map_err(e())
    }

    /// The host tables for `specs` (what [`Self::new`] uploads; a graph keys on their shapes).
    pub fn host<T: Act>(m: &CudaModel<T>, specs: &[SegSpec<'_>]) -> R<SegHost> {
        let dev = &*m.dev;
        let c = m.config();
        let layers = c.num_layers;
        let mut bounds = vec![0usize];
        for s in specs {
            if s.rows.start != bounds[bounds.len() - 1] || s.rows.end < s.rows.start {
                return Err(shape_err("segments must tile the rows in order"));
            }
            bounds.push(s.rows.end);
        }
        let nmod = layers * Target::LAYER.len() + 1;
        let mut dims = Vec::with_capacity(nmod);
        for _ in 0..layers {
            dims.extend(Target::LAYER.iter().map(|&t| t.dims(c)));
        }
        dims.push(Target::LmHead.dims(c));
        let mut tab = vec![0u64; nmod * specs.len() * LORA_TAB_STRIDE];
        let mut ranks = vec![vec![0usize; specs.len()]; nmod];
        let stream = dev.stream();
        // event tracking is off (device.rs), so the guards record nothing
        let addr = |s: &CudaSlice<f32>| s.device_ptr(stream).0;
        for (si, s) in specs.iter().enumerate() {
            let Some(a) = s.adapter else { continue };
            if a.layers.len() != layers {
                return Err(shape_err("an adapter's layer count differs from the model's"));
            }
            // module index: layer l's slot j at l * 7 + j, the head last
            let layer_pairs = a.layers.iter().flat_map(|l| l.iter());
            let pairs = layer_pairs.chain(std::iter::once(&a.lm_head)).enumerate();
            for (mi, p) in pairs {
                let Some(p) = p else { continue };
                check_pair(p, dims[mi])?;
                let e = &mut tab[(mi * specs.len() + si) * LORA_TAB_STRIDE..][..LORA_TAB_STRIDE];
                e[0] = addr(&p.a.w);
                e[1] = addr(&p.b.w);
                if s.train {
                    e[2] = addr(&p.a.g);
                    e[3] = addr(&p.b.g);
                }
                e[4] = p.rank as u64;
                e[5] = u64::from(a.scaling.to_bits());
                ranks[mi][si] = p.rank;
            }
        }
        let seg: Vec<i32> = bounds
            .iter()
            .map(|&b| i32::try_from(b).map_err(|_| shape_err("more rows than i32 holds")))
            .collect::<R<_>>()?;
        Ok(SegHost { bounds, ranks, dims, layers, seg, tab })
    }

    /// The table of layer `l`'s target `t` (None for the output head), or None when no
    /// segment has a LoRA there (the launches are skipped).
    pub fn module(&self, l: Option<usize>, t: Target) -> R<Option<LoraSegs<'_>>> {
        let mi = match l {
            Some(l) if l < self.layers => {
                l * Target::LAYER.len()
                    + Target::LAYER
                        .iter()
                        .position(|&x| x == t)
                        .ok_or_else(|| shape_err("target"))?
            }
            None => self.layers * Target::LAYER.len(),
            Some(_) => return Err(shape_err("layer out of range")),
        };
        let ranks = &self.ranks[mi];
        if ranks.iter().all(|&r| r == 0) {
            return Ok(None);
        }
        let nseg = ranks.len();
        let w = nseg * LORA_TAB_STRIDE;
        Ok(Some(LoraSegs {
            tab: view(&self.tab, mi * w, (mi + 1) * w)?,
            seg: view(&self.seg, 0, nseg + 1)?,
            bounds: &self.bounds,
            ranks,
            dims: self.dims[mi],
        }))
    }

    /// The output head's table.
    pub fn head(&self) -> R<Option<LoraSegs<'_>>> {
        self.module(None, Target::LmHead)
    }
}

fn check_pair(p: &GpuPair, (inp, out): (usize, usize)) -> R<()> {
    if p.rank == 0
        || p.rank > LORA_MAX_RANK
        || p.a.w.len() != p.rank * inp
        || p.b.w.len() != out * p.rank
    {
        return Err(shape_err("an adapter module does not match the model's shapes"));
    }
    Ok(())
}

fn shape_err(msg: &str) -> CudaError {
    CudaError::Shape { kernel: "segmented LoRA", msg: msg.into() }
}
