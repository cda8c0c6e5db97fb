//! After the export: read the artifact back, compare and score it (and the further exports),
//! and assemble, write and checksum its report. Apart from the run's lifecycle around it.

use super::baseline::{ppl_cached, tasks_cached, BaselineCtx};
use super::compress::compress_into;
use crate::eval::dataset_key;
use crate::eval::ppl::PplResult;
use crate::info;
use crate::model::Checkpoint;
use crate::pipeline::Pipeline;
use crate::report::{DatasetEval, ModelInfo, OutputInfo, Report, Timing, SCHEMA};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Bytes and stored bits per weight of the decoder-layer linears of a written checkpoint
/// (the block's linears, routers excluded; weights and their scales, codes, masks, factors).
fn linear_bits(ckpt: &Checkpoint) -> Option<f64> {
    let cfg = &ckpt.config;
    let block = cfg.block();
    // the linear a stored tensor belongs to (`model.layers.3.mlp.experts.1.up_proj.weight_packed`)
    let linear_of = |n: &str| {
        let rest = n.strip_prefix("model.layers.")?.split_once('.')?.1;
        let (module, what) = rest.rsplit_once('.')?;
        (what != "bias")
            .then(|| block.linear(module))
            .flatten()
            .filter(|l| !l.router)
    };
    let mut numel = 0usize;
    for l in 0..cfg.num_layers {
        for (n, s) in cfg.layer_tensors(l) {
            if n.ends_with(".weight") && linear_of(&n).is_some() {
                numel += s.iter().product::<usize>();
            }
        }
    }
    let mut bytes = 0usize;
    for n in ckpt.names() {
        if linear_of(n).is_some() {
            if let Some(stored) = &ckpt.gguf_stored {
                bytes += stored.get(n).map(|(_, b)| *b).unwrap_or(0);
            } else if let Ok((info, _)) = ckpt.info(n) {
                bytes += info.end - info.start;
            }
        }
    }
    (numel > 0).then(|| bytes as f64 * 8.0 / numel as f64)
}

