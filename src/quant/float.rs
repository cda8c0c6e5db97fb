//! Float grids: FP8 (E4M3) and FP4 (E2M1) weights under bf16/f16/f32, E4M3 (NVFP4) or E8M0
//! (MXFP4 / MXFP8) scales — the arithmetic of compressed-tensors 0.19, so our codes and scales
//! are byte-identical to the reference tool's.
//!
//! The reference (`calculate_qparams`, `generate_gparam`, `generate_mx_scales`, `_quantize`)
//! computes on tensors of the weight's dtype; `r` below rounds to it after each op, as torch
//! does. With `amax` the largest magnitude of a group (a row, a 128×128 block, 16 or 32
//! columns, or the tensor):
//!
//! ```text
//! FP8, scale in the weight dtype:   s = r(amax / 448)                      (0 → eps of the dtype)
//!                                   code = e4m3(clamp(r(w / s), ±448))
//! NVFP4, E4M3 scales, f32 global:   g = f32(r(r(1 / max(amax_fused, tiny)) · 448·6))  (∞ → 1)
//!                                   s = e4m3(clamp(g · r(amax / 6), ±448))    (0 → 0.125)
//!                                   code = e2m1(clamp(w / (s / g), ±6))      (f32 throughout)
//! MX, E8M0 scales:                  p = 2^k for amax = m·2^k, 2^(k+1) when m ≥ 1.75
//!                                   s = 2^(log2 p − ⌊log2 max⌋)              (E2M1: −2, E4M3: −8)
//!                                   code = fmt(clamp(r(w / s), ±max))
//! ```
//! where `e4m3`/`e2m1` round to the nearest value, ties to the even code, and the per-tensor
//! global scale `g` of NVFP4 is shared by the linears a serving engine fuses (those reading
//! one input: q/k/v, gate/up), as llm-compressor's fused observers compute it.
//!
//! Codes are stored as the format's bit patterns (`u8` in the `i8` code vector); a block
//! strategy's scales are held per row (each row of a 128-row block repeats them) so that
//! `scale_at(row, group)` reads every strategy alike; exporters keep one row per block.

use super::{dtype_eps, round_to, QuantArgs, QuantizedLinear, Strategy};
use crate::number::{FloatFormat, ScaleType};
use crate::safetensors_file::DType;
use anyhow::{ensure, Context, Result};
use ndarray::ArrayView2;
use rayon::prelude::*;

/// The smallest normal value of `dtype` (torch's `finfo(dtype).tiny`).
fn tiny(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => 6.103_515_6e-5,
        _ => f32::MIN_POSITIVE,
    }
}

