//! Storage of the frozen base model's matrices (embedding, attention and MLP projections,
//! lm_head) in the dtype the checkpoint stored them in: f32, or bf16 at half the memory.
//!
//! Compute stays f32. A consumer converts the part of a bf16 matrix it needs (a block of rows or
//! of columns) into an f32 scratch buffer right before using it; bf16 → f32 is exact (the 16 bf16
//! bits are the top half of the f32), so any product computed on converted blocks is identical
//! to one computed on a matrix converted in full. Norms and biases are tiny and stay f32.

use std::borrow::Cow;

use half::bf16;
use rayon::prelude::*;

use super::tensor::Tensor;

/// A 2-D `[rows, cols]` row-major base-model weight, f32 or bf16.
#[derive(Debug, Clone)]
pub enum Weight {
    F32(Tensor),
    Bf16 { shape: [usize; 2], data: Vec<bf16> },
}

/// Below this many elements a conversion runs on the calling thread: a rayon split costs more
/// than converting a few thousand values.
const PAR_CONVERT_MIN: usize = 1 << 14;

impl Weight {
    /// A bf16 weight; `None` when `data` does not hold `rows × cols` values.
    pub fn bf16(rows: usize, cols: usize, data: Vec<bf16>) -> Option<Self> {
        (data.len() == rows * cols).then_some(Weight::Bf16 { shape: [rows, cols], data })
    }

    /// Size of dimension `i` (0 = rows, 1 = columns); 0 past the second.
    pub fn dim(&self, i: usize) -> usize {
        match self {
            Weight::F32(t) => t.shape().get(i).copied().unwrap_or(0),
            Weight::Bf16 { shape, .. } => shape.get(i).copied().unwrap_or(0),
        }
    }

    pub fn rows(&self) -> usize {
        self.dim(0)
    }

    pub fn cols(&self) -> usize {
        self.dim(1)
    }

    pub fn shape(&self) -> [usize; 2] {
        [self.rows(), self.cols()]
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.rows() * self.cols()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the values are held as bf16.
    pub fn is_bf16(&self) -> bool {
        matches!(self, Weight::Bf16 { .. })
    }

    /// Bytes of the resident values.
    pub fn bytes(&self) -> usize {
        match self {
            Weight::F32(t) => t.len() * 4,
            Weight::Bf16 { data, .. } => data.len() * 2,
        }
    }

    /// The f32 values when held as f32 (the zero-copy path of every consumer).
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            Weight::F32(t) => Some(t.data()),
            Weight::Bf16 { .. } => None,
        }
    }

    /// The bf16 values when held as bf16.
    pub fn as_bf16(&self) -> Option<&[bf16]> {
        match self {
            Weight::F32(_) => None,
            Weight::Bf16 { data, .. } => Some(data),
        }
    }

    /// All values as f32 (borrowed when already f32).
    pub fn to_f32_cow(&self) -> Cow<'_, [f32]> {
        match self {
            Weight::F32(t) => Cow::Borrowed(t.data()),
            Weight::Bf16 { data, .. } => {
                let mut out = vec![0.0f32; data.len()];
                convert(data, &mut out);
                Cow::Owned(out)
            }
        }
    }

    /// The same weight held as f32 (a parity reference for the bf16 path).
    pub fn into_f32(self) -> Weight {
        match self {
            Weight::F32(t) => Weight::F32(t),
            Weight::Bf16 { shape, .. } => {
                let data = self.to_f32_cow().into_owned();
                Weight::F32(Tensor::from_parts(shape.to_vec(), data))
            }
        }
    }

    /// Row `r` as f32 into `out` (`cols` values).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        self.rows_f32(r, r + 1, out);
    }

    /// Rows `r0..r1` as f32 into `out` (`[r1−r0, cols]`, row-major).
    pub fn rows_f32(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let c = self.cols();
        let out = &mut out[..(r1 - r0) * c];
        match self {
            Weight::F32(t) => out.copy_from_slice(&t.data()[r0 * c..r1 * c]),
            Weight::Bf16 { data, .. } => convert(&data[r0 * c..r1 * c], out),
        }
    }

    /// Columns `c0..c1` of every row as f32 into `out` (`[rows, c1−c0]`, row-major).
    pub fn cols_f32(&self, c0: usize, c1: usize, out: &mut [f32]) {
        let (c, w) = (self.cols(), c1 - c0);
        let out = &mut out[..self.rows() * w];
        if w == 0 {
            return;
        }
        let body = |(dst, r): (&mut [f32], usize)| match self {
            Weight::F32(t) => dst.copy_from_slice(&t.data()[r * c + c0..r * c + c1]),
            Weight::Bf16 { data, .. } => {
                for (d, s) in dst.iter_mut().zip(&data[r * c + c0..r * c + c1]) {
                    *d = s.to_f32();
                }
            }
        };
        if out.len() >= PAR_CONVERT_MIN {
            out.par_chunks_mut(w).zip(0..self.rows()).for_each(body);
        } else {
            out.chunks_mut(w).zip(0..self.rows()).for_each(body);
        }
    }
}

