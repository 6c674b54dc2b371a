//! The per-device workspace: a pool of device buffers keyed by (element type, length) from which
//! every per-op intermediate (activations, their gradients, head chunks, LoRA intermediates) is
//! taken, instead of a fresh `cuMemAllocAsync` + `cuMemsetD8Async` per op.
//!
//! Design:
//! - [`Workspace::take`] hands out a [`Buf`] of exactly `n` elements whose contents are
//!   unspecified (stale data of an earlier use, or fresh memory). Callers use it only for
//!   outputs that a kernel or GEMM (beta = 0) overwrites completely. [`Workspace::take_zeroed`]
//!   adds one memset and is for the buffers a kernel accumulates into (atomics, `acc_fwd`
//!   into a fresh buffer, beta = 1 GEMM chains).
//! - A [`Buf`] goes back to the pool when dropped. That is sound with one stream: every kernel
//!   that used the buffer was enqueued before the drop, and whoever takes it next enqueues its
//!   work after them on the same stream, so the reuse is stream-ordered exactly like
//!   `cuMemFreeAsync` followed by `cuMemAllocAsync`. No host synchronisation is needed.
//! - Exact lengths (no size classes) keep every kernel's view of a buffer exactly as long as the
//!   tensor, so the launchers' length checks and a range-checking emulator see the true sizes.
//!   Training steps repeat their shapes, so after the first step a forward/backward allocates
//!   nothing from the driver.
//! - Bounded growth: [`Workspace::end_pass`] (called at the end of each `forward_backward` and
//!   each cached forward) frees the cached buffers of every (type, length) that the pass did not
//!   take, so batches of varying shapes do not accumulate dead buffers; the freed memory stays in
//!   the driver's memory pool (its release threshold is raised at device creation).
//! - A pool can be redirected to another ([`Workspace::redirect`]): a captured decode step
//!   (`graph.rs`) takes every intermediate from its own pool, whose buffers the CUDA graph
//!   keeps using at fixed addresses for as long as it lives.
//! - `TWINKLE_CUDA_POISON=1` fills every buffer handed out by [`Workspace::take`] with 0xFF
//!   bytes (NaN in f32 and bf16, -1 in i32), so a read of an element that should have been
//!   written first shows up in the tests instead of silently reusing stale values.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, ValidAsZeroBits, result as dres,
};

use super::CudaError;

type Key = (TypeId, usize);

#[derive(Default)]
struct Pool {
    /// Free buffers per (type, length); each entry is a `CudaSlice<T>` of that key.
    free: HashMap<Key, Vec<Box<dyn Any + Send>>>,
    /// Keys taken during the current pass.
    used: std::collections::HashSet<Key>,
}

/// A pool of reusable device buffers for one device's stream (see the module docs).
pub(crate) struct Workspace {
    stream: Arc<CudaStream>,
    pool: Mutex<Pool>,
    poison: bool,
    /// While set, `take` serves from this pool instead.
    redirect: Mutex<Option<Arc<Workspace>>>,
}

impl Workspace {
    pub(crate) fn new(stream: Arc<CudaStream>) -> Arc<Self> {
        let poison = std::env::var("TWINKLE_CUDA_POISON").is_ok_and(|v| v == "1");
        Arc::new(Workspace { stream, pool: Mutex::default(), poison, redirect: Mutex::default() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A buffer of `n` elements (at least 1) with unspecified contents: only for outputs that
    /// are overwritten completely before they are read.
    pub(crate) fn take<T: DeviceRepr + Send + 'static>(
        self: &Arc<Self>,
        n: usize,
    ) -> Result<Buf<T>, CudaError> {
        let target = self.redirect.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(w) = target {
            return w.take(n);
        }
        // cudarc rejects zero-length allocations on some drivers; keep every buffer non-empty.
        let n = n.max(1);
        let key = (TypeId::of::<T>(), n);
        let cached = {
            let mut pool = self.lock();
            pool.used.insert(key);
            pool.free.get_mut(&key).and_then(Vec::pop)
        };
        let mut slice = match cached.and_then(|b| b.downcast::<CudaSlice<T>>().ok()) {
            Some(s) => *s,
            // SAFETY: the memory is uninitialised; callers of `take` overwrite it before any
            // read (module docs), and `take_zeroed` clears it.
            None => unsafe { self.stream.alloc::<T>(n) }
                .map_err(CudaError::driver(format!("allocating {n} elements")))?,
        };
        if self.poison {
            self.fill(&mut slice, 0xff)?;
        }
        Ok(Buf { slice: Some(slice), ws: self.clone() })
    }

    /// A zeroed buffer of `n` elements (for accumulation targets).
    pub(crate) fn take_zeroed<T: DeviceRepr + ValidAsZeroBits + Send + 'static>(
        self: &Arc<Self>,
        n: usize,
    ) -> Result<Buf<T>, CudaError> {
        let mut b = self.take::<T>(n)?;
        self.stream.memset_zeros(&mut *b).map_err(CudaError::driver("zeroing a buffer"))?;
        Ok(b)
    }

    fn fill<T: DeviceRepr>(&self, s: &mut CudaSlice<T>, byte: u8) -> Result<(), CudaError> {
        let bytes = s.len() * std::mem::size_of::<T>();
        let (ptr, _record) = s.device_ptr_mut(&self.stream);
        // SAFETY: `ptr` addresses `bytes` bytes of this live allocation, and the memset is
        // enqueued on the stream that orders every use of the buffer.
        unsafe { dres::memset_d8_async(ptr, byte, bytes, self.stream.cu_stream()) }
            .map_err(CudaError::driver("poisoning a workspace buffer"))
    }

    fn give_back<T: DeviceRepr + Send + 'static>(&self, s: CudaSlice<T>) {
        let key = (TypeId::of::<T>(), s.len());
        self.lock().free.entry(key).or_default().push(Box::new(s));
    }

