#!/usr/bin/env bash
# Builds what the GPU machine runs (it has CUDA, PyTorch and PEFT but no Rust) into gpu-bundle/:
#   gpu-bundle/twinkle    the release binary (bench --device cuda)
#   gpu-bundle/cuda_gpu   the prebuilt GPU test executable (tests/cuda_gpu.rs, release)
# Then on the GPU machine (device tool: carry ["gpu-bundle"]): bash scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p gpu-bundle
cargo build --release --bin twinkle
cp target/release/twinkle gpu-bundle/twinkle
# the test executable's path comes from cargo's JSON messages ("executable" of target cuda_gpu)
exe=$(cargo test --release --no-run --test cuda_gpu --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "cuda_gpu" \
            and m.get("executable"):
        print(m["executable"])
')
if [ -z "$exe" ]; then
    echo "build-gpu-bundle: no cuda_gpu test executable found" >&2
    exit 1
fi
cp "$exe" gpu-bundle/cuda_gpu
strip gpu-bundle/twinkle gpu-bundle/cuda_gpu 2>/dev/null || true
ls -l gpu-bundle
du -sh gpu-bundle
