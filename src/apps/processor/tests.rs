//! Unit tests of the processor registry.
