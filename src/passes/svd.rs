//! Truncated SVD — the low-rank baseline (Eckart–Young–Mirsky): the best rank-r approximation
//! of W [m, n] in the Frobenius norm is its truncated singular value decomposition,
//!
//!   W = U Σ Vᵀ,   W ≈ U_r Σ_r V_rᵀ,   ‖W − U_r Σ_r V_rᵀ‖_F² = Σ_{i>r} σ_i²,
//!
//! stored as two factors W_u = U_r Σ_r^{1/2} [m, r] and W_v = Σ_r^{1/2} V_rᵀ [r, n] (the
//! singular values split evenly, so both factors have the same scale in a 16-bit dtype). The
//! linear then costs r·(m + n) parameters instead of m·n; `ratio` is the fraction removed,
//!
//!   r = ⌊(1 − ratio) · m·n / (m + n)⌋,
//!
//! or `rank` fixes r. Plain SVD minimises the *weight* error and ignores the inputs, which is
//! why it collapses on LLMs (SVD-LLM, Table 1: LLaMA-7B wikitext2 perplexity 20,061 at 20%);
//! `svd_llm.rs` minimises the output error instead. No calibration data.

use super::harness::{Done, PerLinear, Schedule};
use crate::engine::stats::StatsRequest;
use crate::engine::{LayerCtx, Pass};
use crate::model::layer::Factor;
use crate::model::DType;
use crate::quant::round_to;
use anyhow::{bail, Context, Result};
use ndarray::Array2;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;

/// How much to keep: exactly one of `ratio` (fraction of each targeted linear's parameters
/// removed) or `rank`. Shared by `svd` and `svd_llm`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SvdSpec {
    /// Fraction of each linear's m·n parameters removed: r = ⌊(1 − ratio)·m·n/(m + n)⌋.
    #[serde(default)]
    pub ratio: Option<f64>,
    /// A fixed rank for every targeted linear (capped at min(m, n)).
    #[serde(default)]
    pub rank: Option<usize>,
    #[serde(default = "super::default_targets")]
    pub targets: Vec<String>,
    #[serde(default = "super::default_ignore")]
    pub ignore: Vec<String>,
}

impl SvdSpec {
    pub fn validate(&self) -> Result<()> {
        match (self.ratio, self.rank) {
            (Some(_), Some(_)) => bail!("give either `ratio` or `rank`, not both"),
            (None, None) => {
                bail!("missing field `ratio` (fraction of parameters removed) or `rank`")
            }
            (Some(p), None) if !(p > 0.0 && p < 1.0) => {
                bail!("field `ratio` must be in (0, 1), found {p}")
            }
            (None, Some(0)) => bail!("field `rank` must be at least 1"),
            _ => {}
        }
        super::select::Selector::new(&self.targets, &self.ignore)?;
        Ok(())
    }

    /// The rank of an [m, n] linear under this spec.
    pub fn rank_for(&self, m: usize, n: usize) -> Result<usize> {
        let r = match (self.ratio, self.rank) {
            (Some(p), _) => rank_for_ratio(m, n, p),
            (None, Some(r)) => r.min(m.min(n)),
            (None, None) => bail!("neither `ratio` nor `rank` given"),
        };
        if r == 0 {
            bail!(
                "ratio {:?} leaves rank 0 for a {m}×{n} linear",
                self.ratio.unwrap_or_default()
            );
        }
        Ok(r)
    }
}

/// r = ⌊(1 − ratio)·m·n/(m + n)⌋: the largest rank whose two factors hold at most the kept
/// fraction of the m·n parameters.
pub fn rank_for_ratio(m: usize, n: usize, ratio: f64) -> usize {
    let r = ((1.0 - ratio) * (m * n) as f64 / (m + n) as f64).floor() as usize;
    r.min(m.min(n))
}

/// Parameters removed by storing an [m, n] linear as rank-r factors (negative when the
/// factors hold more than the dense matrix).
pub fn params_removed(m: usize, n: usize, r: usize) -> i64 {
    (m * n) as i64 - (r * (m + n)) as i64
}

/// Two factors W_u [m, r] · W_v [r, n] in f64, and the spectrum they were cut from.
pub struct LowRank {
    pub u: Array2<f64>,
    pub v: Array2<f64>,
    /// The singular values computed of the decomposed matrix (W for SVD, W·S for SVD-LLM):
    /// all of them for SVD-LLM, the leading r for `svd_truncate`.
    pub sigma: Vec<f64>,
    /// Σ_{i>r} σ_i², the truncation loss of the decomposed matrix.
    pub loss: f64,
}

impl LowRank {
    pub fn rank(&self) -> usize {
        self.u.ncols()
    }

    /// The factors as the linear stores them: f32 values rounded to the checkpoint's dtype, so
    /// the calibration forward of later layers computes what the exported checkpoint does.
    pub fn factors(&self, dtype: DType) -> (Factor, Factor) {
        let f = |a: &Array2<f64>| Factor {
            values: a.mapv(|x| round_to(dtype, x as f32)),
            quant: None,
        };
        (f(&self.u), f(&self.v))
    }
}

