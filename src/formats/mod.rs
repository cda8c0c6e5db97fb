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

use crate::model::safetensors_file::{to_i64, DType};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

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

pub(crate) fn get_i64s(get: TensorGetter, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
    let (dt, shape, bytes) = get(name)?;
    let v = to_i64(dt, &bytes)
        .with_context(|| format!("`{name}`: expected an integer tensor, found {}", dt.name()))?;
    Ok((shape, v))
}
