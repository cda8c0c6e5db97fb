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

use anyhow::{bail, ensure, Result};
use half::f16;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub const QK_K: usize = 256;
/// ggml-quants.c `GROUP_MAX_EPS`.
const GROUP_MAX_EPS: f32 = 1e-15;

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

/// ggml-quants.c `nearest_int`: round to nearest (ties to even) through the float adder.
#[inline]
fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12582912.0f32;
    (val.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

#[inline]
fn fp16(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

#[inline]
fn fp16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// ggml `ggml_compute_fp32_to_bf16`: NaN kept quiet, otherwise round to nearest even.
fn bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u as u64 + (0x7fff + ((u >> 16) & 1)) as u64) >> 16) as u16
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

// ---------------------------------------------------------------- blocks of 32

/// The element of largest magnitude (the first one on ties), as `quantize_row_q4_0_ref` finds it.
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// `quantize_row_q4_0_ref`: d = max/−8 (max = the signed largest-magnitude element),
/// q = min(15, trunc(x/d + 8.5)).
fn q4_0_block(x: &[f32], y: &mut [u8]) {
    let d = signed_absmax(x) / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&fp16(d));
    for j in 0..16 {
        let x0 = x[j] * id;
        let x1 = x[16 + j] * id;
        let q0 = ((x0 + 8.5) as i8 as i32).min(15) as u8;
        let q1 = ((x1 + 8.5) as i8 as i32).min(15) as u8;
        y[2 + j] = q0 | (q1 << 4);
    }
}

/// `quantize_row_q4_1_ref`: d = (max − min)/15, m = min, q = min(15, trunc((x − min)/d + 0.5)).
fn q4_1_block(x: &[f32], y: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&fp16(d));
    y[2..4].copy_from_slice(&fp16(min));
    for j in 0..16 {
        let x0 = (x[j] - min) * id;
        let x1 = (x[16 + j] - min) * id;
        let q0 = ((x0 + 0.5) as i8 as i32).min(15) as u8;
        let q1 = ((x1 + 0.5) as i8 as i32).min(15) as u8;
        y[4 + j] = q0 | (q1 << 4);
    }
}

/// `quantize_row_q5_0_ref`: d = max/−16, q = min(31, trunc(x/d + 16.5)); the 5th bits in qh.
fn q5_0_block(x: &[f32], y: &mut [u8]) {
    let d = signed_absmax(x) / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&fp16(d));
    let mut qh = 0u32;
    for j in 0..16 {
        let x0 = x[j] * id;
        let x1 = x[16 + j] * id;
        let q0 = ((x0 + 16.5) as i8 as i32).min(31) as u8;
        let q1 = ((x1 + 16.5) as i8 as i32).min(31) as u8;
        y[6 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
        qh |= (((q0 & 0x10) >> 4) as u32) << j;
        qh |= (((q1 & 0x10) >> 4) as u32) << (j + 16);
    }
    y[2..6].copy_from_slice(&qh.to_le_bytes());
}

/// `quantize_row_q5_1_ref`: d = (max − min)/31, m = min, q = trunc((x − min)/d + 0.5).
fn q5_1_block(x: &[f32], y: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&fp16(d));
    y[2..4].copy_from_slice(&fp16(min));
    let mut qh = 0u32;
    for j in 0..16 {
        let x0 = (x[j] - min) * id;
        let x1 = (x[16 + j] - min) * id;
        let q0 = (x0 + 0.5) as u8;
        let q1 = (x1 + 0.5) as u8;
        y[8 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
        qh |= (((q0 & 0x10) >> 4) as u32) << j;
        qh |= (((q1 & 0x10) >> 4) as u32) << (j + 16);
    }
    y[4..8].copy_from_slice(&qh.to_le_bytes());
}

/// `quantize_row_q8_0_ref`: d = amax/127, q = roundf(x/d) (half away from zero).
fn q8_0_block(x: &[f32], y: &mut [u8]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&fp16(d));
    for j in 0..32 {
        y[2 + j] = ((x[j] * id).round() as i8) as u8;
    }
}

fn dq4_0(b: &[u8], y: &mut [f32]) {
    let d = fp16_at(b, 0);
    for j in 0..16 {
        y[j] = ((b[2 + j] & 0x0f) as i32 - 8) as f32 * d;
        y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
    }
}

fn dq4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (fp16_at(b, 0), fp16_at(b, 2));
    for j in 0..16 {
        y[j] = (b[4 + j] & 0x0f) as f32 * d + m;
        y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
    }
}

fn dq5_0(b: &[u8], y: &mut [f32]) {
    let d = fp16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as i32;
        let h1 = ((qh >> (j + 12)) & 0x10) as i32;
        y[j] = ((((b[6 + j] & 0x0f) as i32) | h0) - 16) as f32 * d;
        y[j + 16] = ((((b[6 + j] >> 4) as i32) | h1) - 16) as f32 * d;
    }
}

fn dq5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (fp16_at(b, 0), fp16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as i32;
        let h1 = ((qh >> (j + 12)) & 0x10) as i32;
        y[j] = (((b[8 + j] & 0x0f) as i32) | h0) as f32 * d + m;
        y[j + 16] = (((b[8 + j] >> 4) as i32) | h1) as f32 * d + m;
    }
}

