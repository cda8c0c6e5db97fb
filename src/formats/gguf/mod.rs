//! GGUF v3, the file llama.cpp (and Ollama, LM Studio) loads: the container (writer and a
//! strict reader), the metadata llama.cpp needs for the Llama family, the tokenizer from
//! tokenizer.json, tensor names and layouts as llama.cpp's converter writes them, and the
//! per-tensor type choice of llama.cpp's quantization mixes.
//!
//! References (llama.cpp, as vendored in the llama-cpp-python 0.3.36 sdist):
//! * container: `gguf-py/gguf/gguf_writer.py`, `ggml/src/gguf.cpp` — magic `GGUF`, version 3,
//!   tensor count and KV count (u64), KV pairs (string key, u32 value type, value), tensor infos
//!   (name, n_dims u32, ne[0..n] u64 with ne[0] the contiguous dimension, ggml type u32, data
//!   offset u64 relative to the data section), padding to `general.alignment` (32), data with
//!   every tensor aligned to 32;
//! * metadata and tokenizer: `conversion/base.py` (`set_gguf_parameters`, `get_vocab_base`,
//!   `_set_vocab_gpt2`), `conversion/llama.py`, `gguf-py/gguf/vocab.py` (`SpecialVocab`);
//! * tensor names: `gguf-py/gguf/tensor_mapping.py` / `constants.py` (`token_embd`,
//!   `blk.N.attn_q`, …, `output_norm`, `output`);
//! * Q/K row permutation: `LlamaModel.permute` in `conversion/llama.py` (HF's rotate-half RoPE
//!   layout → GGML's interleaved pairs): rows of each head are reordered from
//!   [2, head_dim/2] to [head_dim/2, 2];
//! * type mixes: `src/llama-quant.cpp` `llama_tensor_get_type_impl` and `tensor_type_fallback`
//!   (the table is in docs/formats.md, "GGUF export").
//!
//! Pure functions over bytes and values: the exporter (`crate::export`) decides which tensors
//! go in, with which values; nothing here runs a calibration algorithm. Encoding a tensor on
//! its grid is `crate::quant::ggml` (llama.cpp's reference encoders).
//!
//! Files: `value` (metadata values), `container` (the writer and the strict reader), `names`
//! (tensor names and the Q/K row permutation), `mix` (type mixes), `metadata` (the model's keys)
//! and `tokenizer` (the tokenizer's keys); this one holds the format's constants.

mod container;
mod metadata;
mod mix;
mod names;
mod tokenizer;
mod value;

pub use container::{header, parse, write_file, GgufFile, TensorEntry};
pub use metadata::model_metadata;
pub use mix::{tensor_type, FileType, MixModel, Overrides, TypeOverride};
pub use names::{
    arch_name, check_mixture, gguf_name, gguf_slot, hf_names, permute_heads, permute_rows, squeezed,
};
pub use tokenizer::tokenizer_metadata;
pub use value::Value;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const VERSION: u32 = 3;
pub const ALIGNMENT: usize = 32;
/// `GGML_QNT_VERSION`, written by llama-quantize as `general.quantization_version`.
pub const QUANTIZATION_VERSION: u32 = 2;
/// The name of the file we write in the output folder.
pub const FILE_NAME: &str = "model.gguf";
