//! Safetensors I/O: memory-mapped loading (single file or sharded index) with bf16/f16 → f32
//! conversion at load, and f32 saving.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use super::error::{EngineError, Result};
use super::tensor::Tensor;

/// Named f32 tensors read from safetensors files; `take` removes them as the model claims them.
#[derive(Debug, Default)]
pub struct WeightStore {
    tensors: HashMap<String, Tensor>,
}

impl WeightStore {
    /// Loads `model.safetensors`, or every shard named by `model.safetensors.index.json`.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let mut store = WeightStore::default();
        if single.is_file() {
            store.load_file(&single)?;
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
                store.load_file(&dir.join(f))?;
            }
        } else {
            return Err(EngineError::Config(format!(
                "{} has neither model.safetensors nor model.safetensors.index.json",
                dir.display()
            )));
        }
        Ok(store)
    }

    /// Reads every tensor of one file, converted to f32.
    pub fn load_file(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        // SAFETY: the file is only read; a concurrent truncation by another process is the one
        // hazard of any mmap and is outside what a model directory is expected to suffer.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))?;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| EngineError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        for (name, view) in st.iter() {
            let data = to_f32(name, view.dtype(), view.data())?;
            self.tensors.insert(name.to_string(), Tensor::new(view.shape().to_vec(), data)?);
        }
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Removes and returns `name`, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
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
    Ok(match dtype {
        Dtype::F32 => {
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        }
        Dtype::BF16 => pairs().map(|b| half::bf16::from_bits(b).to_f32()).collect(),
        Dtype::F16 => pairs().map(|b| half::f16::from_bits(b).to_f32()).collect(),
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
    let bytes: BTreeMap<&String, Vec<u8>> = tensors
        .iter()
        .map(|(k, t)| (k, t.data().iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let views = tensors
        .iter()
        .map(|(k, t)| {
            let data = bytes.get(k).map(|b| b.as_slice()).unwrap_or(&[]);
            safetensors::tensor::TensorView::new(Dtype::F32, t.shape().to_vec(), data)
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
    Ok(store.tensors.into_iter().collect())
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
