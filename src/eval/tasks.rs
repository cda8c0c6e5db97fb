//! Zero-shot multiple-choice / cloze scoring as lm-evaluation-harness does it (log-likelihood
//! of each choice's continuation given the context; `acc` by the summed log-likelihood,
//! `acc_norm` per byte of the continuation): PIQA, ARC-Easy, ARC-Challenge, HellaSwag, BoolQ, LAMBADA (OpenAI).
//!
//! Reference: EleutherAI/lm-evaluation-harness @ 4e7e0d47 — `lm_eval/tasks/{piqa,arc,hellaswag,
//! super_glue/boolq,lambada}/*.yaml`, `hellaswag/utils.py`, `api/task.py`
//! (`construct_requests`, `process_results`), `api/model.py` (`loglikelihood`, `_encode_pair`),
//! `models/huggingface.py` (`_loglikelihood_tokens`), `api/metrics.py` (`mean_stderr`,
//! `perplexity`).
//!
//! * Prompts (zero-shot, no description, no few-shot):
//!   - piqa: `"Question: {goal}\nAnswer:"`, choices `[sol1, sol2]`, gold from valid-labels.lst.
//!   - arc_easy / arc_challenge (test split): `"Question: {stem}\nAnswer:"`, choices
//!     `choices.text`, gold `choices.label.index(answerKey)` (labels "A".."E" or "1".."4").
//!   - hellaswag (validation): `preprocess(activity_label + ": " + ctx_a + " " +
//!     ctx_b.capitalize())`, choices `preprocess(ending)` — see [`hellaswag_query`] for how
//!     that string is rebuilt from this data set's already-joined `ctx`.
//!   - boolq (validation): `"{passage}\nQuestion: {question}?\nAnswer:"`, choices `["no","yes"]`.
//!   - lambada (lambada_openai, test): context = text up to the last `' '`, target = `' '` + last
//!     word.
//!   - every multiple-choice request is `(context, " " + choice)` (the default target
//!     delimiter).
//! * Tokenization (causal HF model, default `add_bos_token=None` → the tokenizer's own
//!   post-processor adds BOS): trailing whitespace of the context moves to the continuation;
//!   `whole = encode(context + continuation)`, `context_enc = encode(context)`,
//!   `continuation_enc = whole[len(context_enc):]`. Empty context: `[BOS]` + continuation
//!   encoded without special tokens.
//! * Scoring: input = `(context_enc + continuation_enc)[-(max_len+1):][:-1]`; the last
//!   `len(continuation_enc)` positions' log-softmax at the continuation tokens are summed;
//!   greedy = the argmax at each of those positions is the continuation token.
//! * Metrics: `acc` = argmax of summed log-likelihood == gold; `acc_norm` = argmax of
//!   log-likelihood / `len(choice)` == gold, where — exactly as in the harness —
//!   `len(choice)` is the length of the choice string *without* the leading delimiter space,
//!   in Unicode characters (Python `len(str)`); `acc_bytes` (an optional harness metric, not in
//!   these tasks' default metric lists) divides by the UTF-8 byte length of the same string
//!   instead. On ASCII choices `acc_norm == acc_bytes`. BoolQ reports `acc` only. LAMBADA: `acc`
//!   = greedy match of the whole target, `perplexity` = exp(−mean over items of the target's
//!   summed log-likelihood).
//! * Standard errors: `mean_stderr` = sample stddev (n−1) / √n, i.e. √(p(1−p)/(n−1)) for 0/1
//!   scores, for every accuracy. The harness bootstraps perplexity's stderr (100 000 resamples);
//!   we report none for perplexity.
//!
//! Batching: requests are sorted by input length (longest first) and packed into batches under a
//! token budget; shorter sequences are right-padded to the batch's length. The model is causal,
//! so padding after a sequence cannot change its real positions' outputs; only the rows that
//! score continuation tokens go through the final norm and LM head.

use crate::model::llama::Model;
use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::OnceLock;
use tokenizers::Tokenizer;

