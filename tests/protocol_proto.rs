//! Protobuf codec tests: request bodies are assembled byte by byte from the field numbers of
//! `specs/tinker-protocol.md` §7 (not by our own encoder), expected outputs are derived by hand.

use std::collections::BTreeMap;

use twinkle::protocol::tinker::ProtocolError;
use twinkle::protocol::tinker::codec::{
    ConfigValue, DatumOutput, FloatArray, SampledSequenceOut, decode_forward_backward,
    decode_forward_backward_output, decode_sample_response, encode_forward_backward_output,
    encode_sample_response,
};
use twinkle::protocol::tinker::proto::{self, StopReason};
use twinkle::protocol::tinker::tensor::{DecodeLimits, TensorValues};

// ---- a minimal protobuf writer for the tests ----

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

fn f_varint(field: u32, v: u64) -> Vec<u8> {
    let mut out = varint(u64::from(field << 3));
    out.extend(varint(v));
    out
}

fn f_len(field: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = varint(u64::from((field << 3) | 2));
    out.extend(varint(payload.len() as u64));
    out.extend_from_slice(payload);
    out
}

fn f_double(field: u32, v: f64) -> Vec<u8> {
    let mut out = varint(u64::from((field << 3) | 1));
    out.extend_from_slice(&v.to_le_bytes());
    out
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

fn i32s(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn i64s(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Tensor { dense = 1, dtype = 3, shape = 4 (packed) }.
fn dense_tensor(dtype: u64, data: &[u8], shape: &[u64]) -> Vec<u8> {
    let packed: Vec<u8> = shape.iter().flat_map(|&d| varint(d)).collect();
    let mut t = cat(&[f_len(1, data), f_varint(3, dtype)]);
    if !shape.is_empty() {
        t.extend(f_len(4, &packed));
    }
    t
}

/// Tensor { sparse_csr = 2 { values 1, crow 2, col 3 }, dtype, shape }.
fn csr_tensor(dtype: u64, values: &[u8], crow: &[i64], col: &[i64], shape: &[u64]) -> Vec<u8> {
    let csr = cat(&[f_len(1, values), f_len(2, &i64s(crow)), f_len(3, &i64s(col))]);
    let packed: Vec<u8> = shape.iter().flat_map(|&d| varint(d)).collect();
    cat(&[f_len(2, &csr), f_varint(3, dtype), f_len(4, &packed)])
}

fn map_entry(field: u32, key: &str, value: &[u8]) -> Vec<u8> {
    f_len(field, &cat(&[f_len(1, key.as_bytes()), f_len(2, value)]))
}

/// Datum { model_input = 1 (Chunk { encoded_text = 1 { tokens = 1 } }), loss_fn_inputs = 2 }.
fn datum(tokens: &[i32], inputs: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let chunk = f_len(1, &f_len(1, &i32s(tokens)));
    let mut d = f_len(1, &chunk);
    for (k, v) in inputs {
        d.extend(map_entry(2, k, v));
    }
    d
}

fn request(datums: &[Vec<u8>], extra: &[Vec<u8>]) -> Vec<u8> {
    let mut r = cat(&[f_len(1, b"sess-1:train:0"), f_varint(2, 1)]);
    for d in datums {
        r.extend(f_len(3, d));
    }
    r.extend(f_len(4, b"cross_entropy"));
    for e in extra {
        r.extend_from_slice(e);
    }
    r
}

const FLOAT32: u64 = 1;
const INT64: u64 = 2;
const INT32: u64 = 3;
const BFLOAT16: u64 = 4;

fn decode(
    body: &[u8],
) -> Result<twinkle::protocol::tinker::codec::ForwardBackwardInput, ProtocolError> {
    decode_forward_backward(body, &DecodeLimits::default())
}

#[test]
fn decodes_the_spec_sft_example() {
    let d = datum(
        &[1, 2, 3, 4],
        &[
            ("target_tokens", dense_tensor(INT64, &i64s(&[2, 3, 4, 5]), &[4])),
            ("weights", dense_tensor(FLOAT32, &f32s(&[0.0, 1.0, 1.0, 1.0]), &[4])),
        ],
    );
    let req = decode(&request(&[d], &[])).expect("valid request");
    assert_eq!(req.model_id, "sess-1:train:0");
    assert_eq!(req.seq_id, 1);
    assert_eq!(req.loss_fn, "cross_entropy");
    assert!(!req.forward_only);
    assert!(req.loss_config.is_empty());
    assert_eq!(req.data.len(), 1);
    assert_eq!(req.data[0].tokens, vec![1, 2, 3, 4]);
    let tt = &req.data[0].loss_fn_inputs["target_tokens"];
    assert_eq!(tt.shape, vec![4]);
    assert_eq!(tt.values, TensorValues::I64(vec![2, 3, 4, 5]));
    let w = &req.data[0].loss_fn_inputs["weights"];
    assert_eq!(w.values, TensorValues::F32(vec![0.0, 1.0, 1.0, 1.0]));
}

#[test]
fn forward_only_and_several_text_chunks_concatenate() {
    let two_chunks = cat(&[
        f_len(1, &f_len(1, &f_len(1, &i32s(&[7, 8])))),
        f_len(1, &f_len(1, &f_len(1, &i32s(&[9])))),
    ]);
    let body = request(&[two_chunks], &[f_varint(6, 1)]);
    let req = decode(&body).expect("valid");
    assert!(req.forward_only);
    assert_eq!(req.data[0].tokens, vec![7, 8, 9]);
}

#[test]
fn absent_shape_means_1d_and_unpacked_shape_is_accepted() {
    let no_shape = dense_tensor(FLOAT32, &f32s(&[0.5, 0.25, 2.0]), &[]);
    // shape written unpacked: one varint field per dimension.
    let unpacked = cat(&[
        f_len(1, &i64s(&[1, 2, 3, 4, 5, 6])),
        f_varint(3, INT64),
        f_varint(4, 2),
        f_varint(4, 3),
    ]);
    let body =
        request(&[datum(&[1, 2, 3], &[("weights", no_shape), ("target_tokens", unpacked)])], &[]);
    let req = decode(&body).expect("valid");
    assert_eq!(req.data[0].loss_fn_inputs["weights"].shape, vec![3]);
    let tt = &req.data[0].loss_fn_inputs["target_tokens"];
    assert_eq!(tt.shape, vec![2, 3]);
    assert_eq!(tt.values, TensorValues::I64(vec![1, 2, 3, 4, 5, 6]));
}

#[test]
fn int32_and_bfloat16_are_widened() {
    // bf16 bit patterns: 1.0 = 0x3F80, 0.5 = 0x3F00, -2.0 = 0xC000.
    let bf16: Vec<u8> = [0x3F80u16, 0x3F00, 0xC000].iter().flat_map(|b| b.to_le_bytes()).collect();
    let body = request(
        &[datum(
            &[1, 2, 3],
            &[
                ("target_tokens", dense_tensor(INT32, &i32s(&[10, 20, 30]), &[3])),
                ("weights", dense_tensor(BFLOAT16, &bf16, &[3])),
            ],
        )],
        &[],
    );
    let req = decode(&body).expect("valid");
    assert_eq!(
        req.data[0].loss_fn_inputs["target_tokens"].values,
        TensorValues::I64(vec![10, 20, 30])
    );
    assert_eq!(
        req.data[0].loss_fn_inputs["weights"].values,
        TensorValues::F32(vec![1.0, 0.5, -2.0])
    );
}

#[test]
fn csr_is_expanded_to_dense_with_zero_padding() {
    // [[0, 7, 0], [0, 0, 0], [5, 0, 6]]
    let t = csr_tensor(INT64, &i64s(&[7, 5, 6]), &[0, 1, 1, 3], &[1, 0, 2], &[3, 3]);
    let body = request(&[datum(&[1, 2, 3], &[("target_tokens", t)])], &[]);
    let req = decode(&body).expect("valid");
    let tt = &req.data[0].loss_fn_inputs["target_tokens"];
    assert_eq!(tt.shape, vec![3, 3]);
    assert_eq!(tt.values, TensorValues::I64(vec![0, 7, 0, 0, 0, 0, 5, 0, 6]));
}

#[test]
fn loss_config_prefers_v2_and_keeps_text() {
    let legacy = f_len(5, &cat(&[f_len(1, b"clip_low_threshold"), f_double(2, 0.7)]));
    let v2_num = f_len(7, &cat(&[f_len(1, b"beta"), f_len(2, &f_double(1, 0.25))]));
    let v2_text = f_len(7, &cat(&[f_len(1, b"loss_id"), f_len(2, &f_len(2, b"abc"))]));
    let d = datum(&[1], &[]);
    let only_legacy =
        decode(&request(std::slice::from_ref(&d), std::slice::from_ref(&legacy))).expect("valid");
    assert_eq!(only_legacy.loss_config.get("clip_low_threshold"), Some(&ConfigValue::Number(0.7)));
    let both = decode(&request(&[d], &[legacy, v2_num, v2_text])).expect("valid");
    assert_eq!(both.loss_config.len(), 2);
    assert_eq!(both.loss_config.get("beta"), Some(&ConfigValue::Number(0.25)));
    assert_eq!(both.loss_config.get("loss_id"), Some(&ConfigValue::Text("abc".into())));
}

fn expect_err(body: &[u8]) -> ProtocolError {
    match decode(body) {
        Ok(r) => panic!("expected an error, decoded {r:?}"),
        Err(e) => e,
    }
}

fn one(key: &str, tensor: Vec<u8>) -> Vec<u8> {
    request(&[datum(&[1, 2], &[(key, tensor)])], &[])
}

#[test]
fn validation_errors_name_the_field() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            one("weights", dense_tensor(0, &f32s(&[1.0, 1.0]), &[2])),
            "data[0].loss_fn_inputs[weights].dtype",
        ),
        (
            one("weights", dense_tensor(9, &f32s(&[1.0, 1.0]), &[2])),
            "data[0].loss_fn_inputs[weights].dtype",
        ),
        (
            one("weights", dense_tensor(FLOAT32, &[0u8; 7], &[2])),
            "data[0].loss_fn_inputs[weights].dense",
        ),
        (
            one("weights", dense_tensor(FLOAT32, &f32s(&[1.0, 1.0]), &[3])),
            "data[0].loss_fn_inputs[weights]",
        ),
        (
            one("target_tokens", dense_tensor(FLOAT32, &f32s(&[1.0, 1.0]), &[2])),
            "data[0].loss_fn_inputs[target_tokens].dtype",
        ),
        (
            one("weights", dense_tensor(INT64, &i64s(&[1, 1]), &[2])),
            "data[0].loss_fn_inputs[weights].dtype",
        ),
        (
            one("target_tokens", dense_tensor(INT64, &i64s(&[1, -3]), &[2])),
            "data[0].loss_fn_inputs[target_tokens]",
        ),
        (
            one("weights", dense_tensor(FLOAT32, &f32s(&[1.0, f32::NAN]), &[2])),
            "data[0].loss_fn_inputs[weights]",
        ),
        (
            one("target_tokens", csr_tensor(INT64, &i64s(&[1]), &[0, 1, 1], &[5], &[2, 3])),
            "data[0].loss_fn_inputs[target_tokens].sparse_csr.col_indices",
        ),
        (
            one("target_tokens", csr_tensor(INT64, &i64s(&[1]), &[0, 1], &[0], &[2, 3])),
            "data[0].loss_fn_inputs[target_tokens].sparse_csr.crow_indices",
        ),
        (
            one("target_tokens", csr_tensor(INT64, &i64s(&[1, 2]), &[0, 2, 1], &[0, 1], &[2, 3])),
            "data[0].loss_fn_inputs[target_tokens].sparse_csr.crow_indices",
        ),
        (
            one("target_tokens", csr_tensor(INT64, &i64s(&[1, 2]), &[0, 2], &[1, 1], &[1, 3])),
            "data[0].loss_fn_inputs[target_tokens].sparse_csr.col_indices",
        ),
        (
            one("target_tokens", csr_tensor(INT64, &i64s(&[1]), &[0, 1], &[0], &[3])),
            "data[0].loss_fn_inputs[target_tokens].shape",
        ),
        (request(&[datum(&[1, -5], &[])], &[]), "data[0].model_input[0].encoded_text.tokens"),
        (
            request(&[f_len(1, &f_len(1, &f_len(1, &[0u8; 3])))], &[]),
            "data[0].model_input[0].encoded_text.tokens",
        ),
        (request(&[f_len(1, &f_len(2, &f_len(2, b"png")))], &[]), "data[0].model_input[0]"),
        (request(&[f_len(1, &[])], &[]), "data[0].model_input[0].chunk"),
        (one("weights", f_varint(3, FLOAT32)), "data[0].loss_fn_inputs[weights].encoding"),
    ];
    for (i, (body, field)) in cases.iter().enumerate() {
        let err = expect_err(body);
        let msg = err.to_string();
        assert!(msg.starts_with(field), "case {i}: error `{msg}` does not name `{field}`");
    }
}

