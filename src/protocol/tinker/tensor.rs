//! Typed tensors decoded from the protobuf `Tensor` message: dense or CSR layouts, every dtype the
//! protocol allows (int32 widened to int64, bfloat16 widened to float32), validated strictly.

use super::error::ProtocolError;
use super::proto::{self, DType};

/// Limits that keep a small request from asking for a huge allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Datums per `forward_backward` request.
    pub max_datums: usize,
    /// Input tokens per datum.
    pub max_tokens_per_datum: usize,
    /// Elements of one tensor after expansion to dense (a CSR tensor may be tiny on the wire).
    pub max_tensor_elements: u64,
    /// Elements of all tensors of one request together.
    pub max_total_elements: u64,
    /// Dimensions of one tensor.
    pub max_rank: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_datums: 16_384,
            max_tokens_per_datum: 1 << 20,
            max_tensor_elements: 1 << 24,
            max_total_elements: 1 << 26,
            max_rank: 4,
        }
    }
}

/// Values of a decoded tensor, in the widened dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorValues {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// A dense row-major tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TypedTensor {
    pub shape: Vec<usize>,
    pub values: TensorValues,
}

impl TypedTensor {
    pub fn numel(&self) -> usize {
        match &self.values {
            TensorValues::F32(v) => v.len(),
            TensorValues::I64(v) => v.len(),
        }
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.values {
            TensorValues::F32(v) => Some(v),
            TensorValues::I64(_) => None,
        }
    }

    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.values {
            TensorValues::I64(v) => Some(v),
            TensorValues::F32(_) => None,
        }
    }
}

/// Element type on the wire, after rejecting `UNSPECIFIED` and unknown values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WireDtype {
    F32,
    I64,
    I32,
    Bf16,
}

impl WireDtype {
    pub(crate) fn from_i32(raw: i32, field: &str) -> Result<Self, ProtocolError> {
        match DType::try_from(raw) {
            Ok(DType::DtypeFloat32) => Ok(WireDtype::F32),
            Ok(DType::DtypeInt64) => Ok(WireDtype::I64),
            Ok(DType::DtypeInt32) => Ok(WireDtype::I32),
            Ok(DType::DtypeBfloat16) => Ok(WireDtype::Bf16),
            Ok(DType::DtypeUnspecified) => Err(ProtocolError::BadDtype {
                field: format!("{field}.dtype"),
                dtype: "DTYPE_UNSPECIFIED".into(),
                expected: "FLOAT32, INT64, INT32 or BFLOAT16",
            }),
            Err(_) => Err(ProtocolError::BadDtype {
                field: format!("{field}.dtype"),
                dtype: format!("enum value {raw}"),
                expected: "FLOAT32, INT64, INT32 or BFLOAT16",
            }),
        }
    }

    /// The protobuf enum name, for error messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            WireDtype::F32 => "FLOAT32",
            WireDtype::I64 => "INT64",
            WireDtype::I32 => "INT32",
            WireDtype::Bf16 => "BFLOAT16",
        }
    }

    pub(crate) fn itemsize(self) -> usize {
        match self {
            WireDtype::F32 | WireDtype::I32 => 4,
            WireDtype::I64 => 8,
            WireDtype::Bf16 => 2,
        }
    }
}

fn check_len(bytes: &[u8], itemsize: usize, field: &str) -> Result<usize, ProtocolError> {
    if !bytes.len().is_multiple_of(itemsize) {
        return Err(ProtocolError::ByteLength {
            field: field.to_string(),
            len: bytes.len(),
            itemsize,
        });
    }
    Ok(bytes.len() / itemsize)
}

