//! Quantizer core: integer grids, scales and zero points with the conventions of
//! compressed-tensors, so our integers are bit-identical to the reference tool's.
//!
//! The reference (compressed-tensors 0.19 `calculate_qparams` and `_quantize`, driven by
//! llm-compressor's `memoryless_minmax` observer) computes everything as torch elementwise ops
//! on tensors of the weight's dtype. On bf16/f16 tensors every such op computes in f32 and rounds
//! its result back to the tensor dtype; [`round_to`] reproduces that rounding after each op, in
//! the same order as the torch code:
//!
//! ```text
//! min = min(min, 0); max = max(max, 0)
//! symmetric:  scale = r(max(|min|, |max|) / ((qmax - qmin) / 2))          zp = 0
//! asymmetric: scale = r(r(max - min) / (qmax - qmin))
//!             zp    = round(clamp(r(qmin - r(min / scale)), qmin, qmax))
//! scale == 0 → finfo(dtype).eps
//! q = clamp(round(r(r(w / scale) + zp)), qmin, qmax)
//! ```
//! where `r` rounds to the dtype and `round` is round-half-to-even (torch.round).
//!
//! Pure functions only: no I/O, no file formats (those live in `export`).

pub mod float;
pub mod ggml;
pub mod presets;

use crate::number::{FloatFormat, NumType, ScaleType};
use crate::safetensors_file::DType;
use anyhow::{bail, ensure, Result};
use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// How weights share quantization parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// One scale for the whole tensor.
    Tensor,
    /// One scale per output row.
    Channel,
    /// One scale per `group_size` consecutive input columns of each row.
    Group,
    /// One scale per `block` = [rows, cols] tile (FP8_BLOCK: 128×128).
    Block,
    /// Group scales under one per-tensor global scale (NVFP4: groups of 16, E4M3 scales).
    #[serde(rename = "tensor_group")]
    TensorGroup,
    /// One scale per token (activations only: dynamic per-token quantization).
    Token,
}

/// How the range is chosen before rounding.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Observer {
    /// min/max of the weights.
    MinMax,
    /// Shrink the min/max range over a grid and keep the scale with the least error.
    Mse,
}

/// One quantizer's arguments, as compressed-tensors' `QuantizationArgs` holds them: the number
/// type of the grid (integers of `bits` bits, or a small float), how values share scales
/// (`strategy`, `group_size`, `block`), what the scales are stored as and whether a per-tensor
/// global scale sits above them. The integer fields are the ones every method uses today; the
/// float ones are what the float and microscale schemes (FP8, NVFP4, MXFP4) fill in, each
/// rejected by [`QuantArgs::validate`] until a quantizer implements it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantArgs {
    /// Bits per value: the integer grid's width, or the float format's.
    pub bits: u32,
    pub symmetric: bool,
    pub strategy: Strategy,
    /// Columns per group (`Strategy::Group`, `Strategy::TensorGroup`).
    pub group_size: usize,
    pub observer: Observer,
    /// A float grid (E4M3, E5M2, E2M1) instead of the integer one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub float: Option<FloatFormat>,
    /// What scales are stored as when not the weight's own dtype (E4M3 for NVFP4, E8M0 for MX).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_type: Option<ScaleType>,
    /// A per-tensor f32 global scale above the group scales (NVFP4).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub global_scale: bool,
    /// [rows, cols] of a tile (`Strategy::Block`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<[usize; 2]>,
}

