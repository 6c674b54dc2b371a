#!/usr/bin/env bash
# Builds what the GPU machine runs (it has CUDA, PyTorch and PEFT but no Rust and no network)
# into gpu-bundle/:
#   gpu-bundle/twinkle      the binary (bench --device cuda; `serve` for the SDK flow)
#   gpu-bundle/cuda_gpu     the prebuilt GPU test executable (tests/cuda_gpu.rs)
#   gpu-bundle/tinker_sdk   the prebuilt SDK test executable (tests/tinker_sdk.rs)
#   gpu-bundle/wheels/      the tinker SDK and its pure-Python dependencies (pip download)
# Then on the GPU machine (device tool: carry ["gpu-bundle"]): bash scripts/gpu-check.sh
#
# BUNDLE_PROFILE=dev uses the test profile's executables (what `cargo test` already built; for
# the emulated run in scripts/test.sh) instead of a release build; BUNDLE_WHEELS=0 skips the
# wheel download.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${BUNDLE_PROFILE:-release}"
mkdir -p gpu-bundle
if [ "$profile" = release ]; then
    cargo build --release --bin twinkle
    cp target/release/twinkle gpu-bundle/twinkle
    flags=(--release)
else
    cargo build --bin twinkle
    cp target/debug/twinkle gpu-bundle/twinkle
    flags=()
fi
# The test executables' paths come from cargo's JSON messages ("executable" of each target).
exes=$(cargo test "${flags[@]}" --no-run --test cuda_gpu --test tinker_sdk --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    name = m.get("target", {}).get("name")
    if m.get("reason") == "compiler-artifact" and name in ("cuda_gpu", "tinker_sdk") \
            and m.get("executable"):
        print(name, m["executable"])
')
for name in cuda_gpu tinker_sdk; do
    exe=$(echo "$exes" | awk -v n="$name" '$1 == n { print $2 }' | tail -n 1)
    if [ -z "$exe" ]; then
        echo "build-gpu-bundle: no $name test executable found" >&2
        exit 1
    fi
    cp "$exe" "gpu-bundle/$name"
done
if [ "$profile" = release ]; then
    strip gpu-bundle/twinkle gpu-bundle/cuda_gpu gpu-bundle/tinker_sdk 2>/dev/null || true
fi
if [ "${BUNDLE_WHEELS:-1}" = 1 ]; then
    # tinker's own dependencies that a PyTorch + transformers machine lacks (numpy, transformers,
    # protobuf, tokenizers, ... are there already), installed there with --no-deps. Compiled
    # ones for each CPython of BUNDLE_PYTHONS (the carried bundle must stay under 64 MiB).
    rm -rf gpu-bundle/wheels
    pure=(tinker==0.38.0 anyio click distro httpx h11 h2 hpack hyperframe httpcore certifi idna
        sniffio rich markdown-it-py mdurl pygments pydantic annotated-types typing-extensions
        typing-inspection)
    compiled=(pydantic-core orjson zstandard pyqwest)
    python3 -m pip download --quiet --disable-pip-version-check --no-deps \
        --dest gpu-bundle/wheels --only-binary=:all: "${pure[@]}" >&2
    for py in ${BUNDLE_PYTHONS:-3.12}; do
        python3 -m pip download --quiet --disable-pip-version-check --no-deps \
            --dest gpu-bundle/wheels --only-binary=:all: --python-version "$py" \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
            "${compiled[@]}" >&2 || echo "build-gpu-bundle: wheels for python $py incomplete" >&2
    done
fi
ls -l gpu-bundle
du -sh gpu-bundle