/// The largest magnitude of `values` (0 for none).
pub fn amax(values: impl IntoIterator<Item = f32>) -> f32 {
    values.into_iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// NVFP4's per-tensor global scale for weights whose largest magnitude is `amax`
/// (compressed-tensors `generate_gparam`): 448·6 / amax in the weights' dtype, as f32.
pub fn global_scale(amax: f32, dtype: DType) -> f32 {
    let a = amax.max(tiny(dtype));
    // Python's `2688.0 / tensor` is torch's `tensor.reciprocal() * 2688.0`: two roundings
    let g = round_to(
        dtype,
        round_to(dtype, 1.0 / a) * (FloatFormat::E4M3.max() * FloatFormat::E2M1.max()),
    );
    if g.is_finite() {
        g
    } else {
        1.0
    }
}

/// ⌊log2 max⌋ of the element format: MX scales map a group's top power of two there.
fn mx_offset(fmt: FloatFormat) -> i32 {
    fmt.max().log2().floor() as i32
}

/// The E8M0 exponent (bias 127) of an MX group whose largest magnitude is `amax`
/// (compressed-tensors `generate_mx_scales`: `round_to_power_2`, then the element offset).
pub fn mx_exponent(amax: f32, fmt: FloatFormat) -> u8 {
    if amax <= 0.0 || !amax.is_finite() {
        // log2(0) = −inf, clamped to the smallest exponent
        return 0;
    }
    let k = if amax >= f32::MIN_POSITIVE {
        ((amax.to_bits() >> 23) & 0xff) as i32 - 127
    } else {
        amax.log2().floor() as i32
    };
    // `round_to_power_2` adds a quarter of the mantissa range and keeps the exponent: m ≥ 1.75
    // goes up (exact: amax and 1.75·2^k are both f32 values)
    let k = if amax >= 1.75 * 2f32.powi(k) {
        k + 1
    } else {
        k
    };
    (127 + k - mx_offset(fmt)).clamp(0, 254) as u8
}

/// 2^(e − 127): the scale an E8M0 exponent stands for.
pub fn mx_scale(e: u8) -> f32 {
    2f64.powi(e as i32 - 127) as f32
}

/// The stored scale of one group whose largest magnitude is `amax`, under an NVFP4 global
/// scale `global` when the arguments have one.
pub fn group_scale(amax: f32, args: &QuantArgs, dtype: DType, global: Option<f32>) -> f32 {
    let fmt = args.float.expect("a float grid");
    if args.scale_type == Some(ScaleType::E8M0) {
        return mx_scale(mx_exponent(round_to(dtype, amax), fmt));
    }
    let mut s = round_to(dtype, amax / fmt.max());
    if let Some(g) = global {
        s *= g;
    }
    match args.scale_type {
        Some(ScaleType::E4M3) => {
            let m = FloatFormat::E4M3.max();
            s = FloatFormat::E4M3.round(s.clamp(-m, m));
            if s == 0.0 {
                s = 0.125; // finfo(float8_e4m3fn).eps
            }
        }
        Some(t) => {
            s = t.round(s);
            if s == 0.0 {
                s = dtype_eps(dtype);
            }
        }
        None => {
            if s == 0.0 {
                s = dtype_eps(dtype);
            }
        }
    }
    s
}

/// The code of `w` under stored scale `scale` (and NVFP4 global scale `global`).
#[inline]
pub fn encode(w: f32, scale: f32, global: Option<f32>, fmt: FloatFormat, dtype: DType) -> u8 {
    let x = match global {
        // the scale is divided by the global one first, all in f32
        Some(g) => w / (scale / g),
        None => round_to(dtype, w / scale),
    };
    let m = fmt.max();
    fmt.encode(x.clamp(-m, m))
}

/// The value a code stands for: decode(code) · scale (/ global).
#[inline]
pub fn decode(code: u8, scale: f32, global: Option<f32>, fmt: FloatFormat) -> f32 {
    let s = match global {
        Some(g) => scale / g,
        None => scale,
    };
    fmt.decode(code) * s
}

/// Round-to-nearest quantization of a `[out, in]` matrix onto a float grid. `global` is the
/// NVFP4 global scale when the caller fuses it over several linears; `None` with
/// `args.global_scale` computes it from this tensor alone.
pub fn quantize(
    w: ArrayView2<f32>,
    args: &QuantArgs,
    dtype: DType,
    global: Option<f32>,
) -> Result<QuantizedLinear> {
    ensure!(
        matches!(dtype, DType::BF16 | DType::F16 | DType::F32),
        "quantization: weights of dtype {} cannot be quantized (need BF16, F16 or F32)",
        dtype.name()
    );
    let fmt = args.float.context("quantization: not a float grid")?;
    let (out, inn) = w.dim();
    let ng = args.groups_per_row(inn)?;
    let width = args.group_width(inn);
    let global = if args.global_scale {
        Some(global.unwrap_or_else(|| global_scale(amax(w.iter().copied()), dtype)))
    } else {
        None
    };

    // Parameters shared beyond a row: the tensor's one scale, or each block's.
    let tensor_scale = (args.strategy == Strategy::Tensor)
        .then(|| group_scale(amax(w.iter().copied()), args, dtype, global));
    let block_scales: Option<Vec<f32>> = match (args.strategy, args.block) {
        (Strategy::Block, Some([br, bc])) => {
            let nbr = out.div_ceil(br);
            Some(
                (0..nbr * ng)
                    .into_par_iter()
                    .map(|i| {
                        let (b, g) = (i / ng, i % ng);
                        let rows = b * br..((b + 1) * br).min(out);
                        let cols = g * bc..((g + 1) * bc).min(inn);
                        let a =
                            rows.fold(0f32, |m, r| m.max(amax(cols.clone().map(|j| w[[r, j]]))));
                        group_scale(a, args, dtype, global)
                    })
                    .collect(),
            )
        }
        _ => None,
    };

    let rows: Vec<(Vec<i8>, Vec<f32>)> = (0..out)
        .into_par_iter()
        .map(|r| {
            let row: Vec<f32> = w.row(r).iter().copied().collect();
            let mut codes = Vec::with_capacity(inn);
            let mut scales = Vec::with_capacity(ng);
            for g in 0..ng {
                let vals = &row[g * width..((g + 1) * width).min(inn)];
                let s = match (&tensor_scale, &block_scales) {
                    (Some(s), _) => *s,
                    (_, Some(b)) => b[(r / args.block.map_or(1, |b| b[0])) * ng + g],
                    _ => group_scale(amax(vals.iter().copied()), args, dtype, global),
                };
                scales.push(s);
                codes.extend(vals.iter().map(|&v| encode(v, s, global, fmt, dtype) as i8));
            }
            (codes, scales)
        })
        .collect();

    let mut codes = Vec::with_capacity(out * inn);
    let mut scales = Vec::with_capacity(out * ng);
    for (c, s) in rows {
        codes.extend(c);
        scales.extend(s);
    }
    Ok(QuantizedLinear {
        args: args.clone(),
        codes,
        scales,
        zeros: None,
        g_idx: None,
        static_order: false,
        true_sequential: false,
        scale_dtype: scale_storage(args, dtype),
        global_scale: global,
        shape: (out, inn),
    })
}

/// The dtype a float grid's scales are stored in: E4M3 / E8M0 when the scheme says so, else
/// the weights' own dtype.
pub fn scale_storage(args: &QuantArgs, dtype: DType) -> DType {
    match args.scale_type {
        Some(ScaleType::E4M3) => DType::F8E4M3,
        Some(ScaleType::E8M0) => DType::F8E8M0,
        Some(ScaleType::BF16) => DType::BF16,
        Some(ScaleType::F16) => DType::F16,
        Some(ScaleType::F32) => DType::F32,
        None => super::scale_dtype_for(dtype),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::presets::preset;
    use ndarray::Array2;
    use rand::{Rng, SeedableRng};

    fn random(out: usize, inn: usize, seed: u64) -> Array2<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        // bf16 values with a spread of magnitudes and a few outliers
        Array2::from_shape_fn((out, inn), |_| {
            let x: f32 = rng.gen_range(-1.0..1.0) * if rng.gen_bool(0.02) { 8.0 } else { 0.05 };
            round_to(DType::BF16, x)
        })
    }

    /// The nearest code by brute force over every code of the format (ties to the even
    /// code), the reference for `FloatFormat::encode` inside the quantizer.
    fn nearest(fmt: FloatFormat, x: f64) -> u8 {
        let mut best = (f64::INFINITY, 0u8);
        for c in 0..(1u32 << fmt.bits()) as u16 {
            let v = fmt.decode(c as u8) as f64;
            if !v.is_finite() || (v == 0.0 && fmt.decode(c as u8).is_sign_negative() != (x < 0.0)) {
                continue;
            }
            let d = (v - x).abs();
            let mag = c as u8 & ((1 << (fmt.bits() - 1)) - 1);
            let better = d < best.0 || (d == best.0 && mag.is_multiple_of(2));
            if better {
                best = (d, c as u8);
            }
        }
        best.1
    }

    /// Every preset float scheme on random bf16 weights with awkward shapes: each code is the
    /// nearest value to w / scale (clamped), each scale follows the reference formula computed
    /// independently here in f64 from the group's largest magnitude, and the dequantized
    /// weights are code · scale (/ global).
    #[test]
    fn codes_and_scales_follow_the_reference_on_random_weights() {
        for name in [
            "FP8_DYNAMIC",
            "FP8_BLOCK",
            "NVFP4A16",
            "MXFP4A16",
            "MXFP8A16",
        ] {
            let args = preset(name).unwrap().weights;
            let fmt = args.float.unwrap();
            let (out, inn) = (200, 192); // 200 rows: a partial 128-row block
            let w = random(out, inn, 3);
            let q = quantize(w.view(), &args, DType::BF16, None).unwrap();
            q.validate().unwrap();
            let width = args.group_width(inn);
            let ng = q.n_groups();
            let g = q.global_scale;
            if args.global_scale {
                let a = w.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
                let r = round_to(DType::BF16, (1.0 / a) as f32) as f64 * 2688.0;
                assert_eq!(g.unwrap(), round_to(DType::BF16, r as f32), "{name} global");
            }
            for r in 0..out {
                for gi in 0..ng {
                    let cols = gi * width..((gi + 1) * width).min(inn);
                    let rows = match args.block {
                        Some([br, _]) => (r / br) * br..((r / br + 1) * br).min(out),
                        None => r..r + 1,
                    };
                    let a = rows
                        .flat_map(|rr| cols.clone().map(move |j| (rr, j)))
                        .fold(0f64, |m, (rr, j)| m.max(w[[rr, j]].abs() as f64));
                    let s = q.scale_at(r, gi) as f64;
                    let want = match args.scale_type {
                        Some(ScaleType::E8M0) => {
                            // 2^(⌊log2 a⌋ or +1 when the mantissa is ≥ 1.75, − ⌊log2 max⌋)
                            let k = a.log2().floor();
                            let k = if a / 2f64.powf(k) >= 1.75 { k + 1.0 } else { k };
                            2f64.powf(k - (fmt.max() as f64).log2().floor())
                        }
                        Some(ScaleType::E4M3) => {
                            let s0 = round_to(DType::BF16, (a / 6.0) as f32) as f64;
                            let s1 = (s0 * g.unwrap() as f64) as f32;
                            FloatFormat::E4M3.decode(nearest(FloatFormat::E4M3, s1 as f64)) as f64
                        }
                        _ => round_to(DType::BF16, (a / 448.0) as f32) as f64,
                    };
                    assert_eq!(s, want, "{name}: scale of row {r} group {gi}");
                    for j in cols {
                        let eff = match g {
                            Some(g) => (s as f32 / g) as f64,
                            None => s,
                        };
                        let x = if g.is_some() {
                            (w[[r, j]] / eff as f32) as f64
                        } else {
                            round_to(DType::BF16, w[[r, j]] / s as f32) as f64
                        };
                        let x = x.clamp(-(fmt.max() as f64), fmt.max() as f64);
                        let c = q.codes[r * inn + j] as u8;
                        assert_eq!(
                            fmt.decode(c),
                            fmt.decode(nearest(fmt, x)),
                            "{name}: code of ({r}, {j}) for {x}"
                        );
                    }
                }
            }
            let d = q.dequantize();
            for r in 0..out {
                for j in 0..inn {
                    let c = q.codes[r * inn + j] as u8;
                    let s = q.scale_at(r, q.group_of(j));
                    let eff = g.map_or(s, |g| s / g);
                    assert_eq!(
                        d[[r, j]],
                        fmt.decode(c) * eff,
                        "{name}: dequantized ({r}, {j})"
                    );
                }
            }
        }
    }

    /// Zero groups get the reference's eps scales (never a division by zero), and a tensor of
    /// zeros quantizes to zeros.
    #[test]
    fn zero_groups_quantize_to_zero() {
        for name in ["FP8_DYNAMIC", "FP8_BLOCK", "NVFP4A16", "MXFP4A16"] {
            let args = preset(name).unwrap().weights;
            let w = Array2::<f32>::zeros((128, 128));
            let q = quantize(w.view(), &args, DType::BF16, None).unwrap();
            assert!(q.dequantize().iter().all(|&v| v == 0.0), "{name}");
            assert!(q.scales.iter().all(|&s| s > 0.0 && s.is_finite()), "{name}");
        }
    }

    #[test]
    fn bits_per_weight_counts_codes_scales_and_the_global_scale() {
        let w = random(256, 256, 5);
        let bpw = |name: &str| {
            let q = quantize(w.view(), &preset(name).unwrap().weights, DType::BF16, None).unwrap();
            q.bits_per_weight()
        };
        assert_eq!(bpw("FP8_DYNAMIC"), 8.0 + 16.0 / 256.0);
        assert_eq!(bpw("FP8_BLOCK"), 8.0 + 4.0 * 16.0 / 65536.0);
        assert_eq!(bpw("NVFP4A16"), 4.0 + 8.0 / 16.0 + 32.0 / 65536.0);
        assert_eq!(bpw("MXFP4A16"), 4.0 + 8.0 / 32.0);
    }
}
