#!/usr/bin/env python3
"""gen_kernels.py - turns kernels/*.cu into host C++ translation units for the CPU emulator.

For each kernel file it writes <out>/k_<stem>.cpp containing:
  * #include "emu_device.h" (the device-language shim),
  * kernels/common.cuh followed by the kernel file, exactly as src/engine/cuda/nvrtc.rs
    concatenates them for NVRTC, with #line directives so diagnostics name kernels/<file>;
    the only textual changes keep line numbers intact:
      - `extern __shared__ T name[];` becomes a pointer to the block's dynamic shared memory,
      - `__shared__ T a[N], b;` becomes references into per-block static shared storage,
      - `#pragma unroll` lines are blanked (a hint g++ does not know);
  * one thunk per `extern "C" __global__` entry point: it unpacks cuLaunchKernel's void** with the
    kernel's own parameter types, plus a table (name, parameter types and sizes, which parameters
    are pointers, __launch_bounds__) registered with the runtime at load time.

The entry points are found in the *preprocessed* text (g++ -E), so kernels stamped out by macros
such as FOR_F32_BF16(...) are seen with their concrete types.

usage: gen_kernels.py KERNELS_DIR OUT_DIR CXX
"""
import os
import re
import subprocess
import sys

SHARED_EXTERN = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?([A-Za-z_][\w\s:<>]*?)\s*(\w+)\s*\[\s*\]\s*;")
SHARED_STATIC = re.compile(
    r"__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?((?:(?:const|unsigned|signed|long|short|volatile)\s+)*[A-Za-z_]\w*)\s+([^;]+);")
DECLARATOR = re.compile(r"^\s*(\w+)\s*((?:\[[^\]]+\]\s*)*)$")
ENTRY = re.compile(
    r'extern\s+"C"\s+__emu_global__\s+((?:__emu_lb__\s*\([^)]*\)\s*)?)void\s+'
    r'((?:__emu_lb__\s*\([^)]*\)\s*)?)(\w+)\s*\(([^)]*)\)')


def fail(msg):
    sys.stderr.write(f"gen_kernels.py: {msg}\n")
    sys.exit(1)


def split_top(s, sep=","):
    out, depth, cur = [], 0, []
    for ch in s:
        if ch in "(<[":
            depth += 1
        elif ch in ")>]":
            depth -= 1
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur))
    return out


def rewrite_shared(line, where):
    """Rewrites the __shared__ declarations of one source line (they never span lines here)."""
    if "__shared__" not in line:
        return line

    def dyn(m):
        ty, name = m.group(1).strip(), m.group(2)
        return f"{ty}* {name} = static_cast<{ty}*>(::emu::dyn_smem());"

    line = SHARED_EXTERN.sub(dyn, line)

    def stat(m):
        ty, decls = m.group(1).strip(), m.group(2)
        parts = []
        for d in split_top(decls):
            dm = DECLARATOR.match(d)
            if not dm:
                fail(f"{where}: cannot parse __shared__ declarator {d!r}")
            name, dims = dm.group(1), re.sub(r"\s+", "", dm.group(2))
            key = f"emu_smem_key_{name}"
            ref = f"{ty}(&{name}){dims}" if dims else f"{ty}& {name}"
            ptr = f"{ty}(*){dims}" if dims else f"{ty}*"
            parts.append(
                f"static const char {key} = 0; {ref} = *static_cast<{ptr}>(::emu::static_smem("
                f"&{key}, sizeof({ty}{dims}), alignof({ty}), \"{name}\"));")
        return " ".join(parts)

    line = SHARED_STATIC.sub(stat, line)
    if "__shared__" in line:
        fail(f"{where}: unsupported __shared__ declaration: {line.strip()}")
    return line


def transform(text, fname):
    out = []
    for i, line in enumerate(text.split("\n"), 1):
        if re.match(r"^\s*#\s*pragma\s+unroll\b", line):
            out.append("")
            continue
        out.append(rewrite_shared(line, f"{fname}:{i}"))
    return "\n".join(out)