/// Little-endian int32 buffer.
pub(crate) fn le_i32(bytes: &[u8], field: &str) -> Result<Vec<i32>, ProtocolError> {
    check_len(bytes, 4, field)?;
    Ok(bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// Little-endian int64 buffer.
pub(crate) fn le_i64(bytes: &[u8], field: &str) -> Result<Vec<i64>, ProtocolError> {
    check_len(bytes, 8, field)?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

/// Little-endian float32 buffer.
pub(crate) fn le_f32(bytes: &[u8], field: &str) -> Result<Vec<f32>, ProtocolError> {
    check_len(bytes, 4, field)?;
    Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn decode_values(
    bytes: &[u8],
    dtype: WireDtype,
    field: &str,
) -> Result<TensorValues, ProtocolError> {
    Ok(match dtype {
        WireDtype::F32 => TensorValues::F32(le_f32(bytes, field)?),
        WireDtype::I64 => TensorValues::I64(le_i64(bytes, field)?),
        WireDtype::I32 => {
            TensorValues::I64(le_i32(bytes, field)?.into_iter().map(i64::from).collect())
        }
        WireDtype::Bf16 => {
            check_len(bytes, 2, field)?;
            TensorValues::F32(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                    .collect(),
            )
        }
    })
}

/// Validated dense shape and its element count.
fn check_shape(
    shape: &[i64],
    field: &str,
    limits: &DecodeLimits,
) -> Result<(Vec<usize>, u64), ProtocolError> {
    if shape.len() > limits.max_rank {
        return Err(ProtocolError::BadShape {
            field: format!("{field}.shape"),
            shape: shape.to_vec(),
            reason: format!("rank {} is above the limit of {}", shape.len(), limits.max_rank),
        });
    }
    let mut dims = Vec::with_capacity(shape.len());
    let mut count: u64 = 1;
    for &d in shape {
        let Ok(du) = u64::try_from(d) else {
            return Err(ProtocolError::BadShape {
                field: format!("{field}.shape"),
                shape: shape.to_vec(),
                reason: "dimensions must not be negative".into(),
            });
        };
        count = count.checked_mul(du).filter(|c| *c <= limits.max_tensor_elements).ok_or(
            ProtocolError::TooLarge {
                field: format!("{field}.shape"),
                what: "the element count",
                actual: count.saturating_mul(du),
                limit: limits.max_tensor_elements,
            },
        )?;
        // count <= max_tensor_elements, so every dimension (when count > 0) fits in usize; a zero
        // dimension makes count 0 but the other dimensions are still bounded by i64 -> check.
        dims.push(usize::try_from(du).map_err(|_| ProtocolError::BadShape {
            field: format!("{field}.shape"),
            shape: shape.to_vec(),
            reason: "dimension does not fit in memory".into(),
        })?);
    }
    Ok((dims, count))
}

/// Decodes a protobuf `Tensor` into a dense typed tensor. `budget` is the number of elements the
/// request may still allocate; it is decreased by the size of this tensor.
pub fn decode_tensor(
    t: &proto::Tensor,
    field: &str,
    limits: &DecodeLimits,
    budget: &mut u64,
) -> Result<TypedTensor, ProtocolError> {
    let dtype = WireDtype::from_i32(t.dtype, field)?;
    let tensor = match &t.encoding {
        None => {
            return Err(ProtocolError::missing(format!("{field}.encoding (dense or sparse_csr)")));
        }
        Some(proto::tensor::Encoding::Dense(bytes)) => {
            let n = check_len(bytes, dtype.itemsize(), &format!("{field}.dense"))? as u64;
            // An absent shape means a 1-D tensor.
            let shape = if t.shape.is_empty() { vec![n as i64] } else { t.shape.clone() };
            let (dims, count) = check_shape(&shape, field, limits)?;
            if count != n {
                return Err(ProtocolError::ShapeMismatch {
                    field: field.to_string(),
                    shape,
                    expected: count,
                    actual: n,
                });
            }
            take_budget(budget, count, field, limits)?;
            TypedTensor {
                shape: dims,
                values: decode_values(bytes, dtype, &format!("{field}.dense"))?,
            }
        }
        Some(proto::tensor::Encoding::SparseCsr(csr)) => {
            decode_csr(csr, &t.shape, dtype, field, limits, budget)?
        }
    };
    if let TensorValues::F32(v) = &tensor.values
        && let Some(pos) = v.iter().position(|x| !x.is_finite())
    {
        return Err(ProtocolError::invalid(
            field,
            format!("element {pos} is {} (values must be finite)", v[pos]),
        ));
    }
    Ok(tensor)
}

fn take_budget(
    budget: &mut u64,
    count: u64,
    field: &str,
    limits: &DecodeLimits,
) -> Result<(), ProtocolError> {
    *budget = budget.checked_sub(count).ok_or(ProtocolError::TooLarge {
        field: field.to_string(),
        what: "the element count of all tensors of the request",
        actual: limits.max_total_elements.saturating_sub(*budget).saturating_add(count),
        limit: limits.max_total_elements,
    })?;
    Ok(())
}

fn decode_csr(
    csr: &proto::SparseCsr,
    shape: &[i64],
    dtype: WireDtype,
    field: &str,
    limits: &DecodeLimits,
    budget: &mut u64,
) -> Result<TypedTensor, ProtocolError> {
    if shape.len() != 2 {
        return Err(ProtocolError::BadShape {
            field: format!("{field}.shape"),
            shape: shape.to_vec(),
            reason: "a sparse_csr tensor needs a 2-D shape [rows, cols]".into(),
        });
    }
    let (dims, count) = check_shape(shape, field, limits)?;
    let (rows, cols) = (dims[0], dims[1]);
    let crow = le_i64(&csr.crow_indices, &format!("{field}.sparse_csr.crow_indices"))?;
    let col = le_i64(&csr.col_indices, &format!("{field}.sparse_csr.col_indices"))?;
    let values = decode_values(&csr.values, dtype, &format!("{field}.sparse_csr.values"))?;
    let nnz = match &values {
        TensorValues::F32(v) => v.len(),
        TensorValues::I64(v) => v.len(),
    };
    if crow.len() != rows + 1 {
        return Err(ProtocolError::invalid(
            format!("{field}.sparse_csr.crow_indices"),
            format!("has {} entries, expected rows + 1 = {}", crow.len(), rows + 1),
        ));
    }
    if col.len() != nnz {
        return Err(ProtocolError::invalid(
            format!("{field}.sparse_csr.col_indices"),
            format!("has {} entries but values has {nnz}", col.len()),
        ));
    }
    if crow[0] != 0 || crow[rows] != nnz as i64 {
        return Err(ProtocolError::invalid(
            format!("{field}.sparse_csr.crow_indices"),
            format!("must start at 0 and end at nnz = {nnz} (got {} .. {})", crow[0], crow[rows]),
        ));
    }
    if let Some(r) = (0..rows).find(|&r| crow[r] > crow[r + 1]) {
        return Err(ProtocolError::invalid(
            format!("{field}.sparse_csr.crow_indices"),
            format!("must be non-decreasing (entry {} > entry {})", r, r + 1),
        ));
    }
    take_budget(budget, count, field, limits)?;
    // Indices are validated before use, so every write below is in bounds.
    let mut targets = Vec::with_capacity(nnz);
    for r in 0..rows {
        // crow is non-decreasing from 0 to nnz, so these casts and slices are in range.
        let (start, end) = (crow[r] as usize, crow[r + 1] as usize);
        let mut prev: Option<i64> = None;
        for (p, &c) in col.iter().enumerate().take(end).skip(start) {
            if c < 0 || c as u64 >= cols as u64 {
                return Err(ProtocolError::IndexOutOfRange {
                    field: format!("{field}.sparse_csr.col_indices"),
                    position: p,
                    index: c,
                    bound: cols as u64,
                });
            }
            if prev.is_some_and(|q| q >= c) {
                return Err(ProtocolError::invalid(
                    format!("{field}.sparse_csr.col_indices"),
                    format!("row {r}: column indices must be strictly increasing (position {p})"),
                ));
            }
            prev = Some(c);
            targets.push(r * cols + c as usize);
        }
    }
    let values = match values {
        TensorValues::F32(v) => {
            let mut dense = vec![0f32; count as usize];
            for (&i, x) in targets.iter().zip(v) {
                dense[i] = x;
            }
            TensorValues::F32(dense)
        }
        TensorValues::I64(v) => {
            let mut dense = vec![0i64; count as usize];
            for (&i, x) in targets.iter().zip(v) {
                dense[i] = x;
            }
            TensorValues::I64(dense)
        }
    };
    Ok(TypedTensor { shape: dims, values })
}

/// Dtype check used by the request decoder for keys with a known kind.
pub(crate) fn require_kind(
    t: &TypedTensor,
    want_float: bool,
    field: &str,
    raw_dtype: i32,
) -> Result<(), ProtocolError> {
    let ok = matches!(
        (&t.values, want_float),
        (TensorValues::F32(_), true) | (TensorValues::I64(_), false)
    );
    if ok {
        return Ok(());
    }
    let name =
        WireDtype::from_i32(raw_dtype, field).map(|d| d.name().to_string()).unwrap_or_default();
    Err(ProtocolError::BadDtype {
        field: format!("{field}.dtype"),
        dtype: name,
        expected: if want_float { "FLOAT32 or BFLOAT16" } else { "INT64 or INT32" },
    })
}
