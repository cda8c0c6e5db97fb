//! The setters through which a pass gives a linear a new representation, bias, adapter, input
//! quantizer or metadata, each checked and recorded as a change.

use super::repr::{ActQuant, Adapter, Factor, GgmlCodes, Mask, Repr};
use super::Linear;
use crate::model::ops;
use crate::quant::QuantizedLinear;
use anyhow::{bail, ensure, Context, Result};
use ndarray::Array2;
use rayon::prelude::*;

impl Linear {
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
