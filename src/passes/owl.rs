//! OWL — Yin, Wu, Zhang, et al., "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret
//! Sauce for Pruning LLMs to High Sparsity" (ICML 2024). `allocation: owl` on a pruning pass.
//!
//! Uniform sparsity prunes every layer alike, but LLM layers differ in how many outlier
//! features they carry, and pruning those layers hurts most. OWL measures, per decoder layer l,
//! the Layerwise Outlier Distribution (LOD): the share of its weights whose Wanda score
//! A_ij = ‖X_j‖₂ · |W_ij| exceeds M times the layer's mean score (§3.2, eq. 3),
//!
//! ```text
//!   D_l = Σ_{linears of l} Σ_ij [A_ij > M · Ā_l]  /  (number of weights of l)
//! ```
//!
//! and gives layers with more outliers a lower sparsity, linearly in D within a band of ±λ
//! around the target S and with the same mean (§3.3, "S_l = 1 − D_l" rescaled into
//! [S − λ, S + λ]; the reference code normalises D to [0, 2λ] and centres it on 1 − S):
//!
//! ```text
//!   r_l = 2λ · (D_l − min D) / (max D − min D),   density_l = r_l − mean(r) + (1 − S),
//!   S_l = 1 − density_l
//! ```
//!
//! Decoder layers of one model have the same parameter count, so the model's global sparsity
//! stays S. D needs every layer's scores before the first layer is pruned: the runner runs a
//! scan first — [`OwlScan`], the dense model streamed through all layers with the column-norm
//! statistic only (about the cost of a Wanda pass) — then the pruner with the sparsity of each
//! layer. Defaults M = 5 and λ = 0.08 are the paper's settings for LLaMA (its Table 8 sweeps M
//! ∈ {3, 5, 7, 10} and λ ∈ [0.02, 0.2]).

use super::input_site;
use super::select::Selector;
use super::wanda::wanda_scores;
use crate::engine::stats::StatsRequest;
use crate::engine::{LayerCtx, LinearRecord, Pass};
use anyhow::{bail, Context, Result};
use serde_json::json;

/// D_l of one layer: the fraction of scores above `m` × their mean, over all given linears'
/// score matrices together (eq. 3).
pub fn outlier_ratio(scores: &[&[f32]], m: f64) -> f64 {
    let n: usize = scores.iter().map(|s| s.len()).sum();
    if n == 0 {
        return 0.0;
    }
    let mean = scores
        .iter()
        .flat_map(|s| s.iter())
        .map(|&v| v as f64)
        .sum::<f64>()
        / n as f64;
    let above = scores
        .iter()
        .flat_map(|s| s.iter())
        .filter(|&&v| v as f64 > m * mean)
        .count();
    above as f64 / n as f64
}

/// Per-layer sparsities from the layers' outlier ratios (module docs): mean `sparsity`, range
/// at most 2λ, more outliers → lower sparsity. Equal ratios give uniform sparsity.
pub fn allocate(ratios: &[f64], sparsity: f64, lambda: f64) -> Result<Vec<f64>> {
    if ratios.is_empty() {
        return Ok(Vec::new());
    }
    let (lo, hi) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &r| (a.min(r), b.max(r)));
    let r: Vec<f64> = if hi > lo {
        ratios
            .iter()
            .map(|&d| 2.0 * lambda * (d - lo) / (hi - lo))
            .collect()
    } else {
        vec![0.0; ratios.len()]
    };
    let mean = r.iter().sum::<f64>() / r.len() as f64;
    let out: Vec<f64> = r
        .iter()
        .map(|&v| 1.0 - (v - mean + 1.0 - sparsity))
        .collect();
    if let Some(bad) = out.iter().find(|s| !(0.0..1.0).contains(*s)) {
        bail!(
            "OWL gives a layer sparsity of {bad:.3}: lower `owl_lambda` ({lambda}) or the target sparsity ({sparsity})"
        );
    }
    Ok(out)
}

/// The scan the runner runs before an OWL-allocated pruning pass: on the dense model, D_l of
/// every layer from the Wanda scores of the pruner's targeted linears. It changes no weight;
/// it records one entry per layer (`linear: "*"`, note `outlier_ratio`).
pub struct OwlScan {
    pub m: f64,
    pub select: Selector,
}

impl Pass for OwlScan {
    fn name(&self) -> String {
        "owl-scan".into()
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest {
            col_norm: true,
            ..Default::default()
        }
    }

