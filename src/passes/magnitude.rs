//! Magnitude pruning, the baseline every pruning method is compared with: in each targeted
//! linear, zero the weights of smallest |w| — over the whole matrix to the target sparsity, or
//! within every group of M consecutive inputs for N:M. No calibration data.

use super::prune::{prune_by_scores, targeted, PruneSpec};
use crate::engine::stats::StatsRequest;
use crate::engine::{LayerCtx, Pass};
use anyhow::Result;
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
            let scores: Vec<f32> = ctx.layer.linears[name]
                .weight()
                .iter()
                .map(|w| w.abs())
                .collect();
            prune_by_scores(ctx, "magnitude", name, &self.spec, false, &scores, t)?;
        }
        Ok(())
    }
}
