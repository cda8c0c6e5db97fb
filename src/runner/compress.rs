//! The compression half of a run: calibration windows, the OWL pre-scan, and streaming every
//! layer through the passes into the exporters (fresh or resumed).

use crate::export::Exporter;
use crate::model::Checkpoint;
use crate::pipeline::Pipeline;
use crate::{calib, info};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Calibrate, stream every layer through the passes and write the artifact into `work`
/// (continuing from `state` when resuming). Returns what the resume state records about the
/// finished artifact, and the spill files to remove once that is recorded.
pub(super) fn compress_into(
    p: &Pipeline,
    extra: Vec<Box<dyn crate::engine::Pass>>,
    ckpt: &Checkpoint,
    work: &Path,
    fingerprint: crate::resume::Fingerprint,
    state: Option<crate::resume::State>,
) -> Result<(crate::resume::Exported, Vec<PathBuf>)> {
    let needs_calib =
        p.passes.iter().any(|s| s.needs_calibration()) || extra.iter().any(|x| x.stats().any());
    // Calibration windows, only when some pass needs statistics.
    let t = Instant::now();
    let (windows, opts) = match (&p.calibration, needs_calib) {
        (Some(c), true) => {
            let tok = calib::load_tokenizer(&ckpt.tokenizer_path())?;
            let w = match c.sampling {
                crate::pipeline::Sampling::Random => {
                    let text = calib::read_text(&c.path, &c.field)?;
                    let tokens = calib::tokenize(&tok, &text)?;
                    calib::random_windows(&tokens, c.samples, c.seq_len, c.seed)
                        .with_context(|| format!("calibration file {}", c.path.display()))?
                }
                crate::pipeline::Sampling::Documents => {
                    calib::document_windows(&tok, &c.path, &c.field, c.samples, c.seq_len)?
                }
            };
            info!(
                "calibration: {} windows × {} tokens from {}",
                w.len(),
                c.seq_len,
                c.path.display()
            );
            let opts = crate::engine::StreamOptions {
                batch: c.batch,
                on_nonfinite: c.on_nonfinite,
                experts: c.experts,
            };
            (w, opts)
        }
        _ => (Vec::new(), crate::engine::StreamOptions::default()),
    };
    let calibration_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    // OWL needs every layer's outlier ratio before the first layer is pruned, a budget every
    // linear's damage before the first is quantized: their scans run first
    let mut specs = p.passes.clone();
    let cached_prep = state
        .as_ref()
        .map(|s| s.prepared.clone())
        .unwrap_or_default();
    let mut prepared = Vec::new();
    let format = p.export.primary().format;
    let cost = |a: &crate::quant::QuantArgs,
                o: crate::formats::Order,
                shape: (usize, usize),
                dt: crate::safetensors_file::DType| {
        crate::export::quantized_bytes(format, a, o, shape, dt)
    };
    for (i, spec) in specs.iter_mut().enumerate() {
        let at = format!("passes[{i}] {}", spec.name());
        let cached = cached_prep.iter().find(|(j, _)| *j == i).map(|(_, a)| a);
        if let Some(a) = spec.prepare(&at, ckpt, &windows, &opts, cached, &cost)? {
            prepared.push((i, a));
        }
    }
    let mut passes = specs
        .iter()
        .map(|s| s.build())
        .collect::<Result<Vec<_>>>()?;
    passes.extend(extra);
    let primary = p.export.primary();
    let layer_digests = state
        .as_ref()
        .map(|s| s.layer_digests.clone())
        .unwrap_or_default();
    let (mut exporter, resume_point) = match state {
        Some(s) => {
            let rp = crate::resume::resume_point(work, &s, ckpt.config.hidden_size)?;
            let shard = primary.max_shard_bytes.unwrap_or(DEFAULT_SHARD);
            (
                Exporter::resume(primary.format, work, shard, s.exporter)?,
                Some(rp),
            )
        }
        None => {
            let mut e = begin_export(primary, work, ckpt)?;
            for (sub, x) in p.export.also() {
                let d = work.join(&sub);
                std::fs::create_dir_all(&d)
                    .with_context(|| format!("cannot create {}", d.display()))?;
                let other =
                    begin_export(x, &d, ckpt).with_context(|| format!("export into `{sub}`"))?;
                e = e.with_also(&sub, other);
            }
            (e, None)
        }
    };
    info!(
        "compressing {} ({} layers) with {} pass(es), format {}",
        p.model.display(),
        ckpt.config.num_layers,
        passes.len(),
        p.export
            .all()
            .iter()
            .map(|e| e.format.name())
            .collect::<Vec<_>>()
            .join(" + ")
    );
    let engine = {
        let mut sink = crate::resume::ResumableSink {
            exporter: &mut exporter,
            work: work.to_path_buf(),
            fingerprint,
            layer_digests,
            prepared,
        };
        crate::engine::run(ckpt, &passes, &windows, &opts, &mut sink, resume_point)?
    };
    let (files, spills) = exporter.finish(ckpt)?;
    let digests = crate::resume::file_digests(work, &files)?;
    Ok((
        crate::resume::Exported {
            files,
            digests,
            engine,
            calibration_seconds,
            compress_seconds: t.elapsed().as_secs_f64(),
        },
        spills,
    ))
}

/// Largest safetensors shard when the export does not say (4 GiB).
const DEFAULT_SHARD: usize = 4 << 30;

/// Start writing one export of the pipeline into `dir`.
fn begin_export(e: &crate::pipeline::Export, dir: &Path, ckpt: &Checkpoint) -> Result<Exporter> {
    match (e.format, e.gguf_type) {
        (crate::export::Format::Gguf, Some(ft)) => {
            Exporter::begin_gguf(dir, ckpt, ft, e.tensor_types.clone())
        }
        _ => Exporter::begin(
            e.format,
            dir,
            ckpt,
            e.max_shard_bytes.unwrap_or(DEFAULT_SHARD),
        )?
        .with_sparse_format(e.sparse_format),
    }
}