#[test]
fn negative_dims_and_huge_shapes_are_refused_without_allocating() {
    // -1 as a varint is ten bytes (two's complement of a 64-bit value).
    let neg = cat(&[f_len(1, &f32s(&[1.0])), f_varint(3, FLOAT32), f_varint(4, u64::MAX)]);
    assert!(matches!(expect_err(&one("weights", neg)), ProtocolError::BadShape { .. }));
    let huge = csr_tensor(FLOAT32, &[], &[0, 0], &[], &[1, 1 << 40]);
    assert!(matches!(expect_err(&one("weights", huge)), ProtocolError::TooLarge { .. }));
}

#[test]
fn request_level_fields_are_checked() {
    let no_model = cat(&[f_varint(2, 1), f_len(4, b"cross_entropy")]);
    assert!(expect_err(&no_model).to_string().starts_with("model_id"));
    let no_loss = cat(&[f_len(1, b"m"), f_varint(2, 1)]);
    assert!(expect_err(&no_loss).to_string().starts_with("loss_fn"));
    let neg_seq = cat(&[f_len(1, b"m"), f_varint(2, u64::MAX), f_len(4, b"ppo")]);
    assert!(expect_err(&neg_seq).to_string().starts_with("seq_id"));
    let limits = DecodeLimits { max_datums: 1, ..DecodeLimits::default() };
    let two = request(&[datum(&[1], &[]), datum(&[2], &[])], &[]);
    assert!(matches!(decode_forward_backward(&two, &limits), Err(ProtocolError::TooLarge { .. })));
    assert!(matches!(decode(&[0xff, 0xff, 0xff]), Err(ProtocolError::Malformed { .. })));
}

