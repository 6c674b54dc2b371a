//! Model id resolution over hand-built cache layouts, and the generated tiny Qwen3 model.

use std::path::{Path, PathBuf};

use twinkle::engine::Model;
use twinkle::engine::cuda::{bench_shape, bf16, host_tensor};
use twinkle::engine::synth::SynthSpec;
use twinkle::engine::weights::load_f32;
use twinkle::hub::generate::{GenOptions, generate_model};
use twinkle::hub::{HubEnv, HubError, resolve_with};
use twinkle::tokenize::Tokenizer;

fn model_dir(p: &Path) -> PathBuf {
    std::fs::create_dir_all(p).unwrap();
    std::fs::write(p.join("config.json"), "{}").unwrap();
    p.to_path_buf()
}

fn env(home: &Path) -> HubEnv {
    HubEnv { home: Some(home.to_path_buf()), ..HubEnv::default() }
}

#[test]
fn modelscope_layouts_resolve() {
    let t = tempfile::tempdir().unwrap();
    let ms = t.path().join(".cache/modelscope/hub");
    let dotted = model_dir(&ms.join("models/Qwen/Qwen2___5-0___5B-Instruct"));
    let legacy = model_dir(&ms.join("Org/Legacy"));
    let e = env(t.path());
    assert_eq!(resolve_with("ms://Qwen/Qwen2.5-0.5B-Instruct", &e).unwrap(), dotted);
    assert_eq!(resolve_with("Qwen/Qwen2.5-0.5B-Instruct", &e).unwrap(), dotted);
    assert_eq!(resolve_with("ms://Org/Legacy", &e).unwrap(), legacy);
    // MODELSCOPE_CACHE comes first.
    let custom = model_dir(&t.path().join("msc/models/Org/Legacy"));
    let mut e2 = env(t.path());
    e2.ms.cache = Some(t.path().join("msc"));
    assert_eq!(resolve_with("ms://Org/Legacy", &e2).unwrap(), custom);
}

#[test]
fn huggingface_snapshots_resolve() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join(".cache/huggingface/hub/models--Org--Name");
    let main = model_dir(&repo.join("snapshots/abc123"));
    model_dir(&repo.join("snapshots/def456"));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
    assert_eq!(resolve_with("hf://Org/Name", &env(t.path())).unwrap(), main);
    // Without refs/main, the only snapshot is used.
    let one = t.path().join("hfhome/hub/models--Org--One/snapshots/only");
    let one = model_dir(&one);
    let mut e = env(t.path());
    e.hf.home = Some(t.path().join("hfhome"));
    assert_eq!(resolve_with("hf://Org/One", &e).unwrap(), one);
    // HF_HUB_CACHE wins over HF_HOME.
    let direct = model_dir(&t.path().join("hc/models--Org--One/snapshots/x"));
    e.hf.hub_cache = Some(t.path().join("hc"));
    assert_eq!(resolve_with("hf://Org/One", &e).unwrap(), direct);
    // Two snapshots and no refs/main: ambiguous, so not found.
    std::fs::remove_file(repo.join("refs/main")).unwrap();
    assert!(resolve_with("hf://Org/Name", &env(t.path())).is_err());
}

#[test]
fn local_paths_are_used_as_is() {
    let t = tempfile::tempdir().unwrap();
    let d = model_dir(&t.path().join("mymodel"));
    assert_eq!(resolve_with(d.to_str().unwrap(), &HubEnv::default()).unwrap(), d);
    assert_eq!(resolve_with("src/hub", &HubEnv::default()).unwrap(), PathBuf::from("src/hub"));
}

#[test]
fn missing_model_lists_every_place_looked() {
    let t = tempfile::tempdir().unwrap();
    let mut e = env(t.path());
    e.ms.cache = Some(t.path().join("msc"));
    e.hf.hub_cache = Some(t.path().join("hfc"));
    let err = resolve_with("Nope/Missing", &e).unwrap_err();
    let HubError::NotFound { looked, .. } = &err else { panic!("{err}") };
    let text = err.to_string();
    for p in [
        t.path().join("msc/models/Nope/Missing"),
        t.path().join("msc/Nope/Missing"),
        t.path().join(".cache/modelscope/hub/models/Nope/Missing"),
        t.path().join("hfc/models--Nope--Missing/snapshots"),
        t.path().join(".cache/huggingface/hub/models--Nope--Missing/snapshots"),
    ] {
        assert!(looked.contains(&p), "{p:?} not in {looked:?}");
        assert!(text.contains(&p.display().to_string()), "{text}");
    }
    let err = resolve_with("hf://Nope/Missing", &e).unwrap_err().to_string();
    assert!(err.contains("hfc/models--Nope--Missing") && !err.contains("modelscope"), "{err}");
    assert!(matches!(resolve_with("ms://justone", &e), Err(HubError::BadRepoId(_))));
    assert!(matches!(resolve_with("generate://gpt5", &e), Err(HubError::UnknownPreset(_))));
}

