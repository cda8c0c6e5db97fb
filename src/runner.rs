//! What the CLI commands do, as library functions (the binary is a thin clap layer).

use crate::eval::ppl::{perplexity_with, PplResult, Protocol};
use crate::export::Exporter;
use crate::model::llama::Model;
use crate::model::Checkpoint;
use crate::pipeline::{parse_device, Device, Pipeline};
use crate::report::{DatasetEval, ModelInfo, OutputInfo, Report, Timing, SCHEMA};
use crate::{calib, info};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use crate::eval::dataset_key;

/// Perplexity of a checkpoint on each file (text, or `.jsonl` `text` fields joined by "\n\n").
pub fn eval_perplexity(
    ckpt: &Checkpoint,
    files: &[PathBuf],
    seq_len: usize,
    batch: usize,
    label: &str,
) -> Result<BTreeMap<String, PplResult>> {
    eval_perplexity_each(ckpt, files, seq_len, batch, label, &mut |_, _, _| Ok(()))
}

/// Which scoring protocol `compress eval --protocol NAME` names: `windows` (ours, the default)
/// or `llama-perplexity` (llama.cpp's, see [`Protocol::LlamaCpp`]; BOS from the tokenizer).
pub fn protocol_named(ckpt: &Checkpoint, name: &str) -> Result<Protocol> {
    match name {
        "windows" => Ok(Protocol::Windows),
        "llama-perplexity" => {
            let tok = calib::load_tokenizer(&ckpt.tokenizer_path())?;
            Ok(Protocol::LlamaCpp {
                bos: calib::added_bos(&tok)?,
            })
        }
        _ => bail!("--protocol: `{name}` is not one of windows, llama-perplexity"),
    }
}

/// [`eval_perplexity`], calling `done(file, result, seconds)` after each file.
pub fn eval_perplexity_each(
    ckpt: &Checkpoint,
    files: &[PathBuf],
    seq_len: usize,
    batch: usize,
    label: &str,
    done: &mut dyn FnMut(&Path, &PplResult, f64) -> Result<()>,
) -> Result<BTreeMap<String, PplResult>> {
    eval_perplexity_protocol(ckpt, files, seq_len, batch, label, Protocol::Windows, done)
}

/// [`eval_perplexity_each`] scored as `protocol` says.
pub fn eval_perplexity_protocol(
    ckpt: &Checkpoint,
    files: &[PathBuf],
    seq_len: usize,
    batch: usize,
    label: &str,
    protocol: Protocol,
    done: &mut dyn FnMut(&Path, &PplResult, f64) -> Result<()>,
) -> Result<BTreeMap<String, PplResult>> {
    let mut t = Instant::now();
    let tok = calib::load_tokenizer(&ckpt.tokenizer_path())?;
    let model = Model::open(ckpt, seq_len, crate::util::eval_resident_limit())?;
    let mut out = BTreeMap::new();
    for f in files {
        let text = calib::read_text(f, "text")?;
        let tokens = calib::tokenize(&tok, &text)?;
        let windows = tokens.len() / seq_len;
        let pb = crate::progress::bar(windows as u64, &format!("{label} {}", dataset_key(f)));
        let mut r = perplexity_with(&model, &tokens, seq_len, batch, protocol, &mut |w| {
            pb.set_position(w as u64)
        })
        .with_context(|| format!("evaluating {}", f.display()))?;
        pb.finish_and_clear();
        r.min_windows = Some(calib::min_tokens(&tok, &text) / seq_len);
        if let Some(w) = r.short_warning(&dataset_key(f)) {
            info!("warning: {w}");
        }
        done(f, &r, t.elapsed().as_secs_f64())?;
        info!(
            "{label} {}: perplexity {:.4} ({} windows)",
            dataset_key(f),
            r.perplexity,
            r.windows
        );
        out.insert(dataset_key(f), r);
        t = Instant::now();
    }
    Ok(out)
}

