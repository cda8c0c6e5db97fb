//! Wanda — Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language
//! Models" (ICLR 2024).
//!
//! Score each weight by its magnitude times the norm of the input feature it multiplies,
//!
//!   S_ij = |W_ij| · ‖X_j‖₂                                               (eq. 1)
//!
//! with ‖X_j‖₂ over every calibration token at the linear's input, and remove the lowest scores
//! *per output row* (the paper's comparison group, §3: comparing within a row works better for
//! LLMs than over the layer). N:M compares within each group of M consecutive inputs of a row.
//! No weight update, no Hessian: one statistics forward per layer.

use super::harness::{PerLinear, Schedule};
use super::input_site;
use super::prune::{prune_by_scores, PruneSpec};
use crate::engine::stats::StatsRequest;
use crate::engine::{LayerCtx, Pass};
use anyhow::{Context, Result};

pub struct Wanda {
    spec: PruneSpec,
    select: super::select::Selector,
}

impl Wanda {
    pub fn new(spec: &PruneSpec) -> Result<Self> {
        spec.validate()?;
        Ok(Wanda {
            spec: spec.clone(),
            select: super::select::Selector::new(&spec.targets, &spec.ignore)?,
        })
    }
}

/// Eq. 1 for one linear: [rows, cols] scores.
pub fn wanda_scores(w: &ndarray::Array2<f32>, col_norm: &[f64]) -> Vec<f32> {
    let cols = w.ncols();
    w.iter()
        .enumerate()
        .map(|(i, v)| (v.abs() as f64 * col_norm[i % cols]) as f32)
        .collect()
}

impl Pass for Wanda {
    fn name(&self) -> String {
        "wanda".into()
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest {
            col_norm: true,
            ..Default::default()
        }
    }

    fn apply(&self, ctx: &mut LayerCtx) -> Result<()> {
        // every linear scored on the layer's dense inputs (one statistics forward), as the
        // paper's reference implementation does
        let harness = PerLinear {
            pass: "wanda",
            select: &self.select,
            schedule: Schedule::OneForward,
        };
        harness.each(ctx, |ctx, l| {
            let st = ctx.stats(input_site(ctx, l.name)?)?;
            let (n, dim) = (st.n, st.dim);
            let mut norm = st.col_norm().context("no column norms collected")?;
            if n == 0 {
                // an expert no calibration token reached: every ‖X_j‖ is 0, so score by
                // magnitude alone (all norms 1) rather than by ties
                norm = vec![1.0; dim];
                ctx.warnings.push(format!(
                    "{}: no calibration token was routed to this expert: pruned by weight \
                     magnitude (calibrate with more data, or `calibration.experts: all`)",
                    l.module
                ));
            }
            let scores = wanda_scores(ctx.layer.linears[l.name].weight(), &norm);
            prune_by_scores(ctx, l.name, &self.spec, true, &scores)
        })
    }
}
