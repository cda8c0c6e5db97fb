//! A decoder-layer linear as a value that owns its representation.
//!
//! A pass does not edit a weight matrix and hope the exporter guesses what happened: it gives
//! the linear a new representation — dense values, integer codes on a grid, a mask over either,
//! or two factors — through a setter that records the change. Every representation has
//!
//! * its forward ([`Linear::forward`]), used by the calibration forward and by evaluation, so
//!   what the next layer calibrates on and what the report scores is the compressed function;
//! * the matrix it computes ([`Linear::weight`], `u·v` for factors), for statistics and for a
//!   pass that follows another;
//! * its exact storage bytes ([`Linear::bytes`]) as the compressed-tensors exporter writes them;
//! * whether it changed ([`Linear::is_modified`]): unchanged linears are copied byte for byte.
//!
//! An optional low-rank adapter ([`Adapter`], EoRA's compensation of a compression error) adds
//! B·A to whatever the representation computes: the forward runs base + (x·Aᵀ)·Bᵀ, `weight`
//! is the merged matrix, and exporters write the base and the adapter separately (a PEFT LoRA
//! adapter beside the checkpoint) or merged (`dense`).
//!
//! An optional activation quantizer on the input ([`ActQuant`], for W8A8) runs inside the
//! forward, so evaluation measures the model that will be served, not W8A16.

use crate::model::ops;
use crate::quant::QuantizedLinear;
use crate::safetensors_file::DType;
use anyhow::{bail, ensure, Context, Result};
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
}

impl ActQuant {
    /// W8A8's per-token quantizer with `bits`.
    pub fn per_token(bits: u32) -> Self {
        ActQuant::PerToken { bits }
    }

    /// The bits of a per-token quantizer (what a compressed-tensors config declares).
    pub fn per_token_bits(&self) -> Option<u32> {
        match self {
            ActQuant::PerToken { bits } => Some(*bits),
            ActQuant::Ggml(_) => None,
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
        }
    }
}

#[derive(Clone, Debug)]
pub struct Linear {
    repr: Repr,
    /// The matrix the representation computes, [out, in] f32 (for factors: U·V), without
    /// the adapter.
    weight: Array2<f32>,
    /// A low-rank adapter and the merged matrix weight + B·A.
    adapter: Option<(Adapter, Array2<f32>)>,
    pub bias: Option<Vec<f32>>,
    /// Storage dtype of the weight in the source checkpoint.
    pub dtype: DType,
    act_quant: Option<ActQuant>,
    modified: bool,
    /// Per-input-column importance (mean x² of the calibration inputs, llama.cpp's imatrix)
    /// for exporters that weigh rounding errors by it (GGUF). Does not change the weights.
    importance: Option<Vec<f32>>,
    /// The weight as encoded ggml blocks (GPTQ onto a GGUF type): `weight` is exactly their
    /// decoding, and a GGUF export of that type writes these bytes. Any change of the weight
    /// drops them.
    ggml: Option<GgmlCodes>,
    /// The weight rounded to bf16 and packed for evaluation in bf16 ([`Linear::pack_bf16`]);
    /// any change of the weight drops it.
    bf16: Option<std::sync::Arc<crate::model::bf16::PackedBf16>>,
    /// The f32 values were dropped after packing for evaluation ([`Linear::release_values`]);
    /// the shape they had.
    released: Option<(usize, usize)>,
}

/// A weight encoded as ggml blocks, rows in the checkpoint's (HF) order.
#[derive(Clone, Debug, PartialEq)]
pub struct GgmlCodes {
    pub ty: crate::quant::ggml::GgmlType,
    pub bytes: Vec<u8>,
}

impl Linear {
    /// A dense linear as read from a checkpoint (not modified).
    pub fn dense(weight: Array2<f32>, bias: Option<Vec<f32>>, dtype: DType) -> Self {
        Linear {
            repr: Repr::Dense,
            weight,
            bias,
            dtype,
            act_quant: None,
            modified: false,
            importance: None,
            ggml: None,
            adapter: None,
            bf16: None,
            released: None,
        }
    }

