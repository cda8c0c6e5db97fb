//! Magnitude pruning, the baseline every pruning method is compared with: in each targeted
//! linear, zero the weights of smallest |w| — over the whole matrix to the target sparsity, or
//! within every group of M consecutive inputs for N:M. No calibration data.

use super::prune::{mask_from_scores, targeted, PruneSpec};
use crate::engine::stats::StatsRequest;
use crate::engine::{LayerCtx, LinearRecord, Pass};
use anyhow::{Context, Result};
use serde_json::json;
use std::time::Instant;

pub struct Magnitude {
    spec: PruneSpec,
    select: super::select::Selector,
}

impl Magnitude {
    pub fn new(spec: &PruneSpec) -> Result<Self> {
        spec.validate()?;
        Ok(Magnitude {
            spec: spec.clone(),
            select: super::select::Selector::new(&spec.targets, &spec.ignore)?,
        })
    }
}

impl Pass for Magnitude {
    fn name(&self) -> String {
        "magnitude".into()
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest::default()
    }

    fn apply(&self, ctx: &mut LayerCtx) -> Result<()> {
        for name in targeted(ctx, &self.select) {
            let t = Instant::now();
            let module = ctx.module_name(name);
            let lin = ctx.layer.linears.get_mut(name).context("linear present")?;
            let (rows, cols) = lin.shape();
            let scores: Vec<f32> = lin.weight().iter().map(|w| w.abs()).collect();
            let mask = mask_from_scores(
                &scores,
                rows,
                cols,
                self.spec.pattern,
                self.spec.target(),
                false,
            )
            .with_context(|| module.clone())?;
            let sparsity = mask.sparsity();
            lin.set_mask(mask).with_context(|| module.clone())?;
            ctx.records.push(LinearRecord {
                layer: ctx.index(),
                linear: name.to_string(),
                pass: "magnitude".into(),
                rel_output_error: None,
                loss: None,
                seconds: t.elapsed().as_secs_f64(),
                notes: [("sparsity".to_string(), json!(sparsity))].into(),
            });
        }
        Ok(())
    }
}
