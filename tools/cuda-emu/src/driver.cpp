// driver.cpp - the CUDA driver API subset that cudarc 0.19 resolves, served on the CPU.
//
// One device ("twinkle cuda-emu", sm_90). Device memory is host memory: each allocation is its
// own mapping with PROT_NONE guard pages around it (plain build) or an exact-size malloc (ASan
// build), recorded in a range table so that launch arguments, copies and cuBLAS operands can be
// checked. Streams and events are synchronous; modules ignore the CUBIN bytes and resolve
// kernels by name in the registry of host-compiled kernels (sched.cpp). Calls outside the
// emulated subset return CUDA_ERROR_NOT_SUPPORTED.
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>

#include "emu_internal.h"

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;

namespace {

constexpr CUresult OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, INVALID_DEVICE = 101,
                   INVALID_HANDLE = 400, ILLEGAL_STATE = 401, NOT_FOUND = 500, NOT_READY = 600,
                   NOT_SUPPORTED = 801, CAPTURE_UNSUPPORTED = 900, CAPTURE_INVALIDATED = 901;

constexpr unsigned long long kTotalMem = 80ull << 30;
const char* const kDeviceName = "twinkle cuda-emu (CPU emulation of an sm_90 GPU)";

struct Context {
    int magic = 0x43545821;
};
struct Stream {
    unsigned flags = 0;
};
struct Event {
    double ms = 0.0;
};
struct Module {
    std::map<std::string, struct Function*> funcs;
};
struct Function {
    const emu::KernelEntry* kernel;
    int smem_optin = 0;
};
struct MemPool {
    unsigned long long release_threshold = 0;
};

Context g_ctx;
MemPool g_pool;
thread_local Context* tls_current = nullptr;

// ---- the allocation table ----
struct Alloc {
    std::size_t size;
    void* map;         // mapping (plain build) or malloc block (ASan build)
    std::size_t map_len;
};
std::mutex g_mem_mutex;
std::map<uintptr_t, Alloc> g_allocs;
unsigned long long g_in_use = 0;

#if !EMU_ASAN
std::size_t page_size() {
    static const std::size_t p = (std::size_t)sysconf(_SC_PAGESIZE);
    return p;
}
#endif

CUresult dev_alloc(CUdeviceptr* out, std::size_t size) {
    if (!out) return INVALID_VALUE;
    const std::size_t rounded = ((size ? size : 1) + 255) & ~(std::size_t)255;
    void* map;
    std::size_t map_len;
    uintptr_t p;
#if EMU_ASAN
    // Exact size: ASan's redzone starts right after the last byte.
    map = aligned_alloc(256, rounded);
    if (!map) return OUT_OF_MEMORY;
    map_len = rounded;
    p = reinterpret_cast<uintptr_t>(map);
#else
    // [guard page][data ... buffer ends at the page end][guard page]: overruns fault at once
    // (up to the rounding to 256 B), and so does a use after cuMemFree (the mapping is gone).
    const std::size_t pg = page_size();
    const std::size_t body = (rounded + pg - 1) / pg * pg;
    map_len = body + 2 * pg;
    map = mmap(nullptr, map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (map == MAP_FAILED) return OUT_OF_MEMORY;
    char* data = static_cast<char*>(map) + pg;
    if (mprotect(data, body, PROT_READ | PROT_WRITE) != 0) {
        munmap(map, map_len);
        return OUT_OF_MEMORY;
    }
    p = reinterpret_cast<uintptr_t>(data + body - rounded);
#endif
    // Fresh device memory is not zeroed on a GPU: fill it with a NaN pattern so that reads of
    // never-written memory are visible.
    memset(reinterpret_cast<void*>(p), 0xFF, rounded);
    {
        std::lock_guard<std::mutex> g(g_mem_mutex);
        g_allocs[p] = Alloc{size, map, map_len};
        g_in_use += size;
    }
    *out = p;
    emu::trace("alloc %zu B at 0x%lx", size, (unsigned long)p);
    return OK;
}

CUresult dev_free(CUdeviceptr p) {
    if (p == 0) return OK;
    Alloc a{};
    bool found = false;
    {
        std::lock_guard<std::mutex> g(g_mem_mutex);
        auto it = g_allocs.find(p);
        if (it != g_allocs.end()) {
            found = true;
            a = it->second;
            g_in_use -= a.size;
            g_allocs.erase(it);
        }
    }
    if (!found)
        emu::fatal("cuMemFree(0x%llx): not the start of a live device allocation (%s)", p,
                   emu::describe_addr(p).c_str());
#if EMU_ASAN
    free(a.map);
#else
    munmap(a.map, a.map_len);
#endif
    return OK;
}

std::string human(uintptr_t base, std::size_t size) {
    char buf[96];
    snprintf(buf, sizeof buf, "the %zu-byte allocation at 0x%lx", size, (unsigned long)base);
    return buf;
}

}  // namespace

namespace emu {

bool find_alloc(uintptr_t p, std::size_t len, AllocInfo* out) {
    std::lock_guard<std::mutex> g(g_mem_mutex);
    auto it = g_allocs.upper_bound(p);
    if (it == g_allocs.begin()) return false;
    --it;
    const uintptr_t base = it->first;
    const std::size_t size = it->second.size;
    if (p < base || p > base + size || len > base + size - p) return false;
    if (out) *out = AllocInfo{base, size};
    return true;
}

std::string describe_addr(uintptr_t p) {
    std::unique_lock<std::mutex> g(g_mem_mutex, std::try_to_lock);
    if (!g.owns_lock()) return "(allocation table busy)";
    auto after = g_allocs.upper_bound(p);
    std::string s;
    char buf[160];
    if (after != g_allocs.begin()) {
        auto before = std::prev(after);
        const uintptr_t end = before->first + before->second.size;
        if (p < end) {
            snprintf(buf, sizeof buf, "0x%lx is %lu B into ", (unsigned long)p,
                     (unsigned long)(p - before->first));
            return buf + human(before->first, before->second.size);
        }
        snprintf(buf, sizeof buf, "0x%lx is %lu B past the end of ", (unsigned long)p,
                 (unsigned long)(p - end));
        s = buf + human(before->first, before->second.size);
    }
    if (after != g_allocs.end()) {
        snprintf(buf, sizeof buf, "%s%lu B before ", s.empty() ? "" : "; ",
                 (unsigned long)(after->first - p));
        s += buf + human(after->first, after->second.size);
    }
    if (s.empty()) s = "no device memory is allocated";
    return s;
}

void check_range(const char* api, const char* what, uintptr_t p, std::size_t len) {
    if (find_alloc(p, len, nullptr)) return;
    fatal("%s: %s [0x%lx, +%zu B) is not inside one device allocation: %s", api, what,
          (unsigned long)p, len, describe_addr(p).c_str());
}

}  // namespace emu

// =============================================================================================
// Driver API.

EMU_API CUresult cuInit(unsigned) {
    emu::install_fault_handler();
    return OK;
}
EMU_API CUresult cuDriverGetVersion(int* v) {
    if (!v) return INVALID_VALUE;
    *v = 13000;
    return OK;
}
EMU_API CUresult cuGetErrorName(CUresult e, const char** s) {
    if (!s) return INVALID_VALUE;
    switch (e) {
        case OK: *s = "CUDA_SUCCESS"; break;
        case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
        case INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
        case NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case NOT_READY: *s = "CUDA_ERROR_NOT_READY"; break;
        case NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
        case ILLEGAL_STATE: *s = "CUDA_ERROR_ILLEGAL_STATE"; break;
        case CAPTURE_UNSUPPORTED: *s = "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"; break;
        case CAPTURE_INVALIDATED: *s = "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"; break;
        default: *s = "CUDA_ERROR_UNKNOWN"; break;
    }
    return OK;
}
EMU_API CUresult cuGetErrorString(CUresult e, const char** s) {
    CUresult r = cuGetErrorName(e, s);
    if (r == OK && e == NOT_SUPPORTED) *s = "operation not supported by cuda-emu";
    return r;
}

// ---- devices ----
EMU_API CUresult cuDeviceGetCount(int* n) {
    if (!n) return INVALID_VALUE;
    *n = 1;
    return OK;
}
EMU_API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (!d) return INVALID_VALUE;
    if (ordinal != 0) return INVALID_DEVICE;
    *d = 0;
    return OK;
}
EMU_API CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    if (!name || len <= 0) return INVALID_VALUE;
    if (d != 0) return INVALID_DEVICE;
    snprintf(name, (std::size_t)len, "%s", kDeviceName);
    return OK;
}
EMU_API CUresult cuDeviceTotalMem_v2(std::size_t* bytes, CUdevice d) {
    if (!bytes) return INVALID_VALUE;
    if (d != 0) return INVALID_DEVICE;
    *bytes = kTotalMem;
    return OK;
}
EMU_API CUresult cuDeviceGetUuid(unsigned char* uuid, CUdevice d) {
    if (!uuid) return INVALID_VALUE;
    if (d != 0) return INVALID_DEVICE;
    memcpy(uuid, "twinkle-cuda-emu", 16);
    return OK;
}
EMU_API CUresult cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice d) { return cuDeviceGetUuid(uuid, d); }
EMU_API CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice d) {
    if (!v) return INVALID_VALUE;
    if (d != 0) return INVALID_DEVICE;
    switch (attr) {
        case 1: *v = 1024; break;                      // MAX_THREADS_PER_BLOCK
        case 2: case 3: *v = 1024; break;              // MAX_BLOCK_DIM_X/Y
        case 4: *v = 64; break;                        // MAX_BLOCK_DIM_Z
        case 5: *v = 0x7fffffff; break;                // MAX_GRID_DIM_X
        case 6: case 7: *v = 65535; break;             // MAX_GRID_DIM_Y/Z
        case 8: *v = emu::kSmemDefault; break;         // MAX_SHARED_MEMORY_PER_BLOCK
        case 9: *v = 65536; break;                     // TOTAL_CONSTANT_MEMORY
        case 10: *v = 32; break;                       // WARP_SIZE
        case 12: case 82: *v = 65536; break;           // registers per block / per SM
        case 13: *v = 1980000; break;                  // CLOCK_RATE (kHz)
        case 16: *v = 132; break;                      // MULTIPROCESSOR_COUNT
        case 31: *v = 1; break;                        // CONCURRENT_KERNELS
        case 36: *v = 2619000; break;                  // MEMORY_CLOCK_RATE
        case 37: *v = 5120; break;                     // GLOBAL_MEMORY_BUS_WIDTH
        case 38: *v = 50 << 20; break;                 // L2_CACHE_SIZE
        case 39: *v = 2048; break;                     // MAX_THREADS_PER_MULTIPROCESSOR
        case 40: *v = 2; break;                        // ASYNC_ENGINE_COUNT
        case 41: *v = 1; break;                        // UNIFIED_ADDRESSING
        case 75: *v = 9; break;                        // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = 0; break;                        // COMPUTE_CAPABILITY_MINOR
        case 81: *v = 228 * 1024; break;               // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        case 97: *v = emu::kSmemOptinMax; break;       // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 106: *v = 32; break;                      // MAX_BLOCKS_PER_MULTIPROCESSOR
        case 115: *v = 1; break;                       // MEMORY_POOLS_SUPPORTED
        default: *v = 0; break;                        // everything else: "not supported"
    }
    return OK;
}
EMU_API CUresult cuDeviceGetDefaultMemPool(void** pool, CUdevice d) {
    if (!pool) return INVALID_VALUE;
    if (d != 0) return INVALID_DEVICE;
    *pool = &g_pool;
    return OK;
}
EMU_API CUresult cuDeviceGetMemPool(void** pool, CUdevice d) { return cuDeviceGetDefaultMemPool(pool, d); }
EMU_API CUresult cuDeviceSetMemPool(CUdevice d, void* pool) {
    return d == 0 && pool == &g_pool ? OK : NOT_SUPPORTED;
}
EMU_API CUresult cuMemPoolSetAttribute(void* pool, int attr, void* value) {
    if (pool != &g_pool || !value) return INVALID_VALUE;
    if (attr == 4) g_pool.release_threshold = *static_cast<unsigned long long*>(value);  // RELEASE_THRESHOLD
    return OK;
}
EMU_API CUresult cuMemPoolGetAttribute(void* pool, int attr, void* value) {
    if (pool != &g_pool || !value) return INVALID_VALUE;
    if (attr == 4) {
        *static_cast<unsigned long long*>(value) = g_pool.release_threshold;
    } else if (attr >= 5 && attr <= 8) {  // reserved / used memory, current and high
        std::lock_guard<std::mutex> g(g_mem_mutex);
        *static_cast<unsigned long long*>(value) = g_in_use;
    } else {
        *static_cast<int*>(value) = 0;
    }
    return OK;
}
EMU_API CUresult cuMemPoolTrimTo(void* pool, std::size_t) { return pool == &g_pool ? OK : INVALID_VALUE; }
EMU_API CUresult cuMemPoolCreate(void**, const void*) { return NOT_SUPPORTED; }
EMU_API CUresult cuMemPoolDestroy(void*) { return NOT_SUPPORTED; }