/// Zero-shot task scores of a checkpoint.
pub fn eval_tasks(
    ckpt: &Checkpoint,
    tasks: &[String],
    dir: &Path,
    limit: Option<usize>,
    label: &str,
) -> Result<BTreeMap<String, crate::eval::tasks::TaskResult>> {
    eval_tasks_each(ckpt, tasks, dir, limit, label, &mut |_, _, _| Ok(()))
}

/// [`eval_tasks`], calling `done(task, result, seconds)` after each task.
pub fn eval_tasks_each(
    ckpt: &Checkpoint,
    tasks: &[String],
    dir: &Path,
    limit: Option<usize>,
    label: &str,
    done: &mut dyn FnMut(&str, &crate::eval::tasks::TaskResult, f64) -> Result<()>,
) -> Result<BTreeMap<String, crate::eval::tasks::TaskResult>> {
    use crate::eval::tasks::{evaluate, Task};
    let mut t = Instant::now();
    let tok = calib::load_tokenizer(&ckpt.tokenizer_path())?;
    let max_len = task_context_len(ckpt);
    let model = Model::open(ckpt, max_len, crate::util::eval_resident_limit())?;
    let mut out = BTreeMap::new();
    for name in tasks {
        let task = Task::from_name(name)?;
        let r = evaluate(&model, &tok, task, dir, limit, max_len)
            .with_context(|| format!("task {name} (data in {})", dir.display()))?;
        info!("{label} {}: {:?}", task.name(), r.metrics);
        done(task.name(), &r, t.elapsed().as_secs_f64())?;
        t = Instant::now();
        out.insert(task.name().to_string(), r);
    }
    Ok(out)
}

/// Context length of zero-shot task scoring: the model's `max_position_embeddings` (2048 when
/// absent), at most 4096.
fn task_context_len(ckpt: &Checkpoint) -> usize {
    ckpt.config
        .raw
        .get("max_position_embeddings")
        .and_then(|v| v.as_u64())
        .unwrap_or(2048)
        .min(4096) as usize
}

/// Where the input model's scores come from: the eval cache ([`crate::eval::cache`]) and what
/// each lookup found, for the report.
struct BaselineCtx<'a> {
    cache: Option<&'a crate::eval::cache::EvalCache>,
    origin: &'a mut crate::report::Baseline,
}

impl BaselineCtx<'_> {
    fn lookup<T: serde::de::DeserializeOwned>(
        &mut self,
        item: &str,
        what: &serde_json::Value,
    ) -> Option<T> {
        let c = self.cache?;
        match c.get::<T>(what) {
            crate::eval::cache::Lookup::Hit(r, _) => {
                self.origin.items.insert(
                    item.to_string(),
                    crate::report::BaselineItem {
                        source: "cache".into(),
                        entry: Some(c.path(what).display().to_string()),
                    },
                );
                Some(r)
            }
            crate::eval::cache::Lookup::Miss => None,
        }
    }

    /// An item scored by the interrupted run this one resumes (from its cache or computed
    /// there): reported as such, not as computed in this run.
    fn resumed(&mut self, item: &str) {
        self.origin.items.insert(
            item.to_string(),
            crate::report::BaselineItem {
                source: "resumed".into(),
                entry: None,
            },
        );
    }

    fn computed<T: serde::Serialize>(
        &mut self,
        item: &str,
        what: Option<&serde_json::Value>,
        r: &T,
        seconds: f64,
    ) {
        let entry = match (self.cache, what) {
            (Some(c), Some(w)) => match c.put(w, r, seconds) {
                Ok(p) => Some(p.display().to_string()),
                Err(e) => {
                    info!("warning: the eval cache entry of {item} was not written: {e:#}");
                    None
                }
            },
            _ => None,
        };
        self.origin.items.insert(
            item.to_string(),
            crate::report::BaselineItem {
                source: "computed".into(),
                entry,
            },
        );
    }
}