/// A quantized linear as the exporters need it.
///
/// Layout conventions (all strategies): `scales` (and `zeros`) are always `[out, n_groups]`
/// row-major, so the parameters of row `r`, group `g` sit at `r * n_groups + g`. For
/// `Strategy::Channel` n_groups is 1; for `Strategy::Tensor` n_groups is 1 and every row holds
/// the same (single) scale and zero point.
#[derive(Clone, Debug)]
pub struct QuantizedLinear {
    pub args: QuantArgs,
    /// [out, in] row-major signed integer codes in [qmin, qmax].
    pub codes: Vec<i8>,
    /// [out, n_groups] scales (values exactly representable in `scale_dtype`).
    pub scales: Vec<f32>,
    /// [out, n_groups] signed zero points (asymmetric only).
    pub zeros: Option<Vec<i8>>,
    /// [in]: the group of each input column when groups follow activation order.
    pub g_idx: Option<Vec<i32>>,
    /// Columns were quantized in activation order with groups fixed in column order (GPTQ's
    /// static groups): nothing changes in the layout, but the config block says so.
    pub static_order: bool,
    /// The quantizer saw each linear's inputs through the already-quantized linears before it
    /// in the layer (GPTQ's "true sequential"); recorded for the GPTQ config block.
    pub true_sequential: bool,
    pub scale_dtype: DType,
    /// NVFP4's per-tensor f32 scale above the group scales (a value is code · scale / global).
    pub global_scale: Option<f32>,
    /// (out, in)
    pub shape: (usize, usize),
}

/// Parameters of GPTQ's reference MSE range search (`Quantizer.find_params(mse=True)`).
pub const MSE_GRID: usize = 100;
pub const MSE_MAXSHRINK: f32 = 0.8;
pub const MSE_NORM: f32 = 2.4;

/// Signed integer range of a `bits`-bit grid: (-2^(b-1), 2^(b-1)-1).
pub fn qrange(bits: u32) -> (i32, i32) {
    let half = 1i32 << (bits - 1);
    (-half, half - 1)
}

/// Round an f32 to the nearest value of `dtype` (round-to-nearest-even), as torch does when it
/// stores the f32 result of an elementwise op on a bf16/f16 tensor. Identity for f32/f64.
#[inline]
pub fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// torch.round: round half to even.
#[inline]
pub fn round_half_even(x: f32) -> f32 {
    x.round_ties_even()
}

/// `torch.finfo(dtype).eps`: what compressed-tensors puts in place of a zero scale.
pub fn dtype_eps(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 0.0078125,   // 2^-7
        DType::F16 => 0.0009765625, // 2^-10
        _ => f32::EPSILON,          // 2^-23
    }
}

impl QuantArgs {
    /// An integer grid: what every method quantizes onto today.
    pub fn int(
        bits: u32,
        symmetric: bool,
        strategy: Strategy,
        group_size: usize,
        observer: Observer,
    ) -> Self {
        QuantArgs {
            bits,
            symmetric,
            strategy,
            group_size,
            observer,
            float: None,
            scale_type: None,
            global_scale: false,
            block: None,
        }
    }

    /// The grid's number type.
    pub fn num(&self) -> NumType {
        match self.float {
            Some(format) => NumType::Float { format },
            None => NumType::Int { bits: self.bits },
        }
    }

    /// Check that the arguments describe a grid we can store (codes are i8): an integer grid
    /// of 2..=8 bits per tensor, channel or group, or one of the float schemes' grids.
    pub fn validate(&self) -> Result<()> {
        if let Some(f) = self.float {
            return self.validate_float(f);
        }
        ensure!(
            (2..=8).contains(&self.bits),
            "quantization: {} bits is not supported (2..=8)",
            self.bits
        );
        ensure!(
            self.scale_type.is_none() && !self.global_scale && self.block.is_none(),
            "quantization: integer grids take no scale type, global scale or block (those are the float schemes')"
        );
        ensure!(
            matches!(
                self.strategy,
                Strategy::Tensor | Strategy::Channel | Strategy::Group
            ),
            "quantization: strategy {:?} has no integer weight quantizer (tensor, channel or group)",
            self.strategy
        );
        if self.strategy == Strategy::Group {
            ensure!(
                self.group_size > 0,
                "quantization: group_size must be > 0 for the group strategy"
            );
        }
        Ok(())
    }