#[test]
fn forward_backward_output_matches_the_spec_layout() {
    // Spec §7: two datums with 4 and 6 logprobs -> 40 data bytes, offsets [0, 16, 40], trailing [].
    let lp1 = vec![-0.5f32, -1.0, -1.5, -2.0];
    let lp2 = vec![-0.25f32, -0.75, -1.25, -1.75, -2.25, -2.75];
    let outputs = vec![
        DatumOutput {
            logprobs: FloatArray::vector(lp1.clone()),
            elementwise_loss: FloatArray::vector(vec![0.0; 4]),
        },
        DatumOutput {
            logprobs: FloatArray::vector(lp2.clone()),
            elementwise_loss: FloatArray::vector(vec![1.0; 6]),
        },
    ];
    let mut metrics = BTreeMap::new();
    metrics.insert("loss:sum".to_string(), 6.0);
    let bytes = encode_forward_backward_output(&outputs, &metrics, "CrossEntropyLossReturn")
        .expect("encode");
    let msg =
        <proto::ForwardBackwardOutput as prost::Message>::decode(bytes.as_slice()).expect("decode");
    assert_eq!(msg.loss_fn_output_type, "CrossEntropyLossReturn");
    assert_eq!(msg.metrics.get("loss:sum"), Some(&6.0));
    assert_eq!(msg.loss_fn_outputs.len(), 1);
    let rec = &msg.loss_fn_outputs[0];
    assert_eq!(rec.num_datums, 2);
    let lp = &rec.fields["logprobs"];
    assert_eq!(lp.dtype, 1);
    assert!(lp.trailing_shape.is_empty());
    assert_eq!(lp.offsets, i64s(&[0, 16, 40]));
    assert_eq!(lp.data, [f32s(&lp1), f32s(&lp2)].concat());
    assert_eq!(rec.fields["elementwise_loss"].offsets, i64s(&[0, 16, 40]));
}

