//! The formats we write and read, one module each: the tensors of a quantized linear (the
//! writer's side), their reader (read-back evaluation, `compress verify`), and the
//! `quantization_config` block, built from what the passes recorded. Pure functions: no
//! algorithms and no file I/O (the safetensors writer is `export::writer`; `export` decides
//! what goes into which file).
//!
//! * `compressed_tensors`: `pack-quantized` (vLLM, transformers)
//! * `gptq`: GPTQ v1 (AutoGPTQ, GPTQModel, transformers, TGI, vLLM)
//! * `gguf`: GGUF v3 (llama.cpp): container, metadata, tokenizer, tensor names, type mixes
//! * `bits`: the little-endian bit stream both pack into, and byte helpers

pub mod bits;
pub mod compressed_tensors;
pub mod gguf;
pub mod gptq;
pub mod peft;

use crate::quant::{Observer, QuantArgs, QuantizedLinear, Strategy};
use crate::safetensors_file::{to_i64, DType};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// (name, dtype, shape, little-endian bytes)
pub type NamedTensor = (String, DType, Vec<usize>, Vec<u8>);

/// Reads a tensor by full name: (dtype, shape, little-endian bytes).
pub type TensorGetter<'a> = &'a dyn Fn(&str) -> Result<(DType, Vec<usize>, Vec<u8>)>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// Fake-quantized / pruned weights in the original dtype: loads anywhere.
    #[default]
    Dense,
    /// compressed-tensors `pack-quantized` (vLLM, transformers).
    CompressedTensors,
    /// GPTQ v1 (AutoGPTQ, GPTQModel, transformers, TGI, vLLM).
    Gptq,
    /// GGUF v3 (llama.cpp, Ollama, LM Studio): one `model.gguf`, tensors on ggml grids.
    Gguf,
}

impl Format {
    pub fn name(&self) -> &'static str {
        match self {
            Format::Dense => "dense",
            Format::CompressedTensors => "compressed-tensors",
            Format::Gptq => "gptq",
            Format::Gguf => "gguf",
        }
    }
}

/// The column order a linear was quantized in, as the config blocks state it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Order {
    /// Input columns in order (no activation ordering).
    Columns,
    /// Activation order, groups fixed in column order (llm-compressor `actorder: static`).
    Static,
    /// Activation order with groups in that order (`g_idx` written; `actorder: group`).
    Dynamic,
}

impl Order {
    pub fn of(q: &crate::quant::QuantizedLinear) -> Order {
        if q.g_idx.is_some() {
            Order::Dynamic
        } else if q.static_order {
            Order::Static
        } else {
            Order::Columns
        }
    }
}

/// What a reader found in a checkpoint's tensors for one quantized linear. A checkpoint does not
/// store how the codes were found, so the observer reads as min-max and the column order as
/// plain columns (neither changes the dequantized values).
pub(crate) struct Stored {
    pub bits: u32,
    pub symmetric: bool,
    pub strategy: Strategy,
    pub group_size: usize,
    pub codes: Vec<i8>,
    pub scales: Vec<f32>,
    pub zeros: Option<Vec<i8>>,
    pub g_idx: Option<Vec<i32>>,
    pub scale_dtype: DType,
    /// (out, in)
    pub shape: (usize, usize),
}

impl Stored {
    /// The quantized linear, checked for consistency (`prefix` names it in errors).
    pub fn linear(self, prefix: &str) -> Result<QuantizedLinear> {
        let q = QuantizedLinear {
            args: QuantArgs::int(
                self.bits,
                self.symmetric,
                self.strategy,
                self.group_size,
                Observer::MinMax,
            ),
            codes: self.codes,
            scales: self.scales,
            zeros: self.zeros,
            g_idx: self.g_idx,
            static_order: false,
            true_sequential: false,
            scale_dtype: self.scale_dtype,
            global_scale: None,
            shape: self.shape,
        };
        q.validate().with_context(|| format!("`{prefix}`"))?;
        Ok(q)
    }
}

/// Dense `[out, in]` f32 weights of a quantized linear as a reader returned it (read-back
/// evaluation of every format).
pub fn dequantized(q: Result<QuantizedLinear>) -> Result<Vec<f32>> {
    Ok(q?.dequantize().into_raw_vec_and_offset().0)
}

/// (bits, group_size (0 = not grouped), symmetric, method) of linear `module` from a
/// `quantization_config` block (`q`) of config.json (`file`, for messages), from the format
/// whose block it is. `method` is `compressed-tensors`, `int-quantized` (compressed-tensors
/// W8A8), a float format's name, or `gptq`.
pub fn read_scheme(q: &Value, module: &str, file: &Path) -> Result<(u32, usize, bool, String)> {
    let method = q
        .get("quant_method")
        .and_then(|m| m.as_str())
        .with_context(|| {
            format!(
                "{}: `quantization_config.quant_method` missing",
                file.display()
            )
        })?;
    match method {
        "compressed-tensors" => compressed_tensors::read_config_block(q, module, file),
        "gptq" => gptq::read_config_block(q),
        other => bail!(
            "{}: quantization method `{other}` is not supported",
            file.display()
        ),
    }
}

pub(crate) fn get_i64s(get: TensorGetter, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
    let (dt, shape, bytes) = get(name)?;
    let v = to_i64(dt, &bytes)
        .with_context(|| format!("`{name}`: expected an integer tensor, found {}", dt.name()))?;
    Ok((shape, v))
}
