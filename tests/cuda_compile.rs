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

/// Every symbol a launcher loads (`src/engine/cuda/launch/*.rs`) is defined by its kernel file:
/// a renamed kernel would otherwise only fail on a GPU, at `load_function`.
#[test]
fn every_launcher_symbol_is_in_its_cubin() {
    if !nvrtc_or_skip() {
        return;
    }
    let both: &[(&str, &[&str])] = &[
        ("elementwise.cu", &["add_fwd", "scale_fwd", "acc_fwd", "bias_add_fwd", "copy_cols_fwd"]),
        ("embedding.cu", &["embedding_fwd"]),
        ("rmsnorm.cu", &["rmsnorm_fwd", "rmsnorm_bwd"]),
        ("rope.cu", &["rope_fwd", "rope_bwd"]),
        ("swiglu.cu", &["swiglu_fwd", "swiglu_bwd"]),
        (
            "attention.cu",
            &["attention_fwd", "attention_bwd", "attention_delta_bwd", "attention_dq_bwd"],
        ),
        ("kv_cache.cu", &["kv_append_fwd", "decode_split_fwd", "decode_combine_fwd"]),
        ("lora.cu", &["lora_seg"]),
        ("loss.cu", &["xent_fwd", "xent_bwd"]),
        ("sampling.cu", &["argmax_fwd", "sample_fwd"]),
    ];
    let single: &[(&str, &str)] = &[
        ("elementwise.cu", "to_bf16_fwd_f32"),
        ("elementwise.cu", "to_f32_fwd_bf16"),
        ("elementwise.cu", "sumsq_fwd_f32"),
        ("loss.cu", "xent_finish_fwd_f32"),
        ("loss.cu", "loss_fwd_f32"),
        ("adamw.cu", "adamw_fwd_f32"),
        ("adamw.cu", "sumsq_multi_fwd_f32"),
        ("adamw.cu", "adamw_multi_fwd_f32"),
        ("loss.cu", "loss_term_fwd_f32"),
        ("sampling.cu", "sample_exp_fwd"),
    ];
    let mut wanted: Vec<(&str, String)> = single.iter().map(|&(f, s)| (f, s.to_string())).collect();
    // launch/flash.rs: bf16 only, one family per head dim
    for hd in [32, 64, 128] {
        for k in ["flash_fwd", "flash_bwd_dq", "flash_bwd_dkdv"] {
            wanted.push(("flash.cu", format!("{k}_hd{hd}_bf16")));
        }
    }
    for &(f, stems) in both {
        for s in stems {
            wanted.push((f, format!("{s}_f32")));
            wanted.push((f, format!("{s}_bf16")));
        }
    }
    for (file, sym) in wanted {
        let c = cuda::compile_file(file, "sm_90").unwrap_or_else(|e| panic!("{e}"));
        let mut name = sym.clone().into_bytes();
        name.push(0);
        assert!(
            c.cubin.windows(name.len()).any(|w| w == name.as_slice()),
            "kernels/{file} defines no `{sym}`"
        );
    }
}
