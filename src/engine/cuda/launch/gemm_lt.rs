//! Row-major linear-layer GEMMs through cuBLASLt with the epilogue fused in:
//! `D[m, n] = A[m, k] W^T (+ bias[n]) (+ C[m, n])`, bf16 or f32 storage, f32 compute.
//!
//! Why cuBLASLt next to `cublasGemmEx`: it takes a C distinct from D (`D = AW^T + C` leaves C
//! intact, so a residual add needs no extra pass and the residual stays saved for the backward)
//! and a bias epilogue (the q|k|v biases are added while the tile is still in registers). As in
//! `gemm.rs`, the row-major product is issued column-major as `D^T = W A^T`: cuBLASLt's A is our
//! W read transposed ([k, n] column-major, ld k), its B our A ([k, m], ld k), C and D [n, m] with
//! ld n; the bias runs along cuBLAS's rows, which are our n columns.
//!
//! Descriptors and layouts are created per call (host-only, microseconds); the algorithm from
//! the heuristic is cached per shape, dtype, epilogue and operand alignment, because the
//! heuristic query is the costly part. The workspace is allocated once with the handle, so a call
//! inside a CUDA graph capture allocates nothing.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys::{
    cublasComputeType_t, cublasLtEpilogue_t, cublasLtHandle_t, cublasLtMatmulAlgo_t,
    cublasLtMatmulDesc_t, cublasLtMatmulDescAttributes_t as DescAttr, cublasLtMatmulPreference_t,
    cublasLtMatmulPreferenceAttributes_t as PrefAttr, cublasLtMatrixLayout_t, cudaDataType_t,
};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

use super::{Dtype, need_len, shape_err};
use crate::engine::cuda::profile::Cost;
use crate::engine::cuda::{CudaDevice, CudaError};

const KN: &str = "cublasLtMatmul";
/// Algorithms kept per device before the cache starts over.
const MAX_CACHED_ALGOS: usize = 4096;

/// A cuBLASLt handle with its fixed workspace and the algorithm cache; owned by the device.
pub struct BlasLt {
    handle: cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    algos: Mutex<HashMap<AlgoKey, cublasLtMatmulAlgo_t>>,
}

// SAFETY: a cuBLASLt handle is not bound to a thread or stream (the stream is an argument of
// each matmul) and NVIDIA documents it as usable from several threads; the workspace is only
// written by matmuls on the device's single stream, which orders them.
unsafe impl Send for BlasLt {}
unsafe impl Sync for BlasLt {}

/// Everything the chosen algorithm depends on.
#[derive(Clone, Copy, Hash, PartialEq, Eq)]
struct AlgoKey {
    mnk: (usize, usize, usize),
    bf16: bool,
    bias: bool,
    residual: bool,
    // the pointer alignments the heuristic was told (A, W, C, D)
    align: [u32; 4],
}

impl BlasLt {
    /// Creates the handle and the workspace NVIDIA recommends (32 MiB on Hopper and later,
    /// 4 MiB before) on `stream`.
    pub(crate) fn new(stream: &Arc<CudaStream>, major: i32) -> Result<Self, CudaError> {
        let size = if major >= 9 { 32 << 20 } else { 4 << 20 };
        // SAFETY: the workspace is scratch for cuBLASLt only; it is never read by the host.
        let workspace =
            unsafe { stream.alloc::<u8>(size) }.map_err(CudaError::driver("cuBLASLt workspace"))?;
        let handle = lt::create_handle().map_err(CudaError::cublas_lt("creating handle"))?;
        Ok(BlasLt { handle, workspace, algos: Mutex::default() })
    }
}

