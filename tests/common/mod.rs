#![allow(dead_code)]
//! Paths to ../shared (never copied into this repository).

use std::path::PathBuf;

pub fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

pub fn ref_model() -> PathBuf {
    shared().join("models/ref-llama-9m")
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_compress"))
}
