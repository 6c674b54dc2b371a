//! `CudaDevice`: one CUDA context + stream + cuBLAS handle, and the per-device cache of loaded
//! kernel functions. Created only in child processes (never in the head: CUDA does not survive
//! `fork`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, sys as dsys};
use cudarc::nvrtc::Ptx;

use super::{CudaError, nvrtc};

/// Ok when libcuda can be loaded. Never touches the driver beyond `dlopen`.
pub fn driver_available() -> Result<(), CudaError> {
    // SAFETY: only tries dlopen on cudarc's list of library names.
    if unsafe { dsys::is_culib_present() } { Ok(()) } else { Err(CudaError::DriverNotFound) }
}

/// Ok when libcublas can be loaded.
pub fn cublas_available() -> Result<(), CudaError> {
    // SAFETY: only tries dlopen on cudarc's list of library names.
    if unsafe { cudarc::cublas::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::CublasNotFound)
    }
}

/// A GPU as the engine sees it: context, the stream every launcher enqueues on, cuBLAS bound to
/// that stream, and kernels compiled for this device's exact `sm_XY`.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    arch: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
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
        let (major, minor) =
            ctx.compute_capability().map_err(CudaError::driver("compute capability"))?;
        let stream = ctx.new_stream().map_err(CudaError::driver("creating stream"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(CudaError::cublas("creating handle"))?;
        Ok(Self {
            ctx,
            stream,
            blas,
            arch: format!("sm_{major}{minor}"),
            modules: Mutex::default(),
            functions: Mutex::default(),
        })
    }

    /// The context.
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
