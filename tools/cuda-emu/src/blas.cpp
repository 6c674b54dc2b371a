// blas.cpp - the cuBLAS subset cudarc 0.19 resolves: handles, streams, pointer/math modes and
// column-major GEMM (cublasGemmEx, cublasSgemm and their strided-batched forms), and the GEMM
// core (emu::gemm_run) that cublasLtMatmul (blaslt.cpp) shares.
//
// GEMM semantics follow cuBLAS: C = alpha op(A) op(B) + beta C, column-major, f32 accumulation
// (each C element summed over k in order), bf16 outputs rounded to nearest even, C not read when
// beta == 0. Leading dimensions are validated like cuBLAS does (CUBLAS_STATUS_INVALID_VALUE),
// unsupported type combinations give CUBLAS_STATUS_NOT_SUPPORTED, and every operand's extent is
// checked against the device allocation table (abort with a report naming the operand).
#include <cstdio>
#include <cstring>
#include <vector>

#include "emu_internal.h"

namespace {

using Status = int;
constexpr Status SUCCESS = 0, NOT_INITIALIZED = 1, INVALID_VALUE = 7, NOT_SUPPORTED = 15;
constexpr int R_32F = 0, R_16BF = 14;
constexpr int OP_N = 0;

struct Handle {
    void* stream = nullptr;
    int pointer_mode = 0;  // CUBLAS_POINTER_MODE_HOST
    int math_mode = 0;
};

float load(const void* base, int type, std::size_t i) {
    if (type == R_32F) return static_cast<const float*>(base)[i];
    const uint16_t h = static_cast<const uint16_t*>(base)[i];
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);  // quiet NaN
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

std::size_t elem(int type) { return type == R_32F ? 4 : 2; }

// Bytes spanned by a column-major rows x cols matrix with leading dimension ld.
std::size_t extent(long rows, long cols, long ld, int type) {
    if (rows <= 0 || cols <= 0) return 0;
    return ((std::size_t)(cols - 1) * (std::size_t)ld + (std::size_t)rows) * elem(type);
}

}  // namespace

namespace emu {

int gemm_run(const GemmArgs& g, const char* api) {
    const int ta = g.ta, tb = g.tb, m = g.m, n = g.n, k = g.k;
    const int lda = g.lda, ldb = g.ldb, ldc = g.ldc, ldd = g.ldd;
    auto bad = [&](const char* why) {
        fprintf(stderr, "cuda-emu: %s: CUBLAS_STATUS_INVALID_VALUE: %s (m=%d n=%d k=%d lda=%d "
                "ldb=%d ldc=%d ldd=%d transa=%d transb=%d)\n", api, why, m, n, k, lda, ldb, ldc,
                ldd, ta, tb);
        return INVALID_VALUE;
    };
    if (ta < 0 || ta > 2 || tb < 0 || tb > 2) return bad("bad operation");
    if (m < 0 || n < 0 || k < 0) return bad("negative dimension");
    const int arows = ta == OP_N ? m : k, acols = ta == OP_N ? k : m;
    const int brows = tb == OP_N ? k : n, bcols = tb == OP_N ? n : k;
    if (lda < (arows > 1 ? arows : 1)) return bad("lda < rows of A as stored");
    if (ldb < (brows > 1 ? brows : 1)) return bad("ldb < rows of B as stored");
    if (ldc < (m > 1 ? m : 1)) return bad("ldc < m");
    if (ldd < (m > 1 ? m : 1)) return bad("ldd < m");
    const int atype = g.atype, btype = g.btype, ctype = g.ctype, dtype = g.dtype;
    const bool types_ok = atype == btype && (atype == R_32F || atype == R_16BF) &&
                          (ctype == R_32F || (ctype == R_16BF && atype == R_16BF)) &&
                          dtype == ctype && (!g.bias || g.biastype == dtype);
    const int compute = g.compute;
    if (!types_ok || (compute != 68 && compute != 74 && compute != 75 && compute != 76 &&
                      compute != 77 && compute != 0)) {
        fprintf(stderr, "cuda-emu: %s: CUBLAS_STATUS_NOT_SUPPORTED: A type %d, B type %d, C type "
                "%d, D type %d, bias type %d, compute type %d\n", api, atype, btype, ctype, dtype,
                g.bias ? g.biastype : -1, compute);
        return NOT_SUPPORTED;
    }
    if (m == 0 || n == 0) return SUCCESS;
    const float alpha = g.alpha, beta = g.beta;
    if (k > 0) {
        check_range(api, "A", reinterpret_cast<uintptr_t>(g.a), extent(arows, acols, lda, atype));
        check_range(api, "B", reinterpret_cast<uintptr_t>(g.b), extent(brows, bcols, ldb, btype));
    }
    if (beta != 0.0f)
        check_range(api, "C", reinterpret_cast<uintptr_t>(g.c), extent(m, n, ldc, ctype));
    check_range(api, g.c == g.d ? "C" : "D", reinterpret_cast<uintptr_t>(g.d),
                extent(m, n, ldd, dtype));
    if (g.bias) check_range(api, "bias", reinterpret_cast<uintptr_t>(g.bias), extent(m, 1, m, dtype));

    // Pack op(A) row-major [m][k] and op(B) as [k][n] so that the inner loop runs over
    // contiguous j; each D(i, j) is still summed over p = 0..k-1 in order.
    std::vector<float> ap((std::size_t)m * k), bp((std::size_t)k * n), acc((std::size_t)n);
    for (int i = 0; i < m; ++i)
        for (int p = 0; p < k; ++p)
            ap[(std::size_t)i * k + p] = load(
                g.a, atype, ta == OP_N ? (std::size_t)p * lda + i : (std::size_t)i * lda + p);
    for (int p = 0; p < k; ++p)
        for (int j = 0; j < n; ++j)
            bp[(std::size_t)p * n + j] = load(
                g.b, btype, tb == OP_N ? (std::size_t)j * ldb + p : (std::size_t)p * ldb + j);
    for (int i = 0; i < m; ++i) {
        float* accp = acc.data();
        for (int j = 0; j < n; ++j) accp[j] = 0.0f;
        for (int p = 0; p < k; ++p) {
            const float av = ap[(std::size_t)i * k + p];
            const float* brow = bp.data() + (std::size_t)p * n;
            for (int j = 0; j < n; ++j) accp[j] += av * brow[j];
        }
        // the epilogue in cuBLASLt's order: alpha AB + beta C, then the bias (over rows i),
        // rounded once into D
        const float bi = g.bias ? load(g.bias, dtype, (std::size_t)i) : 0.0f;
        for (int j = 0; j < n; ++j) {
            float v = alpha * accp[j];
            if (beta != 0.0f) v += beta * load(g.c, ctype, (std::size_t)j * ldc + i);
            if (g.bias) v += bi;
            const std::size_t di = (std::size_t)j * ldd + i;
            if (dtype == R_32F)
                static_cast<float*>(g.d)[di] = v;
            else
                static_cast<uint16_t*>(g.d)[di] = to_bf16(v);
        }
    }
    return SUCCESS;
}

}  // namespace emu

