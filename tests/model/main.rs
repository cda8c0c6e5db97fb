//! The model and its evaluation: architecture goldens, forward, perplexity, zero-shot tasks, evaluation cache and precision.
//!
//! One test binary per concern (linking the crate once each); each file below was its own
//! binary before. Run one file's tests with `cargo test --release --test model <file>::`.

#[path = "../common/mod.rs"]
mod common;

mod arch_golden;
mod arch_table;
mod eval_cache;
mod eval_precision;
mod eval_speed;
mod forward_golden;
mod golden_ppl;
mod zero_shot;