/// Maximum number of tokens (batch × padded length) per forward call.
const TOKEN_BUDGET: usize = 4096;
/// Maximum number of sequences per forward call.
const MAX_BATCH: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Task {
    Piqa,
    ArcEasy,
    ArcChallenge,
    Hellaswag,
    Boolq,
    Lambada,
}

impl Task {
    pub const ALL: [Task; 6] = [
        Task::Piqa,
        Task::ArcEasy,
        Task::ArcChallenge,
        Task::Hellaswag,
        Task::Boolq,
        Task::Lambada,
    ];

    /// `piqa`, `arc_easy`, `arc_challenge`, `hellaswag`, `boolq`, `lambada` (also
    /// `lambada_openai`, the harness's name for the same task).
    pub fn from_name(name: &str) -> Result<Task> {
        Ok(match name.trim().to_ascii_lowercase().as_str() {
            "piqa" => Task::Piqa,
            "arc_easy" => Task::ArcEasy,
            "arc_challenge" => Task::ArcChallenge,
            "hellaswag" => Task::Hellaswag,
            "boolq" => Task::Boolq,
            "lambada" | "lambada_openai" => Task::Lambada,
            other => bail!(
                "unknown task `{other}` (expected one of piqa, arc_easy, arc_challenge, \
                 hellaswag, boolq, lambada)"
            ),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Task::Piqa => "piqa",
            Task::ArcEasy => "arc_easy",
            Task::ArcChallenge => "arc_challenge",
            Task::Hellaswag => "hellaswag",
            Task::Boolq => "boolq",
            Task::Lambada => "lambada",
        }
    }

    /// Number of items in the full evaluation split shipped under shared/data.
    pub fn expected_len(self) -> usize {
        match self {
            Task::Piqa => 1838,
            Task::ArcEasy => 2376,
            Task::ArcChallenge => 1172,
            Task::Hellaswag => 10042,
            Task::Boolq => 3270,
            Task::Lambada => 5153,
        }
    }

    /// Whether the task is multiple choice (acc by argmax over choices) rather than a cloze
    /// (LAMBADA: one target, acc by greedy match).
    pub fn is_multiple_choice(self) -> bool {
        self != Task::Lambada
    }
}

/// One evaluation item. Every request is `(context, " " + choice)`. For LAMBADA `choices` is
/// the single target word (without its leading space) and `gold` is 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Doc {
    pub context: String,
    pub choices: Vec<String>,
    pub gold: usize,
}

impl Doc {
    pub fn continuation(&self, i: usize) -> String {
        format!(" {}", self.choices[i])
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct TaskResult {
    pub task: String,
    /// Items scored.
    pub n: usize,
    pub metrics: BTreeMap<String, f64>,
    /// Standard error of the mean of each accuracy metric (none for perplexity).
    pub stderr: BTreeMap<String, f64>,
}

// ------------------------------------------------------------------------------------------
// Loading
// ------------------------------------------------------------------------------------------

fn read_jsonl(path: &Path, limit: Option<usize>) -> Result<Vec<serde_json::Value>> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let r: Box<dyn Read> = if path.extension().map(|e| e == "gz").unwrap_or(false) {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    let mut out = Vec::new();
    for (i, line) in BufReader::new(r).lines().enumerate() {
        if limit.map(|l| out.len() >= l).unwrap_or(false) {
            break;
        }
        let line = line.with_context(|| format!("{}:{}: read error", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line)
                .with_context(|| format!("{}:{}: not valid JSON", path.display(), i + 1))?,
        );
    }
    Ok(out)
}

fn get_str<'a>(v: &'a serde_json::Value, key: &str, path: &Path, i: usize) -> Result<&'a str> {
    v.get(key).and_then(|s| s.as_str()).with_context(|| {
        format!(
            "{}: item {}: no string field `{key}`",
            path.display(),
            i + 1
        )
    })
}

