// Token embedding lookup. The embedding table is a frozen base weight, so there is no backward.
//
// defines: embedding_fwd_<dt>(out[N,D], table[V,D], ids[N], N, D, V)
// One block per token row; ids outside [0, V) produce a zero row (the launcher's caller validates
// ids on the host; the kernel must still never read out of bounds).

template <typename T>
__device__ void embedding_fwd_impl(T* out, const T* table, const int* ids, int n, int d, int v) {
    int row = blockIdx.x;
    if (row >= n) return;
    int id = ids[row];
    T* dst = out + (long long)row * d;
    if (id < 0 || id >= v) {
        for (int j = threadIdx.x; j < d; j += blockDim.x) st(dst + j, 0.0f);
        return;
    }
    const T* src = table + (long long)id * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) dst[j] = src[j];
}

#define EMBEDDING_DEF(T, DT)                                                                     \
    extern "C" __global__ void embedding_fwd_##DT(T* out, const T* table, const int* ids, int n, \
                                                  int d, int v) {                                \
        embedding_fwd_impl<T>(out, table, ids, n, d, v);                                         \
    }
FOR_F32_BF16(EMBEDDING_DEF)
