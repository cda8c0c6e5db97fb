//! Whole runs: example pipelines end to end, resume after kills at every phase, pass state, streams, several exports, byte identity.
//!
//! One test binary per concern (linking the crate once each); each file below was its own
//! binary before. Run one file's tests with `cargo test --release --test pipeline <file>::`.

#[path = "../common/mod.rs"]
mod common;

mod byte_identity;
mod engine_streams;
mod multi_export;
mod pass_state;
mod pipeline_e2e;
mod resume;
mod resume_phases;
