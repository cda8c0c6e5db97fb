//! What the pruning passes share: the sparsity pattern (unstructured or N:M), the YAML fields
//! every pruner takes, and masks from scores. The methods themselves — which score, and
//! whether the remaining weights are updated — are in `magnitude.rs`, `wanda.rs` and
//! `sparsegpt.rs`.

use super::harness::Done;
use crate::engine::LayerCtx;
use crate::model::layer::Mask;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Where zeros may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Anywhere, to the target sparsity.
    Unstructured,
    /// At most `n` non-zeros in every `m` consecutive inputs of a row (2:4, 4:8), the pattern
    /// sparse tensor cores run.
    NM { n: usize, m: usize },
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Self> {
        if s == "unstructured" {
            return Ok(Pattern::Unstructured);
        }
        let Some((a, b)) = s.split_once(':') else {
            bail!("field `pattern`: expected `unstructured` or `N:M` (such as `2:4`), found `{s}`");
        };
        let (n, m): (usize, usize) = match (a.trim().parse(), b.trim().parse()) {
            (Ok(n), Ok(m)) => (n, m),
            _ => bail!("field `pattern`: `{s}` is not `N:M` with whole numbers"),
        };
        if m == 0 || n == 0 || n >= m {
            bail!("field `pattern`: `{s}` must keep 0 < N < M weights of every M");
        }
        Ok(Pattern::NM { n, m })
    }

    /// The sparsity this pattern implies, if fixed.
    pub fn sparsity(&self) -> Option<f64> {
        match self {
            Pattern::Unstructured => None,
            Pattern::NM { n, m } => Some(1.0 - *n as f64 / *m as f64),
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Pattern::Unstructured => write!(f, "unstructured"),
            Pattern::NM { n, m } => write!(f, "{n}:{m}"),
        }
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Pattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The fields every pruning pass takes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneSpec {
    /// Fraction of each targeted linear's weights set to zero (unstructured); ignored for N:M,
    /// whose sparsity is 1 − N/M.
    #[serde(default = "d_sparsity")]
    pub sparsity: f64,
    /// `unstructured` (default) or `N:M`.
    #[serde(default = "d_pattern")]
    pub pattern: Pattern,
    #[serde(default = "super::default_targets")]
    pub targets: Vec<String>,
    #[serde(default = "super::default_ignore")]
    pub ignore: Vec<String>,
    /// `uniform`: every layer at `sparsity`; `owl` (`passes/owl.rs`): layers with more outlier
    /// features pruned less, the same global sparsity (unstructured only).
    #[serde(default)]
    pub allocation: Allocation,
    /// OWL's outlier threshold M: a score counts as an outlier above M × the layer's mean.
    #[serde(default = "d_owl_m")]
    pub owl_m: f64,
    /// OWL's band: layer sparsities stay within the target ± λ.
    #[serde(default = "d_owl_lambda")]
    pub owl_lambda: f64,
    /// (outlier ratio, sparsity) of every layer, set by the runner's OWL scan.
    #[serde(skip)]
    pub owl: Option<Vec<(f64, f64)>>,
}

/// How a pruning pass's sparsity is spread over the layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Allocation {
    #[default]
    Uniform,
    Owl,
}

fn d_sparsity() -> f64 {
    0.5
}
fn d_owl_m() -> f64 {
    5.0
}
fn d_owl_lambda() -> f64 {
    0.08
}
fn d_pattern() -> Pattern {
    Pattern::Unstructured
}

impl PruneSpec {
    pub fn validate(&self) -> Result<()> {
        if !(self.sparsity > 0.0 && self.sparsity < 1.0) {
            bail!(
                "field `sparsity` must be in (0, 1), found {}",
                self.sparsity
            );
        }
        super::select::Selector::new(&self.targets, &self.ignore)?;
        if self.allocation == Allocation::Owl {
            if self.pattern != Pattern::Unstructured {
                bail!("field `allocation: owl` needs `pattern: unstructured` (N:M fixes every layer's sparsity)");
            }
            if !(self.owl_m > 0.0 && self.owl_m.is_finite()) {
                bail!("field `owl_m` must be positive, found {}", self.owl_m);
            }
            if !(self.owl_lambda > 0.0 && self.owl_lambda < 0.5) {
                bail!(
                    "field `owl_lambda` must be in (0, 0.5), found {}",
                    self.owl_lambda
                );
            }
            // the band must fit in (0, 1) whatever the ratios
            if self.sparsity - self.owl_lambda <= 0.0 || self.sparsity + self.owl_lambda >= 1.0 {
                bail!(
                    "fields `sparsity` {} and `owl_lambda` {}: the layers' band leaves (0, 1)",
                    self.sparsity,
                    self.owl_lambda
                );
            }
        } else if self.owl_m != d_owl_m() || self.owl_lambda != d_owl_lambda() {
            bail!("fields `owl_m` and `owl_lambda` only apply with `allocation: owl`");
        }
        Ok(())
    }

    /// The target sparsity (N:M fixes it).
    pub fn target(&self) -> f64 {
        self.pattern.sparsity().unwrap_or(self.sparsity)
    }