// ---- contexts ----
EMU_API CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice d) {
    if (!ctx) return INVALID_VALUE;
    if (d != 0) return INVALID_DEVICE;
    *ctx = &g_ctx;
    return OK;
}
EMU_API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) { return d == 0 ? OK : INVALID_DEVICE; }
EMU_API CUresult cuDevicePrimaryCtxReset_v2(CUdevice d) { return d == 0 ? OK : INVALID_DEVICE; }
EMU_API CUresult cuDevicePrimaryCtxGetState(CUdevice d, unsigned* flags, int* active) {
    if (d != 0) return INVALID_DEVICE;
    if (flags) *flags = 0;
    if (active) *active = 1;
    return OK;
}
EMU_API CUresult cuDevicePrimaryCtxSetFlags_v2(CUdevice d, unsigned) { return d == 0 ? OK : INVALID_DEVICE; }
EMU_API CUresult cuCtxSetCurrent(void* ctx) {
    if (ctx && ctx != &g_ctx) return INVALID_HANDLE;
    tls_current = static_cast<Context*>(ctx);
    return OK;
}
EMU_API CUresult cuCtxGetCurrent(void** ctx) {
    if (!ctx) return INVALID_VALUE;
    *ctx = tls_current;
    return OK;
}
EMU_API CUresult cuCtxPushCurrent_v2(void* ctx) { return cuCtxSetCurrent(ctx); }
EMU_API CUresult cuCtxPopCurrent_v2(void** ctx) {
    if (ctx) *ctx = tls_current;
    tls_current = nullptr;
    return OK;
}
EMU_API CUresult cuCtxGetDevice(CUdevice* d) {
    if (!d) return INVALID_VALUE;
    *d = 0;
    return OK;
}
EMU_API CUresult cuCtxSynchronize() { return OK; }
EMU_API CUresult cuCtxSetFlags(unsigned) { return OK; }
EMU_API CUresult cuCtxGetFlags(unsigned* f) {
    if (f) *f = 0;
    return OK;
}
EMU_API CUresult cuCtxSetLimit(int, std::size_t) { return OK; }
EMU_API CUresult cuCtxGetLimit(std::size_t* v, int) {
    if (!v) return INVALID_VALUE;
    *v = 0;
    return OK;
}
EMU_API CUresult cuCtxGetCacheConfig(int* c) {
    if (c) *c = 0;
    return OK;
}
EMU_API CUresult cuCtxSetCacheConfig(int) { return OK; }
EMU_API CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    if (least) *least = 0;
    if (greatest) *greatest = 0;
    return OK;
}
EMU_API CUresult cuCtxCreate_v2(void**, unsigned, CUdevice) { return NOT_SUPPORTED; }
EMU_API CUresult cuCtxCreate_v3(void**, void*, int, unsigned, CUdevice) { return NOT_SUPPORTED; }
EMU_API CUresult cuCtxCreate_v4(void**, void*, unsigned, CUdevice) { return NOT_SUPPORTED; }
EMU_API CUresult cuCtxDestroy_v2(void* ctx) { return ctx == &g_ctx ? OK : INVALID_HANDLE; }

