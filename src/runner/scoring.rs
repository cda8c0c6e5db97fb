//! Scoring one checkpoint outside a pipeline run: the perplexity and zero-shot wrappers
//! (`compress eval`) and the `compress logits` dump; the run's cached evaluation builds on these.

use crate::eval::dataset_key;
use crate::eval::ppl::{perplexity_with, PplResult, Protocol};
use crate::model::llama::Model;
use crate::model::{Checkpoint, EvalOptions};
use crate::{calib, info};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Perplexity of a checkpoint on each file (text, or `.jsonl` `text` fields joined by "\n\n").
pub fn eval_perplexity(
    ckpt: &Checkpoint,
    opts: &EvalOptions,
    files: &[PathBuf],
    seq_len: usize,
    batch: usize,
    label: &str,
) -> Result<BTreeMap<String, PplResult>> {
    eval_perplexity_each(ckpt, opts, files, seq_len, batch, label, &mut |_, _, _| {
        Ok(())
    })
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
    opts: &EvalOptions,
    files: &[PathBuf],
    seq_len: usize,
    batch: usize,
    label: &str,
    done: &mut dyn FnMut(&Path, &PplResult, f64) -> Result<()>,
) -> Result<BTreeMap<String, PplResult>> {
    eval_perplexity_protocol(
        ckpt,
        opts,
        files,
        seq_len,
        batch,
        label,
        Protocol::Windows,
        done,
    )
}

/// [`eval_perplexity_each`] scored as `protocol` says.
pub fn eval_perplexity_protocol(
    ckpt: &Checkpoint,
    opts: &EvalOptions,
    files: &[PathBuf],
    seq_len: usize,
    batch: usize,
    label: &str,
    protocol: Protocol,
    done: &mut dyn FnMut(&Path, &PplResult, f64) -> Result<()>,
) -> Result<BTreeMap<String, PplResult>> {
    let mut t = Instant::now();
    let tok = calib::load_tokenizer(&ckpt.tokenizer_path())?;
    let model = Model::open(ckpt, opts, seq_len, crate::util::eval_resident_limit())?;
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
    opts: &EvalOptions,
    tasks: &[String],
    dir: &Path,
    limit: Option<usize>,
    label: &str,
) -> Result<BTreeMap<String, crate::eval::tasks::TaskResult>> {
    eval_tasks_each(ckpt, opts, tasks, dir, limit, label, &mut |_, _, _| Ok(()))
}

/// [`eval_tasks`], calling `done(task, result, seconds)` after each task.
pub fn eval_tasks_each(
    ckpt: &Checkpoint,
    opts: &EvalOptions,
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
    let model = Model::open(ckpt, opts, max_len, crate::util::eval_resident_limit())?;
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
pub(super) fn task_context_len(ckpt: &Checkpoint) -> usize {
    ckpt.config
        .raw
        .get("max_position_embeddings")
        .and_then(|v| v.as_u64())
        .unwrap_or(2048)
        .min(4096) as usize
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
    let m = Model::open(
        &ckpt,
        &EvalOptions::default(),
        t,
        crate::util::eval_resident_limit(),
    )?;
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
