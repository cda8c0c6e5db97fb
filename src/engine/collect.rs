//! Statistics collection over the calibration batches, and the activations kept inside a layer
//! to continue from (separate from the accumulators in `stats.rs` and the pass API).

use super::layer_run::LayerRun;
use super::nonfinite::find_nonfinite;
use super::stats::{SiteStats, StatsRequest};
use crate::model::arch::Block;
use crate::model::layer::{LayerWeights, Site};
use crate::model::llama::{Act, Inner, Rope};
use crate::model::ModelConfig;
use anyhow::Result;
use std::collections::BTreeMap;

/// One site's contribution from one batch run side by side: its rows (when a statistic other
/// than the Hessian needs them) and its XᵀX.
struct SiteRows {
    site: Site,
    rows: usize,
    d: usize,
    v: Vec<f32>,
    xtx: Option<Vec<f32>>,
}

/// Statistics of `layer` on `inputs` at the sites up to `until` (all four when `None`).
pub fn collect_stats(
    layer: &LayerWeights,
    cfg: &ModelConfig,
    inputs: &[Act],
    rope: &Rope,
    req: StatsRequest,
    until: Option<Site>,
) -> Result<BTreeMap<Site, SiteStats>> {
    collect(layer, cfg, inputs, rope, req, until, None, false).map(|(s, _)| s)
}

/// Statistics by site.
type SiteStatsMap = BTreeMap<Site, SiteStats>;

/// [`collect_stats`], continuing each batch from `from` (kept activations inside the layer:
/// the sites up to theirs are not seen again), and keeping the activations at `until` when
/// `keep` (returned when the layer ran on the CPU).
#[allow(clippy::too_many_arguments)]
pub(super) fn collect(
    layer: &LayerWeights,
    cfg: &ModelConfig,
    inputs: &[Act],
    rope: &Rope,
    req: StatsRequest,
    until: Option<Site>,
    from: Option<&[Inner]>,
    keep: bool,
) -> Result<(SiteStatsMap, Option<Vec<Inner>>)> {
    let cl = LayerRun::new(layer, cfg, inputs)?;
    let from = from.filter(|f| cl.resumable() && f.len() == inputs.len());
    let keep = keep && until.is_some() && cl.resumable();
    let mut kept: Vec<Inner> = Vec::new();
    let mut stats: BTreeMap<Site, SiteStats> = BTreeMap::new();
    // One batch after another, each site's rows go straight into the sums (XᵀX from the GPU
    // when the layer runs there). Side by side, each batch's rows (only when a statistic
    // other than the Hessian needs them) and XᵀX come back and are added in batch order: the
    // same sums in the same order, so the same bits.
    let side_by_side = cl.side_by_side(inputs, cfg);
    let rows_needed = req.act_absmax || req.act_mean_abs || req.col_norm;
    let stats_cell = std::sync::Mutex::new(&mut stats);
    cl.each_batch(
        inputs,
        side_by_side,
        |bi, x| {
            let mut part: Vec<SiteRows> = Vec::new();
            let mut hook = |site: Site,
                            v: &[f32],
                            rows: usize,
                            d: usize,
                            gram: Option<&[f32]>|
             -> Result<()> {
                if let Some(nf) = find_nonfinite(cfg.block(), layer.index, site, bi, v, rows, x, d)
                {
                    return Err(nf.into());
                }
                let own = match gram {
                    Some(_) => None,
                    None => req.hessian.then(|| crate::model::ops::gram(v, rows, d)),
                };
                if side_by_side {
                    part.push(SiteRows {
                        site,
                        rows,
                        d,
                        v: if rows_needed { v.to_vec() } else { Vec::new() },
                        xtx: own.or_else(|| gram.map(|g| g.to_vec())),
                    });
                } else {
                    let mut stats = stats_cell.lock().expect("statistics lock");
                    let st = stats.entry(site).or_insert_with(|| SiteStats::new(d, req));
                    st.add(v, rows, gram.or(own.as_deref()));
                }
                Ok(())
            };
            let grams = req.hessian && !side_by_side;
            let inner = cl.forward_stats(x, rope, &mut hook, grams, until, from.map(|f| &f[bi]))?;
            Ok((part, inner))
        },
        |(part, inner)| {
            let mut stats = stats_cell.lock().expect("statistics lock");
            for p in part {
                let st = stats
                    .entry(p.site)
                    .or_insert_with(|| SiteStats::new(p.d, req));
                if rows_needed {
                    st.add(&p.v, p.rows, p.xtx.as_deref());
                } else {
                    st.add_rows_with_gram(p.rows, p.xtx.as_deref());
                }
            }
            kept.extend(inner.filter(|_| keep));
            Ok(())
        },
    )?;
    let kept = (keep && kept.len() == inputs.len()).then_some(kept);
    Ok((stats, kept))
}

