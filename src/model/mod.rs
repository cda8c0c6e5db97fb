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
