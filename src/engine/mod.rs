//! The layer stream: calibration tokens → embeddings → for each
//! decoder layer: load it, run it on the stored hidden states X_i while hooks collect the
//! statistics its passes asked for, hand it to the passes, re-run the compressed layer to get
//! X_{i+1} (so later layers see earlier errors), give it to the exporter, drop it.
//! Peak memory ≈ one layer + the hidden-state buffers. The engine is the only place that knows
//! the order of work.

pub mod stats;

use crate::model::layer::{LayerWeights, Site};
use crate::model::llama::{Act, DecoderLayer, Inner, Outer, Part, Rope, Step};
use crate::model::{Checkpoint, ModelConfig};
use anyhow::{bail, Context, Result};
use ndarray::Array2;
use serde::{Deserialize, Serialize};
use stats::{SiteStats, StatsRequest};
use std::collections::BTreeMap;
use std::time::Instant;

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

/// How the engine runs: forward batch size and the non-finite policy.
#[derive(Clone, Copy, Debug)]
pub struct StreamOptions {
    /// Calibration windows per forward batch.
    pub batch: usize,
    pub on_nonfinite: NonFinitePolicy,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            batch: 8,
            on_nonfinite: NonFinitePolicy::Error,
        }
    }
}

/// Non-finite calibration activations found at a linear's input. `samples` are positions in
/// the batch `batch` of the engine's inputs.
#[derive(Debug, Clone)]
pub struct NonFinite {
    pub layer: usize,
    pub site: Site,
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
            self.site.linears().join("`, `"),
            self.value,
            self.token,
        )
    }
}

impl std::error::Error for NonFinite {}

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
    inputs: &'a [Act],
    /// The dense model's hidden states at this layer's input and output (empty unless some
    /// pass asked for `teacher`).
    teacher_in: &'a [Act],
    teacher_out: &'a [Act],
    /// The layer as the checkpoint holds it (the teacher's weights; with the teacher stream).
    teacher_layer: Option<&'a LayerWeights>,
    rope: Option<&'a Rope>,
    request: StatsRequest,
    stats: BTreeMap<Site, SiteStats>,
    fresh: bool,
    /// The running pass's state (see [`PassState`]).
    pass_state: Option<serde_json::Value>,
    /// The layer before the previous pass changed it (kept when a pass asks for `previous`).
    previous: Option<LayerWeights>,
    /// Calibration activations inside the layer from the last statistics collected.
    kept: Option<Kept>,
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
            let keep = site != Site::AttnIn && Kept::fits(site, self.inputs, self.config);
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
                self.kept = Some(Kept::new(site, &self.layer, states));
            }
            self.stats.extend(st);
        }
        self.stats
            .get(&site)
            .with_context(|| format!("statistics of {} were not collected", site.name()))
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
        let stop = Site::ALL.iter().rev().find(|s| sites.contains(s)).copied();
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
                    _ => bail!("no input seen at {}", site.name()),
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
        let site = match part {
            Part::Attention => Site::AttnIn,
            Part::Mlp => Site::MlpIn,
        };
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

/// Batches in flight per thread when they run side by side (bounds the rows held at once).
const SIDE_BY_SIDE_GROUP: usize = 4;

/// The largest batch (rows × the layer's widest dimension) that runs side by side: on the
/// reference model (widths 256/768), peer calibration (one document per batch, ≤ 512 tokens)
/// took 9.4–10.3 s side by side against 13.1–15.9 s with threaded GEMMs, and 8 × 512-token
/// batches 13.6 s against 15.8–16.8 s, the same bytes written.
const SIDE_BY_SIDE_MAX_CELLS: usize = 1 << 22;
/// Layers wider than this never run side by side: each batch in flight holds its own XᵀX per
/// site (widest² floats), and their products are large enough to split well.
const SIDE_BY_SIDE_MAX_WIDTH: usize = 2048;

/// The decoder layer as the engine runs it: on the active GPU when there is one (the layer's
/// weights uploaded once; each batch's hidden states go up, the site inputs the hooks see and
/// the output come back), else on the CPU. Both compute the same function (`tests/cuda.rs`).
/// Layers whose linears quantize their inputs (W8A8) run on the CPU.
struct LayerRun<'a> {
    cpu: DecoderLayer<'a>,
    #[cfg(feature = "cuda")]
    gpu: Option<(
        crate::backend::cuda_layer::GpuLayer,
        crate::backend::cuda_layer::GpuRope,
    )>,
}