def parse_param(p, where):
    p = " ".join(p.split())
    m = re.match(r"^(.*?)(\w+)$", p)
    if not m or not m.group(1).strip():
        fail(f"{where}: cannot parse kernel parameter {p!r}")
    ty = m.group(1).strip().replace(" *", "*")
    return ty, m.group(2)


def main():
    if len(sys.argv) != 4:
        fail("usage: gen_kernels.py KERNELS_DIR OUT_DIR CXX")
    kdir, odir, cxx = sys.argv[1:]
    os.makedirs(odir, exist_ok=True)
    with open(os.path.join(kdir, "common.cuh")) as f:
        prelude = f.read()
    files = sorted(n for n in os.listdir(kdir) if n.endswith(".cu"))
    if not files:
        fail(f"no .cu files in {kdir}")
    total = 0
    for fname in files:
        with open(os.path.join(kdir, fname)) as f:
            src = f.read()
        body = ('#line 1 "kernels/common.cuh"\n' + transform(prelude, "common.cuh") +
                f'\n#line 1 "kernels/{fname}"\n' + transform(src, fname) + "\n")
        # Find the entry points with the macros expanded (no system headers needed for that).
        pp = subprocess.run(
            [cxx, "-E", "-P", "-x", "c++", "-std=c++20", "-D__global__=__emu_global__",
             "-D__launch_bounds__(...)=__emu_lb__(__VA_ARGS__)", "-"],
            input=body, capture_output=True, text=True)
        if pp.returncode != 0:
            fail(f"preprocessing {fname} failed:\n{pp.stderr}")
        entries = []
        for m in ENTRY.finditer(pp.stdout):
            lb = (m.group(1) or m.group(2)).strip()
            bound = re.sub(r"^__emu_lb__\s*\((.*)\)$", r"\1", lb).split(",")[0] if lb else "0"
            name, params = m.group(3), m.group(4).strip()
            plist = [] if params in ("", "void") else [
                parse_param(p, f"{fname}:{name}") for p in split_top(params)]
            entries.append((name, bound, plist))
        if not entries:
            fail(f"{fname}: no extern \"C\" __global__ entry point found")
        total += len(entries)
        reg = ["", "// ---- generated by gen_kernels.py: launch thunks and registry ----",
               '#include "emu_registry.h"', "namespace {"]
        for name, bound, plist in entries:
            args = ", ".join(f"*static_cast<{ty}*>(a[{i}])" for i, (ty, _) in enumerate(plist))
            reg.append(f"void thunk_{name}(void** a) {{ {'(void)a; ' if not plist else ''}{name}({args}); }}")
            rows = ", ".join(
                f'{{"{pn}", "{ty}", sizeof({ty}), '
                f'alignof(std::remove_pointer_t<{ty}>), {"true" if ty.endswith("*") else "false"}}}'
                for ty, pn in plist) or '{"", "", 0, 1, false}'
            reg.append(f"const ::emu::KernelParam params_{name}[] = {{{rows}}};")
        reg.append("const ::emu::KernelEntry entries[] = {")
        for name, bound, plist in entries:
            reg.append(f'    {{"{name}", "kernels/{fname}", thunk_{name}, {len(plist)}, '
                       f"params_{name}, (int)({bound})}},")
        reg.append("};")
        reg.append("[[maybe_unused]] const bool registered = ::emu::register_kernels(entries, sizeof(entries) / "
                   "sizeof(entries[0]));")
        reg.append("}  // namespace")
        stem = fname[:-3]
        header = (f"// k_{stem}.cpp - GENERATED by tools/cuda-emu/gen_kernels.py from kernels/{fname}"
                  " and kernels/common.cuh; do not edit.\n#include \"emu_device.h\"\n")
        path = os.path.join(odir, f"k_{stem}.cpp")
        new = header + body + "\n".join(reg) + "\n"
        old = open(path).read() if os.path.exists(path) else None
        if old != new:
            with open(path, "w") as f:
                f.write(new)
        print(f"{fname}: {len(entries)} kernels")
    print(f"total: {total} kernels from {len(files)} files")


if __name__ == "__main__":
    main()
