//! One decoder layer's weights on the host, as the passes see them.

use super::checkpoint::{read_checked, Checkpoint};
use crate::safetensors_file::DType;
use anyhow::{bail, Context, Result};
use ndarray::Array2;
use std::collections::BTreeMap;

pub use super::arch::Site;

pub use super::linear::{ActQuant, Adapter, Factor, GgmlCodes, Linear, Mask, Repr};

#[derive(Clone)]
pub struct LayerWeights {
    pub index: usize,
    pub linears: BTreeMap<String, Linear>,
    /// RMSNorm weights by name (`input_layernorm`, `post_attention_layernorm`,
    /// `self_attn.q_norm`, `self_attn.k_norm`) with their storage dtype.
    pub norms: BTreeMap<String, (Vec<f32>, DType)>,
    pub norms_modified: bool,
}

impl LayerWeights {
    /// Compute every linear of this layer in bf16 ([`Linear::pack_bf16`]).
    pub fn pack_bf16(&mut self) {
        for l in self.linears.values_mut() {
            l.pack_bf16();
        }
    }

    pub fn prefix(index: usize) -> String {
        format!("model.layers.{index}.")
    }

    /// Read decoder layer `l` from the checkpoint as f32 (dequantizing if the checkpoint is
    /// quantized), checking shapes against config.json.
    pub fn load(ckpt: &Checkpoint, l: usize) -> Result<Self> {
        Self::read(ckpt, l, false, &crate::model::EvalOptions::default())
    }

    /// Layer `l` for evaluation in `precision`. In bf16 every linear is packed for the bf16
    /// kernel — a quantized one from its integer codes ([`crate::model::packed_int`]) — and
    /// its f32 values are released, so the layer holds its weights in bf16 or in their bits.
    pub fn load_eval(
        ckpt: &Checkpoint,
        l: usize,
        opts: &crate::model::EvalOptions,
    ) -> Result<Self> {
        if opts.precision == crate::model::Precision::F32 {
            return Self::read(ckpt, l, false, opts);
        }
        let mut w = Self::read(ckpt, l, true, opts)?;
        for lin in w.linears.values_mut() {
            lin.pack_bf16();
            lin.release_values();
        }
        Ok(w)
    }

    /// [`LayerWeights::load`]; with `codes`, linears stored quantized keep their codes
    /// (`Repr::Quantized`, as read) instead of becoming dense.
    fn read(
        ckpt: &Checkpoint,
        l: usize,
        codes: bool,
        opts: &crate::model::EvalOptions,
    ) -> Result<Self> {
        let cfg = &ckpt.config;
        let p = Self::prefix(l);
        let shapes: BTreeMap<String, Vec<usize>> = cfg.layer_tensors(l).into_iter().collect();
        let mut linears = BTreeMap::new();
        for name in cfg.block().linear_names() {
            let full = format!("{p}{name}.weight");
            let shape = &shapes[&full];
            let module = format!("{p}{name}");
            let bias_name = format!("{module}.bias");
            let desc = cfg
                .block()
                .linear(name)
                .expect("linear_names are the block's linears");
            let bias = if cfg.has_bias(desc) {
                Some(read_checked(ckpt, &bias_name, &shapes[&bias_name])?)
            } else {
                None
            };
            let lin = if ckpt.has(&format!("{module}.weight_u")) {
                load_factored(ckpt, &module, shape, bias)?
            } else {
                let (w, dtype, q) = crate::model::dequant::stored_weight(ckpt, &module, shape)?;
                let w = Array2::from_shape_vec((shape[0], shape[1]), w)?;
                match q {
                    Some(q) if codes => Linear::quantized(w, q, bias, dtype)?,
                    _ => Linear::dense(w, bias, dtype),
                }
            };
            // W8A8 checkpoints quantize the inputs at run time: evaluation must too
            let act = crate::model::dequant::input_activations(ckpt, &module, opts.act_quant)?;
            let act = match ckpt
                .llama_cpp_input(&format!("{module}.weight"), opts.llama_cpp_activations)?
            {
                Some(v) => Some(ActQuant::Ggml(v)),
                None => act,
            };
            let lin = lin
                .with_act_quant(act)
                .with_adapter(ckpt.adapter_of(&module, shape)?)
                .with_context(|| format!("{}: adapter of {module}", ckpt.dir.display()))?;
            linears.insert(name.to_string(), lin);
        }
        let mut norms = BTreeMap::new();
        for (n, _) in &cfg.block().norms {
            let full = format!("{p}{n}.weight");
            let v = read_checked(ckpt, &full, &shapes[&full])?;
            let dt = ckpt.info(&full)?.0.dtype;
            norms.insert(n.to_string(), (v, dt));
        }
        Ok(LayerWeights {
            index: l,
            linears,
            norms,
            norms_modified: false,
        })
    }

