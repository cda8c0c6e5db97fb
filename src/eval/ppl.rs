//! Perplexity: the text tokenized once, cut into non-overlapping windows of `seq_len` tokens
//! (remainder dropped), loss over every predicted token (seq_len − 1 per window),
//! ppl = exp(mean NLL). The GPTQ / SparseGPT / Wanda protocol; golden values from transformers.

use crate::model::llama::Model;
use crate::model::ops;
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

/// Bytes of logits the perplexity loop holds at once.
const HEAD_BLOCK_BYTES: usize = 64 << 20;
/// Fewest rows in a block of the LM head (see [`perplexity_chunked`]).
const MIN_BLOCK: usize = 8;

/// Σ −log softmax(logits)[target] over rows, in f64 (see [`nll_rows`]).
pub fn nll_sum(logits: &[f32], vocab: usize, targets: &[u32]) -> f64 {
    nll_rows(logits, vocab, targets).iter().sum()
}

/// −log softmax(logits)[target] of each row: the max and the target's logit exactly, the sum
/// of exp(x − max) over the vocabulary with [`ops::exp_f32`] (≤ 2 ulp) in f64 lanes. That sum was an
/// f64 `exp` per logit (≈ 10% of an evaluation's time on a 49k vocabulary); the f32 exponential
/// changes each term by at most ~2·10⁻⁷ relative, far below the f32 logits' own rounding.
pub fn nll_rows(logits: &[f32], vocab: usize, targets: &[u32]) -> Vec<f64> {
    use rayon::prelude::*;
    targets
        .par_iter()
        .enumerate()
        .map(|(r, &tgt)| {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let m = ops::max_f32(row);
            m as f64 + sum_exp(row, m).ln() - row[tgt as usize] as f64
        })
        .collect()
}

/// Σ exp(x − m) over `row` (every x ≤ m), eight f64 lanes the compiler vectorizes.
fn sum_exp(row: &[f32], m: f32) -> f64 {
    const L: usize = 8;
    let mut acc = [0f64; L];
    let mut chunks = row.chunks_exact(L);
    for c in &mut chunks {
        for l in 0..L {
            acc[l] += ops::exp_f32(c[l] - m) as f64;
        }
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&x| ops::exp_f32(x - m) as f64)
        .sum();
    acc.iter().sum::<f64>() + tail
}

/// Perplexity of `tokens` under `model`. `on_window` is told how many windows are done.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    seq_len: usize,
    batch: usize,
    on_window: &mut dyn FnMut(usize),
) -> Result<PplResult> {
    perplexity_with(model, tokens, seq_len, batch, Protocol::Windows, on_window)
}

/// Rows of the LM head computed at a time: at most `HEAD_BLOCK_BYTES` of logits, 128–1024 rows.
fn head_chunk(model: &Model) -> usize {
    (HEAD_BLOCK_BYTES / (4 * model.config.vocab_size.max(1))).clamp(128, 1024)
}

/// Which tokens of the text are scored, and how windows start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Non-overlapping windows of `seq_len` tokens, every predicted token scored (seq_len − 1 per
    /// window): the GPTQ / SparseGPT / Wanda protocol, the one our reports and goldens use.
    Windows,
    /// llama.cpp's `llama-perplexity` (tools/perplexity/perplexity.cpp, `perplexity()`): the
    /// same chunks of n_ctx = `seq_len` tokens, but the first token of each chunk replaced by
    /// BOS when the tokenizer adds one, and only the second half scored — the logits at
    /// positions n_ctx/2 … n_ctx − 2 predict tokens n_ctx/2 + 1 … n_ctx − 1 (n_ctx/2 − 1 tokens
    /// per chunk, each with at least half a window of context). For comparing with
    /// llama-perplexity on the same windows.
    LlamaCpp {
        /// The BOS id the tokenizer adds (None: the chunks keep their first token).
        bos: Option<u32>,
    },
}

impl Protocol {
    /// First position of a window whose logits are scored.
    fn first_scored(self, seq_len: usize) -> usize {
        match self {
            Protocol::Windows => 0,
            Protocol::LlamaCpp { .. } => seq_len / 2,
        }
    }
}

