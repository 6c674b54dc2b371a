//! Cluster resources and the Ray-style scheduler (pure: no I/O, no clock).
