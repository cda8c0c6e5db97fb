//! The pass API: what a pass is ([`Pass`]), what it records ([`LinearRecord`]), keeps across
//! layers ([`PassState`]) and is handed for one layer ([`LayerCtx`]); apart from the run loop.

use super::collect::{collect, collect_stats, Kept};
use super::layer_run::LayerRun;
use super::stats::{SiteStats, StatsRequest};
use crate::model::layer::{LayerWeights, Site};
use crate::model::llama::{Act, DecoderLayer, Part, Rope};
use crate::model::ModelConfig;
use anyhow::{bail, Context, Result};
use ndarray::Array2;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What one pass recorded about one linear (feeds the report's per-layer tables).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinearRecord {
    pub layer: usize,
    pub linear: String,
    pub pass: String,
    /// Relative output reconstruction error ‖(W−Ŵ)X‖² / ‖WX‖² on the calibration inputs.
    pub rel_output_error: Option<f64>,
    /// Method-specific loss (GPTQ: Σ ((w−q)/[H⁻¹]_jj)²).
    pub loss: Option<f64>,
    pub seconds: f64,
    /// Extra facts (damping used, bits, …).
    pub notes: BTreeMap<String, serde_json::Value>,
}

impl LinearRecord {
    /// The record of `linear` of `layer` by `pass`, timed from `started`; errors, loss and notes
    /// are added with the builder methods.
    pub fn new(layer: usize, linear: &str, pass: &str, started: std::time::Instant) -> Self {
        LinearRecord {
            layer,
            linear: linear.to_string(),
            pass: pass.to_string(),
            rel_output_error: None,
            loss: None,
            seconds: started.elapsed().as_secs_f64(),
            notes: BTreeMap::new(),
        }
    }

    pub fn error(mut self, rel_output_error: f64) -> Self {
        self.rel_output_error = Some(rel_output_error);
        self
    }

    pub fn loss(mut self, loss: f64) -> Self {
        self.loss = Some(loss);
        self
    }

    pub fn notes(mut self, notes: BTreeMap<String, serde_json::Value>) -> Self {
        self.notes = notes;
        self
    }

    /// Seconds when not the time since `started` (a share of work done for several linears).
    pub fn seconds(mut self, seconds: f64) -> Self {
        self.seconds = seconds;
        self
    }
}

/// What a pass keeps from one layer to the next (a running statistic, a budget left), as the
/// engine holds it: one per pass, in pipeline order. A pass reads its own with
/// [`LayerCtx::state`] and replaces it with [`LayerCtx::set_state`]; a layer whose passes fail
/// leaves every state as it was. After each layer the engine hands the states to the sink with
/// the live streams, and the resume checkpoint (`.resume/state.json`) saves them with the layer
/// and gives them back to a resumed run (JSON; floats round-trip exactly).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PassState {
    /// The pass's name (a resumed run checks it against its passes).
    pub pass: String,
    /// What the pass stored; `None` until it stores something.
    pub value: Option<serde_json::Value>,
}

/// A compression method. One implementation per file in `passes/`; it reads the layer's
/// linears and the statistics it asked for, and changes weights (and, for quantizers,
/// attaches the integer codes the exporter packs). It never touches files.
pub trait Pass: Send + Sync {
    /// Short name for logs and the report, e.g. `gptq`.
    fn name(&self) -> String;
    /// Statistics the pass needs, collected on the layer's current weights before `apply`.
    fn stats(&self) -> StatsRequest;
    /// Compress one decoder layer in place. State kept across layers goes through
    /// [`LayerCtx::state`] / [`LayerCtx::set_state`] (so that resume restores it), never
    /// through the pass object.
    fn apply(&self, ctx: &mut LayerCtx) -> Result<()>;
}

