//! Every bad input gives one clear error naming the file and field, exit code 2, and leaves
//! no output behind.

use crate::common;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Set one top-level field of the model copy's config.json.
fn set_config(model: &Path, key: &str, value: serde_json::Value) {
    let cfg = model.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    v[key] = value;
    std::fs::write(&cfg, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn pipeline(dir: &Path, model: &Path, extra: &str) -> PathBuf {
    let p = dir.join("p.yaml");
    std::fs::write(
        &p,
        format!(
            "model: {}\noutput: {}\npasses: []\n{extra}",
            model.display(),
            dir.join("out").display()
        ),
    )
    .unwrap();
    p
}

/// A pipeline on the reference model whose tail (after `model` / `output`) is `rest`.
fn with_passes(dir: &Path, rest: &str) -> PathBuf {
    let p = dir.join("p.yaml");
    let head = format!(
        "model: {}\noutput: {}\n",
        common::ref_model().display(),
        dir.join("out").display()
    );
    std::fs::write(&p, head + rest).unwrap();
    p
}

/// Run `compress` expecting failure: exit code 2, stderr containing every `needle`, no output.
fn fails(args: &[&str], dir: &Path, needles: &[&str]) {
    let o = Command::new(common::bin())
        .args(args)
        .arg("--quiet")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "expected exit 2, stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks `{n}`: {err}");
    }
    assert_eq!(
        err.trim().lines().count(),
        1,
        "expected one error line: {err}"
    );
    assert!(!dir.join("out").exists(), "output folder was created");
    assert!(
        !dir.join(".out.partial").exists(),
        "work folder was left behind"
    );
}

fn run_fails(dir: &Path, p: &Path, needles: &[&str]) {
    fails(&[p.to_str().unwrap()], dir, needles);
}

#[test]
fn malformed_yaml() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("p.yaml");
    std::fs::write(&p, "model: [unclosed\noutput: x\n").unwrap();
    run_fails(d.path(), &p, &["p.yaml", "line"]);
}

#[test]
fn unknown_keys_are_rejected_with_line() {
    let d = tempfile::tempdir().unwrap();
    let p = pipeline(d.path(), &common::ref_model(), "calibraton: {path: x}\n");
    run_fails(
        d.path(),
        &p,
        &["p.yaml", "unknown field `calibraton`", "line 4"],
    );
    let p = with_passes(d.path(), "passes:\n  - gptq: {bits: 4, bitz: 3}\n");
    run_fails(d.path(), &p, &["p.yaml", "unknown field `bitz`"]);
    let p = with_passes(d.path(), "passes:\n  - magic: {}\n");
    run_fails(d.path(), &p, &["p.yaml", "unknown variant `magic`"]);
}

#[test]
fn invalid_values_name_the_field() {
    let d = tempfile::tempdir().unwrap();
    let p = pipeline(d.path(), &common::ref_model(), "device: tpu\n");
    run_fails(d.path(), &p, &["p.yaml", "device"]);
    let p = with_passes(d.path(), "passes:\n  - rtn: {bits: 9}\n");
    run_fails(d.path(), &p, &["p.yaml", "passes[0]", "bits"]);
    // GPTQ without calibration data
    let p = with_passes(d.path(), "passes:\n  - gptq: {bits: 4}\n");
    run_fails(d.path(), &p, &["p.yaml", "calibration"]);
}

#[test]
fn missing_safetensors() {
    let d = tempfile::tempdir().unwrap();
    let m = common::model_copy(d.path());
    std::fs::remove_file(m.join("model.safetensors")).unwrap();
    let p = pipeline(d.path(), &m, "");
    run_fails(d.path(), &p, &["model.safetensors"]);
}

#[test]
fn missing_model_dir() {
    let d = tempfile::tempdir().unwrap();
    let p = pipeline(d.path(), &d.path().join("nope"), "");
    run_fails(d.path(), &p, &["nope", "not found"]);
}

#[test]
fn truncated_safetensors() {
    let d = tempfile::tempdir().unwrap();
    let m = common::model_copy(d.path());
    let f = m.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 1000]).unwrap();
    let p = pipeline(d.path(), &m, "");
    run_fails(d.path(), &p, &["model.safetensors", "truncated"]);
    // cut inside the header
    std::fs::write(&f, &bytes[..100]).unwrap();
    run_fails(d.path(), &p, &["model.safetensors", "truncated"]);
}

/// Rewrite the header of a safetensors file with `edit` applied to its JSON.
fn edit_header(f: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let bytes = std::fs::read(f).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut h);
    let mut hb = serde_json::to_vec(&h).unwrap();
    while hb.len() < n {
        hb.push(b' ');
    }
    assert_eq!(hb.len(), n, "edited header must keep its length");
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(&hb);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(f, out).unwrap();
}

