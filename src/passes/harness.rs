//! The per-linear harness: what every method that compresses a layer one linear at a time
//! shares, written once — which linears (`targets` / `ignore`), when their input statistics are
//! collected (one forward, or true-sequentially site by site), the Hessian with its fallback
//! for an expert no calibration token reached, timing, errors that name the module, the
//! warning when Cholesky needed more dampening than asked, and the report's record.
//!
//! A method hands the harness a closure that compresses one linear and says what it did
//! ([`Done`]); the method's file keeps only its algorithm.

use super::select::Selector;
use crate::engine::{LayerCtx, LinearRecord};
use crate::model::layer::Site;
use anyhow::{Context, Result};
use ndarray::Array2;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Instant;

/// When the statistics of a layer's linears are collected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// No calibration statistics (RTN, magnitude pruning).
    Weights,
    /// Every linear from the layer's inputs before any changes (one statistics forward): the
    /// default of GPTQ's reference code, SparseGPT, Wanda, SVD-LLM.
    OneForward,
    /// Site by site in forward order, each site's statistics on the weights the earlier sites
    /// left (GPTQ's `true_sequential`): later linears see the earlier ones' errors.
    TrueSequential,
}

/// The linear a method is handed.
pub struct Linear {
    /// Its name in the block, e.g. `self_attn.q_proj`.
    pub name: &'static str,
    /// Its full module name, e.g. `model.layers.3.self_attn.q_proj` (errors and warnings).
    pub module: String,
    /// When the harness handed it over (the record's `seconds`).
    pub started: Instant,
}

/// What a method did to one linear: the harness turns it into the report's record.
#[derive(Debug, Default)]
pub struct Done {
    /// Relative output error ‖(W−Ŵ)X‖² / ‖WX‖² on the calibration inputs.
    pub error: Option<f64>,
    /// The method's own loss (GPTQ: Σ ((w−q)/[H⁻¹]_jj)²).
    pub loss: Option<f64>,
    /// (asked, used) dampening of a Cholesky that may have needed more: the harness warns when
    /// they differ and records `damp` (the value used).
    pub damp: Option<(f64, f64)>,
    /// Further facts for the record.
    pub notes: BTreeMap<String, Value>,
    /// `true`: the linear was left as it was (no record).
    pub skipped: bool,
}

impl Done {
    /// A linear left as it was (no record).
    pub fn skipped() -> Self {
        Done {
            skipped: true,
            ..Default::default()
        }
    }

    pub fn note(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.notes.insert(key.to_string(), value.into());
        self
    }
}

/// A method's harness: its record name, its selection and its statistics schedule.
pub struct PerLinear<'a> {
    pub pass: &'a str,
    pub select: &'a Selector,
    pub schedule: Schedule,
}

impl PerLinear<'_> {
    /// The selected linears of the layer, in execution order.
    pub fn selected(&self, ctx: &LayerCtx) -> Vec<&'static str> {
        targeted(ctx, self.select)
    }

    /// Run `each` on every selected linear of the layer, in groups by the schedule (all in
    /// one group, or one group per input site); `start` runs before each group, on the
    /// statistics the group's linears will see, and what it returns is handed to `each`.
    pub fn run<G>(
        &self,
        ctx: &mut LayerCtx,
        mut start: impl FnMut(&mut LayerCtx, &[&'static str]) -> Result<G>,
        mut each: impl FnMut(&mut LayerCtx, &G, &Linear) -> Result<Done>,
    ) -> Result<()> {
        let selected = self.selected(ctx);
        let block = ctx.config.block();
        let groups: Vec<Vec<&'static str>> = match self.schedule {
            Schedule::Weights => vec![selected],
            Schedule::OneForward => {
                ctx.refresh()?;
                vec![selected]
            }
            Schedule::TrueSequential => block
                .sites
                .iter()
                .map(|s| {
                    block
                        .readers(s.site)
                        .filter(|n| selected.contains(n))
                        .collect()
                })
                .collect(),
        };
        for group in groups {
            if self.schedule == Schedule::TrueSequential {
                // statistics on the current (partly compressed) layer
                ctx.invalidate();
            }
            if group.is_empty() {
                continue;
            }
            let g = start(ctx, &group)?;
            for name in group {
                let lin = Linear {
                    name,
                    module: ctx.module_name(name),
                    started: Instant::now(),
                };
                let done = each(ctx, &g, &lin).with_context(|| lin.module.clone())?;
                self.record(ctx, &lin, done);
            }
        }
        Ok(())
    }

    /// [`PerLinear::run`] without a per-group step.
    pub fn each(
        &self,
        ctx: &mut LayerCtx,
        mut each: impl FnMut(&mut LayerCtx, &Linear) -> Result<Done>,
    ) -> Result<()> {
        self.run(ctx, |_, _| Ok(()), |ctx, _, lin| each(ctx, lin))
    }

    fn record(&self, ctx: &mut LayerCtx, lin: &Linear, mut done: Done) {
        if done.skipped {
            return;
        }
        if let Some((asked, used)) = done.damp {
            ctx.warn_damp(&lin.module, asked, used);
            done.notes.insert("damp".into(), serde_json::json!(used));
        }
        let mut rec =
            LinearRecord::new(ctx.index(), lin.name, self.pass, lin.started).notes(done.notes);
        rec.rel_output_error = done.error;
        rec.loss = done.loss;
        ctx.records.push(rec);
    }
}

/// The linears of the layer `select` picks, in execution order.
pub fn targeted(ctx: &LayerCtx, select: &Selector) -> Vec<&'static str> {
    ctx.config
        .block()
        .linear_names()
        .filter(|n| select.selects_in(ctx, n))
        .collect()
}

/// The input site a linear of the layer reads, from the block's table.
pub(crate) fn input_site(ctx: &LayerCtx, linear: &str) -> Result<Site> {
    ctx.config
        .block()
        .site_of(linear)
        .with_context(|| format!("`{linear}` is not a linear of this architecture's block"))
}

/// The Hessian H = 2/n·XᵀX of a linear's input; `None` for an expert of a mixture that no
/// calibration token reached (it has no statistics): the caller compresses it without one —
/// `fallback` says how, in the warning that names the module — never from an all-dead
/// Hessian, which would zero the expert. How many tokens each expert saw is in GPTQ's records
/// (`tokens`).
pub(crate) fn linear_hessian(
    ctx: &mut LayerCtx,
    linear: &str,
    fallback: &str,
) -> Result<Option<Array2<f64>>> {
    let site = input_site(ctx, linear)?;
    let expert = ctx.config.block().site(site).expert;
    let st = ctx.stats(site)?;
    let n = st.n;
    let h = st.hessian().context("no Hessian collected")?;
    if let (Some(e), 0) = (expert, n) {
        let module = ctx.module_name(linear);
        ctx.warnings.push(format!(
            "{module}: no calibration token was routed to expert {e}: {fallback} (calibrate \
             with more data, or `calibration.experts: all`)"
        ));
        return Ok(None);
    }
    Ok(Some(h))
}

/// [`linear_hessian`], with the identity for an expert no token reached (the method on it
/// without input statistics: SparseGPT prunes by magnitude, SVD-LLM is a plain SVD).
pub(crate) fn hessian_or_identity(
    ctx: &mut LayerCtx,
    linear: &str,
    fallback: &str,
) -> Result<Array2<f64>> {
    let dim = ctx
        .config
        .dim(ctx.config.block().site(input_site(ctx, linear)?).width);
    Ok(linear_hessian(ctx, linear, fallback)?.unwrap_or_else(|| Array2::eye(dim)))
}