impl Task {
    /// The files [`load`] reads for this task under `data_root` (what a cached score of the
    /// task depends on).
    pub fn data_files(self, data_root: &Path) -> Vec<std::path::PathBuf> {
        let f: &[&str] = match self {
            Task::Piqa => &["piqa/valid.jsonl", "piqa/valid-labels.lst"],
            Task::ArcEasy => &["arc/ARC-Easy-Test.jsonl"],
            Task::ArcChallenge => &["arc/ARC-Challenge-Test.jsonl"],
            Task::Hellaswag => &["hellaswag/hellaswag_val.jsonl.gz"],
            Task::Boolq => &["boolq/val.jsonl"],
            Task::Lambada => &["lambada/lambada_test.jsonl"],
        };
        f.iter().map(|f| data_root.join(f)).collect()
    }
}

/// Load the first `limit` items (all when `None`) of `task` from `data_root` (the
/// `shared/data/eval/tasks` directory).
pub fn load(task: Task, data_root: &Path, limit: Option<usize>) -> Result<Vec<Doc>> {
    match task {
        Task::Piqa => load_piqa(data_root, limit),
        Task::ArcEasy => load_arc(&data_root.join("arc/ARC-Easy-Test.jsonl"), limit),
        Task::ArcChallenge => load_arc(&data_root.join("arc/ARC-Challenge-Test.jsonl"), limit),
        Task::Hellaswag => load_hellaswag(data_root, limit),
        Task::Boolq => load_boolq(data_root, limit),
        Task::Lambada => load_lambada(data_root, limit),
    }
}

fn load_piqa(root: &Path, limit: Option<usize>) -> Result<Vec<Doc>> {
    let path = root.join("piqa/valid.jsonl");
    let lpath = root.join("piqa/valid-labels.lst");
    let items = read_jsonl(&path, limit)?;
    let labels = std::fs::read_to_string(&lpath)
        .with_context(|| format!("cannot read {}", lpath.display()))?;
    let labels: Vec<&str> = labels.lines().collect();
    ensure!(
        labels.len() >= items.len(),
        "{}: {} labels for {} items",
        lpath.display(),
        labels.len(),
        items.len()
    );
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let gold: usize = labels[i].trim().parse().with_context(|| {
                format!("{}:{}: bad label `{}`", lpath.display(), i + 1, labels[i])
            })?;
            ensure!(gold < 2, "{}:{}: label {gold} > 1", lpath.display(), i + 1);
            Ok(Doc {
                context: format!("Question: {}\nAnswer:", get_str(v, "goal", &path, i)?),
                choices: vec![
                    get_str(v, "sol1", &path, i)?.to_string(),
                    get_str(v, "sol2", &path, i)?.to_string(),
                ],
                gold,
            })
        })
        .collect()
}

fn load_arc(path: &Path, limit: Option<usize>) -> Result<Vec<Doc>> {
    let items = read_jsonl(path, limit)?;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let q = v
                .get("question")
                .with_context(|| format!("{}: item {}: no `question`", path.display(), i + 1))?;
            let stem = get_str(q, "stem", path, i)?;
            let choices = q
                .get("choices")
                .and_then(|c| c.as_array())
                .with_context(|| format!("{}: item {}: no choices", path.display(), i + 1))?;
            let mut texts = Vec::new();
            let mut labels = Vec::new();
            for c in choices {
                texts.push(get_str(c, "text", path, i)?.to_string());
                labels.push(get_str(c, "label", path, i)?.to_string());
            }
            let key = get_str(v, "answerKey", path, i)?;
            let gold = labels.iter().position(|l| l == key).with_context(|| {
                format!(
                    "{}: item {}: answerKey {key} not among labels {labels:?}",
                    path.display(),
                    i + 1
                )
            })?;
            Ok(Doc {
                context: format!("Question: {stem}\nAnswer:"),
                choices: texts,
                gold,
            })
        })
        .collect()
}

fn bracket_re() -> &'static regex::Regex {
    static RE: OnceLock<regex::Regex> = OnceLock::new();
    RE.get_or_init(|| regex::Regex::new(r"\[.*?\]").expect("static regex"))
}

/// The harness's `hellaswag/utils.py::preprocess`: strip, `" [title]"` → `". "`, remove every
/// `[...]` (non-greedy), then replace `"  "` by `" "` (one pass, as Python's `str.replace`).
pub fn preprocess_hellaswag(text: &str) -> String {
    let t = text.trim().replace(" [title]", ". ");
    let t = bracket_re().replace_all(&t, "");
    t.replace("  ", " ")
}

