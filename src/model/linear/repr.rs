//! What a linear can store and carry beside its weight: the representations ([`Repr`] with its
//! [`Mask`] and [`Factor`]s), a low-rank [`Adapter`], an input quantizer ([`ActQuant`]), ggml codes.

use crate::quant::QuantizedLinear;
use anyhow::{ensure, Result};
use ndarray::Array2;
use rayon::prelude::*;

/// Which weights a pruned linear keeps: `[out, in]` row-major, `true` = kept.
#[derive(Clone, Debug, PartialEq)]
pub struct Mask {
    pub shape: (usize, usize),
    pub keep: Vec<bool>,
}

impl Mask {
    pub fn new(shape: (usize, usize), keep: Vec<bool>) -> Result<Self> {
        ensure!(
            keep.len() == shape.0 * shape.1,
            "mask has {} entries, the linear {}×{}",
            keep.len(),
            shape.0,
            shape.1
        );
        Ok(Mask { shape, keep })
    }

    /// Fraction of weights removed.
    pub fn sparsity(&self) -> f64 {
        let zeros = self.keep.iter().filter(|k| !**k).count();
        zeros as f64 / self.keep.len().max(1) as f64
    }
}

/// One factor of a factored linear: its values and, when quantized, its codes.
#[derive(Clone, Debug)]
pub struct Factor {
    pub values: Array2<f32>,
    pub quant: Option<QuantizedLinear>,
}

/// What a linear stores.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // one per linear, never in bulk
pub enum Repr {
    /// Floating-point values in the checkpoint's dtype.
    Dense,
    /// Integer codes on a grid; the computed matrix is their dequantization.
    Quantized(QuantizedLinear),
    /// A mask over a dense or quantized inner representation (masked weights are exactly 0).
    Sparse { mask: Mask, inner: Box<Repr> },
    /// W ≈ U·V with U [out, r] and V [r, in]; the forward runs the two factors in turn.
    Factored { u: Factor, v: Factor },
}

/// A low-rank adapter on a linear: y = base(x) + (x·Aᵀ)·Bᵀ, A [r, in] (PEFT's `lora_A`),
/// B [out, r] (`lora_B`), scaling 1.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub a: Array2<f32>,
    pub b: Array2<f32>,
}

impl Adapter {
    pub fn rank(&self) -> usize {
        self.a.nrows()
    }
}

/// A quantizer on a linear's input, run inside the forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActQuant {
    /// Dynamic, symmetric, per-token quantization (W8A8's "A8"): each row of the input is
    /// scaled by max|x|/qmax, rounded half to even and clamped.
    PerToken { bits: u32 },
    /// What llama.cpp's CPU backend does to the input of a matmul with a ggml weight: it
    /// converts the activations to the weight type's `vec_dot_type` (Q8_0 / Q8_1 / Q8_K blocks,
    /// or f16) for its integer dot products (`compress eval --llama-cpp-activations`).
    Ggml(crate::quant::ggml::VecDot),
    /// Dynamic, symmetric quantization onto a float grid (FP8_DYNAMIC's per-token E4M3,
    /// FP8_BLOCK's groups of 128, MX's groups of 32 under power-of-two scales): each token, or
    /// each group of `group` columns of it, is scaled by max|x| / max of the format (MX: the
    /// E8M0 scale of that max) and rounded to the nearest value.
    Float {
        format: crate::number::FloatFormat,
        group: Option<usize>,
        mx: bool,
    },
}

impl ActQuant {
    /// W8A8's per-token quantizer with `bits`.
    pub fn per_token(bits: u32) -> Self {
        ActQuant::PerToken { bits }
    }

    /// The quantizer a scheme's dynamic `input_activations` arguments describe.
    pub fn from_args(a: &crate::quant::QuantArgs) -> anyhow::Result<Self> {
        use crate::number::ScaleType;
        use crate::quant::Strategy;
        match (a.float, a.strategy) {
            (None, Strategy::Token) if a.bits == 8 && a.symmetric => Ok(ActQuant::per_token(8)),
            (Some(format), Strategy::Token) => Ok(ActQuant::Float {
                format,
                group: None,
                mx: false,
            }),
            (Some(format), Strategy::Group) if a.group_size > 0 => Ok(ActQuant::Float {
                format,
                group: Some(a.group_size),
                mx: a.scale_type == Some(ScaleType::E8M0),
            }),
            _ => anyhow::bail!(
                "input activations: {:?} with strategy {:?} have no dynamic quantizer",
                a.num(),
                a.strategy
            ),
        }
    }

    /// Whether this quantizer can run on inputs of width `k`: compressed-tensors (and so vLLM
    /// and transformers) needs whole groups.
    pub fn check_width(&self, k: usize) -> anyhow::Result<()> {
        if let ActQuant::Float { group: Some(g), .. } = self {
            anyhow::ensure!(
                k.is_multiple_of(*g),
                "input activations in groups of {g} need an input width divisible by {g}, found {k}"
            );
        }
        Ok(())
    }

