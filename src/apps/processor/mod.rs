//! The processor application (`import_path: processor`): the native protocol's remote datasets,
//! data loaders and input processors (`twinkle_client.dataset.Dataset`, `DataLoader`,
//! `InputProcessor`), as a FIXED Rust registry — nothing is ever executed from a class or function
//! name (`specs/twinkle-native-protocol.md` §1.3, §4).
//!
//! * [`registry`]: the classes, the per-owner processors, deadlines and limits;
//! * [`dataset`]: `dataset.Dataset` (`set_template`, `map`, `filter`, `encode`, `__len__`,
//!   `__getitem__`), rows read by [`data`] from local files and local hub caches;
//! * [`preprocess`]: the built-in preprocessors and filters;
//! * [`dataloader`]: `dataloader.DataLoader` (batches, seeded shuffle, 410 at the end, state);
//! * [`http`]: the Gen-1 (`{prefix}/create|call|heartbeat`) and Gen-2
//!   (`{prefix}/twinkle/create|call|heartbeat`) routes.

pub mod data;
pub mod dataloader;
pub mod dataset;
pub mod http;
mod kwargs;
pub mod preprocess;
pub mod registry;

pub use http::{ProcessorApp, routes, run};
pub use registry::{Limits, Registry};

/// One live processor object.
pub enum Processor {
    Dataset(dataset::Dataset),
    DataLoader(dataloader::DataLoader),
    /// `processor.InputProcessor`: `__call__` is the identity (the engine packs without padding).
    InputProcessor,
}

#[cfg(test)]
mod tests;
