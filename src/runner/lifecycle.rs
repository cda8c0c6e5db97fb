//! A run's lifecycle: options, device check, the output lock, the work folder (fresh, resumed
//! or kept after a failure) and the final rename into place.

use super::assemble::run_in;
use crate::info;
use crate::model::Checkpoint;
use crate::pipeline::{parse_device, Device, Pipeline};
use crate::report::Report;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Context of a failed run whose work folder was kept for `--resume` (main reports it).
#[derive(Debug)]
pub struct KeptForResume(pub PathBuf);

impl std::fmt::Display for KeptForResume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the work folder {} is kept: fix the cause and re-run with --resume",
            self.0.display()
        )
    }
}

/// Options of `compress run` that are not part of the pipeline file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub model: Option<PathBuf>,
    pub output: Option<PathBuf>,
    pub overwrite: bool,
    /// Continue an interrupted run from its work folder.
    pub resume: bool,
    /// Override the pipeline's `device` (`cpu`, `cuda:N`, `auto`).
    pub device: Option<String>,
    /// Eval cache folder for the input model's scores (overrides the pipeline's `eval.cache`;
    /// default [`crate::eval::cache::default_dir`]).
    pub cache: Option<PathBuf>,
    /// Evaluate the input model without the eval cache.
    pub no_cache: bool,
}

/// Select the run's device. On `cuda:N` the GPU is opened (kernels compiled or read from the
/// cache) before any work starts, so a missing driver or device fails the run at once.
fn check_device(p: &Pipeline) -> Result<()> {
    match parse_device(&p.device)? {
        Device::Cpu => Ok(()),
        Device::Cuda(n) => {
            if !cfg!(feature = "cuda") {
                bail!("device cuda:{n}: this build has no CUDA support (rebuild with `--features cuda`)")
            }
            let name = crate::backend::activate(n)
                .with_context(|| format!("device cuda:{n}: the GPU could not be opened"))?;
            if !crate::progress::quiet() {
                eprintln!(
                    "device cuda:{n} ({name}): the calibration forward with its XᵀX products, RTN and GPTQ's factorization and column sweep run on the GPU; statistics are summed and evaluation runs on the CPU"
                );
            }
            Ok(())
        }
    }
}

/// The report of an output a run of `p` already finished (`--resume` after a kill that came
/// between publishing the output and exiting). It must be intact (`compress verify`) and be
/// this pipeline's; otherwise the usual "already exists" refusal, with the reason.
fn finished_output(output: &Path, p: &Pipeline) -> Result<Report> {
    let refuse = |why: String| {
        anyhow::anyhow!(
            "output {} already exists and {why} (pass --overwrite to replace it)",
            output.display()
        )
    };
    crate::verify::verify(output).map_err(|e| refuse(format!("is not intact: {e:#}")))?;
    let report = Report::from_file(&output.join("report.json"))
        .map_err(|e| refuse(format!("has no readable report: {e:#}")))?;
    if report.pipeline != serde_json::to_value(p)? {
        return Err(refuse("was written by another pipeline".into()));
    }
    info!(
        "{} is already complete (an earlier run finished it): nothing to resume",
        output.display()
    );
    Ok(report)
}

/// Run a pipeline end to end: compress into a work folder, evaluate the written artifact,
/// write the report, then rename the folder into place.
pub fn run_pipeline(pipeline_path: &Path, opts: &RunOptions) -> Result<Report> {
    run_pipeline_with(pipeline_path, opts, Vec::new())
}

