//! The methods against their papers and references: GPTQ, GPTAQ, AWQ, pruning, low rank, KD, mixtures of experts, the size budget.
//!
//! One test binary per concern (linking the crate once each); each file below was its own
//! binary before. Run one file's tests with `cargo test --release --test methods <file>::`.

#[path = "../common/mod.rs"]
mod common;

mod allocation;
mod awq;
mod gptaq;
mod gptq_math;
mod kd;
mod low_rank;
mod moe;
mod pruning;