impl<'a> LayerRun<'a> {
    fn new(layer: &'a LayerWeights, cfg: &'a ModelConfig, inputs: &[Act]) -> Result<Self> {
        #[cfg(feature = "cuda")]
        let gpu = {
            use crate::backend::cuda_layer::{GpuLayer, GpuRope};
            let max_t = inputs.iter().map(|a| a.t).max().unwrap_or(1);
            if layer.linears.values().all(|l| l.act_quant().is_none()) && !inputs.is_empty() {
                crate::backend::with_gpu(|g| -> Result<_> {
                    Ok((
                        GpuLayer::upload(g, layer, cfg)?,
                        GpuRope::new(g, cfg, max_t)?,
                    ))
                })
                .transpose()?
            } else {
                None
            }
        };
        #[cfg(not(feature = "cuda"))]
        let _ = inputs;
        Ok(LayerRun {
            cpu: DecoderLayer::new(layer, cfg),
            #[cfg(feature = "cuda")]
            gpu,
        })
    }

    fn forward_until(
        &self,
        x: &Act,
        rope: &Rope,
        hook: &mut crate::model::llama::Hook,
        stop: Option<Site>,
    ) -> Result<Option<Act>> {
        #[cfg(feature = "cuda")]
        if let Some((gl, gr)) = &self.gpu {
            if let Some(r) = crate::backend::with_gpu(|g| {
                gl.forward_hooked(g, &x.data, x.b, x.t, gr, hook, stop)
            }) {
                return Ok(r?.map(|data| Act {
                    data,
                    b: x.b,
                    t: x.t,
                }));
            }
        }
        self.cpu.forward_until(x, rope, hook, stop)
    }

    /// The statistics forward: `hook` gets each site's rows and, when `grams`, their XᵀX —
    /// computed on the GPU when the layer runs there, else `None` (the caller computes it).
    fn forward_stats(
        &self,
        x: &Act,
        rope: &Rope,
        hook: &mut crate::model::llama::StatsHook,
        grams: bool,
        stop: Option<Site>,
        from: Option<&Inner>,
    ) -> Result<Option<Inner>> {
        #[cfg(feature = "cuda")]
        if let (Some((gl, gr)), None) = (&self.gpu, from) {
            if let Some(r) = crate::backend::with_gpu(|g| {
                gl.forward_with_grams(g, &x.data, x.b, x.t, gr, hook, grams, stop)
            }) {
                return r.map(|_| None);
            }
        }
        let _ = grams;
        let mut h = |site: Site, v: &[f32], rows: usize, d: usize| hook(site, v, rows, d, None);
        Ok(match self.cpu.forward_from(x, from, rope, &mut h, stop)? {
            Step::Stopped(inner) => Some(inner),
            Step::Done(_) => None,
        })
    }

    /// Whether activations inside the layer can be kept and continued from (on the CPU; the
    /// GPU path computes its own and they never mix).
    fn resumable(&self) -> bool {
        #[cfg(feature = "cuda")]
        if self.gpu.is_some() {
            return false;
        }
        true
    }

    /// Whether the calibration batches run side by side, one per thread with single-threaded
    /// GEMMs ([`crate::model::ops::single_threaded`]): on the CPU, for batches small enough
    /// that splitting each product over the threads costs more in synchronization than it
    /// gains (documents-mode calibration gives a batch per document, a few hundred tokens).
    fn side_by_side(&self, inputs: &[Act], cfg: &ModelConfig) -> bool {
        #[cfg(feature = "cuda")]
        if self.gpu.is_some() {
            return false;
        }
        let widest = cfg.hidden_size.max(cfg.intermediate_size);
        let rows = inputs.iter().map(|a| a.rows()).max().unwrap_or(0);
        inputs.len() > 1
            && rayon::current_num_threads() > 1
            && widest <= SIDE_BY_SIDE_MAX_WIDTH
            && rows * widest <= SIDE_BY_SIDE_MAX_CELLS
    }