    /// The float grids compressed-tensors defines: FP8 E4M3 per tensor / channel / block in
    /// the weights' dtype, E2M1 (NVFP4) in groups under E4M3 scales and a global scale, and
    /// E2M1 / E4M3 in groups of 32 under E8M0 scales (MXFP4 / MXFP8).
    fn validate_float(&self, f: FloatFormat) -> Result<()> {
        ensure!(
            self.bits == f.bits(),
            "quantization: {} values have {} bits, not {}",
            f.name(),
            f.bits(),
            self.bits
        );
        ensure!(
            self.symmetric,
            "quantization: float grids are symmetric (no zero point)"
        );
        ensure!(
            self.observer == Observer::MinMax,
            "quantization: float grids take the min-max observer"
        );
        let grouped = || -> Result<()> {
            ensure!(
                self.group_size > 0,
                "quantization: group_size must be > 0 for strategy {:?}",
                self.strategy
            );
            Ok(())
        };
        match (f, self.strategy, self.scale_type, self.global_scale) {
            (FloatFormat::E4M3, Strategy::Tensor | Strategy::Channel, None, false) => {}
            (FloatFormat::E4M3, Strategy::Block, None, false) => match self.block {
                Some([r, c]) if r > 0 && c > 0 => {}
                _ => bail!("quantization: strategy block needs `block: [rows, cols]` > 0"),
            },
            (FloatFormat::E2M1, Strategy::TensorGroup, Some(ScaleType::E4M3), true) => grouped()?,
            (FloatFormat::E2M1 | FloatFormat::E4M3, Strategy::Group, Some(ScaleType::E8M0), false) => {
                grouped()?
            }
            _ => bail!(
                "quantization: no float scheme has {} values with strategy {:?}, scale type {:?} and global scale {} (FP8: e4m3 per tensor, channel or block; NVFP4: e2m1 tensor_group with e4m3 scales and a global scale; MX: e2m1/e4m3 groups with e8m0 scales)",
                f.name(),
                self.strategy,
                self.scale_type,
                self.global_scale
            ),
        }
        if self.strategy != Strategy::Block {
            ensure!(
                self.block.is_none(),
                "quantization: `block` only applies to strategy block"
            );
        }
        Ok(())
    }

    /// Number of parameter groups per row for a matrix with `in_features` columns;
    /// errors when the group size does not divide the input dimension.
    pub fn groups_per_row(&self, in_features: usize) -> Result<usize> {
        self.validate()?;
        Ok(match self.strategy {
            Strategy::Tensor | Strategy::Channel | Strategy::Token => 1,
            // compressed-tensors pads a partial block
            Strategy::Block => in_features.div_ceil(self.group_width(in_features)),
            Strategy::Group | Strategy::TensorGroup => {
                if !in_features.is_multiple_of(self.group_size) {
                    bail!(
                        "quantization: input dimension {in_features} is not divisible by group_size {}",
                        self.group_size
                    );
                }
                in_features / self.group_size
            }
        })
    }

    /// Columns that share one set of parameters within a row.
    pub fn group_width(&self, in_features: usize) -> usize {
        match self.strategy {
            Strategy::Group | Strategy::TensorGroup => self.group_size,
            Strategy::Block => self.block.map_or(in_features, |b| b[1]),
            _ => in_features,
        }
    }
}

