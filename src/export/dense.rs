//! `dense`: every linear as a plain weight in the checkpoint's dtype — quantized values
//! fake-quantized, factors multiplied back, adapters merged, zeros of pruning kept — so the
//! output loads anywhere the source does.

use super::out::Out;
use super::FormatWriter;
use crate::formats::Format;
use crate::model::layer::Linear;
use crate::model::Checkpoint;
use anyhow::Result;
use serde_json::Value;
use std::path::PathBuf;

pub(super) struct Dense;

impl FormatWriter for Dense {
    fn format(&self) -> Format {
        Format::Dense
    }

    fn linear(
        &mut self,
        out: &mut Out,
        ckpt: &Checkpoint,
        prefix: &str,
        lin: &Linear,
    ) -> Result<()> {
        out.dense_weight(ckpt, prefix, lin, false)?;
        out.bias_and_adapter(ckpt, prefix, lin, false)
    }

    fn finish(&mut self, out: &mut Out, ckpt: &Checkpoint) -> Result<(Vec<String>, Vec<PathBuf>)> {
        out.finish_safetensors(ckpt, |_, _, _| Ok(()))
    }

    fn state(&self) -> Result<Value> {
        Ok(Value::Null)
    }
}
