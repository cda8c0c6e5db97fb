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
    /// Empty when the rows are the tokens a router sent to one expert: they do not say which
    /// sample they come from ([`screen_nonfinite`] finds out).
    pub samples: Vec<usize>,
    pub value: f32,
    /// The first token position, when the rows are the batch's (not an expert's routed rows).
    pub token: Option<usize>,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "layer {}: calibration activations at the input of `{}` are not finite ({}",
            self.layer,
            self.linears.join("`, `"),
            self.value,
        )?;
        match self.token {
            Some(t) => write!(f, ", first at token {t})"),
            None => write!(f, ", in the rows routed to that expert)"),
        }
    }
}

impl std::error::Error for NonFinite {}

/// The samples of one batch `x` holding a NaN or ±Inf in `v` (`rows` rows of `d` at `site`),
/// or None when all is finite. At an expert's input the rows are the tokens routed to it (fewer
/// than the batch's): the samples are then left empty, for [`screen_nonfinite`] to find.
#[allow(clippy::too_many_arguments)]
pub(super) fn find_nonfinite(
    block: &Block,
    layer: usize,
    site: Site,
    batch: usize,
    v: &[f32],
    rows: usize,
    x: &Act,
    d: usize,
) -> Option<NonFinite> {
    let first = v.iter().position(|x| !x.is_finite())?;
    let t = x.t;
    let whole = rows == x.b * t && block.site(site).expert.is_none();
    let samples: Vec<usize> = match whole {
        true => v
            .chunks(t * d)
            .enumerate()
            .filter(|(_, s)| s.iter().any(|x| !x.is_finite()))
            .map(|(i, _)| i)
            .collect(),
        false => Vec::new(),
    };
    Some(NonFinite {
        layer,
        site,
        linears: block.readers(site).collect(),
        batch,
        samples,
        value: v[first],
        token: whole.then_some((first / d) % t),
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
        let mut routed = false;
        let mut hook = |site: Site, v: &[f32], rows: usize, d: usize| -> Result<()> {
            if let Some(nf) = find_nonfinite(cfg.block(), layer.index, site, bi, v, rows, x, d) {
                routed |= nf.samples.is_empty();
                for s in nf.samples {
                    seen.entry(s).or_insert(site);
                }
            }
            Ok(())
        };
        cl.forward_until(x, rope, &mut hook, None)?;
        if routed {
            // inside an expert the rows do not say their sample: run each sample of the batch
            // on its own (routing is per token, attention per sample, so its rows are the same)
            let d = cfg.hidden_size;
            for s in 0..x.b {
                let one = Act {
                    data: x.data[s * x.t * d..(s + 1) * x.t * d].to_vec(),
                    b: 1,
                    t: x.t,
                };
                let mut first: Option<Site> = None;
                let mut hook = |site: Site, v: &[f32], _rows: usize, _d: usize| -> Result<()> {
                    if first.is_none() && v.iter().any(|x| !x.is_finite()) {
                        first = Some(site);
                    }
                    Ok(())
                };
                cl.forward_until(&one, rope, &mut hook, None)?;
                if let Some(site) = first {
                    seen.entry(s).or_insert(site);
                }
            }
        }
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
