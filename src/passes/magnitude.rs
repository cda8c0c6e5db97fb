//! Magnitude pruning, the baseline every pruning method is compared with: in each targeted
//! linear, zero the weights of smallest |w| — over the whole matrix to the target sparsity, or
//! within every group of M consecutive inputs for N:M. No calibration data.

use super::harness::{PerLinear, Schedule};
use super::prune::{prune_by_scores, PruneSpec};
use crate::engine::stats::StatsRequest;
use crate::engine::{LayerCtx, Pass};
use anyhow::Result;

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
        let harness = PerLinear {
            pass: "magnitude",
            select: &self.select,
            schedule: Schedule::Weights,
        };
        harness.each(ctx, |ctx, l| {
            let scores: Vec<f32> = ctx.layer.linears[l.name]
                .weight()
                .iter()
                .map(|w| w.abs())
                .collect();
            prune_by_scores(ctx, l.name, &self.spec, false, &scores)
        })
    }
}
