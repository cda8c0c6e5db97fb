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

/// A writable copy of the reference model in `dir/model`.
pub fn model_copy(dir: &std::path::Path) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(ref_model().join(f), m.join(f)).unwrap();
    }
    m
}

/// Write `dir/p.yaml`: `model` through `output` with one RTN pass (`rtn` holds its fields,
/// e.g. `bits: 4, group_size: 128`), exported as compressed-tensors; run it, asserting success.
pub fn run_rtn(
    dir: &std::path::Path,
    model: &std::path::Path,
    output: &std::path::Path,
    rtn: &str,
) {
    let p = dir.join("p.yaml");
    std::fs::write(
        &p,
        format!(
            "model: {}\noutput: {}\npasses:\n  - rtn: {{{rtn}}}\nexport: {{format: compressed-tensors}}\n",
            model.display(),
            output.display()
        ),
    )
    .unwrap();
    run_ok(&p);
}
