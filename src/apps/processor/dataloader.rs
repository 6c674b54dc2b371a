//! `dataloader.DataLoader`: batches over a remote [`Dataset`] of the same owner.
//!
//! `__iter__` starts an epoch (the first call epoch 0, every later one the next epoch) and
//! answers `"ok"`; `__next__` returns the next batch (a list of rows) or 410 Gone at the end,
//! which the clients turn into `StopIteration`. With `shuffle`, each epoch's order is a
//! Fisher–Yates permutation drawn from a SplitMix64 stream seeded by `(seed, epoch)`: the same
//! seed gives the same batches on every server. `skip_consumed_samples(n)` /
//! `resume_from_checkpoint(n)` position the next `__iter__` at epoch `n / len`, row `n % len`;
//! `get_state` reports `{consumed_train_samples, epoch, cursor, seed}`.

use std::sync::{Arc, Mutex};

use serde_json::{Map, Value, json};

use super::Processor;
use super::dataset::poisoned;
use super::kwargs::{opt_bool, opt_u64};
use crate::engine::rng::SplitMix64;
use crate::protocol::twinkle::TwinkleError;

/// Default shuffle seed (upstream's `DataLoader` seeds torch's sampler with 42 too).
pub const DEFAULT_SEED: u64 = 42;

/// A data loader processor.
pub struct DataLoader {
    /// The dataset processor (kept alive while the loader lives).
    pub dataset: Arc<Mutex<Processor>>,
    pub dataset_id: String,
    pub batch_size: usize,
    pub shuffle: bool,
    pub seed: u64,
    pub drop_last: bool,
    epoch: u64,
    cursor: usize,
    order: Vec<usize>,
    started: bool,
    consumed: u64,
    /// Set by `skip_consumed_samples`: where the next `__iter__` starts.
    resume: Option<(u64, usize)>,
}

/// The deterministic permutation of `0..n` for `(seed, epoch)`.
pub fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

impl DataLoader {
    /// `DataLoader(dataset=<pid>, batch_size, shuffle?, seed?, drop_last?)`; `dataset` is
    /// already resolved to the dataset processor.
    pub fn create(
        dataset: Arc<Mutex<Processor>>,
        dataset_id: String,
        kw: &Map<String, Value>,
    ) -> Result<Self, TwinkleError> {
        let batch_size = opt_u64(kw, "batch_size")?.unwrap_or(1);
        if batch_size == 0 || batch_size > 1 << 20 {
            return Err(TwinkleError::bad(format!(
                "batch_size must be in 1..=1048576, got {batch_size}"
            )));
        }
        for key in ["sampler", "batch_sampler", "collate_fn", "num_workers_per_device"] {
            if kw.get(key).is_some_and(|v| !v.is_null() && v != &json!(0)) {
                return Err(TwinkleError::bad(format!(
                    "DataLoader({key}=…) is not supported on this server"
                )));
            }
        }
        Ok(DataLoader {
            dataset,
            dataset_id,
            batch_size: batch_size as usize,
            shuffle: opt_bool(kw, "shuffle")?,
            seed: opt_u64(kw, "seed")?.unwrap_or(DEFAULT_SEED),
            drop_last: opt_bool(kw, "drop_last")?,
            epoch: 0,
            cursor: 0,
            order: Vec::new(),
            started: false,
            consumed: 0,
            resume: None,
        })
    }

    fn dataset_len(&self) -> Result<usize, TwinkleError> {
        match &*self.dataset.lock().map_err(|_| poisoned())? {
            Processor::Dataset(d) => Ok(d.rows.len()),
            _ => Err(TwinkleError::Internal("a DataLoader's dataset is not a Dataset".into())),
        }
    }

    /// Dispatches method `function`.
    pub fn call(
        &mut self,
        id: &str,
        function: &str,
        kw: &Map<String, Value>,
    ) -> Result<Value, TwinkleError> {
        match function {
            "__len__" => {
                let n = self.dataset_len()?;
                let b = self.batch_size;
                Ok(json!(if self.drop_last { n / b } else { n.div_ceil(b) }))
            }
            "__iter__" => {
                self.start_epoch()?;
                Ok(json!("ok"))
            }
            "__next__" => self.next_batch(id),
            "get_state" => Ok(json!({
                "consumed_train_samples": self.consumed,
                "epoch": self.epoch,
                "cursor": self.cursor,
                "seed": self.seed,
            })),
            "skip_consumed_samples" | "resume_from_checkpoint" => {
                let n = opt_u64(kw, "consumed_train_samples")?.ok_or_else(|| {
                    TwinkleError::bad(format!("{function} needs consumed_train_samples"))
                })?;
                let len = self.dataset_len()? as u64;
                self.resume = Some(match n.checked_div(len) {
                    Some(epoch) => (epoch, (n % len) as usize),
                    None => (0, 0),
                });
                self.consumed = n;
                self.started = false;
                Ok(Value::Null)
            }
            "set_processor" => Ok(Value::Null),
            other => Err(TwinkleError::bad(format!(
                "DataLoader.{other} is not available on this server; available: __len__, \
                 __iter__, __next__, get_state, skip_consumed_samples, resume_from_checkpoint, \
                 set_processor"
            ))),
        }
    }

    fn start_epoch(&mut self) -> Result<(), TwinkleError> {
        let n = self.dataset_len()?;
        if let Some((epoch, cursor)) = self.resume.take() {
            self.epoch = epoch;
            self.cursor = cursor;
        } else {
            if self.started {
                self.epoch += 1;
            }
            self.cursor = 0;
        }
        self.order =
            if self.shuffle { permutation(n, self.seed, self.epoch) } else { (0..n).collect() };
        self.started = true;
        Ok(())
    }

    fn next_batch(&mut self, id: &str) -> Result<Value, TwinkleError> {
        if !self.started {
            self.start_epoch()?;
        }
        let guard = self.dataset.lock().map_err(|_| poisoned())?;
        let Processor::Dataset(ds) = &*guard else {
            return Err(TwinkleError::Internal("a DataLoader's dataset is not a Dataset".into()));
        };
        let left = self.order.len().saturating_sub(self.cursor);
        if left == 0 || (self.drop_last && left < self.batch_size) {
            return Err(TwinkleError::Gone(format!(
                "DataLoader {id} is exhausted (epoch {}); call __iter__ for the next epoch",
                self.epoch
            )));
        }
        let take = left.min(self.batch_size);
        let batch: Vec<Value> = self.order[self.cursor..self.cursor + take]
            .iter()
            .filter_map(|&i| ds.rows.get(i).cloned())
            .collect();
        self.cursor += take;
        self.consumed += take as u64;
        Ok(Value::Array(batch))
    }
}
