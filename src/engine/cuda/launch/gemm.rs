//! Row-major GEMMs through cuBLAS (`cublasGemmEx`, f32 compute): bf16 or f32 inputs, output
//! bf16 or f32. The engine's matrices are row-major; cuBLAS is column-major, so C = A op(B) is
//! issued as C^T = op(B)^T A^T, which reads every operand in place (no transposes materialised).

use std::ffi::c_void;

use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

use super::{Dtype, int, need_len, shape_err};
use crate::engine::cuda::profile::Cost;
use crate::engine::cuda::{CudaDevice, CudaError};

/// How B is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BLayout {
    /// B stored [n, k]: C = A B^T (a linear layer `x W^T` with HF weight [out, in]).
    Nk,
    /// B stored [k, n]: C = A B (e.g. `dx = dy W` in a linear layer's backward).
    Kn,
}

fn data_type<T: Dtype>() -> cudaDataType_t {
    if T::IS_BF16 { cudaDataType_t::CUDA_R_16BF } else { cudaDataType_t::CUDA_R_32F }
}

/// C[m, n] = alpha * A[m, k] op(B) + beta * C, all row-major. Inputs share one dtype `T`; the
/// output `O` may be `T` or f32 (e.g. f32 logits from bf16 activations). f32 -> bf16 output is
/// rejected (cuBLAS has no such combination).
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Dtype, O: Dtype>(
    dev: &CudaDevice,
    c: &mut CudaViewMut<'_, O>,
    a: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    b_layout: BLayout,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    beta: f32,
) -> Result<(), CudaError> {
    let kn = "cublasGemmEx";
    if !T::IS_BF16 && O::IS_BF16 {
        return Err(shape_err(kn, "f32 inputs with a bf16 output are not supported"));
    }
    need_len(kn, "A", a.len(), m * k)?;
    need_len(kn, "B", b.len(), k * n)?;
    need_len(kn, "C", c.len(), m * n)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        return Err(shape_err(kn, "k = 0: scale C by beta with scale_fwd instead"));
    }
    let (mi, ni, ki) = (int(kn, "m", m)?, int(kn, "n", n)?, int(kn, "k", k)?);
    let (transa, lda) = match b_layout {
        BLayout::Nk => (cublasOperation_t::CUBLAS_OP_T, ki),
        BLayout::Kn => (cublasOperation_t::CUBLAS_OP_N, ni),
    };
    let stream = dev.stream();
    let flops = 2.0 * (m * n * k) as f64;
    let out_passes = if beta == 0.0 { 1 } else { 2 };
    let bytes =
        (m * k + k * n) * std::mem::size_of::<T>() + m * n * std::mem::size_of::<O>() * out_passes;
    let cost = Some(Cost::new(flops, bytes as f64));
    let (b_ptr, _rb) = b.device_ptr(stream);
    let (a_ptr, _ra) = a.device_ptr(stream);
    let (c_ptr, _rc) = c.device_ptr_mut(stream);
    // SAFETY: A is [m, k], B [n, k] or [k, n], C [m, n] (lengths checked above), so with the
    // column-major reading (C^T = op(B)^T A^T; lda = k or n, ldb = k, ldc = n) every access is in
    // bounds; alpha/beta are f32 as CUBLAS_COMPUTE_32F requires; the handle is bound to `stream`
    // and the SyncOnDrop guards keep the buffers' events ordered around the call.
    dev.profiler().around(stream, kn, cost, || unsafe {
        gemm_ex(
            *dev.blas().handle(),
            transa,
            cublasOperation_t::CUBLAS_OP_N,
            ni,
            mi,
            ki,
            (&alpha) as *const f32 as *const c_void,
            b_ptr as *const c_void,
            data_type::<T>(),
            lda,
            a_ptr as *const c_void,
            data_type::<T>(),
            ki,
            (&beta) as *const f32 as *const c_void,
            c_ptr as *mut c_void,
            data_type::<O>(),
            ni,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .map_err(CudaError::cublas(format!("gemm {m}x{n}x{k} ({b_layout:?})")))
    })
}