namespace {

Status gemm(Handle* h, int ta, int tb, int m, int n, int k, const void* alpha_p, const void* a,
            int atype, int lda, const void* b, int btype, int ldb, const void* beta_p, void* c,
            int ctype, int ldc, int compute, const char* api) {
    if (!h) return NOT_INITIALIZED;
    if (h->pointer_mode != 0 && m > 0 && n > 0) {
        emu::check_range(api, "alpha", reinterpret_cast<uintptr_t>(alpha_p), 4);
        emu::check_range(api, "beta", reinterpret_cast<uintptr_t>(beta_p), 4);
    }
    emu::GemmArgs g{};
    g.ta = ta, g.tb = tb, g.m = m, g.n = n, g.k = k;
    g.alpha = *static_cast<const float*>(alpha_p);
    g.beta = *static_cast<const float*>(beta_p);
    g.a = a, g.atype = atype, g.lda = lda, g.b = b, g.btype = btype, g.ldb = ldb;
    g.c = c, g.ctype = ctype, g.ldc = ldc, g.d = c, g.dtype = ctype, g.ldd = ldc;
    g.compute = compute;
    return emu::gemm_run(g, api);
}

}  // namespace

EMU_API Status cublasCreate_v2(void** h) { return emu::create_object<Handle>(h); }
EMU_API Status cublasDestroy_v2(void* h) { return emu::destroy_object<Handle>(h); }
EMU_API Status cublasGetVersion_v2(void*, int* v) {
    if (!v) return INVALID_VALUE;
    *v = 130000;
    return SUCCESS;
}
// A handle attribute's setter and getter (stream, pointer mode, math mode): a null handle is
// NOT_INITIALIZED like cuBLAS, a null out-pointer of a getter is ignored.
#define HANDLE_ATTR(SET, GET, TYPE, FIELD)                       \
    EMU_API Status SET(void* h, TYPE v) {                        \
        if (!h) return NOT_INITIALIZED;                          \
        static_cast<Handle*>(h)->FIELD = v;                      \
        return SUCCESS;                                          \
    }                                                            \
    EMU_API Status GET(void* h, TYPE* v) {                       \
        if (!h) return NOT_INITIALIZED;                          \
        if (v) *v = static_cast<Handle*>(h)->FIELD;              \
        return SUCCESS;                                          \
    }