    /// A quantized linear as read from a checkpoint (not modified): `weight` is the codes'
    /// dequantization, as the reader computed it while validating them.
    pub fn quantized(
        weight: Array2<f32>,
        q: QuantizedLinear,
        bias: Option<Vec<f32>>,
        dtype: DType,
    ) -> Result<Self> {
        ensure!(
            q.shape == weight.dim(),
            "codes {:?} for a {:?} linear",
            q.shape,
            weight.dim()
        );
        let mut l = Linear::dense(weight, bias, dtype);
        l.repr = Repr::Quantized(q);
        Ok(l)
    }

    /// A factored linear as read from a checkpoint (not modified).
    pub fn factored(u: Factor, v: Factor, bias: Option<Vec<f32>>, dtype: DType) -> Result<Self> {
        let mut l = Linear::dense(Array2::zeros((0, 0)), bias, dtype);
        l.set_factored(u, v)?;
        l.modified = false;
        Ok(l)
    }

    /// The matrix this linear computes, [out, in] (with its adapter merged, if any).
    pub fn weight(&self) -> &Array2<f32> {
        self.not_released();
        match &self.adapter {
            Some((_, merged)) => merged,
            None => &self.weight,
        }
    }

    /// The matrix the representation computes without the adapter.
    pub fn base_weight(&self) -> &Array2<f32> {
        self.not_released();
        &self.weight
    }

