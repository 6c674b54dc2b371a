//! Errors of the CUDA backend: missing libraries, NVRTC failures (with the compiler log), shape
//! mismatches caught by the launchers, and driver / cuBLAS errors.

use cudarc::cublas::result::CublasError;
use cudarc::cublaslt::result::CublasError as CublasLtError;
use cudarc::driver::DriverError;

/// Everything that can go wrong in `engine::cuda`. No variant is a panic in disguise: a missing
/// library or device is reported as an error the caller can show to the user.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// libnvrtc could not be loaded (not installed, or not on the search path).
    #[error(
        "NVRTC not found: install CUDA 12/13 NVRTC (libnvrtc.so.12 or .13) and put it on \
         LD_LIBRARY_PATH, or set TWINKLE_NVRTC_LIB to its full path (CI: run scripts/setup-venv.sh){detail}"
    )]
    NvrtcNotFound { detail: String },
    /// libcuda (the driver) could not be loaded: no NVIDIA driver on this machine.
    #[error(
        "CUDA driver not found (libcuda.so.1 is not loadable): this machine has no NVIDIA driver"
    )]
    DriverNotFound,
    /// libcublas could not be loaded.
    #[error(
        "cuBLAS not found: install CUDA 12/13 cuBLAS (libcublas.so.12 or .13) on LD_LIBRARY_PATH"
    )]
    CublasNotFound,
    /// libcublasLt could not be loaded (it ships beside libcublas in every CUDA 12/13 install).
    #[error(
        "cuBLASLt not found: install CUDA 12/13 cuBLAS (libcublasLt.so.12 or .13) on LD_LIBRARY_PATH"
    )]
    CublasLtNotFound,
    /// The kernel file name is not one of `KERNEL_FILES`.
    #[error("unknown kernel file {0:?}")]
    UnknownKernelFile(String),
    /// The architecture string is not `sm_XY` / `sm_XYZ`.
    #[error("invalid GPU architecture {0:?}: expected sm_80, sm_90, ...")]
    BadArch(String),
    /// NVRTC refused the source; `log` is NVRTC's program log.
    #[error("NVRTC failed to compile kernels/{file} for {arch} ({status}):\n{log}")]
    Compile { file: String, arch: String, status: String, log: String },
    /// An NVRTC API call other than the compilation itself failed.
    #[error("NVRTC call {call} failed for kernels/{file}: {status}")]
    NvrtcCall { file: String, call: &'static str, status: String },
    /// A launcher's shape / argument check failed; `kernel` is the kernel symbol.
    #[error("{kernel}: {msg}")]
    Shape { kernel: &'static str, msg: String },
    /// A CUDA driver call failed.
    #[error("CUDA driver error in {context}: {source}")]
    Driver {
        context: String,
        #[source]
        source: DriverError,
    },
    /// Bad input or state caught by the engine's checks (same messages as the CPU engine).
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    /// A cuBLAS call failed.
    #[error("cuBLAS error in {context}: {source}")]
    Cublas {
        context: String,
        #[source]
        source: CublasError,
    },
    /// A cuBLASLt call failed.
    #[error("cuBLASLt error in {context}: {source}")]
    CublasLt {
        context: String,
        #[source]
        source: CublasLtError,
    },
}

impl CudaError {
    /// Wraps a driver error with what we were doing.
    pub fn driver(context: impl Into<String>) -> impl FnOnce(DriverError) -> CudaError {
        let context = context.into();
        move |source| CudaError::Driver { context, source }
    }

    /// Wraps a cuBLAS error with what we were doing.
    pub fn cublas(context: impl Into<String>) -> impl FnOnce(CublasError) -> CudaError {
        let context = context.into();
        move |source| CudaError::Cublas { context, source }
    }

    /// Wraps a cuBLASLt error with what we were doing.
    pub fn cublas_lt(context: impl Into<String>) -> impl FnOnce(CublasLtError) -> CudaError {
        let context = context.into();
        move |source| CudaError::CublasLt { context, source }
    }

    /// The failure of a pass shared by `n` groups, one error per group: the first keeps this
    /// error, the others carry its message (errors are not `Clone`; none of these is the
    /// caller's fault, so `DataParallel` re-runs each group alone).
    pub(crate) fn for_each_group(self, n: usize) -> Vec<CudaError> {
        let msg = self.to_string();
        let others = (1..n).map(|_| CudaError::Shape { kernel: "shared pass", msg: msg.clone() });
        std::iter::once(self).chain(others).take(n).collect()
    }
}
