//! Counter-based random numbers (Philox4x32-10) so every sampling draw is a pure function of
//! `(seed, stream, draw index)` and a GPU kernel can reproduce the CPU's draws bit for bit.
//!
//! Layout of one draw, fixed here because CPU and CUDA must agree on it:
//! - key    = the 64-bit seed, split into `[low 32 bits, high 32 bits]`;
//! - counter = `[block low, block high, stream low, stream high]` where `block = draw / 4`;
//! - the draw is word `draw % 4` of the Philox output block;
//! - a 32-bit word `w` becomes the f32 `(w >> 8) * 2^-24`, which is exact and lies in `[0, 1)`.
//!
//! `stream` separates independent sequences under one seed (the sampler uses the sample's index
//! within its request), so `num_samples > 1` with a fixed seed gives different but reproducible
//! sequences.
//!
//! Host-only choices use the smaller [`SplitMix64`] stream instead.

/// Philox4x32 multipliers and Weyl key increments (Salmon et al., SC'11; Random123).
const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;
const PHILOX_ROUNDS: usize = 10;

/// One Philox4x32-10 block: 128 bits of output for a 128-bit counter under a 64-bit key.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..PHILOX_ROUNDS {
        if round > 0 {
            k[0] = k[0].wrapping_add(PHILOX_W0);
            k[1] = k[1].wrapping_add(PHILOX_W1);
        }
        let p0 = u64::from(PHILOX_M0) * u64::from(c[0]);
        let p1 = u64::from(PHILOX_M1) * u64::from(c[2]);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// Maps a 32-bit word to a uniform f32 in `[0, 1)` using its top 24 bits (an f32's precision).
pub fn u32_to_unit_f32(word: u32) -> f32 {
    (word >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// The 32-bit word of draw `draw` in sequence `stream` under `seed` (see the module docs).
pub fn philox_u32(seed: u64, stream: u64, draw: u64) -> u32 {
    let block = draw / 4;
    let key = [seed as u32, (seed >> 32) as u32];
    let counter = [block as u32, (block >> 32) as u32, stream as u32, (stream >> 32) as u32];
    philox4x32_10(counter, key)[(draw % 4) as usize]
}

/// Draw `draw` of sequence `stream` under `seed`, as a uniform f32 in `[0, 1)`.
pub fn uniform_f32(seed: u64, stream: u64, draw: u64) -> f32 {
    u32_to_unit_f32(philox_u32(seed, stream, draw))
}

/// A cursor over one sequence's draws: `next_uniform` returns draw 0, 1, 2, … of
/// `(seed, stream)`. It holds no hidden state beyond the index, so it can be rebuilt anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhiloxStream {
    pub seed: u64,
    pub stream: u64,
    /// Index of the next draw.
    pub draw: u64,
}

impl PhiloxStream {
    pub fn new(seed: u64, stream: u64) -> Self {
        Self { seed, stream, draw: 0 }
    }

    pub fn next_uniform(&mut self) -> f32 {
        let u = uniform_f32(self.seed, self.stream, self.draw);
        self.draw = self.draw.wrapping_add(1);
        u
    }
}

/// splitmix64: a tiny seeded stream for reproducible host-side choices that no GPU kernel has to
/// repeat (the LoRA A initialisation, the data loader's shuffles).
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-bound, bound)`, from the top 24 bits of the next word.
    pub fn uniform(&mut self, bound: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (2.0 * u - 1.0) * bound
    }
}

/// The request's seed, or a fresh one from [`crate::ids::seed`] when it sent none (such a
/// request is not reproducible, which is what omitting the seed means).
pub fn resolve_seed(seed: Option<u64>) -> u64 {
    seed.unwrap_or_else(crate::ids::seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known-answer vectors of Philox4x32-10 from Random123's kat_vectors.
    #[test]
    fn kat_zero() {
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
    }

    #[test]
    fn kat_all_ones() {
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
    }

    #[test]
    fn kat_pi_digits() {
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn unit_mapping_bounds() {
        assert_eq!(u32_to_unit_f32(0), 0.0);
        assert_eq!(u32_to_unit_f32(0xFF), 0.0);
        assert_eq!(u32_to_unit_f32(0x100), 1.0 / 16_777_216.0);
        assert_eq!(u32_to_unit_f32(0x8000_0000), 0.5);
        let top = u32_to_unit_f32(u32::MAX);
        assert!(top < 1.0);
        assert_eq!(top, 1.0 - 1.0 / 16_777_216.0);
    }

    #[test]
    fn draw_layout_matches_blocks() {
        let seed = 0x0123_4567_89ab_cdef_u64;
        let stream = 7_u64;
        let block1 = philox4x32_10([1, 0, 7, 0], [0x89ab_cdef, 0x0123_4567]);
        for (w, &word) in block1.iter().enumerate() {
            assert_eq!(philox_u32(seed, stream, 4 + w as u64), word);
        }
        let mut s = PhiloxStream::new(seed, stream);
        let firsts: Vec<f32> = (0..8).map(|_| s.next_uniform()).collect();
        assert_eq!(firsts[5], u32_to_unit_f32(block1[1]));
        assert_ne!(philox_u32(seed, 0, 0), philox_u32(seed, 1, 0));
    }

    #[test]
    fn missing_seeds_are_fresh() {
        assert_ne!(resolve_seed(None), resolve_seed(None));
        assert_eq!(resolve_seed(Some(7)), 7);
    }
}