/// Perplexity of `ckpt` on the pipeline's data sets, taking finished ones from `cache` and
/// recording each new one as it finishes; with `baseline`, also from and into the eval cache.
/// Returns the results and the seconds they took.
fn ppl_cached(
    ckpt: &Checkpoint,
    e: &crate::pipeline::EvalSpec,
    label: &str,
    cache: &mut crate::resume::EvalCache,
    mut baseline: Option<&mut BaselineCtx>,
) -> Result<(BTreeMap<String, PplResult>, f64)> {
    let key = |f: &Path| format!("ppl/{label}/{}", dataset_key(f));
    let mut out = BTreeMap::new();
    let mut seconds = 0.0;
    let mut todo = Vec::new();
    let mut whats = BTreeMap::new();
    for f in &e.datasets {
        if let Some((r, s)) = cache.get::<PplResult>(&key(f)) {
            info!(
                "{label} {}: perplexity {:.4} (finished before the interruption)",
                dataset_key(f),
                r.perplexity
            );
            if let Some(b) = baseline.as_deref_mut() {
                b.resumed(&dataset_key(f));
            }
            out.insert(dataset_key(f), r);
            seconds += s;
            continue;
        }
        if let Some(b) = baseline.as_deref_mut().filter(|b| b.cache.is_some()) {
            let what = crate::eval::cache::EvalCache::ppl_what(f, e.seq_len, e.batch)?;
            if let Some(r) = b.lookup::<PplResult>(&dataset_key(f), &what) {
                info!(
                    "{label} {}: perplexity {:.4} (from the eval cache)",
                    dataset_key(f),
                    r.perplexity
                );
                cache.put(&key(f), &r, 0.0)?;
                out.insert(dataset_key(f), r);
                continue;
            }
            whats.insert(dataset_key(f), what);
        }
        todo.push(f.clone());
    }
    if !todo.is_empty() {
        let new = eval_perplexity_each(ckpt, &todo, e.seq_len, e.batch, label, &mut |f, r, s| {
            seconds += s;
            if let Some(b) = baseline.as_deref_mut() {
                b.computed(&dataset_key(f), whats.get(&dataset_key(f)), r, s);
            }
            cache.put(&key(f), r, s)
        })?;
        out.extend(new);
    }
    Ok((out, seconds))
}

/// [`ppl_cached`] for the zero-shot tasks.
fn tasks_cached(
    ckpt: &Checkpoint,
    e: &crate::pipeline::EvalSpec,
    label: &str,
    cache: &mut crate::resume::EvalCache,
    mut baseline: Option<&mut BaselineCtx>,
) -> Result<(BTreeMap<String, crate::eval::tasks::TaskResult>, f64)> {
    use crate::eval::tasks::{Task, TaskResult};
    let key = |name: &str| format!("tasks/{label}/{name}");
    let mut out = BTreeMap::new();
    let mut seconds = 0.0;
    let mut todo = Vec::new();
    let mut whats = BTreeMap::new();
    for name in &e.tasks {
        let task = Task::from_name(name)?;
        let canon = task.name();
        if let Some((r, s)) = cache.get::<TaskResult>(&key(canon)) {
            info!(
                "{label} {canon}: {:?} (finished before the interruption)",
                r.metrics
            );
            if let Some(b) = baseline.as_deref_mut() {
                b.resumed(canon);
            }
            out.insert(canon.to_string(), r);
            seconds += s;
            continue;
        }
        if let Some(b) = baseline.as_deref_mut().filter(|b| b.cache.is_some()) {
            let what = crate::eval::cache::EvalCache::task_what(
                task,
                &e.tasks_dir,
                e.limit,
                task_context_len(ckpt),
            )?;
            if let Some(r) = b.lookup::<TaskResult>(canon, &what) {
                info!("{label} {canon}: {:?} (from the eval cache)", r.metrics);
                cache.put(&key(canon), &r, 0.0)?;
                out.insert(canon.to_string(), r);
                continue;
            }
            whats.insert(canon.to_string(), what);
        }
        todo.push(name.clone());
    }
    if !todo.is_empty() {
        let new = eval_tasks_each(ckpt, &todo, &e.tasks_dir, e.limit, label, &mut |n, r, s| {
            seconds += s;
            if let Some(b) = baseline.as_deref_mut() {
                b.computed(n, whats.get(n), r, s);
            }
            cache.put(&key(n), r, s)
        })?;
        out.extend(new);
    }
    Ok((out, seconds))
}

