// blaslt.cpp - the cuBLASLt subset cudarc 0.19's `cublaslt::result` calls: handles, matmul
// descriptors, matrix layouts, preferences, the algorithm heuristic and cublasLtMatmul.
//
// cublasLtMatmul computes D = alpha op(A) op(B) + beta C (+ bias over D's rows) through the same
// checked GEMM as cublasGemmEx (blas.cpp), so the two agree bit for bit; C may differ from D and
// is then only read. Only what the engine uses is implemented, and everything else is refused
// with a status (never silently ignored): epilogues other than DEFAULT and BIAS, row-major or
// batched layouts, device-pointer scalars, attributes this file does not know. The heuristic
// returns one algorithm that remembers the pointer alignments it was promised; a matmul whose
// pointers are less aligned is refused as on a GPU, where such an algorithm would fault. Under
// stream capture a matmul is recorded (scalars read at the call) and runs at each replay.
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "emu_internal.h"

namespace {

using Status = int;
constexpr Status SUCCESS = 0, NOT_INITIALIZED = 1, INVALID_VALUE = 7, NOT_SUPPORTED = 15;
constexpr int R_32F = 0, R_16BF = 14;
constexpr int OP_N = 0, OP_T = 1;
constexpr int EPILOGUE_DEFAULT = 1, EPILOGUE_BIAS = 4;

struct Handle {
    int magic = 0x4c54;
};

struct Desc {
    int compute = 68, scale = R_32F, pointer_mode = 0, ta = OP_N, tb = OP_N;
    int epilogue = EPILOGUE_DEFAULT;
    const void* bias = nullptr;
    int bias_type = -1;  // -1: D's type, as cuBLASLt's default
};

struct Layout {
    int type = R_32F;
    uint64_t rows = 0, cols = 0;
    int64_t ld = 0;
};

struct Pref {
    uint64_t max_workspace = 0;
    uint32_t align[4] = {256, 256, 256, 256};  // A, B, C, D
};

// cublasLtMatmulHeuristicResult_t (96 bytes): the algorithm is opaque to the caller.
struct Algo {
    uint64_t data[8];
};
struct HeuristicResult {
    Algo algo;
    std::size_t workspace_size;
    int state;
    float waves;
    int reserved[4];
};
constexpr uint64_t ALGO_TAG = 0x656d752d6c74ull;  // "emu-lt"

Status fail(Status st, const char* api, const char* why) {
    fprintf(stderr, "cuda-emu: %s: %s: %s\n", api,
            st == NOT_SUPPORTED ? "CUBLAS_STATUS_NOT_SUPPORTED" : "CUBLAS_STATUS_INVALID_VALUE",
            why);
    return st;
}

// Copies an attribute value of exactly the expected size.
template <typename V>
bool take(const void* buf, std::size_t size, V* out) {
    if (!buf || size != sizeof(V)) return false;
    memcpy(out, buf, sizeof(V));
    return true;
}

// What a descriptor's attribute store reports besides a status of its own (never a cuBLAS
// status: those are >= 0).
constexpr Status WRONG_SIZE = -1, UNKNOWN_ATTRIBUTE = -2;

// The frame of the descriptor attribute setters: a null descriptor is INVALID_VALUE; else
// `store` writes attribute `attr` into it, and its WRONG_SIZE or UNKNOWN_ATTRIBUTE becomes the
// failure cuBLASLt reports.
template <class T, class Store>
Status set_attribute(const char* api, void* obj, int attr, Store store) {
    if (!obj) return INVALID_VALUE;
    const Status st = store(*static_cast<T*>(obj));
    if (st == WRONG_SIZE) return fail(INVALID_VALUE, api, "attribute buffer of the wrong size");
    if (st == UNKNOWN_ATTRIBUTE) {
        fprintf(stderr, "cuda-emu: %s: attribute %d\n", api, attr);
        return fail(NOT_SUPPORTED, api, "attribute not implemented by the emulator");
    }
    return st;
}

uint32_t alignment_of(const void* p) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    uint32_t al = 1;
    while (al < 256 && (a & al) == 0) al <<= 1;
    return a == 0 ? 256 : al;
}