/// Scale and zero point from an observed (min, max), exactly as compressed-tensors'
/// `calculate_qparams` computes them on tensors of `dtype`.
pub fn minmax_params(min: f32, max: f32, args: &QuantArgs, dtype: DType) -> (f32, i32) {
    let (qmin, qmax) = qrange(args.bits);
    let r = |x: f32| round_to(dtype, x);
    let min = min.min(0.0);
    let max = max.max(0.0);
    let bit_range = (qmax - qmin) as f32;
    if args.symmetric {
        let max_pos = min.abs().max(max);
        let mut scale = r(max_pos / (bit_range / 2.0));
        if scale == 0.0 {
            scale = dtype_eps(dtype);
        }
        (scale, 0)
    } else {
        let scale0 = r(r(max - min) / bit_range);
        let zp = if scale0 == 0.0 {
            // min == max == 0: torch computes 0/0 = NaN, and NaN cast to int8 gives 0 on
            // the CPU. Every code of such a group is then 0 and dequantizes to 0 either way.
            0
        } else {
            let z = r(qmin as f32 - r(min / scale0));
            let z = z.clamp(qmin as f32, qmax as f32);
            round_half_even(z) as i32
        };
        let scale = if scale0 == 0.0 {
            dtype_eps(dtype)
        } else {
            scale0
        };
        (scale, zp)
    }
}

/// Quantize one value with given parameters, with the reference's dtype rounding:
/// `clamp(round(r(r(w / scale) + zero)), qmin, qmax)`.
#[inline]
pub fn quantize_value(w: f32, scale: f32, zero: i32, args: &QuantArgs, dtype: DType) -> i32 {
    let (qmin, qmax) = qrange(args.bits);
    let mut s = round_to(dtype, w / scale);
    if zero != 0 {
        s = round_to(dtype, s + zero as f32);
    }
    // NaN (never produced for finite w) maps to the zero point's code via clamp semantics.
    let c = s.clamp(qmin as f32, qmax as f32);
    round_half_even(c) as i32
}

/// `(q - zero) * scale` in f32. Exact: for bf16/f16 scales the product fits in f32's mantissa,
/// so rounding the result to the scale dtype afterwards equals the reference's bf16 multiply.
#[inline]
pub fn dequantize_value(q: i32, scale: f32, zero: i32) -> f32 {
    (q - zero) as f32 * scale
}

fn min_max(values: &[f32]) -> (f32, f32) {
    let mut mn = f32::INFINITY;
    let mut mx = f32::NEG_INFINITY;
    for &v in values {
        mn = mn.min(v);
        mx = mx.max(v);
    }
    if values.is_empty() {
        (0.0, 0.0)
    } else {
        (mn, mx)
    }
}

/// Sum over the group of |dequant(quant(w)) - w|^norm.
fn group_error(
    values: &[f32],
    scale: f32,
    zero: i32,
    args: &QuantArgs,
    dtype: DType,
    norm: f32,
) -> f64 {
    values
        .iter()
        .map(|&w| {
            let q = quantize_value(w, scale, zero, args, dtype);
            let d = dequantize_value(q, scale, zero) - w;
            (d.abs() as f64).powf(norm as f64)
        })
        .sum()
}

/// Scale and zero point of one group of weights (a group, a row or a whole tensor).
///
/// `Observer::MinMax` is compressed-tensors' `memoryless_minmax`; `Observer::Mse` runs GPTQ's
/// reference grid search: shrink (min, max) by `p = 1 - i/100` for i in 0..80 and keep the
/// parameters with the least sum of |q - w|^2.4 (ties keep the wider range).
pub fn group_params(values: &[f32], args: &QuantArgs, dtype: DType) -> (f32, i32) {
    let (mn, mx) = min_max(values);
    match args.observer {
        Observer::MinMax => minmax_params(mn, mx, args, dtype),
        Observer::Mse => {
            let mut best = minmax_params(mn, mx, args, dtype);
            let mut best_err = group_error(values, best.0, best.1, args, dtype, MSE_NORM);
            let steps = (MSE_MAXSHRINK * MSE_GRID as f32) as usize;
            for i in 1..steps {
                let p = 1.0 - i as f32 / MSE_GRID as f32;
                let (s, z) = minmax_params(p * mn, p * mx, args, dtype);
                let err = group_error(values, s, z, args, dtype, MSE_NORM);
                if err < best_err {
                    best_err = err;
                    best = (s, z);
                }
            }
            best
        }
    }
}

