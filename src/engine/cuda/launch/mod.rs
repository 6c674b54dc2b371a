//! Kernel launchers, one per kernel (llm.c's kernel + launcher pairs): each checks shapes and
//! returns a typed error, owns its grid / block / shared-memory choice, and enqueues on the
//! device stream. Inputs are `CudaView`s, outputs `CudaViewMut`s (take them with `.as_view()`,
//! `.slice(..)`); nothing here synchronises.
//!
//! Kernel symbols are `<op>_<fwd|bwd>_<dtype>`; [`Dtype`] picks the suffix.

mod attention;
mod decode;
mod elementwise;
mod flash;
mod gemm;
mod gemm_lt;
mod layers;
mod lora;
mod loss;
mod rope;
mod sampling;
mod views;

pub use attention::{AttentionShape, attention_bwd, attention_fwd};
pub use decode::{DecodeShape, decode_attention_fwd, decode_workspace_len, kv_append_fwd};
pub use elementwise::{
    acc_fwd, add_fwd, bias_add_fwd, cast_fwd, copy_cols_fwd, scale_fwd, sumsq_fwd,
};
pub use gemm::{BLayout, matmul};
pub use gemm_lt::{BlasLt, matmul_lt};
pub use layers::{RowMap, embedding_fwd, rmsnorm_bwd, rmsnorm_fwd, swiglu_bwd, swiglu_fwd};
pub use lora::{
    LoraSegs, LoraTensor, MAX_RANK as LORA_MAX_RANK, SegCall, SegOp, TAB_STRIDE as LORA_TAB_STRIDE,
    lora_seg,
};
pub use loss::{
    AdamStep, LossVariant, RlInputs, XentAcc, XentRows, adamw_fwd, loss_fwd, loss_term_fwd,
    xent_bwd, xent_bwd_inplace, xent_finish_fwd, xent_fwd,
};
pub(crate) use loss::{TensorTable, adamw_multi_fwd, sumsq_multi_fwd};
pub use rope::{RopeDir, RopeDst, RopeIn, RopeShape, rope};
pub use sampling::{argmax_fwd, sample_exp_fwd, sample_fwd};
pub use views::{Kv, Logits, Picks, Qkv};

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{
    CudaFunction, CudaView, CudaViewMut, DeviceRepr, DriverError, LaunchArgs, LaunchConfig,
    PushKernelArg,
};
use half::bf16;

use super::profile::Cost;
use super::{CudaDevice, CudaError};

/// Storage dtypes the kernels are instantiated for.
pub trait Dtype: DeviceRepr + Copy + Send + Sync + 'static {
    /// Selects the `_bf16` symbol instead of `_f32`.
    const IS_BF16: bool;
}

impl Dtype for f32 {
    const IS_BF16: bool = false;
}

impl Dtype for bf16 {
    const IS_BF16: bool = true;
}

/// `sym!(T, "rmsnorm_fwd")` is `"rmsnorm_fwd_bf16"` or `"rmsnorm_fwd_f32"`.
macro_rules! sym {
    ($t:ty, $op:literal) => {
        if <$t as $crate::engine::cuda::launch::Dtype>::IS_BF16 {
            concat!($op, "_bf16")
        } else {
            concat!($op, "_f32")
        }
    };
}
pub(crate) use sym;

/// Threads per block of the grid-stride elementwise kernels.
const EW_BLOCK: u32 = 256;
/// Grid cap for grid-stride loops: enough blocks to fill any current GPU several times over.
const EW_MAX_BLOCKS: usize = 8192;

pub(crate) fn shape_err(kernel: &'static str, msg: impl Into<String>) -> CudaError {
    CudaError::Shape { kernel, msg: msg.into() }
}

/// `v` as a kernel `int`.
pub(crate) fn int(kernel: &'static str, name: &str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| shape_err(kernel, format!("{name} = {v} exceeds i32::MAX")))
}

