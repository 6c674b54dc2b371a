//! `CudaDevice`: one CUDA context + stream + cuBLAS and cuBLASLt handles, the per-device cache of loaded
//! kernel functions, and the buffer [`Workspace`]. Created only in child processes (never in the
//! head: CUDA does not survive `fork`).
//!
//! Everything runs on the one stream, which is what makes two driver-level settings here sound
//! and worthwhile: cudarc's per-buffer event tracking is switched off (it only orders uses across
//! streams, and cost ~330 event calls per layer per decode token), and the default memory pool
//! keeps freed memory (release threshold u64::MAX) instead of returning it to the OS at every
//! synchronisation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, result as dres, sys as dsys,
};
use cudarc::nvrtc::Ptx;

use super::launch::BlasLt;
use super::profile::{KernelStat, Profiler};
use super::workspace::Workspace;
use super::{CudaError, nvrtc};

/// Ok when libcuda can be loaded. Never touches the driver beyond `dlopen`.
pub fn driver_available() -> Result<(), CudaError> {
    // SAFETY: only tries dlopen on cudarc's list of library names.
    if unsafe { dsys::is_culib_present() } { Ok(()) } else { Err(CudaError::DriverNotFound) }
}

/// Ok when libcublas and libcublasLt can be loaded.
pub fn cublas_available() -> Result<(), CudaError> {
    // SAFETY: only tries dlopen on cudarc's list of library names.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(CudaError::CublasNotFound);
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
        return Err(CudaError::CublasLtNotFound);
    }
    Ok(())
}

/// A GPU as the engine sees it: context, the stream every launcher enqueues on, cuBLAS bound to
/// that stream, and kernels compiled for this device's exact `sm_XY`.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    blas_lt: BlasLt,
    arch: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    ws: Arc<Workspace>,
    profiler: Profiler,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ctx.ordinal())
            .field("arch", &self.arch)
            .finish()
    }
}

impl CudaDevice {
    /// Number of visible devices (0 when the driver is missing or reports no device).
    pub fn count() -> usize {
        if driver_available().is_err() {
            return 0;
        }
        CudaContext::device_count().map(|n| n.max(0) as usize).unwrap_or(0)
    }

    /// Opens device `ordinal` (relative to `CUDA_VISIBLE_DEVICES`). Checks that the driver,
    /// NVRTC and cuBLAS are loadable first, so a machine without CUDA gets an error, not a panic.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        driver_available()?;
        nvrtc::nvrtc_available()?;
        cublas_available()?;
        let ctx = CudaContext::new(ordinal)
            .map_err(CudaError::driver(format!("opening device {ordinal}")))?;
        // SAFETY: event tracking only orders a buffer's uses across streams. The engine runs
        // all work (kernels, cuBLAS, copies, allocations and frees) on this device's single
        // `stream` and never creates another on the context, so stream order alone guarantees
        // that no buffer is used before its allocation completes, freed before its last use,
        // or written concurrently (`context()` documents that a caller adding a stream must
        // synchronise with this one). Called before any buffer exists, so no slice is
        // half-tracked.
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory(&ctx)?;
        let (major, minor) =
            ctx.compute_capability().map_err(CudaError::driver("compute capability"))?;
        let stream = ctx.new_stream().map_err(CudaError::driver("creating stream"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(CudaError::cublas("creating handle"))?;
        let blas_lt = BlasLt::new(&stream, major)?;
        let ws = Workspace::new(stream.clone());
        Ok(Self {
            ctx,
            stream,
            blas,
            blas_lt,
            arch: format!("sm_{major}{minor}"),
            modules: Mutex::default(),
            functions: Mutex::default(),
            ws,
            profiler: Profiler::default(),
        })
    }

    /// Turns on per-kernel timing and cost accounting (see `profile.rs`) until
    /// [`Self::profile_take`].
    pub fn profile_start(&self) {
        self.profiler.start();
    }

    /// The per-kernel totals since [`Self::profile_start`] (waits for the recorded work).
    pub fn profile_take(&self) -> Result<Vec<KernelStat>, CudaError> {
        self.profiler.take()
    }

    pub(crate) fn profiler(&self) -> &Profiler {
        &self.profiler
    }

    /// The buffer pool every per-op intermediate comes from.
    pub(crate) fn ws(&self) -> &Arc<Workspace> {
        &self.ws
    }

    /// Frees every cached workspace buffer (they are otherwise kept for the next step of the
    /// same shape; see `workspace.rs`).
    pub fn trim_workspace(&self) {
        self.ws.clear();
    }

    /// Number of free buffers cached in the workspace (diagnostics and tests).
    pub fn workspace_buffers(&self) -> usize {
        self.ws.cached_buffers()
    }

    /// The context. Its event tracking is off (all engine work is on [`Self::stream`]): work
    /// on another stream of it must be ordered against that stream explicitly.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream all launchers use.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// cuBLAS bound to [`Self::stream`].
    pub fn blas(&self) -> &CudaBlas {
        &self.blas
    }

    /// cuBLASLt (epilogue-fused GEMMs, `launch::matmul_lt`) with its workspace.
    pub(crate) fn blas_lt(&self) -> &BlasLt {
        &self.blas_lt
    }

    /// `sm_XY` of this device (the NVRTC target).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(CudaError::driver("stream synchronize"))
    }

