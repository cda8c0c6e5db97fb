//! The layer stream (DESIGN.md, "data flow"): calibration tokens → embeddings → for each
//! decoder layer: load it, run it on the stored hidden states X_i while hooks collect the
//! statistics its passes asked for, hand it to the passes, re-run the compressed layer to get
//! X_{i+1} (so later layers see earlier errors), give it to the exporter, drop it.
//! Peak memory ≈ one layer + the hidden-state buffers. The engine is the only place that knows
//! the order of work.

pub mod stats;

use crate::model::layer::{LayerWeights, Site};
use crate::model::llama::{Act, DecoderLayer, Outer, Rope};
use crate::model::{Checkpoint, ModelConfig};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use stats::{SiteStats, StatsRequest};
use std::collections::BTreeMap;
use std::time::Instant;

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

/// A compression method. One implementation per file in `passes/`; it reads the layer's
/// linears and the statistics it asked for, and changes weights (and, for quantizers,
/// attaches the integer codes the exporter packs). It never touches files.
pub trait Pass: Send + Sync {
    /// Short name for logs and the report, e.g. `gptq`.
    fn name(&self) -> String;
    /// Statistics the pass needs, collected on the layer's current weights before `apply`.
    fn stats(&self) -> StatsRequest;
    /// Compress one decoder layer in place.
    fn apply(&self, ctx: &mut LayerCtx) -> Result<()>;
}

/// A decoder layer handed to the passes, with lazy access to calibration statistics.
pub struct LayerCtx<'a> {
    pub layer: LayerWeights,
    pub config: &'a ModelConfig,
    inputs: &'a [Act],
    rope: Option<&'a Rope>,
    request: StatsRequest,
    stats: BTreeMap<Site, SiteStats>,
    fresh: bool,
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
            let st = collect_stats(
                &self.layer,
                self.config,
                self.inputs,
                rope,
                self.request,
                Some(site),
            )?;
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

    /// Call after changing weights so the next `stats` call recollects.
    pub fn invalidate(&mut self) {
        self.fresh = false;
    }

    pub fn warn(&mut self, msg: String) {
        crate::info!("warning: {msg}");
        self.warnings.push(msg);
    }
}

/// Run `layer` over every calibration batch, accumulating `req` at the input sites up to
/// `until` (all four when `None`).
pub fn collect_stats(
    layer: &LayerWeights,
    cfg: &ModelConfig,
    inputs: &[Act],
    rope: &Rope,
    req: StatsRequest,
    until: Option<Site>,
) -> Result<BTreeMap<Site, SiteStats>> {
    let cl = DecoderLayer::new(layer, cfg);
    let mut stats: BTreeMap<Site, SiteStats> = BTreeMap::new();
    for x in inputs {
        let mut hook = |site: Site, v: &[f32], rows: usize, d: usize| -> Result<()> {
            let st = stats.entry(site).or_insert_with(|| SiteStats::new(d, req));
            let xtx = req.hessian.then(|| crate::model::ops::gram(v, rows, d));
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                bail!(
                    "layer {}: calibration activation at input `{}` is not finite ({}) at row {}",
                    layer.index,
                    site.name(),
                    v[i],
                    i / d
                );
            }
            st.add(v, rows, xtx.as_deref());
            Ok(())
        };
        cl.forward_until(x, rope, &mut hook, until)?;
    }
    Ok(stats)
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
}

/// Where a resumed run continues: the first layer still to do and its input hidden states.
pub struct ResumePoint {
    pub next_layer: usize,
    pub hidden: Vec<Act>,
    pub report: EngineReport,
}

/// Receives each finished layer, then the parts outside the layers (an exporter).
pub trait LayerSink {
    fn layer(&mut self, ckpt: &Checkpoint, layer: &LayerWeights) -> Result<()>;
    /// Layer `l` is complete; `hidden` are the inputs of layer `l + 1` (empty when no pass
    /// needs statistics). A resumable sink persists what a restart needs here.
    fn layer_done(&mut self, _l: usize, _hidden: &[Act], _report: &EngineReport) -> Result<()> {
        Ok(())
    }
}

