#!/usr/bin/env bash
# mutation-check.sh - shows that the GPU suite, run on the CPU emulator, catches real mistakes.
#
# Each mutation is applied to a temporary copy (the committed sources are never touched), the
# affected part is rebuilt (kernels: the emulator library from a mutated kernels dir; launchers:
# the test binary from a copied repo, sharing CARGO_TARGET_DIR for the dependencies), and the
# relevant tests/cuda_gpu.rs test runs against the emulator. (The mutated crate is built with a
# cargo profile of its own, `mutation` = dev, into $CARGO_TARGET_DIR/mutation: cargo names path
# packages' artifacts by package, not by directory, so a copy built with the dev profile would
# replace the tree's own artifacts in the shared target dir and look up to date to cargo.) A kernel mutation runs under the
# default schedule and under CUDA_EMU_SHUFFLE=1 (reverse warp/lane order); it counts as caught
# when the test fails in either. Exit status 1 if any mutation survives.
#
# usage: tools/cuda-emu/mutation-check.sh [--kernels-only | --launchers-only]
#   needs the project venv (scripts/setup-venv.sh) for NVRTC, g++, python3, cargo.
#   CUDA_GPU_TEST_BIN=path reuses an up-to-date tests/cuda_gpu.rs binary for the kernel mutations.
set -uo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"
eval "$(scripts/setup-venv.sh)"
export TWINKLE_NVRTC_LIB CARGO_INCREMENTAL=0
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
export TWINKLE_REQUIRE_GPU=1
work="$(mktemp -d /tmp/cuda-emu-mutations.XXXXXX)"
trap 'rm -rf "$work"' EXIT
results=()
survivors=0

# Copies tracked files of `repo` (as they are in the working tree) to $1.
copy_repo() {
  mkdir -p "$1"
  git -C "$repo" ls-files -z | (cd "$repo" && xargs -0 cp --parents -t "$1")
}

# mutate FILE NAME PYTHON-EXPR: rewrites FILE with a python function body acting on `s`.
mutate() {
  python3 - "$1" "$2" <<EOF
import sys, re
path, name = sys.argv[1], sys.argv[2]
s = open(path).read()
orig = s
$3
if s == orig:
    sys.exit(f"mutation {name}: pattern not found in {path}")
open(path, "w").write(s)
EOF
}

# Removes the n-th line that is exactly `__syncthreads();` (prints the removed line number).
drop_barrier() {
  mutate "$1" "$2" "
lines = s.split('\n')
hits = [i for i, l in enumerate(lines) if re.fullmatch(r'\s*__syncthreads\(\);\s*', l)]
n = $3
if len(hits) < n: sys.exit(f'mutation {name}: only {len(hits)} barriers in {path}')
print(f'  removed __syncthreads() at {path.split(\"/\")[-1]}:{hits[n-1]+1}')
lines[hits[n-1]] = ''
s = '\n'.join(lines)"
}

# summarise LOG: the first lines that say why the test failed.
summarise() {
  { grep -E "cuda-emu: FATAL|^  in kernel|the error above happened" "$1"
    grep -A1 "panicked at" "$1" | grep -v -- "^--$"; } | head -4 | sed 's/^/      /'
}

# test_binary: builds tests/cuda_gpu.rs of the crate in the current directory, prints its path.
test_binary() {
  cargo test -q --test cuda_gpu --no-run --message-format=json "$@" 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda_gpu":
        print(m["executable"])'
}

# run_test NAME BINARY LIBDIR TEST [ENV...]: 0 if the test failed (mutation caught).
run_test() {
  local name="$1" bin="$2" lib="$3" t="$4"; shift 4
  local log="$work/$name.log"
  (cd "$repo" && env "$@" LD_LIBRARY_PATH="$lib:$TWINKLE_NVRTC_LIBDIR" \
    "$bin" --exact "$t" --test-threads 1 > "$log" 2>&1)
  local rc=$?
  if (( rc != 0 )); then
    echo "    $t FAILED (exit $rc)${*:+ with $*}:"
    summarise "$log"
    return 0
  fi
  echo "    $t passed${*:+ with $*}"
  return 1
}

record() {  # record NAME CAUGHT(0/1)
  if (( $2 == 0 )); then results+=("CAUGHT    $1"); else results+=("SURVIVED  $1"); survivors=$((survivors + 1)); fi
}

echo "== building the test binary and the reference emulator"
# CUDA_GPU_TEST_BIN: an already built tests/cuda_gpu.rs binary of this tree (skips the build).
bin="${CUDA_GPU_TEST_BIN:-$(test_binary)}"
[[ -x "$bin" ]] || { cargo test --test cuda_gpu --no-run; echo "cannot build tests/cuda_gpu.rs"; exit 2; }