    /// Kernel `symbol` from `kernels/<file>`: compiled (once per process and arch) and loaded
    /// (once per device) on first use.
    pub fn function(
        &self,
        file: &'static str,
        symbol: &'static str,
    ) -> Result<CudaFunction, CudaError> {
        if let Some(f) = self.functions.lock().unwrap_or_else(|p| p.into_inner()).get(symbol) {
            return Ok(f.clone());
        }
        let module = self.module(file)?;
        let f = module
            .load_function(symbol)
            .map_err(CudaError::driver(format!("loading {symbol} from kernels/{file}")))?;
        self.functions.lock().unwrap_or_else(|p| p.into_inner()).insert(symbol, f.clone());
        Ok(f)
    }

    fn module(&self, file: &'static str) -> Result<Arc<CudaModule>, CudaError> {
        if let Some(m) = self.modules.lock().unwrap_or_else(|p| p.into_inner()).get(file) {
            return Ok(m.clone());
        }
        let compiled = nvrtc::compile_file(file, &self.arch)?;
        let module = self
            .ctx
            .load_module(Ptx::from_binary(compiled.cubin.as_ref().clone()))
            .map_err(CudaError::driver(format!("loading kernels/{file} ({})", self.arch)))?;
        self.modules.lock().unwrap_or_else(|p| p.into_inner()).insert(file, module.clone());
        Ok(module)
    }
}

/// Raises the release threshold of the device's default memory pool (which cudarc's
/// `cuMemAllocAsync` draws from) to u64::MAX: with the default 0 every synchronisation returns
/// all freed activations to the OS and the next step maps them again. Skipped, not failed, when
/// the driver has no memory pools (pre-11.2 drivers, stand-in drivers without the entry points):
/// that only costs speed.
fn keep_freed_memory(ctx: &CudaContext) -> Result<(), CudaError> {
    // SAFETY: looks the symbols up in the already loaded driver library; nothing is called.
    let has = |name: &[u8]| unsafe { dsys::culib().get::<unsafe extern "C" fn()>(name).is_ok() };
    if !has(b"cuDeviceGetDefaultMemPool\0") || !has(b"cuMemPoolSetAttribute\0") {
        return Ok(());
    }
    let supported = ctx
        .attribute(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)
        .map_err(CudaError::driver("memory pool support"))?;
    if supported == 0 {
        return Ok(());
    }
    ctx.bind_to_thread().map_err(CudaError::driver("binding the context"))?;
    // SAFETY: `cu_device` comes from the context just created; the attribute takes a u64
    // (cuuint64_t) by pointer, which `threshold` is, and the pool outlives the call.
    unsafe {
        let pool = dres::device::get_default_mem_pool(ctx.cu_device())
            .map_err(CudaError::driver("default memory pool"))?;
        let mut threshold: u64 = u64::MAX;
        dres::mem_pool::set_attribute(
            pool,
            dsys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .map_err(CudaError::driver("setting the memory pool release threshold"))?;
    }
    Ok(())
}