// Checks the operation against the layouts and fills the GEMM (without pointers and scalars).
Status plan(const Desc* d, const Layout* a, const Layout* b, const Layout* c, const Layout* dl,
            emu::GemmArgs* g, const char* api) {
    if (!d || !a || !b || !c || !dl) return fail(INVALID_VALUE, api, "a null descriptor");
    if (d->scale != R_32F) return fail(NOT_SUPPORTED, api, "scale type other than f32");
    if (d->pointer_mode != 0) return fail(NOT_SUPPORTED, api, "device-pointer alpha/beta");
    if (d->epilogue != EPILOGUE_DEFAULT && d->epilogue != EPILOGUE_BIAS)
        return fail(NOT_SUPPORTED, api, "epilogue not implemented by the emulator");
    if (d->epilogue == EPILOGUE_BIAS && !d->bias)
        return fail(INVALID_VALUE, api, "BIAS epilogue without a bias pointer");
    const uint64_t m = dl->rows, n = dl->cols;
    const uint64_t k = d->ta == OP_N ? a->cols : a->rows;
    if ((d->ta == OP_N ? a->rows : a->cols) != m) return fail(INVALID_VALUE, api, "op(A) rows != D rows");
    if ((d->tb == OP_N ? b->rows : b->cols) != k) return fail(INVALID_VALUE, api, "op(B) rows != k");
    if ((d->tb == OP_N ? b->cols : b->rows) != n) return fail(INVALID_VALUE, api, "op(B) cols != D cols");
    if (c->rows != m || c->cols != n) return fail(INVALID_VALUE, api, "C and D shapes differ");
    if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX)
        return fail(NOT_SUPPORTED, api, "dimension over INT32_MAX");
    if (a->ld > INT32_MAX || b->ld > INT32_MAX || c->ld > INT32_MAX || dl->ld > INT32_MAX)
        return fail(NOT_SUPPORTED, api, "leading dimension over INT32_MAX");
    *g = emu::GemmArgs{};
    g->ta = d->ta, g->tb = d->tb, g->m = (int)m, g->n = (int)n, g->k = (int)k;
    g->atype = a->type, g->lda = (int)a->ld, g->btype = b->type, g->ldb = (int)b->ld;
    g->ctype = c->type, g->ldc = (int)c->ld, g->dtype = dl->type, g->ldd = (int)dl->ld;
    g->bias = d->epilogue == EPILOGUE_BIAS ? d->bias : nullptr;
    g->biastype = d->bias_type < 0 ? dl->type : d->bias_type;
    g->compute = d->compute;
    return SUCCESS;
}

}  // namespace

EMU_API Status cublasLtCreate(void** h) { return emu::create_object<Handle>(h); }
EMU_API Status cublasLtDestroy(void* h) {
    return h ? emu::destroy_object<Handle>(h) : NOT_INITIALIZED;
}

EMU_API Status cublasLtMatmulDescCreate(void** out, int compute, int scale) {
    if (!out) return INVALID_VALUE;
    Desc* d = new Desc{};
    d->compute = compute;
    d->scale = scale;
    *out = d;
    return SUCCESS;
}
EMU_API Status cublasLtMatmulDescDestroy(void* d) { return emu::destroy_object<Desc>(d); }
EMU_API Status cublasLtMatmulDescSetAttribute(void* desc, int attr, const void* buf,
                                              std::size_t size) {
    const char* api = "cublasLtMatmulDescSetAttribute";
    return set_attribute<Desc>(api, desc, attr, [&](Desc& d) -> Status {
        bool ok;
        switch (attr) {
            case 1: ok = take(buf, size, &d.scale); break;         // SCALE_TYPE
            case 2: ok = take(buf, size, &d.pointer_mode); break;  // POINTER_MODE
            case 3: ok = take(buf, size, &d.ta); break;            // TRANSA
            case 4: ok = take(buf, size, &d.tb); break;            // TRANSB
            case 7: {                                              // EPILOGUE
                int e = 0;
                ok = take(buf, size, &e);
                if (ok && e != EPILOGUE_DEFAULT && e != EPILOGUE_BIAS) {
                    fprintf(stderr, "cuda-emu: %s: epilogue %d\n", api, e);
                    return fail(NOT_SUPPORTED, api, "epilogue not implemented by the emulator");
                }
                if (ok) d.epilogue = e;
                break;
            }
            case 8: ok = take(buf, size, &d.bias); break;        // BIAS_POINTER
            case 26: ok = take(buf, size, &d.bias_type); break;  // BIAS_DATA_TYPE
            default: return UNKNOWN_ATTRIBUTE;
        }
        if (!ok) return WRONG_SIZE;
        if ((attr == 3 || attr == 4) && (d.ta < OP_N || d.ta > OP_T || d.tb < OP_N || d.tb > OP_T))
            return fail(NOT_SUPPORTED, api, "transpose other than N or T");
        return SUCCESS;
    });
}

EMU_API Status cublasLtMatrixLayoutCreate(void** out, int type, uint64_t rows, uint64_t cols,
                                          int64_t ld) {
    if (!out) return INVALID_VALUE;
    if (type != R_32F && type != R_16BF)
        return fail(NOT_SUPPORTED, "cublasLtMatrixLayoutCreate", "data type other than f32/bf16");
    if (ld < (int64_t)(rows > 1 ? rows : 1))
        return fail(INVALID_VALUE, "cublasLtMatrixLayoutCreate", "ld < rows (column-major)");
    *out = new Layout{type, rows, cols, ld};
    return SUCCESS;
}
EMU_API Status cublasLtMatrixLayoutDestroy(void* l) { return emu::destroy_object<Layout>(l); }
EMU_API Status cublasLtMatrixLayoutSetAttribute(void* l, int attr, const void* buf,
                                                std::size_t size) {
    const char* api = "cublasLtMatrixLayoutSetAttribute";
    if (!l) return INVALID_VALUE;
    int32_t v32 = 0;
    if (attr == 1 && take(buf, size, &v32) && v32 == 0) return SUCCESS;  // ORDER = COL
    if (attr == 5 && take(buf, size, &v32) && v32 == 1) return SUCCESS;  // BATCH_COUNT = 1
    fprintf(stderr, "cuda-emu: %s: attribute %d\n", api, attr);
    return fail(NOT_SUPPORTED, api, "only column order and batch count 1 are implemented");
}

