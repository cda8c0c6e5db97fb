//! ggml's block quantization types (the tensor encodings of GGUF files), encoders and decoders
//! bit-exact with llama.cpp's reference implementation.
//!
//! Reference: ggml/src/ggml-quants.c (llama.cpp; the copy read for this file is the one vendored
//! in ollama's ml/backend/ggml/ggml/src/ggml-quants.c): `quantize_row_{q4_0,q4_1,q5_0,q5_1,
//! q8_0,q4_K,q5_K,q6_K}_ref`, their `dequantize_row_*`, and the helpers `nearest_int`,
//! `make_qx_quants`, `make_qkx2_quants`, `get_scale_min_k4`. Block layouts: ggml-common.h.
//! These `_ref` encoders are what `llama-quantize` runs when no importance matrix is given
//! (`quantize_q4_K(…, quant_weights = NULL)` calls `quantize_row_q4_K_ref`, and so on), i.e.
//! round-to-nearest onto each type's grid with the type's own scale search.
//!
//! Floating-point expressions are evaluated in the same order as the C source, with no fused
//! multiply-add (Rust never contracts `a*b+c`); a llama.cpp built with `-ffp-contract=fast` on an
//! FMA machine may round a few k-quant scale searches differently.
//!
//! | type | block | bytes | layout (in order) |
//! |---|---|---|---|
//! | Q4_0 | 32 | 18 | d f16, qs[16]: q = nibble − 8, x = q·d; element j low nibble of qs[j], j+16 high |
//! | Q4_1 | 32 | 20 | d f16, m f16, qs[16]: x = q·d + m |
//! | Q5_0 | 32 | 22 | d f16, qh u32 (5th bits), qs[16]: q = (nibble \| bit<<4) − 16 |
//! | Q5_1 | 32 | 24 | d f16, m f16, qh u32, qs[16] |
//! | Q8_0 | 32 | 34 | d f16, qs[32] i8 |
//! | Q4_K | 256 | 144 | d f16, dmin f16, scales[12] (8 × 6-bit scale and min), qs[128] |
//! | Q5_K | 256 | 176 | d f16, dmin f16, scales[12], qh[32], qs[128] |
//! | Q6_K | 256 | 210 | ql[128], qh[64], scales[16] i8, d f16 |
//!
//! Files: this one holds the type table and the whole-tensor entry points; `legacy` (blocks of
//! 32), `kquants` (super-blocks of 256), `helpers` (the shared scalar helpers and scale
//! searches), `weighted` (imatrix encoders), `vecdot` (llama.cpp's activation formats), `codes`
//! (the codes and decoding grid of one encoded block).

mod codes;
mod helpers;
mod kquants;
mod legacy;
mod vecdot;
mod weighted;

pub use codes::{levels, pack_codes, unpack_codes, BlockGrid};
pub use vecdot::VecDot;
pub use weighted::quantize_weighted;

use anyhow::{bail, ensure, Result};
use helpers::{bf16_bits, fp16, fp16_at};
use kquants::{dq4_k, dq5_k, dq6_k, q4_k_block, q5_k_block, q6_k_block};
use legacy::{
    dq4_0, dq4_1, dq5_0, dq5_1, dq8_0, q4_0_block, q4_1_block, q5_0_block, q5_1_block, q8_0_block,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub const QK_K: usize = 256;

/// The ggml tensor types we write and read (ids as in ggml.h `enum ggml_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

pub const ALL_TYPES: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

impl GgmlType {
    /// `enum ggml_type` value.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    pub fn from_id(id: u32) -> Option<Self> {
        ALL_TYPES.into_iter().find(|t| t.id() == id)
    }

    /// ggml's name (`ggml_type_name`), lower case as in `--tensor-type` arguments.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::BF16 => "bf16",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q4_1 => "q4_1",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q4K => "q4_K",
            GgmlType::Q5K => "q5_K",
            GgmlType::Q6K => "q6_K",
        }
    }

    /// Parse a type name, case-insensitively (`q4_k`, `Q4_K`, `q8_0`).
    pub fn parse(s: &str) -> Option<Self> {
        let l = s.to_ascii_lowercase();
        ALL_TYPES
            .into_iter()
            .find(|t| t.name().to_ascii_lowercase() == l)
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Bytes of `n` elements (`n` a multiple of the block size).
    pub fn bytes_for(self, n: usize) -> Result<usize> {
        let b = self.block_size();
        ensure!(
            n.is_multiple_of(b),
            "{} elements do not fill whole {} blocks of {b}",
            n,
            self.name()
        );
        Ok(n / b * self.type_size())
    }
}

