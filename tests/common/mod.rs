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

/// Run `compress PIPELINE --quiet`, asserting success.
pub fn run_ok(pipeline: &std::path::Path) -> std::process::Output {
    let o = std::process::Command::new(bin())
        .arg(pipeline)
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}
