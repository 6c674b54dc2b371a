#!/usr/bin/env bash
# build.sh - builds the CUDA CPU emulator: libcuda-emu.so plus the sonames cudarc searches
# (libcuda.so, libcuda.so.1, libcublas.so, libcublas.so.12, libcublas.so.13 and the same three of
# libcublasLt) as symlinks to it.
# Needs only g++ and python3. Rebuilds only what changed.
#
# usage: tools/cuda-emu/build.sh OUT_DIR
#   SAN=address      AddressSanitizer build (run the host program with LD_PRELOAD=$(g++
#                    -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0)
#   KERNELS=dir      kernel sources to compile (default: <repo>/kernels); used by the mutation check
#   CXX=g++          compiler;  JOBS=n  parallel compiles (default: nproc)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:?usage: build.sh OUT_DIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
kernels="$(cd "${KERNELS:-$repo/kernels}" && pwd)"
cxx="${CXX:-g++}"
jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

flags=(-std=c++20 -fPIC -fvisibility=hidden -g -Wall -Wextra -pthread -I"$here/include" -I"$here/src")
if grep -qw fma /proc/cpuinfo 2>/dev/null && grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
  flags+=(-mfma -mavx2)  # fmaf in one instruction, as the GPU's --fmad=true
fi
case "${SAN:-}" in
  "") flags+=(-O2) ;;
  address) flags+=(-O1 -fsanitize=address -fno-omit-frame-pointer) ;;
  *) echo "build.sh: SAN=${SAN} is not supported (use SAN=address)" >&2; exit 2 ;;
esac
# The kernels type-pun (uint4 loads of bf16 arrays, u32 pairs), which CUDA allows.
kflags=(-fno-strict-aliasing)

stamp="$out/.flags"
want="$cxx ${flags[*]} ${kflags[*]} kernels=$kernels"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  rm -rf "$out/obj" "$out/gen"
  echo "$want" > "$stamp"
fi
mkdir -p "$out/obj" "$out/gen"

python3 "$here/gen_kernels.py" "$kernels" "$out/gen" "$cxx" > "$out/gen/summary.txt"

headers=("$here"/include/*.h "$here"/src/*.h)
newest_header=$(ls -t "${headers[@]}" | head -1)

# Compile one source to an object unless the object is newer than it and every header.
compile() {
  local src="$1" obj="$2"; shift 2
  if [[ -f "$obj" && "$obj" -nt "$src" && "$obj" -nt "$newest_header" && "$obj" -nt "$stamp" ]]; then
    return 0
  fi
  "$cxx" "${flags[@]}" "$@" -c "$src" -o "$obj.tmp" && mv "$obj.tmp" "$obj"
}

pids=()
objs=()
run() {
  compile "$@" &
  pids+=($!)
  if (( ${#pids[@]} >= jobs )); then
    wait "${pids[0]}"
    pids=("${pids[@]:1}")
  fi
}
for f in "$here"/src/*.cpp; do
  o="$out/obj/rt_$(basename "${f%.cpp}").o"; objs+=("$o"); run "$f" "$o"
done
for f in "$out"/gen/k_*.cpp; do
  o="$out/obj/$(basename "${f%.cpp}").o"; objs+=("$o"); run "$f" "$o" "${kflags[@]}"
done
for p in "${pids[@]}"; do wait "$p"; done
# Objects of kernel files that no longer exist must not be linked.
for o in "$out"/obj/k_*.o; do
  [[ -f "$out/gen/$(basename "${o%.o}").cpp" ]] || rm -f "$o"
done

lib="$out/libcuda-emu.so"
"$cxx" "${flags[@]}" -shared -Wl,-soname,libcuda-emu.so -o "$lib.tmp" "${objs[@]}" -ldl
# The self-test of the emulator's checks (links the library; run it as $OUT_DIR/cuda-emu-selftest).
"$cxx" "${flags[@]}" -o "$out/cuda-emu-selftest.tmp" "$here/selftest.cpp" "$lib.tmp" -Wl,-rpath,'$ORIGIN'
mv "$lib.tmp" "$lib"
mv "$out/cuda-emu-selftest.tmp" "$out/cuda-emu-selftest"
for name in libcuda.so libcuda.so.1 libcublas.so libcublas.so.12 libcublas.so.13 \
  libcublasLt.so libcublasLt.so.12 libcublasLt.so.13; do
  ln -sfn libcuda-emu.so "$out/$name"
done
echo "cuda-emu: built $lib ($(tail -1 "$out/gen/summary.txt")${SAN:+, SAN=$SAN})"
