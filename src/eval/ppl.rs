//! Perplexity: the text tokenized once, cut into non-overlapping windows of `seq_len` tokens
//! (remainder dropped), loss over every predicted token (seq_len − 1 per window),
//! ppl = exp(mean NLL). The GPTQ / SparseGPT / Wanda protocol; golden values from transformers.

use crate::model::llama::Model;
use anyhow::Result;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PplResult {
    pub perplexity: f64,
    /// Tokens of the whole tokenized text (BOS included).
    pub tokens: usize,
    pub windows: usize,
    /// Mean negative log-likelihood per predicted token.
    pub nll: f64,
    /// The fewest windows the text's length allows (see [`crate::calib::min_tokens`]): fewer
    /// `windows` than this mean the text was cut before it was scored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_windows: Option<usize>,
}

impl PplResult {
    /// A warning when the set yielded fewer windows than its length allows (`set` names it).
    pub fn short_warning(&self, set: &str) -> Option<String> {
        let min = self.min_windows.filter(|&m| self.windows < m)?;
        Some(format!(
            "{set}: {} windows ({} tokens) scored, but the text's length allows at least {min}: the text was cut short before scoring",
            self.windows, self.tokens
        ))
    }
}

/// Σ −log softmax(logits)[target] over rows, in f64.
pub fn nll_sum(logits: &[f32], vocab: usize, targets: &[u32]) -> f64 {
    use rayon::prelude::*;
    targets
        .par_iter()
        .enumerate()
        .map(|(r, &tgt)| {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let s: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
            m + s.ln() - row[tgt as usize] as f64
        })
        .collect::<Vec<f64>>()
        .iter()
        .sum()
}

/// Perplexity of `tokens` under `model`. `on_window` is told how many windows are done.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    seq_len: usize,
    batch: usize,
    on_window: &mut dyn FnMut(usize),
) -> Result<PplResult> {
    let windows = tokens.len() / seq_len;
    anyhow::ensure!(
        windows > 0,
        "text has {} tokens, fewer than one window of {seq_len}",
        tokens.len()
    );
    let vocab = model.config.vocab_size;
    let mut total = 0f64;
    let mut count = 0usize;
    let mut w = 0;
    while w < windows {
        let b = batch.min(windows - w);
        let ids = &tokens[w * seq_len..(w + b) * seq_len];
        let logits = model.logits(ids, b, seq_len)?;
        for i in 0..b {
            let rows = &logits[i * seq_len * vocab..((i + 1) * seq_len - 1) * vocab];
            let targets = &ids[i * seq_len + 1..(i + 1) * seq_len];
            total += nll_sum(rows, vocab, targets);
            count += seq_len - 1;
        }
        w += b;
        on_window(w);
    }
    let nll = total / count as f64;
    Ok(PplResult {
        perplexity: nll.exp(),
        tokens: tokens.len(),
        windows,
        nll,
        min_windows: None,
    })
}
