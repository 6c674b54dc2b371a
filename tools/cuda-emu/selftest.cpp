// selftest.cpp - checks that the emulator's own checks fire: every case runs in a forked child
// that calls the driver API directly (linked against libcuda-emu.so) and must either succeed or
// abort with a report containing an expected phrase. Test-only kernels are defined here with the
// same device shim the project kernels use, and registered like generated ones.
//
// usage: cuda-emu-selftest        (built by build.sh next to the library; exit 0 = all pass)
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "emu_device.h"
#include "emu_registry.h"

// ---- driver API (the subset used here) ----
extern "C" {
int cuInit(unsigned);
int cuMemAlloc_v2(unsigned long long*, size_t);
int cuMemFree_v2(unsigned long long);
int cuMemcpyHtoD_v2(unsigned long long, const void*, size_t);
int cuMemcpyDtoH_v2(void*, unsigned long long, size_t);
int cuModuleLoadData(void**, const void*);
int cuModuleGetFunction(void**, void*, const char*);
int cuFuncSetAttribute(void*, int, int);
int cuLaunchKernel(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                   void*, void**, void**);
int cuMemsetD8_v2(unsigned long long, unsigned char, size_t);
int cuMemsetD8Async(unsigned long long, unsigned char, size_t, void*);
int cuMemAllocAsync(unsigned long long*, size_t, void*);
int cuStreamCreate(void**, unsigned);
int cuStreamBeginCapture_v2(void*, int);
int cuStreamEndCapture(void*, void**);
int cuGraphInstantiateWithFlags(void**, void*, unsigned long long);
int cuGraphLaunch(void*, void*);
// cuBLAS / cuBLASLt (the subset used here)
int cublasCreate_v2(void**);
int cublasGemmEx(void*, int, int, int, int, int, const void*, const void*, int, int, const void*,
                 int, int, const void*, void*, int, int, int, int);
int cublasLtCreate(void**);
int cublasLtMatmulDescCreate(void**, int, int);
int cublasLtMatmulDescSetAttribute(void*, int, const void*, size_t);
int cublasLtMatrixLayoutCreate(void**, int, unsigned long long, unsigned long long, long long);
int cublasLtMatmulPreferenceCreate(void**);
int cublasLtMatmulPreferenceSetAttribute(void*, int, const void*, size_t);
int cublasLtMatmulAlgoGetHeuristic(void*, void*, void*, void*, void*, void*, void*, int, void*,
                                   int*);
int cublasLtMatmul(void*, void*, const void*, const void*, void*, const void*, void*, const void*,
                   const void*, void*, void*, void*, const void*, void*, size_t, void*);
}

// ---- test kernels ----
static void k_divergent_barrier(float* out) {
    if (threadIdx.x < 32) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}
static void k_warp_sum(float* out) {
    float v = 1.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}