mode="${1:-all}"
# ---- (a) kernel mutations: a removed __syncthreads --------------------------------------
kernel_mutation() {
  [[ "$mode" != "--launchers-only" ]] || return 0  # NAME FILE NTH TEST
  local name="$1" file="$2" nth="$3" t="$4"
  echo "== ($name) kernels/$file: remove barrier #$nth -> $t"
  rm -rf "$work/kernels"
  cp -r "$repo/kernels" "$work/kernels"
  drop_barrier "$work/kernels/$file" "$name" "$nth" || { record "$name (mutation did not apply)" 1; return; }
  KERNELS="$work/kernels" "$here/build.sh" "$work/emu-$name" > "$work/$name.build.log" 2>&1 \
    || { cat "$work/$name.build.log"; record "$name (emulator build failed)" 1; return; }
  local caught=1
  run_test "$name" "$bin" "$work/emu-$name" "$t" && caught=0
  run_test "$name-shuffle" "$bin" "$work/emu-$name" "$t" CUDA_EMU_SHUFFLE=1 && caught=0
  record "$name: kernels/$file barrier #$nth removed ($t)" $caught
}
kernel_mutation a1 attention.cu 2 attention_matches_cpu  # fwd: barrier after loading a K/V tile
kernel_mutation a2 attention.cu 1 attention_matches_cpu  # fwd: barrier before overwriting the tile
kernel_mutation a3 attention.cu 4 attention_matches_cpu  # bwd: barrier after loading Q/dO rows
kernel_mutation a4 common.cuh 2 layer_kernels_match_cpu  # block_sum: scratch written -> read
kernel_mutation a5 kv_cache.cu 1 decode_attention_matches_cpu  # decode: K/V tile staged -> read
kernel_mutation a6 lora.cu 1 lora_matches_cpu  # lora_expand: h tile staged in shared memory
kernel_mutation a7 common.cuh 1 cross_entropy_and_losses_match_cpu  # block_sum after block_max: scratch reuse
kernel_mutation a8 attention.cu 3 attention_matches_cpu  # bwd: barrier before overwriting Q/dO rows
kernel_mutation a9 attention.cu 5 attention_matches_cpu  # bwd: barrier between P/dS and their use
kernel_mutation a10 sampling.cu 2 greedy_argmax_matches_cpu_definition  # block_sum_d: scratch written -> read
kernel_mutation a11 sampling.cu 5 stochastic_draw_equals_cpu_definition  # block_sum_u128: scratch written -> read
kernel_mutation a12 sampling.cu 7 stochastic_draw_equals_cpu_definition  # key_search: buckets filled -> scanned
kernel_mutation a13 sampling.cu 8 stochastic_draw_equals_cpu_definition  # key_search: range written -> read

# ---- (b), (c) launcher mutations: in a copied repo, rebuilt with the shared target dir ----
if [[ "$mode" != "--kernels-only" ]]; then
  "$here/build.sh" "$work/emu" > "$work/emu.build.log" 2>&1 || { cat "$work/emu.build.log"; exit 2; }
  mut_profile=(--config 'profile.mutation.inherits="dev"' --profile mutation)
  launcher_mutation() {  # NAME FILE TEST DESCRIPTION PYTHON
    local name="$1" file="$2" t="$3" desc="$4" py="$5"
    echo "== ($name) $file: $desc -> $t"
    rm -rf "$work/repo"
    copy_repo "$work/repo"
    mutate "$work/repo/$file" "$name" "$py" || { record "$name (mutation did not apply)" 1; return; }
    # A profile of its own (target/mutation/): the mutated code never lands where the tree's own
    # twinkle artifacts are (the first run builds the dependencies once for that profile).
    local mbin
    mbin="$(cd "$work/repo" && test_binary "${mut_profile[@]}")"
    [[ -x "$mbin" ]] || { (cd "$work/repo" && cargo test --test cuda_gpu --no-run "${mut_profile[@]}" 2>&1 | tail -20)
                          record "$name (build failed)" 1; return; }
    local caught=1
    run_test "$name" "$mbin" "$work/emu" "$t" && caught=0
    record "$name: $file: $desc ($t)" $caught
  }
  launcher_mutation b src/engine/cuda/launch/layers.rs layer_kernels_match_cpu \
    "rmsnorm_fwd: out and rstd pointer arguments swapped" \
    "s = s.replace('l.arg(out).arg(rstd).arg(x).arg(w)', 'l.arg(rstd).arg(out).arg(x).arg(w)', 1)"
  launcher_mutation c src/engine/cuda/launch/layers.rs layer_kernels_match_cpu \
    "row_cfg: half the blocks (one per two rows)" \
    "s = s.replace('grid_dim(kernel, \"rows\", rows, i32::MAX as u32)', 'grid_dim(kernel, \"rows\", rows.div_ceil(2), i32::MAX as u32)', 1)"
fi

echo
echo "== mutation-check summary"
printf '  %s\n' "${results[@]}"
if (( survivors > 0 )); then
  echo "  $survivors mutation(s) survived"
  exit 1
fi
echo "  all ${#results[@]} mutations caught"
