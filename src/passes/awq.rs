//! AWQ — Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight
//! Quantization for On-Device LLM Compression and Acceleration" (MLSys 2024).
//!
//! A few input channels carry large activations; the weights that multiply them matter most.
//! Scaling such a channel up before quantization, Q(w·s)·x/s, shrinks its relative rounding
//! error (§3.2). Per mapping of the block (producer → consumers, from the architecture table:
//! input_layernorm → q/k/v, v_proj → o_proj where GQA allows, post_attention_layernorm →
//! gate/up, up_proj → down_proj):
//!
//! 1. s_x = mean |x| per input channel over the calibration tokens; with `duo_scaling` (the
//!    default of AutoAWQ and llm-compressor) also s_w = mean over output rows of |W| normalised
//!    by its group's max;
//! 2. for α on a grid in [0, 1]: s = s_x^α / s_w^(1−α) (or s_x^α), normalised by
//!    √(max s · min s) (eq. 5, the search space). The grid is llm-compressor's (0.11 and later,
//!    its PR #2640): with `duo_scaling` the identity s = 1 (α = 0 without s_w) and `n_grid` − 1
//!    points α = i/(`n_grid` − 2) with s_w; without it `n_grid` points α = i/(`n_grid` − 1).
//!    With the identity among the candidates the search never ends above plain rounding's
//!    loss (AutoAWQ's older grid, α = i/`n_grid` with s_w only, did not contain it);
//! 3. the loss of α is the squared error of the output of the module that consumes the mapping
//!    — the whole attention for q/k/v, o_proj for v → o, the whole MLP for gate/up, down_proj
//!    for up → down — with every consumer's weights replaced by Q(W·diag(s))·diag(s)⁻¹, against
//!    the unquantized output on the same inputs (eq. 4); keep the best α;
//! 4. fold: the producer's channel j divided by s_j, every consumer's column j multiplied by
//!    s_j, so the function is unchanged before quantization;
//! 5. clip search (the reference's auto_clip, `clip: true`): per output row and input group of
//!    each consumer except q/k (whose errors the softmax reshapes), shrink the group's range
//!    max|w| by 1 − i/`n_grid` for i < `max_shrink`·`n_grid` and keep the one with the least
//!    squared error of the group's partial output over a strided subsample of tokens; clamp.
//!
//! AWQ only rescales and clips: the quantizer that follows it in the pipeline writes the codes
//! — `rtn` as AutoAWQ does, or `gptq` for both (`passes: [awq: {…}, gptq: {…}]`). Its grid
//! (`bits`, `group_size`, `sym`) should be the one the search assumed; the pipeline checks it.

use super::Scheme;
use crate::engine::stats::StatsRequest;
use crate::engine::{LayerCtx, LinearRecord, Pass};
use crate::model::arch::Part;
use crate::model::arch::{Mapping, Parent};
use crate::model::layer::LayerWeights;
use crate::model::llama::Act;
use crate::model::ops;
use crate::model::DType;
use crate::quant::{quantize_rtn, QuantArgs, Strategy};
use anyhow::{bail, Context, Result};
use ndarray::Array2;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwqSpec {
    /// A named scheme to search for (`NVFP4A16`, `FP8_DYNAMIC`, `W4A16`, … see
    /// `quant/presets.rs`) instead of `bits` / `group_size` / `sym`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// The grid the search assumes (the following quantizer's).
    #[serde(default = "d_bits")]
    pub bits: u32,
    #[serde(default = "d_group")]
    pub group_size: i64,
    /// Asymmetric by default, as AutoAWQ (`zero_point: true`).
    #[serde(default)]
    pub sym: bool,
    /// Candidates of the α search (the identity included; see the module docs).
    #[serde(default = "d_grid")]
    pub n_grid: usize,
    /// s = s_x^α / s_w^(1−α) (true) or s_x^α.
    #[serde(default = "d_true")]
    pub duo_scaling: bool,
    /// Search per-group clipping ranges after scaling.
    #[serde(default = "d_true")]
    pub clip: bool,
    /// Largest shrink of a group's range tried by the clip search.
    #[serde(default = "d_shrink")]
    pub max_shrink: f64,
    /// Calibration windows the scale search runs its candidate forwards on (the first ones;
    /// s_x comes from all of them). Each candidate costs a sub-block forward, so this bounds
    /// the search's time: 20 candidates × 4 mappings per layer.
    #[serde(default = "d_search")]
    pub search_samples: usize,
    /// Tokens (strided subsample) the clip search scores on.
    #[serde(default = "d_clip_tokens")]
    pub clip_tokens: usize,
    #[serde(default = "super::default_targets")]
    pub targets: Vec<String>,
    #[serde(default = "super::default_ignore")]
    pub ignore: Vec<String>,
}

