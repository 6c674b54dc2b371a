//! Safetensors I/O: memory-mapped loading (single file or sharded index), and f32 / bf16
//! saving. bf16 tensors stay bf16 until claimed: [`WeightStore::take_weight`] keeps them so
//! (the base model's matrices), [`WeightStore::take`] converts to f32 (norms, biases, adapters).
//! f16 converts to f32 at load.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;

use half::bf16;
use safetensors::{Dtype, SafeTensors};

use super::error::{EngineError, Result};
use super::pages::collect_huge;
use super::tensor::Tensor;
use super::weight::Weight;

/// One stored tensor: f32, or bf16 as read from the file.
#[derive(Debug)]
enum Stored {
    F32(Tensor),
    Bf16 { shape: Vec<usize>, data: Vec<bf16> },
}

impl Stored {
    fn shape(&self) -> &[usize] {
        match self {
            Stored::F32(t) => t.shape(),
            Stored::Bf16 { shape, .. } => shape,
        }
    }

    fn into_f32(self) -> Result<Tensor> {
        match self {
            Stored::F32(t) => Ok(t),
            Stored::Bf16 { shape, data } => {
                Tensor::new(shape, data.iter().map(|b| b.to_f32()).collect())
            }
        }
    }
}

/// Named tensors read from safetensors files; `take` / `take_weight` remove them as the model
/// claims them.
#[derive(Debug, Default)]
pub struct WeightStore {
    tensors: HashMap<String, Stored>,
}

impl WeightStore {
    /// Loads `model.safetensors`, or every shard named by `model.safetensors.index.json`.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let mut store = WeightStore::default();
        // Start-up loading reports its progress (a bar on a terminal, else periodic lines).
        if single.is_file() {
            store.load_file_reporting(&single, true)?;
        } else if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| EngineError::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| EngineError::Json { path: index.clone(), message: e.to_string() })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
                EngineError::Json { path: index.clone(), message: "no `weight_map` object".into() }
            })?;
            let mut files: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            files.sort_unstable();
            files.dedup();
            for f in files {
                store.load_file_reporting(&dir.join(f), true)?;
            }
        } else {
            return Err(EngineError::Config(format!(
                "{} has neither model.safetensors nor model.safetensors.index.json",
                dir.display()
            )));
        }
        Ok(store)
    }

    /// Reads every tensor of one file (bf16 kept as bf16, everything else converted to f32).
    pub fn load_file(&mut self, path: &Path) -> Result<()> {
        self.load_file_reporting(path, false)
    }

    /// [`Self::load_file`], showing a progress per tensor when `report`.
    fn load_file_reporting(&mut self, path: &Path, report: bool) -> Result<()> {
        let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        // SAFETY: the file is only read; a concurrent truncation by another process is the one
        // hazard of any mmap and is outside what a model directory is expected to suffer.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))?;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| EngineError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let progress = if report {
            let file = path.file_name().map(|f| f.to_string_lossy()).unwrap_or_default();
            crate::progress::Progress::new(&format!("loading {file}"), st.len() as u64)
        } else {
            crate::progress::Progress::quiet()
        };
        for (name, view) in st.iter() {
            progress.advance(1, name);
            let shape = view.shape().to_vec();
            let stored = if view.dtype() == Dtype::BF16 {
                let bytes = view.data();
                let data: Vec<bf16> = collect_huge(
                    bytes.len() / 2,
                    bytes
                        .chunks_exact(2)
                        .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))),
                );
                if data.len() != shape.iter().product::<usize>() {
                    return Err(EngineError::TensorShape {
                        name: name.to_string(),
                        got: vec![data.len()],
                        expected: shape,
                    });
                }
                Stored::Bf16 { shape, data }
            } else {
                Stored::F32(Tensor::new(shape, to_f32(name, view.dtype(), view.data())?)?)
            };
            self.tensors.insert(name.to_string(), stored);
        }
        progress.finish();
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Removes `name`, checking its shape.
    fn take_stored(&mut self, name: &str, shape: &[usize]) -> Result<Stored> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| EngineError::MissingTensor { name: name.to_string() })?;
        if t.shape() != shape {
            return Err(EngineError::TensorShape {
                name: name.to_string(),
                got: t.shape().to_vec(),
                expected: shape.to_vec(),
            });
        }
        Ok(t)
    }

    /// Removes and returns `name` as f32, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.take_stored(name, shape)?.into_f32()
    }

    /// Removes and returns the `[rows, cols]` matrix `name` in its stored dtype (bf16 stays
    /// bf16), checking its shape.
    pub fn take_weight(&mut self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        Ok(match self.take_stored(name, &[rows, cols])? {
            Stored::F32(t) => Weight::F32(t),
            Stored::Bf16 { data, .. } => Weight::Bf16 { shape: [rows, cols], data },
        })
    }

    /// Like `take` but `None` when absent.
    pub fn take_opt(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) { self.take(name, shape).map(Some) } else { Ok(None) }
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }
}

