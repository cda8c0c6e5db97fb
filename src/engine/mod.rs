//! The layer stream: calibration tokens → embeddings → for each
//! decoder layer: load it, run it on the stored hidden states X_i while hooks collect the
//! statistics its passes asked for, hand it to the passes, re-run the compressed layer to get
//! X_{i+1} (so later layers see earlier errors), give it to the exporter, drop it.
//! Peak memory ≈ one layer + the hidden-state buffers. The engine is the only place that knows
//! the order of work.

mod collect;
mod layer_run;
mod nonfinite;
mod pass;
pub mod stats;

pub use collect::collect_stats;
pub use nonfinite::{NonFinite, NonFinitePolicy};
pub use pass::{LayerCtx, LinearRecord, Pass, PassState};

use crate::model::layer::LayerWeights;
use crate::model::llama::{Act, Outer, Rope};
use crate::model::Checkpoint;
use anyhow::{bail, Context, Result};
use layer_run::LayerRun;
use nonfinite::{drop_samples, screen_nonfinite};
use serde::{Deserialize, Serialize};
use stats::StatsRequest;
use std::collections::BTreeMap;
use std::time::Instant;

/// How the engine runs: forward batch size and the non-finite policy.
#[derive(Clone, Copy, Debug)]
pub struct StreamOptions {
    /// Calibration windows per forward batch.
    pub batch: usize,
    pub on_nonfinite: NonFinitePolicy,
    /// Which tokens a mixture's experts see in the calibration forwards.
    pub experts: crate::config::ExpertCalibration,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            batch: 8,
            on_nonfinite: NonFinitePolicy::Error,
            experts: Default::default(),
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
    /// Fraction of the decoder-layer linears' weights a pass pruned (their masks); `None` when
    /// no pass pruned. Zeros that rounding onto a grid made are not pruning and not counted.
    pub sparsity: Option<f64>,
    /// Running counts behind `sparsity` (kept for resuming): weights masked out, all weights,
    /// and linears carrying a mask.
    pub zeros: usize,
    pub numel: usize,
    #[serde(default)]
    pub masked: usize,
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

/// A sink that keeps nothing: a whole-model scan (OWL's outlier ratios, a budget's damage
/// table) runs the passes for their records only.
pub struct NullSink;

impl LayerSink for NullSink {
    fn layer(&mut self, _: &Checkpoint, _: &LayerWeights) -> Result<()> {
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
    // the calibration forwards' view of the mixture (only statistics differ, not outputs)
    let mut calib_cfg = ckpt.config.clone();
    if let Some(m) = calib_cfg.moe.as_mut() {
        m.calibrate = opts.experts;
    }
    let cfg = &calib_cfg;
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
            let outer = Outer::load(ckpt, false)?;
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
                    // inside an expert the rows do not name their samples: screen for them
                    // (kept: the drop path below screens the same compressed layer again)
                    let screened = match (nf.samples.is_empty(), rope.as_ref()) {
                        (true, Some(rope)) => {
                            Some(screen_nonfinite(&ctx.layer, cfg, &hidden, rope)?)
                        }
                        _ => None,
                    };
                    let samples: Vec<usize> = match &screened {
                        Some(bad) => bad
                            .iter()
                            .filter(|&&(b, _, _)| b == nf.batch)
                            .map(|&(_, s, _)| s)
                            .collect(),
                        None => nf.samples.clone(),
                    };
                    let named: Vec<usize> = samples.iter().map(|&s| ids[nf.batch][s]).collect();
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
                    let mut bad = match screened {
                        Some(bad) => bad,
                        None => screen_nonfinite(&ctx.layer, cfg, &hidden, rope)?,
                    };
                    let original = LayerWeights::load(ckpt, l)?;
                    bad.extend(screen_nonfinite(&original, cfg, &hidden, rope)?);
                    bad.extend(samples.iter().map(|&s| (nf.batch, s, nf.site)));
                    let mut pairs: Vec<(usize, usize)> =
                        bad.iter().map(|&(b, s, _)| (b, s)).collect();
                    pairs.sort_unstable();
                    pairs.dedup();
                    let mut window: Vec<usize> = pairs.iter().map(|&(b, s)| ids[b][s]).collect();
                    window.sort_unstable();
                    let sites: std::collections::BTreeSet<&str> = bad
                        .iter()
                        .filter_map(|&(_, _, s)| cfg.block().readers(s).next())
                        .collect();
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
            if let Some(m) = lin.mask() {
                report.zeros += m.keep.iter().filter(|k| !**k).count();
                report.masked += 1;
            }
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
    report.sparsity =
        (report.masked > 0 && report.numel > 0).then(|| report.zeros as f64 / report.numel as f64);
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
