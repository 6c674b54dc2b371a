//! Inputs shared by the CPU kernels' unit tests (`backend/tests.rs`, `head_tests.rs`).

use crate::engine::synth::SynthRng;

/// Deterministic pseudo-random values in [-1, 1): the engine's input LCG seeded with `seed`,
/// its first value skipped (the tests' inputs were drawn that way; spread, not quality).
pub(crate) fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SynthRng(seed);
    rng.next_f32();
    rng.vec(n, 1.0)
}
