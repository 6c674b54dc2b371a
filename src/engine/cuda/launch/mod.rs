//! Kernel launchers.