impl Drop for BlasLt {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once here; a failure at teardown has no one to
        // report to, so it is ignored rather than turned into a panic.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// Destroys a descriptor when it goes out of scope (every early return included).
struct Guard<P: Copy>(P, unsafe fn(P) -> Result<(), lt::CublasError>);

impl<P: Copy> Drop for Guard<P> {
    fn drop(&mut self) {
        // SAFETY: the descriptor was created by the matching create call and is dropped once.
        let _ = unsafe { (self.1)(self.0) };
    }
}

fn layout(
    t: cudaDataType_t,
    rows: usize,
    cols: usize,
) -> Result<Guard<cublasLtMatrixLayout_t>, CudaError> {
    let l = lt::create_matrix_layout(t, rows as u64, cols as u64, rows as i64)
        .map_err(CudaError::cublas_lt(format!("layout {rows}x{cols}")))?;
    Ok(Guard(l, lt::destroy_matrix_layout))
}

/// Sets one attribute from a plain value.
///
/// # Safety
/// `desc` must be live and `V` the attribute's documented type.
unsafe fn set_desc<V>(desc: cublasLtMatmulDesc_t, attr: DescAttr, v: &V) -> Result<(), CudaError> {
    let p = (v as *const V).cast::<c_void>();
    // SAFETY: see the function's contract; `v` outlives the call, which copies it.
    unsafe { lt::set_matmul_desc_attribute(desc, attr, p, std::mem::size_of::<V>()) }
        .map_err(CudaError::cublas_lt(format!("matmul desc {attr:?}")))
}

/// See [`set_desc`].
///
/// # Safety
/// `pref` must be live and `V` the attribute's documented type.
unsafe fn set_pref<V>(
    pref: cublasLtMatmulPreference_t,
    attr: PrefAttr,
    v: &V,
) -> Result<(), CudaError> {
    let p = (v as *const V).cast::<c_void>();
    // SAFETY: see the function's contract; `v` outlives the call, which copies it.
    unsafe { lt::set_matmul_pref_attribute(pref, attr, p, std::mem::size_of::<V>()) }
        .map_err(CudaError::cublas_lt(format!("preference {attr:?}")))
}

/// The largest power of two (up to 256, what cuBLASLt assumes by default) dividing `ptr`.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 { 256 } else { (1u64 << ptr.trailing_zeros().min(8)) as u32 }
}

