//! Checkpoint reading (config.json, safetensors), architectures and the forward pass.

pub mod arch;
pub mod attention;
pub mod backward;
pub mod checkpoint;
pub use crate::config;
pub mod dequant;
pub mod layer;
pub mod linear;
pub mod llama;
pub mod ops;

pub use crate::safetensors_file::DType;
pub use checkpoint::Checkpoint;
pub use config::ModelConfig;
