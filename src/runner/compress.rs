//! The compression half of a run: calibration windows, the OWL pre-scan, and streaming every
//! layer through the passes into the exporters (fresh or resumed).

use crate::export::Exporter;
use crate::model::Checkpoint;
use crate::pipeline::Pipeline;
use crate::{calib, info};
use anyhow::{bail, Context, Result};
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
            };
            (w, opts)
        }
        _ => (Vec::new(), crate::engine::StreamOptions::default()),
    };
    let calibration_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    // OWL needs every layer's outlier ratio before the first layer is pruned: scan first
    let mut specs = p.passes.clone();
    let cached_owl = state.as_ref().map(|s| s.owl.clone()).unwrap_or_default();
    let owl = owl_scan(&mut specs, ckpt, &windows, &opts, &cached_owl)?;
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
            owl,
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

/// For each pruning pass with `allocation: owl` (passes/owl.rs): stream the dense model through
/// the OWL scan (nothing written) and set the pass's per-layer sparsities. A resumed run takes
/// the allocation its state recorded (`cached`) instead of scanning again (the scan is
/// deterministic, so it would find the same). Returns every allocation, for the resume state.
fn owl_scan(
    specs: &mut [crate::passes::PassSpec],
    ckpt: &Checkpoint,
    windows: &[Vec<u32>],
    opts: &crate::engine::StreamOptions,
    cached: &[(usize, Vec<(f64, f64)>)],
) -> Result<crate::resume::OwlAllocations> {
    let mut out = Vec::new();
    struct Discard;
    impl crate::engine::LayerSink for Discard {
        fn layer(&mut self, _: &Checkpoint, _: &crate::model::layer::LayerWeights) -> Result<()> {
            Ok(())
        }
    }
    for (i, spec) in specs.iter_mut().enumerate() {
        let name = spec.name();
        let Some(ps) = spec.prune_spec_mut() else {
            continue;
        };
        if ps.allocation != crate::passes::prune::Allocation::Owl {
            continue;
        }
        if windows.is_empty() {
            bail!("passes[{i}] {name}: `allocation: owl` needs a `calibration:` block");
        }
        if let Some((_, a)) = cached
            .iter()
            .find(|(j, a)| *j == i && a.len() == ckpt.config.num_layers)
        {
            info!("passes[{i}] {name}: OWL allocation from the resume state");
            ps.owl = Some(a.clone());
            out.push((i, a.clone()));
            continue;
        }
        info!("passes[{i}] {name}: OWL scan of the dense model (outlier ratio per layer)");
        let scan = crate::passes::owl::OwlScan {
            m: ps.owl_m,
            select: crate::passes::select::Selector::new(&ps.targets, &ps.ignore)?,
        };
        let passes: Vec<Box<dyn crate::engine::Pass>> = vec![Box::new(scan)];
        let r = crate::engine::run(ckpt, &passes, windows, opts, &mut Discard, None)?;
        let ratios = crate::passes::owl::ratios_from_records(&r.records, ckpt.config.num_layers)?;
        let alloc = crate::passes::owl::allocate(&ratios, ps.target(), ps.owl_lambda)
            .with_context(|| format!("passes[{i}] {name}"))?;
        info!(
            "passes[{i}] {name}: OWL sparsity per layer {}",
            alloc
                .iter()
                .map(|s| format!("{s:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let a: Vec<(f64, f64)> = ratios.into_iter().zip(alloc).collect();
        out.push((i, a.clone()));
        ps.owl = Some(a);
    }
    Ok(out)
}
