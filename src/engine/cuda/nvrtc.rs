//! Kernel registry and NVRTC compilation: every `kernels/*.cu` file is embedded in the binary,
//! prefixed with `kernels/common.cuh`, and compiled to CUBIN for one exact `sm_XY`.
//!
//! CUBIN rather than PTX: PTX from an NVRTC newer than the driver is rejected
//! (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`), while a CUBIN for the device's own architecture loads
//! on any driver at least as new as the NVRTC that built it.

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::{result, sys};

use super::CudaError;

/// Shared prelude (bf16, reductions) prepended to every kernel file.
pub const COMMON_PRELUDE: &str = include_str!("../../../kernels/common.cuh");

/// `(file name, source)` of each named `kernels/<name>.cu`, embedded at compile time.
macro_rules! kernel_files {
    ($($name:literal),* $(,)?) => {
        &[$((concat!($name, ".cu"), include_str!(concat!("../../../kernels/", $name, ".cu")))),*]
    };
}

/// Every kernel file, one per op family, as (file name, source).
pub const KERNEL_FILES: &[(&str, &str)] = kernel_files![
    "elementwise",
    "embedding",
    "rmsnorm",
    "rope",
    "swiglu",
    "attention",
    "flash",
    "kv_cache",
    "lora",
    "loss",
    "adamw",
    "sampling",
];

/// Environment variable naming the full path of libnvrtc.so.N to use (preloaded before cudarc
/// searches its own list of names, so it wins over LD_LIBRARY_PATH).
pub const NVRTC_LIB_ENV: &str = "TWINKLE_NVRTC_LIB";

/// One compiled kernel file.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// File name under `kernels/`.
    pub file: &'static str,
    /// Target architecture (`sm_80`, ...).
    pub arch: String,
    /// The CUBIN image.
    pub cubin: Arc<Vec<u8>>,
    /// NVRTC's program log (warnings); empty for a clean compile.
    pub log: String,
}

/// dlopens `$TWINKLE_NVRTC_LIB` once with RTLD_GLOBAL. glibc matches later `dlopen("libnvrtc.so.12")`
/// calls against the SONAME of already-loaded objects, so cudarc then finds this very library.
fn preload_from_env() -> Result<(), String> {
    static PRELOAD: OnceLock<Result<(), String>> = OnceLock::new();
    PRELOAD
        .get_or_init(|| {
            let Some(path) = std::env::var_os(NVRTC_LIB_ENV) else { return Ok(()) };
            let c_path = CString::new(path.as_encoded_bytes())
                .map_err(|_| format!("{NVRTC_LIB_ENV} contains a NUL byte"))?;
            // SAFETY: dlopen with a valid C string; the handle is deliberately never closed so
            // the library stays mapped for the life of the process (cudarc keeps symbols).
            let handle =
                unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if handle.is_null() {
                // SAFETY: dlerror returns a thread-local C string or NULL.
                let err = unsafe { libc::dlerror() };
                let msg = if err.is_null() {
                    "unknown dlopen error".to_string()
                } else {
                    // SAFETY: non-null dlerror result is a valid NUL-terminated string.
                    unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned()
                };
                return Err(format!("{NVRTC_LIB_ENV}={}: {msg}", path.to_string_lossy()));
            }
            Ok(())
        })
        .clone()
}

/// Ok when libnvrtc can be loaded; the error explains how to install it.
pub fn nvrtc_available() -> Result<(), CudaError> {
    preload_from_env().map_err(|e| CudaError::NvrtcNotFound { detail: format!(" ({e})") })?;
    // SAFETY: only tries dlopen on cudarc's list of library names; calls no NVRTC function.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::NvrtcNotFound { detail: String::new() })
    }
}

/// The NVRTC version (major, minor) of the loaded library.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    nvrtc_available()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: library presence checked above; both out-pointers are valid.
    let status = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    status.result().map_err(|e| CudaError::NvrtcCall {
        file: String::new(),
        call: "nvrtcVersion",
        status: format!("{e:?}"),
    })?;
    Ok((major, minor))
}

/// Full source handed to NVRTC: prelude, then the file with `#line` so that NVRTC's log names
/// `kernels/<file>` and its own line numbers.
pub fn kernel_source(file: &str) -> Result<String, CudaError> {
    let (name, src) = KERNEL_FILES
        .iter()
        .find(|(name, _)| *name == file)
        .ok_or_else(|| CudaError::UnknownKernelFile(file.to_string()))?;
    Ok(format!("{COMMON_PRELUDE}\n#line 1 \"kernels/{name}\"\n{src}"))
}

fn check_arch(arch: &str) -> Result<(), CudaError> {
    let digits = arch.strip_prefix("sm_").map(|s| s.strip_suffix('a').unwrap_or(s));
    match digits {
        Some(d) if (2..=3).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
        _ => Err(CudaError::BadArch(arch.to_string())),
    }
}

/// NVRTC options: exact-arch CUBIN, C++17, and ptxas warnings for register spills so that the
/// compile test also catches kernels that silently spill.
fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--fmad=true".to_string(),
        "--ptxas-options=--warn-on-spills".to_string(),
    ]
}

