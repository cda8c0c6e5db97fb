//! compressed-tensors (vLLM, transformers): packed integer codes (`pack-quantized`), 8-bit
//! weights with quantized inputs (`int-quantized`), float grids (FP8, NVFP4, MXFP4), sparse
//! weights as a bitmask, factors, a PEFT adapter beside; `quantization_config` with one config
//! group per scheme and the `sparsity_config` block. The tensors and blocks themselves are
//! `formats/compressed_tensors`.

use super::out::Out;
use super::FormatWriter;
use crate::formats::compressed_tensors::{self as ct, SparseFormat};
use crate::formats::{Format, NamedTensor, Order};
use crate::model::layer::{Linear, Repr};
use crate::model::Checkpoint;
use crate::quant::{QuantArgs, QuantizedLinear};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;

#[derive(Default, Serialize, Deserialize)]
pub(super) struct Writer {
    /// (module name, args, order) of every quantized linear written, with its input
    /// quantizer (W8A8, FP8 dynamic), in order.
    quantized: Vec<(String, QuantArgs, Order)>,
    inputs: Vec<Option<QuantArgs>>,
    /// Decoder-layer linears left unquantized.
    unquantized: Vec<String>,
    sparse_format: SparseFormat,
}

impl Writer {
    pub(super) fn restore(state: Option<Value>) -> Result<Self> {
        Ok(match state {
            Some(v) => serde_json::from_value(v).context("internal: compressed-tensors state")?,
            None => Writer::default(),
        })
    }

    /// The `quantization_config` block compressed-tensors (and so vLLM) reads: one config
    /// group targeting `Linear` when every quantized linear has the same scheme, else one group
    /// per scheme (in order of first use) naming its modules.
    fn quantization_config(&self) -> Option<Value> {
        let mut groups: Vec<ct::ConfigGroup> = Vec::new();
        for (i, (name, a, order)) in self.quantized.iter().enumerate() {
            let input = self.inputs.get(i).cloned().flatten();
            match groups
                .iter_mut()
                .find(|g| g.args == *a && g.order == *order && g.input == input)
            {
                Some(g) => g.targets.push(name.clone()),
                None => groups.push(ct::ConfigGroup {
                    args: a.clone(),
                    order: *order,
                    input,
                    targets: vec![name.clone()],
                }),
            }
        }
        if groups.is_empty() {
            return None;
        }
        if let [g] = groups.as_mut_slice() {
            g.targets = vec!["Linear".into()];
        }
        Some(ct::quantization_config_groups(&groups, &self.unquantized))
    }
}

impl FormatWriter for Writer {
    fn format(&self) -> Format {
        Format::CompressedTensors
    }

    fn packed(
        &self,
        prefix: &str,
        q: &QuantizedLinear,
        input: Option<&QuantArgs>,
    ) -> Result<Vec<NamedTensor>> {
        if q.args.float.is_some() {
            ct::float::float_tensors(prefix, q)
        } else if ct::int_quantized(&q.args, input) {
            ct::int_quantized_tensors(prefix, q)
        } else {
            ct::compressed_tensors_tensors(prefix, q)
        }
    }

    fn set_sparse_format(&mut self, format: SparseFormat) -> Result<()> {
        self.sparse_format = format;
        Ok(())
    }

    fn linear(
        &mut self,
        out: &mut Out,
        ckpt: &Checkpoint,
        prefix: &str,
        lin: &Linear,
    ) -> Result<()> {
        // an adapter is written beside the checkpoint (PEFT LoRA)
        let adapter = lin.adapter().is_some();
        let bitmask = self.sparse_format == SparseFormat::Bitmask && lin.mask().is_some();
        if bitmask && lin.quant().is_some() {
            bail!("export: `{prefix}` is sparse and quantized; `sparse_format: bitmask` stores unquantized sparse weights (compressed-tensors has no bitmask layout for packed integer weights): use `sparse_format: dense`");
        }
        match (lin.repr(), lin.quant()) {
            (Repr::Factored { u, v }, _) => {
                out.factors(prefix, lin, u, v)?;
                self.unquantized.push(prefix.to_string());
            }
            (_, None) if bitmask => {
                let w = if adapter {
                    lin.base_weight()
                } else {
                    lin.weight()
                };
                let s = w.as_slice().context("weight not contiguous")?;
                let dims = (w.nrows(), w.ncols());
                for (n, dt, shape, bytes) in ct::bitmask_tensors(prefix, s, dims, lin.dtype)? {
                    out.w()?.add(&n, dt, &shape, &bytes)?;
                }
                self.unquantized.push(prefix.to_string());
            }
            (_, Some(q)) => {
                let input = lin.act_quant().and_then(|a| a.args());
                for (n, dt, shape, bytes) in self.packed(prefix, q, input.as_ref())? {
                    out.w()?.add(&n, dt, &shape, &bytes)?;
                }
                self.inputs.push(input);
                self.quantized
                    .push((prefix.to_string(), q.args.clone(), Order::of(q)));
            }
            (_, None) => {
                self.unquantized.push(prefix.to_string());
                out.dense_weight(ckpt, prefix, lin, adapter)?;
            }
        }
        out.bias_and_adapter(ckpt, prefix, lin, adapter)
    }

    fn finish(&mut self, out: &mut Out, ckpt: &Checkpoint) -> Result<(Vec<String>, Vec<PathBuf>)> {
        out.finish_safetensors(ckpt, |out, config, _| {
            let sparsity = out.sparsity.block(&out.linears, self.sparse_format);
            match (self.quantization_config(), sparsity) {
                (Some(mut q), s) => {
                    if let Some(s) = s {
                        q["sparsity_config"] = s;
                    }
                    config["quantization_config"] = q;
                }
                // bitmask-compressed weights need the library's decompressor, which reads
                // the block inside `quantization_config` (ModelCompressor's
                // `parse_sparsity_config`)
                (None, Some(s)) if self.sparse_format == SparseFormat::Bitmask => {
                    config["quantization_config"] = serde_json::json!({
                        "quant_method": "compressed-tensors",
                        "sparsity_config": s,
                    });
                }
                // dense weights with exact zeros load everywhere; a quantization_config
                // without config groups would make transformers refuse the checkpoint,
                // so the metadata goes at the top level
                (None, Some(s)) => config["sparsity_config"] = s,
                (None, None) => {}
            }
            Ok(())
        })
    }

    fn state(&self) -> Result<Value> {
        Ok(serde_json::to_value(self)?)
    }
}