    fn not_released(&self) {
        assert!(
            self.released.is_none(),
            "the linear's f32 values were released for evaluation"
        );
    }

    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref().map(|(a, _)| a)
    }

    /// Add a low-rank adapter B·A on top of the representation (the last change to a linear:
    /// the representation setters refuse a linear that carries one).
    pub fn set_adapter(&mut self, adapter: Adapter) -> Result<()> {
        self.not_released();
        let (out, inn) = self.weight.dim();
        let r = adapter.a.nrows();
        ensure!(
            adapter.a.ncols() == inn && adapter.b.dim() == (out, r) && r > 0,
            "adapter A {:?}, B {:?} for a {out}×{inn} linear",
            adapter.a.dim(),
            adapter.b.dim()
        );
        ensure!(
            !matches!(self.repr, Repr::Factored { .. }),
            "a factored linear takes no adapter (raise its rank instead)"
        );
        ensure!(self.adapter.is_none(), "the linear already has an adapter");
        // merged = W + B·A, through the forward's GEMM (rows of B against the rows of Aᵀ)
        let bs = adapter.b.as_standard_layout().to_owned();
        let at = adapter.a.t().as_standard_layout().to_owned();
        let ba = ops::linear(
            bs.as_slice().context("adapter")?,
            out,
            r,
            at.as_slice().context("adapter")?,
            inn,
            None,
        );
        let merged = &self.weight + &Array2::from_shape_vec((out, inn), ba)?;
        self.adapter = Some((adapter, merged));
        self.modified = true;
        self.ggml = None;
        self.bf16 = None;
        Ok(())
    }

    /// As read from a checkpoint with a PEFT adapter beside it (not a change).
    pub fn with_adapter(mut self, adapter: Option<Adapter>) -> Result<Self> {
        if let Some(a) = adapter {
            let m = self.modified;
            self.set_adapter(a)?;
            self.modified = m;
        }
        Ok(self)
    }

    fn no_adapter(&self) -> Result<()> {
        ensure!(
            self.adapter.is_none(),
            "the linear carries a low-rank adapter: an adapter pass must come after every pass that changes the weights"
        );
        Ok(())
    }

    pub fn shape(&self) -> (usize, usize) {
        self.released.unwrap_or_else(|| self.weight.dim())
    }

    pub fn repr(&self) -> &Repr {
        &self.repr
    }

    /// The integer codes when the linear (or the inner representation of a sparse one) is
    /// quantized.
    pub fn quant(&self) -> Option<&QuantizedLinear> {
        self.not_released();
        match &self.repr {
            Repr::Quantized(q) => Some(q),
            Repr::Sparse { inner, .. } => match inner.as_ref() {
                Repr::Quantized(q) => Some(q),
                _ => None,
            },
            _ => None,
        }
    }

    pub fn mask(&self) -> Option<&Mask> {
        match &self.repr {
            Repr::Sparse { mask, .. } => Some(mask),
            _ => None,
        }
    }

    pub fn act_quant(&self) -> Option<ActQuant> {
        self.act_quant
    }

    /// The ggml blocks the weight is exactly the decoding of, if a pass encoded it so.
    pub fn ggml(&self) -> Option<&GgmlCodes> {
        self.ggml.as_ref()
    }

    /// Record the weight's ggml encoding (rows in HF order). Refused unless the blocks decode
    /// to exactly the current weight, so what a GGUF export writes is what was computed with.
    pub fn set_ggml(&mut self, codes: GgmlCodes) -> Result<()> {
        self.not_released();
        let (rows, cols) = self.weight.dim();
        ensure!(
            self.adapter.is_none(),
            "ggml codes for a linear with an adapter"
        );
        let dec = crate::quant::ggml::dequantize(codes.ty, &codes.bytes, rows * cols)?;
        let w = self.weight.as_slice().context("weight not contiguous")?;
        if let Some(i) = w
            .iter()
            .zip(&dec)
            .position(|(a, b)| a.to_bits() != b.to_bits())
        {
            bail!(
                "{} blocks decode to {} at ({}, {}), the weight holds {}",
                codes.ty.name(),
                dec[i],
                i / cols,
                i % cols,
                w[i]
            );
        }
        self.ggml = Some(codes);
        Ok(())
    }

    /// Per-input-column importance recorded by the `imatrix` pass.
    pub fn importance(&self) -> Option<&[f32]> {
        self.importance.as_deref()
    }

    /// Record per-input-column importance (one finite, non-negative value per input).
    pub fn set_importance(&mut self, v: Vec<f32>) -> Result<()> {
        self.not_released();
        ensure!(
            v.len() == self.shape().1,
            "{} importance values for a linear with {} inputs",
            v.len(),
            self.shape().1
        );
        ensure!(
            v.iter().all(|x| x.is_finite() && *x >= 0.0),
            "importance values must be finite and non-negative"
        );
        self.importance = Some(v);
        Ok(())
    }

    /// Set once any pass changed the linear.
    pub fn is_modified(&self) -> bool {
        self.modified
    }

    /// New dense values (a pass that rescales or updates weights). A sparse linear keeps its
    /// mask: masked positions must be zero in `w`.
    pub fn set_weight(&mut self, w: Array2<f32>) -> Result<()> {
        self.not_released();
        self.no_adapter()?;
        ensure!(
            w.dim() == self.weight.dim() || self.weight.is_empty(),
            "new weight {:?} for a {:?} linear",
            w.dim(),
            self.weight.dim()
        );
        if let Some(m) = self.mask() {
            check_masked_zero(m, &w, "new weights")?;
        }
        self.repr = match std::mem::replace(&mut self.repr, Repr::Dense) {
            Repr::Sparse { mask, .. } => Repr::Sparse {
                mask,
                inner: Box::new(Repr::Dense),
            },
            _ => Repr::Dense,
        };
        self.weight = w;
        self.modified = true;
        self.ggml = None;
        self.bf16 = None;
        Ok(())
    }

    /// Integer codes on a grid. A sparse linear keeps its mask: the codes must dequantize to
    /// exactly zero at masked positions (a quantizer that respects the mask does).
    pub fn set_quantized(&mut self, q: QuantizedLinear) -> Result<()> {
        self.not_released();
        self.no_adapter()?;
        ensure!(
            q.shape == self.weight.dim(),
            "codes {:?} for a {:?} linear",
            q.shape,
            self.weight.dim()
        );
        let dq = q.dequantize();
        if let Some(m) = self.mask() {
            check_masked_zero(m, &dq, "quantized weights")?;
        }
        self.repr = match std::mem::replace(&mut self.repr, Repr::Dense) {
            Repr::Sparse { mask, .. } => Repr::Sparse {
                mask,
                inner: Box::new(Repr::Quantized(q)),
            },
            _ => Repr::Quantized(q),
        };
        self.weight = dq;
        self.modified = true;
        self.ggml = None;
        self.bf16 = None;
        Ok(())
    }

    /// Prune: zero the weights the mask drops and keep the mask (later passes preserve it).
    pub fn set_mask(&mut self, mask: Mask) -> Result<()> {
        self.not_released();
        self.no_adapter()?;
        ensure!(
            mask.shape == self.weight.dim(),
            "mask {:?} for a {:?} linear",
            mask.shape,
            self.weight.dim()
        );
        match &self.repr {
            Repr::Dense | Repr::Sparse { .. } => {}
            Repr::Quantized(_) => bail!("prune before quantizing: the linear already holds codes"),
            Repr::Factored { .. } => bail!("a factored linear cannot be masked"),
        }
        if let Repr::Sparse { inner, .. } = &self.repr {
            ensure!(
                matches!(inner.as_ref(), Repr::Dense),
                "prune before quantizing: the linear already holds codes"
            );
        }
        let inner = Repr::Dense;
        let w = self
            .weight
            .as_slice_mut()
            .context("weight not contiguous")?;
        w.par_iter_mut()
            .zip(mask.keep.par_iter())
            .for_each(|(v, k)| {
                if !k {
                    *v = 0.0
                }
            });
        self.repr = Repr::Sparse {
            mask,
            inner: Box::new(inner),
        };
        self.modified = true;
        self.ggml = None;
        self.bf16 = None;
        Ok(())
    }

    /// Replace the linear by two factors, U [out, r] · V [r, in].
    pub fn set_factored(&mut self, u: Factor, v: Factor) -> Result<()> {
        self.not_released();
        self.no_adapter()?;
        let (out, r) = u.values.dim();
        let (r2, inn) = v.values.dim();
        ensure!(
            r == r2,
            "factor ranks differ: U is {out}×{r}, V is {r2}×{inn}"
        );
        ensure!(
            self.weight.is_empty() || (out, inn) == self.weight.dim(),
            "factors {out}×{r}·{r2}×{inn} for a {:?} linear",
            self.weight.dim()
        );
        for f in [&u, &v] {
            if let Some(q) = &f.quant {
                ensure!(
                    q.shape == f.values.dim(),
                    "factor codes {:?} for a {:?} factor",
                    q.shape,
                    f.values.dim()
                );
            }
        }
        // W = U·V: rows of U against the rows of Vᵀ, through the forward's GEMM
        let us = u.values.as_standard_layout().to_owned();
        let vt = v.values.t().as_standard_layout().to_owned();
        let w = ops::linear(
            us.as_slice().context("factor")?,
            out,
            r,
            vt.as_slice().context("factor")?,
            inn,
            None,
        );
        self.weight = Array2::from_shape_vec((out, inn), w)?;
        self.repr = Repr::Factored { u, v };
        self.modified = true;
        self.ggml = None;
        self.bf16 = None;
        Ok(())
    }

    /// New bias values (a pass that tunes them), one per output.
    pub fn set_bias(&mut self, b: Vec<f32>) -> Result<()> {
        self.not_released();
        ensure!(
            self.bias.as_ref().map(|v| v.len()) == Some(b.len()),
            "{} bias values for a linear with {} (a bias can be changed, not added)",
            b.len(),
            self.bias.as_ref().map_or(0, |v| v.len())
        );
        self.bias = Some(b);
        self.modified = true;
        Ok(())
    }

    /// As read from a checkpoint whose config quantizes this linear's input (not a change).
    pub fn with_act_quant(mut self, a: Option<ActQuant>) -> Self {
        self.act_quant = a;
        self
    }

    /// Quantize this linear's input at run time (W8A8), or stop doing so.
    pub fn set_act_quant(&mut self, a: Option<ActQuant>) {
        if a != self.act_quant {
            self.act_quant = a;
            self.modified = true;
        }
    }

    /// y = x·Wᵀ + b for x [n, in] row-major, through the representation.
    /// Compute this linear's product in bf16 from now on (evaluation with `precision: bf16`):
    /// the weight is rounded and packed once. Factored linears keep f32 factors (their two
    /// thin products are a small part of the work).
    pub fn pack_bf16(&mut self) {
        if self.bf16.is_some() {
            return;
        }
        if let Repr::Quantized(q) = &self.repr {
            // the kernel reads the codes (the same values as packing the dequantized weight)
            self.bf16 = Some(std::sync::Arc::new(
                crate::model::bf16::PackedBf16::pack_quantized(q),
            ));
        } else if !matches!(self.repr, Repr::Factored { .. }) {
            if let Some(ws) = self.weight.as_slice() {
                let (out, k) = self.weight.dim();
                self.bf16 = Some(std::sync::Arc::new(crate::model::bf16::PackedBf16::pack(
                    ws, out, k,
                )));
            }
        }
    }

    /// Bytes of weight data this linear holds in memory: its f32 values (with an adapter's
    /// merged matrix and factors), its integer codes and its packed bf16 form.
    pub fn resident_bytes(&self) -> usize {
        let codes = match &self.repr {
            Repr::Quantized(q) => q.codes.len() + 4 * q.scales.len(),
            _ => 0,
        };
        let adapter = self
            .adapter
            .as_ref()
            .map_or(0, |(a, m)| 4 * (a.a.len() + a.b.len() + m.len()));
        4 * self.weight.len() + codes + adapter + self.bf16.as_ref().map_or(0, |p| p.bytes())
    }

    /// Evaluation only: once packed for bf16 ([`Linear::pack_bf16`]), drop the f32 values the
    /// forward no longer reads (the weight, an adapter's merged matrix); the packed form and
    /// the adapter's factors remain. Afterwards only [`Linear::forward`], [`Linear::shape`]
    /// and the metadata may be used ([`Linear::weight`] panics). No effect on an unpacked
    /// linear.
    pub fn release_values(&mut self) {
        if self.bf16.is_none() || self.released.is_some() {
            return;
        }
        self.released = Some(self.weight.dim());
        self.weight = Array2::zeros((0, 0));
        if let Some((_, merged)) = &mut self.adapter {
            *merged = Array2::zeros((0, 0));
        }
        if let Repr::Quantized(q) = &mut self.repr {
            // the packed panels hold the codes
            q.codes = Vec::new();
        }
    }

    /// Whether [`Linear::forward`] of `self` and of `o` compute the same function bit for bit:
    /// every field the forward reads holds the same bits (the computed matrix or the factors,
    /// the adapter, the bias, the input quantizer, the bf16 packing). Conservative: released
    /// values or different packings answer `false`. The engine re-uses activations computed
    /// before a pass ran only while this holds for every linear they went through.
    pub fn same_forward(&self, o: &Linear) -> bool {
        fn same(a: &Array2<f32>, b: &Array2<f32>) -> bool {
            a.dim() == b.dim()
                && a.iter()
                    .zip(b.iter())
                    .all(|(x, y)| x.to_bits() == y.to_bits())
        }
        let factors = match (&self.repr, &o.repr) {
            (Repr::Factored { u, v }, Repr::Factored { u: u2, v: v2 }) => {
                same(&u.values, &u2.values) && same(&v.values, &v2.values)
            }
            (Repr::Factored { .. }, _) | (_, Repr::Factored { .. }) => false,
            _ => true,
        };
        let adapters = match (&self.adapter, &o.adapter) {
            (None, None) => true,
            (Some((a, _)), Some((b, _))) => same(&a.a, &b.a) && same(&a.b, &b.b),
            _ => false,
        };
        let bias = match (&self.bias, &o.bias) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
            }
            _ => false,
        };
        let packed = match (&self.bf16, &o.bf16) {
            (None, None) => true,
            (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
            _ => false,
        };
        self.released.is_none()
            && o.released.is_none()
            && factors
            && adapters
            && bias
            && packed
            && self.act_quant == o.act_quant
            && same(&self.weight, &o.weight)
    }

    pub fn forward(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let (out, k) = self.shape();
        ensure!(
            x.len() == n * k,
            "input has {} values, expected {n}×{k}",
            x.len()
        );
        let mut xq;
        let x = match self.act_quant {
            Some(a) => {
                xq = x.to_vec();
                a.apply(&mut xq, k);
                &xq[..]
            }
            None => x,
        };
        let mut y = match &self.repr {
            Repr::Factored { u, v } => {
                let r = v.values.nrows();
                let vs = v.values.as_slice().context("factor not contiguous")?;
                let us = u.values.as_slice().context("factor not contiguous")?;
                let h = ops::linear(x, n, k, vs, r, None);
                ops::linear(&h, n, r, us, out, self.bias.as_deref())
            }
            _ => match &self.bf16 {
                Some(p) => p.matmul(x, n, self.bias.as_deref()),
                None => {
                    let ws = self.weight.as_slice().context("weight not contiguous")?;
                    ops::linear(x, n, k, ws, out, self.bias.as_deref())
                }
            },
        };
        if let Some((ad, _)) = &self.adapter {
            // + (x·Aᵀ)·Bᵀ
            let r = ad.rank();
            let a = ad.a.as_slice().context("adapter not contiguous")?;
            let b = ad.b.as_slice().context("adapter not contiguous")?;
            let h = ops::linear(x, n, k, a, r, None);
            let d = ops::linear(&h, n, r, b, out, None);
            y.iter_mut().zip(&d).for_each(|(y, d)| *y += d);
        }
        Ok(y)
    }

    /// Exact bytes of the weight as the compressed-tensors exporter stores it (bias excluded):
    /// dense values in the checkpoint dtype (a pruned linear is stored dense, zeros included),
    /// packed codes with their scales, zero points and g_idx, or both factors; plus the
    /// adapter's A and B in the checkpoint dtype (stored in the adapter file beside it). A
    /// weight a pass encoded as ggml blocks counts those blocks (what a GGUF export writes).
    pub fn bytes(&self) -> usize {
        self.not_released();
        fn of(repr: &Repr, w: &Array2<f32>, dtype: DType) -> usize {
            match repr {
                Repr::Dense => w.len() * dtype.size(),
                Repr::Quantized(q) => crate::formats::compressed_tensors::stored_bytes(q),
                Repr::Sparse { inner, .. } => of(inner, w, dtype),
                Repr::Factored { u, v } => [u, v]
                    .iter()
                    .map(|f| match &f.quant {
                        Some(q) => crate::formats::compressed_tensors::stored_bytes(q),
                        None => f.values.len() * dtype.size(),
                    })
                    .sum(),
            }
        }
        let adapter = self
            .adapter()
            .map_or(0, |a| (a.a.len() + a.b.len()) * self.dtype.size());
        if let Some(g) = &self.ggml {
            return g.bytes.len() + adapter;
        }
        of(&self.repr, &self.weight, self.dtype) + adapter
    }
}

