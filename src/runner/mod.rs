//! What the CLI commands do, as library functions (the binary is a thin clap layer).
//! This file only names the parts and re-exports their public items under `runner::`.

mod assemble;
mod baseline;
mod compress;
mod lifecycle;
mod scoring;

pub use crate::eval::dataset_key;
pub use assemble::{tensors_identical, write_checksums};
pub use lifecycle::{run_pipeline, run_pipeline_with, KeptForResume, RunOptions};
pub use scoring::{
    eval_perplexity, eval_perplexity_each, eval_perplexity_protocol, eval_tasks, eval_tasks_each,
    protocol_named, write_logits,
};