HANDLE_ATTR(cublasSetStream_v2, cublasGetStream_v2, void*, stream)
HANDLE_ATTR(cublasSetPointerMode_v2, cublasGetPointerMode_v2, int, pointer_mode)
HANDLE_ATTR(cublasSetMathMode, cublasGetMathMode, int, math_mode)
#undef HANDLE_ATTR
EMU_API Status cublasSetWorkspace_v2(void*, void*, std::size_t) { return SUCCESS; }
EMU_API const char* cublasGetStatusName(Status s) {
    switch (s) {
        case SUCCESS: return "CUBLAS_STATUS_SUCCESS";
        case NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
        case INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
        case NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
        default: return "CUBLAS_STATUS_INTERNAL_ERROR";
    }
}
EMU_API const char* cublasGetStatusString(Status s) { return cublasGetStatusName(s); }

EMU_API Status cublasGemmEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha,
                            const void* a, int atype, int lda, const void* b, int btype, int ldb,
                            const void* beta, void* c, int ctype, int ldc, int compute, int) {
    Handle* hd = static_cast<Handle*>(h);
    if (hd && hd->pointer_mode == 0 && emu::capturing(hd->stream)) {
        // host-pointer alpha / beta are read at the call, as cuBLAS does when captured
        const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
        Handle copy = *hd;
        emu::record(hd->stream, [=]() mutable {
            Status st = gemm(&copy, ta, tb, m, n, k, &al, a, atype, lda, b, btype, ldb, &be, c,
                             ctype, ldc, compute, "cublasGemmEx (graph replay)");
            if (st != SUCCESS) emu::fatal("cublasGemmEx failed in a graph replay (status %d)", st);
        });
        return SUCCESS;
    }
    return gemm(hd, ta, tb, m, n, k, alpha, a, atype, lda, b, btype, ldb, beta, c, ctype, ldc,
                compute, "cublasGemmEx");
}
EMU_API Status cublasSgemm_v2(void* h, int ta, int tb, int m, int n, int k, const float* alpha,
                              const float* a, int lda, const float* b, int ldb, const float* beta,
                              float* c, int ldc) {
    return gemm(static_cast<Handle*>(h), ta, tb, m, n, k, alpha, a, R_32F, lda, b, R_32F, ldb,
                beta, c, R_32F, ldc, 68, "cublasSgemm");
}
EMU_API Status cublasGemmStridedBatchedEx(void* h, int ta, int tb, int m, int n, int k,
                                          const void* alpha, const void* a, int atype, int lda,
                                          long long sa, const void* b, int btype, int ldb,
                                          long long sb, const void* beta, void* c, int ctype,
                                          int ldc, long long sc, int batch, int compute, int) {
    for (int i = 0; i < batch; ++i) {
        Status s = gemm(static_cast<Handle*>(h), ta, tb, m, n, k, alpha,
                        static_cast<const char*>(a) + i * sa * (long long)elem(atype), atype, lda,
                        static_cast<const char*>(b) + i * sb * (long long)elem(btype), btype, ldb,
                        beta, static_cast<char*>(c) + i * sc * (long long)elem(ctype), ctype, ldc,
                        compute, "cublasGemmStridedBatchedEx");
        if (s != SUCCESS) return s;
    }
    return SUCCESS;
}
EMU_API Status cublasSgemmStridedBatched(void* h, int ta, int tb, int m, int n, int k,
                                         const float* alpha, const float* a, int lda, long long sa,
                                         const float* b, int ldb, long long sb, const float* beta,
                                         float* c, int ldc, long long sc, int batch) {
    return cublasGemmStridedBatchedEx(h, ta, tb, m, n, k, alpha, a, R_32F, lda, sa, b, R_32F, ldb,
                                      sb, beta, c, R_32F, ldc, sc, batch, 68, 0);
}
// Resolved by cudarc but not used by twinkle: present so that lookups succeed.
EMU_API Status cublasDgemm_v2() { return NOT_SUPPORTED; }
EMU_API Status cublasDgemmStridedBatched() { return NOT_SUPPORTED; }
EMU_API Status cublasSgemv_v2() { return NOT_SUPPORTED; }
EMU_API Status cublasDgemv_v2() { return NOT_SUPPORTED; }
EMU_API Status cublasSasum_v2() { return NOT_SUPPORTED; }
EMU_API Status cublasDasum_v2() { return NOT_SUPPORTED; }
EMU_API Status cublasGemmGroupedBatchedEx() { return NOT_SUPPORTED; }