    pub fn linear(&self, name: &str) -> &Linear {
        &self.linears[name]
    }

    /// Fold a per-channel scale `s` into a mapping without changing the block's function:
    /// the producer's output channel j is divided by s_j (an RMSNorm weight, rounded to its
    /// storage dtype as the checkpoint will hold it; or a linear's row j and bias) and every
    /// consumer's input column j multiplied by s_j — x·diag(s)⁻¹ · diag(s)·Wᵀ = x·Wᵀ.
    pub fn fold_scale(&mut self, m: &super::arch::Mapping, s: &[f32]) -> Result<()> {
        if !m.foldable {
            bail!(
                "layer {}: a scale cannot be folded into {:?} for this model's shapes",
                self.index,
                m.producer
            );
        }
        match m.producer {
            super::arch::Producer::Norm(n) => {
                let (v, dt) = self
                    .norms
                    .get_mut(n)
                    .with_context(|| format!("layer {}: no norm `{n}`", self.index))?;
                if v.len() != s.len() {
                    bail!(
                        "scale of {} channels for norm `{n}` of {}",
                        s.len(),
                        v.len()
                    );
                }
                for (w, s) in v.iter_mut().zip(s) {
                    *w = crate::quant::round_to(*dt, *w / s);
                }
                self.norms_modified = true;
            }
            super::arch::Producer::Linear(p) => {
                let lin = self
                    .linears
                    .get_mut(p)
                    .with_context(|| format!("layer {}: no linear `{p}`", self.index))?;
                let mut w = lin.weight().clone();
                if w.nrows() != s.len() {
                    bail!(
                        "scale of {} channels for `{p}` with {} rows",
                        s.len(),
                        w.nrows()
                    );
                }
                for (mut row, s) in w.rows_mut().into_iter().zip(s) {
                    row.mapv_inplace(|x| x / s);
                }
                if let Some(b) = lin.bias.as_mut() {
                    b.iter_mut().zip(s).for_each(|(b, s)| *b /= s);
                }
                lin.set_weight(w)?;
            }
        }
        for c in &m.consumers {
            let lin = self
                .linears
                .get_mut(*c)
                .with_context(|| format!("layer {}: no linear `{c}`", self.index))?;
            let mut w = lin.weight().clone();
            if w.ncols() != s.len() {
                bail!(
                    "scale of {} channels for `{c}` with {} inputs",
                    s.len(),
                    w.ncols()
                );
            }
            for mut row in w.rows_mut() {
                row.iter_mut().zip(s).for_each(|(x, s)| *x *= s);
            }
            lin.set_weight(w)?;
        }
        Ok(())
    }
}

/// A linear stored as two factors (`weight_u` [out, r], `weight_v` [r, in]), the rank agreeing
/// with config.json's `low_rank` block when it has one.
fn load_factored(
    ckpt: &Checkpoint,
    module: &str,
    shape: &[usize],
    bias: Option<Vec<f32>>,
) -> Result<Linear> {
    let (un, vn) = (format!("{module}.weight_u"), format!("{module}.weight_v"));
    let (ui, upath) = ckpt.info(&un)?;
    let r = match ui.shape.as_slice() {
        [o, r] if *o == shape[0] => *r,
        s => bail!(
            "{}: tensor `{un}` has shape {s:?}, expected [{}, rank]",
            upath.display(),
            shape[0]
        ),
    };
    if let Some(want) = ckpt
        .config
        .raw
        .pointer("/low_rank/ranks")
        .and_then(|m| m.get(module))
        .and_then(|v| v.as_u64())
    {
        if want as usize != r {
            bail!(
                "{}: `{un}` has rank {r}, config.json `low_rank.ranks` says {want}",
                upath.display()
            );
        }
    }
    let dtype = ui.dtype;
    let u = read_checked(ckpt, &un, &[shape[0], r])?;
    let v = read_checked(ckpt, &vn, &[r, shape[1]])?;
    let f = |vals: Vec<f32>, rows, cols| -> Result<Factor> {
        Ok(Factor {
            values: Array2::from_shape_vec((rows, cols), vals)?,
            quant: None,
        })
    };
    Linear::factored(f(u, shape[0], r)?, f(v, r, shape[1])?, bias, dtype)
}
