//! Importance matrix (llama.cpp's `llama-imatrix`): for every decoder linear, the mean of x²
//! over the calibration tokens at its input, per input column — the diagonal of the Hessian
//! H = 2/n·XᵀX that GPTQ uses, halved (the engine accumulates Σx² per column as the `col_norm`
//! statistic, so the d×d product is not needed). The weights are not changed: the GGUF exporter
//! weighs each element's rounding error by its column's importance, as `llama-quantize
//! --imatrix` does (`quantize_row_*_impl` in ggml-quants.c; see `quant::ggml::quantize_weighted`).
//!
//! Reference: llama.cpp tools/imatrix/imatrix.cpp (`collect_imatrix`: values[j] += x_j², counts
//! += 1 per token row; stored as values / counts).

use super::input_site;
use crate::engine::stats::StatsRequest;
use crate::engine::{LayerCtx, LinearRecord, Pass};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::time::Instant;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImatrixSpec {}

impl ImatrixSpec {
    /// No fields to check.
    pub fn validate(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

pub struct Imatrix;

impl Pass for Imatrix {
    fn name(&self) -> String {
        "imatrix".into()
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest {
            col_norm: true,
            ..Default::default()
        }
    }

    fn apply(&self, ctx: &mut LayerCtx) -> Result<()> {
        for name in ctx.config.block().linear_names() {
            let module = ctx.module_name(name);
            let t = Instant::now();
            let st = ctx.stats(input_site(ctx, name)?)?;
            let n = st.n.max(1) as f64;
            let sum_sq = st.sum_sq.as_ref().context("internal: no Σx² collected")?;
            let imp: Vec<f32> = sum_sq.iter().map(|s| (s / n) as f32).collect();
            ctx.layer
                .linears
                .get_mut(name)
                .expect("all linears present")
                .set_importance(imp)
                .with_context(|| module.clone())?;
            ctx.records
                .push(LinearRecord::new(ctx.index(), name, "imatrix", t));
        }
        Ok(())
    }
}