fn d_bits() -> u32 {
    4
}
fn d_group() -> i64 {
    128
}
fn d_grid() -> usize {
    20
}
fn d_true() -> bool {
    true
}
fn d_shrink() -> f64 {
    0.5
}
fn d_search() -> usize {
    32
}
fn d_clip_tokens() -> usize {
    512
}

impl AwqSpec {
    pub fn args(&self) -> Result<QuantArgs> {
        if self.scheme.is_some() {
            anyhow::ensure!(
                self.bits == d_bits() && self.group_size == d_group() && !self.sym,
                "field `scheme` sets the grid; remove `bits`, `group_size` and `sym`"
            );
        }
        Scheme {
            scheme: self.scheme.clone(),
            bits: if self.scheme.is_some() { 4 } else { self.bits },
            strategy: Strategy::Group,
            group_size: if self.scheme.is_some() {
                128
            } else {
                self.group_size
            },
            sym: self.sym || self.scheme.is_some(),
            observer: crate::quant::Observer::MinMax,
            targets: vec![],
            ignore: vec![],
            act_bits: None,
        }
        .args()
    }

    pub fn validate(&self) -> Result<()> {
        self.args()?.validate()?;
        if self.n_grid == 0 {
            bail!("field `n_grid` must be at least 1");
        }
        if !(0.0..1.0).contains(&self.max_shrink) {
            bail!(
                "field `max_shrink` must be in [0, 1), found {}",
                self.max_shrink
            );
        }
        if self.search_samples == 0 {
            bail!("field `search_samples` must be at least 1");
        }
        if self.clip_tokens == 0 {
            bail!("field `clip_tokens` must be at least 1");
        }
        super::select::Selector::new(&self.targets, &self.ignore)?;
        Ok(())
    }
}

pub struct Awq {
    spec: AwqSpec,
    args: QuantArgs,
    select: super::select::Selector,
}

impl Awq {
    pub fn new(spec: &AwqSpec) -> Result<Self> {
        spec.validate()?;
        Ok(Awq {
            spec: spec.clone(),
            args: spec.args()?,
            select: super::select::Selector::new(&spec.targets, &spec.ignore)?,
        })
    }
}

/// Q(W) dequantized on the search grid (f32 parameters: the search compares candidates, the
/// stored grid comes from the quantizer that follows).
fn pseudo_quant(w: &Array2<f32>, args: &QuantArgs) -> Result<Array2<f32>> {
    Ok(quantize_rtn(w.view(), args, DType::F32)?.dequantize())
}

/// s_w: per input channel, the mean over every consumer's rows of |W| normalised by its
/// group's max.
fn weight_mean(ws: &[&Array2<f32>], gs: usize) -> Vec<f64> {
    let cols = ws[0].ncols();
    let mut sum = vec![0f64; cols];
    let mut rows = 0usize;
    for w in ws {
        for row in w.rows() {
            for (g, chunk) in row.as_slice().unwrap_or(&[]).chunks(gs).enumerate() {
                let m = chunk.iter().fold(0f32, |m, v| m.max(v.abs())) as f64 + 1e-6;
                for (j, v) in chunk.iter().enumerate() {
                    sum[g * gs + j] += v.abs() as f64 / m;
                }
            }
            rows += 1;
        }
    }
    sum.iter().map(|s| s / rows.max(1) as f64).collect()
}

/// The search's candidates (α, with s_w?) — llm-compressor's grid: with duo scaling the
/// identity (0, false) then `n_grid` − 1 points i/(`n_grid` − 2) with s_w; without it
/// `n_grid` points i/(`n_grid` − 1). Both ends of [0, 1] are in.
fn grid(n_grid: usize, duo: bool) -> Vec<(f64, bool)> {
    let points = |k: usize| (0..k).map(move |i| i as f64 / k.saturating_sub(1).max(1) as f64);
    if duo {
        std::iter::once((0.0, false))
            .chain(points(n_grid - 1).map(|a| (a, true)))
            .collect()
    } else {
        points(n_grid).map(|a| (a, false)).collect()
    }
}