#[test]
fn forward_backward_output_with_topk_targets_has_trailing_k() {
    let out = DatumOutput {
        logprobs: FloatArray {
            values: vec![-1.0, -2.0, -3.0, -4.0, -5.0, -6.0],
            shape: vec![3, 2],
        },
        elementwise_loss: FloatArray::vector(vec![1.0, 2.0, 3.0]),
    };
    let bytes =
        encode_forward_backward_output(&[out], &BTreeMap::new(), "ArrayRecord").expect("encode");
    let msg =
        <proto::ForwardBackwardOutput as prost::Message>::decode(bytes.as_slice()).expect("decode");
    let lp = &msg.loss_fn_outputs[0].fields["logprobs"];
    assert_eq!(lp.trailing_shape, vec![2]);
    assert_eq!(lp.offsets, i64s(&[0, 24]));
    // Decoding with the client's rule gives back [3, 2].
    let dec = decode_forward_backward_output(&bytes).expect("decode");
    assert_eq!(dec.outputs[0]["logprobs"].shape, vec![3, 2]);
    assert_eq!(dec.outputs[0]["elementwise_loss"].shape, vec![3]);
}

#[test]
fn forward_backward_output_rejects_bad_metric_keys_and_shapes() {
    let ok = DatumOutput {
        logprobs: FloatArray::vector(vec![0.0]),
        elementwise_loss: FloatArray::vector(vec![0.0]),
    };
    for key in ["loss", "loss:sum:x", ":sum", "loss:"] {
        let mut m = BTreeMap::new();
        m.insert(key.to_string(), 1.0);
        let err =
            encode_forward_backward_output(std::slice::from_ref(&ok), &m, "x").expect_err(key);
        assert!(err.to_string().starts_with(&format!("metrics[{key}]")), "{err}");
    }
    let bad = DatumOutput {
        logprobs: FloatArray { values: vec![0.0; 3], shape: vec![2] },
        elementwise_loss: FloatArray::vector(vec![0.0]),
    };
    assert!(matches!(
        encode_forward_backward_output(&[bad], &BTreeMap::new(), "x"),
        Err(ProtocolError::ShapeMismatch { .. })
    ));
    let mixed = vec![
        DatumOutput {
            logprobs: FloatArray { values: vec![0.0; 2], shape: vec![1, 2] },
            elementwise_loss: FloatArray::vector(vec![0.0]),
        },
        DatumOutput {
            logprobs: FloatArray { values: vec![0.0; 3], shape: vec![1, 3] },
            elementwise_loss: FloatArray::vector(vec![0.0]),
        },
    ];
    assert!(matches!(
        encode_forward_backward_output(&mixed, &BTreeMap::new(), "x"),
        Err(ProtocolError::BadShape { .. })
    ));
}

