//! SmoothQuant — Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient
//! Post-Training Quantization for Large Language Models" (ICML 2023).
//!
//! Activation outliers make per-token int8 activations lossy; weights are easy. Migrate the
//! difficulty: for every input channel j of a mapping (producer → consumers),
//!
//!   s_j = max|X_j|^α / max|W_j|^(1−α)                                      (eq. 4)
//!
//! with max|X_j| over the calibration tokens and max|W_j| over the rows of every consumer; then
//! X·diag(s)⁻¹ is folded into the producer and diag(s)·W into the consumers, which leaves the
//! function unchanged (§4). α = `smoothing_strength` (0.8 by default, as llm-compressor). By
//! default only mappings whose producer is a norm are smoothed (input_layernorm → q/k/v,
//! post_attention_layernorm → gate/up), as the paper and llm-compressor's Llama mappings do;
//! `include_linear_producers: true` adds up_proj → down_proj (and v → o where GQA allows).
//!
//! SmoothQuant only rescales: the quantizer that follows writes W8A8 (`rtn` or `gptq` with
//! `act_bits: 8`).

use crate::engine::stats::StatsRequest;
use crate::engine::{LayerCtx, LinearRecord, Pass};
use crate::model::arch::Producer;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmoothQuantSpec {
    /// α of eq. 4: how much of the activation range moves into the weights.
    #[serde(default = "d_alpha")]
    pub smoothing_strength: f64,
    /// Also smooth mappings whose producer is a linear (up → down; v → o without GQA).
    #[serde(default)]
    pub include_linear_producers: bool,
    #[serde(default = "super::default_targets")]
    pub targets: Vec<String>,
    #[serde(default = "super::default_ignore")]
    pub ignore: Vec<String>,
}

fn d_alpha() -> f64 {
    0.8
}

impl SmoothQuantSpec {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.smoothing_strength) {
            bail!(
                "field `smoothing_strength` must be in [0, 1], found {}",
                self.smoothing_strength
            );
        }
        super::select::Selector::new(&self.targets, &self.ignore)?;
        Ok(())
    }
}

pub struct SmoothQuant {
    spec: SmoothQuantSpec,
    select: super::select::Selector,
}

impl SmoothQuant {
    pub fn new(spec: &SmoothQuantSpec) -> Result<Self> {
        spec.validate()?;
        Ok(SmoothQuant {
            spec: spec.clone(),
            select: super::select::Selector::new(&spec.targets, &spec.ignore)?,
        })
    }
}

/// Eq. 4: per channel s_j = max|X_j|^α / max|W_j|^(1−α); channels that never saw an input or
/// have all-zero weights keep s_j = 1.
pub fn smoothing_scales(x_max: &[f32], w_max: &[f32], alpha: f64) -> Vec<f32> {
    x_max
        .iter()
        .zip(w_max)
        .map(|(&x, &w)| {
            if x <= 0.0 || w <= 0.0 {
                return 1.0;
            }
            let s = (x as f64).powf(alpha) / (w as f64).powf(1.0 - alpha);
            (s.max(1e-5)) as f32
        })
        .collect()
}

impl Pass for SmoothQuant {
    fn name(&self) -> String {
        "smoothquant".into()
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest {
            act_absmax: true,
            ..Default::default()
        }
    }

    fn apply(&self, ctx: &mut LayerCtx) -> Result<()> {
        // max|X_j| of every site from the layer's inputs before any scaling (one forward)
        ctx.refresh()?;
        let block = ctx.config.block();
        for m in block.mappings(ctx.config) {
            let linear_producer = matches!(m.producer, Producer::Linear(_));
            // every consumer is quantized after the migration, except a mixture's dense router
            // (and Qwen2-MoE's shared-expert gate), which absorbs the scale exactly
            let quantized: Vec<&'static str> = m
                .consumers
                .iter()
                .copied()
                .filter(|c| self.select.selects_in(ctx, c))
                .collect();
            let whole = m
                .consumers
                .iter()
                .all(|c| quantized.contains(c) || block.linear(c).is_some_and(|l| l.router));
            if !m.foldable
                || (linear_producer && !self.spec.include_linear_producers)
                || !whole
                || quantized.is_empty()
            {
                continue;
            }
            let t = Instant::now();
            let x_max = ctx
                .stats(m.site)?
                .absmax
                .clone()
                .context("no activation maxima collected")?;
            let mut w_max = vec![0f32; x_max.len()];
            for c in &quantized {
                for row in ctx.layer.linears[*c].weight().rows() {
                    for (m, v) in w_max.iter_mut().zip(row) {
                        *m = m.max(v.abs());
                    }
                }
            }
            let s = smoothing_scales(&x_max, &w_max, self.spec.smoothing_strength);
            ctx.layer
                .fold_scale(&m, &s)
                .with_context(|| format!("layer {}: SmoothQuant", ctx.index()))?;
            let (lo, hi) = s
                .iter()
                .fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
            let secs = t.elapsed().as_secs_f64() / quantized.len() as f64;
            for c in &quantized {
                ctx.records.push(
                    LinearRecord::new(ctx.index(), c, "smoothquant", t)
                        .seconds(secs)
                        .notes(
                            [
                                ("scale_min".to_string(), json!(lo)),
                                ("scale_max".to_string(), json!(hi)),
                            ]
                            .into(),
                        ),
                );
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
    fn eq4_balances_the_ranges() {
        // after smoothing, max|X_j|/s_j and max|W_j|·s_j meet at max|X|^(1−α)·max|W|^α
        let (x, w) = (vec![100.0f32, 1.0, 0.0], vec![0.1f32, 1.0, 0.5]);
        let s = smoothing_scales(&x, &w, 0.5);
        assert!(((x[0] / s[0]) - (w[0] * s[0])).abs() < 1e-4);
        assert!((s[1] - 1.0).abs() < 1e-6);
        assert_eq!(s[2], 1.0, "a channel without inputs is left alone");
        let s0 = smoothing_scales(&x, &w, 0.0);
        assert!((s0[0] - 10.0).abs() < 1e-4, "α = 0: s = 1/max|W|");
    }
}