    /// Ends a pass: frees the cached buffers of every (type, length) not taken since the last
    /// call (they go back to the driver's pool via `cuMemFreeAsync`).
    pub(crate) fn end_pass(&self) {
        let dropped: Vec<Box<dyn Any + Send>> = {
            let mut pool = self.lock();
            let used = std::mem::take(&mut pool.used);
            let stale: Vec<Key> = pool.free.keys().filter(|k| !used.contains(k)).copied().collect();
            stale.iter().filter_map(|k| pool.free.remove(k)).flatten().collect()
        };
        // freed outside the lock: each drop is a driver call
        drop(dropped);
    }

    /// Serves every `take` from `to` until the guard drops.
    pub(crate) fn redirect(&self, to: &Arc<Workspace>) -> Redirect<'_> {
        *self.redirect.lock().unwrap_or_else(|p| p.into_inner()) = Some(to.clone());
        Redirect(self)
    }

    /// A guard that ends the pass when dropped (on every return path of a pass).
    pub(crate) fn pass(&self) -> PassEnd<'_> {
        PassEnd(self)
    }

    /// Frees every cached buffer (e.g. before loading another model).
    pub(crate) fn clear(&self) {
        let all = std::mem::take(&mut self.lock().free);
        drop(all);
    }

    /// Number of free cached buffers (diagnostics).
    pub(crate) fn cached_buffers(&self) -> usize {
        self.lock().free.values().map(Vec::len).sum()
    }
}

/// Ends its workspace's pass on drop (see [`Workspace::pass`]).
pub(crate) struct PassEnd<'a>(&'a Workspace);

impl Drop for PassEnd<'_> {
    fn drop(&mut self) {
        self.0.end_pass();
    }
}

/// Ends a [`Workspace::redirect`] on drop.
pub(crate) struct Redirect<'a>(&'a Workspace);

impl Drop for Redirect<'_> {
    fn drop(&mut self) {
        *self.0.redirect.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// A device buffer on loan from a [`Workspace`]; returns there on drop. Derefs to the
/// `CudaSlice`, so it is used exactly like one.
pub(crate) struct Buf<T: DeviceRepr + Send + 'static> {
    slice: Option<CudaSlice<T>>,
    ws: Arc<Workspace>,
}

impl<T: DeviceRepr + Send + 'static> Buf<T> {
    /// Detaches the buffer from the pool (it is freed normally when dropped): for results that
    /// leave the engine, such as the logits returned by `forward_cached_device`.
    pub(crate) fn into_slice(mut self) -> CudaSlice<T> {
        match self.slice.take() {
            Some(s) => s,
            None => unreachable!("a Buf holds its slice until dropped"),
        }
    }
}

impl<T: DeviceRepr + Send + 'static> Deref for Buf<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        match &self.slice {
            Some(s) => s,
            None => unreachable!("a Buf holds its slice until dropped"),
        }
    }
}

impl<T: DeviceRepr + Send + 'static> DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        match &mut self.slice {
            Some(s) => s,
            None => unreachable!("a Buf holds its slice until dropped"),
        }
    }
}

impl<T: DeviceRepr + Send + 'static> Drop for Buf<T> {
    fn drop(&mut self) {
        if let Some(s) = self.slice.take() {
            self.ws.give_back(s);
        }
    }
}