// ---- memory ----
// Refuses `api` while a capture is active (on `stream`, or on any stream for null): the capture
// is invalidated and the caller gets CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED.
bool refuse_in_capture(void* stream, const char* api) {
    if (stream ? !emu::capturing(stream) : !emu::any_capture()) return false;
    emu::invalidate(stream, api);
    return true;
}
// A device range an async call names: the driver checks a captured operation's operands when it
// is recorded, not at the replay.
struct Operand {
    const char* what;
    CUdeviceptr p;
    std::size_t n;
};
// An async memset or device copy: recorded into the capture of `s` (its operands checked now,
// under the async API's name), else done at once by `now`.
template <class Now>
CUresult record_or_run(void* s, const char* api, std::initializer_list<Operand> ops, Now now) {
    if (!emu::capturing(s)) return now();
    for (const Operand& o : ops) emu::check_range(api, o.what, o.p, o.n);
    emu::record(s, [now] { now(); });
    return OK;
}
EMU_API CUresult cuMemAlloc_v2(CUdeviceptr* p, std::size_t n) {
    if (refuse_in_capture(nullptr, "cuMemAlloc")) return CAPTURE_UNSUPPORTED;
    return dev_alloc(p, n);
}
EMU_API CUresult cuMemAllocAsync(CUdeviceptr* p, std::size_t n, void* s) {
    if (refuse_in_capture(s, "cuMemAllocAsync")) return CAPTURE_UNSUPPORTED;
    return dev_alloc(p, n);
}
EMU_API CUresult cuMemAllocFromPoolAsync(CUdeviceptr* p, std::size_t n, void*, void*) {
    return dev_alloc(p, n);
}
EMU_API CUresult cuMemFree_v2(CUdeviceptr p) {
    if (refuse_in_capture(nullptr, "cuMemFree")) return CAPTURE_UNSUPPORTED;
    return dev_free(p);
}
EMU_API CUresult cuMemFreeAsync(CUdeviceptr p, void* s) {
    if (refuse_in_capture(s, "cuMemFreeAsync")) return CAPTURE_UNSUPPORTED;
    return dev_free(p);
}
EMU_API CUresult cuMemGetInfo_v2(std::size_t* free_b, std::size_t* total) {
    std::lock_guard<std::mutex> g(g_mem_mutex);
    if (free_b) *free_b = kTotalMem - g_in_use;
    if (total) *total = kTotalMem;
    return OK;
}
EMU_API CUresult cuMemHostAlloc(void** p, std::size_t n, unsigned) {
    if (!p) return INVALID_VALUE;
    *p = malloc(n ? n : 1);
    return *p ? OK : OUT_OF_MEMORY;
}
EMU_API CUresult cuMemAllocHost_v2(void** p, std::size_t n) { return cuMemHostAlloc(p, n, 0); }
EMU_API CUresult cuMemFreeHost(void* p) {
    free(p);
    return OK;
}
EMU_API CUresult cuMemHostRegister_v2(void*, std::size_t, unsigned) { return OK; }
EMU_API CUresult cuMemHostUnregister(void*) { return OK; }
EMU_API CUresult cuMemAllocManaged(CUdeviceptr*, std::size_t, unsigned) { return NOT_SUPPORTED; }
EMU_API CUresult cuMemAdvise_v2(CUdeviceptr, std::size_t, int, int) { return NOT_SUPPORTED; }
EMU_API CUresult cuMemPrefetchAsync_v2(CUdeviceptr, std::size_t, int, unsigned, void*) { return NOT_SUPPORTED; }
EMU_API CUresult cuStreamAttachMemAsync(void*, CUdeviceptr, std::size_t, unsigned) { return NOT_SUPPORTED; }