    /// `f` on every batch (its index, the batch), each result handed to `sink` in batch order.
    /// Side by side when `side_by_side` ([`Self::side_by_side`]): groups of
    /// [`SIDE_BY_SIDE_GROUP`] batches per thread, each batch's GEMMs on its own thread, a
    /// group's results sunk before the next group starts (bounding what is held); the first
    /// error in batch order is returned. Otherwise one batch after another.
    fn each_batch<T: Send>(
        &self,
        inputs: &[Act],
        side_by_side: bool,
        f: impl Fn(usize, &Act) -> Result<T> + Sync,
        mut sink: impl FnMut(T) -> Result<()>,
    ) -> Result<()>
    where
        Self: Sync,
    {
        use rayon::prelude::*;
        if !side_by_side {
            for (bi, x) in inputs.iter().enumerate() {
                sink(f(bi, x)?)?;
            }
            return Ok(());
        }
        let per_group = SIDE_BY_SIDE_GROUP * rayon::current_num_threads();
        for (g, group) in inputs.chunks(per_group).enumerate() {
            let out: Vec<Result<T>> = group
                .par_iter()
                .enumerate()
                .with_max_len(1)
                .map(|(j, x)| crate::model::ops::single_threaded(|| f(g * per_group + j, x)))
                .collect();
            for r in out {
                sink(r?)?;
            }
        }
        Ok(())
    }

    /// The layer's output on every batch, in order (side by side for small batches).
    fn forward_all(&self, inputs: &[Act], cfg: &ModelConfig, rope: &Rope) -> Result<Vec<Act>> {
        self.forward_all_from(inputs, cfg, rope, None)
    }

    /// As [`Self::forward_all`], continuing each batch from its kept activations when given
    /// (one per batch, from [`Kept`] checked against the layer).
    fn forward_all_from(
        &self,
        inputs: &[Act],
        cfg: &ModelConfig,
        rope: &Rope,
        from: Option<&[Inner]>,
    ) -> Result<Vec<Act>> {
        let one = |j: usize, x: &Act| -> Result<Act> {
            match from {
                Some(f) if self.resumable() => {
                    let mut no_hook = |_: Site, _: &[f32], _: usize, _: usize| Ok(());
                    match self
                        .cpu
                        .forward_from(x, Some(&f[j]), rope, &mut no_hook, None)?
                    {
                        Step::Done(y) => Ok(y),
                        Step::Stopped(_) => bail!("forward stopped early"),
                    }
                }
                _ => self.forward(x, rope),
            }
        };
        let mut out = Vec::with_capacity(inputs.len());
        self.each_batch(inputs, self.side_by_side(inputs, cfg), one, |y| {
            out.push(y);
            Ok(())
        })?;
        Ok(out)
    }

