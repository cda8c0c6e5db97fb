//! Dense f32 weights of a linear, whatever format the checkpoint stores it in: plain
//! floating point, compressed-tensors `pack-quantized`, or GPTQ v1. This is how `compress eval`
//! and the report read back every format we write.

use super::checkpoint::Checkpoint;
use super::layer::read_checked;
use super::safetensors_file::DType;
use anyhow::{bail, Result};

/// `prefix` is the module name (`model.layers.0.self_attn.q_proj`); returns the weight
/// [out, in] as f32 and the storage dtype of its floating-point parts.
pub fn dense_weight(ckpt: &Checkpoint, prefix: &str, shape: &[usize]) -> Result<(Vec<f32>, DType)> {
    let w = format!("{prefix}.weight");
    if ckpt.has(&w) {
        let v = read_checked(ckpt, &w, shape)?;
        return Ok((v, ckpt.info(&w)?.0.dtype));
    }
    bail!("{}: missing tensor `{w}`", ckpt.dir.display())
}
