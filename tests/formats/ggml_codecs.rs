//! The ggml block codecs (src/quant/ggml/) against fixtures written by llama.cpp's own
//! Python package `gguf` (and, for the k-quant encoders, by llama.cpp's C reference
//! `quantize_row_*_ref`): tests/fixtures/gguf/, made by scripts/make-gguf-fixtures.py.
//! Encoders must give the same bytes, decoders the same floats (bit for bit).

use compress::quant::ggml::{dequantize, quantize, GgmlType};
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf")
}

fn read(name: &str) -> Option<Vec<u8>> {
    std::fs::read(dir().join(name)).ok()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "{what}: element {i}: ours {g}, reference {w}"
        );
    }
}

fn check_encode(ty: GgmlType, file: &str) {
    let x = f32s(&read(&format!("{file}.in.f32")).expect("fixture"));
    let want = read(&format!("{file}.q")).expect("fixture");
    let got = quantize(ty, &x).unwrap();
    assert_eq!(got.len(), want.len(), "{file}: encoded length");
    let bs = ty.type_size();
    for (i, (g, w)) in got.chunks(bs).zip(want.chunks(bs)).enumerate() {
        assert_eq!(
            g, w,
            "{file}: block {i} differs from the reference encoding"
        );
    }
}

fn check_decode(ty: GgmlType, q: &str, dq: &str) {
    let b = read(q).expect("fixture");
    let want = f32s(&read(dq).expect("fixture"));
    let got = dequantize(ty, &b, want.len()).unwrap();
    same_bits(q, &got, &want);
}

const ENCODED_BY_GGUF_PY: [(GgmlType, &str); 7] = [
    (GgmlType::Q8_0, "q8_0"),
    (GgmlType::Q4_0, "q4_0"),
    (GgmlType::Q4_1, "q4_1"),
    (GgmlType::Q5_0, "q5_0"),
    (GgmlType::Q5_1, "q5_1"),
    (GgmlType::F16, "f16"),
    (GgmlType::BF16, "bf16"),
];

const KQUANTS: [(GgmlType, &str); 3] = [
    (GgmlType::Q4K, "q4_k"),
    (GgmlType::Q5K, "q5_k"),
    (GgmlType::Q6K, "q6_k"),
];

#[test]
fn encoders_match_gguf_py() {
    for (ty, f) in ENCODED_BY_GGUF_PY {
        check_encode(ty, f);
    }
}

#[test]
fn decoders_match_gguf_py() {
    for (ty, f) in ENCODED_BY_GGUF_PY {
        check_decode(ty, &format!("{f}.q"), &format!("{f}.dq.f32"));
    }
    for (ty, f) in KQUANTS {
        check_decode(ty, &format!("{f}.rand.q"), &format!("{f}.rand.dq.f32"));
    }
}

#[test]
fn kquant_encoders_match_llama_cpp_reference() {
    for (ty, f) in KQUANTS {
        check_encode(ty, f);
        check_decode(ty, &format!("{f}.q"), &format!("{f}.dq.f32"));
    }
}

#[test]
fn importance_weighted_encoders_match_llama_cpp() {
    // quantize_<type>(x, y, rows, 256, imatrix) of llama.cpp's ggml-quants.c
    for (ty, f) in [
        (GgmlType::Q4_0, "q4_0"),
        (GgmlType::Q4_1, "q4_1"),
        (GgmlType::Q5_0, "q5_0"),
        (GgmlType::Q5_1, "q5_1"),
        (GgmlType::Q4K, "q4_k"),
        (GgmlType::Q5K, "q5_k"),
        (GgmlType::Q6K, "q6_k"),
    ] {
        let x = f32s(&read(&format!("{f}.imat.in.f32")).expect("fixture"));
        let qw = f32s(&read(&format!("{f}.imat.qw.f32")).expect("fixture"));
        let want = read(&format!("{f}.imat.q")).expect("fixture");
        let got = compress::quant::ggml::quantize_weighted(ty, &x, qw.len(), &qw).unwrap();
        assert_eq!(got.len(), want.len(), "{f}: length");
        let bs = ty.type_size();
        for (i, (g, w)) in got.chunks(bs).zip(want.chunks(bs)).enumerate() {
            assert_eq!(g, w, "{f}: imatrix block {i} differs from llama.cpp");
        }
        // and the weights matter: the plain reference encoding differs somewhere
        assert_ne!(quantize(ty, &x).unwrap(), got, "{f}");
    }
}