/// A decoder layer handed to the passes, with lazy access to calibration statistics.
pub struct LayerCtx<'a> {
    pub layer: LayerWeights,
    pub config: &'a ModelConfig,
    pub(super) inputs: &'a [Act],
    /// The dense model's hidden states at this layer's input and output (empty unless some
    /// pass asked for `teacher`).
    pub(super) teacher_in: &'a [Act],
    pub(super) teacher_out: &'a [Act],
    /// The layer as the checkpoint holds it (the teacher's weights; with the teacher stream).
    pub(super) teacher_layer: Option<&'a LayerWeights>,
    pub(super) rope: Option<&'a Rope>,
    pub(super) request: StatsRequest,
    pub(super) stats: BTreeMap<Site, SiteStats>,
    pub(super) fresh: bool,
    /// The running pass's state (see [`PassState`]).
    pub(super) pass_state: Option<serde_json::Value>,
    /// The layer before the previous pass changed it (kept when a pass asks for `previous`).
    pub(super) previous: Option<LayerWeights>,
    /// Calibration activations inside the layer from the last statistics collected.
    pub(super) kept: Option<Kept>,
    pub records: Vec<LinearRecord>,
    pub warnings: Vec<String>,
}

impl<'a> LayerCtx<'a> {
    pub fn index(&self) -> usize {
        self.layer.index
    }