/// Round-to-nearest quantization of a whole `[out, in]` matrix. `dtype` is the dtype of the
/// weights (the reference computes in it); scales are stored in it too (`scale_dtype`).
pub fn quantize_rtn(w: ArrayView2<f32>, args: &QuantArgs, dtype: DType) -> Result<QuantizedLinear> {
    if args.float.is_some() {
        return float::quantize(w, args, dtype, None);
    }
    ensure!(
        matches!(dtype, DType::BF16 | DType::F16 | DType::F32),
        "quantization: weights of dtype {} cannot be quantized (need BF16, F16 or F32)",
        dtype.name()
    );
    let (out, inn) = w.dim();
    let ng = args.groups_per_row(inn)?;
    let width = args.group_width(inn);

    // Tensor strategy: one set of parameters for everything.
    let tensor_params = if args.strategy == Strategy::Tensor {
        let all: Vec<f32> = w.iter().copied().collect();
        Some(group_params(&all, args, dtype))
    } else {
        None
    };

    let rows: Vec<(Vec<i8>, Vec<f32>, Vec<i8>)> = (0..out)
        .into_par_iter()
        .map(|r| {
            let row: Vec<f32> = w.row(r).iter().copied().collect();
            let mut codes = Vec::with_capacity(inn);
            let mut scales = Vec::with_capacity(ng);
            let mut zeros = Vec::with_capacity(ng);
            for g in 0..ng {
                let vals = &row[g * width..(g + 1) * width];
                let (s, z) = tensor_params.unwrap_or_else(|| group_params(vals, args, dtype));
                scales.push(s);
                zeros.push(z as i8);
                codes.extend(
                    vals.iter()
                        .map(|&v| quantize_value(v, s, z, args, dtype) as i8),
                );
            }
            (codes, scales, zeros)
        })
        .collect();

    let mut codes = Vec::with_capacity(out * inn);
    let mut scales = Vec::with_capacity(out * ng);
    let mut zeros = Vec::with_capacity(out * ng);
    for (c, s, z) in rows {
        codes.extend(c);
        scales.extend(s);
        zeros.extend(z);
    }
    Ok(QuantizedLinear {
        args: args.clone(),
        codes,
        scales,
        zeros: if args.symmetric { None } else { Some(zeros) },
        g_idx: None,
        static_order: false,
        true_sequential: false,
        scale_dtype: dtype,
        global_scale: None,
        shape: (out, inn),
    })
}

impl QuantizedLinear {
    /// Parameter groups per row (`scales.len() / out`).
    pub fn n_groups(&self) -> usize {
        self.scales.len().checked_div(self.shape.0).unwrap_or(0)
    }

    /// The parameter group of input column `j` (g_idx when present, else contiguous groups).
    #[inline]
    pub fn group_of(&self, j: usize) -> usize {
        match &self.g_idx {
            Some(g) => g[j] as usize,
            None => j / self.args.group_width(self.shape.1).max(1),
        }
    }

    /// Zero point of (row, group); 0 when symmetric.
    #[inline]
    pub fn zero_at(&self, row: usize, g: usize) -> i32 {
        match &self.zeros {
            Some(z) => z[row * self.n_groups() + g] as i32,
            None => 0,
        }
    }

    /// Scale of (row, group).
    #[inline]
    pub fn scale_at(&self, row: usize, g: usize) -> f32 {
        self.scales[row * self.n_groups() + g]
    }