EMU_API Status cublasLtMatmulPreferenceCreate(void** out) { return emu::create_object<Pref>(out); }
EMU_API Status cublasLtMatmulPreferenceDestroy(void* p) { return emu::destroy_object<Pref>(p); }
EMU_API Status cublasLtMatmulPreferenceSetAttribute(void* pref, int attr, const void* buf,
                                                    std::size_t size) {
    const char* api = "cublasLtMatmulPreferenceSetAttribute";
    return set_attribute<Pref>(api, pref, attr, [&](Pref& p) -> Status {
        if (attr == 1)  // MAX_WORKSPACE_BYTES
            return take(buf, size, &p.max_workspace) ? SUCCESS : WRONG_SIZE;
        if (attr >= 5 && attr <= 8)  // MIN_ALIGNMENT_{A,B,C,D}_BYTES
            return take(buf, size, &p.align[attr - 5]) ? SUCCESS : WRONG_SIZE;
        return UNKNOWN_ATTRIBUTE;
    });
}

EMU_API Status cublasLtMatmulAlgoGetHeuristic(void* h, void* desc, void* a, void* b, void* c,
                                              void* d, void* pref, int requested,
                                              HeuristicResult* results, int* count) {
    const char* api = "cublasLtMatmulAlgoGetHeuristic";
    if (!h) return NOT_INITIALIZED;
    if (!pref || !results || !count || requested < 1) return INVALID_VALUE;
    emu::GemmArgs g;
    Status st = plan(static_cast<Desc*>(desc), static_cast<Layout*>(a), static_cast<Layout*>(b),
                     static_cast<Layout*>(c), static_cast<Layout*>(d), &g, api);
    if (st != SUCCESS) return st;
    const Pref* p = static_cast<Pref*>(pref);
    memset(results, 0, sizeof(HeuristicResult));
    results->algo.data[0] = ALGO_TAG;
    for (int i = 0; i < 4; ++i) results->algo.data[1 + i] = p->align[i];
    results->workspace_size = 0;
    results->state = SUCCESS;
    results->waves = 1.0f;
    *count = 1;
    return SUCCESS;
}

EMU_API Status cublasLtMatmul(void* h, void* desc, const void* alpha, const void* a, void* adesc,
                              const void* b, void* bdesc, const void* beta, const void* c,
                              void* cdesc, void* d, void* ddesc, const Algo* algo,
                              void* workspace, std::size_t ws_size, void* stream) {
    const char* api = "cublasLtMatmul";
    if (!h) return NOT_INITIALIZED;
    if (!alpha || !beta) return fail(INVALID_VALUE, api, "null alpha or beta");
    emu::GemmArgs g;
    Status st = plan(static_cast<Desc*>(desc), static_cast<Layout*>(adesc),
                     static_cast<Layout*>(bdesc), static_cast<Layout*>(cdesc),
                     static_cast<Layout*>(ddesc), &g, api);
    if (st != SUCCESS) return st;
    if (algo) {
        if (algo->data[0] != ALGO_TAG) return fail(INVALID_VALUE, api, "algo not from the heuristic");
        const void* ptrs[4] = {a, b, c, d};
        const char* names[4] = {"A", "B", "C", "D"};
        for (int i = 0; i < 4; ++i)
            if (alignment_of(ptrs[i]) < algo->data[1 + i]) {
                fprintf(stderr, "cuda-emu: %s: %s at %p is less aligned than the %llu bytes the "
                        "heuristic was promised\n", api, names[i], ptrs[i],
                        (unsigned long long)algo->data[1 + i]);
                return NOT_SUPPORTED;
            }
    }
    if (workspace && ws_size)
        emu::check_range(api, "workspace", reinterpret_cast<uintptr_t>(workspace), ws_size);
    g.alpha = *static_cast<const float*>(alpha);
    g.beta = *static_cast<const float*>(beta);
    g.a = a, g.b = b, g.c = c, g.d = d;
    if (emu::capturing(stream)) {
        emu::record(stream, [g]() {
            Status s = emu::gemm_run(g, "cublasLtMatmul (graph replay)");
            if (s != SUCCESS) emu::fatal("cublasLtMatmul failed in a graph replay (status %d)", s);
        });
        return SUCCESS;
    }
    return emu::gemm_run(g, api);
}