/// Split a decomposition A = U Σ Vᵀ at rank r into U_r Σ_r^{1/2} and Σ_r^{1/2} V_rᵀ.
pub fn split_sqrt(d: &crate::linalg::Svd, r: usize) -> Result<(Array2<f64>, Array2<f64>)> {
    let k = d.s.len();
    if r == 0 || r > k {
        bail!("rank {r} outside 1..={k}");
    }
    let sq: Vec<f64> = d.s[..r].iter().map(|s| s.sqrt()).collect();
    let u = Array2::from_shape_fn((d.u.nrows(), r), |(i, j)| d.u[[i, j]] * sq[j]);
    let v = Array2::from_shape_fn((r, d.v.nrows()), |(i, j)| sq[i] * d.v[[j, i]]);
    Ok((u, v))
}

/// Truncated SVD of `w` [m, n] at rank r: W ≈ (U_r Σ_r^{1/2}) (Σ_r^{1/2} V_rᵀ). Only the
/// leading r triplets are computed ([`crate::linalg::svd_top`]: randomized when r is small
/// against min(m, n)).
pub fn svd_truncate(w: &Array2<f32>, r: usize) -> Result<LowRank> {
    let (d, loss) = crate::linalg::svd_top(&w.mapv(|x| x as f64), r)?;
    let (u, v) = split_sqrt(&d, r)?;
    Ok(LowRank {
        u,
        v,
        sigma: d.s,
        loss,
    })
}

pub struct Svd {
    spec: SvdSpec,
    select: super::select::Selector,
}

impl Svd {
    pub fn new(spec: &SvdSpec) -> Result<Self> {
        spec.validate()?;
        Ok(Svd {
            spec: spec.clone(),
            select: super::select::Selector::new(&spec.targets, &spec.ignore)?,
        })
    }
}

/// The notes every low-rank pass records for a linear.
pub fn rank_notes(m: usize, n: usize, r: usize) -> BTreeMap<String, serde_json::Value> {
    let mut notes = BTreeMap::new();
    notes.insert("rank".into(), json!(r));
    notes.insert("params_removed".into(), json!(params_removed(m, n, r)));
    notes
}

impl Pass for Svd {
    fn name(&self) -> String {
        "svd".into()
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest::default()
    }

    fn apply(&self, ctx: &mut LayerCtx) -> Result<()> {
        let harness = PerLinear {
            pass: "svd",
            select: &self.select,
            schedule: Schedule::Weights,
        };
        harness.each(ctx, |ctx, l| {
            let lin = ctx
                .layer
                .linears
                .get_mut(l.name)
                .context("linear present")?;
            let (m, n) = lin.shape();
            let r = self.spec.rank_for(m, n)?;
            let lr = svd_truncate(lin.weight(), r)?;
            let (u, v) = lr.factors(lin.dtype);
            lin.set_factored(u, v)?;
            if params_removed(m, n, r) <= 0 {
                ctx.warn(format!(
                    "{}: rank {r} factors hold {} parameters, not fewer than the {m}×{n} matrix",
                    l.module,
                    r * (m + n)
                ));
            }
            Ok(Done {
                loss: Some(lr.loss),
                notes: rank_notes(m, n, r),
                ..Default::default()
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(m: usize, n: usize, seed: u64) -> Array2<f32> {
        let mut x = seed;
        Array2::from_shape_fn((m, n), |_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32
        })
    }

    fn product(lr: &LowRank) -> Array2<f64> {
        lr.u.dot(&lr.v)
    }

    #[test]
    fn rank_from_ratio() {
        // 256×768 at 20%: ⌊0.8·196608/1024⌋ = 153, and the factors keep ≤ 80%
        assert_eq!(rank_for_ratio(256, 768, 0.2), 153);
        assert!(153 * (256 + 768) <= (0.8 * 256.0 * 768.0) as usize);
        assert_eq!(rank_for_ratio(256, 256, 0.2), 102);
        assert_eq!(params_removed(256, 256, 102), 256 * 256 - 102 * 512);
        let spec = SvdSpec {
            ratio: None,
            rank: Some(1000),
            targets: vec!["Linear".into()],
            ignore: vec![],
        };
        assert_eq!(spec.rank_for(64, 32).unwrap(), 32);
        let tiny = SvdSpec {
            ratio: Some(0.99),
            rank: None,
            ..spec.clone()
        };
        assert!(tiny.rank_for(4, 4).is_err());
        assert!(SvdSpec {
            ratio: Some(0.2),
            ..spec
        }
        .validate()
        .is_err());
    }

    #[test]
    fn full_rank_multiplies_back_and_loss_is_the_dropped_spectrum() {
        for (m, n) in [(24, 40), (40, 24)] {
            let w = random(m, n, 7);
            let wd = w.mapv(|x| x as f64);
            let full = svd_truncate(&w, m.min(n)).unwrap();
            let e = (&product(&full) - &wd)
                .iter()
                .fold(0f64, |a, v| a.max(v.abs()));
            assert!(e < 1e-12, "full-rank factors differ from W by {e}");
            assert_eq!(full.loss, 0.0);
            // Eckart–Young: ‖W − W_u W_v‖_F² = Σ_{i>r} σ_i²
            let lr = svd_truncate(&w, 10).unwrap();
            let err: f64 = (&product(&lr) - &wd).iter().map(|v| v * v).sum();
            assert!(
                (err - lr.loss).abs() <= 1e-10 * lr.loss,
                "{err} vs {}",
                lr.loss
            );
            assert_eq!((lr.u.dim(), lr.v.dim()), ((m, 10), (10, n)));
        }
    }
}
