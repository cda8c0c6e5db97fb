//! Evaluation: perplexity by the fixed protocol of DESIGN.md.

pub mod ppl;
pub mod tasks;
