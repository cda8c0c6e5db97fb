//! The interop suite (tests/interop/run.py): every format and width we write, on every
//! architecture fixture, loaded by transformers (and GPTQModel for GPTQ v1) with the same
//! logits as `compress logits`. Needs a reference Python: env `COMPRESS_REF_PYTHON`, else
//! ~/.cache/compress-ref-venv/bin/python or /work/refvenv/bin/python when they can
//! `import transformers, compressed_tensors`. `cargo test` lists it as ignored (CI has no
//! reference Python); `scripts/test-with-references.sh` sets one up and runs it, and run
//! without one it fails.
//! GPTQ cells use env `COMPRESS_GPTQ_PYTHON` (or what run.py finds); without gptqmodel they are
//! "golden-only" and tests/formats/packing_fixtures.rs covers their bytes. `COMPRESS_INTEROP_ARGS` adds
//! run.py arguments (`--skip-cols …`, `--arch …`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn usable(python: &Path) -> bool {
    python.exists()
        && Command::new(python)
            .args(["-c", "import transformers, compressed_tensors"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
}

fn reference_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("COMPRESS_REF_PYTHON") {
        let p = PathBuf::from(p);
        assert!(
            usable(&p),
            "COMPRESS_REF_PYTHON={} cannot `import transformers, compressed_tensors`",
            p.display()
        );
        return Some(p);
    }
    let mut cands = Vec::new();
    if let Some(h) = std::env::var_os("HOME") {
        cands.push(PathBuf::from(h).join(".cache/compress-ref-venv/bin/python"));
    }
    cands.push(PathBuf::from("/work/refvenv/bin/python"));
    cands.into_iter().find(|p| usable(p))
}

#[test]
#[ignore = "needs a reference Python (transformers, compressed-tensors): scripts/test-with-references.sh"]
fn outputs_load_in_reference_loaders_with_our_logits() {
    let python = reference_python().expect(
        "no reference Python: set COMPRESS_REF_PYTHON, or run scripts/test-with-references.sh",
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir().unwrap();
    let report = work.path().join("interop.md");
    let mut cmd = Command::new(&python);
    cmd.arg(root.join("tests/interop/run.py"))
        .arg("--compress")
        .arg(env!("CARGO_BIN_EXE_compress"))
        .arg("--work")
        .arg(work.path().join("cells"))
        .arg("--report")
        .arg(&report)
        .env("OMP_NUM_THREADS", "1");
    if let Some(g) = std::env::var_os("COMPRESS_GPTQ_PYTHON") {
        cmd.arg("--gptq-python").arg(g);
    }
    // extra run.py arguments, e.g. `--skip-cols gptq-asym-2,gptq-asym-4` or `--arch qwen3`
    if let Ok(extra) = std::env::var("COMPRESS_INTEROP_ARGS") {
        cmd.args(extra.split_whitespace());
    }
    let o = cmd.output().unwrap();
    let md = std::fs::read_to_string(&report).unwrap_or_default();
    if o.status.success() {
        println!("{md}"); // shown with --nocapture
    }
    assert!(
        o.status.success(),
        "interop suite failed (exit {:?}):\n{md}\n--- stderr (tail) ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
