//! Evaluation by a fixed protocol, so numbers compare across runs and tools: perplexity of the
//! text tokenized once, in non-overlapping windows of `seq_len` tokens (remainder dropped),
//! loss over every predicted token, ppl = exp(mean NLL) — the GPTQ/SparseGPT/Wanda protocol —
//! and lm-evaluation-harness zero-shot scoring ([`tasks`]).

pub mod cache;
pub mod ppl;
pub mod tasks;

/// Key of a dataset in reports and the evaluation cache: its file name.
pub fn dataset_key(p: &std::path::Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| p.display().to_string())
}