/// [`perplexity`] with the LM head and the loss computed `chunk` rows at a time (the result
/// does not depend on `chunk`: the same bits for any value).
pub fn perplexity_chunked(
    model: &Model,
    tokens: &[u32],
    seq_len: usize,
    batch: usize,
    chunk: usize,
    on_window: &mut dyn FnMut(usize),
) -> Result<PplResult> {
    perplexity_protocol(
        model,
        tokens,
        seq_len,
        batch,
        chunk,
        Protocol::Windows,
        on_window,
    )
}

/// Perplexity of `tokens` under `model` scored as `protocol` says (see [`Protocol`]).
pub fn perplexity_with(
    model: &Model,
    tokens: &[u32],
    seq_len: usize,
    batch: usize,
    protocol: Protocol,
    on_window: &mut dyn FnMut(usize),
) -> Result<PplResult> {
    perplexity_protocol(
        model,
        tokens,
        seq_len,
        batch,
        head_chunk(model),
        protocol,
        on_window,
    )
}

fn perplexity_protocol(
    model: &Model,
    tokens: &[u32],
    seq_len: usize,
    batch: usize,
    chunk: usize,
    protocol: Protocol,
    on_window: &mut dyn FnMut(usize),
) -> Result<PplResult> {
    // faer's product of a single row (m = 1) sums in another order: blocks keep >= 8 rows
    anyhow::ensure!(chunk >= MIN_BLOCK, "chunk must be at least {MIN_BLOCK}");
    let windows = tokens.len() / seq_len;
    anyhow::ensure!(
        windows > 0,
        "text has {} tokens, fewer than one window of {seq_len}",
        tokens.len()
    );
    let from = protocol.first_scored(seq_len);
    anyhow::ensure!(
        from + 1 < seq_len,
        "a window of {seq_len} tokens leaves nothing to score"
    );
    let vocab = model.config.vocab_size;
    // The LM head and the loss a block of rows at a time: [b·t, vocab] logits are never
    // materialized (400 MB for a batch of 4 × 512 tokens with a 49k vocabulary), only
    // `chunk` rows of them (by default at most 64 MB, and at least 128 rows so the head's
    // weights are read once per 128 rows or more), and the last position of each window,
    // which predicts nothing here, is not projected at all.
    let mut total = 0f64;
    let mut count = 0usize;
    let mut w = 0;
    while w < windows {
        let b = batch.min(windows - w);
        let mut ids = std::borrow::Cow::Borrowed(&tokens[w * seq_len..(w + b) * seq_len]);
        if let Protocol::LlamaCpp { bos: Some(bos) } = protocol {
            let ids = ids.to_mut();
            for i in 0..b {
                ids[i * seq_len] = bos;
            }
        }
        let x = model.hidden(&ids, b, seq_len)?;
        for i in 0..b {
            let (first, last) = (i * seq_len + from, (i + 1) * seq_len - 1);
            let mut r0 = first;
            let mut nll = Vec::with_capacity(last - first);
            while r0 < last {
                // a short tail joins this block (no block of fewer than MIN_BLOCK rows)
                let r1 = if last - r0 < chunk + MIN_BLOCK {
                    last
                } else {
                    r0 + chunk
                };
                let logits = model.outer.logits_range(&x, r0, r1);
                nll.extend(nll_rows(&logits, vocab, &ids[r0 + 1..r1 + 1]));
                r0 = r1;
            }
            // summed in row order, as one window's [`nll_sum`]
            total += nll.iter().sum::<f64>();
            count += last - first;
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn nll_rows_match_a_direct_f64_log_softmax() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        for vocab in [1usize, 7, 8, 9, 1000, 49_157] {
            let rows = 5;
            let logits: Vec<f32> = (0..rows * vocab)
                .map(|_| rng.gen_range(-30.0f32..25.0))
                .collect();
            let targets: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..vocab as u32)).collect();
            let got = nll_rows(&logits, vocab, &targets);
            for (r, &t) in targets.iter().enumerate() {
                let row = &logits[r * vocab..(r + 1) * vocab];
                let m = row.iter().fold(f64::MIN, |a, &b| a.max(b as f64));
                let s: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
                let want = m + s.ln() - row[t as usize] as f64;
                assert!(
                    (got[r] - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "vocab {vocab} row {r}: {} vs {want}",
                    got[r]
                );
            }
        }
    }
}