/// Python's `str.capitalize()`: first character upper-cased, the rest lower-cased.
fn py_capitalize(s: &str) -> String {
    let mut it = s.chars();
    match it.next() {
        None => String::new(),
        Some(c) => c
            .to_uppercase()
            .chain(it.flat_map(|c| c.to_lowercase()))
            .collect(),
    }
}

/// The harness's HellaSwag query rebuilt from this data set's line, where `ctx` is
/// `activity_label + ": " + ctx` with the original `ctx = ctx_a + " " + ctx_b` (not
/// capitalized) already cleaned by extract_hellaswag.cpp (markers removed, `" [title]"` →
/// `". "`, double spaces collapsed).
///
/// The harness builds `preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`.
/// `ctx_a`/`ctx_b` are not stored separately here, so `ctx_b` is taken to be the text after the
/// last `". "` when that text starts with a lower-case letter; it is then capitalized. This is
/// exact for the ActivityNet items (3243 of 10042: their `ctx_b` is a lower-case fragment such
/// as "he" or "the lady" following a sentence of `ctx_a`). Unavoidable differences: a `ctx_b`
/// that itself contains `". "`, or that starts with a digit or quote, cannot be told apart
/// (Python's `capitalize` would also lower-case the rest of such a `ctx_b`; none of the
/// lower-case fragments here has an upper-case letter, so that part is moot); WikiHow items
/// (sentences starting upper-case, usually empty `ctx_b`) are left as they are. The harness's
/// `preprocess` is applied again on top (idempotent on cleaned text; it also removes the 42
/// residual `[...]` spans the C++ cleaner left, as the harness does).
pub fn hellaswag_query(activity_label: &str, ctx: &str) -> String {
    let prefix = format!("{activity_label}: ");
    let (label_part, rest) = match ctx.strip_prefix(&prefix) {
        Some(r) => (prefix.as_str(), r),
        None => ("", ctx),
    };
    let rebuilt = match rest.rfind(". ") {
        Some(i) if rest[i + 2..].starts_with(|c: char| c.is_lowercase()) => {
            format!(
                "{label_part}{} {}",
                &rest[..i + 1],
                py_capitalize(&rest[i + 2..])
            )
        }
        _ => format!("{label_part}{rest}"),
    };
    preprocess_hellaswag(&rebuilt)
}

fn load_hellaswag(root: &Path, limit: Option<usize>) -> Result<Vec<Doc>> {
    let path = root.join("hellaswag/hellaswag_val.jsonl.gz");
    let items = read_jsonl(&path, limit)?;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let label = get_str(v, "activity_label", &path, i)?;
            let ctx = get_str(v, "ctx", &path, i)?;
            let endings = v
                .get("endings")
                .and_then(|e| e.as_array())
                .with_context(|| format!("{}: item {}: no endings", path.display(), i + 1))?;
            let choices = endings
                .iter()
                .map(|e| {
                    e.as_str()
                        .map(preprocess_hellaswag)
                        .with_context(|| format!("{}: item {}: bad ending", path.display(), i + 1))
                })
                .collect::<Result<Vec<_>>>()?;
            let gold = match v.get("label") {
                Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| x as usize),
                Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
                _ => None,
            }
            .with_context(|| format!("{}: item {}: bad label", path.display(), i + 1))?;
            ensure!(
                gold < choices.len(),
                "{}: item {}: label out of range",
                path.display(),
                i + 1
            );
            Ok(Doc {
                context: hellaswag_query(label, ctx),
                choices,
                gold,
            })
        })
        .collect()
}

