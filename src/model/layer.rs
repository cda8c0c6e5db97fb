//! One decoder layer's weights on the host, as the passes see them.

use super::checkpoint::Checkpoint;
use super::safetensors_file::DType;
use crate::quant::QuantizedLinear;
use anyhow::{bail, Result};
use ndarray::Array2;
use std::collections::BTreeMap;

/// The seven linears of a Llama-family decoder layer, in execution order.
pub const LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

pub use super::arch::Site;

impl Site {
    pub const ALL: [Site; 4] = [Site::AttnIn, Site::OIn, Site::MlpIn, Site::DownIn];

    /// The input site a linear reads (the Llama-family block: every family shares its linears).
    pub fn of(linear: &str) -> Site {
        super::arch::LLAMA
            .linear(linear)
            .map(|l| l.site)
            .unwrap_or(Site::DownIn)
    }

    /// The linears that read this site.
    pub fn linears(&self) -> Vec<&'static str> {
        super::arch::LLAMA.readers(*self).collect()
    }

    pub fn name(&self) -> &'static str {
        super::arch::LLAMA.site(*self).name
    }
}

pub struct Linear {
    /// [out_features, in_features], f32 whatever the storage dtype.
    pub weight: Array2<f32>,
    pub bias: Option<Vec<f32>>,
    /// Storage dtype of the weight in the source checkpoint.
    pub dtype: DType,
    /// Set by a quantization pass: the integer codes and parameters the exporter packs.
    /// `weight` then holds the dequantized values.
    pub quant: Option<QuantizedLinear>,
    /// Set once any pass changed `weight`.
    pub modified: bool,
}

pub struct LayerWeights {
    pub index: usize,
    pub linears: BTreeMap<String, Linear>,
    /// RMSNorm weights by name (`input_layernorm`, `post_attention_layernorm`,
    /// `self_attn.q_norm`, `self_attn.k_norm`) with their storage dtype.
    pub norms: BTreeMap<String, (Vec<f32>, DType)>,
    pub norms_modified: bool,
}

impl LayerWeights {
    pub fn prefix(index: usize) -> String {
        format!("model.layers.{index}.")
    }

    /// Read decoder layer `l` from the checkpoint as f32 (dequantizing if the checkpoint is
    /// quantized), checking shapes against config.json.
    pub fn load(ckpt: &Checkpoint, l: usize) -> Result<Self> {
        let cfg = &ckpt.config;
        let p = Self::prefix(l);
        let shapes: BTreeMap<String, Vec<usize>> = cfg.layer_tensors(l).into_iter().collect();
        let mut linears = BTreeMap::new();
        for name in LINEARS {
            let full = format!("{p}{name}.weight");
            let shape = &shapes[&full];
            let (w, dtype) =
                crate::model::dequant::dense_weight(ckpt, &format!("{p}{name}"), shape)?;
            let weight = Array2::from_shape_vec((shape[0], shape[1]), w)?;
            let bias_name = format!("{p}{name}.bias");
            let desc = cfg
                .block()
                .linear(name)
                .expect("LINEARS are the block's linears");
            let bias = if cfg.has_bias(desc) {
                Some(read_checked(ckpt, &bias_name, &shapes[&bias_name])?)
            } else {
                None
            };
            linears.insert(
                name.to_string(),
                Linear {
                    weight,
                    bias,
                    dtype,
                    quant: None,
                    modified: false,
                },
            );
        }
        let mut norms = BTreeMap::new();
        for (n, _) in cfg.block().norms {
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
}

/// Read a dense tensor as f32, checking its shape.
pub fn read_checked(ckpt: &Checkpoint, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let (info, path) = ckpt.info(name)?;
    if info.shape != shape {
        bail!(
            "{}: tensor `{name}` has shape {:?}, config.json implies {:?}",
            path.display(),
            info.shape,
            shape
        );
    }
    ckpt.f32(name)
}
