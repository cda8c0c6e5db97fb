//! GPTQ v1 (AutoGPTQ, GPTQModel, transformers, TGI, vLLM): qweight / qzeros / scales / g_idx
//! of one scheme for every quantized linear, `quantization_config` and quantize_config.json.
//! The tensors and blocks themselves are `formats/gptq.rs`.

use super::out::Out;
use super::FormatWriter;
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
    /// (module name, args, order) of every quantized linear written.
    quantized: Vec<(String, QuantArgs, Order)>,
    /// Decoder-layer linears left unquantized.
    unquantized: Vec<String>,
    /// Whether every quantized linear was quantized "true sequentially" (as the pass recorded).
    true_sequential: Option<bool>,
}

impl Writer {
    pub(super) fn restore(state: Option<Value>) -> Result<Self> {
        Ok(match state {
            Some(v) => serde_json::from_value(v).context("internal: gptq export state")?,
            None => Writer::default(),
        })
    }

    /// The one scheme and column order of every quantized linear (a GPTQ v1 checkpoint has
    /// one).
    fn distinct_args(&self) -> Result<Option<(QuantArgs, Order)>> {
        let Some((_, first, order)) = self.quantized.first() else {
            return Ok(None);
        };
        for (name, a, o) in &self.quantized {
            if a != first || o != order {
                bail!("export: linear `{name}` uses a different quantization scheme or column order than the others; a GPTQ v1 checkpoint has one scheme (mixed schemes, as a size budget writes: `format: compressed-tensors`)");
            }
        }
        Ok(Some((first.clone(), *order)))
    }
}

impl FormatWriter for Writer {
    fn format(&self) -> Format {
        Format::Gptq
    }

    fn packed(
        &self,
        prefix: &str,
        q: &QuantizedLinear,
        _input: Option<&QuantArgs>,
    ) -> Result<Vec<NamedTensor>> {
        crate::formats::gptq::gptq_tensors(prefix, q)
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
        match (lin.repr(), lin.quant()) {
            (Repr::Factored { u, v }, _) => {
                out.factors(prefix, lin, u, v)?;
                self.unquantized.push(prefix.to_string());
            }
            (_, Some(q)) => {
                let ts = self.true_sequential.unwrap_or(true) && q.true_sequential;
                self.true_sequential = Some(ts);
                for (n, dt, shape, bytes) in self.packed(prefix, q, None)? {
                    out.w()?.add(&n, dt, &shape, &bytes)?;
                }
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
        let q = self
            .distinct_args()?
            .map(|(a, order)| {
                crate::formats::gptq::quantize_config(
                    &a,
                    order,
                    &self.unquantized,
                    self.true_sequential.unwrap_or(false),
                )
            })
            .transpose()?;
        out.finish_safetensors(ckpt, |out, config, files| {
            if let Some(q) = q {
                config["quantization_config"] = q.clone();
                out.write_json("quantize_config.json", &q, files)?;
            }
            Ok(())
        })
    }

    fn state(&self) -> Result<Value> {
        Ok(serde_json::to_value(self)?)
    }
}