/// `compress logits`: the model's logits on `seqs` (comma-separated ids, equal lengths) into a
/// safetensors file at `out` (`input_ids` I64 [b, t], `logits` F32 [b, t, vocab]).
pub fn write_logits(model_dir: &Path, seqs: &[String], out: &Path) -> Result<()> {
    let ckpt = Checkpoint::open(model_dir)?;
    let mut ids: Vec<u32> = Vec::new();
    let mut t = None;
    for (i, s) in seqs.iter().enumerate() {
        let seq = s
            .split(',')
            .map(|x| x.trim().parse::<u32>())
            .collect::<std::result::Result<Vec<u32>, _>>()
            .with_context(|| format!("--ids #{}: expected comma-separated token ids", i + 1))?;
        anyhow::ensure!(!seq.is_empty(), "--ids #{}: empty sequence", i + 1);
        anyhow::ensure!(
            t.is_none_or(|t| t == seq.len()),
            "--ids #{}: {} ids, the first sequence has {}",
            i + 1,
            seq.len(),
            t.unwrap_or(0)
        );
        t = Some(seq.len());
        ids.extend(seq);
    }
    let t = t.context("no --ids given")?;
    let b = seqs.len();
    let vocab = ckpt.config.vocab_size;
    if let Some(&bad) = ids.iter().find(|&&x| x as usize >= vocab) {
        bail!("--ids: token id {bad} is not below the vocabulary size {vocab}");
    }
    let m = Model::open(&ckpt, t, crate::util::eval_resident_limit())?;
    let logits = m.logits(&ids, b, t)?;
    let id_bytes: Vec<u8> = ids.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect();
    let lg_bytes: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
    let views = [
        (
            "input_ids",
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![b, t], &id_bytes)?,
        ),
        (
            "logits",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![b, t, vocab],
                &lg_bytes,
            )?,
        ),
    ];
    safetensors::tensor::serialize_to_file(views, None, out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

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

/// Bytes and stored bits per weight of the decoder-layer linears of a written checkpoint.
fn linear_bits(ckpt: &Checkpoint) -> Option<f64> {
    let cfg = &ckpt.config;
    let mut numel = 0usize;
    for l in 0..cfg.num_layers {
        for (n, s) in cfg.layer_tensors(l) {
            if n.ends_with("_proj.weight") {
                numel += s.iter().product::<usize>();
            }
        }
    }
    let mut bytes = 0usize;
    for n in ckpt.names() {
        if n.starts_with("model.layers.") && n.contains("_proj.") && !n.ends_with(".bias") {
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
    let mut ckpt = Checkpoint::open(&p.model)?;
    ckpt.precision = p.eval.as_ref().map(|e| e.precision).unwrap_or_default();
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

/// Calibrate, stream every layer through the passes and write the artifact into `work`
/// (continuing from `state` when resuming). Returns what the resume state records about the
/// finished artifact, and the spill files to remove once that is recorded.
fn compress_into(
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

#[allow(clippy::too_many_arguments)]
fn run_in(
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
    let mut out = Checkpoint::open(work).context("reading back the written checkpoint")?;
    out.precision = ckpt.precision;
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
            ckpt.precision.name(),
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
        let mut art = Checkpoint::open(&dir)
            .with_context(|| format!("reading back the written export `{sub}`"))?;
        art.precision = ckpt.precision;
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