#[test]
fn header_that_lies_about_offsets() {
    let d = tempfile::tempdir().unwrap();
    let m = common::model_copy(d.path());
    let name = "model.layers.0.mlp.up_proj.weight";
    edit_header(&m.join("model.safetensors"), |h| {
        h[name]["data_offsets"][1] = serde_json::json!(999_999_999u64);
    });
    let p = pipeline(d.path(), &m, "");
    run_fails(d.path(), &p, &["model.safetensors", name]);
    // overlapping tensors
    let m2 = d.path().join("model");
    std::fs::copy(
        common::ref_model().join("model.safetensors"),
        m2.join("model.safetensors"),
    )
    .unwrap();
    edit_header(&m2.join("model.safetensors"), |h| {
        let src = h["model.layers.0.mlp.gate_proj.weight"]["data_offsets"].clone();
        h[name]["data_offsets"] = src;
    });
    run_fails(d.path(), &p, &["model.safetensors", "overlap"]);
}

#[test]
fn absurd_header_size() {
    let d = tempfile::tempdir().unwrap();
    let m = common::model_copy(d.path());
    let f = m.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 50).to_le_bytes());
    std::fs::write(&f, bytes).unwrap();
    let p = pipeline(d.path(), &m, "");
    run_fails(d.path(), &p, &["model.safetensors", "header"]);
}

#[test]
fn wrong_shapes() {
    let d = tempfile::tempdir().unwrap();
    let m = common::model_copy(d.path());
    set_config(&m, "intermediate_size", serde_json::json!(512));
    let p = pipeline(d.path(), &m, "");
    run_fails(
        d.path(),
        &p,
        &[
            "model.safetensors",
            "model.layers.0.mlp.gate_proj.weight",
            "shape",
        ],
    );
}

#[test]
fn missing_tensor() {
    let d = tempfile::tempdir().unwrap();
    let m = common::model_copy(d.path());
    set_config(&m, "num_hidden_layers", serde_json::json!(7));
    let p = pipeline(d.path(), &m, "");
    run_fails(d.path(), &p, &["missing tensor", "model.layers.6."]);
}

#[test]
fn nan_weights() {
    let d = tempfile::tempdir().unwrap();
    let m = common::model_copy(d.path());
    let f = m.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let (tensors, _) = compress::safetensors_file::parse_header(&bytes, &f).unwrap();
    let name = "model.layers.2.self_attn.v_proj.weight";
    let t = &tensors[name];
    // bf16 NaN at element 5
    bytes[t.start + 10..t.start + 12].copy_from_slice(&0x7fc0u16.to_le_bytes());
    std::fs::write(&f, bytes).unwrap();
    let p = pipeline(d.path(), &m, "");
    run_fails(d.path(), &p, &["model.safetensors", name, "non-finite"]);
}

#[test]
fn unsupported_architecture() {
    let d = tempfile::tempdir().unwrap();
    let m = common::model_copy(d.path());
    set_config(&m, "model_type", serde_json::json!("gpt2"));
    let p = pipeline(d.path(), &m, "");
    run_fails(d.path(), &p, &["config.json", "model_type", "gpt2"]);
    // the same through `compress eval` and `compress inspect`
    fails(
        &["eval", "--model", m.to_str().unwrap(), "--data", "x.txt"],
        d.path(),
        &["config.json", "gpt2"],
    );
    fails(
        &["inspect", m.to_str().unwrap()],
        d.path(),
        &["config.json", "gpt2"],
    );
}

#[test]
fn output_exists_needs_overwrite() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("out")).unwrap();
    std::fs::write(d.path().join("out/keep"), "x").unwrap();
    let p = pipeline(d.path(), &common::ref_model(), "");
    let o = Command::new(common::bin())
        .arg(&p)
        .arg("--quiet")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--overwrite"));
    assert!(
        d.path().join("out/keep").exists(),
        "existing output was touched"
    );
}

#[test]
fn unwritable_output_location() {
    // The output's parent is a regular file: nothing can be created there (this holds for
    // root too, unlike permission bits).
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("file"), "x").unwrap();
    let p = d.path().join("p.yaml");
    std::fs::write(
        &p,
        format!(
            "model: {}\noutput: {}\n",
            common::ref_model().display(),
            d.path().join("file/out").display()
        ),
    )
    .unwrap();
    let o = Command::new(common::bin())
        .arg(&p)
        .arg("--quiet")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot create") && err.contains("file"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(d.path().join("file")).unwrap(), "x");
}

/// A named scheme we do not implement, or one combined with the fields it sets, is refused by
/// name before anything runs.
#[test]
fn schemes_by_name_are_checked() {
    let d = tempfile::tempdir().unwrap();
    let p = with_passes(d.path(), "passes:\n  - rtn: {scheme: FP9_SOMETHING}\n");
    run_fails(d.path(), &p, &["scheme", "FP9_SOMETHING", "NVFP4A16"]);
    let p = with_passes(d.path(), "passes:\n  - gptq: {scheme: NVFP4A16, bits: 3}\n");
    run_fails(d.path(), &p, &["scheme: NVFP4A16", "bits"]);
    // calibrated static activation scales are not implemented: said, not ignored
    let p = with_passes(d.path(), "passes:\n  - rtn: {scheme: FP8}\n");
    run_fails(d.path(), &p, &["FP8", "static"]);
    // float grids go to compressed-tensors; GPTQ v1 holds integer codes
    let p = with_passes(
        d.path(),
        "passes:\n  - rtn: {scheme: NVFP4A16}\nexport: {format: gptq}\n",
    );
    run_fails(
        d.path(),
        &p,
        &["export.format", "e2m1", "compressed-tensors"],
    );
}