/// Every tensor of `a` and `b` has the same name, dtype, shape and bytes.
pub fn tensors_identical(a: &Checkpoint, b: &Checkpoint) -> Result<bool> {
    let na: Vec<&String> = a.names().collect();
    let nb: Vec<&String> = b.names().collect();
    if na != nb {
        return Ok(false);
    }
    for n in na {
        let (ia, ba) = a.raw(n)?;
        let (ib, bb) = b.raw(n)?;
        let same = ia.dtype == ib.dtype && ia.shape == ib.shape && ba == bb;
        // Reading through the maps makes pages resident: drop them as we go, so the check
        // does not hold both checkpoints in memory.
        a.release(n);
        b.release(n);
        if !same {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `checksums.sha256` (the `sha256sum -c` format) over every file of a finished output, so a
/// consumer can verify the artifact is complete and unaltered.
pub fn write_checksums(dir: &Path) -> Result<()> {
    // every file, subfolders (a compensation adapter, further exports) included; the resume
    // state is removed right after this
    let names = crate::util::files_under(dir, &[".resume"])?;
    let mut out = String::new();
    for n in names {
        out.push_str(&format!(
            "{}  {n}\n",
            crate::util::sha256_file(&dir.join(&n))?
        ));
    }
    let p = dir.join("checksums.sha256");
    std::fs::write(&p, out).with_context(|| format!("cannot write {} (disk full?)", p.display()))
}

/// One artifact's perplexity per data set of `e`, beside the input model's (`before`).
fn dataset_evals(
    e: &crate::pipeline::EvalSpec,
    before: Option<&BTreeMap<String, PplResult>>,
    after: &BTreeMap<String, PplResult>,
) -> BTreeMap<String, DatasetEval> {
    let mut eval = BTreeMap::new();
    for f in &e.datasets {
        let k = dataset_key(f);
        let b = before.and_then(|m| m.get(&k)).cloned();
        let a = after.get(&k).cloned();
        let delta = match (&b, &a) {
            (Some(b), Some(a)) => Some(100.0 * (a.perplexity - b.perplexity) / b.perplexity),
            _ => None,
        };
        eval.insert(
            k,
            DatasetEval {
                file: f.display().to_string(),
                before: b,
                after: a,
                delta_pct: delta,
            },
        );
    }
    eval
}

/// One artifact's task scores beside the input model's.
fn task_evals(
    before: Option<&BTreeMap<String, crate::eval::tasks::TaskResult>>,
    after: BTreeMap<String, crate::eval::tasks::TaskResult>,
) -> BTreeMap<String, crate::report::TaskEval> {
    after
        .into_iter()
        .map(|(k, a)| {
            let b = before.and_then(|m| m.get(&k)).cloned();
            (
                k,
                crate::report::TaskEval {
                    before: b,
                    after: Some(a),
                },
            )
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
pub(super) fn run_in(
    p: &Pipeline,
    extra: Vec<Box<dyn crate::engine::Pass>>,
    ckpt: &Checkpoint,
    work: &Path,
    t_all: Instant,
    fingerprint: crate::resume::Fingerprint,
    state: Option<crate::resume::State>,
    cache_dir: Option<PathBuf>,
) -> Result<Report> {
    let mut timing = Timing::default();
    let no_passes = p.passes.is_empty() && extra.is_empty();
    let exported = match state.as_ref().and_then(|s| s.exported.clone()) {
        Some(x) => {
            info!(
                "resuming after export: the artifact in {} is complete and intact; continuing with evaluation",
                work.display()
            );
            // a kill between recording the artifact and removing the spill files leaves them
            if let Some(s) = &state {
                let spills: Vec<PathBuf> = s
                    .exporter
                    .spill_files()
                    .into_iter()
                    .map(|(p, _)| p)
                    .collect();
                crate::export::writer::remove_spills(&spills)?;
            }
            x
        }
        None => {
            let x = compress_into(p, extra, ckpt, work, fingerprint, state)?;
            // Recorded before the spill files go: from here a kill resumes with evaluation.
            crate::resume::mark_exported(work, x.0.clone())?;
            crate::export::writer::remove_spills(&x.1)?;
            x.0
        }
    };
    let (er, files) = (exported.engine, exported.files);
    timing.calibration_seconds = exported.calibration_seconds;
    timing.compress_seconds = exported.compress_seconds;
    // Finished evaluation steps survive a kill (a fresh run starts with an empty cache).
    let mut cache = crate::resume::EvalCache::open(work, false)?;

    // Read the artifact back: everything below is measured on what was written.
    let out = Checkpoint::open(work).context("reading back the written checkpoint")?;
    // GGUF re-encodes every tensor on a ggml grid at export: identity is not a question there.
    let gguf = p.export.primary().format == crate::formats::Format::Gguf;
    let identical = if no_passes && !gguf {
        Some(tensors_identical(ckpt, &out)?)
    } else {
        None
    };
    // The input model's scores: from the eval cache when it has them (hashing the checkpoint
    // is counted in the time of the baseline evaluation).
    let t_key = Instant::now();
    let baseline_cache = match &cache_dir {
        Some(d) => Some(crate::eval::cache::EvalCache::open(
            d,
            ckpt,
            p.eval
                .as_ref()
                .map(|e| e.precision)
                .unwrap_or_default()
                .name(),
        )?),
        None => None,
    };
    let key_seconds = t_key.elapsed().as_secs_f64();
    let mut origin = crate::report::Baseline {
        source: String::new(),
        cache_dir: cache_dir.as_ref().map(|d| d.display().to_string()),
        items: BTreeMap::new(),
    };
    let mut bctx = BaselineCtx {
        cache: baseline_cache.as_ref(),
        origin: &mut origin,
    };
    let mut eval = BTreeMap::new();
    let mut before_ppl = None;
    let mut before_tasks = None;
    let mut seq = None;
    if let Some(e) = &p.eval {
        seq = Some(e.seq_len);
        let before = if e.baseline {
            let (r, s) = ppl_cached(ckpt, e, "before", &mut cache, Some(&mut bctx))?;
            timing.eval_before_seconds = s + key_seconds;
            Some(r)
        } else {
            None
        };
        let (after, s) = ppl_cached(&out, e, "after", &mut cache, None)?;
        timing.eval_after_seconds = s;
        eval = dataset_evals(e, before.as_ref(), &after);
        before_ppl = before;
    }
    let mut tasks = BTreeMap::new();
    if let Some(e) = p.eval.as_ref().filter(|e| !e.tasks.is_empty()) {
        let before = if e.baseline {
            let (r, s) = tasks_cached(ckpt, e, "before", &mut cache, Some(&mut bctx))?;
            timing.tasks_before_seconds = s;
            Some(r)
        } else {
            None
        };
        let (after, s) = tasks_cached(&out, e, "after", &mut cache, None)?;
        timing.tasks_after_seconds = s;
        tasks = task_evals(before.as_ref(), after);
        before_tasks = before;
    }
    // The further exports of a list: each read back from its folder and evaluated on its own
    // (the input model's scores are the same for all).
    let mut also = Vec::new();
    for (sub, x) in p.export.also() {
        let dir = work.join(&sub);
        let art = Checkpoint::open(&dir)
            .with_context(|| format!("reading back the written export `{sub}`"))?;
        let label = format!("after {sub}");
        let mut a_eval = BTreeMap::new();
        let mut a_tasks = BTreeMap::new();
        if let Some(e) = &p.eval {
            let (after, s) = ppl_cached(&art, e, &label, &mut cache, None)?;
            timing.eval_after_seconds += s;
            a_eval = dataset_evals(e, before_ppl.as_ref(), &after);
            if !e.tasks.is_empty() {
                let (after, s) = tasks_cached(&art, e, &label, &mut cache, None)?;
                timing.tasks_after_seconds += s;
                a_tasks = task_evals(before_tasks.as_ref(), after);
            }
        }
        let prefix = format!("{sub}/");
        let size = art.safetensors_bytes();
        also.push(crate::report::AlsoExport {
            dir: sub.clone(),
            format: x.format.name().into(),
            size_bytes: size,
            compression_ratio: ckpt.safetensors_bytes() as f64 / size.max(1) as f64,
            bits_per_weight: linear_bits(&art),
            files: files
                .iter()
                .filter(|f| f.starts_with(&prefix))
                .cloned()
                .collect(),
            eval: a_eval,
            tasks: a_tasks,
        });
    }
    let baseline = (!origin.items.is_empty()).then(|| {
        let sources: std::collections::BTreeSet<&str> =
            origin.items.values().map(|i| i.source.as_str()).collect();
        origin.source = match sources.into_iter().collect::<Vec<_>>()[..] {
            [one] => one.to_string(),
            _ => "mixed".to_string(),
        };
        origin
    });
    let in_bytes = ckpt.safetensors_bytes();
    let out_bytes = out.safetensors_bytes();
    timing.total_seconds = t_all.elapsed().as_secs_f64();
    let (mcr, mcr_basis) = match eval.iter().next() {
        Some((k, d)) => match (&d.before, &d.after) {
            (Some(b), Some(a)) => (
                Some(in_bytes as f64 / out_bytes.max(1) as f64 * (b.perplexity / a.perplexity)),
                Some(format!("1/perplexity on {k}")),
            ),
            _ => (None, None),
        },
        None => (None, None),
    };
    let mut warnings = er.warnings;
    for (k, d) in &eval {
        for (label, r) in [("before", &d.before), ("after", &d.after)] {
            if let Some(w) = r.as_ref().and_then(|r| r.short_warning(k)) {
                warnings.push(format!("perplexity {label}: {w}"));
            }
        }
    }
    let report = Report {
        schema: SCHEMA.into(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        model: ModelInfo {
            path: p.model.display().to_string(),
            architecture: ckpt.config.arch.name().into(),
            num_layers: ckpt.config.num_layers,
            parameters: ckpt.config.num_params(),
            dtype: ckpt.weight_dtype().name().into(),
            size_bytes: in_bytes,
        },
        pipeline: serde_json::to_value(p)?,
        output: OutputInfo {
            path: p.output.display().to_string(),
            format: p.export.primary().format.name().into(),
            size_bytes: out_bytes,
            compression_ratio: in_bytes as f64 / out_bytes.max(1) as f64,
            bits_per_weight: linear_bits(&out),
            sparsity: er.sparsity,
            // the engine counts the linears as the passes left them; a GGUF export re-encodes
            // them afterwards, so that count is not the file's (bits_per_weight is)
            linear_bytes: (er.numel > 0 && !gguf).then_some(er.linear_bytes),
            files,
            identical_to_input: identical,
            also,
        },
        eval_seq_len: seq,
        eval,
        tasks,
        summary: crate::report::Summary { mcr, mcr_basis },
        layers: er.records,
        warnings,
        dropped_calibration_samples: er.dropped_samples,
        timing,
        peak_rss_bytes: crate::util::peak_rss_bytes(),
        baseline,
    };
    drop(out);
    report.write(work)?;
    write_checksums(work)?;
    // The resume state goes last: until here a failure (a full disk, a kill) can be resumed.
    let rd = crate::resume::dir(work);
    if rd.exists() {
        std::fs::remove_dir_all(&rd).with_context(|| format!("cannot remove {}", rd.display()))?;
    }
    Ok(report)
}