fn dq8_0(b: &[u8], y: &mut [f32]) {
    let d = fp16_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

// ---------------------------------------------------------------- k-quants (super-blocks of 256)

/// `make_qkx2_quants`: asymmetric `nmax`-level quantization of `x` with weights, searching
/// `nstep + 1` scales `(rmin + rdelta·is + nmax)/(max − min)` and keeping the least weighted
/// error (absolute when `use_mad`, else squared). Returns (scale, −min) and the levels in `l`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let mut laux = [0u8; 32];
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].iter_mut().for_each(|v| *v = 0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min));
        l[i] = q.clamp(0, nmax) as u8;
        let mut diff = scale * l[i] as f32 + min - x[i];
        diff = if use_mad { diff.abs() } else { diff * diff };
        best_error += weights[i] * diff;
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let w = weights[i];
            let lf = q as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let mut diff = this_scale * laux[i] as f32 + this_min - x[i];
                diff = if use_mad { diff.abs() } else { diff * diff };
                cur_error += weights[i] * diff;
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// `make_qx_quants` with `rmse_type` 1 (the path `quantize_row_q6_K_ref` and the imatrix
/// encoders take): symmetric levels in [−nmax, nmax), weights `qw` (x² without an imatrix),
/// and a search over 18 scales around −nmax/max. Returns the scale; `l` holds level + nmax.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8], qw: Option<&[f32]>) -> f32 {
    let n = x.len();
    let w_of = |i: usize| match qw {
        Some(q) => q[i],
        None => x[i] * x[i],
    };
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l[..n].iter_mut().for_each(|v| *v = 0);
        return 0.0;
    }
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..n {
        let q = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l[i] = (q + nmax) as i8;
        let w = w_of(i);
        let lf = q as f32;
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for (i, &xi) in x.iter().enumerate() {
            let q = nearest_int(iscale * xi).clamp(-nmax, nmax - 1);
            let w = w_of(i);
            let lf = q as f32;
            sumlx += w * xi * lf;
            suml2 += w * lf * lf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..n {
                let q = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
                l[i] = (nmax + q) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `make_qp_quants`: quantize the non-negative sub-block scales (or mins) `x` to levels
/// 0..=nmax with weights `qw` (a 9-point scale search, then up to 5 rounds of coordinate
/// refinement). Returns the super-block scale; `l` holds the levels.
fn make_qp_quants(nmax: i32, x: &[f32], l: &mut [u8], qw: &[f32]) -> f32 {
    let n = x.len();
    let mut max = 0f32;
    for &v in x {
        max = max.max(v);
    }
    if max < GROUP_MAX_EPS {
        l[..n].iter_mut().for_each(|v| *v = 0);
        return 0.0;
    }
    let mut iscale = nmax as f32 / max;
    for i in 0..n {
        l[i] = nearest_int(iscale * x[i]) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0f32;
    for i in 0..n {
        let diff = x[i] - scale * l[i] as f32;
        best_mse += qw[i] * diff * diff;
    }
    for is in -4i32..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1 * is as f32 + nmax as f32) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0f32;
        for i in 0..n {
            let q = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * q as f32;
            mse += qw[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..n {
        let q = nearest_int(iscale * x[i]).min(nmax);
        l[i] = q as u8;
        let w = qw[i];
        sumlx += w * x[i] * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for i in 0..n {
            let w = qw[i];
            let li = l[i] as f32;
            let mut slx = sumlx - w * x[i] * li;
            let mut sl2 = suml2 - w * li * li;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != l[i] as i32 {
                    slx += w * x[i] * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l[i] = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// `get_scale_min_k4`: the j-th 6-bit scale and min of a Q4_K/Q5_K super-block.
#[inline]
fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The shared first half of `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref`: per sub-block of
/// 32 a `make_qkx2_quants` search with weights av_x + |x|, then the 8 scales and 8 mins
/// quantized to 6 bits against their maxima and packed into `scales[12]`; returns the levels
/// re-derived from the stored (rounded) scales, as the C code does.
fn k_scales_and_levels(x: &[f32], nmax: i32, rmin: f32, nstep: i32, hdr: &mut [u8]) -> [u8; QK_K] {
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut weights = [0f32; 32];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            rmin,
            0.1,
            nstep,
            false,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut hdr[4..16];
    sc.iter_mut().for_each(|v| *v = 0);
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    hdr[0..2].copy_from_slice(&fp16(max_scale / 63.0));
    hdr[2..4].copy_from_slice(&fp16(max_min / 63.0));
    let dd = fp16_at(hdr, 0);
    let dmin = fp16_at(hdr, 2);
    for j in 0..8 {
        let (s, m) = get_scale_min_k4(j, &hdr[4..16]);
        let d = dd * s as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for ii in 0..32 {
            let q = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax);
            l[32 * j + ii] = q as u8;
        }
    }
    l
}

/// `quantize_row_q4_K_ref` for one super-block.
fn q4_k_block(x: &[f32], y: &mut [u8]) {
    let l = k_scales_and_levels(x, 15, -1.0, 20, &mut y[..16]);
    pack_q4_k(&l, &mut y[16..144]);
}

/// `quantize_row_q5_K_ref` for one super-block.
fn q5_k_block(x: &[f32], y: &mut [u8]) {
    let l = k_scales_and_levels(x, 31, -0.5, 15, &mut y[..16]);
    pack_q5_k(&l, &mut y[16..176]);
}

/// `quantize_row_q6_K_ref` for one super-block: 16 sub-blocks of 16 with `make_qx_quants`
/// (32 levels each side), the sub-block scales as int8 against the largest one.
fn q6_k_block(x: &[f32], y: &mut [u8]) {
    q6_k_block_w(x, None, y)
}

/// `quantize_row_q6_K_impl` (with importance weights `qw` for this super-block; `None` is the
/// reference encoder): the sub-block search weighs by `qw` instead of x².
fn q6_k_block_w(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let s = make_qx_quants(
            32,
            &x[16 * ib..16 * ib + 16],
            &mut l[16 * ib..16 * ib + 16],
            qw.map(|q| &q[16 * ib..16 * ib + 16]),
        );
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        y.iter_mut().for_each(|v| *v = 0);
        return;
    }
    let iscale = -128.0 / max_scale;
    y[208..210].copy_from_slice(&fp16(1.0 / iscale));
    let d_all = fp16_at(y, 208);
    for ib in 0..16 {
        y[192 + ib] = (nearest_int(iscale * scales[ib]).min(127) as i8) as u8;
    }
    for j in 0..16 {
        let d = d_all * (y[192 + j] as i8) as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
            l[16 * j + ii] = (q + 32) as i8;
        }
    }
    let mut lu = [0u8; QK_K];
    lu.iter_mut().zip(&l).for_each(|(u, v)| *u = *v as u8);
    pack_q6_k(&lu, &mut y[..192]);
}

/// ql[128] and qh[64] of a Q6_K super-block from levels 0..=63.
fn pack_q6_k(l: &[u8], y: &mut [u8]) {
    let (ql, rest) = y.split_at_mut(128);
    let qh = &mut rest[..64];
    for (c, j) in (0..QK_K).step_by(128).enumerate() {
        for i in 0..32 {
            let lv = |o: usize| l[j + i + o];
            ql[64 * c + i] = (lv(0) & 0x0f) | ((lv(64) & 0x0f) << 4);
            ql[64 * c + i + 32] = (lv(32) & 0x0f) | ((lv(96) & 0x0f) << 4);
            qh[32 * c + i] =
                (lv(0) >> 4) | ((lv(32) >> 4) << 2) | ((lv(64) >> 4) << 4) | ((lv(96) >> 4) << 6);
        }
    }
}

// ---------------------------------------------------------------- llama.cpp's activations

/// The format llama.cpp's CPU backend converts a matmul's activations to before its dot
/// products with a weight of a given type (`type_traits_cpu[type].vec_dot_type`): the weight
/// stays as stored and the input row is quantized, so llama.cpp computes Σ w·x̂ with x̂ the
/// row's round trip through this format, not Σ w·x.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VecDot {
    /// Q4_0, Q5_0, Q8_0 weights: blocks of 32, d = amax/127 stored as fp16,
    /// q = round(x·127/amax) (x86's `quantize_row_q8_0`, round half to even).
    Q8_0,
    /// Q4_1, Q5_1: the same values as Q8_0 (plus a block sum the dot product uses for the min).
    Q8_1,
    /// k-quants: blocks of 256, q = min(127, nearest(−127/max · x)) with max the signed
    /// largest-magnitude element, d = 1/iscale in f32 (`quantize_row_q8_K_ref`).
    Q8K,
    /// F16 weights: the row rounded to fp16.
    F16,
    /// BF16 weights: the row rounded to bf16.
    BF16,
}

impl VecDot {
    /// llama.cpp's `vec_dot_type` of weight type `ty`; `None` for f32 (f32 activations).
    pub fn of(ty: GgmlType) -> Option<Self> {
        match ty {
            GgmlType::F32 => None,
            GgmlType::F16 => Some(VecDot::F16),
            GgmlType::BF16 => Some(VecDot::BF16),
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => Some(VecDot::Q8_0),
            GgmlType::Q4_1 | GgmlType::Q5_1 => Some(VecDot::Q8_1),
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => Some(VecDot::Q8K),
        }
    }

    /// Replace one activation row (its length a multiple of the block) by its round trip
    /// through this format.
    pub fn round_trip(self, row: &mut [f32]) {
        match self {
            VecDot::Q8_0 | VecDot::Q8_1 => {
                for b in row.chunks_mut(32) {
                    let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let d = f16::from_f32(amax / 127.0).to_f32();
                    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                    for v in b.iter_mut() {
                        *v = crate::quant::round_half_even(*v * id) * d;
                    }
                }
            }
            VecDot::Q8K => {
                for b in row.chunks_mut(QK_K) {
                    let (mut amax, mut max) = (0f32, 0f32);
                    for &v in b.iter() {
                        if v.abs() > amax {
                            amax = v.abs();
                            max = v;
                        }
                    }
                    if amax == 0.0 {
                        b.fill(0.0);
                        continue;
                    }
                    let iscale = -127.0 / max;
                    let d = 1.0 / iscale;
                    for v in b.iter_mut() {
                        *v = d * nearest_int(iscale * *v).min(127) as f32;
                    }
                }
            }
            VecDot::F16 => row.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
            VecDot::BF16 => row
                .iter_mut()
                .for_each(|v| *v = f32::from_bits((bf16_bits(*v) as u32) << 16)),
        }
    }
}

// ---------------------------------------------------------------- importance-weighted encoders

/// Encode a `[rows, n_per_row]` row-major matrix as `ty` with per-column importance weights
/// `qw` (length `n_per_row`): llama.cpp's `quantize_<type>(…, quant_weights)` with an imatrix
/// (`quantize_row_*_impl`): the error each element contributes is weighted by its column's
/// importance (llama-imatrix stores the mean of x² over the calibration tokens per input
/// column). Q8_0 and the float types ignore the weights, as llama.cpp does.
pub fn quantize_weighted(ty: GgmlType, x: &[f32], n_per_row: usize, qw: &[f32]) -> Result<Vec<u8>> {
    ensure!(
        qw.len() == n_per_row && n_per_row > 0 && x.len().is_multiple_of(n_per_row),
        "importance weights: {} for rows of {n_per_row} ({} values)",
        qw.len(),
        x.len()
    );
    ensure!(
        qw.iter().all(|w| w.is_finite() && *w >= 0.0),
        "importance weights must be finite and non-negative"
    );
    let row_bytes = ty.bytes_for(n_per_row)?;
    if matches!(
        ty,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0
    ) {
        return quantize(ty, x);
    }
    let mut out = vec![0u8; x.len() / n_per_row * row_bytes];
    out.par_chunks_mut(row_bytes)
        .zip(x.par_chunks(n_per_row))
        .for_each(|(y, xr)| weighted_row(ty, xr, qw, y));
    Ok(out)
}

fn weighted_row(ty: GgmlType, x: &[f32], qw: &[f32], y: &mut [u8]) {
    let bs = ty.block_size();
    let ts = ty.type_size();
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
            // sigma2 over the whole row (quantize_row_q4_0_impl & co.)
            let mut sum_x2 = 0f32;
            for &v in x {
                sum_x2 += v * v;
            }
            let sigma2 = sum_x2 / x.len() as f32;
            let mut weight = [0f32; 32];
            for ((xb, qb), yb) in x.chunks(bs).zip(qw.chunks(bs)).zip(y.chunks_mut(ts)) {
                for j in 0..32 {
                    weight[j] = qb[j] * (sigma2 + xb[j] * xb[j]).sqrt();
                }
                match ty {
                    GgmlType::Q4_0 | GgmlType::Q5_0 => {
                        let nmax = if ty == GgmlType::Q4_0 { 8 } else { 16 };
                        let mut l = [0i8; 32];
                        let d = make_qx_quants(nmax, xb, &mut l, Some(&weight));
                        yb[..2].copy_from_slice(&fp16(d));
                        let l: Vec<u8> = l.iter().map(|v| *v as u8).collect();
                        if ty == GgmlType::Q4_0 {
                            for j in 0..16 {
                                yb[2 + j] = l[j] | (l[j + 16] << 4);
                            }
                        } else {
                            pack_q5(&l, &mut yb[2..22]);
                        }
                    }
                    _ => {
                        let nmax = if ty == GgmlType::Q4_1 { 15 } else { 31 };
                        let mut l = [0u8; 32];
                        let (d, min) =
                            make_qkx2_quants(nmax, xb, &weight, &mut l, -0.9, 0.05, 36, false);
                        yb[..2].copy_from_slice(&fp16(d));
                        yb[2..4].copy_from_slice(&fp16(-min));
                        if ty == GgmlType::Q4_1 {
                            for j in 0..16 {
                                yb[4 + j] = l[j] | (l[j + 16] << 4);
                            }
                        } else {
                            pack_q5(&l, &mut yb[4..24]);
                        }
                    }
                }
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            for ((xb, qb), yb) in x.chunks(bs).zip(qw.chunks(bs)).zip(y.chunks_mut(ts)) {
                let nmax = if ty == GgmlType::Q4K { 15 } else { 31 };
                let l = k_scales_and_levels_w(xb, qb, nmax, &mut yb[..16]);
                if ty == GgmlType::Q4K {
                    pack_q4_k(&l, &mut yb[16..144]);
                } else {
                    pack_q5_k(&l, &mut yb[16..176]);
                }
            }
        }
        GgmlType::Q6K => {
            for ((xb, qb), yb) in x.chunks(bs).zip(qw.chunks(bs)).zip(y.chunks_mut(ts)) {
                q6_k_block_w(xb, Some(qb), yb);
            }
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 => {}
    }
}

/// qh (u32, the 5th bits) and qs of a Q5_0/Q5_1 block from levels 0..=31.
fn pack_q5(l: &[u8], out: &mut [u8]) {
    let mut qh = 0u32;
    for j in 0..16 {
        let (a, b) = (l[j], l[j + 16]);
        out[4 + j] = (a & 0x0f) | ((b & 0x0f) << 4);
        qh |= (((a & 0x10) >> 4) as u32) << j;
        qh |= (((b & 0x10) >> 4) as u32) << (j + 16);
    }
    out[..4].copy_from_slice(&qh.to_le_bytes());
}

/// `quantize_row_q4_K_impl` / `quantize_row_q5_K_impl` with importance weights, first half:
/// per sub-block weights qw·sqrt(σ² + x²) (σ² = 2·mean x² of the super-block), a
/// `make_qkx3_quants` search, then the 8 scales and mins quantized by `make_qp_quants`
/// weighted by each sub-block's total weight; levels re-derived from the stored scales.
fn k_scales_and_levels_w(x: &[f32], qw: &[f32], nmax: i32, hdr: &mut [u8]) -> [u8; QK_K] {
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut sw = [0f32; 8];
    let mut weights = [0f32; 32];
    let mut sum_x2 = 0f32;
    for &v in x {
        sum_x2 += v * v;
    }
    let sigma2 = 2.0 * sum_x2 / QK_K as f32;
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        for l in 0..32 {
            weights[l] = qw[32 * j + l] * (sigma2 + xs[l] * xs[l]).sqrt();
        }
        let mut sumw = 0f32;
        for w in &weights {
            sumw += w;
        }
        sw[j] = sumw;
        // make_qkx3_quants with weights given is make_qkx2_quants
        let (s, m) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            -0.9,
            0.05,
            36,
            false,
        );
        scales[j] = s;
        mins[j] = m;
    }
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    let d_block = make_qp_quants(63, &scales, &mut ls, &sw);
    let m_block = make_qp_quants(63, &mins, &mut lm, &sw);
    let sc = &mut hdr[4..16];
    sc.iter_mut().for_each(|v| *v = 0);
    for j in 0..8 {
        // quantize_row_q5_K_impl clamps to 63; q4_K's levels are ≤ 63 already
        let (a, b) = (ls[j].min(63), lm[j].min(63));
        if j < 4 {
            sc[j] = a;
            sc[j + 4] = b;
        } else {
            sc[j + 4] = (a & 0x0f) | ((b & 0x0f) << 4);
            sc[j - 4] |= (a >> 4) << 6;
            sc[j] |= (b >> 4) << 6;
        }
    }
    hdr[0..2].copy_from_slice(&fp16(d_block));
    hdr[2..4].copy_from_slice(&fp16(m_block));
    let dd = fp16_at(hdr, 0);
    let dmin = fp16_at(hdr, 2);
    for j in 0..8 {
        let (s, m) = get_scale_min_k4(j, &hdr[4..16]);
        let d = dd * s as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax) as u8;
        }
    }
    l
}

fn pack_q4_k(l: &[u8; QK_K], q: &mut [u8]) {
    for (c, j) in (0..QK_K).step_by(64).enumerate() {
        for i in 0..32 {
            q[32 * c + i] = l[j + i] | (l[j + i + 32] << 4);
        }
    }
}

fn pack_q5_k(l: &[u8; QK_K], y: &mut [u8]) {
    let (qh, ql) = y.split_at_mut(32);
    qh.iter_mut().for_each(|v| *v = 0);
    let (mut m1, mut m2) = (1u8, 2u8);
    for (c, n) in (0..QK_K).step_by(64).enumerate() {
        for j in 0..32 {
            let mut l1 = l[n + j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = l[n + j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql[32 * c + j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
}

fn dq4_k(b: &[u8], y: &mut [f32]) {
    let d = fp16_at(b, 0);
    let min = fp16_at(b, 2);
    let sc = &b[4..16];
    let q = &b[16..144];
    for c in 0..4 {
        let (s1, m1) = get_scale_min_k4(2 * c, sc);
        let (s2, m2) = get_scale_min_k4(2 * c + 1, sc);
        let (d1, mm1) = (d * s1 as f32, min * m1 as f32);
        let (d2, mm2) = (d * s2 as f32, min * m2 as f32);
        for l in 0..32 {
            y[64 * c + l] = d1 * (q[32 * c + l] & 0x0f) as f32 - mm1;
            y[64 * c + 32 + l] = d2 * (q[32 * c + l] >> 4) as f32 - mm2;
        }
    }
}

fn dq5_k(b: &[u8], y: &mut [f32]) {
    let d = fp16_at(b, 0);
    let min = fp16_at(b, 2);
    let sc = &b[4..16];
    let qh = &b[16..48];
    let ql = &b[48..176];
    let (mut u1, mut u2) = (1u8, 2u8);
    for c in 0..4 {
        let (s1, m1) = get_scale_min_k4(2 * c, sc);
        let (s2, m2) = get_scale_min_k4(2 * c + 1, sc);
        let (d1, mm1) = (d * s1 as f32, min * m1 as f32);
        let (d2, mm2) = (d * s2 as f32, min * m2 as f32);
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[64 * c + l] = d1 * ((ql[32 * c + l] & 0x0f) as i32 + h1) as f32 - mm1;
            y[64 * c + 32 + l] = d2 * ((ql[32 * c + l] >> 4) as i32 + h2) as f32 - mm2;
        }
        u1 <<= 2;
        u2 <<= 2;
    }
}

fn dq6_k(b: &[u8], y: &mut [f32]) {
    let d = fp16_at(b, 208);
    for c in 0..2 {
        let ql = &b[64 * c..64 * c + 64];
        let qh = &b[128 + 32 * c..128 + 32 * c + 32];
        let sc = &b[192 + 8 * c..192 + 8 * c + 8];
        let yc = &mut y[128 * c..128 * c + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * (sc[is + k] as i8) as f32;
            yc[l] = s(0) * q1 as f32;
            yc[l + 32] = s(2) * q2 as f32;
            yc[l + 64] = s(4) * q3 as f32;
            yc[l + 96] = s(6) * q4 as f32;
        }
    }
}

// ---------------------------------------------------------------- the codes of an encoded block

/// Levels a code of `ty` takes (0..levels): what a GPTQ sweep onto this grid chooses among.
pub fn levels(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4K => 16,
        GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5K => 32,
        GgmlType::Q6K => 64,
        GgmlType::Q8_0 => 256,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 0,
    }
}

/// The codes of one encoded block of `ty` (one per element, 0..levels; Q8_0's i8 q as q + 128),
/// leaving its scales and mins aside.
pub fn unpack_codes(ty: GgmlType, b: &[u8], codes: &mut [u8]) {
    let nib = |q: &[u8], c: &mut [u8]| {
        for j in 0..16 {
            c[j] = q[j] & 0x0f;
            c[j + 16] = q[j] >> 4;
        }
    };
    let q5 = |qh: &[u8], q: &[u8], c: &mut [u8]| {
        let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
        nib(q, c);
        for (j, v) in c.iter_mut().enumerate().take(32) {
            *v |= (((qh >> j) & 1) as u8) << 4;
        }
    };
    match ty {
        GgmlType::Q4_0 => nib(&b[2..18], codes),
        GgmlType::Q4_1 => nib(&b[4..20], codes),
        GgmlType::Q5_0 => q5(&b[2..6], &b[6..22], codes),
        GgmlType::Q5_1 => q5(&b[4..8], &b[8..24], codes),
        GgmlType::Q8_0 => {
            for j in 0..32 {
                codes[j] = ((b[2 + j] as i8) as i32 + 128) as u8;
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let (qh, q) = if ty == GgmlType::Q4K {
                (None, &b[16..144])
            } else {
                (Some(&b[16..48]), &b[48..176])
            };
            for c in 0..4 {
                for l in 0..32 {
                    codes[64 * c + l] = q[32 * c + l] & 0x0f;
                    codes[64 * c + 32 + l] = q[32 * c + l] >> 4;
                    if let Some(qh) = qh {
                        codes[64 * c + l] |= ((qh[l] >> (2 * c)) & 1) << 4;
                        codes[64 * c + 32 + l] |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                    }
                }
            }
        }
        GgmlType::Q6K => {
            for c in 0..2 {
                let ql = &b[64 * c..64 * c + 64];
                let qh = &b[128 + 32 * c..128 + 32 * c + 32];
                let o = &mut codes[128 * c..128 * c + 128];
                for l in 0..32 {
                    o[l] = (ql[l] & 0x0f) | ((qh[l] & 3) << 4);
                    o[l + 32] = (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4);
                    o[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    o[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {}
    }
}

/// Write `codes` (0..levels) into an encoded block of `ty`, keeping its scales and mins.
pub fn pack_codes(ty: GgmlType, b: &mut [u8], codes: &[u8]) {
    let nib = |q: &mut [u8], c: &[u8]| {
        for j in 0..16 {
            q[j] = (c[j] & 0x0f) | ((c[j + 16] & 0x0f) << 4);
        }
    };
    match ty {
        GgmlType::Q4_0 => nib(&mut b[2..18], codes),
        GgmlType::Q4_1 => nib(&mut b[4..20], codes),
        GgmlType::Q5_0 => pack_q5(codes, &mut b[2..22]),
        GgmlType::Q5_1 => pack_q5(codes, &mut b[4..24]),
        GgmlType::Q8_0 => {
            for j in 0..32 {
                b[2 + j] = ((codes[j] as i32 - 128) as i8) as u8;
            }
        }
        GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => {
            let mut l = [0u8; QK_K];
            l.copy_from_slice(&codes[..QK_K]);
            match ty {
                GgmlType::Q4K => pack_q4_k(&l, &mut b[16..144]),
                GgmlType::Q5K => pack_q5_k(&l, &mut b[16..176]),
                _ => pack_q6_k(&l, &mut b[..192]),
            }
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {}
    }
}

/// The grid of one encoded block: for each element the decoder's arithmetic with the block's
/// scales and mins, so `value(i, c)` is bit for bit what `dequantize` gives element `i` with
/// code `c`, and a sweep that picks codes one element at a time knows exactly what the file
/// will decode to. Every type decodes an element either as `(c − off)·a` (Q4_0, Q5_0, Q8_0,
/// Q6_K: `a` the block's or sub-block's scale) or as `c·a + b` (Q4_1, Q5_1, Q4_K, Q5_K: `b` the
/// min, subtracted); the parameters are per element (sub-block scales differ within a block).
/// Tested against `dequantize` for every element and every code.
pub struct BlockGrid {
    ty: GgmlType,
    /// the multiplier of each element
    a: Vec<f32>,
    /// the added term of each element (affine types only)
    b: Vec<f32>,
    /// the code offset of a centred type (0 for an affine one)
    off: i32,
    bytes: Vec<u8>,
    codes: Vec<u8>,
}

impl BlockGrid {
    /// The grid of the encoded block `b` (its scales and mins; its codes are kept as the
    /// starting codes).
    pub fn new(ty: GgmlType, b: &[u8]) -> Result<Self> {
        let (bs, nl) = (ty.block_size(), levels(ty));
        ensure!(nl > 0, "{} is not a block-quantized type", ty.name());
        ensure!(
            b.len() == ty.type_size(),
            "a {} block is {} bytes",
            ty.name(),
            ty.type_size()
        );
        let mut codes = vec![0u8; bs];
        unpack_codes(ty, b, &mut codes);
        let (mut a, mut add) = (vec![0f32; bs], Vec::new());
        let off = match ty {
            // dq4_0 / dq5_0 / dq8_0: (q − off) as f32 · d
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => {
                a.fill(fp16_at(b, 0));
                (nl / 2) as i32
            }
            // dq4_1 / dq5_1: q as f32 · d + m
            GgmlType::Q4_1 | GgmlType::Q5_1 => {
                a.fill(fp16_at(b, 0));
                add = vec![fp16_at(b, 2); bs];
                0
            }
            // dq4_k / dq5_k: (d·s) · q − (min·m), per sub-block of 32
            GgmlType::Q4K | GgmlType::Q5K => {
                let (d, min) = (fp16_at(b, 0), fp16_at(b, 2));
                add = vec![0f32; bs];
                for j in 0..8 {
                    let (s, m) = get_scale_min_k4(j, &b[4..16]);
                    a[32 * j..32 * (j + 1)].fill(d * s as f32);
                    add[32 * j..32 * (j + 1)].fill(-(min * m as f32));
                }
                0
            }
            // dq6_k: (d · sc) · (q − 32), sc an i8 per 16 elements
            GgmlType::Q6K => {
                let d = fp16_at(b, 208);
                for (i, v) in a.iter_mut().enumerate() {
                    let (half, l) = (i / 128, i % 128);
                    let sc = b[192 + 8 * half + (l % 32) / 16 + 2 * (l / 32)] as i8;
                    *v = d * sc as f32;
                }
                32
            }
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!("levels is 0"),
        };
        Ok(BlockGrid {
            ty,
            a,
            b: add,
            off,
            bytes: b.to_vec(),
            codes,
        })
    }

    /// The value element `i` decodes to with code `c`.
    pub fn value(&self, i: usize, c: usize) -> f32 {
        if self.b.is_empty() {
            (c as i32 - self.off) as f32 * self.a[i]
        } else {
            c as f32 * self.a[i] + self.b[i]
        }
    }

    /// Fix element `i` to the grid value nearest `x`; returns that value.
    pub fn fix(&mut self, i: usize, x: f32) -> f32 {
        let nl = levels(self.ty);
        let (v0, v1) = (self.value(i, 0), self.value(i, 1));
        let c = if v1 == v0 || !x.is_finite() {
            self.codes[i] as usize // a zero scale: every code decodes alike
        } else {
            // the grid is affine in the code: guess, then settle among the neighbours exactly
            let guess = ((x - v0) / (v1 - v0)).round().clamp(0.0, (nl - 1) as f32) as usize;
            let lo = guess.saturating_sub(1);
            let hi = (guess + 1).min(nl - 1);
            (lo..=hi)
                .min_by(|a, b| {
                    let (ea, eb) = ((self.value(i, *a) - x).abs(), (self.value(i, *b) - x).abs());
                    ea.total_cmp(&eb).then(a.cmp(b))
                })
                .unwrap_or(guess)
        };
        self.codes[i] = c as u8;
        self.value(i, c)
    }

    /// The block's bytes with the codes fixed so far.
    pub fn finish(mut self) -> Vec<u8> {
        pack_codes(self.ty, &mut self.bytes, &self.codes);
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gaussian-ish values with a few outliers (a weight row's shape), deterministic.
    fn weights(n: usize, seed: u64) -> Vec<f32> {
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
    fn block_codes_round_trip_and_the_grid_is_what_the_decoder_reads() {
        for ty in ALL_TYPES.iter().copied().filter(|t| t.is_quantized()) {
            let (bs, ts) = (ty.block_size(), ty.type_size());
            let x = weights(4 * QK_K, 11);
            let enc = quantize(ty, &x).unwrap();
            let dec = dequantize(ty, &enc, x.len()).unwrap();
            for (bi, b) in enc.chunks(ts).enumerate() {
                // codes out and back in: the same bytes
                let mut codes = vec![0u8; bs];
                unpack_codes(ty, b, &mut codes);
                assert!(codes.iter().all(|c| (*c as usize) < levels(ty)), "{ty:?}");
                let mut blank = b.to_vec();
                pack_codes(ty, &mut blank, &vec![0u8; bs]);
                pack_codes(ty, &mut blank, &codes);
                assert_eq!(blank, b, "{ty:?} block {bi}");
                // the grid's value at each element's code is the decoder's, bit for bit, and
                // fixing every element at its decoded value reproduces the block
                let mut g = BlockGrid::new(ty, b).unwrap();
                for i in 0..bs {
                    let want = dec[bi * bs + i];
                    assert_eq!(g.value(i, codes[i] as usize).to_bits(), want.to_bits());
                    assert_eq!(g.fix(i, want).to_bits(), want.to_bits(), "{ty:?} {bi}/{i}");
                }
                let again = g.finish();
                assert_eq!(
                    dequantize(ty, &again, bs).unwrap(),
                    &dec[bi * bs..(bi + 1) * bs]
                );
            }
        }
    }

    #[test]
    fn the_grid_gives_the_decoders_value_for_every_code() {
        // value(i, c) against `dequantize` of the block with every element set to code c, for
        // every element and every code (random blocks with outliers, so scales, mins and
        // sub-block scales of both signs occur)
        for ty in ALL_TYPES.iter().copied().filter(|t| t.is_quantized()) {
            let (bs, ts) = (ty.block_size(), ty.type_size());
            let mut x = weights(4 * QK_K, 17);
            x.iter_mut()
                .skip(7)
                .step_by(61)
                .for_each(|v| *v = -v.abs() * 3.0 - 0.01);
            for w in [quantize(ty, &x).unwrap(), {
                let qw: Vec<f32> = (0..QK_K).map(|j| 0.1 + (j % 7) as f32).collect();
                quantize_weighted(ty, &x, QK_K, &qw).unwrap()
            }] {
                for b in w.chunks(ts) {
                    let g = BlockGrid::new(ty, b).unwrap();
                    let mut scratch = b.to_vec();
                    for c in 0..levels(ty) {
                        pack_codes(ty, &mut scratch, &vec![c as u8; bs]);
                        let want = dequantize(ty, &scratch, bs).unwrap();
                        for (i, v) in want.iter().enumerate() {
                            assert_eq!(g.value(i, c).to_bits(), v.to_bits(), "{ty:?} {i} code {c}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn fixing_picks_the_nearest_grid_value() {
        for ty in ALL_TYPES.iter().copied().filter(|t| t.is_quantized()) {
            let bs = ty.block_size();
            let x = weights(bs, 5);
            let enc = quantize(ty, &x).unwrap();
            let mut g = BlockGrid::new(ty, &enc).unwrap();
            let probe = weights(bs, 6);
            for (i, p) in probe.iter().enumerate() {
                let best = (0..levels(ty))
                    .map(|c| (g.value(i, c) - p).abs())
                    .fold(f32::INFINITY, f32::min);
                let got = g.fix(i, *p);
                assert_eq!((got - p).abs(), best, "{ty:?} element {i}");
            }
            let bytes = g.finish();
            let back = dequantize(ty, &bytes, bs).unwrap();
            for (i, p) in probe.iter().enumerate() {
                let best = (0..levels(ty))
                    .map(|c| (BlockGrid::new(ty, &enc).unwrap().value(i, c) - p).abs())
                    .fold(f32::INFINITY, f32::min);
                assert_eq!((back[i] - p).abs(), best);
            }
        }
    }

    #[test]
    fn llama_cpp_activation_round_trips_match_a_simple_reference() {
        // Q8_0 / Q8_1: every value is q·fp16(amax/127) with q = round(x·127/amax) in
        // [−127, 127]; Q8_K: d·q with d = −max/127 (signed largest element), q ≤ 127; against
        // a scalar reference written from the formats' definitions, on random rows
        let mut x = weights(2 * QK_K, 23);
        x[40] = 0.0;
        x[300..332].fill(0.0); // an all-zero block of 32
        for t in [
            VecDot::Q8_0,
            VecDot::Q8_1,
            VecDot::Q8K,
            VecDot::F16,
            VecDot::BF16,
        ] {
            let mut y = x.clone();
            t.round_trip(&mut y);
            let bs = match t {
                VecDot::Q8K => QK_K,
                VecDot::Q8_0 | VecDot::Q8_1 => 32,
                _ => 1,
            };
            for (xb, yb) in x.chunks(bs).zip(y.chunks(bs)) {
                let amax = xb.iter().fold(0f64, |a, v| a.max(v.abs() as f64));
                for (a, b) in xb.iter().zip(yb) {
                    let want = match t {
                        VecDot::Q8_0 | VecDot::Q8_1 => {
                            let d = f16::from_f64(amax / 127.0).to_f64();
                            let q = if amax == 0.0 {
                                0.0
                            } else {
                                (*a as f64 * 127.0 / amax).round_ties_even()
                            };
                            assert!(q.abs() <= 127.0);
                            q * d
                        }
                        VecDot::Q8K => {
                            let max =
                                xb.iter()
                                    .copied()
                                    .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m })
                                    as f64;
                            let d = -max / 127.0;
                            let q = if max == 0.0 {
                                0.0
                            } else {
                                (*a as f64 / d).round_ties_even().min(127.0)
                            };
                            q * d
                        }
                        VecDot::F16 => f16::from_f32(*a).to_f64(),
                        VecDot::BF16 => half::bf16::from_f32(*a).to_f64(),
                    };
                    // the same code, up to the last bit of f32 arithmetic
                    assert!(
                        (*b as f64 - want).abs() <= 1e-6 * amax.max(1e-30),
                        "{t:?}: {a} → {b}, want {want}"
                    );
                }
            }
            if bs > 1 {
                assert!(y[300..332].iter().all(|v| *v == 0.0), "{t:?}");
            }
            assert_ne!(x, y, "{t:?} changed nothing");
        }
        assert_eq!(VecDot::of(GgmlType::Q4K), Some(VecDot::Q8K));
        assert_eq!(VecDot::of(GgmlType::Q4_1), Some(VecDot::Q8_1));
        assert_eq!(VecDot::of(GgmlType::Q5_0), Some(VecDot::Q8_0));
        assert_eq!(VecDot::of(GgmlType::F32), None);
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-2.6), -3);
        assert_eq!(nearest_int(63.49), 63);
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
