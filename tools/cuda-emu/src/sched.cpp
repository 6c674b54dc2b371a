// sched.cpp - runs kernel launches on the CPU. Each CUDA thread of a block is a fiber with its
// own small stack; a block's fibers all run on the calling OS thread, switched by a hand-written
// x86-64 context switch. __syncthreads and warp shuffles park a fiber; the scheduler runs one
// warp at a time as far as it can go (until every lane waits at a block barrier or has exited,
// resolving the warp's shuffles on the way), then the next warp, then releases the barrier.
// Because a warp runs ahead of the others up to the next barrier, a missing __syncthreads shows
// up as reads of poisoned or stale shared memory; CUDA_EMU_SHUFFLE picks the warp/lane order.
//
// Also here: the launch-time checks (grid/block shape, pointer arguments, shared memory opt-in,
// __launch_bounds__), the per-block shared memory (poisoned with 0xFF bytes = NaN), the
// barrier/shuffle consistency checks, and the SIGSEGV reporter for stray accesses.
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "emu_internal.h"

#if EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace emu {

thread_local ThreadView* cur __attribute__((tls_model("initial-exec"))) = nullptr;

namespace {

// ---------------------------------------------------------------------------------------------
// Context switch. emu_ctx_swap saves the callee-saved registers on the current stack, stores the
// stack pointer in *save and continues on `next` (a stack prepared the same way). A fresh fiber
// stack holds a frame whose "return address" is emu_ctx_boot, which passes rbx (the Fiber*) to
// emu_fiber_main.
extern "C" void emu_ctx_swap(void** save, void* next);
extern "C" void emu_ctx_boot();
asm(R"(
    .text
    .p2align 4
    .hidden emu_ctx_swap
    .type emu_ctx_swap, @function
emu_ctx_swap:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_ctx_swap, .-emu_ctx_swap

    .p2align 4
    .hidden emu_ctx_boot
    .type emu_ctx_boot, @function
emu_ctx_boot:
    movq %rbx, %rdi
    call emu_fiber_main
    ud2
    .size emu_ctx_boot, .-emu_ctx_boot
)");

enum class St : uint8_t { Run, Shfl, Bar, Done };

struct Fiber {
    ThreadView view;
    void* sp = nullptr;
    St st = St::Run;
    unsigned linear = 0;
    const char* file = nullptr;  // where it is parked
    int line = 0;
    int kind = 0;                // shuffle kind (0 sync, 1 xor, 2 down, 3 up, 4 syncwarp)
    unsigned src = 0;            // lane it reads from
    uint64_t val = 0;            // value published / received
    void* asan_fake = nullptr;
};

enum class Order { Forward, Reverse, Random };

#if EMU_ASAN
constexpr std::size_t kStack = 256 * 1024;
#else
constexpr std::size_t kStack = 64 * 1024;
#endif

struct StaticSmem {
    const void* key;
    void* mem;
    std::size_t bytes;
    uint64_t epoch;
    const char* name;
};

// Per OS thread: the fibers, their stacks and the shared memory of the block being run.
struct Worker {
    std::vector<Fiber> fibers;
    char* stacks = nullptr;
    std::size_t nstacks = 0;
    void* sched_sp = nullptr;
    const void* sched_bottom = nullptr;  // ASan: the OS thread's own stack
    std::size_t sched_size = 0;
    Fiber* running = nullptr;
    const LaunchParams* launch = nullptr;
    uint3 bid{0, 0, 0};
    unsigned nthreads = 0;
    unsigned char* dyn = nullptr;
    std::vector<StaticSmem> statics;
    uint64_t epoch = 0;
    std::size_t static_bytes = 0;  // static shared memory touched by the current block
    std::mt19937_64 rng;
};

thread_local Worker* tls_worker __attribute__((tls_model("initial-exec"))) = nullptr;

Worker& worker() {
    if (!tls_worker) {
        tls_worker = new Worker();  // lives as long as the thread; never freed (tiny)
        const char* seed = getenv("CUDA_EMU_SEED");
        tls_worker->rng.seed(seed ? strtoull(seed, nullptr, 0) : 1);
    }
    return *tls_worker;
}

Order order_mode() {
    static const Order mode = [] {
        const char* s = getenv("CUDA_EMU_SHUFFLE");
        if (!s || !*s || std::string(s) == "0") return Order::Forward;
        if (std::string(s) == "random") return Order::Random;
        if (std::string(s) == "1" || std::string(s) == "reverse") return Order::Reverse;
        fatal("CUDA_EMU_SHUFFLE=%s: expected 0, 1 (= reverse) or random", s);
    }();
    return mode;
}

void ensure_stacks(Worker& w, std::size_t n) {
    if (w.nstacks >= n) return;
    if (w.stacks) munmap(w.stacks, w.nstacks * kStack);
    std::size_t want = std::max<std::size_t>(n, 256);
    void* m = mmap(nullptr, want * kStack, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) fatal("cannot map %zu fiber stacks", want);
    w.stacks = static_cast<char*>(m);
    w.nstacks = want;
    const long page = sysconf(_SC_PAGESIZE);
    for (std::size_t i = 0; i < want; ++i) mprotect(w.stacks + i * kStack, page, PROT_NONE);
    w.fibers.resize(want);
}

// ---------------------------------------------------------------------------------------------
// Switching. resume() runs on the OS thread's stack; park() on a fiber's.

void resume(Worker& w, Fiber* f) {
    w.running = f;
    cur = &f->view;
#if EMU_ASAN
    void* fake = nullptr;
    char* lo = w.stacks + (f - w.fibers.data()) * kStack;
    __sanitizer_start_switch_fiber(&fake, lo, kStack);
    emu_ctx_swap(&w.sched_sp, f->sp);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    emu_ctx_swap(&w.sched_sp, f->sp);
#endif
    cur = nullptr;
    w.running = nullptr;
}

void park(Worker& w, Fiber* f) {
#if EMU_ASAN
    __sanitizer_start_switch_fiber(f->st == St::Done ? nullptr : &f->asan_fake, w.sched_bottom,
                                   w.sched_size);
    emu_ctx_swap(&f->sp, w.sched_sp);
    __sanitizer_finish_switch_fiber(f->asan_fake, nullptr, nullptr);
#else
    emu_ctx_swap(&f->sp, w.sched_sp);
#endif
}

std::string where(const Worker& w, const Fiber* f) {
    char buf[512];
    const LaunchParams& L = *w.launch;
    int n = snprintf(buf, sizeof buf, "kernel %s (%s), grid (%u,%u,%u) x block (%u,%u,%u), block (%u,%u,%u)",
                     L.kernel->name, L.kernel->file, L.grid.x, L.grid.y, L.grid.z, L.block.x,
                     L.block.y, L.block.z, w.bid.x, w.bid.y, w.bid.z);
    if (f && n > 0 && n < (int)sizeof buf)
        snprintf(buf + n, sizeof buf - n, ", thread (%u,%u,%u) [warp %u lane %u]", f->view.tid.x,
                 f->view.tid.y, f->view.tid.z, f->linear / 32, f->linear % 32);
    return buf;
}

}  // namespace