EMU_API CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, std::size_t n) {
    if (n == 0) return OK;
    emu::check_range("cuMemsetD8", "destination", p, n);
    memset(reinterpret_cast<void*>(p), v, n);
    return OK;
}
EMU_API CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, std::size_t n, void* s) {
    return record_or_run(s, "cuMemsetD8Async", {{"destination", p, n}},
                         [=] { return cuMemsetD8_v2(p, v, n); });
}
EMU_API CUresult cuMemsetD32_v2(CUdeviceptr p, unsigned v, std::size_t n) {
    if (n == 0) return OK;
    emu::check_range("cuMemsetD32", "destination", p, n * 4);
    unsigned* d = reinterpret_cast<unsigned*>(p);
    for (std::size_t i = 0; i < n; ++i) d[i] = v;
    return OK;
}
EMU_API CUresult cuMemsetD32Async(CUdeviceptr p, unsigned v, std::size_t n, void* s) {
    return record_or_run(s, "cuMemsetD32Async", {{"destination", p, n * 4}},
                         [=] { return cuMemsetD32_v2(p, v, n); });
}
EMU_API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, std::size_t n) {
    if (n == 0) return OK;
    emu::check_range("cuMemcpyHtoD", "destination", dst, n);
    memcpy(reinterpret_cast<void*>(dst), src, n);
    return OK;
}
EMU_API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, std::size_t n, void* s) {
    // pageable host memory cannot be captured (the engine stages inputs before a replay)
    if (refuse_in_capture(s, "cuMemcpyHtoDAsync")) return CAPTURE_UNSUPPORTED;
    return cuMemcpyHtoD_v2(dst, src, n);
}
EMU_API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, std::size_t n) {
    if (n == 0) return OK;
    emu::check_range("cuMemcpyDtoH", "source", src, n);
    memcpy(dst, reinterpret_cast<const void*>(src), n);
    return OK;
}
EMU_API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, std::size_t n, void* s) {
    if (refuse_in_capture(s, "cuMemcpyDtoHAsync")) return CAPTURE_UNSUPPORTED;
    return cuMemcpyDtoH_v2(dst, src, n);
}
EMU_API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, std::size_t n) {
    if (n == 0) return OK;
    emu::check_range("cuMemcpyDtoD", "source", src, n);
    emu::check_range("cuMemcpyDtoD", "destination", dst, n);
    memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    return OK;
}
EMU_API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, std::size_t n, void* s) {
    return record_or_run(s, "cuMemcpyDtoDAsync", {{"source", src, n}, {"destination", dst, n}},
                         [=] { return cuMemcpyDtoD_v2(dst, src, n); });
}
EMU_API CUresult cuMemcpy(CUdeviceptr dst, CUdeviceptr src, std::size_t n) {
    // Unified addressing: either side may be host memory; check whichever is device memory.
    if (n == 0) return OK;
    memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    return OK;
}
EMU_API CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, std::size_t n, void* s) {
    if (refuse_in_capture(s, "cuMemcpyAsync")) return CAPTURE_UNSUPPORTED;
    return cuMemcpy(dst, src, n);
}
EMU_API CUresult cuMemcpyPeerAsync(CUdeviceptr dst, void*, CUdeviceptr src, void*, std::size_t n, void*) {
    return cuMemcpyDtoD_v2(dst, src, n);
}
EMU_API CUresult cuPointerGetAttribute(void*, int, CUdeviceptr) { return NOT_SUPPORTED; }
EMU_API CUresult cuMemGetAddressRange_v2(CUdeviceptr* base, std::size_t* size, CUdeviceptr p) {
    emu::AllocInfo a;
    if (!emu::find_alloc(p, 0, &a)) return NOT_FOUND;
    if (base) *base = a.base;
    if (size) *size = a.size;
    return OK;
}