/// Eq. 5's candidate scales for one α, normalised by √(max·min).
fn candidate_scales(x_mean: &[f64], w_mean: Option<&[f64]>, alpha: f64) -> Vec<f32> {
    let mut s: Vec<f64> = x_mean
        .iter()
        .enumerate()
        .map(|(j, x)| {
            let v = match w_mean {
                Some(w) => x.powf(alpha) / (w[j].powf(1.0 - alpha) + 1e-4),
                None => x.powf(alpha),
            };
            v.max(1e-4)
        })
        .collect();
    let (mx, mn) = s
        .iter()
        .fold((f64::MIN, f64::MAX), |(a, b), v| (a.max(*v), b.min(*v)));
    let norm = (mx * mn).sqrt();
    s.iter_mut().for_each(|v| *v /= norm);
    s.iter().map(|v| *v as f32).collect()
}

/// Σ (a − b)² over all batches, as f64.
fn sq_err(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            x.par_iter()
                .zip(y)
                .map(|(p, q)| ((p - q) as f64).powi(2))
                .sum::<f64>()
        })
        .sum()
}

/// The module AWQ inspects for a mapping, run on its cached inputs.
enum Inspect {
    /// A sub-block (attention or MLP) from its normed input.
    Part(Part, Vec<Act>),
    /// One linear on its raw input rows (per batch, [tokens, in]).
    Linear(&'static str, Vec<(Vec<f32>, usize)>),
}

impl Inspect {
    fn run(&self, ctx: &LayerCtx, layer: &LayerWeights) -> Result<Vec<Vec<f32>>> {
        match self {
            Inspect::Part(p, x) => ctx.part_output(layer, *p, x),
            Inspect::Linear(name, x) => x
                .iter()
                .map(|(v, d)| layer.linears[*name].forward(v, v.len() / d))
                .collect(),
        }
    }
}

impl Awq {
    /// Steps 1–4 for one mapping; returns (best α, whether it used s_w, loss at best, loss of
    /// the first candidate — the identity, plain rounding's loss).
    /// `quantized[i]`: whether consumer `i` is quantized after the search; the others (a
    /// mixture's dense router) only absorb the scale, exactly.
    fn scale_mapping(
        &self,
        ctx: &mut LayerCtx,
        m: &Mapping,
        quantized: &[bool],
    ) -> Result<(f64, bool, f64, f64)> {
        let x_mean = ctx
            .stats(m.site)?
            .mean_abs()
            .context("no activation means collected")?;
        // the first batches holding `search_samples` windows
        let (mut batches, mut windows, mut rows) = (0, 0, 0);
        for x in ctx.inputs() {
            if windows >= self.spec.search_samples {
                break;
            }
            batches += 1;
            windows += x.b;
            rows += x.rows();
        }
        let part = |p: Part, ctx: &LayerCtx| -> Result<Inspect> {
            let mut x = ctx.part_inputs(p)?;
            x.truncate(batches);
            Ok(Inspect::Part(p, x))
        };
        let inspect = match m.parent {
            Parent::Part(p) => part(p, ctx)?,
            Parent::Linear(l) => Inspect::Linear(l, ctx.site_inputs(m.site, Some(rows))?),
        };
        let reference = inspect.run(ctx, &ctx.layer)?;
        let gs = self.args.group_width(x_mean.len());
        let originals: Vec<Array2<f32>> = m
            .consumers
            .iter()
            .map(|c| ctx.layer.linears[*c].weight().clone())
            .collect();
        let w_mean = self
            .spec
            .duo_scaling
            .then(|| weight_mean(&originals.iter().collect::<Vec<_>>(), gs));
        let mut best = (f64::INFINITY, 0.0, false, Vec::new());
        let mut loss_at_zero = f64::NAN;
        for (i, (alpha, duo)) in grid(self.spec.n_grid, self.spec.duo_scaling)
            .into_iter()
            .enumerate()
        {
            let s = candidate_scales(&x_mean, w_mean.as_deref().filter(|_| duo), alpha);
            let mut cand = ctx.layer.clone();
            for ((c, w), _) in m
                .consumers
                .iter()
                .zip(&originals)
                .zip(quantized)
                .filter(|(_, q)| **q)
            {
                // Q(W·diag(s))·diag(s)⁻¹ (a dense consumer: W·diag(s)·diag(s)⁻¹ = W, as it is)
                let mut ws = w.clone();
                for mut row in ws.rows_mut() {
                    row.iter_mut().zip(&s).for_each(|(x, s)| *x *= s);
                }
                let mut q = pseudo_quant(&ws, &self.args)?;
                for mut row in q.rows_mut() {
                    row.iter_mut().zip(&s).for_each(|(x, s)| *x /= s);
                }
                cand.linears
                    .get_mut(*c)
                    .context("consumer present")?
                    .set_weight(q)?;
            }
            let loss = sq_err(&inspect.run(ctx, &cand)?, &reference);
            if i == 0 {
                loss_at_zero = loss;
            }
            if loss < best.0 {
                best = (loss, alpha, duo, s);
            }
        }
        let (loss, alpha, duo, s) = best;
        ctx.layer.fold_scale(m, &s)?;
        Ok((alpha, duo, loss, loss_at_zero))
    }

