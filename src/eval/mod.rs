//! Evaluation by a fixed protocol, so numbers compare across runs and tools: perplexity of the
//! text tokenized once, in non-overlapping windows of `seq_len` tokens (remainder dropped),
//! loss over every predicted token, ppl = exp(mean NLL) — the GPTQ/SparseGPT/Wanda protocol —
//! and lm-evaluation-harness zero-shot scoring ([`tasks`]).

pub mod cache;
pub mod ppl;
pub mod tasks;
