//! The formats we write and read: GGUF, compressed-tensors goldens, packing, linear representations, config blocks, the interop suite.
//!
//! One test binary per concern (linking the crate once each); each file below was its own
//! binary before. Run one file's tests with `cargo test --release --test formats <file>::`.

#[path = "../common/mod.rs"]
mod common;

mod config_block;
mod ggml_codecs;
mod gguf_export;
mod golden_compressed_tensors;
mod interop;
mod linear_repr;
mod pack_roundtrip;
mod packing_fixtures;