/// Owns an nvrtcProgram and destroys it on every path.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: self.0 came from create_program and is destroyed exactly once, here. A failure
        // to free is not actionable, so the status is ignored.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

fn c_buf_to_string(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).trim().to_string()
}

fn compile_uncached(file: &'static str, arch: &str) -> Result<Compiled, CudaError> {
    check_arch(arch)?;
    nvrtc_available()?;
    let src = kernel_source(file)?;
    let call_err = |call: &'static str| {
        move |e: result::NvrtcError| CudaError::NvrtcCall {
            file: file.to_string(),
            call,
            status: format!("{e:?}"),
        }
    };
    let c_src = CString::new(src).map_err(|_| CudaError::Compile {
        file: file.to_string(),
        arch: arch.to_string(),
        status: "source contains a NUL byte".to_string(),
        log: String::new(),
    })?;
    let c_name = CString::new(file).map_err(|_| CudaError::UnknownKernelFile(file.to_string()))?;
    let prog = Program(
        result::create_program(&c_src, Some(&c_name)).map_err(call_err("nvrtcCreateProgram"))?,
    );
    let opts = options(arch);
    // SAFETY: prog.0 is a live program (destroyed only by Program::drop).
    let compiled = unsafe { result::compile_program(prog.0, &opts) };
    // SAFETY: as above; the log exists after any compile attempt.
    let log = unsafe { result::get_program_log(prog.0) }
        .map(|buf| c_buf_to_string(&buf))
        .map_err(call_err("nvrtcGetProgramLog"))?;
    if let Err(e) = compiled {
        return Err(CudaError::Compile {
            file: file.to_string(),
            arch: arch.to_string(),
            status: format!("{e:?}, options {opts:?}"),
            log,
        });
    }
    let mut size = 0usize;
    // SAFETY: prog.0 compiled successfully for a real sm_XY, so a CUBIN exists.
    unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }
        .result()
        .map_err(call_err("nvrtcGetCUBINSize"))?;
    let mut cubin = vec![0u8; size];
    // SAFETY: the buffer has exactly the size NVRTC reported.
    unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast::<c_char>()) }
        .result()
        .map_err(call_err("nvrtcGetCUBIN"))?;
    if cubin.is_empty() {
        return Err(CudaError::NvrtcCall {
            file: file.to_string(),
            call: "nvrtcGetCUBIN",
            status: "empty CUBIN".into(),
        });
    }
    Ok(Compiled { file, arch: arch.to_string(), cubin: Arc::new(cubin), log })
}

type Cache = Mutex<HashMap<(&'static str, String), Compiled>>;

/// Compiles `kernels/<file>` for `arch` (e.g. `sm_90`), once per process: later calls return the
/// cached CUBIN.
pub fn compile_file(file: &str, arch: &str) -> Result<Compiled, CudaError> {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let file: &'static str = KERNEL_FILES
        .iter()
        .map(|(name, _)| *name)
        .find(|name| *name == file)
        .ok_or_else(|| CudaError::UnknownKernelFile(file.to_string()))?;
    let cache = CACHE.get_or_init(Cache::default);
    let key = (file, arch.to_string());
    if let Some(hit) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(hit.clone());
    }
    // Compile outside the lock: NVRTC takes seconds and other files may compile meanwhile.
    let compiled = compile_uncached(file, arch)?;
    cache.lock().unwrap_or_else(|p| p.into_inner()).insert(key, compiled.clone());
    Ok(compiled)
}

/// Compiles every kernel file for `arch` and returns each file's NVRTC log (empty = clean).
/// Used by the CI compile test; it needs libnvrtc but no GPU.
pub fn compile_all(arch: &str) -> Result<Vec<(String, String)>, CudaError> {
    KERNEL_FILES
        .iter()
        .map(|(file, _)| compile_file(file, arch).map(|c| (file.to_string(), c.log)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_strings_are_validated() {
        assert!(check_arch("sm_80").is_ok());
        assert!(check_arch("sm_90a").is_ok());
        assert!(check_arch("sm_100").is_ok());
        assert!(matches!(check_arch("compute_80"), Err(CudaError::BadArch(_))));
        assert!(matches!(check_arch("sm_"), Err(CudaError::BadArch(_))));
        assert!(matches!(check_arch("sm_8x"), Err(CudaError::BadArch(_))));
    }

    #[test]
    fn source_names_the_file_for_nvrtc_logs() {
        let src = kernel_source("rmsnorm.cu").unwrap();
        assert!(src.starts_with(COMMON_PRELUDE));
        assert!(src.contains("#line 1 \"kernels/rmsnorm.cu\""));
        assert!(matches!(kernel_source("nope.cu"), Err(CudaError::UnknownKernelFile(_))));
    }

    #[test]
    fn every_kernel_file_is_listed_once() {
        let mut names: Vec<&str> = KERNEL_FILES.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), KERNEL_FILES.len());
        let on_disk = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".cu"))
            .count();
        assert_eq!(on_disk, KERNEL_FILES.len(), "a kernels/*.cu file is missing from KERNEL_FILES");
    }
}