    /// The dynamic `input_activations` arguments this quantizer stands for (what a
    /// compressed-tensors config declares); `None` for llama.cpp's emulation.
    pub fn args(&self) -> Option<crate::quant::QuantArgs> {
        use crate::quant::{Observer, QuantArgs, Strategy};
        match *self {
            ActQuant::PerToken { bits } => Some(QuantArgs::int(
                bits,
                true,
                Strategy::Token,
                0,
                Observer::MinMax,
            )),
            ActQuant::Ggml(_) => None,
            ActQuant::Float { format, group, mx } => Some(QuantArgs {
                bits: format.bits(),
                symmetric: true,
                strategy: if group.is_some() {
                    Strategy::Group
                } else {
                    Strategy::Token
                },
                group_size: group.unwrap_or(0),
                observer: Observer::MinMax,
                float: Some(format),
                scale_type: mx.then_some(crate::number::ScaleType::E8M0),
                global_scale: false,
                block: None,
            }),
        }
    }

    /// The bits of an integer per-token quantizer (W8A8's `int-quantized`).
    pub fn per_token_bits(&self) -> Option<u32> {
        match self {
            ActQuant::PerToken { bits } => Some(*bits),
            _ => None,
        }
    }

    /// Quantize-dequantize `x` ([n, k] row-major) in place.
    pub fn apply(&self, x: &mut [f32], k: usize) {
        match *self {
            ActQuant::PerToken { bits } => {
                let qmax = ((1i32 << (bits - 1)) - 1) as f32;
                x.par_chunks_mut(k).for_each(|row| {
                    let m = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                    if m == 0.0 {
                        return;
                    }
                    let s = m / qmax;
                    for v in row.iter_mut() {
                        *v = crate::quant::round_half_even(*v / s).clamp(-qmax - 1.0, qmax) * s;
                    }
                });
            }
            ActQuant::Ggml(t) => x.par_chunks_mut(k).for_each(|row| t.round_trip(row)),
            ActQuant::Float { format, group, mx } => {
                let width = group.unwrap_or(k).max(1);
                let m = format.max();
                x.par_chunks_mut(k).for_each(|row| {
                    for g in row.chunks_mut(width) {
                        let a = crate::quant::float::amax(g.iter().copied());
                        let s = if mx {
                            crate::quant::float::mx_scale(crate::quant::float::mx_exponent(
                                a, format,
                            ))
                        } else {
                            a / m
                        };
                        if s == 0.0 {
                            continue;
                        }
                        for v in g.iter_mut() {
                            *v = format.round((*v / s).clamp(-m, m)) * s;
                        }
                    }
                });
            }
        }
    }
}

/// A weight encoded as ggml blocks, rows in the checkpoint's (HF) order.
#[derive(Clone, Debug, PartialEq)]
pub struct GgmlCodes {
    pub ty: crate::quant::ggml::GgmlType,
    pub bytes: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FP8 per token / per group of 128 and MX groups of 32 against a direct computation:
    /// each token (group) scaled by its max |x| over the format's max (MX: the E8M0 scale),
    /// rounded to the nearest value; partial groups refused for serving engines.
    #[test]
    fn float_act_quant_matches_a_direct_computation() {
        use crate::number::FloatFormat;
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let k = 256;
        let x: Vec<f32> = (0..4 * k).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
        for (group, mx, fmt) in [
            (None, false, FloatFormat::E4M3),
            (Some(128), false, FloatFormat::E4M3),
            (Some(32), true, FloatFormat::E2M1),
        ] {
            let a = ActQuant::Float {
                format: fmt,
                group,
                mx,
            };
            let mut got = x.clone();
            a.apply(&mut got, k);
            let w = group.unwrap_or(k);
            for (chunk, out) in x.chunks(w).zip(got.chunks(w)) {
                let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
                let s = if mx {
                    // 2^(⌊log2 amax⌋ (+1 when the mantissa ≥ 1.75) − ⌊log2 max⌋)
                    let e = amax.log2().floor();
                    let e = if amax / 2f32.powf(e) >= 1.75 {
                        e + 1.0
                    } else {
                        e
                    };
                    2f32.powf(e - fmt.max().log2().floor())
                } else {
                    amax / fmt.max()
                };
                for (v, o) in chunk.iter().zip(out) {
                    let q = fmt.decode(fmt.encode((v / s).clamp(-fmt.max(), fmt.max()))) * s;
                    assert_eq!(*o, q, "{a:?}: {v}");
                }
            }
            assert_eq!(ActQuant::from_args(&a.args().unwrap()).unwrap(), a);
        }
        let g = ActQuant::Float {
            format: FloatFormat::E4M3,
            group: Some(128),
            mx: false,
        };
        assert!(g.check_width(256).is_ok());
        assert!(g.check_width(64).is_err());
    }

    #[test]
    fn act_quant_is_per_token_symmetric() {
        let a = ActQuant::per_token(8);
        let mut x = vec![
            1.0, -0.5, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.001, -3.0, 1.5,
        ];
        let orig = x.clone();
        a.apply(&mut x, 4);
        // row 0: scale 1/127; row 1 all zero; row 2: scale 3/127
        assert_eq!(x[0], 1.0);
        assert_eq!(&x[4..8], &[0.0; 4]);
        assert_eq!(x[9], 0.0);
        for (q, o) in x.iter().zip(&orig) {
            assert!((q - o).abs() <= 3.0 / 127.0 / 2.0 + 1e-7);
        }
    }
}