/// [`run_pipeline`] with `extra` passes run after the pipeline's own on every layer (passes
/// defined outside this crate, such as tests' own). They count for calibration, resume
/// fingerprints and the identity check like the pipeline's passes; the report's `pipeline`
/// shows the file as given, its `layers` what every pass recorded.
pub fn run_pipeline_with(
    pipeline_path: &Path,
    opts: &RunOptions,
    extra: Vec<Box<dyn crate::engine::Pass>>,
) -> Result<Report> {
    let t_all = Instant::now();
    let mut p = Pipeline::from_file(pipeline_path)?;
    if let Some(m) = &opts.model {
        p.model = m.clone();
    }
    if let Some(o) = &opts.output {
        p.output = o.clone();
    }
    if let Some(d) = &opts.device {
        p.device = d.clone();
    }
    check_device(&p).with_context(|| format!("{}: field `device`", pipeline_path.display()))?;
    let ckpt = Checkpoint::open(&p.model)?;
    if ckpt.config.raw.get("quantization_config").is_some() {
        bail!(
            "{}: config.json has a `quantization_config`: the input is already quantized; compress a dense checkpoint",
            p.model.join("config.json").display()
        );
    }
    ckpt.validate_dense()?;
    let output = p.output.clone();
    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    // One run per output at a time: a duplicate job (a retried batch step, say) must not discard
    // or interleave with the work folder of a live run. The lock goes with the process, so a
    // crashed run never leaves it held (one being killed is waited for: see `lock`).
    let _lock = crate::lock::lock_output(&output)?;
    let work = crate::util::work_dir_for(&output);
    if output.exists() {
        if opts.overwrite {
            info!("removing existing output {}", output.display());
        } else if opts.resume && !work.exists() {
            // killed between publishing the output and exiting: the run is complete, and a
            // retried `--resume` has nothing left to do
            return finished_output(&output, &p);
        } else {
            bail!(
                "output {} already exists (pass --overwrite to replace it)",
                output.display()
            );
        }
    }
    let work = crate::util::work_dir_for(&output);
    let mut fingerprint = crate::resume::Fingerprint::of(&p, &ckpt)?;
    if !extra.is_empty() {
        let names: Vec<String> = extra.iter().map(|x| x.name()).collect();
        fingerprint.pipeline = format!("{} + {}", fingerprint.pipeline, names.join(" + "));
    }
    let mut state = None;
    if work.exists() {
        if opts.resume {
            state = crate::resume::load(&work)?;
        }
        match &state {
            Some(s) => {
                let changed = s.fingerprint.diff(&fingerprint);
                if !changed.is_empty() {
                    bail!(
                        "cannot resume {}: {} changed since the interrupted run (run without --resume to start over)",
                        work.display(),
                        changed.join(", ")
                    );
                }
                crate::resume::validate(&work, s, ckpt.config.hidden_size)?;
                if s.exported.is_none() {
                    crate::resume::check_layer_digests(&ckpt, s)?;
                    info!("resuming at layer {} from {}", s.next_layer, work.display());
                }
            }
            None => {
                if opts.resume {
                    info!("nothing to resume in {}: starting over", work.display());
                }
                std::fs::remove_dir_all(&work).with_context(|| {
                    format!("cannot remove stale work folder {}", work.display())
                })?;
            }
        }
    } else if opts.resume {
        info!(
            "no interrupted run of {} found: starting over",
            output.display()
        );
    }
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    crate::util::set_active_work(Some(work.clone()));
    let cache_dir = match (&p.eval, opts.no_cache) {
        (Some(e), false) if e.baseline => opts
            .cache
            .clone()
            .or_else(|| e.cache.clone())
            .or_else(crate::eval::cache::default_dir),
        _ => None,
    };
    let result = run_in(
        &p,
        extra,
        &ckpt,
        &work,
        t_all,
        fingerprint,
        state,
        cache_dir,
    );
    crate::util::set_active_work(None);
    match result {
        Ok(mut report) => {
            if output.exists() {
                std::fs::remove_dir_all(&output)
                    .with_context(|| format!("cannot remove {}", output.display()))?;
            }
            crate::util::publish(&work, &output)?;
            report.output.path = output.display().to_string();
            info!("wrote {}", output.display());
            Ok(report)
        }
        Err(e) => {
            let io_error = e
                .chain()
                .any(|c| c.downcast_ref::<std::io::Error>().is_some());
            if io_error && crate::resume::dir(&work).join("state.json").exists() {
                // An I/O failure (disk full, say) after some layers: keep them for `--resume`
                // (the output itself never appears). Bad input leaves nothing behind.
                Err(e.context(KeptForResume(work)))
            } else {
                let _ = std::fs::remove_dir_all(&work);
                Err(e)
            }
        }
    }
}
