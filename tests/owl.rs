//! OWL allocation (`allocation: owl`, passes/owl.rs) through whole runs on the reference model:
//! the scan sets a sparsity per layer, layers differ, the model's global sparsity is the target,
//! the layer with the most outliers is pruned least, the report records each layer's ratio and
//! sparsity, the written weights carry those zeros, and bad fields are refused.

mod common;
use common::{bin, ref_model};
use std::path::Path;
use std::process::Command;

fn pipeline(dir: &Path, name: &str, pass: &str) -> std::path::PathBuf {
    common::ref_pipeline(dir, name, &[pass], "format: dense")
}

fn run(p: &Path) -> serde_json::Value {
    common::run_json(p)
}

#[test]
fn owl_allocates_per_layer_sparsity_around_the_target() {
    let d = tempfile::tempdir().unwrap();
    for method in ["wanda", "sparsegpt", "magnitude"] {
        let r = run(&pipeline(
            d.path(),
            method,
            &format!("{method}: {{sparsity: 0.5, allocation: owl, targets: [\"re:.*_proj$\"]}}"),
        ));
        // per layer: (outlier ratio, allocated sparsity, Σ zeros, Σ weights) from the records
        let mut layers: std::collections::BTreeMap<u64, (f64, f64, f64, f64)> = Default::default();
        for rec in r["layers"].as_array().unwrap() {
            assert_eq!(rec["pass"], method);
            let n = &rec["notes"];
            let (ratio, alloc, s) = (
                n["outlier_ratio"].as_f64().unwrap(),
                n["allocated_sparsity"].as_f64().unwrap(),
                n["sparsity"].as_f64().unwrap(),
            );
            // each linear pruned to its layer's allocation (unstructured, per row for Wanda)
            assert!((s - alloc).abs() < 0.01, "{method}: {rec}");
            let e = layers.entry(rec["layer"].as_u64().unwrap()).or_default();
            *e = (ratio, alloc, e.2, e.3);
        }
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(ref_model().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            layers.len() as u64,
            cfg["num_hidden_layers"].as_u64().unwrap(),
            "{method}"
        );
        let allocs: Vec<f64> = layers.values().map(|v| v.1).collect();
        let mean = allocs.iter().sum::<f64>() / allocs.len() as f64;
        assert!((mean - 0.5).abs() < 1e-9, "{method}: mean {mean}");
        let (lo, hi) = allocs
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        assert!(
            hi - lo > 0.05 && hi - lo <= 0.16 + 1e-9,
            "{method}: {allocs:?}"
        );
        // the layer with the most outliers gets the least sparsity
        let most = layers.values().max_by(|a, b| a.0.total_cmp(&b.0)).unwrap();
        assert_eq!(most.1, lo, "{method}: {layers:?}");
        // the report's global sparsity of the decoder linears is the target
        let z = r["output"]["sparsity"].as_f64().unwrap();
        assert!((z - 0.5).abs() < 0.01, "{method}: zero fraction {z}");
    }
}

#[test]
fn owl_fields_are_checked() {
    let d = tempfile::tempdir().unwrap();
    for (pass, want) in [
        (
            "wanda: {sparsity: 0.5, pattern: \"2:4\", allocation: owl}",
            "pattern: unstructured",
        ),
        ("wanda: {sparsity: 0.5, owl_lambda: 0.1}", "only apply"),
        (
            "wanda: {sparsity: 0.95, allocation: owl, owl_lambda: 0.1}",
            "band",
        ),
        ("wanda: {sparsity: 0.5, allocation: lopsided}", "allocation"),
    ] {
        let p = pipeline(d.path(), "bad", pass);
        let o = Command::new(bin()).arg(&p).arg("--quiet").output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{pass}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{pass}: {err}");
        assert!(!d.path().join("bad").exists());
    }
}

/// SIGKILL after the OWL scan, inside a later layer; the resumed run takes the allocation from
/// its resume state (no second scan of the dense model) and writes the bytes of an
/// uninterrupted run.
#[test]
fn resume_reuses_the_owl_allocation() {
    let d = tempfile::tempdir().unwrap();
    let pass = "sparsegpt: {sparsity: 0.6, allocation: owl}";
    let full = pipeline(d.path(), "full", pass);
    common::run_ok(&full);
    let p = pipeline(d.path(), "killed", pass);
    let out = d.path().join("killed");
    common::kill_in_layer(&p, &out, 2, std::time::Duration::from_millis(0));
    let o = Command::new(bin())
        .arg(&p)
        .arg("--resume")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("OWL allocation from the resume state"),
        "{log}"
    );
    assert!(!log.contains("OWL scan of the dense model"), "{log}");
    assert_eq!(
        std::fs::read(d.path().join("full/model.safetensors")).unwrap(),
        std::fs::read(out.join("model.safetensors")).unwrap()
    );
}