fn load_boolq(root: &Path, limit: Option<usize>) -> Result<Vec<Doc>> {
    let path = root.join("boolq/val.jsonl");
    let items = read_jsonl(&path, limit)?;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let passage = get_str(v, "passage", &path, i)?;
            let question = get_str(v, "question", &path, i)?;
            let yes = match v.get("label") {
                Some(serde_json::Value::Bool(b)) => Some(*b),
                Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| x == 1),
                Some(serde_json::Value::String(s)) => {
                    match s.trim().to_ascii_lowercase().as_str() {
                        "true" | "1" => Some(true),
                        "false" | "0" => Some(false),
                        _ => None,
                    }
                }
                _ => None,
            }
            .with_context(|| format!("{}: item {}: bad label", path.display(), i + 1))?;
            Ok(Doc {
                context: format!("{passage}\nQuestion: {question}?\nAnswer:"),
                choices: vec!["no".to_string(), "yes".to_string()],
                gold: yes as usize,
            })
        })
        .collect()
}

fn load_lambada(root: &Path, limit: Option<usize>) -> Result<Vec<Doc>> {
    let path = root.join("lambada/lambada_test.jsonl");
    let items = read_jsonl(&path, limit)?;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let text = get_str(v, "text", &path, i)?;
            // doc_to_text: text.split(' ')[:-1] joined by ' '; doc_to_target: ' ' + last piece.
            let (ctx, word) = text.rsplit_once(' ').with_context(|| {
                format!("{}: item {}: text has no space", path.display(), i + 1)
            })?;
            Ok(Doc {
                context: ctx.to_string(),
                choices: vec![word.to_string()],
                gold: 0,
            })
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// Tokenization
// ------------------------------------------------------------------------------------------

fn encode(tok: &Tokenizer, text: &str, special: bool) -> Result<Vec<u32>> {
    Ok(tok
        .encode(text, special)
        .map_err(|e| anyhow::anyhow!("tokenization failed: {e}"))?
        .get_ids()
        .to_vec())
}

/// The harness's `(context_enc, continuation_enc)` for a causal model (see module docs).
pub fn encode_pair(
    tok: &Tokenizer,
    context: &str,
    continuation: &str,
) -> Result<(Vec<u32>, Vec<u32>)> {
    if context.is_empty() {
        let bos = encode(tok, "", true)?;
        let cont = encode(tok, continuation, false)?;
        let Some(&prefix) = bos.first() else {
            bail!("empty context and the tokenizer adds no BOS");
        };
        return Ok(if cont.first() != Some(&prefix) {
            (vec![prefix], cont)
        } else {
            (cont[..1].to_vec(), cont[1..].to_vec())
        });
    }
    let trimmed = context.trim_end();
    let moved = &context[trimmed.len()..];
    let whole = encode(tok, &format!("{trimmed}{moved}{continuation}"), true)?;
    let ctx = encode(tok, trimmed, true)?;
    let cont = whole.get(ctx.len()..).unwrap_or(&[]).to_vec();
    Ok((ctx, cont))
}

// ------------------------------------------------------------------------------------------
// Scoring
// ------------------------------------------------------------------------------------------

/// (Σ log p(continuation token), every continuation token is the argmax) for each
/// `(context_enc, continuation_enc)` request, from the model's logits, truncating from the left
/// to at most `max_len` input tokens.
pub fn loglikelihood(
    model: &Model,
    requests: &[(Vec<u32>, Vec<u32>)],
    max_len: usize,
) -> Result<Vec<(f64, bool)>> {
    loglikelihood_with(model, requests, max_len, &mut |_| {})
}

/// As [`loglikelihood`]; `on_done(k)` is told after each forward call that `k` more requests are
/// done.
pub fn loglikelihood_with(
    model: &Model,
    requests: &[(Vec<u32>, Vec<u32>)],
    max_len: usize,
    on_done: &mut dyn FnMut(usize),
) -> Result<Vec<(f64, bool)>> {
    ensure!(max_len > 0, "max_len must be positive");
    // (input tokens, continuation tokens) after left truncation.
    let mut prepared: Vec<(Vec<u32>, &[u32])> = Vec::with_capacity(requests.len());
    for (i, (ctx, cont)) in requests.iter().enumerate() {
        ensure!(
            cont.len() <= max_len,
            "request {i}: continuation of {} tokens exceeds max_len {max_len}",
            cont.len()
        );
        ensure!(
            !ctx.is_empty() || cont.is_empty(),
            "request {i}: empty context (the context must hold at least BOS)"
        );
        let mut all: Vec<u32> = Vec::with_capacity(ctx.len() + cont.len());
        all.extend_from_slice(ctx);
        all.extend_from_slice(cont);
        let start = all.len().saturating_sub(max_len + 1);
        let mut input = all[start..].to_vec();
        input.pop();
        prepared.push((input, cont.as_slice()));
    }
    let mut out = vec![(0f64, true); requests.len()];
    // Longest first; ties in request order (deterministic batches).
    let mut order: Vec<usize> = (0..requests.len())
        .filter(|&i| !prepared[i].1.is_empty())
        .collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(prepared[i].0.len()), i));
    let empty = requests.len() - order.len();
    if empty > 0 {
        on_done(empty);
    }
    let vocab = model.config.vocab_size;
    let mut pos = 0;
    while pos < order.len() {
        let t = prepared[order[pos]].0.len();
        let b = (TOKEN_BUDGET / t)
            .clamp(1, MAX_BATCH)
            .min(order.len() - pos);
        let batch = &order[pos..pos + b];
        let mut ids = Vec::with_capacity(b * t);
        let mut rows: Vec<usize> = Vec::new();
        for (k, &r) in batch.iter().enumerate() {
            let (input, cont) = &prepared[r];
            ids.extend_from_slice(input);
            // Right padding (causal model: never seen by the real positions).
            let pad = *input.last().expect("non-empty input");
            ids.extend(std::iter::repeat_n(pad, t - input.len()));
            let first = input.len() - cont.len();
            rows.extend((first..input.len()).map(|p| k * t + p));
        }
        let hidden = model.hidden(&ids, b, t)?;
        // Final norm + LM head on the scoring rows only (row = sequence · t + position).
        let logits = model.outer.logits_rows(&hidden, &rows);
        ensure!(
            logits.len() == rows.len() * vocab,
            "logits have {} values, expected {} rows × {vocab}",
            logits.len(),
            rows.len()
        );
        let targets: Vec<u32> = batch
            .iter()
            .flat_map(|&r| prepared[r].1.iter().copied())
            .collect();
        let scored: Vec<(f64, bool)> = targets
            .par_iter()
            .enumerate()
            .map(|(row, &tgt)| token_logprob(&logits[row * vocab..(row + 1) * vocab], tgt))
            .collect();
        let mut off = 0;
        for &r in batch {
            let n = prepared[r].1.len();
            let s = &scored[off..off + n];
            out[r] = (s.iter().map(|x| x.0).sum(), s.iter().all(|x| x.1));
            off += n;
        }
        pos += b;
        on_done(b);
    }
    Ok(out)
}