    /// Full module name of a linear, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn module_name(&self, linear: &str) -> String {
        format!("{}{linear}", LayerWeights::prefix(self.layer.index))
    }

    /// Statistics of `site` on the current weights. When stale, the layer is re-run on the
    /// calibration inputs only as far as `site` (its statistics need nothing later), so
    /// "true sequential" quantization costs partial forwards, not full ones.
    pub fn stats(&mut self, site: Site) -> Result<&SiteStats> {
        if !self.fresh {
            self.stats.clear();
            self.fresh = true;
        }
        if !self.stats.contains_key(&site) {
            let rope = self
                .rope
                .context("a pass asked for statistics but no calibration data was given")?;
            // continue from activations kept at an earlier site while the weights they went
            // through are unchanged (bit for bit what running from the input gives)
            let from = self
                .kept
                .as_ref()
                .filter(|k| k.site < site && k.valid_for(&self.layer))
                .map(|k| &k.states[..]);
            // (the first site needs nothing kept: the layer input is already at hand)
            let first = self.config.block().sites[0].site;
            let keep = site != first && Kept::fits(site, self.inputs, self.config);
            let (st, kept) = collect(
                &self.layer,
                self.config,
                self.inputs,
                rope,
                self.request,
                Some(site),
                from,
                keep,
            )?;
            if let Some(states) = kept {
                self.kept = Some(Kept::new(site, self.config.block(), &self.layer, states));
            }
            self.stats.extend(st);
        }
        self.stats.get(&site).with_context(|| {
            format!(
                "statistics of {} were not collected",
                self.config.block().site(site).name
            )
        })
    }

    /// Collect statistics at every site in one forward over the calibration inputs, with the
    /// current weights (for passes that quantize all linears from the original inputs).
    pub fn refresh(&mut self) -> Result<()> {
        let rope = self
            .rope
            .context("a pass asked for statistics but no calibration data was given")?;
        self.stats = collect_stats(
            &self.layer,
            self.config,
            self.inputs,
            rope,
            self.request,
            None,
        )?;
        self.fresh = true;
        Ok(())
    }

    /// The RoPE tables of the calibration forwards (for passes that run their own forward).
    pub fn rope(&self) -> Result<&'a Rope> {
        self.rope
            .context("a pass asked for the calibration forward but no calibration data was given")
    }

    /// The calibration hidden states at this layer's input, as the compressed model so far
    /// produces them (the student stream).
    pub fn inputs(&self) -> &[Act] {
        self.inputs
    }

    /// The teacher stream: the dense model's hidden states at this layer's (input, output),
    /// batch by batch like [`LayerCtx::inputs`]. Requires `StatsRequest::teacher`.
    pub fn teacher(&self) -> Result<(&[Act], &[Act])> {
        if self.teacher_in.is_empty() && !self.inputs.is_empty() {
            bail!("the teacher stream was not requested (StatsRequest::teacher)");
        }
        Ok((self.teacher_in, self.teacher_out))
    }

    /// The layer as the checkpoint holds it: the teacher's weights. Requires
    /// `StatsRequest::teacher`.
    pub fn teacher_layer(&self) -> Result<&LayerWeights> {
        self.teacher_layer
            .context("the teacher stream was not requested (StatsRequest::teacher)")
    }

    /// The asymmetry statistic at each of `sites` (GPTAQ's ΔX·Xᵀ, scaled like the Hessian):
    /// D = 2/n · Σ_t (x̃_t − x_t) x_tᵀ  [d, d], where x̃_t is the site's input in the dense
    /// layer on the teacher stream and x_t its input in the current layer on the student
    /// stream, token by token over the calibration set (one forward of each per batch). Zero
    /// at the first layer (both streams are the embeddings) until a pass changes weights
    /// upstream of the site. Requires `StatsRequest::teacher`.
    pub fn asymmetry(&self, sites: &[Site]) -> Result<BTreeMap<Site, Array2<f64>>> {
        let rope = self.rope.context(
            "a pass asked for the asymmetry statistic but no calibration data was given",
        )?;
        let dense = self.teacher_layer()?;
        let student = LayerRun::new(&self.layer, self.config, self.inputs)?;
        let teacher = LayerRun::new(dense, self.config, self.teacher_in)?;
        // stop after the last requested site (in forward order)
        let stop = sites.iter().max().copied();
        let mut sums: BTreeMap<Site, Array2<f64>> = BTreeMap::new();
        let mut n = 0usize;
        for (x, xt) in self.inputs.iter().zip(self.teacher_in) {
            let grab = |run: &LayerRun, a: &Act| -> Result<BTreeMap<Site, (Vec<f32>, usize)>> {
                let mut got = BTreeMap::new();
                let mut hook = |s: Site, v: &[f32], _rows: usize, d: usize| -> Result<()> {
                    if sites.contains(&s) {
                        got.insert(s, (v.to_vec(), d));
                    }
                    Ok(())
                };
                run.forward_until(a, rope, &mut hook, stop)?;
                Ok(got)
            };
            let (gs, gt) = (grab(&student, x)?, grab(&teacher, xt)?);
            n += x.b * x.t;
            for &site in sites {
                let ((xs, d), (xt, _)) = match (gs.get(&site), gt.get(&site)) {
                    (Some(a), Some(b)) => (a, b),
                    _ => bail!("no input seen at {}", self.config.block().site(site).name),
                };
                if xs.len() != xt.len() {
                    bail!("internal: teacher and student batches differ in shape");
                }
                let rows = xs.len() / d;
                let diff: Vec<f32> = xt.iter().zip(xs).map(|(a, b)| a - b).collect();
                let prod = crate::model::ops::cross(&diff, xs, rows, *d);
                let acc = sums.entry(site).or_insert_with(|| Array2::zeros((*d, *d)));
                acc.iter_mut().zip(&prod).for_each(|(a, v)| *a += *v as f64);
            }
        }
        let scale = 2.0 / n.max(1) as f64;
        Ok(sums.into_iter().map(|(s, m)| (s, m * scale)).collect())
    }

    /// The raw inputs at `site` on the current weights: per calibration batch, the rows
    /// [tokens, d] row-major, keeping at most `max_rows` rows in all (the first ones; `None`
    /// keeps every row).
    pub fn site_inputs(
        &self,
        site: Site,
        max_rows: Option<usize>,
    ) -> Result<Vec<(Vec<f32>, usize)>> {
        let rope = self
            .rope
            .context("a pass asked for site inputs but no calibration data was given")?;
        let cl = LayerRun::new(&self.layer, self.config, self.inputs)?;
        let mut out = Vec::new();
        let mut left = max_rows.unwrap_or(usize::MAX);
        for x in self.inputs {
            if left == 0 {
                break;
            }
            let mut hook = |s: Site, v: &[f32], rows: usize, d: usize| -> Result<()> {
                if s == site {
                    let n = rows.min(left);
                    out.push((v[..n * d].to_vec(), d));
                    left -= n;
                }
                Ok(())
            };
            cl.forward_until(x, rope, &mut hook, Some(site))?;
        }
        Ok(out)
    }

    /// The output of the whole decoder block with `candidate` weights on the calibration
    /// inputs (one `Act` per batch): what a search over candidate weights (AWQ's scales, a
    /// distillation step) compares against [`LayerCtx::teacher`] or the current layer's output.
    pub fn block_output(&self, candidate: &LayerWeights) -> Result<Vec<Act>> {
        let rope = self
            .rope
            .context("a pass asked for block outputs but no calibration data was given")?;
        let cl = LayerRun::new(candidate, self.config, self.inputs)?;
        cl.forward_all(self.inputs, self.config, rope)
    }

    /// The (normed) input of a sub-block on the current weights, one `Act` per calibration
    /// batch: input_layernorm's output for [`Part::Attention`], post_attention_layernorm's for
    /// [`Part::Mlp`]. Feed it to [`LayerCtx::part_output`] with candidate weights.
    pub fn part_inputs(&self, part: Part) -> Result<Vec<Act>> {
        let site = self.config.block().part_input(part);
        let rows = self.site_inputs(site, None)?;
        Ok(rows
            .into_iter()
            .zip(self.inputs)
            .map(|((data, _), x)| Act {
                data,
                b: x.b,
                t: x.t,
            })
            .collect())
    }

    /// The output of a sub-block of `candidate` (before the residual add) on `inputs` from
    /// [`LayerCtx::part_inputs`]: what AWQ's scale search compares between candidates.
    pub fn part_output(
        &self,
        candidate: &LayerWeights,
        part: Part,
        inputs: &[Act],
    ) -> Result<Vec<Vec<f32>>> {
        let rope = self
            .rope
            .context("a pass asked for sub-block outputs but no calibration data was given")?;
        let cl = DecoderLayer::new(candidate, self.config);
        inputs.iter().map(|h| cl.part(part, h, rope)).collect()
    }

    /// The state the running pass stored at an earlier layer with [`LayerCtx::set_state`]
    /// (`None` at its first layer, or if it never stored one).
    pub fn state<T: serde::de::DeserializeOwned>(&self) -> Result<Option<T>> {
        self.pass_state
            .as_ref()
            .map(|v| {
                serde_json::from_value(v.clone())
                    .context("internal: a pass's state does not read back as its type")
            })
            .transpose()
    }

    /// Keep `value` for the running pass's next layers. It is saved with the layer in the
    /// resume checkpoint, so it must survive JSON unchanged (refused otherwise: NaN or ±Inf).
    pub fn set_state<T>(&mut self, value: &T) -> Result<()>
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq,
    {
        let v = serde_json::to_value(value)?;
        let back: Option<T> = serde_json::from_value(v.clone()).ok();
        if back.as_ref() != Some(value) {
            bail!(
                "layer {}: a pass's state does not survive the resume checkpoint unchanged (non-finite number?)",
                self.layer.index
            );
        }
        self.pass_state = Some(v);
        Ok(())
    }

    /// The layer as it was before the pass that ran just before this one (requires
    /// `StatsRequest::previous`): what a compensating pass (EoRA) measures that pass's error
    /// against.
    pub fn previous(&self) -> Result<&LayerWeights> {
        self.previous.as_ref().context(
            "no previous pass ran on this layer (put the compensating pass after a pass that changes the weights)",
        )
    }

    /// Call after changing weights so the next `stats` call recollects.
    pub fn invalidate(&mut self) {
        self.fresh = false;
    }

    pub fn warn(&mut self, msg: String) {
        crate::info!("warning: {msg}");
        self.warnings.push(msg);
    }

    /// The warning of a Hessian method whose Cholesky factorization needed more dampening than
    /// asked (GPTQ's step-up policy: ×10 until it succeeds), so the report says so.
    pub fn warn_damp(&mut self, module: &str, asked: f64, used: f64) {
        if used != asked {
            self.warn(format!(
                "{module}: Cholesky failed with damp {asked}, succeeded with damp {used}"
            ));
        }
    }
}