/// Activations of every calibration batch at one site inside a layer, with the weights they
/// went through: later statistics and the propagation continue from them instead of running
/// the layer from its input again, while those weights are unchanged. GPTQ's true-sequential
/// order (q/k/v, then o_proj, then gate/up, then down_proj, each on the inputs the compressed
/// linears before it give) then costs one forward of the layer instead of three and a half.
pub(super) struct Kept {
    pub(super) site: Site,
    /// The block's table (which linears come before `site`).
    block: &'static Block,
    /// The linears before `site` (the ones the activations went through) as they were.
    linears: BTreeMap<String, crate::model::layer::Linear>,
    norms: BTreeMap<String, Vec<u32>>,
    pub(super) states: Vec<Inner>,
}

/// The most activation bytes kept for one layer (beyond it the layer is run from its input,
/// as before).
const KEPT_MAX_BYTES: usize = 2 << 30;

impl Kept {
    pub(super) fn new(
        site: Site,
        block: &'static Block,
        layer: &LayerWeights,
        states: Vec<Inner>,
    ) -> Self {
        Kept {
            site,
            block,
            linears: Self::before(site, block, layer),
            norms: Self::norm_bits(layer),
            states,
        }
    }

    fn before(
        site: Site,
        block: &Block,
        layer: &LayerWeights,
    ) -> BTreeMap<String, crate::model::layer::Linear> {
        layer
            .linears
            .iter()
            .filter(|(name, _)| block.site_of(name).is_some_and(|s| s < site))
            .map(|(n, l)| (n.clone(), l.clone()))
            .collect()
    }

    fn norm_bits(layer: &LayerWeights) -> BTreeMap<String, Vec<u32>> {
        layer
            .norms
            .iter()
            .map(|(n, (v, _))| (n.clone(), v.iter().map(|x| x.to_bits()).collect()))
            .collect()
    }

    /// Whether the kept activations are what `layer` computes now up to `site`.
    pub(super) fn valid_for(&self, layer: &LayerWeights) -> bool {
        let now: Vec<(&String, &crate::model::layer::Linear)> = layer
            .linears
            .iter()
            .filter(|(name, _)| self.block.site_of(name).is_some_and(|s| s < self.site))
            .collect();
        now.len() == self.linears.len()
            && now
                .iter()
                .all(|(name, l)| self.linears.get(*name).is_some_and(|k| k.same_forward(l)))
            && Self::norm_bits(layer) == self.norms
    }

    /// Whether keeping the activations at `site` for `inputs` fits [`KEPT_MAX_BYTES`].
    pub(super) fn fits(site: Site, inputs: &[Act], cfg: &ModelConfig) -> bool {
        let rows: usize = inputs.iter().map(|a| a.rows()).sum();
        // the site's rows, and the residual stream once the first part is done
        let block = cfg.block();
        let d = block.site(site);
        let residual = if d.part == block.sites[0].part {
            0
        } else {
            cfg.hidden_size
        };
        let width = cfg.dim(d.width) + residual;
        4 * rows * width <= KEPT_MAX_BYTES
    }
}
