//! `twinkle status` shows live per-card NVML figures and which application holds each card.
//!
//! CI has no GPU and no NVML, so the test builds a stand-in `libnvidia-ml.so.1` from
//! `tests/fixtures/fake-nvml/fake_nvml.c` (the entry points nvml-wrapper calls, with nvml.h's
//! signatures and structs) and puts it first on `LD_LIBRARY_PATH`: nvml-wrapper dlopens
//! `libnvidia-ml.so.1` by name, so the real `twinkle serve` loads it exactly as it would load
//! the driver's library, for node detection and for the periodic samples alike.

mod platform_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use platform_support::*;
use serde_json::Value;

/// Startup on a loaded 2-core machine can be slow; failures, not slowness, are what we test.
const STARTUP: Duration = Duration::from_secs(90);

/// Four cards: two H100s, an L4 whose utilisation query is unsupported, and a spare L4.
const CARDS: &str = "Fake H100 80GB HBM3:81559:1024:37;Fake H100 80GB HBM3:81559:2048:0;\
                     Fake L4:22491:300:-;Fake L4:22491:0:5";

/// Compiles the stand-in library into `dir` as `libnvidia-ml.so.1`.
fn build_fake_nvml(dir: &Path) -> Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake-nvml/fake_nvml.c");
    let lib = dir.join("libnvidia-ml.so.1");
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-lpthread")
        .output()
        .context("run cc (a C compiler is needed to build the fake NVML)")?;
    ensure!(out.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&out.stderr));
    Ok(lib)
}

fn node_gpus(st: &Value) -> Vec<Value> {
    st["nodes"][0]["gpus"].as_array().cloned().unwrap_or_default()
}

/// Which application status says holds physical card `id`.
fn holder(st: &Value, id: u64) -> Value {
    st["applications"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["gpu_ids"].as_array().is_some_and(|g| g.iter().any(|x| x.as_u64() == Some(id))))
        .map_or(Value::Null, |a| a["name"].clone())
}

/// The Tinker deployment with `args`, the fake NVML first on the library path and GPU samples
/// every 0.2 s, plus `env`; the library's directory lives as long as the returned guard.
fn serve_with_fake_nvml(args: &[&str], env: &[(&str, &str)]) -> Result<(tempfile::TempDir, Serve)> {
    let libdir = tempfile::tempdir()?;
    build_fake_nvml(libdir.path())?;
    let libpath = path_of(libdir.path());
    let mut all = vec![("LD_LIBRARY_PATH", libpath.as_str()), ("TWINKLE_GPU_STATS_S", "0.2")];
    all.extend_from_slice(env);
    let serve = Serve::tinker(args, &all)?;
    Ok((libdir, serve))
}