fn check_masked_zero(mask: &Mask, w: &Array2<f32>, what: &str) -> Result<()> {
    let ws = w.as_slice().context("weight not contiguous")?;
    if let Some(i) = ws.iter().zip(&mask.keep).position(|(v, k)| !k && *v != 0.0) {
        bail!(
            "{what} are non-zero at pruned position ({}, {}): the pass did not keep the mask",
            i / mask.shape.1,
            i % mask.shape.1
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(shape: (usize, usize), seed: u64) -> Array2<f32> {
        let mut s = seed;
        Array2::from_shape_fn(shape, |_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
    }

    fn naive(x: &[f32], n: usize, w: &Array2<f32>) -> Vec<f32> {
        let (out, k) = w.dim();
        let mut y = vec![0f32; n * out];
        for i in 0..n {
            for o in 0..out {
                y[i * out + o] = (0..k).map(|j| x[i * k + j] * w[[o, j]]).sum();
            }
        }
        y
    }

    #[test]
    fn factored_forward_is_the_product() {
        let (u, v) = (rand((12, 5), 1), rand((5, 9), 2));
        let mut l = Linear::dense(rand((12, 9), 3), None, DType::F32);
        l.set_factored(
            Factor {
                values: u.clone(),
                quant: None,
            },
            Factor {
                values: v.clone(),
                quant: None,
            },
        )
        .unwrap();
        let w = u.dot(&v);
        for (a, b) in l.weight().iter().zip(w.iter()) {
            assert!((a - b).abs() < 1e-5);
        }
        let x = rand((7, 9), 4).into_raw_vec_and_offset().0;
        let y = l.forward(&x, 7).unwrap();
        for (a, b) in y.iter().zip(naive(&x, 7, &w)) {
            assert!((a - b).abs() < 1e-4, "{a} {b}");
        }
        assert!(l.is_modified());
        assert_eq!(l.bytes(), (12 * 5 + 5 * 9) * 4);
    }

    #[test]
    fn adapter_forward_is_base_plus_low_rank() {
        let args = crate::quant::QuantArgs {
            bits: 3,
            symmetric: true,
            strategy: crate::quant::Strategy::Group,
            group_size: 8,
            observer: crate::quant::Observer::MinMax,
        };
        let w = rand((10, 16), 11);
        let mut l = Linear::dense(
            w.clone(),
            Some(rand((1, 10), 15).into_raw_vec_and_offset().0),
            DType::F32,
        );
        let q = crate::quant::quantize_rtn(w.view(), &args, DType::F32).unwrap();
        l.set_quantized(q).unwrap();
        let base = l.weight().clone();
        let (a, b) = (rand((3, 16), 12), rand((10, 3), 13));
        // a wrong shape is refused
        assert!(l
            .clone()
            .set_adapter(Adapter {
                a: b.clone(),
                b: a.clone()
            })
            .is_err());
        l.set_adapter(Adapter {
            a: a.clone(),
            b: b.clone(),
        })
        .unwrap();
        let merged = &base + &b.dot(&a);
        for (p, q) in l.weight().iter().zip(merged.iter()) {
            assert!((p - q).abs() < 1e-5);
        }
        assert_eq!(l.base_weight(), &base);
        let x = rand((5, 16), 14).into_raw_vec_and_offset().0;
        let y = l.forward(&x, 5).unwrap();
        let bias = l.bias.clone().unwrap();
        for (i, (p, q)) in y.iter().zip(naive(&x, 5, &merged)).enumerate() {
            let q = q + bias[i % 10];
            assert!((p - q).abs() < 1e-4, "{p} vs {q}");
        }
        // codes + A + B
        assert_eq!(
            l.bytes(),
            crate::formats::compressed_tensors::stored_bytes(l.quant().unwrap()) + (48 + 30) * 4
        );
        // the adapter comes last
        assert!(l.set_weight(base.clone()).is_err());
        assert!(l
            .set_adapter(Adapter {
                a: a.clone(),
                b: b.clone()
            })
            .is_err());
    }

    #[test]
    fn mask_zeroes_and_survives_quantization() {
        let mut l = Linear::dense(rand((4, 8), 5), None, DType::BF16);
        let keep: Vec<bool> = (0..32).map(|i| i % 4 < 2).collect();
        l.set_mask(Mask::new((4, 8), keep.clone()).unwrap())
            .unwrap();
        assert!(l.weight().iter().zip(&keep).all(|(v, k)| *k || *v == 0.0));
        assert_eq!(l.mask().unwrap().sparsity(), 0.5);
        // dense values that break the mask are refused
        assert!(l.set_weight(rand((4, 8), 6)).is_err());
        let args = crate::quant::QuantArgs {
            bits: 4,
            symmetric: false,
            strategy: crate::quant::Strategy::Group,
            group_size: 8,
            observer: crate::quant::Observer::MinMax,
        };
        let q = crate::quant::quantize_rtn(l.weight().view(), &args, DType::BF16).unwrap();
        l.set_quantized(q).unwrap();
        assert!(l.quant().is_some() && l.mask().is_some());
        let x = rand((3, 8), 7).into_raw_vec_and_offset().0;
        let y = l.forward(&x, 3).unwrap();
        for (a, b) in y.iter().zip(naive(&x, 3, l.weight())) {
            assert!((a - b).abs() < 1e-4);
        }
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