    fn apply(&self, ctx: &mut LayerCtx) -> Result<()> {
        let t = std::time::Instant::now();
        ctx.refresh()?;
        let mut all: Vec<Vec<f32>> = Vec::new();
        for name in ctx.config.block().linear_names() {
            if !self.select.selects_in(ctx, name) {
                continue;
            }
            let norm = ctx
                .stats(input_site(ctx, name)?)?
                .col_norm()
                .context("no column norms collected")?;
            all.push(wanda_scores(ctx.layer.linears[name].weight(), &norm));
        }
        let refs: Vec<&[f32]> = all.iter().map(|v| v.as_slice()).collect();
        let d = outlier_ratio(&refs, self.m);
        ctx.records.push(
            LinearRecord::new(ctx.index(), "*", "owl-scan", t)
                .notes([("outlier_ratio".to_string(), json!(d))].into()),
        );
        Ok(())
    }
}

/// The layers' outlier ratios from the scan's records, in layer order.
pub fn ratios_from_records(records: &[LinearRecord], layers: usize) -> Result<Vec<f64>> {
    let mut out = vec![None; layers];
    for r in records.iter().filter(|r| r.pass == "owl-scan") {
        let d = r.notes.get("outlier_ratio").and_then(|v| v.as_f64());
        if let (Some(slot), Some(d)) = (out.get_mut(r.layer), d) {
            *slot = Some(d);
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(l, d)| d.with_context(|| format!("OWL scan: no outlier ratio for layer {l}")))
        .collect()
}

/// OWL's whole-model phase: stream the dense model through the outlier scan (nothing written)
/// and set the pruning pass's per-layer sparsities from the ratios. A resumed run passes the
/// allocation its state recorded (`cached`) instead of scanning again. Returns
/// (outlier ratio, sparsity) per layer, which the resume state keeps.
pub fn prepare(
    ps: &mut super::prune::PruneSpec,
    at: &str,
    ckpt: &crate::model::Checkpoint,
    windows: &[Vec<u32>],
    opts: &crate::engine::StreamOptions,
    cached: Option<&Vec<(f64, f64)>>,
) -> Result<Vec<(f64, f64)>> {
    if windows.is_empty() {
        bail!("{at}: `allocation: owl` needs a `calibration:` block");
    }
    if let Some(a) = cached.filter(|a| a.len() == ckpt.config.num_layers) {
        crate::info!("{at}: OWL allocation from the resume state");
        ps.owl = Some(a.clone());
        return Ok(a.clone());
    }
    crate::info!("{at}: OWL scan of the dense model (outlier ratio per layer)");
    let scan = OwlScan {
        m: ps.owl_m,
        select: Selector::new(&ps.targets, &ps.ignore)?,
    };
    let passes: Vec<Box<dyn Pass>> = vec![Box::new(scan)];
    let r = crate::engine::run(
        ckpt,
        &passes,
        windows,
        opts,
        &mut crate::engine::NullSink,
        None,
    )?;
    let ratios = ratios_from_records(&r.records, ckpt.config.num_layers)?;
    let alloc = allocate(&ratios, ps.target(), ps.owl_lambda).with_context(|| at.to_string())?;
    crate::info!(
        "{at}: OWL sparsity per layer {}",
        alloc
            .iter()
            .map(|s| format!("{s:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let a: Vec<(f64, f64)> = ratios.into_iter().zip(alloc).collect();
    ps.owl = Some(a.clone());
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outlier_ratio_counts_scores_above_m_times_the_mean() {
        // mean of [1 ×9, 20] = 2.9; above 5 × 2.9 = 14.5: one of ten
        let a = [1f32; 9];
        let b = [20f32];
        assert_eq!(outlier_ratio(&[&a, &b], 5.0), 0.1);
        assert_eq!(outlier_ratio(&[&a], 5.0), 0.0);
        // the mean is over all linears of the layer together, not per linear
        let c = [100f32, 1.0];
        let d = [1f32; 98];
        assert_eq!(outlier_ratio(&[&c, &d], 5.0), 0.01);
    }

    #[test]
    fn allocation_keeps_the_mean_and_gives_outlier_layers_less_sparsity() {
        let ratios = [0.010, 0.030, 0.020, 0.050, 0.012, 0.011];
        let s = allocate(&ratios, 0.6, 0.08).unwrap();
        let mean = s.iter().sum::<f64>() / s.len() as f64;
        assert!((mean - 0.6).abs() < 1e-12, "{mean}");
        let (lo, hi) = s
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        assert!((hi - lo - 0.16).abs() < 1e-12, "range {}", hi - lo);
        // order reversed: more outliers, lower sparsity
        for i in 0..ratios.len() {
            for j in 0..ratios.len() {
                if ratios[i] > ratios[j] {
                    assert!(s[i] < s[j]);
                }
            }
        }
        // linear in D
        let k = (s[1] - s[0]) / (ratios[1] - ratios[0]);
        assert!(((s[3] - s[2]) / (ratios[3] - ratios[2]) - k).abs() < 1e-9);
        // equal ratios: uniform
        assert_eq!(allocate(&[0.02; 4], 0.5, 0.08).unwrap(), vec![0.5; 4]);
        // a band that leaves [0, 1) is refused
        assert!(allocate(&[0.0, 1.0], 0.95, 0.1).is_err());
    }
}