/// Stream the checkpoint through `passes`, layer by layer. `calib` holds token windows
/// (all of one length); it may be empty when no pass needs statistics.
pub fn run(
    ckpt: &Checkpoint,
    passes: &[Box<dyn Pass>],
    calib: &[Vec<u32>],
    batch: usize,
    sink: &mut dyn LayerSink,
    resume: Option<ResumePoint>,
) -> Result<EngineReport> {
    let cfg = &ckpt.config;
    let (start, mut report, resumed_hidden) = match resume {
        Some(r) => (r.next_layer, r.report, Some(r.hidden)),
        None => (0, EngineReport::default(), None),
    };
    // Calibration forwards only when some pass needs statistics (RTN, say, needs none).
    let need_forward = passes.iter().any(|p| p.stats().any());
    let t0 = Instant::now();
    let (mut hidden, rope) = if need_forward {
        if calib.is_empty() {
            bail!("the pipeline has passes but no calibration data (`calibration.path`)");
        }
        let max_t = calib.iter().map(|w| w.len()).max().unwrap_or(1);
        if let Some(h) = resumed_hidden {
            (h, Some(Rope::new(cfg, max_t)?))
        } else {
            let outer = Outer::load(ckpt)?;
            // Batches of up to `batch` consecutive windows of equal length (documents mode gives
            // windows of different lengths; no padding is ever needed).
            let mut h = Vec::new();
            let mut i = 0;
            while i < calib.len() {
                let t = calib[i].len();
                let mut j = i + 1;
                while j < calib.len() && j - i < batch.max(1) && calib[j].len() == t {
                    j += 1;
                }
                let ids: Vec<u32> = calib[i..j].iter().flatten().copied().collect();
                h.push(outer.embed(&ids, j - i, t)?);
                i = j;
            }
            (h, Some(Rope::new(cfg, max_t)?))
        }
    } else {
        (Vec::new(), None)
    };
    if start == 0 {
        report.calibration_seconds = t0.elapsed().as_secs_f64();
    }
    let request = passes
        .iter()
        .fold(StatsRequest::default(), |a, p| a.union(p.stats()));
    let pb = crate::progress::bar(cfg.num_layers as u64, "layers");
    pb.set_position(start as u64);
    for l in start..cfg.num_layers {
        let tl = Instant::now();
        let layer = LayerWeights::load(ckpt, l)?;
        let layer = if passes.is_empty() {
            layer
        } else {
            let mut ctx = LayerCtx {
                layer,
                config: cfg,
                inputs: &hidden,
                rope: rope.as_ref(),
                request,
                stats: BTreeMap::new(),
                fresh: false,
                records: Vec::new(),
                warnings: Vec::new(),
            };
            for p in passes {
                pb.set_message(format!("layer {l} {}", p.name()));
                p.apply(&mut ctx)?;
                ctx.invalidate();
            }
            report.records.append(&mut ctx.records);
            report.warnings.append(&mut ctx.warnings);
            let layer = ctx.layer;
            // X_{i+1} = compressed layer (X_i)
            if let Some(rope) = rope.as_ref() {
                let cl = DecoderLayer::new(&layer, cfg);
                let mut no_hook = |_: Site, _: &[f32], _: usize, _: usize| Ok(());
                for x in hidden.iter_mut() {
                    *x = cl.forward(x, rope, &mut no_hook)?;
                }
            }
            layer
        };
        for lin in layer.linears.values() {
            report.zeros += lin.weight.iter().filter(|&&v| v == 0.0).count();
            report.numel += lin.weight.len();
        }
        sink.layer(ckpt, &layer)?;
        drop(layer);
        ckpt.release_prefix(&LayerWeights::prefix(l));
        report.layer_seconds.push(tl.elapsed().as_secs_f64());
        sink.layer_done(l, &hidden, &report)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    report.sparsity = (report.numel > 0).then(|| report.zeros as f64 / report.numel as f64);
    Ok(report)
}