    /// The sparsity of decoder layer `layer`: the OWL allocation when the scan set one.
    pub fn target_at(&self, layer: usize) -> Result<f64> {
        match (self.allocation, &self.owl) {
            (Allocation::Uniform, _) => Ok(self.target()),
            (Allocation::Owl, Some(v)) => v
                .get(layer)
                .map(|p| p.1)
                .with_context(|| format!("OWL allocation has no layer {layer}")),
            (Allocation::Owl, None) => bail!("internal: `allocation: owl` without the OWL scan"),
        }
    }

    /// Report notes for layer `layer`: its outlier ratio under OWL.
    pub fn notes_at(&self, layer: usize) -> Vec<(String, serde_json::Value)> {
        match self.owl.as_ref().and_then(|v| v.get(layer)) {
            Some((d, s)) => vec![
                ("outlier_ratio".into(), serde_json::json!(d)),
                ("allocated_sparsity".into(), serde_json::json!(s)),
            ],
            None => Vec::new(),
        }
    }
}

/// Keep-mask of a [rows, cols] score matrix: the lowest scores go, per `pattern` —
/// unstructured `per_row` (the same count in every row, Wanda's comparison group) or over the
/// whole matrix (magnitude's), N:M within each group of M consecutive inputs. Ties go to the
/// lower column index first, so masks are deterministic.
pub fn mask_from_scores(
    scores: &[f32],
    rows: usize,
    cols: usize,
    pattern: Pattern,
    sparsity: f64,
    per_row: bool,
) -> Result<Mask> {
    let mut keep = vec![true; rows * cols];
    let drop_lowest = |idx: &mut Vec<usize>, k: usize, keep: &mut [bool]| {
        idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        for &i in idx.iter().take(k) {
            keep[i] = false;
        }
    };
    match pattern {
        Pattern::NM { n, m } => {
            if !cols.is_multiple_of(m) {
                bail!("pattern {n}:{m}: in_features {cols} is not a multiple of {m}");
            }
            for g in 0..rows * cols / m {
                let mut idx: Vec<usize> = (g * m..(g + 1) * m).collect();
                drop_lowest(&mut idx, m - n, &mut keep);
            }
        }
        Pattern::Unstructured if per_row => {
            let k = (cols as f64 * sparsity).floor() as usize;
            for r in 0..rows {
                let mut idx: Vec<usize> = (r * cols..(r + 1) * cols).collect();
                drop_lowest(&mut idx, k, &mut keep);
            }
        }
        Pattern::Unstructured => {
            let k = ((rows * cols) as f64 * sparsity).floor() as usize;
            let mut idx: Vec<usize> = (0..rows * cols).collect();
            drop_lowest(&mut idx, k, &mut keep);
        }
    }
    Mask::new((rows, cols), keep)
}

/// Prune linear `name` of the layer by `scores` ([rows, cols], lowest go) per `spec`; the
/// record notes the measured sparsity.
pub fn prune_by_scores(
    ctx: &mut LayerCtx,
    name: &str,
    spec: &PruneSpec,
    per_row: bool,
    scores: &[f32],
) -> Result<Done> {
    let layer = ctx.layer.index;
    let target = spec.target_at(layer)?;
    let lin = ctx.layer.linears.get_mut(name).context("no such linear")?;
    let (rows, cols) = lin.shape();
    let mask = mask_from_scores(scores, rows, cols, spec.pattern, target, per_row)?;
    let sparsity = mask.sparsity();
    lin.set_mask(mask)?;
    let mut done = Done::default().note("sparsity", sparsity);
    done.notes.extend(spec.notes_at(layer));
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_parse_and_masks_follow_them() {
        assert_eq!(Pattern::parse("2:4").unwrap(), Pattern::NM { n: 2, m: 4 });
        assert!(Pattern::parse("4:2").is_err() && Pattern::parse("x").is_err());
        let scores: Vec<f32> = (0..16).map(|i| ((i * 7) % 16) as f32).collect();
        let m = mask_from_scores(&scores, 2, 8, Pattern::NM { n: 2, m: 4 }, 0.0, false).unwrap();
        for g in m.keep.chunks(4) {
            assert_eq!(g.iter().filter(|k| **k).count(), 2);
        }
        // kept are the two largest of each group
        for (g, k) in scores.chunks(4).zip(m.keep.chunks(4)) {
            let min_kept = g
                .iter()
                .zip(k)
                .filter(|(_, k)| **k)
                .map(|(s, _)| *s)
                .fold(f32::MAX, f32::min);
            let max_dropped = g
                .iter()
                .zip(k)
                .filter(|(_, k)| !**k)
                .map(|(s, _)| *s)
                .fold(f32::MIN, f32::max);
            assert!(min_kept > max_dropped);
        }
        let m = mask_from_scores(&scores, 2, 8, Pattern::Unstructured, 0.25, true).unwrap();
        for r in m.keep.chunks(8) {
            assert_eq!(r.iter().filter(|k| !**k).count(), 2);
        }
        let m = mask_from_scores(&scores, 2, 8, Pattern::Unstructured, 0.5, false).unwrap();
        assert_eq!(m.sparsity(), 0.5);
        assert!(m.keep.iter().zip(&scores).all(|(k, s)| *k == (*s >= 8.0)));
    }
}