// ---- streams and events (all work completes inside the call that issues it) ----
EMU_API CUresult cuStreamCreate(void** s, unsigned flags) {
    if (!s) return INVALID_VALUE;
    *s = new Stream{flags};
    return OK;
}
EMU_API CUresult cuStreamCreateWithPriority(void** s, unsigned flags, int) { return cuStreamCreate(s, flags); }
EMU_API CUresult cuStreamDestroy_v2(void* s) {
    delete static_cast<Stream*>(s);
    return OK;
}
EMU_API CUresult cuStreamSynchronize(void* s) {
    if (refuse_in_capture(s, "cuStreamSynchronize")) return CAPTURE_UNSUPPORTED;
    return OK;
}
EMU_API CUresult cuStreamQuery(void*) { return OK; }
EMU_API CUresult cuStreamWaitEvent(void*, void*, unsigned) { return OK; }
EMU_API CUresult cuStreamIsCapturing(void* s, int* status) {
    if (!status) return INVALID_VALUE;
    *status = emu::capturing(s) ? 1 : 0;  // CU_STREAM_CAPTURE_STATUS_ACTIVE / _NONE
    return OK;
}
// ---- graphs (graph.cpp holds the capture state) ----
struct Graph {
    std::vector<emu::Node> nodes;
};
EMU_API CUresult cuStreamBeginCapture_v2(void* s, int) {
    // the legacy default stream cannot capture; neither can a stream that already does
    if (!s) return CAPTURE_UNSUPPORTED;
    return emu::begin_capture(s) ? OK : ILLEGAL_STATE;
}
EMU_API CUresult cuStreamEndCapture(void* s, void** g) {
    if (!g) return INVALID_VALUE;
    *g = nullptr;
    std::vector<emu::Node> nodes;
    switch (emu::end_capture(s, &nodes)) {
        case 0: break;
        case 1: return ILLEGAL_STATE;
        default: return CAPTURE_INVALIDATED;
    }
    emu::trace("stream capture ended: %zu nodes", nodes.size());
    *g = new Graph{std::move(nodes)};
    return OK;
}
EMU_API CUresult cuGraphInstantiateWithFlags(void** exec, void* g, unsigned long long) {
    if (!exec || !g) return INVALID_VALUE;
    *exec = new Graph{static_cast<Graph*>(g)->nodes};
    return OK;
}
EMU_API CUresult cuGraphLaunch(void* exec, void* s) {
    if (!exec) return INVALID_HANDLE;
    if (emu::capturing(s)) return NOT_SUPPORTED;  // child graphs are not emulated
    for (const auto& n : static_cast<Graph*>(exec)->nodes) n();
    return OK;
}
EMU_API CUresult cuGraphUpload(void* exec, void*) { return exec ? OK : INVALID_HANDLE; }
EMU_API CUresult cuGraphDestroy(void* g) {
    delete static_cast<Graph*>(g);
    return OK;
}
EMU_API CUresult cuGraphExecDestroy(void* exec) {
    delete static_cast<Graph*>(exec);
    return OK;
}
EMU_API CUresult cuLaunchHostFunc(void*, void (*fn)(void*), void* data) {
    if (!fn) return INVALID_VALUE;
    fn(data);
    return OK;
}
EMU_API CUresult cuEventCreate(void** e, unsigned) {
    if (!e) return INVALID_VALUE;
    *e = new Event{};
    return OK;
}
EMU_API CUresult cuEventDestroy_v2(void* e) {
    delete static_cast<Event*>(e);
    return OK;
}
EMU_API CUresult cuEventRecord(void* e, void*) {
    if (!e) return INVALID_HANDLE;
    using namespace std::chrono;
    static_cast<Event*>(e)->ms =
        duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
    return OK;
}
EMU_API CUresult cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
EMU_API CUresult cuEventSynchronize(void*) { return OK; }
EMU_API CUresult cuEventQuery(void*) { return OK; }
EMU_API CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
    if (!ms || !a || !b) return INVALID_VALUE;
    *ms = (float)(static_cast<Event*>(b)->ms - static_cast<Event*>(a)->ms);
    return OK;
}
EMU_API CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

