//! CI check that every `kernels/*.cu` file compiles with NVRTC for sm_80 and sm_90 with an empty
//! log (no error, no warning). Needs libnvrtc, not a GPU. Without NVRTC it skips with a reason,
//! unless `TWINKLE_REQUIRE_NVRTC=1` (set by scripts/test.sh after scripts/setup-venv.sh), which
//! turns the skip into a failure.

use twinkle::engine::cuda::{self, CudaError};

fn nvrtc_or_skip() -> bool {
    match cuda::nvrtc_available() {
        Ok(()) => true,
        Err(e) => {
            let required = std::env::var("TWINKLE_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
            assert!(!required, "TWINKLE_REQUIRE_NVRTC=1 but {e}");
            eprintln!("SKIP: NVRTC not found: run scripts/setup-venv.sh ({e})");
            false
        }
    }
}

fn check_arch(arch: &str) {
    if !nvrtc_or_skip() {
        return;
    }
    let (major, minor) = cuda::nvrtc_version().expect("nvrtcVersion");
    eprintln!("NVRTC {major}.{minor}, target {arch}");
    let logs = match cuda::compile_all(arch) {
        Ok(logs) => logs,
        Err(e @ CudaError::Compile { .. }) => panic!("{e}"),
        Err(e) => panic!("compile_all({arch}): {e}"),
    };
    assert_eq!(logs.len(), cuda::KERNEL_FILES.len());
    let dirty: Vec<String> = logs
        .iter()
        .filter(|(_, log)| !log.is_empty())
        .map(|(f, log)| format!("kernels/{f}:\n{log}"))
        .collect();
    assert!(dirty.is_empty(), "NVRTC warnings for {arch}:\n{}", dirty.join("\n"));
}

#[test]
fn every_kernel_compiles_cleanly_for_sm80() {
    check_arch("sm_80");
}

#[test]
fn every_kernel_compiles_cleanly_for_sm90() {
    check_arch("sm_90");
}

#[test]
fn a_broken_kernel_reports_file_and_log() {
    // compile_all only takes the embedded files; a bad arch is the error we can provoke safely.
    if !nvrtc_or_skip() {
        return;
    }
    let err = cuda::compile_file("rmsnorm.cu", "sm_1").unwrap_err();
    assert!(matches!(err, CudaError::BadArch(_)), "{err}");
    let err = cuda::compile_file("missing.cu", "sm_80").unwrap_err();
    assert!(err.to_string().contains("missing.cu"), "{err}");
}