// Entered on a fresh fiber stack through emu_ctx_boot; never returns (the stack is reused).
extern "C" __attribute__((noreturn, used, visibility("hidden"))) void emu_fiber_main(Fiber* f) {
    Worker& w = *tls_worker;
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &w.sched_bottom, &w.sched_size);
#endif
    w.launch->kernel->thunk(w.launch->args);
    f->st = St::Done;
    park(w, f);
    __builtin_trap();
}

namespace {

void init_fiber(Worker& w, unsigned i) {
    Fiber& f = w.fibers[i];
    const LaunchParams& L = *w.launch;
    f.linear = i;
    f.view.tid = uint3{i % L.block.x, (i / L.block.x) % L.block.y, i / (L.block.x * L.block.y)};
    f.view.bid = w.bid;
    f.view.bdim = L.block;
    f.view.gdim = L.grid;
    f.st = St::Run;
    f.asan_fake = nullptr;
    // Boot frame, see emu_ctx_swap: r15 r14 r13 r12 rbx rbp, return address, padding.
    uintptr_t top = reinterpret_cast<uintptr_t>(w.stacks + (i + 1) * kStack);
    uintptr_t* t = reinterpret_cast<uintptr_t*>(top);
    t[-1] = 0;
    t[-2] = 0;
    t[-3] = reinterpret_cast<uintptr_t>(&emu_ctx_boot);
    t[-4] = 0;                                   // rbp
    t[-5] = reinterpret_cast<uintptr_t>(&f);     // rbx
    t[-6] = t[-7] = t[-8] = t[-9] = 0;           // r12..r15
    f.sp = t - 9;
}

void make_order(Worker& w, std::vector<unsigned>& v, unsigned lo, unsigned hi) {
    v.clear();
    for (unsigned i = lo; i < hi; ++i) v.push_back(i);
    switch (order_mode()) {
        case Order::Forward: break;
        case Order::Reverse: std::reverse(v.begin(), v.end()); break;
        case Order::Random: std::shuffle(v.begin(), v.end(), w.rng); break;
    }
}

// Runs warp `wi` until each of its lanes waits at a block barrier or has exited.
void run_warp(Worker& w, unsigned wi, std::vector<unsigned>& lanes) {
    const unsigned lo = wi * 32, hi = std::min(w.nthreads, lo + 32);
    make_order(w, lanes, lo, hi);
    for (;;) {
        for (unsigned i : lanes)
            if (w.fibers[i].st == St::Run) resume(w, &w.fibers[i]);
        unsigned nshfl = 0, nbar = 0, ndone = 0;
        Fiber* first = nullptr;
        for (unsigned i = lo; i < hi; ++i) {
            Fiber& f = w.fibers[i];
            if (f.st == St::Shfl) {
                ++nshfl;
                if (!first) first = &f;
            } else if (f.st == St::Bar) {
                ++nbar;
            } else if (f.st == St::Done) {
                ++ndone;
            }
        }
        if (nshfl == 0) return;
        const char* what = first->kind == 4 ? "__syncwarp" : "full-mask warp shuffle";
        if (nbar > 0) {
            Fiber* b = nullptr;
            for (unsigned i = lo; i < hi && !b; ++i)
                if (w.fibers[i].st == St::Bar) b = &w.fibers[i];
            fatal("deadlock: %s: %u lane(s) wait in a %s at %s:%d while %u lane(s) of the same "
                  "warp wait at __syncthreads (%s:%d, e.g. thread %u)",
                  where(w, first).c_str(), nshfl, what, first->file, first->line, nbar, b->file,
                  b->line, b->linear);
        }
        if (ndone > 0 || hi - lo < 32)
            fatal("%s: %s at %s:%d with only %u live lane(s) of 32 (%s); mask 0xffffffff needs "
                  "all 32",
                  where(w, first).c_str(), what, first->file, first->line, nshfl,
                  hi - lo < 32 ? "partial warp: blockDim is not a multiple of 32"
                               : "the other lanes have exited");
        for (unsigned i = lo; i < hi; ++i) {
            const Fiber& f = w.fibers[i];
            if (f.line != first->line || f.file != first->file || f.kind != first->kind)
                fatal("%s: divergent warp shuffles: lane %u is at %s:%d, lane %u at %s:%d",
                      where(w, &f).c_str(), first->linear % 32, first->file, first->line,
                      f.linear % 32, f.file, f.line);
        }
        uint64_t vals[32];
        for (unsigned i = lo; i < hi; ++i) vals[i - lo] = w.fibers[i].val;
        for (unsigned i = lo; i < hi; ++i) {
            Fiber& f = w.fibers[i];
            f.val = vals[f.src];
            f.st = St::Run;
        }
    }
}

void run_block(Worker& w) {
    const LaunchParams& L = *w.launch;
    ++w.epoch;
    w.static_bytes = 0;
    if (L.dyn_smem) memset(w.dyn, 0xFF, L.dyn_smem);
    for (unsigned i = 0; i < w.nthreads; ++i) init_fiber(w, i);
    const unsigned nwarps = (w.nthreads + 31) / 32;
    std::vector<unsigned> warps, lanes;
    lanes.reserve(32);
    for (;;) {
        make_order(w, warps, 0, nwarps);
        for (unsigned wi : warps) run_warp(w, wi, lanes);
        Fiber* first = nullptr;
        for (unsigned i = 0; i < w.nthreads; ++i) {
            Fiber& f = w.fibers[i];
            if (f.st != St::Bar) continue;
            if (!first) {
                first = &f;
            } else if (f.line != first->line || f.file != first->file) {
                fatal("%s: divergent __syncthreads: thread %u waits at %s:%d, thread %u at %s:%d "
                      "(all live threads of a block must reach the same barrier)",
                      where(w, &f).c_str(), first->linear, first->file, first->line, f.linear,
                      f.file, f.line);
            }
        }
        if (!first) break;  // every thread has exited
        for (unsigned i = 0; i < w.nthreads; ++i)
            if (w.fibers[i].st == St::Bar) w.fibers[i].st = St::Run;
    }
    const std::size_t total = w.static_bytes + L.dyn_smem;
    const std::size_t limit = L.smem_optin > kSmemDefault ? L.smem_optin : kSmemDefault;
    if (w.static_bytes > (std::size_t)kSmemDefault || total > limit)
        fatal("%s: shared memory %zu B static + %u B dynamic exceeds the %zu B limit",
              where(w, nullptr).c_str(), w.static_bytes, L.dyn_smem, limit);
}

std::mutex& registry_mutex() {
    static std::mutex m;
    return m;
}
std::map<std::string, const KernelEntry*>& registry() {
    static std::map<std::string, const KernelEntry*> r;
    return r;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Device-side entry points called from the kernels (emu_device.h).

void syncthreads(const char* file, int line) {
    Worker& w = *tls_worker;
    Fiber* f = w.running;
    f->st = St::Bar;
    f->file = file;
    f->line = line;
    park(w, f);
}

uint64_t warp_exchange(unsigned mask, uint64_t val, int kind, int arg, int width, const char* file,
                       int line) {
    Worker& w = *tls_worker;
    Fiber* f = w.running;
    if (mask != 0xffffffffu)
        fatal("%s: warp operation at %s:%d with mask 0x%08x: only full masks are emulated",
              where(w, f).c_str(), file, line, mask);
    if (width <= 0 || width > 32 || (width & (width - 1)))
        fatal("%s: shuffle width %d at %s:%d is not a power of two <= 32", where(w, f).c_str(),
              width, file, line);
    const unsigned lane = f->linear % 32, base = lane & ~(unsigned)(width - 1), in = lane - base;
    unsigned src = lane;
    switch (kind) {
        case 0: src = base + ((unsigned)arg & (unsigned)(width - 1)); break;
        case 1: {
            unsigned s = lane ^ (unsigned)arg;
            src = (s >= base && s < base + (unsigned)width) ? s : lane;
            break;
        }
        case 2: src = in + (unsigned)arg < (unsigned)width ? lane + (unsigned)arg : lane; break;
        case 3: src = (int)in - arg >= 0 ? lane - (unsigned)arg : lane; break;
        default: break;
    }
    f->st = St::Shfl;
    f->kind = kind;
    f->file = file;
    f->line = line;
    f->src = src;
    f->val = val;
    park(w, f);
    return f->val;
}

void* dyn_smem() {
    Worker& w = *tls_worker;
    return w.dyn;
}

void* static_smem(const void* key, std::size_t bytes, std::size_t align, const char* name) {
    Worker& w = *tls_worker;
    for (StaticSmem& s : w.statics) {
        if (s.key != key) continue;
        if (s.epoch != w.epoch) {
            memset(s.mem, 0xFF, s.bytes);
            s.epoch = w.epoch;
            w.static_bytes += s.bytes;
        }
        return s.mem;
    }
    void* mem = ::operator new(bytes, std::align_val_t(std::max<std::size_t>(align, 16)));
    memset(mem, 0xFF, bytes);
    w.statics.push_back(StaticSmem{key, mem, bytes, w.epoch, name});
    w.static_bytes += bytes;
    return mem;
}

bool register_kernels(const KernelEntry* entries, std::size_t n) {
    std::lock_guard<std::mutex> g(registry_mutex());
    for (std::size_t i = 0; i < n; ++i) {
        auto [it, fresh] = registry().emplace(entries[i].name, &entries[i]);
        if (!fresh) {
            fprintf(stderr, "cuda-emu: kernel %s is defined in both %s and %s\n", entries[i].name,
                    it->second->file, entries[i].file);
            abort();
        }
    }
    return true;
}

const KernelEntry* find_kernel(const char* name) {
    std::lock_guard<std::mutex> g(registry_mutex());
    auto it = registry().find(name);
    return it == registry().end() ? nullptr : it->second;
}

// ---------------------------------------------------------------------------------------------
// Reports.

bool verbose() {
    static const bool v = getenv("CUDA_EMU_VERBOSE") != nullptr;
    return v;
}

void trace(const char* fmt, ...) {
    if (!verbose()) return;
    va_list ap;
    va_start(ap, fmt);
    fputs("cuda-emu: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

void fatal(const char* fmt, ...) {
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\ncuda-emu: FATAL: %s\n", msg);
    Worker* w = tls_worker;
    if (w && w->launch && !strstr(msg, "kernel "))
        fprintf(stderr, "cuda-emu: while running %s\n", where(*w, w->running).c_str());
    fflush(stderr);
    abort();
}

namespace {

#if !EMU_ASAN
struct sigaction g_old_segv, g_old_bus;

void on_fault(int sig, siginfo_t* info, void* uctx) {
    Worker* w = tls_worker;
    if (w && w->launch && w->running) {
        const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
        char head[160];
        snprintf(head, sizeof head, "invalid memory access (%s) at address 0x%lx: ",
                 sig == SIGSEGV ? "SIGSEGV" : "SIGBUS", (unsigned long)addr);
        const uintptr_t lo = reinterpret_cast<uintptr_t>(w->stacks);
        std::string detail;
        if (addr >= lo && addr < lo + w->nstacks * kStack)
            detail = "fiber stack overflow (CUDA thread uses too much local memory)";
        else
            detail = describe_addr(addr);
        fatal("%s%s\n  in %s", head, detail.c_str(), where(*w, w->running).c_str());
    }
    struct sigaction& old = sig == SIGSEGV ? g_old_segv : g_old_bus;
    if (old.sa_flags & SA_SIGINFO) {
        old.sa_sigaction(sig, info, uctx);
    } else if (old.sa_handler != SIG_IGN && old.sa_handler != SIG_DFL) {
        old.sa_handler(sig);
    } else {
        signal(sig, SIG_DFL);  // returning re-executes the access and dies the default way
    }
}
#endif

// The fault report (vfprintf, allocation lookup) needs more stack than the small alternate
// signal stack a runtime may have installed (Rust's is a few KiB), so every thread that runs
// kernels gets its own 256 KiB one (never freed; a runtime that frees its own on thread exit
// only disables whatever is current).
[[maybe_unused]] void ensure_altstack() {
    static thread_local bool done = false;
    if (done) return;
    done = true;
    stack_t ss{};
    ss.ss_size = 256 * 1024;
    ss.ss_sp = malloc(ss.ss_size);
    ss.ss_flags = 0;
    if (ss.ss_sp) sigaltstack(&ss, nullptr);
}

}  // namespace

void install_fault_handler() {
#if !EMU_ASAN
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa{};
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_old_segv);
        sigaction(SIGBUS, &sa, &g_old_bus);
    });
#endif
}

#if EMU_ASAN
namespace {
void on_asan_death() {
    Worker* w = tls_worker;
    if (w && w->launch)
        fprintf(stderr, "cuda-emu: the error above happened in %s\n",
                where(*w, w->running).c_str());
}
}  // namespace
#endif

// ---------------------------------------------------------------------------------------------
// Launch.

void launch(const LaunchParams& L) {
    const KernelEntry* k = L.kernel;
    char shape[200];
    snprintf(shape, sizeof shape, "launch of kernel %s (%s) with grid (%u,%u,%u), block (%u,%u,%u)",
             k->name, k->file, L.grid.x, L.grid.y, L.grid.z, L.block.x, L.block.y, L.block.z);
    if (!L.grid.x || !L.grid.y || !L.grid.z || !L.block.x || !L.block.y || !L.block.z)
        fatal("%s: a grid or block dimension is 0", shape);
    if (L.grid.x > 0x7fffffffu || L.grid.y > 65535 || L.grid.z > 65535)
        fatal("%s: grid exceeds (2^31-1, 65535, 65535)", shape);
    if (L.block.x > 1024 || L.block.y > 1024 || L.block.z > 64)
        fatal("%s: block exceeds (1024, 1024, 64)", shape);
    const unsigned long long nthreads = (unsigned long long)L.block.x * L.block.y * L.block.z;
    if (nthreads > 1024) fatal("%s: %llu threads per block (max 1024)", shape, nthreads);
    if (k->max_threads > 0 && nthreads > (unsigned long long)k->max_threads)
        fatal("%s: %llu threads per block exceed the kernel's __launch_bounds__(%d)", shape,
              nthreads, k->max_threads);
    if (L.dyn_smem > (unsigned)kSmemDefault && L.smem_optin < (int)L.dyn_smem)
        fatal("%s: %u B of dynamic shared memory need cuFuncSetAttribute("
              "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) >= that; the opt-in is %d B",
              shape, L.dyn_smem, L.smem_optin);
    if (k->nparams > 0 && !L.args)
        fatal("%s: kernelParams is NULL (the 'extra' launch form is not emulated)", shape);
    for (int i = 0; i < k->nparams; ++i) {
        const KernelParam& p = k->params[i];
        if (!p.is_pointer) continue;
        uintptr_t v = *static_cast<const uintptr_t*>(L.args[i]);
        if (v == 0) continue;
        AllocInfo a;
        if (!find_alloc(v, 0, &a))
            fatal("%s: argument %d '%s' (%s) = 0x%lx is not inside any device allocation: %s",
                  shape, i, p.name, p.type, (unsigned long)v, describe_addr(v).c_str());
        if (v % p.align)
            fatal("%s: argument %d '%s' (%s) = 0x%lx is not %zu-byte aligned", shape, i, p.name,
                  p.type, (unsigned long)v, p.align);
    }
    trace("%s, %u B dynamic shared memory", shape, L.dyn_smem);

    Worker& w = worker();
    if (w.launch) fatal("%s: nested launch from inside a kernel", shape);
    install_fault_handler();
#if !EMU_ASAN
    // Under ASan its own handler reports faults on its own alternate stack, which it unmaps at
    // thread exit: replacing it would make that unmap fail.
    ensure_altstack();
#endif
#if EMU_ASAN
    static std::once_flag once;
    std::call_once(once, [] { __sanitizer_set_death_callback(on_asan_death); });
#endif
    ensure_stacks(w, nthreads);
    w.launch = &L;
    w.nthreads = (unsigned)nthreads;
    w.dyn = L.dyn_smem ? static_cast<unsigned char*>(
                             ::operator new(L.dyn_smem, std::align_val_t(128)))
                       : nullptr;
    const unsigned long long nblocks = (unsigned long long)L.grid.x * L.grid.y * L.grid.z;
    const bool reverse = order_mode() == Order::Reverse;
    for (unsigned long long b = 0; b < nblocks; ++b) {
        unsigned long long lin = reverse ? nblocks - 1 - b : b;
        w.bid = uint3{(unsigned)(lin % L.grid.x), (unsigned)((lin / L.grid.x) % L.grid.y),
                      (unsigned)(lin / ((unsigned long long)L.grid.x * L.grid.y))};
        run_block(w);
    }
    if (w.dyn) ::operator delete(w.dyn, std::align_val_t(128));
    w.dyn = nullptr;
    w.launch = nullptr;
}

}  // namespace emu