/// `out[i] = src[i]` as f32, split over rayon workers when large.
fn convert(src: &[bf16], out: &mut [f32]) {
    const CHUNK: usize = 1 << 13;
    let one = |(d, s): (&mut [f32], &[bf16])| {
        for (d, s) in d.iter_mut().zip(s) {
            *d = s.to_f32();
        }
    };
    if src.len() >= PAR_CONVERT_MIN {
        out.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(one);
    } else {
        one((out, src));
    }
}

/// Element types a device can take base weights in: bf16 weights become a bf16 buffer without
/// an f32 round trip, f32 weights an f32 buffer without a copy.
pub trait WeightElem: Sized + Clone {
    /// `w`'s values as `Self` (borrowed when the storage already is `Self`).
    fn from_weight(w: &Weight) -> Cow<'_, [Self]>;
}

impl WeightElem for f32 {
    fn from_weight(w: &Weight) -> Cow<'_, [f32]> {
        w.to_f32_cow()
    }
}

impl WeightElem for bf16 {
    fn from_weight(w: &Weight) -> Cow<'_, [bf16]> {
        match w {
            Weight::Bf16 { data, .. } => Cow::Borrowed(data),
            // Round to nearest even, as every other f32 → bf16 conversion in the engine.
            Weight::F32(t) => Cow::Owned(t.data().par_iter().map(|&x| bf16::from_f32(x)).collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Weight, Weight) {
        let vals: Vec<f32> = (0..5 * 7).map(|i| (i as f32 - 11.0) * 0.37).collect();
        let b: Vec<bf16> = vals.iter().map(|&x| bf16::from_f32(x)).collect();
        let f: Vec<f32> = b.iter().map(|x| x.to_f32()).collect();
        let f = Weight::F32(Tensor::new(vec![5, 7], f).unwrap());
        (Weight::bf16(5, 7, b).unwrap(), f)
    }

    #[test]
    fn bf16_blocks_convert_like_the_whole_matrix() {
        let (b, f) = sample();
        assert_eq!((b.shape(), b.bytes(), f.bytes()), ([5, 7], 70, 140));
        let full = f.as_f32().unwrap();
        assert_eq!(&*b.to_f32_cow(), full);
        let mut rows = vec![0.0; 2 * 7];
        b.rows_f32(2, 4, &mut rows);
        assert_eq!(rows, &full[14..28]);
        let mut cols = vec![0.0; 5 * 3];
        b.cols_f32(3, 6, &mut cols);
        let want: Vec<f32> = (0..5).flat_map(|r| full[r * 7 + 3..r * 7 + 6].to_vec()).collect();
        assert_eq!(cols, want);
        let mut fcols = vec![0.0; 5 * 3];
        f.cols_f32(3, 6, &mut fcols);
        assert_eq!(fcols, want);
        assert_eq!(b.clone().into_f32().as_f32().unwrap(), full);
        assert_eq!(&*bf16::from_weight(&b), b.as_bf16().unwrap());
        assert_eq!(&*bf16::from_weight(&f), b.as_bf16().unwrap());
        assert!(Weight::bf16(2, 2, vec![bf16::ZERO; 3]).is_none());
    }
}