    fn forward(&self, x: &Act, rope: &Rope) -> Result<Act> {
        // on the GPU without a hook: no site input comes back to the host
        #[cfg(feature = "cuda")]
        if let Some((gl, gr)) = &self.gpu {
            if let Some(r) = crate::backend::with_gpu(|g| gl.forward(g, &x.data, x.b, x.t, gr)) {
                return Ok(Act {
                    data: r?,
                    b: x.b,
                    t: x.t,
                });
            }
        }
        let mut no_hook = |_: Site, _: &[f32], _: usize, _: usize| Ok(());
        self.forward_until(x, rope, &mut no_hook, None)?
            .context("forward stopped early")
    }
}

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
fn collect(
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
                if let Some(nf) = find_nonfinite(layer.index, site, bi, v, x.t, d) {
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
struct Kept {
    site: Site,
    /// The linears before `site` (the ones the activations went through) as they were.
    linears: BTreeMap<String, crate::model::layer::Linear>,
    norms: BTreeMap<String, Vec<u32>>,
    states: Vec<Inner>,
}

/// The most activation bytes kept for one layer (beyond it the layer is run from its input,
/// as before).
const KEPT_MAX_BYTES: usize = 2 << 30;

impl Kept {
    fn new(site: Site, layer: &LayerWeights, states: Vec<Inner>) -> Self {
        Kept {
            site,
            linears: Self::before(site, layer),
            norms: Self::norm_bits(layer),
            states,
        }
    }

    fn before(site: Site, layer: &LayerWeights) -> BTreeMap<String, crate::model::layer::Linear> {
        layer
            .linears
            .iter()
            .filter(|(name, _)| Site::of(name) < site)
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
    fn valid_for(&self, layer: &LayerWeights) -> bool {
        let now: Vec<(&String, &crate::model::layer::Linear)> = layer
            .linears
            .iter()
            .filter(|(name, _)| Site::of(name) < self.site)
            .collect();
        now.len() == self.linears.len()
            && now
                .iter()
                .all(|(name, l)| self.linears.get(*name).is_some_and(|k| k.same_forward(l)))
            && Self::norm_bits(layer) == self.norms
    }

    /// Whether keeping the activations at `site` for `inputs` fits [`KEPT_MAX_BYTES`].
    fn fits(site: Site, inputs: &[Act], cfg: &ModelConfig) -> bool {
        let rows: usize = inputs.iter().map(|a| a.rows()).sum();
        let width = match site {
            Site::AttnIn => cfg.hidden_size,
            Site::OIn => cfg.num_heads * cfg.head_dim,
            Site::MlpIn => 2 * cfg.hidden_size,
            Site::DownIn => cfg.hidden_size + cfg.intermediate_size,
        };
        4 * rows * width <= KEPT_MAX_BYTES
    }
}

/// The samples of one batch ([b·t, d] rows) holding a NaN or ±Inf, or None when all is finite.
fn find_nonfinite(
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
        batch,
        samples,
        value: v[first],
        token: (first / d) % t,
    })
}

/// Every calibration sample whose activations at any linear input of `layer` (on its current
/// weights) are not finite: (batch, sample-in-batch) pairs, and the first site where each was seen.
fn screen_nonfinite(
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
            if let Some(nf) = find_nonfinite(layer.index, site, bi, v, x.t, d) {
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
fn drop_samples(hidden: &mut Vec<Act>, ids: &mut Vec<Vec<usize>>, bad: &[(usize, usize)]) {
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

/// Calibration windows grouped into forward batches of up to `batch` consecutive windows of
/// equal length (documents mode gives windows of different lengths; no padding is ever needed).
fn batch_ranges(calib: &[Vec<u32>], batch: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < calib.len() {
        let t = calib[i].len();
        let mut j = i + 1;
        while j < calib.len() && j - i < batch.max(1) && calib[j].len() == t {
            j += 1;
        }
        out.push(i..j);
        i = j;
    }
    out
}

/// What the engine measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EngineReport {
    pub records: Vec<LinearRecord>,
    pub warnings: Vec<String>,
    pub calibration_seconds: f64,
    pub layer_seconds: Vec<f64>,
    /// Fraction of exactly-zero weights in the decoder-layer linears as written.
    pub sparsity: Option<f64>,
    /// Running counts behind `sparsity` (kept for resuming).
    pub zeros: usize,
    pub numel: usize,
    /// Storage bytes of the decoder-layer linears as each representation counts them.
    #[serde(default)]
    pub linear_bytes: usize,
    /// Calibration windows left out (`on_nonfinite: drop_sample`), by index, in order.
    #[serde(default)]
    pub dropped_samples: Vec<usize>,
}

/// Where a resumed run continues: the first layer still to do and its input hidden states.
pub struct ResumePoint {
    pub next_layer: usize,
    pub hidden: Vec<Act>,
    /// The teacher stream at `next_layer`'s input (empty when no pass asks for it).
    pub teacher: Vec<Act>,
    /// Each pass's state after the last finished layer (empty: every pass starts afresh).
    pub pass_states: Vec<PassState>,
    pub report: EngineReport,
}

/// What a restart after layer `l` needs besides the written tensors: the streams at the input
/// of layer `l + 1` and the passes' states.
pub struct Carry<'a> {
    /// The calibration hidden states (empty after the last layer, or when no pass needs
    /// statistics).
    pub hidden: &'a [Act],
    /// The dense model's hidden states (empty unless a pass asked for the teacher stream).
    pub teacher: &'a [Act],
    /// One per pass, in pipeline order.
    pub pass_states: &'a [PassState],
}

/// Receives each finished layer, then the parts outside the layers (an exporter).
pub trait LayerSink {
    fn layer(&mut self, ckpt: &Checkpoint, layer: &LayerWeights) -> Result<()>;
    /// Layer `l` is complete; `carry` is what layer `l + 1` starts from. A resumable sink
    /// persists it.
    fn layer_done(&mut self, _l: usize, _carry: &Carry, _report: &EngineReport) -> Result<()> {
        Ok(())
    }
}

/// Stream the checkpoint through `passes`, layer by layer. `calib` holds token windows
/// (all of one length); it may be empty when no pass needs statistics.
pub fn run(
    ckpt: &Checkpoint,
    passes: &[Box<dyn Pass>],
    calib: &[Vec<u32>],
    opts: &StreamOptions,
    sink: &mut dyn LayerSink,
    resume: Option<ResumePoint>,
) -> Result<EngineReport> {
    let cfg = &ckpt.config;
    let (start, mut report, resumed_hidden, resumed_teacher, resumed_states) = match resume {
        Some(r) => (
            r.next_layer,
            r.report,
            Some(r.hidden),
            Some(r.teacher),
            r.pass_states,
        ),
        None => (0, EngineReport::default(), None, None, Vec::new()),
    };
    let mut states: Vec<PassState> = if resumed_states.is_empty() {
        passes
            .iter()
            .map(|p| PassState {
                pass: p.name(),
                value: None,
            })
            .collect()
    } else {
        resumed_states
    };
    if states.len() != passes.len() || states.iter().zip(passes).any(|(s, p)| s.pass != p.name()) {
        bail!("resume state holds the states of other passes than this pipeline's; start again without --resume");
    }
    let request = passes
        .iter()
        .fold(StatsRequest::default(), |a, p| a.union(p.stats()));
    // Calibration forwards only when some pass needs statistics (RTN, say, needs none).
    let need_forward = passes.iter().any(|p| p.stats().any());
    let t0 = Instant::now();
    let ranges = batch_ranges(calib, opts.batch);
    // Window ids of each batch's samples (for messages), less those dropped earlier.
    let mut ids: Vec<Vec<usize>> = ranges
        .iter()
        .map(|r| {
            r.clone()
                .filter(|i| !report.dropped_samples.contains(i))
                .collect()
        })
        .filter(|v: &Vec<usize>| !v.is_empty())
        .collect();
    let (mut hidden, rope) = if need_forward {
        if calib.is_empty() {
            bail!("the pipeline has passes but no calibration data (`calibration.path`)");
        }
        let max_t = calib.iter().map(|w| w.len()).max().unwrap_or(1);
        if let Some(h) = resumed_hidden {
            let done = start >= cfg.num_layers;
            if !done && (h.len() != ids.len() || h.iter().zip(&ids).any(|(a, i)| a.b != i.len())) {
                bail!("resume state does not match the calibration batches; start again without --resume");
            }
            (h, Some(Rope::new(cfg, max_t)?))
        } else {
            let outer = Outer::load(ckpt)?;
            let mut h = Vec::new();
            for r in &ranges {
                let ids: Vec<u32> = calib[r.clone()].iter().flatten().copied().collect();
                h.push(outer.embed(&ids, r.len(), calib[r.start].len())?);
            }
            (h, Some(Rope::new(cfg, max_t)?))
        }
    } else {
        ids.clear();
        (Vec::new(), None)
    };
    // The teacher starts as the student does (the embeddings) and then runs the dense layers.
    let mut teacher: Vec<Act> = match (request.teacher, resumed_teacher) {
        (false, _) => Vec::new(),
        (true, Some(t)) if start > 0 => t,
        (true, _) => hidden.clone(),
    };
    if request.teacher && teacher.len() != hidden.len() {
        bail!(
            "resume state holds no teacher stream for this pipeline; start again without --resume"
        );
    }
    if start == 0 {
        report.calibration_seconds = t0.elapsed().as_secs_f64();
    }
    let pb = crate::progress::bar(cfg.num_layers as u64, "layers");
    pb.set_position(start as u64);
    for l in start..cfg.num_layers {
        let tl = Instant::now();
        // the dense layer on the teacher stream: the teacher's output of this layer
        let mut teacher_out: Vec<Act> = Vec::new();
        let dense = if request.teacher {
            Some(LayerWeights::load(ckpt, l)?)
        } else {
            None
        };
        if let Some(dense) = &dense {
            let rope = rope
                .as_ref()
                .context("teacher stream without calibration data")?;
            let cl = LayerRun::new(dense, cfg, &teacher)?;
            teacher_out = cl.forward_all(&teacher, cfg, rope)?;
        }
        let (layer, kept) = loop {
            let layer = LayerWeights::load(ckpt, l)?;
            if passes.is_empty() {
                break (layer, None);
            }
            // the states as this layer found them; committed only when every pass succeeded
            let mut layer_states = states.clone();
            let mut ctx = LayerCtx {
                layer,
                config: cfg,
                inputs: &hidden,
                teacher_in: &teacher,
                teacher_out: &teacher_out,
                teacher_layer: dense.as_ref(),
                rope: rope.as_ref(),
                request,
                stats: BTreeMap::new(),
                fresh: false,
                pass_state: None,
                previous: None,
                kept: None,
                records: Vec::new(),
                warnings: Vec::new(),
            };
            let mut result = Ok(());
            for (p, st) in passes.iter().zip(layer_states.iter_mut()) {
                pb.set_message(format!("layer {l} {}", p.name()));
                ctx.pass_state = st.value.take();
                let before = request.previous.then(|| ctx.layer.clone());
                result = p.apply(&mut ctx);
                st.value = ctx.pass_state.take();
                ctx.previous = before;
                if result.is_err() {
                    break;
                }
                ctx.invalidate();
            }
            match result {
                Ok(()) => {
                    states = layer_states;
                    report.records.append(&mut ctx.records);
                    report.warnings.append(&mut ctx.warnings);
                    break (ctx.layer, ctx.kept);
                }
                Err(e) => {
                    let Some(nf) = e.downcast_ref::<NonFinite>().cloned() else {
                        return Err(e);
                    };
                    let named: Vec<usize> = nf.samples.iter().map(|&s| ids[nf.batch][s]).collect();
                    if opts.on_nonfinite == NonFinitePolicy::Error {
                        bail!(
                            "{nf} in calibration window(s) {}; set `calibration.on_nonfinite: drop_sample` to leave such windows out",
                            list(&named)
                        );
                    }
                    // Find every affected sample on the original layer and the compressed
                    // one that failed, leave them all out, and compress the layer again.
                    let rope = rope
                        .as_ref()
                        .context("non-finite activations without calibration data")?;
                    let mut bad = screen_nonfinite(&ctx.layer, cfg, &hidden, rope)?;
                    let original = LayerWeights::load(ckpt, l)?;
                    bad.extend(screen_nonfinite(&original, cfg, &hidden, rope)?);
                    bad.push((nf.batch, nf.samples[0], nf.site));
                    let mut pairs: Vec<(usize, usize)> =
                        bad.iter().map(|&(b, s, _)| (b, s)).collect();
                    pairs.sort_unstable();
                    pairs.dedup();
                    let mut window: Vec<usize> = pairs.iter().map(|&(b, s)| ids[b][s]).collect();
                    window.sort_unstable();
                    let sites: std::collections::BTreeSet<&str> =
                        bad.iter().map(|&(_, _, s)| s.linears()[0]).collect();
                    if request.teacher {
                        drop_samples(&mut teacher, &mut ids.clone(), &pairs);
                        drop_samples(&mut teacher_out, &mut ids.clone(), &pairs);
                    }
                    drop_samples(&mut hidden, &mut ids, &pairs);
                    let remain: usize = ids.iter().map(|v| v.len()).sum();
                    let msg = format!(
                        "layer {l}: left out {} calibration sample(s) with non-finite activations at the input of {} (window(s) {}); {remain} remain",
                        window.len(),
                        sites.into_iter().collect::<Vec<_>>().join(", "),
                        list(&window)
                    );
                    crate::info!("warning: {msg}");
                    report.warnings.push(msg);
                    report.dropped_samples.extend(window);
                    report.dropped_samples.sort_unstable();
                    if remain == 0 {
                        bail!("layer {l}: every calibration sample has non-finite activations; nothing left to calibrate on");
                    }
                }
            }
        };
        // X_{i+1} = compressed layer (X_i); nothing reads the last layer's outputs.
        let last = l + 1 == cfg.num_layers;
        if let (Some(rope), false, false) = (rope.as_ref(), passes.is_empty(), last) {
            let cl = LayerRun::new(&layer, cfg, &hidden)?;
            let from = kept
                .as_ref()
                .filter(|k| k.valid_for(&layer))
                .map(|k| &k.states[..]);
            hidden = cl.forward_all_from(&hidden, cfg, rope, from)?;
        }
        for lin in layer.linears.values() {
            report.zeros += lin.weight().iter().filter(|&&v| v == 0.0).count();
            report.numel += lin.weight().len();
            report.linear_bytes += lin.bytes();
        }
        sink.layer(ckpt, &layer)?;
        drop(layer);
        ckpt.release_prefix(&LayerWeights::prefix(l));
        report.layer_seconds.push(tl.elapsed().as_secs_f64());
        if request.teacher {
            teacher = if last { Vec::new() } else { teacher_out };
        }
        let carry = Carry {
            hidden: if last { &[] } else { &hidden },
            teacher: &teacher,
            pass_states: &states,
        };
        sink.layer_done(l, &carry, &report)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    report.sparsity = (report.numel > 0).then(|| report.zeros as f64 / report.numel as f64);
    Ok(report)
}

/// "1, 2, 3" (at most 20 shown).
fn list(v: &[usize]) -> String {
    let mut s: Vec<String> = v.iter().take(20).map(|x| x.to_string()).collect();
    if v.len() > 20 {
        s.push(format!("… ({} in all)", v.len()));
    }
    s.join(", ")
}