// ---- modules and kernels ----
EMU_API CUresult cuModuleLoadData(void** m, const void* image) {
    if (!m || !image) return INVALID_VALUE;
    *m = new Module{};  // the image (NVRTC's CUBIN) is not needed: kernels are host-compiled
    return OK;
}
EMU_API CUresult cuModuleLoadDataEx(void** m, const void* image, unsigned, void*, void*) {
    return cuModuleLoadData(m, image);
}
EMU_API CUresult cuModuleLoad(void** m, const char* path) {
    if (!path) return INVALID_VALUE;
    return cuModuleLoadData(m, path);
}
EMU_API CUresult cuModuleUnload(void* m) {
    Module* mod = static_cast<Module*>(m);
    if (!mod) return INVALID_HANDLE;
    for (auto& kv : mod->funcs) delete kv.second;
    delete mod;
    return OK;
}
EMU_API CUresult cuModuleGetFunction(void** f, void* m, const char* name) {
    if (!f || !m || !name) return INVALID_VALUE;
    Module* mod = static_cast<Module*>(m);
    auto it = mod->funcs.find(name);
    if (it == mod->funcs.end()) {
        const emu::KernelEntry* k = emu::find_kernel(name);
        if (!k) {
            emu::trace("cuModuleGetFunction(%s): no such kernel in the emulator", name);
            return NOT_FOUND;
        }
        it = mod->funcs.emplace(name, new Function{k, 0}).first;
    }
    *f = it->second;
    return OK;
}
EMU_API CUresult cuModuleGetGlobal_v2(CUdeviceptr*, std::size_t*, void*, const char*) { return NOT_FOUND; }
EMU_API CUresult cuFuncSetAttribute(void* f, int attr, int value) {
    Function* fn = static_cast<Function*>(f);
    if (!fn) return INVALID_HANDLE;
    if (attr == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || value > emu::kSmemOptinMax) return INVALID_VALUE;
        fn->smem_optin = value;
        emu::trace("%s: dynamic shared memory opt-in %d B", fn->kernel->name, value);
    }
    return OK;
}
EMU_API CUresult cuFuncGetAttribute(int* v, int attr, void* f) {
    Function* fn = static_cast<Function*>(f);
    if (!v) return INVALID_VALUE;
    if (!fn) return INVALID_HANDLE;
    switch (attr) {
        case 0: *v = fn->kernel->max_threads > 0 ? fn->kernel->max_threads : 1024; break;
        case 4: *v = 32; break;  // NUM_REGS
        case 5: case 6: *v = 90; break;  // PTX / BINARY_VERSION
        case 8: *v = fn->smem_optin ? fn->smem_optin : emu::kSmemDefault; break;
        default: *v = 0; break;
    }
    return OK;
}
EMU_API CUresult cuFuncSetCacheConfig(void*, int) { return OK; }
EMU_API CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                unsigned by, unsigned bz, unsigned smem, void* s, void** params,
                                void** extra) {
    Function* fn = static_cast<Function*>(f);
    if (!fn) return INVALID_HANDLE;
    if (extra && *extra) emu::fatal("cuLaunchKernel(%s): the 'extra' argument form is not emulated", fn->kernel->name);
    if (emu::capturing(s)) {
        // the argument values are copied now, as a GPU graph's kernel node does
        const emu::KernelEntry* k = fn->kernel;
        std::vector<std::vector<char>> vals(k->nparams);
        for (int i = 0; i < k->nparams; ++i) {
            const char* src = static_cast<const char*>(params[i]);
            vals[i].assign(src, src + k->params[i].size);
        }
        const int optin = fn->smem_optin;
        emu::record(s, [=]() mutable {
            std::vector<void*> args(vals.size());
            for (std::size_t i = 0; i < vals.size(); ++i) args[i] = vals[i].data();
            emu::LaunchParams p{k, dim3{gx, gy, gz}, dim3{bx, by, bz}, smem, optin, args.data()};
            emu::launch(p);
        });
        return OK;
    }
    emu::LaunchParams p{fn->kernel, dim3{gx, gy, gz}, dim3{bx, by, bz}, smem, fn->smem_optin, params};
    emu::launch(p);
    return OK;
}
EMU_API CUresult cuLaunchCooperativeKernel(void* f, unsigned gx, unsigned gy, unsigned gz,
                                           unsigned bx, unsigned by, unsigned bz, unsigned smem,
                                           void* s, void** params) {
    return cuLaunchKernel(f, gx, gy, gz, bx, by, bz, smem, s, params, nullptr);
}
EMU_API CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int* n, void*, int, std::size_t) {
    if (!n) return INVALID_VALUE;
    *n = 2;
    return OK;
}
EMU_API CUresult cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* n, void* f, int b, std::size_t s, unsigned) {
    return cuOccupancyMaxActiveBlocksPerMultiprocessor(n, f, b, s);
}
EMU_API CUresult cuOccupancyMaxPotentialBlockSize(int*, int*, void*, void*, std::size_t, int) { return NOT_SUPPORTED; }
EMU_API CUresult cuOccupancyMaxPotentialBlockSizeWithFlags(int*, int*, void*, void*, std::size_t, int, unsigned) {
    return NOT_SUPPORTED;
}
EMU_API CUresult cuOccupancyAvailableDynamicSMemPerBlock(std::size_t* s, void*, int, int) {
    if (!s) return INVALID_VALUE;
    *s = emu::kSmemOptinMax;
    return OK;
}
EMU_API CUresult cuOccupancyMaxActiveClusters(int*, void*, const void*) { return NOT_SUPPORTED; }
EMU_API CUresult cuOccupancyMaxPotentialClusterSize(int*, void*, const void*) { return NOT_SUPPORTED; }
EMU_API CUresult cuProfilerStart() { return OK; }
EMU_API CUresult cuProfilerStop() { return OK; }
EMU_API CUresult cuImportExternalMemory(void**, const void*) { return NOT_SUPPORTED; }
EMU_API CUresult cuExternalMemoryGetMappedBuffer(CUdeviceptr*, void*, const void*) { return NOT_SUPPORTED; }
EMU_API CUresult cuDestroyExternalMemory(void*) { return NOT_SUPPORTED; }
