//! Checkpoint reading (config.json, safetensors), architectures and the forward pass.

pub mod arch;
pub mod attention;
pub mod backward;
pub mod bf16;
pub mod checkpoint;
pub use crate::config;
pub mod dequant;
pub mod layer;
pub mod linear;
pub mod llama;
pub mod ops;
pub use bf16::packed_int;

pub use crate::safetensors_file::DType;
pub use checkpoint::Checkpoint;
pub use config::ModelConfig;

/// How evaluation reads and computes a checkpoint — not a property of its files: the same
/// folder is scored with and without its activation quantizers, in f32 or bf16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalOptions {
    /// Run the activation quantizers the config declares (W8A8's dynamic int8 inputs); `false`
    /// reads the same weights with float inputs (`compress eval --no-act-quant`: W8A16, as a
    /// loader that decompresses only the weights computes).
    pub act_quant: bool,
    /// GGUF checkpoints: quantize each matmul's input as llama.cpp's CPU backend does for the
    /// stored weight type (`quant::ggml::VecDot`; `compress eval --llama-cpp-activations`), so
    /// our perplexity is the one `llama-perplexity` computes from the same bytes.
    pub llama_cpp_activations: bool,
    /// What evaluation computes in (`eval.precision`, `--precision`).
    pub precision: Precision,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            act_quant: true,
            llama_cpp_activations: false,
            precision: Precision::F32,
        }
    }
}

impl EvalOptions {
    /// The defaults, computing in `precision`.
    pub fn in_precision(precision: Precision) -> Self {
        EvalOptions {
            precision,
            ..Default::default()
        }
    }
}

/// What evaluation computes in: `f32` (default; bit-stable against the goldens) or `bf16`
/// (weights and activations rounded to bfloat16 at each linear, f32 accumulation; see
/// [`bf16`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => anyhow::bail!("precision `{s}`: expected f32 or bf16"),
        }
    }
}