    /// Step 5 for one linear: per (row, group) the clipping range with the least partial-output
    /// error on `x` ([tokens, in]); the weights are clamped to it.
    fn clip_linear(&self, w: &Array2<f32>, x: &[f32], tokens: usize) -> Result<Array2<f32>> {
        let (rows, cols) = w.dim();
        let gs = self.args.group_width(cols);
        let n_groups = cols / gs;
        let steps = (self.spec.max_shrink * self.spec.n_grid as f64) as usize;
        let mut out = w.clone();
        // per group: X_g [tokens, gs] and W_g [rows, gs]
        let results: Vec<Vec<f32>> = (0..n_groups)
            .into_par_iter()
            .map(|g| -> Result<Vec<f32>> {
                let xg: Vec<f32> = (0..tokens)
                    .flat_map(|t| x[t * cols + g * gs..t * cols + (g + 1) * gs].to_vec())
                    .collect();
                let wg: Vec<f32> = (0..rows)
                    .flat_map(|r| (g * gs..(g + 1) * gs).map(move |j| (r, j)))
                    .map(|(r, j)| w[[r, j]])
                    .collect();
                let org = ops::linear(&xg, tokens, gs, &wg, rows, None);
                let org_max: Vec<f32> = wg
                    .chunks(gs)
                    .map(|c| c.iter().fold(0f32, |m, v| m.max(v.abs())))
                    .collect();
                let mut best_err = vec![f64::INFINITY; rows];
                let mut best_max = org_max.clone();
                for i in 0..steps.max(1) {
                    let f = 1.0 - i as f32 / self.spec.n_grid as f32;
                    let clipped: Vec<f32> = wg
                        .chunks(gs)
                        .zip(&org_max)
                        .flat_map(|(c, m)| c.iter().map(move |v| v.clamp(-m * f, m * f)))
                        .collect();
                    let q =
                        pseudo_quant(&Array2::from_shape_vec((rows, gs), clipped)?, &self.args)?;
                    let cur = ops::linear(&xg, tokens, gs, q.as_slice().context("q")?, rows, None);
                    for r in 0..rows {
                        let e: f64 = (0..tokens)
                            .map(|t| ((cur[t * rows + r] - org[t * rows + r]) as f64).powi(2))
                            .sum();
                        if e < best_err[r] {
                            best_err[r] = e;
                            best_max[r] = org_max[r] * f;
                        }
                    }
                }
                Ok(best_max)
            })
            .collect::<Result<_>>()?;
        for (g, maxes) in results.iter().enumerate() {
            for (r, m) in maxes.iter().enumerate() {
                for j in g * gs..(g + 1) * gs {
                    out[[r, j]] = out[[r, j]].clamp(-m, *m);
                }
            }
        }
        Ok(out)
    }
}

impl Pass for Awq {
    fn name(&self) -> String {
        "awq".into()
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest {
            act_mean_abs: true,
            ..Default::default()
        }
    }