#[test]
fn sample_response_bytes_are_exact() {
    let seq = SampledSequenceOut {
        stop_reason: StopReason::Length,
        tokens: vec![5],
        logprobs: vec![-0.5],
    };
    let bytes = encode_sample_response(std::slice::from_ref(&seq), None).expect("encode");
    // SampleResponse.sequences (1) = SampledSequence { stop_reason (1) = 1, tokens (2) = 05 00 00 00,
    // logprobs (3) = -0.5f32 = 0xBF000000 little-endian }.
    let expected: Vec<u8> =
        vec![0x0a, 0x0e, 0x08, 0x01, 0x12, 0x04, 5, 0, 0, 0, 0x1a, 0x04, 0, 0, 0, 0xbf];
    assert_eq!(bytes, expected);
    let with_prompt = encode_sample_response(&[seq], Some(&[None, Some(-2.0)])).expect("encode");
    // prompt_logprobs (2): NaN = 0x7FC00000, -2.0 = 0xC0000000.
    let tail: Vec<u8> = vec![0x12, 0x08, 0, 0, 0xc0, 0x7f, 0, 0, 0, 0xc0];
    assert_eq!(&with_prompt[expected.len()..], tail.as_slice());
    let dec = decode_sample_response(&with_prompt).expect("decode");
    assert_eq!(dec.prompt_logprobs, Some(vec![None, Some(-2.0)]));
    assert_eq!(dec.sequences[0].tokens, vec![5]);
    let mismatch = SampledSequenceOut {
        stop_reason: StopReason::Stop,
        tokens: vec![1, 2],
        logprobs: vec![0.0],
    };
    assert!(encode_sample_response(&[mismatch], None).is_err());
}

mod xorshift_support;
// xorshift64*: deterministic bytes for the no-panic test.
use xorshift_support::Rng;

#[test]
fn random_truncated_and_mutated_bytes_never_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let limits = DecodeLimits::default();
    let valid = request(
        &[datum(
            &[1, 2, 3],
            &[
                ("target_tokens", csr_tensor(INT64, &i64s(&[7, 5]), &[0, 1, 2], &[1, 0], &[2, 2])),
                ("weights", dense_tensor(FLOAT32, &f32s(&[1.0, 0.5, 0.0, 1.0]), &[2, 2])),
            ],
        )],
        &[f_len(7, &cat(&[f_len(1, b"beta"), f_len(2, &f_double(1, 0.25))]))],
    );
    assert!(decode_forward_backward(&valid, &limits).is_ok());
    let mut ok = 0;
    for cut in 0..valid.len() {
        ok += usize::from(decode_forward_backward(&valid[..cut], &limits).is_ok());
    }
    for _ in 0..20_000 {
        let mut m = valid.clone();
        for _ in 0..(1 + rng.next_u64() % 4) {
            let i = (rng.next_u64() as usize) % m.len();
            m[i] = rng.next_u64() as u8;
        }
        ok += usize::from(decode_forward_backward(&m, &limits).is_ok());
        let len = (rng.next_u64() % 96) as usize;
        let junk: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let _ = decode_forward_backward(&junk, &limits);
        let _ = decode_forward_backward_output(&junk);
        let _ = decode_sample_response(&junk);
    }
    // Some mutations (e.g. of payload bytes) stay valid; the point is that none panicked.
    assert!(ok > 0);
}
