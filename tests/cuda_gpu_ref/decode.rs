//! Paged KV-cache append and split-KV decode attention against a naive f64 reference: contexts
//! from empty to hundreds of keys over many splits, GQA groups of 1, 4 and 12 (two passes of
//! warps), shuffled block tables, table entries outside the cache, and a context longer than
//! its table.

use anyhow::Result;
use cudarc::driver::CudaSlice;
use twinkle::engine::cuda::launch::{self as k, DecodeShape};
use twinkle::engine::cuda::{CudaDevice, CudaError};

use super::super::{Rng, TestT, close_scaled, down, rt, up, upi};

/// One decode configuration.
struct Case {
    hq: usize,
    hkv: usize,
    hd: usize,
    /// Claimed context per sequence (`ctx_lens`; clamped to the table by the kernel).
    lens: &'static [usize],
    /// (sequence, table column, entry): overrides of the shuffled table; an entry outside
    /// [0, num_blocks) makes the kernel skip that block's keys.
    bad: &'static [(usize, usize, i32)],
}

const BS: usize = 16;
const MAX_BLOCKS: usize = 48;
const NUM_BLOCKS: usize = 160;

const CASES: [Case; 3] = [
    // group 4; 737 keys span 12 splits of 64; sequence 3's blocks 4..8 (its whole second split)
    // and sequence 4's block 1 point outside the cache; sequence 5 claims 800 > 48 * 16 keys;
    // sequence 6 sees only skipped keys, sequence 7 none at all
    Case {
        hq: 8,
        hkv: 2,
        hd: 64,
        lens: &[1, 5, 300, 737, 40, 800, 3, 0],
        bad: &[(3, 4, -1), (3, 5, 999), (3, 6, -7), (3, 7, 160), (4, 1, 1000), (6, 0, -1)],
    },
    // group 1 (one warp per block)
    Case { hq: 4, hkv: 4, hd: 32, lens: &[700, 2, 129], bad: &[(0, 10, 170)] },
    // group 12: two passes of 8 warps, the second with 4 idle warps
    Case { hq: 12, hkv: 1, hd: 128, lens: &[3, 520], bad: &[] },
];

pub fn paged<T: TestT>(dev: &CudaDevice) -> Result<()> {
    for (i, c) in CASES.iter().enumerate() {
        case::<T>(dev, c, &format!("decode case {i}"))?;
    }
    Ok(())
}