/// `D[m, n] = A[m, k] W[n, k]^T (+ bias[n]) (+ C[m, n])`, all row-major with one dtype `T`;
/// f32 accumulation, D rounded once at the end. C, when given, is read and left intact.
pub fn matmul_lt<T: Dtype>(
    dev: &CudaDevice,
    d: &mut CudaViewMut<'_, T>,
    a: &CudaView<'_, T>,
    w: &CudaView<'_, T>,
    bias: Option<&CudaView<'_, T>>,
    c: Option<&CudaView<'_, T>>,
    (m, n, k): (usize, usize, usize),
) -> Result<(), CudaError> {
    need_len(KN, "A", a.len(), m * k)?;
    need_len(KN, "W", w.len(), n * k)?;
    need_len(KN, "D", d.len(), m * n)?;
    if let Some(b) = bias {
        need_len(KN, "bias", b.len(), n)?;
    }
    if let Some(c) = c {
        need_len(KN, "C", c.len(), m * n)?;
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        return Err(shape_err(KN, "k = 0 is not a product"));
    }
    if [m, n, k].iter().any(|&v| i64::try_from(v).is_err()) {
        return Err(shape_err(KN, format!("{m}x{n}x{k} exceeds i64")));
    }
    let stream = dev.stream();
    let lt = dev.blas_lt();
    let es = std::mem::size_of::<T>();
    // 2mnk like `matmul`, so `--explain` sums one GEMM count whichever launcher ran
    let flops = 2.0 * (m * n * k) as f64;
    let reads = (m * k + n * k) * es + bias.map_or(0, |_| n * es) + c.map_or(0, |_| m * n * es);
    let cost = Some(Cost::new(flops, (reads + m * n * es) as f64));
    let (a_ptr, _ra) = a.device_ptr(stream);
    let (w_ptr, _rw) = w.device_ptr(stream);
    let bias_ptr = bias.map(|b| b.device_ptr(stream));
    let c_ptr = c.map(|c| c.device_ptr(stream));
    let (d_ptr, _rd) = d.device_ptr_mut(stream);
    // without a C, beta = 0 and cuBLASLt does not read it: D stands in for the pointer
    let (c_raw, beta) = match &c_ptr {
        Some((p, _)) => (*p, 1.0f32),
        None => (d_ptr, 0.0f32),
    };
    let key = AlgoKey {
        mnk: (m, n, k),
        bf16: T::IS_BF16,
        bias: bias.is_some(),
        residual: c.is_some(),
        align: [alignment(a_ptr), alignment(w_ptr), alignment(c_raw), alignment(d_ptr)],
    };
    let dt = if T::IS_BF16 { cudaDataType_t::CUDA_R_16BF } else { cudaDataType_t::CUDA_R_32F };
    let desc =
        lt::create_matmul_desc(cublasComputeType_t::CUBLAS_COMPUTE_32F, cudaDataType_t::CUDA_R_32F)
            .map_err(CudaError::cublas_lt("matmul desc"))?;
    let desc = Guard(desc, lt::destroy_matmul_desc);
    // SAFETY: `desc` is live; each value has its attribute's type (cublasOperation_t and
    // cublasLtEpilogue_t are 32-bit enums, the bias pointer a device address, its type a
    // cudaDataType_t); the bias view outlives the matmul below.
    unsafe {
        set_desc(desc.0, DescAttr::CUBLASLT_MATMUL_DESC_TRANSA, &cublasOperation_t::CUBLAS_OP_T)?;
        set_desc(desc.0, DescAttr::CUBLASLT_MATMUL_DESC_TRANSB, &cublasOperation_t::CUBLAS_OP_N)?;
        if let Some((bp, _)) = &bias_ptr {
            let epi = cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
            set_desc(desc.0, DescAttr::CUBLASLT_MATMUL_DESC_EPILOGUE, &epi)?;
            set_desc(desc.0, DescAttr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, bp)?;
            set_desc(desc.0, DescAttr::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &dt)?;
        }
    }
    // cuBLASLt's A = W stored [k, n] column-major, B = our A [k, m], C and D [n, m]
    let (wl, al, cl, dl) =
        (layout(dt, k, n)?, layout(dt, k, m)?, layout(dt, n, m)?, layout(dt, n, m)?);
    let algo = match lt.algos.lock().map(|g| g.get(&key).copied()) {
        Ok(Some(algo)) => algo,
        _ => {
            let pref = lt::create_matmul_pref().map_err(CudaError::cublas_lt("preference"))?;
            let pref = Guard(pref, lt::destroy_matmul_pref);
            let ws = lt.workspace.len() as u64;
            // SAFETY: `pref` is live; the workspace size is a u64, the alignments u32s.
            unsafe {
                set_pref(pref.0, PrefAttr::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws)?;
                // cuBLASLt's A is our W and its B our A (the layouts above)
                let aligns = [
                    (PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align[1]),
                    (PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align[0]),
                    (PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align[2]),
                    (PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align[3]),
                ];
                for (attr, align) in &aligns {
                    set_pref(pref.0, *attr, align)?;
                }
            }
            // SAFETY: every descriptor is live and describes the operands checked above.
            let h = unsafe {
                lt::get_matmul_algo_heuristic(lt.handle, desc.0, wl.0, al.0, cl.0, dl.0, pref.0)
            }
            .map_err(CudaError::cublas_lt(format!("no algorithm for {m}x{n}x{k}")))?;
            if let Ok(mut g) = lt.algos.lock() {
                // m follows the pass's row count, so a long-lived server meets many shapes:
                // bound the cache (a miss only costs one heuristic query)
                if g.len() >= MAX_CACHED_ALGOS {
                    g.clear();
                }
                g.insert(key, h.algo);
            }
            h.algo
        }
    };
    let alpha = 1.0f32;
    let (ws_ptr, _rws) = lt.workspace.device_ptr(stream);
    let ws_len = lt.workspace.len();
    // SAFETY: W is [n, k], A [m, k], C and D [m, n] and bias [n] (lengths checked above), which
    // is exactly what the column-major layouts describe (ld = rows); alpha and beta are f32 as
    // the f32 scale type requires; the workspace belongs to this handle and is used only on
    // this stream, which also orders every buffer's uses (one stream per device).
    dev.profiler().around(stream, KN, cost, || unsafe {
        lt::matmul(
            lt.handle,
            desc.0,
            (&alpha as *const f32).cast(),
            (&beta as *const f32).cast(),
            w_ptr as *const c_void,
            wl.0,
            a_ptr as *const c_void,
            al.0,
            c_raw as *const c_void,
            cl.0,
            d_ptr as *mut c_void,
            dl.0,
            &algo,
            ws_ptr as *mut c_void,
            ws_len,
            stream.cu_stream() as _,
        )
        .map_err(CudaError::cublas_lt(format!("matmul {m}x{n}x{k}")))
    })
}