    /// Check internal consistency (lengths, code range, g_idx range).
    pub fn validate(&self) -> Result<()> {
        self.args.validate()?;
        let (out, inn) = self.shape;
        ensure!(
            self.codes.len() == out * inn,
            "quantized linear: {} codes for shape {out}x{inn}",
            self.codes.len()
        );
        ensure!(
            out > 0 && self.scales.len().is_multiple_of(out),
            "quantized linear: {} scales for {out} rows",
            self.scales.len()
        );
        let ng = self.n_groups();
        if let Some(z) = &self.zeros {
            ensure!(
                z.len() == self.scales.len(),
                "quantized linear: {} zero points but {} scales",
                z.len(),
                self.scales.len()
            );
        }
        match self.args.float {
            Some(f) => {
                ensure!(
                    self.codes
                        .iter()
                        .all(|&c| (c as u8 as u32) < (1 << f.bits())
                            && f.decode(c as u8).is_finite()),
                    "quantized linear: codes that are not finite {} values",
                    f.name()
                );
                ensure!(
                    self.args.global_scale == self.global_scale.is_some(),
                    "quantized linear: the global scale does not match the arguments"
                );
            }
            None => {
                let (qmin, qmax) = qrange(self.args.bits);
                ensure!(
                    self.codes
                        .iter()
                        .all(|&c| (c as i32) >= qmin && (c as i32) <= qmax),
                    "quantized linear: codes outside [{qmin}, {qmax}]"
                );
            }
        }
        match &self.g_idx {
            Some(g) => {
                ensure!(
                    g.len() == inn,
                    "quantized linear: g_idx has {} entries for {inn} columns",
                    g.len()
                );
                ensure!(
                    g.iter().all(|&x| x >= 0 && (x as usize) < ng),
                    "quantized linear: g_idx entries outside [0, {ng})"
                );
            }
            None => ensure!(
                ng > 0 && inn % ng == 0,
                "quantized linear: {ng} groups do not divide {inn} columns"
            ),
        }
        Ok(())
    }

    /// Dense `[out, in]` weights: `(q - zp) * scale` in f32, honouring `g_idx`.
    pub fn dequantize(&self) -> Array2<f32> {
        let (out, inn) = self.shape;
        let ng = self.n_groups();
        let groups: Vec<usize> = (0..inn).map(|j| self.group_of(j)).collect();
        let mut data = vec![0f32; out * inn];
        data.par_chunks_mut(inn.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                for (j, x) in row.iter_mut().enumerate() {
                    let g = groups[j];
                    let c = self.codes[r * inn + j];
                    let s = self.scales[r * ng + g];
                    *x = match self.args.float {
                        Some(f) => float::decode(c as u8, s, self.global_scale, f),
                        None => {
                            let z = match &self.zeros {
                                Some(z) => z[r * ng + g] as i32,
                                None => 0,
                            };
                            dequantize_value(c as i32, s, z)
                        }
                    };
                }
            });
        Array2::from_shape_vec((out, inn), data).expect("shape matches")
    }

    /// Storage cost per weight: codes, plus distinct scales (in `scale_dtype`), zero points
    /// (`bits` each) and g_idx (32 bits per column) when present.
    pub fn bits_per_weight(&self) -> f64 {
        let (out, inn) = self.shape;
        let n = (out * inn) as f64;
        if n == 0.0 {
            return 0.0;
        }
        let n_params = match (self.args.strategy, self.args.block) {
            (Strategy::Tensor, _) => 1,
            // held per row, stored per block of rows
            (Strategy::Block, Some([br, _])) => out.div_ceil(br) * self.n_groups(),
            _ => self.scales.len(),
        } as f64;
        let scale_bits = (self.scale_dtype.size() * 8) as f64;
        let mut total = n * self.args.bits as f64 + n_params * scale_bits;
        if self.global_scale.is_some() {
            total += 32.0;
        }
        if self.zeros.is_some() {
            total += n_params * self.args.bits as f64;
        }
        if self.g_idx.is_some() {
            total += inn as f64 * 32.0;
        }
        total / n
    }
}

/// Storage dtype used for newly written scales: the checkpoint's own float dtype.
pub fn scale_dtype_for(weight_dtype: DType) -> DType {
    match weight_dtype {
        DType::BF16 | DType::F16 | DType::F32 => weight_dtype,
        _ => DType::F32,
    }
}

#[cfg(test)]
mod tests;