#[test]
fn generated_model_loads_with_the_real_tokenizer() {
    let t = tempfile::tempdir().unwrap();
    let e = HubEnv { twinkle_home: Some(t.path().to_path_buf()), ..HubEnv::default() };
    let start = std::time::Instant::now();
    let dir = resolve_with("generate://qwen3-tiny", &e).unwrap();
    let took = start.elapsed();
    assert!(dir.starts_with(t.path().join("models/generated")), "{dir:?}");
    assert!(took.as_secs_f64() < 4.0, "generation took {took:?}");
    let model = Model::load(&dir).unwrap();
    let c = model.config();
    assert_eq!(c.arch, "Qwen3ForCausalLM");
    assert_eq!((c.vocab_size, c.hidden_size, c.num_layers), (151_936, 64, 2));
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (4, 2, 16));
    assert!(!c.tie_word_embeddings && c.qk_norm);
    assert_eq!(c.eos_token_ids, vec![151_645, 151_643]);
    let tok = Tokenizer::from_dir(&dir).unwrap();
    // Qwen's byte-level BPE: "Hello" is one token (id 9707 in the Qwen2/3 vocabulary).
    assert_eq!(tok.encode("Hello", false).unwrap(), vec![9707]);
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(151_645));
    // A second resolve reuses the directory; no temp directories are left behind.
    assert_eq!(resolve_with("generate://qwen3-tiny", &e).unwrap(), dir);
    let leftovers: Vec<_> = std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn generation_is_deterministic() {
    let t = tempfile::tempdir().unwrap();
    let mut o = GenOptions::qwen3_tiny();
    o.hidden = 32;
    o.intermediate = 64;
    o.head_dim = 8;
    generate_model(&t.path().join("a"), &o).unwrap();
    generate_model(&t.path().join("b"), &o).unwrap();
    let read = |d: &str| std::fs::read(t.path().join(d).join("model.safetensors")).unwrap();
    assert_eq!(read("a"), read("b"));
    o.seed += 1;
    generate_model(&t.path().join("c"), &o).unwrap();
    assert_ne!(read("a"), read("c"));
    o.kv_heads = 3;
    assert!(generate_model(&t.path().join("d"), &o).is_err());
}

/// Every tensor of `files` (safetensors written by one path) is bit-identical to the GPU
/// benchmark's host values and the in-memory generator for `spec` and `seed`.
fn same_weights_everywhere(spec: &SynthSpec, seed: u64, files: &[&Path]) {
    let cpu = spec.random_weights(seed).unwrap();
    assert_eq!(cpu.len(), spec.tensors().len());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for plan in spec.tensors() {
        let want = bits(cpu[&plan.name].data());
        let gpu_f32: Vec<f32> = host_tensor::<f32>(&plan, seed);
        assert_eq!(bits(&gpu_f32), want, "GPU host f32 {}", plan.name);
        let gpu_bf16: Vec<bf16> = host_tensor::<bf16>(&plan, seed);
        let rounded: Vec<bf16> =
            cpu[&plan.name].data().iter().map(|&x| bf16::from_f32(x)).collect();
        assert_eq!(gpu_bf16, rounded, "GPU host bf16 {}", plan.name);
    }
    for path in files {
        let loaded = load_f32(path).unwrap();
        assert_eq!(loaded.keys().collect::<Vec<_>>(), cpu.keys().collect::<Vec<_>>(), "{path:?}");
        for (name, t) in &loaded {
            assert_eq!(t.shape(), cpu[name].shape(), "{path:?} {name}");
            assert_eq!(bits(t.data()), bits(cpu[name].data()), "{path:?} {name}");
        }
    }
}

#[test]
fn bench_gpu_bench_and_generated_models_share_weights() {
    let t = tempfile::tempdir().unwrap();
    // The generate:// path: its options name the generator's shape; the CPU benchmark writes the
    // same shape with `SynthSpec::write`.
    let mut o = GenOptions::qwen3_tiny();
    (o.hidden, o.intermediate, o.heads, o.kv_heads, o.head_dim, o.layers) = (16, 32, 2, 1, 8, 2);
    o.seed = 77;
    generate_model(&t.path().join("gen"), &o).unwrap();
    let spec = o.synth_spec();
    spec.write(&t.path().join("bench"), o.seed).unwrap();
    same_weights_everywhere(
        &spec,
        o.seed,
        &[&t.path().join("gen/model.safetensors"), &t.path().join("bench/model.safetensors")],
    );
    // The benchmarks' own shape (random norms and biases).
    let tiny = bench_shape("tiny").unwrap();
    tiny.write(&t.path().join("tiny"), 5).unwrap();
    same_weights_everywhere(&tiny, 5, &[&t.path().join("tiny/model.safetensors")]);
}
