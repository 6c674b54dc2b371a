// emu_internal.h - declarations shared by the emulator's runtime files (sched.cpp, driver.cpp,
// blas.cpp): fatal reports, the device-allocation table and the kernel launcher.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>
#include <string>

#include "emu_device.h"
#include "emu_registry.h"

#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

#define EMU_API extern "C" __attribute__((visibility("default")))

namespace emu {

// Prints "cuda-emu: <message>" (plus the running kernel, block and thread when called from
// inside a kernel) to stderr and aborts the process.
[[noreturn]] void fatal(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// One line to stderr when CUDA_EMU_VERBOSE is set.
void trace(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
bool verbose();

// ---- device memory (driver.cpp) ----
struct AllocInfo {
    uintptr_t base = 0;
    std::size_t size = 0;
};
// The allocation containing [p, p + len) (len 0: p may be one past the end). False if none.
bool find_alloc(uintptr_t p, std::size_t len, AllocInfo* out);
// "0x... is N bytes past the end of the 4096-byte allocation at 0x..." or similar.
std::string describe_addr(uintptr_t p);
// Aborts unless [p, p + len) lies inside one device allocation. `what` names the operand.
void check_range(const char* api, const char* what, uintptr_t p, std::size_t len);

// ---- kernel execution (sched.cpp) ----
const KernelEntry* find_kernel(const char* name);
struct LaunchParams {
    const KernelEntry* kernel;
    dim3 grid, block;
    unsigned dyn_smem;     // sharedMemBytes of the launch
    int smem_optin;        // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (0 = not set)
    void** args;
};
// Runs the whole grid before returning (streams are synchronous). Aborts on any check failure.
void launch(const LaunchParams& p);
// Installs the SIGSEGV reporter (idempotent).
void install_fault_handler();

// ---- stream capture (graph.cpp) ----
// One recorded operation of a captured stream, replayed by cuGraphLaunch.
using Node = std::function<void()>;
bool capturing(void* stream);
// True when the calling thread has a capture open (for calls that name no stream).
bool any_capture();
// Appends to the capture of `stream` (which must be capturing).
void record(void* stream, Node n);
// Marks the capture of `stream` (for a null stream: every capture of the calling thread) invalid: `api` cannot be
// captured. cuStreamEndCapture then fails.
void invalidate(void* stream, const char* api);
bool begin_capture(void* stream);
// 0 = ok (`out` gets the nodes), 1 = the stream was not capturing, 2 = the capture was invalid.
int end_capture(void* stream, std::vector<Node>* out);

constexpr int kSmemDefault = 48 * 1024;
constexpr int kSmemOptinMax = 227 * 1024;  // sm_90

// One column-major GEMM with cuBLASLt's epilogue: D = alpha op(A) op(B) + beta C (+ bias over
// rows), C not read when beta == 0, D may alias C; f32 accumulation over k in order, D rounded
// once. Validates like cuBLAS (returns a cublasStatus_t) and bounds-checks every operand.
struct GemmArgs {
    int ta, tb, m, n, k;
    float alpha, beta;
    const void* a; int atype, lda;
    const void* b; int btype, ldb;
    const void* c; int ctype, ldc;
    void* d; int dtype, ldd;
    const void* bias; int biastype;  // bias[m] (nullptr: none)
    int compute;
};
int gemm_run(const GemmArgs& g, const char* api);

// cuBLAS(Lt)'s create / destroy of an opaque object with no creation arguments: a new default
// `T` in *out (CUBLAS_STATUS_INVALID_VALUE for a null out), and its deletion.
template <class T>
int create_object(void** out) {
    if (!out) return 7;
    *out = new T{};
    return 0;
}
template <class T>
int destroy_object(void* p) {
    delete static_cast<T*>(p);
    return 0;
}

}  // namespace emu