/// (log softmax(row)[target] in f64, target is the row's argmax — first maximum on ties).
pub fn token_logprob(row: &[f32], target: u32) -> (f64, bool) {
    let mut best = 0usize;
    for (j, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = j;
        }
    }
    let m = row[best] as f64;
    let s: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
    (
        row[target as usize] as f64 - m - s.ln(),
        best == target as usize,
    )
}

/// The harness's choice: `argmax(lls)` (`norm` false) or `argmax(lls / lens)` (`norm` true),
/// the first maximum on ties (numpy's argmax).
pub fn pick(lls: &[f64], lens: &[usize], norm: bool) -> usize {
    assert!(!lls.is_empty(), "no choices");
    assert!(!norm || lens.len() == lls.len(), "one length per choice");
    let score = |i: usize| {
        if norm {
            lls[i] / lens[i] as f64
        } else {
            lls[i]
        }
    };
    let mut best = 0;
    for i in 1..lls.len() {
        if score(i) > score(best) {
            best = i;
        }
    }
    best
}

/// The harness's `mean_stderr`: sample standard deviation (n−1) / √n.
pub fn mean_stderr(xs: &[f64]) -> f64 {
    let n = xs.len() as f64;
    if xs.len() < 2 {
        return f64::NAN;
    }
    let mu = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / (n - 1.0);
    var.sqrt() / n.sqrt()
}