fn case<T: TestT>(dev: &CudaDevice, c: &Case, name: &str) -> Result<()> {
    let s = dev.stream();
    let mut r = Rng(5 + c.hd as u64);
    let (b, row, cap) = (c.lens.len(), c.hkv * c.hd, MAX_BLOCKS * BS);
    let num_slots = NUM_BLOCKS * BS;
    // every sequence gets distinct blocks of a shuffled permutation, then the overrides
    let mut perm: Vec<i32> = (0..NUM_BLOCKS as i32).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, (r.next_u64() % (i as u64 + 1)) as usize);
    }
    let mut table = vec![0i32; b * MAX_BLOCKS];
    let mut next = perm.iter();
    for (sq, &len) in c.lens.iter().enumerate() {
        for col in 0..len.min(cap).div_ceil(BS) {
            table[sq * MAX_BLOCKS + col] = *next.next().expect("enough blocks for the case");
        }
    }
    for &(sq, col, e) in c.bad {
        table[sq * MAX_BLOCKS + col] = e;
    }
    let slot_of =
        |sq: usize, t: usize| table[sq * MAX_BLOCKS + t / BS] as i64 * BS as i64 + (t % BS) as i64;
    // one new token per cached position; a slot outside the cache is skipped by the append too
    let mut slots = Vec::new();
    for (sq, &len) in c.lens.iter().enumerate() {
        for t in 0..len.min(cap) {
            slots.push(i32::try_from(slot_of(sq, t)).unwrap_or(-1));
        }
    }
    slots.push(-1); // padding token: must be skipped
    let ntok = slots.len();
    let kv_k = rt::<T>(&r.vec(ntok * row, 1.0));
    let kv_v = rt::<T>(&r.vec(ntok * row, 1.0));
    let (dkk, dvv, dsl) = (up::<T>(s, &kv_k)?, up::<T>(s, &kv_v)?, upi(s, &slots)?);
    let (mut kc, mut vc) =
        (s.alloc_zeros::<T>(num_slots * row)?, s.alloc_zeros::<T>(num_slots * row)?);
    let cache = k::Kv { k: &mut kc.as_view_mut(), v: &mut vc.as_view_mut() };
    let new = k::Kv { k: &dkk.as_view(), v: &dvv.as_view() };
    k::kv_append_fwd(dev, cache, new, &dsl.as_view(), row)?;
    let (kc_host, vc_host) = (down(s, &kc)?, down(s, &vc)?);
    let valid = |sl: i64| (0..num_slots as i64).contains(&sl);
    for (t, &slot) in slots.iter().enumerate().filter(|(_, sl)| valid(**sl as i64)) {
        let cached = slot as usize * row..(slot as usize + 1) * row;
        assert_eq!(&kc_host[cached], &kv_k[t * row..(t + 1) * row], "{name}: kv_append token {t}");
    }

    // a peaked softmax (q of magnitude 3), so a split merged with the wrong weight shows
    let q = rt::<T>(&r.vec(b * c.hq * c.hd, 3.0));
    let scale = 1.0 / (c.hd as f64).sqrt();
    let mut want = vec![0.0; q.len()];
    for (sq, &len) in c.lens.iter().enumerate() {
        let keys: Vec<usize> = (0..len.min(cap))
            .map(|t| slot_of(sq, t))
            .filter(|&sl| valid(sl))
            .map(|sl| sl as usize)
            .collect();
        for h in 0..c.hq {
            let g = h / (c.hq / c.hkv);
            let o = (sq * c.hq + h) * c.hd;
            let kv = |cache: &[f64], sl: usize, d: usize| cache[sl * row + g * c.hd + d];
            let sc: Vec<f64> = keys
                .iter()
                .map(|&sl| scale * (0..c.hd).map(|d| q[o + d] * kv(&kc_host, sl, d)).sum::<f64>())
                .collect();
            let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
            for d in 0..c.hd {
                // no key at all: the kernel defines the output as zeros
                let acc: f64 =
                    keys.iter().zip(&sc).map(|(&sl, x)| (x - m).exp() * kv(&vc_host, sl, d)).sum();
                want[o + d] = if keys.is_empty() { 0.0 } else { acc / z };
            }
        }
    }

    let ctx: Vec<i32> = c.lens.iter().map(|&l| l as i32).collect();
    let (dq, dt, dc) = (up::<T>(s, &q)?, upi(s, &table)?, upi(s, &ctx)?);
    let longest = c.lens.iter().copied().max().unwrap_or(0);
    // the true longest context, an underestimate (fewer, longer chunks: still every key) and
    // none at all (one split)
    for max_context in [longest, 100, 0] {
        let shape = DecodeShape {
            q_heads: c.hq,
            kv_heads: c.hkv,
            head_dim: c.hd,
            block_size: BS,
            max_blocks: MAX_BLOCKS,
            max_context,
            scale: scale as f32,
        };
        // the decode into `out` with `ws` as the splits' workspace
        let attend = |out: &mut CudaSlice<T>, ws: &mut CudaSlice<f32>| {
            let cache = k::Kv { k: &kc.as_view(), v: &vc.as_view() };
            let (o, w) = (&mut out.as_view_mut(), &mut ws.as_view_mut());
            let (table, ctx) = (dt.as_view(), dc.as_view());
            k::decode_attention_fwd(dev, o, w, &dq.as_view(), cache, &table, &ctx, &shape)
        };
        let mut out = s.alloc_zeros::<T>(q.len())?;
        // not zeroed: the kernels must write or skip every state, never read stale ones
        let mut ws = s.clone_htod(&vec![f32::NAN; k::decode_workspace_len(b, &shape)])?;
        attend(&mut out, &mut ws)?;
        close_scaled(
            &format!("{name} (max_context {max_context})"),
            &down(s, &out)?,
            &want,
            T::TOL,
        );
        // a workspace sized for another split count is a shape error naming it
        let mut short = s.alloc_zeros::<f32>(k::decode_workspace_len(b, &shape) - 1)?;
        let err = attend(&mut out, &mut short);
        assert!(
            matches!(&err, Err(CudaError::Shape { msg, .. }) if msg.contains("workspace")),
            "{name}: {err:?}"
        );
    }
    Ok(())
}