static void k_shuffle_vs_barrier(float* out) {
    float v = 1.0f;
    if (threadIdx.x & 1) v = __shfl_xor_sync(0xffffffffu, v, 1);
    __syncthreads();
    out[threadIdx.x] = v;
}
// Reads a neighbour's shared slot without a barrier: must see poison (NaN) or a stale value.
static void k_missing_barrier(float* out) {
    float* s = static_cast<float*>(::emu::dyn_smem());
    s[threadIdx.x] = (float)threadIdx.x;
    out[threadIdx.x] = s[(threadIdx.x + 32) % blockDim.x];
}
static void k_with_barrier(float* out) {
    float* s = static_cast<float*>(::emu::dyn_smem());
    s[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = s[(threadIdx.x + 32) % blockDim.x];
}
static void k_overrun(float* out, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = 0.0f;
}

#define THUNK1(k) [](void** a) { k(*static_cast<float**>(a[0])); }
static const emu::KernelParam p_out[] = {{"out", "float*", sizeof(float*), alignof(float), true}};
static const emu::KernelParam p_out_n[] = {{"out", "float*", sizeof(float*), alignof(float), true},
                                           {"n", "int", sizeof(int), alignof(int), false}};
static const emu::KernelEntry entries[] = {
    {"t_divergent_barrier", "selftest.cpp", THUNK1(k_divergent_barrier), 1, p_out, 0},
    {"t_warp_sum", "selftest.cpp", THUNK1(k_warp_sum), 1, p_out, 0},
    {"t_shuffle_vs_barrier", "selftest.cpp", THUNK1(k_shuffle_vs_barrier), 1, p_out, 0},
    {"t_missing_barrier", "selftest.cpp", THUNK1(k_missing_barrier), 1, p_out, 0},
    {"t_with_barrier", "selftest.cpp", THUNK1(k_with_barrier), 1, p_out, 0},
    {"t_overrun", "selftest.cpp",
     [](void** a) { k_overrun(*static_cast<float**>(a[0]), *static_cast<int*>(a[1])); }, 2, p_out_n,
     0},
    {"t_bounded", "selftest.cpp", THUNK1(k_warp_sum), 1, p_out, 128},
};
static const bool registered = emu::register_kernels(entries, sizeof entries / sizeof entries[0]);

// ---- helpers ----
static void* fn(const char* name) {
    void* mod = nullptr;
    void* f = nullptr;
    static const char image[] = "ignored";
    if (cuModuleLoadData(&mod, image) || cuModuleGetFunction(&f, mod, name)) {
        fprintf(stderr, "no kernel %s\n", name);
        exit(3);
    }
    return f;
}
static unsigned long long dalloc(size_t n) {
    unsigned long long p = 0;
    if (cuMemAlloc_v2(&p, n)) exit(3);
    return p;
}
static int launch(const char* name, unsigned gx, unsigned bx, unsigned smem, void** args,
                  unsigned gy = 1) {
    return cuLaunchKernel(fn(name), gx, gy, 1, bx, 1, 1, smem, nullptr, args, nullptr);
}
// A case body: `kernel` on a fresh device buffer of `bytes` (its one argument), blocks of
// `threads` with `smem` bytes of dynamic shared memory, a grid one wide and `grid_y` tall.
static std::function<void()> on_buffer(const char* kernel, size_t bytes, unsigned threads,
                                       unsigned smem = 0, unsigned grid_y = 1) {
    return [=] {
        auto d = dalloc(bytes);
        void* a[] = {&d};
        launch(kernel, 1, threads, smem, a, grid_y);
    };
}

// D[n x m] = W^T X (+ bias[n]) (+ C) column-major through cuBLASLt, as the engine issues its
// row-major x W^T: W stored [k x n] (transposed), X [k x m], f32. Returns the matmul's status.
struct LtCall {
    int m = 3, n = 5, k = 7;
    unsigned long long w = 0, x = 0, c = 0, d = 0, bias = 0;
    int epilogue = 1;     // DEFAULT; 4 = BIAS
    unsigned align = 4;   // promised to the heuristic for every operand
    void* stream = nullptr;
};
static int lt_matmul(const LtCall& q) {
    static void* h = nullptr;
    if (!h && cublasLtCreate(&h)) exit(3);
    void *desc, *wl, *xl, *cl, *dl, *pref;
    if (cublasLtMatmulDescCreate(&desc, 68, 0)) exit(3);
    const int t = 1, nop = 0;
    if (cublasLtMatmulDescSetAttribute(desc, 3, &t, 4) ||
        cublasLtMatmulDescSetAttribute(desc, 4, &nop, 4))
        exit(3);
    int st = cublasLtMatmulDescSetAttribute(desc, 7, &q.epilogue, 4);
    if (st) return st;
    if (q.bias && cublasLtMatmulDescSetAttribute(desc, 8, &q.bias, 8)) exit(3);
    if (cublasLtMatrixLayoutCreate(&wl, 0, q.k, q.n, q.k) ||
        cublasLtMatrixLayoutCreate(&xl, 0, q.k, q.m, q.k) ||
        cublasLtMatrixLayoutCreate(&cl, 0, q.n, q.m, q.n) ||
        cublasLtMatrixLayoutCreate(&dl, 0, q.n, q.m, q.n) || cublasLtMatmulPreferenceCreate(&pref))
        exit(3);
    for (int a = 5; a <= 8; ++a)
        if (cublasLtMatmulPreferenceSetAttribute(pref, a, &q.align, 4)) exit(3);
    unsigned char res[96];
    int count = 0;
    if (cublasLtMatmulAlgoGetHeuristic(h, desc, wl, xl, cl, dl, pref, 1, res, &count) || count != 1)
        exit(3);
    const float alpha = 1.0f, beta = q.c ? 1.0f : 0.0f;
    const unsigned long long c = q.c ? q.c : q.d;
    return cublasLtMatmul(h, desc, &alpha, (void*)q.w, wl, (void*)q.x, xl, &beta, (void*)c, cl,
                          (void*)q.d, dl, res, nullptr, 0, q.stream);
}
// Uploads n floats i * scale + offset (mod 7 for variety).
static unsigned long long upload(int n, float scale, float offset) {
    std::vector<float> h(n);
    for (int i = 0; i < n; ++i) h[i] = (float)((i * 5) % 7) * scale + offset;
    auto d = dalloc(n * 4);
    cuMemcpyHtoD_v2(d, h.data(), n * 4);
    return d;
}
static std::vector<float> download(unsigned long long d, int n) {
    std::vector<float> h(n);
    cuMemcpyDtoH_v2(h.data(), d, n * 4);
    return h;
}
// The reference: cublasGemmEx into a fresh buffer, then C and the bias added on the host in
// cuBLASLt's order (f32, so bitwise).
static std::vector<float> lt_reference(const LtCall& q) {
    static void* bh = nullptr;
    if (!bh && cublasCreate_v2(&bh)) exit(3);
    auto r = dalloc(q.m * q.n * 4);
    const float one = 1.0f, zero = 0.0f;
    if (cublasGemmEx(bh, 1, 0, q.n, q.m, q.k, &one, (void*)q.w, 0, q.k, (void*)q.x, 0, q.k, &zero,
                     (void*)r, 0, q.n, 68, -1))
        exit(3);
    auto v = download(r, q.m * q.n);
    auto c = q.c ? download(q.c, q.m * q.n) : std::vector<float>(q.m * q.n, 0.0f);
    auto b = q.bias ? download(q.bias, q.n) : std::vector<float>(q.n, 0.0f);
    for (int j = 0; j < q.m; ++j)
        for (int i = 0; i < q.n; ++i) {
            float& e = v[j * q.n + i];
            if (q.c) e += c[j * q.n + i];
            if (q.bias) e += b[i];
        }
    return v;
}
static LtCall lt_operands() {
    LtCall q;
    q.w = upload(q.k * q.n, 0.25f, -0.5f);
    q.x = upload(q.k * q.m, 0.5f, -1.0f);
    q.c = upload(q.n * q.m, 0.125f, 0.3f);
    q.bias = upload(q.n, 1.5f, 0.1f);
    q.d = dalloc(q.n * q.m * 4);
    q.epilogue = 4;
    return q;
}

struct Case {
    const char* name;
    const char* expect;  // phrase in the abort report; nullptr = must exit 0
    std::function<void()> body;
};

int main() {
    (void)registered;
    cuInit(0);
    std::vector<Case> cases = {
        {"valid warp reduction", nullptr,
         [] {
             auto d = dalloc(64 * 4);
             void* a[] = {&d};
             launch("t_warp_sum", 1, 64, 0, a);
             float h[64];
             cuMemcpyDtoH_v2(h, d, sizeof h);
             for (float v : h)
                 if (v != 32.0f) exit(1);
         }},
        {"block dimension 0", "a grid or block dimension is 0", on_buffer("t_warp_sum", 4, 0)},
        {"grid.y over 65535", "grid exceeds", on_buffer("t_warp_sum", 4, 32, 0, 70000)},
        {"2048 threads per block", "block exceeds", on_buffer("t_warp_sum", 4, 2048)},
        {"__launch_bounds__ exceeded", "__launch_bounds__(128)",
         on_buffer("t_bounded", 256 * 4, 256)},
        {"host pointer as kernel argument", "is not inside any device allocation",
         [] {
             static float host[64];
             float* p = host;
             void* a[] = {&p};
             launch("t_warp_sum", 1, 64, 0, a);
         }},
        {"misaligned pointer argument", "is not 4-byte aligned",
         [] {
             auto d = dalloc(64 * 4 + 4) + 2;
             void* a[] = {&d};
             launch("t_warp_sum", 1, 32, 0, a);
         }},
        {"60 KiB dynamic smem without opt-in", "need cuFuncSetAttribute",
         on_buffer("t_with_barrier", 64 * 4, 64, 60 * 1024)},
        {"60 KiB dynamic smem with opt-in; 65 KiB over it", "the opt-in is 65536 B",
         [] {
             auto d = dalloc(64 * 4);
             void* a[] = {&d};
             void* f = fn("t_with_barrier");
             if (cuFuncSetAttribute(f, 8, 64 * 1024)) exit(1);
             if (cuLaunchKernel(f, 1, 1, 1, 64, 1, 1, 60 * 1024, nullptr, a, nullptr)) exit(1);
             // ...but not above the opt-in
             cuLaunchKernel(f, 1, 1, 1, 64, 1, 1, 65 * 1024, nullptr, a, nullptr);
             exit(0);
         }},
        {"opt-in above the device maximum is refused", nullptr,
         [] {
             if (cuFuncSetAttribute(fn("t_with_barrier"), 8, 300 * 1024) == 0) exit(1);
         }},
        {"divergent __syncthreads", "divergent __syncthreads",
         on_buffer("t_divergent_barrier", 64 * 4, 64)},
        {"full-mask shuffle in a partial warp", "only 16 live lane(s) of 32",
         on_buffer("t_warp_sum", 48 * 4, 48)},
        {"shuffle while the rest of the warp waits at a barrier", "deadlock",
         on_buffer("t_shuffle_vs_barrier", 64 * 4, 64)},
        {"global overrun is reported",
#if defined(__SANITIZE_ADDRESS__)
         "the error above happened in kernel t_overrun",
#else
         "past the end of the 400-byte allocation",
#endif
         [] {
             // A small alternate signal stack, as the Rust runtime installs one per thread.
             static char small[8192];
             stack_t ss{};
             ss.ss_sp = small;
             ss.ss_size = sizeof small;
             sigaltstack(&ss, nullptr);
             auto d = dalloc(400);
             int n = 100000;
             void* a[] = {&d, &n};
             launch("t_overrun", 1, 128, 0, a);
         }},
        {"missing __syncthreads reads poisoned shared memory", nullptr,
         [] {
             auto d = dalloc(64 * 4);
             void* a[] = {&d};
             launch("t_missing_barrier", 1, 64, 64 * 4, a);
             float h[64];
             cuMemcpyDtoH_v2(h, d, sizeof h);
             if (!std::isnan(h[0])) exit(1);  // warp 0 ran ahead: warp 1's slots are poison
             launch("t_with_barrier", 1, 64, 64 * 4, a);
             cuMemcpyDtoH_v2(h, d, sizeof h);
             for (int i = 0; i < 64; ++i)
                 if (h[i] != (float)((i + 32) % 64)) exit(1);
         }},
        {"cuMemFree of an interior pointer", "not the start of a live device allocation",
         [] { cuMemFree_v2(dalloc(1024) + 16); }},
        {"a captured memset + launch runs only when the graph is launched, every time", nullptr,
         [] {
             void* s = nullptr;
             auto d = dalloc(64 * 4);
             void* a[] = {&d};
             if (cuStreamCreate(&s, 0) || cuStreamBeginCapture_v2(s, 0)) exit(1);
             cuMemsetD8_v2(d, 0xff, 64 * 4);  // not on the stream: runs now
             if (cuMemsetD8Async(d, 0, 64 * 4, s)) exit(1);
             if (cuLaunchKernel(fn("t_warp_sum"), 1, 1, 1, 64, 1, 1, 0, s, a, nullptr)) exit(1);
             float h[64];
             cuMemcpyDtoH_v2(h, d, sizeof h);
             if (!std::isnan(h[0])) exit(1);  // recorded, not run
             void *g = nullptr, *exec = nullptr;
             if (cuStreamEndCapture(s, &g) || cuGraphInstantiateWithFlags(&exec, g, 0)) exit(1);
             for (int rep = 0; rep < 2; ++rep) {
                 cuMemsetD8_v2(d, 0xff, 64 * 4);
                 if (cuGraphLaunch(exec, s)) exit(1);
                 cuMemcpyDtoH_v2(h, d, sizeof h);
                 for (float v : h)
                     if (v != 32.0f) exit(1);
             }
         }},
        {"cuBLASLt: bias epilogue with C != D equals cublasGemmEx + adds; C intact", nullptr,
         [] {
             LtCall q = lt_operands();
             auto c0 = download(q.c, q.m * q.n);
             if (lt_matmul(q)) exit(1);
             if (download(q.d, q.m * q.n) != lt_reference(q)) exit(1);
             if (download(q.c, q.m * q.n) != c0) exit(1);
             q.c = 0;  // beta = 0, C = D: the bias alone
             q.epilogue = 1;
             if (lt_matmul(q)) exit(1);
             q.bias = 0;
             if (download(q.d, q.m * q.n) != lt_reference(q)) exit(1);
         }},
        {"cuBLASLt: a captured matmul runs only when the graph is launched", nullptr,
         [] {
             LtCall q = lt_operands();
             if (cuStreamCreate(&q.stream, 0) || cuStreamBeginCapture_v2(q.stream, 0)) exit(1);
             cuMemsetD8_v2(q.d, 0, q.m * q.n * 4);
             if (lt_matmul(q)) exit(1);
             if (download(q.d, q.m * q.n) != std::vector<float>(q.m * q.n, 0.0f)) exit(1);
             void *g = nullptr, *exec = nullptr;
             if (cuStreamEndCapture(q.stream, &g) || cuGraphInstantiateWithFlags(&exec, g, 0))
                 exit(1);
             for (int rep = 0; rep < 2; ++rep) {
                 cuMemsetD8_v2(q.d, 0, q.m * q.n * 4);
                 if (cuGraphLaunch(exec, q.stream)) exit(1);
                 if (download(q.d, q.m * q.n) != lt_reference(q)) exit(1);
             }
         }},
        {"cuBLASLt: an unimplemented epilogue is refused", nullptr,
         [] {
             LtCall q = lt_operands();
             q.epilogue = 2;  // RELU
             if (lt_matmul(q) != 15) exit(1);  // CUBLAS_STATUS_NOT_SUPPORTED
         }},
        {"cuBLASLt: a pointer less aligned than the heuristic's promise is refused",
         "less aligned than the 16 bytes",
         [] {
             LtCall q = lt_operands();
             q.align = 16;
             q.d = dalloc(q.m * q.n * 4 + 4) + 4;
             if (lt_matmul(q) != 15) exit(1);
             exit(2);  // refused as expected: fail the child so that the report is checked
         }},
        {"an allocation during a capture invalidates it", nullptr,
         [] {
             void* s = nullptr;
             unsigned long long p = 0;
             if (cuStreamCreate(&s, 0) || cuStreamBeginCapture_v2(s, 0)) exit(1);
             if (cuMemAllocAsync(&p, 256, s) != 900) exit(1);  // STREAM_CAPTURE_UNSUPPORTED
             void* g = nullptr;
             if (cuStreamEndCapture(s, &g) != 901 || g) exit(1);  // STREAM_CAPTURE_INVALIDATED
             if (cuStreamBeginCapture_v2(nullptr, 0) == 0) exit(1);  // legacy stream: refused
         }},
    };
    int failed = 0;
    for (const Case& c : cases) {
        int fds[2];
        if (pipe(fds) != 0) return 2;
        pid_t pid = fork();
        if (pid == 0) {
            dup2(fds[1], 2);
            close(fds[0]);
            c.body();
            fflush(stderr);
            _exit(0);
        }
        close(fds[1]);
        std::string err;
        char buf[4096];
        ssize_t r;
        while ((r = read(fds[0], buf, sizeof buf)) > 0) err.append(buf, (size_t)r);
        close(fds[0]);
        int st = 0;
        waitpid(pid, &st, 0);
        const bool exited_ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
        bool pass;
        if (c.expect)
            pass = !exited_ok && err.find(c.expect) != std::string::npos;
        else
            pass = exited_ok;
        printf("%-4s %s\n", pass ? "ok" : "FAIL", c.name);
        if (!pass) {
            ++failed;
            printf("     expected %s; child %s; stderr:\n%s\n",
                   c.expect ? c.expect : "success",
                   exited_ok ? "exited 0" : "failed", err.c_str());
        } else if (c.expect) {
            size_t at = err.find("FATAL");
            if (at != std::string::npos)
                printf("     %s\n", err.substr(at, err.find('\n', at) - at).c_str());
        }
    }
    printf("%s: %d of %zu cases failed\n", failed ? "FAILED" : "ok", failed, cases.size());
    return failed ? 1 : 0;
}