/// Metrics of a multiple-choice task from each doc's per-choice log-likelihoods.
pub fn mc_metrics(
    task: Task,
    docs: &[Doc],
    lls: &[Vec<f64>],
) -> (BTreeMap<String, f64>, BTreeMap<String, f64>) {
    let mut acc = Vec::with_capacity(docs.len());
    let mut acc_norm = Vec::with_capacity(docs.len());
    let mut acc_bytes = Vec::with_capacity(docs.len());
    for (d, l) in docs.iter().zip(lls) {
        let chars: Vec<usize> = d.choices.iter().map(|c| c.chars().count()).collect();
        let bytes: Vec<usize> = d.choices.iter().map(|c| c.len()).collect();
        let hit = |p: usize| if p == d.gold { 1.0 } else { 0.0 };
        acc.push(hit(pick(l, &chars, false)));
        acc_norm.push(hit(pick(l, &chars, true)));
        acc_bytes.push(hit(pick(l, &bytes, true)));
    }
    let mut metrics = BTreeMap::new();
    let mut stderr = BTreeMap::new();
    let mut put = |name: &str, xs: &[f64]| {
        metrics.insert(name.to_string(), xs.iter().sum::<f64>() / xs.len() as f64);
        // undefined for n = 1 (NaN): left out, so report.json stays valid JSON
        let e = mean_stderr(xs);
        if e.is_finite() {
            stderr.insert(name.to_string(), e);
        }
    };
    put("acc", &acc);
    if task != Task::Boolq {
        put("acc_norm", &acc_norm);
        put("acc_bytes", &acc_bytes);
    }
    (metrics, stderr)
}

/// Score `task` (first `limit` items) with `model`; inputs truncated from the left to `max_len`
/// tokens (the model's rope table must cover `max_len`).
pub fn evaluate(
    model: &Model,
    tok: &Tokenizer,
    task: Task,
    data_root: &Path,
    limit: Option<usize>,
    max_len: usize,
) -> Result<TaskResult> {
    let docs = load(task, data_root, limit)?;
    ensure!(!docs.is_empty(), "{}: no items", task.name());
    // Requests: one per (doc, choice); the context encoded once per doc.
    let per_doc: Vec<Vec<(Vec<u32>, Vec<u32>)>> = docs
        .par_iter()
        .map(|d| {
            (0..d.choices.len())
                .map(|c| encode_pair(tok, &d.context, &d.continuation(c)))
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    let requests: Vec<(Vec<u32>, Vec<u32>)> = per_doc.into_iter().flatten().collect();
    let pb = crate::progress::bar(requests.len() as u64, task.name());
    let results = loglikelihood_with(model, &requests, max_len, &mut |k| pb.inc(k as u64))?;
    pb.finish_and_clear();

    let mut lls: Vec<Vec<f64>> = Vec::with_capacity(docs.len());
    let mut greedy: Vec<Vec<bool>> = Vec::with_capacity(docs.len());
    let mut it = results.into_iter();
    for d in &docs {
        let (l, g): (Vec<f64>, Vec<bool>) = it.by_ref().take(d.choices.len()).unzip();
        lls.push(l);
        greedy.push(g);
    }
    let (metrics, stderr) = if task.is_multiple_choice() {
        mc_metrics(task, &docs, &lls)
    } else {
        let acc: Vec<f64> = greedy.iter().map(|g| g[0] as u8 as f64).collect();
        let ll: Vec<f64> = lls.iter().map(|l| l[0]).collect();
        let n = docs.len() as f64;
        let mut m = BTreeMap::new();
        let mut s = BTreeMap::new();
        m.insert("acc".to_string(), acc.iter().sum::<f64>() / n);
        let e = mean_stderr(&acc);
        if e.is_finite() {
            s.insert("acc".to_string(), e);
        }
        m.insert(
            "perplexity".to_string(),
            (-ll.iter().sum::<f64>() / n).exp(),
        );
        (m, s)
    };
    Ok(TaskResult {
        task: task.name().to_string(),
        n: docs.len(),
        metrics,
        stderr,
    })
}
