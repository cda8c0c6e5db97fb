//! Non-finite screening: the policy and error for calibration activations that stop being finite,
//! and finding and dropping the affected samples (separate from the statistics they interrupt).

use super::layer_run::LayerRun;
use crate::model::arch::Block;
use crate::model::layer::{LayerWeights, Site};
use crate::model::llama::{Act, Rope};
use crate::model::ModelConfig;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What to do when a calibration sample's activations stop being finite (an overflow inside the
/// model on that text). `error` (default) refuses the run, naming layer, input and sample;
/// `drop_sample` leaves the affected samples out from that layer on and records a warning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonFinitePolicy {
    #[default]
    Error,
    DropSample,
}

/// Non-finite calibration activations found at a linear's input. `samples` are positions in
/// the batch `batch` of the engine's inputs.
#[derive(Debug, Clone)]
pub struct NonFinite {
    pub layer: usize,
    pub site: Site,
    /// The linears reading `site`.
    pub linears: Vec<&'static str>,
    pub batch: usize,
    pub samples: Vec<usize>,
    pub value: f32,
    pub token: usize,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "layer {}: calibration activations at the input of `{}` are not finite ({}, first at token {})",
            self.layer,
            self.linears.join("`, `"),
            self.value,
            self.token,
        )
    }
}

impl std::error::Error for NonFinite {}

/// The samples of one batch ([b·t, d] rows) holding a NaN or ±Inf, or None when all is finite.
pub(super) fn find_nonfinite(
    block: &Block,
    layer: usize,
    site: Site,
    batch: usize,
    v: &[f32],
    t: usize,
    d: usize,
) -> Option<NonFinite> {
    let first = v.iter().position(|x| !x.is_finite())?;
    let samples: Vec<usize> = v
        .chunks(t * d)
        .enumerate()
        .filter(|(_, s)| s.iter().any(|x| !x.is_finite()))
        .map(|(i, _)| i)
        .collect();
    Some(NonFinite {
        layer,
        site,
        linears: block.readers(site).collect(),
        batch,
        samples,
        value: v[first],
        token: (first / d) % t,
    })
}

/// Every calibration sample whose activations at any linear input of `layer` (on its current
/// weights) are not finite: (batch, sample-in-batch) pairs, and the first site where each was seen.
pub(super) fn screen_nonfinite(
    layer: &LayerWeights,
    cfg: &ModelConfig,
    inputs: &[Act],
    rope: &Rope,
) -> Result<Vec<(usize, usize, Site)>> {
    let cl = LayerRun::new(layer, cfg, inputs)?;
    let mut bad = Vec::new();
    for (bi, x) in inputs.iter().enumerate() {
        let mut seen: BTreeMap<usize, Site> = BTreeMap::new();
        let mut hook = |site: Site, v: &[f32], _rows: usize, d: usize| -> Result<()> {
            if let Some(nf) = find_nonfinite(cfg.block(), layer.index, site, bi, v, x.t, d) {
                for s in nf.samples {
                    seen.entry(s).or_insert(site);
                }
            }
            Ok(())
        };
        cl.forward_until(x, rope, &mut hook, None)?;
        bad.extend(seen.into_iter().map(|(s, site)| (bi, s, site)));
    }
    Ok(bad)
}

/// Remove samples (batch, sample-in-batch) from the hidden states and their window ids;
/// batches left empty disappear.
pub(super) fn drop_samples(
    hidden: &mut Vec<Act>,
    ids: &mut Vec<Vec<usize>>,
    bad: &[(usize, usize)],
) {
    for (bi, (x, id)) in hidden.iter_mut().zip(ids.iter_mut()).enumerate() {
        let n = x.data.len() / x.b.max(1);
        let keep: Vec<usize> = (0..x.b).filter(|s| !bad.contains(&(bi, *s))).collect();
        if keep.len() == x.b {
            continue;
        }
        let mut data = Vec::with_capacity(keep.len() * n);
        for &s in &keep {
            data.extend_from_slice(&x.data[s * n..(s + 1) * n]);
        }
        x.data = data;
        x.b = keep.len();
        *id = keep.iter().map(|&s| id[s]).collect();
    }
    let mut i = 0;
    while i < hidden.len() {
        if hidden[i].b == 0 {
            hidden.remove(i);
            ids.remove(i);
        } else {
            i += 1;
        }
    }
}