/// `v` as a kernel `long long`.
pub(crate) fn long(kernel: &'static str, name: &str, v: usize) -> Result<i64, CudaError> {
    i64::try_from(v).map_err(|_| shape_err(kernel, format!("{name} = {v} exceeds i64::MAX")))
}

/// A buffer must hold exactly `want` elements.
pub(crate) fn need_len(
    kernel: &'static str,
    name: &str,
    have: usize,
    want: usize,
) -> Result<(), CudaError> {
    if have == want {
        Ok(())
    } else {
        Err(shape_err(kernel, format!("{name} has {have} elements, expected {want}")))
    }
}

/// `n` elements through a grid-stride loop.
pub(crate) fn grid_stride(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(EW_BLOCK as usize).clamp(1, EW_MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (EW_BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// `n` as a grid dimension (blocks along x may number up to 2^31 - 1, y and z up to 65535).
pub(crate) fn grid_dim(
    kernel: &'static str,
    name: &str,
    n: usize,
    max: u32,
) -> Result<u32, CudaError> {
    u32::try_from(n)
        .ok()
        .filter(|&v| v <= max)
        .ok_or_else(|| shape_err(kernel, format!("{name} = {n} exceeds the grid limit {max}")))
}

fn launch_err(kernel: &'static str) -> impl FnOnce(DriverError) -> CudaError {
    move |source| CudaError::Driver { context: format!("launching {kernel}"), source }
}

/// Dynamic shared memory a kernel may use without opting in.
const SMEM_DEFAULT: usize = 48 * 1024;

/// `grid` blocks of `threads` threads each, no dynamic shared memory.
pub(crate) fn blocks(grid: (u32, u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// One block of `threads` per row (`rows` along x).
pub(crate) fn row_cfg(
    kernel: &'static str,
    rows: usize,
    threads: u32,
) -> Result<LaunchConfig, CudaError> {
    Ok(blocks((grid_dim(kernel, "rows", rows, i32::MAX as u32)?, 1, 1), threads))
}

/// One thread per item, `threads` to a block; `what` names the block count in errors.
pub(crate) fn per_item_cfg(
    kernel: &'static str,
    what: &str,
    items: usize,
    threads: u32,
) -> Result<LaunchConfig, CudaError> {
    let n = items.div_ceil(threads as usize);
    Ok(blocks((grid_dim(kernel, what, n, i32::MAX as u32)?, 1, 1), threads))
}

/// One kernel of a `kernels/*.cu` file, loaded on a device: the one place that builds the
/// argument list, enqueues on the device stream and names the kernel in a launch error.
pub(crate) struct Kernel<'d> {
    dev: &'d CudaDevice,
    func: CudaFunction,
    name: &'static str,
    cost: Option<Cost>,
}

impl<'d> Kernel<'d> {
    /// Kernel `name` from `kernels/<file>` (compiled and loaded on first use).
    pub(crate) fn load(
        dev: &'d CudaDevice,
        file: &'static str,
        name: &'static str,
    ) -> Result<Self, CudaError> {
        Ok(Kernel { dev, func: dev.function(file, name)?, name, cost: None })
    }

    /// States what the launch costs (FLOPs, bytes), for `--explain`'s roofline.
    pub(crate) fn cost(mut self, flops: f64, bytes: f64) -> Self {
        self.cost = Some(Cost::new(flops, bytes));
        self
    }

    /// The kernel's symbol, for error messages.
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// Opts the kernel into `bytes` of dynamic shared memory where that is more than the
    /// default allows without asking.
    pub(crate) fn allow_smem(&self, bytes: usize) -> Result<(), CudaError> {
        if bytes > SMEM_DEFAULT {
            let v = int(self.name, "shared memory bytes", bytes)?;
            self.func
                .set_attribute(
                    CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    v,
                )
                .map_err(CudaError::driver(format!(
                    "{}: requesting {bytes} B of shared memory",
                    self.name
                )))?;
        }
        Ok(())
    }

    /// Enqueues the kernel with `cfg` and the parameter tuple `args` (views and `&` scalars,
    /// in signature order).
    ///
    /// # Safety
    /// As [`Kernel::launch_with`], `args` standing for the pushes.
    pub(crate) unsafe fn launch<'a>(
        &'a self,
        cfg: LaunchConfig,
        args: impl Args<'a>,
    ) -> Result<(), CudaError> {
        // SAFETY: forwarded contract.
        unsafe { self.launch_with(cfg, |l| args.push(l)) }
    }

    /// Enqueues the kernel with `cfg`; `args` pushes its parameters in signature order (for
    /// argument lists that depend on the call: optional or repeated parameters).
    ///
    /// # Safety
    /// `args` must push exactly the kernel's parameters, each of the type its signature names,
    /// and every index the kernel touches under `cfg` must lie inside the buffers pushed.
    pub(crate) unsafe fn launch_with<'a>(
        &'a self,
        cfg: LaunchConfig,
        args: impl FnOnce(&mut LaunchArgs<'a>),
    ) -> Result<(), CudaError> {
        let stream = self.dev.stream();
        let mut l = stream.launch_builder(&self.func);
        args(&mut l);
        self.dev.profiler().around(stream, self.name, self.cost, || {
            // SAFETY: the argument list and the bounds are this function's contract.
            unsafe { l.launch(cfg) }.map_err(launch_err(self.name))?;
            Ok(())
        })
    }
}

/// A kernel's whole parameter list as one tuple, so a launch names its arguments once instead
/// of through a chain of `.arg(..)` calls.
pub(crate) trait Args<'a> {
    /// Pushes the elements onto `l`, first to last.
    fn push(self, l: &mut LaunchArgs<'a>);
}

/// Implements [`Args`] for the tuples of every length up to the number of names given.
macro_rules! tuple_args {
    () => {};
    ($head:ident $($tail:ident)*) => {
        tuple_args!($($tail)*);
        impl<'a, $head, $($tail),*> Args<'a> for ($head, $($tail,)*)
        where
            LaunchArgs<'a>: PushKernelArg<$head> $(+ PushKernelArg<$tail>)*,
        {
            #[allow(non_snake_case)]
            fn push(self, l: &mut LaunchArgs<'a>) {
                let ($head, $($tail,)*) = self;
                l.arg($head);
                $(l.arg($tail);)*
            }
        }
    };
}
tuple_args!(A B C D E F G H I J K L M N O P);

/// Grid-stride launch of an elementwise kernel over the `n = out.len()` elements of `out`,
/// after checking that every named input holds `n` too; nothing is enqueued for `n = 0`.
///
/// # Safety
/// `kernel` must have the signature `(O* out, const I* in..., long long n)`, one input pointer
/// per entry of `ins` in that order, and touch indices `< n` only.
pub(crate) unsafe fn map_n<O: DeviceRepr, I: DeviceRepr>(
    dev: &CudaDevice,
    file: &'static str,
    kernel: &'static str,
    out: &mut CudaViewMut<'_, O>,
    ins: &[(&str, &CudaView<'_, I>)],
) -> Result<(), CudaError> {
    let n = out.len();
    for (name, x) in ins {
        need_len(kernel, name, x.len(), n)?;
    }
    if n == 0 {
        return Ok(());
    }
    let nn = long(kernel, "n", n)?;
    let bytes = n * (ins.len() * std::mem::size_of::<I>() + std::mem::size_of::<O>());
    let f = Kernel::load(dev, file, kernel)?.cost(n as f64, bytes as f64);
    // SAFETY: out and every input hold n elements (checked); the signature is the contract.
    unsafe {
        f.launch_with(grid_stride(n), |l| {
            l.arg(out);
            for (_, x) in ins {
                l.arg(*x);
            }
            l.arg(&nn);
        })
    }
}