    fn apply(&self, ctx: &mut LayerCtx) -> Result<()> {
        // s_x of every site from the layer's inputs before any scaling (one forward); the
        // folds leave every later site's function unchanged before quantization
        ctx.refresh()?;
        let mappings = ctx.config.block().mappings(ctx.config);
        let block = ctx.config.block();
        for m in &mappings {
            // a mapping is scaled whole, and only where folding is exact; every consumer is
            // quantized after it, except a mixture's router (and Qwen2-MoE's shared-expert
            // gate), which reads the same normed input as the experts, absorbs the scale
            // exactly and stays dense (llm-compressor's MoE mapping lists `mlp.gate` too)
            let quantized: Vec<bool> = m
                .consumers
                .iter()
                .map(|c| self.select.selects_in(ctx, c))
                .collect();
            let compensated = |c: &str| block.linear(c).is_some_and(|l| l.router);
            let whole = m
                .consumers
                .iter()
                .zip(&quantized)
                .all(|(c, q)| *q || compensated(c));
            if !whole || !m.foldable || !quantized.iter().any(|q| *q) {
                continue;
            }
            let t = Instant::now();
            let (alpha, duo, loss, loss0) =
                self.scale_mapping(ctx, m, &quantized).with_context(|| {
                    format!("layer {}: AWQ at {}", ctx.index(), block.site(m.site).name)
                })?;
            let secs = t.elapsed().as_secs_f64() / m.consumers.len() as f64;
            for (c, _) in m.consumers.iter().zip(&quantized).filter(|(_, q)| **q) {
                ctx.records.push(
                    LinearRecord::new(ctx.index(), c, "awq", t)
                        .loss(loss)
                        .seconds(secs)
                        .notes(
                            [
                                ("alpha".to_string(), json!(alpha)),
                                ("duo_scaling".to_string(), json!(duo)),
                                ("loss_identity".to_string(), json!(loss0)),
                            ]
                            .into(),
                        ),
                );
            }
        }
        if self.spec.clip {
            ctx.invalidate();
            for lin in &ctx.config.block().linears {
                let name = lin.name;
                if !lin.clip || !self.select.selects_in(ctx, name) {
                    continue;
                }
                let t = Instant::now();
                // the scaled layer's inputs, a strided subsample
                let site = lin.site;
                let rows = ctx.site_inputs(site, None)?;
                let d = rows.first().map(|r| r.1).unwrap_or(1);
                let all: usize = rows.iter().map(|(v, _)| v.len() / d).sum();
                let step = (all / self.spec.clip_tokens).max(1);
                let x: Vec<f32> = rows
                    .iter()
                    .flat_map(|(v, _)| v.chunks(d))
                    .step_by(step)
                    .flatten()
                    .copied()
                    .collect();
                let tokens = x.len() / d;
                let lin = &ctx.layer.linears[name];
                let clipped = self.clip_linear(lin.weight(), &x, tokens)?;
                ctx.layer
                    .linears
                    .get_mut(name)
                    .context("linear present")?
                    .set_weight(clipped)?;
                if let Some(r) = ctx
                    .records
                    .iter_mut()
                    .rev()
                    .find(|r| r.linear == name && r.pass == "awq")
                {
                    r.notes.insert("clip_tokens".into(), json!(tokens));
                    r.seconds += t.elapsed().as_secs_f64();
                }
            }
        }
        ctx.invalidate();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_are_normalised_and_alpha_zero_is_flat_without_duo() {
        let x = vec![0.5, 2.0, 8.0, 1.0];
        let s = candidate_scales(&x, None, 0.0);
        assert!(s.iter().all(|v| (*v - 1.0).abs() < 1e-6));
        let s = candidate_scales(&x, None, 0.5);
        let (mx, mn) = s
            .iter()
            .fold((f32::MIN, f32::MAX), |(a, b), v| (a.max(*v), b.min(*v)));
        assert!(((mx * mn).sqrt() - 1.0).abs() < 1e-5);
        assert!(s[2] > s[1] && s[1] > s[3] && s[3] > s[0]);
    }

    #[test]
    fn grid_is_llm_compressors_with_the_identity_first() {
        let g = grid(20, true);
        assert_eq!(g.len(), 20);
        assert_eq!(g[0], (0.0, false));
        assert_eq!(g[1], (0.0, true));
        assert_eq!(g[19], (1.0, true));
        assert!((g[2].0 - 1.0 / 18.0).abs() < 1e-15);
        let g = grid(20, false);
        assert_eq!(g.len(), 20);
        assert_eq!((g[0], g[19]), ((0.0, false), (1.0, false)));
        assert!((g[1].0 - 1.0 / 19.0).abs() < 1e-15);
        // one candidate: the identity alone, either way
        assert_eq!(grid(1, true), vec![(0.0, false)]);
        assert_eq!(grid(1, false), vec![(0.0, false)]);
        // the identity candidate's scales are all 1 (normalised s_x^0)
        let s = candidate_scales(&[0.5, 2.0, 8.0], None, g[0].0);
        assert!(s.iter().all(|v| *v == 1.0));
    }
}