/// Encode `x` (length a multiple of the block size) as `ty`.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>> {
    let bs = ty.block_size();
    let ts = ty.type_size();
    let mut out = vec![0u8; ty.bytes_for(x.len())?];
    match ty {
        GgmlType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&fp16(*v));
            }
        }
        GgmlType::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&bf16_bits(*v).to_le_bytes());
            }
        }
        _ => {
            // blocks are independent: encode them in parallel, each into its own bytes
            out.par_chunks_mut(ts)
                .zip(x.par_chunks(bs))
                .for_each(|(y, xb)| match ty {
                    GgmlType::Q4_0 => q4_0_block(xb, y),
                    GgmlType::Q4_1 => q4_1_block(xb, y),
                    GgmlType::Q5_0 => q5_0_block(xb, y),
                    GgmlType::Q5_1 => q5_1_block(xb, y),
                    GgmlType::Q8_0 => q8_0_block(xb, y),
                    GgmlType::Q4K => q4_k_block(xb, y),
                    GgmlType::Q5K => q5_k_block(xb, y),
                    GgmlType::Q6K => q6_k_block(xb, y),
                    GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {}
                });
        }
    }
    Ok(out)
}

/// Decode `n` elements of type `ty` from `b` (exactly `ty.bytes_for(n)` bytes).
pub fn dequantize(ty: GgmlType, b: &[u8], n: usize) -> Result<Vec<f32>> {
    let want = ty.bytes_for(n)?;
    if b.len() != want {
        bail!(
            "{} data of {n} elements must be {want} bytes, found {}",
            ty.name(),
            b.len()
        );
    }
    let bs = ty.block_size();
    let ts = ty.type_size();
    let mut y = vec![0f32; n];
    match ty {
        GgmlType::F32 => {
            for (o, c) in y.iter_mut().zip(b.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (i, o) in y.iter_mut().enumerate() {
                *o = fp16_at(b, 2 * i);
            }
        }
        GgmlType::BF16 => {
            for (o, c) in y.iter_mut().zip(b.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        _ => {
            y.par_chunks_mut(bs)
                .zip(b.par_chunks(ts))
                .for_each(|(yb, xb)| match ty {
                    GgmlType::Q4_0 => dq4_0(xb, yb),
                    GgmlType::Q4_1 => dq4_1(xb, yb),
                    GgmlType::Q5_0 => dq5_0(xb, yb),
                    GgmlType::Q5_1 => dq5_1(xb, yb),
                    GgmlType::Q8_0 => dq8_0(xb, yb),
                    GgmlType::Q4K => dq4_k(xb, yb),
                    GgmlType::Q5K => dq5_k(xb, yb),
                    GgmlType::Q6K => dq6_k(xb, yb),
                    GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {}
                });
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gaussian-ish values with a few outliers (a weight row's shape), deterministic.
    pub(super) fn weights(n: usize, seed: u64) -> Vec<f32> {
        let mut lcg = crate::testing::Lcg(seed);
        (0..n)
            .map(|i| {
                let v = lcg.gaussian() as f32 * 0.02;
                if i % 97 == 3 {
                    v * 8.0
                } else {
                    v
                }
            })
            .collect()
    }

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        // a smooth row: every type's error must be well below the value range
        let x: Vec<f32> = (0..512).map(|i| ((i as f32) * 0.37).sin()).collect();
        for ty in ALL_TYPES {
            let b = quantize(ty, &x).unwrap();
            assert_eq!(b.len(), ty.bytes_for(512).unwrap());
            let y = dequantize(ty, &b, 512).unwrap();
            let err = x
                .iter()
                .zip(&y)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let bound = match ty {
                GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4K => 0.15,
                GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5K => 0.07,
                GgmlType::Q6K => 0.04,
                GgmlType::Q8_0 => 0.01,
                _ => 0.005,
            };
            assert!(err < bound, "{}: max error {err}", ty.name());
        }
    }

    #[test]
    fn zero_rows_encode_to_zero() {
        let x = vec![0f32; 256];
        for ty in ALL_TYPES {
            let y = dequantize(ty, &quantize(ty, &x).unwrap(), 256).unwrap();
            assert!(y.iter().all(|v| *v == 0.0), "{}", ty.name());
        }
    }

    #[test]
    fn wrong_lengths_are_refused() {
        assert!(quantize(GgmlType::Q4K, &[0.0; 32]).is_err());
        assert!(dequantize(GgmlType::Q8_0, &[0u8; 33], 32).is_err());
    }
}