fn to_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    let pairs = || bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
    // Huge pages: the base matrices are streamed from memory on every decode step.
    Ok(match dtype {
        Dtype::F32 => collect_huge(
            bytes.len() / 4,
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        Dtype::BF16 => collect_huge(bytes.len() / 2, pairs().map(|b| bf16::from_bits(b).to_f32())),
        Dtype::F16 => {
            collect_huge(bytes.len() / 2, pairs().map(|b| half::f16::from_bits(b).to_f32()))
        }
        other => {
            return Err(EngineError::TensorDtype {
                name: name.to_string(),
                dtype: format!("{other:?}"),
            });
        }
    })
}

/// Writes f32 tensors to a safetensors file (names sorted, so the bytes are reproducible).
pub fn save_f32(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    save_as(path, tensors, Dtype::F32)
}

/// Writes tensors rounded to bf16 (round to nearest even), like a bf16 HF checkpoint.
pub fn save_bf16(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    save_as(path, tensors, Dtype::BF16)
}

fn save_as(path: &Path, tensors: &BTreeMap<String, Tensor>, dtype: Dtype) -> Result<()> {
    let encode = |t: &Tensor| -> Vec<u8> {
        match dtype {
            Dtype::BF16 => t.data().iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
            _ => t.data().iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    };
    let bytes: BTreeMap<&String, Vec<u8>> = tensors.iter().map(|(k, t)| (k, encode(t))).collect();
    let views = tensors
        .iter()
        .map(|(k, t)| {
            let data = bytes.get(k).map(|b| b.as_slice()).unwrap_or(&[]);
            safetensors::tensor::TensorView::new(dtype, t.shape().to_vec(), data)
                .map(|v| (k.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| EngineError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let out = safetensors::serialize(views, None).map_err(|e| EngineError::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    std::fs::write(path, out).map_err(|e| EngineError::io(path, e))
}

/// Reads every tensor of a safetensors file as f32, keyed by name.
pub fn load_f32(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let mut store = WeightStore::default();
    store.load_file(path)?;
    store.tensors.into_iter().map(|(k, t)| Ok((k, t.into_f32()?))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, dtype: Dtype, shape: Vec<usize>, bytes: &[u8]) {
        let view = safetensors::tensor::TensorView::new(dtype, shape, bytes).unwrap();
        std::fs::write(path, safetensors::serialize([("w", view)], None).unwrap()).unwrap();
    }

    #[test]
    fn half_precision_weights_convert_exactly() {
        let tmp = tempfile::tempdir().unwrap();
        let vals = [1.0f32, -2.5, 0.15625, 65504.0];
        for dtype in [Dtype::F16, Dtype::BF16] {
            let bytes: Vec<u8> = vals
                .iter()
                .flat_map(|v| match dtype {
                    Dtype::F16 => half::f16::from_f32(*v).to_bits().to_le_bytes(),
                    _ => half::bf16::from_f32(*v).to_bits().to_le_bytes(),
                })
                .collect();
            let path = tmp.path().join("w.safetensors");
            write(&path, dtype, vec![2, 2], &bytes);
            let t = &load_f32(&path).unwrap()["w"];
            assert_eq!(t.shape(), &[2, 2]);
            // All four values are exactly representable in f16; bf16 rounds 65504 to 65536.
            let want: Vec<f32> =
                if dtype == Dtype::F16 { vals.to_vec() } else { vec![1.0, -2.5, 0.15625, 65536.0] };
            assert_eq!(t.data(), want.as_slice());
        }
        let path = tmp.path().join("i.safetensors");
        write(&path, Dtype::I64, vec![1], &7i64.to_le_bytes());
        let err = load_f32(&path).unwrap_err();
        assert!(matches!(err, EngineError::TensorDtype { ref name, .. } if name == "w"), "{err}");
    }
}
