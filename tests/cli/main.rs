//! The command line: help, bad input and its errors, parsing, tokenizers, verify, reports, signals, disk full, the module graph.
//!
//! One test binary per concern (linking the crate once each); each file below was its own
//! binary before. Run one file's tests with `cargo test --release --test cli <file>::`.

#[path = "../common/mod.rs"]
mod common;

mod bad_input;
mod bench_smoke;
mod cli_help;
mod disk_full;
mod module_graph;
mod nonfinite;
mod parser_mutation;
mod report_html;
mod side_by_side;
mod tokenizer_quirks;
mod verify;
