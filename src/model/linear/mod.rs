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

mod change;
mod compute;
mod repr;

pub use repr::{ActQuant, Adapter, Factor, GgmlCodes, Mask, Repr};

use crate::quant::QuantizedLinear;
use crate::safetensors_file::DType;
use anyhow::{ensure, Result};
use ndarray::Array2;

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

    /// Per-input-column importance recorded by the `imatrix` pass.
    pub fn importance(&self) -> Option<&[f32]> {
        self.importance.as_deref()
    }

    /// Set once any pass changed the linear.
    pub fn is_modified(&self) -> bool {
        self.modified
    }
}