#[test]
fn status_shows_fake_nvml_cards_and_their_holders() -> Result<()> {
    // No --num-gpus: the cards come from (fake) NVML, as on a real GPU machine.
    let (_lib, mut serve) =
        serve_with_fake_nvml(&["--num-cpus", "4"], &[("FAKE_NVML_GPUS", CARDS)])?;
    serve.wait_all_running(STARTUP)?;
    let st = poll(Duration::from_secs(30), || {
        let st = serve.status_json().ok()?;
        let gpus = node_gpus(&st);
        (gpus.len() == 4 && gpus.iter().all(|g| !g["memory_total_mib"].is_null())).then_some(st)
    })
    .with_context(|| format!("no GPU figures in status; serve log:\n{}", serve.log_text()))?;

    assert_eq!(st["nodes"][0]["gpu_ids"], serde_json::json!([0, 1, 2, 3]), "{st}");
    let gpus = node_gpus(&st);
    let expected = [
        ("Fake H100 80GB HBM3", 1024, 81559, Value::from(37)),
        ("Fake H100 80GB HBM3", 2048, 81559, Value::from(0)),
        ("Fake L4", 300, 22491, Value::Null),
        ("Fake L4", 0, 22491, Value::from(5)),
    ];
    let mut held = 0;
    for (id, (g, (name, used, total, util))) in gpus.iter().zip(expected).enumerate() {
        assert_eq!(g["id"], id as u64, "{g}");
        assert_eq!(g["name"], name, "{g}");
        assert_eq!(g["memory_used_mib"], used, "{g}");
        assert_eq!(g["memory_total_mib"], total, "{g}");
        assert_eq!(g["utilization_pct"], util, "{g}");
        assert_eq!(g["app"], holder(&st, id as u64), "card {id}: {st}");
        held += usize::from(!g["app"].is_null());
    }
    assert_eq!(held, 3, "model 2 + sampler 1 cards: {st}");

    let text = serve.status_text()?;
    ensure!(text.contains("GPU  NAME"), "no GPU table:\n{text}");
    for (id, g) in gpus.iter().enumerate() {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{id} ")) && l.contains("Fake"))
            .with_context(|| format!("no row for card {id}:\n{text}"))?;
        let used = g["memory_used_mib"].as_u64().unwrap_or_default();
        let total = g["memory_total_mib"].as_u64().unwrap_or_default();
        ensure!(line.contains(&format!("{used}/{total} MiB")), "{line}");
        let util = g["utilization_pct"].as_u64().map_or("n/a".to_string(), |u| format!("{u}%"));
        ensure!(line.contains(&util), "{line}");
        ensure!(line.ends_with(g["app"].as_str().unwrap_or("-")), "{line}");
    }

    // The gateway's Prometheus scrape has the same figures, per card, in bytes and ratios; a
    // card whose utilisation NVML does not report has no utilisation sample.
    let scrape = String::from_utf8(get(&serve.gateway, "/metrics")?.body)?;
    let node = st["nodes"][0]["id"].as_str().unwrap_or_default();
    for (id, g) in gpus.iter().enumerate() {
        let labels =
            format!("{{node=\"{node}\",gpu=\"{id}\",app=\"{}\"}}", g["app"].as_str().unwrap_or(""));
        let mib = |k: &str| g[k].as_u64().unwrap_or_default() * 1024 * 1024;
        let used = format!("twinkle_gpu_memory_used_bytes{labels} {}\n", mib("memory_used_mib"));
        let total = format!("twinkle_gpu_memory_total_bytes{labels} {}\n", mib("memory_total_mib"));
        ensure!(scrape.contains(&used) && scrape.contains(&total), "card {id}:\n{scrape}");
        let util = format!("twinkle_gpu_utilization_ratio{labels} ");
        let reported = g["utilization_pct"].is_u64();
        ensure!(scrape.contains(&util) == reported, "card {id}:\n{scrape}");
    }
    ensure!(
        scrape.contains("twinkle_gpu_utilization_ratio{node=\"") && scrape.contains("} 0.37\n")
    );
    Ok(())
}

/// NVML loads but the driver does not answer (here: the stand-in without cards configured):
/// every figure is null / n/a, the holders are still shown, and serve runs normally.
#[test]
fn status_says_n_a_without_a_working_nvml() -> Result<()> {
    let (_lib, mut serve) = serve_with_fake_nvml(&["--num-gpus", "3", "--num-cpus", "4"], &[])?;
    let st = serve.wait_all_running(STARTUP)?;
    let gpus = node_gpus(&st);
    assert_eq!(gpus.len(), 3, "{st}");
    for (id, g) in gpus.iter().enumerate() {
        for k in ["name", "memory_used_mib", "memory_total_mib", "utilization_pct"] {
            assert!(g[k].is_null(), "{k} of card {id} should be null: {g}");
        }
        assert_eq!(g["app"], holder(&st, id as u64), "{st}");
        assert!(!g["app"].is_null(), "all three cards are held: {st}");
    }
    let text = serve.status_text()?;
    let rows: Vec<&str> = text.lines().filter(|l| l.contains("n/a")).collect();
    assert_eq!(rows.len(), 3, "{text}");
    Ok(())
}
