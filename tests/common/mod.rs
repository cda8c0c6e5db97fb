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

/// Run a pipeline with `--quiet --json`, asserting success; the report.
pub fn run_json(pipeline: &std::path::Path) -> serde_json::Value {
    let o = std::process::Command::new(bin())
        .arg(pipeline)
        .args(["--quiet", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Write `dir/NAME.yaml`: the reference model through `dir/NAME`, 8 × 128 c4 calibration
/// windows (seed 0), the passes (one YAML list item each) and the export block's fields.
pub fn ref_pipeline(dir: &std::path::Path, name: &str, passes: &[&str], export: &str) -> PathBuf {
    let p = dir.join(format!("{name}.yaml"));
    let passes: String = passes.iter().map(|s| format!("  - {s}\n")).collect();
    std::fs::write(
        &p,
        format!(
            "model: {}\noutput: {}\n\
             calibration: {{path: {}, field: text, samples: 8, seq_len: 128, seed: 0}}\n\
             passes:\n{passes}export: {{{export}}}\n",
            ref_model().display(),
            dir.join(name).display(),
            shared().join("data/calib/c4_calib.jsonl").display(),
        ),
    )
    .unwrap();
    p
}

/// Start `pipeline` (`--quiet`), wait until its resume state says layer `layer` is next, sleep
/// `then` more (into that layer's work), SIGKILL it and check nothing was published at `out`.
pub fn kill_in_layer(
    pipeline: &std::path::Path,
    out: &std::path::Path,
    layer: u64,
    then: std::time::Duration,
) {
    let name = out.file_name().unwrap().to_string_lossy().to_string();
    let state = out
        .with_file_name(format!(".{name}.partial"))
        .join(".resume/state.json");
    let mut child = std::process::Command::new(bin())
        .arg(pipeline)
        .arg("--quiet")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    loop {
        let next = std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["next_layer"].as_u64())
            .unwrap_or(0);
        if next >= layer {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "run ended before the kill"
        );
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(then);
    assert!(
        child.try_wait().unwrap().is_none(),
        "run ended before the kill"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !out.exists(),
        "an interrupted run must not publish its output"
    );
}

/// The first `bytes` bytes of wikitext2's test file (cut back to a UTF-8 boundary) as
/// `dir/name`, so an evaluation in a test takes a second.
pub fn wiki_head(dir: &std::path::Path, name: &str, bytes: usize) -> PathBuf {
    let b = std::fs::read(shared().join("data/eval/wikitext2/wiki.test.raw")).unwrap();
    let mut n = bytes.min(b.len());
    while std::str::from_utf8(&b[..n]).is_err() {
        n -= 1;
    }
    let p = dir.join(name);
    std::fs::write(&p, &b[..n]).unwrap();
    p
}

/// `compress PIPELINE --quiet --resume`, asserting success; then `model.safetensors` and
/// `config.json` in `out` must equal those in `full` (an uninterrupted run's output).
pub fn resume_same_bytes(
    pipeline: &std::path::Path,
    out: &std::path::Path,
    full: &std::path::Path,
) {
    let o = std::process::Command::new(bin())
        .arg(pipeline)
        .args(["--quiet", "--resume"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["model.safetensors", "config.json"] {
        assert!(
            std::fs::read(full.join(f)).unwrap() == std::fs::read(out.join(f)).unwrap(),
            "{f} differs after the resume"
        );
    }
}
