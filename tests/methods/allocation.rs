//! Allocations made by a whole-model scan, through whole runs on the reference model.
//!
//! OWL (`allocation: owl`, passes/owl.rs): the scan sets a sparsity per layer, layers differ,
//! the model's global sparsity is the target, the layer with the most outliers is pruned least,
//! the report records each layer's ratio and sparsity, the written weights carry those zeros,
//! and bad fields are refused.
//!
//! The size budget (`budget:`, passes/budget): the written linears take the target's bytes
//! at most and within one candidate step of it, exactly the bytes the allocation counted; each
//! grid is one compressed-tensors config group naming its modules, the tensors are those of
//! the group's grid, the file reads back; runs are byte-identical and resume after a kill
//! without a second scan; bad fields are refused.

use crate::common;
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

const BUDGET: &str = "budget: {bits_per_weight: 3.0, kl_tokens: 256, candidates: [{bits: 2, group_size: 64}, {bits: 4, group_size: 128}, {bits: 8, strategy: channel}]}";

fn budget_pipeline(dir: &Path, name: &str, pass: &str) -> std::path::PathBuf {
    let p = common::ref_pipeline(dir, name, &[pass], "format: compressed-tensors");
    let wiki = common::wiki_head(dir, "wiki.txt", 20_000);
    let mut y = std::fs::read_to_string(&p).unwrap();
    y.push_str(&format!(
        "eval: {{datasets: [{}], seq_len: 128, baseline: false}}\n",
        wiki.display()
    ));
    std::fs::write(&p, y).unwrap();
    p
}

#[test]
fn budget_meets_its_target_with_one_config_group_per_grid() {
    let d = tempfile::tempdir().unwrap();
    let r = run(&budget_pipeline(d.path(), "b", BUDGET));
    let out = d.path().join("b");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ref_model().join("config.json")).unwrap()).unwrap();
    let (h, i) = (
        cfg["hidden_size"].as_u64().unwrap(),
        cfg["intermediate_size"].as_u64().unwrap(),
    );
    let kv = cfg["num_key_value_heads"].as_u64().unwrap() * h
        / cfg["num_attention_heads"].as_u64().unwrap();
    let numel = cfg["num_hidden_layers"].as_u64().unwrap() * (2 * h * h + 2 * h * kv + 3 * h * i);
    // every decoder linear once, by the budget, with the candidate it got and its bytes
    let mut module_bits: std::collections::BTreeMap<String, u64> = Default::default();
    let mut bytes = 0u64;
    for rec in r["layers"].as_array().unwrap() {
        assert_eq!(rec["pass"], "budget", "{rec}");
        let c = rec["notes"]["candidate"].as_str().unwrap();
        let bits = match c {
            "W2 g64" => 2,
            "W4 g128" => 4,
            "W8 ch" => 8,
            other => panic!("candidate {other}"),
        };
        bytes += rec["notes"]["bytes"].as_u64().unwrap();
        let m = format!(
            "model.layers.{}.{}",
            rec["layer"],
            rec["linear"].as_str().unwrap()
        );
        assert!(module_bits.insert(m, bits).is_none());
    }
    assert_eq!(
        module_bits.len() as u64,
        cfg["num_hidden_layers"].as_u64().unwrap() * 7
    );
    // the target is met, within one step of a linear (W2 g64 → W4 g128 of the widest), and
    // the file's bits per weight are exactly the bytes the allocation counted
    let bpw = r["output"]["bits_per_weight"].as_f64().unwrap();
    assert!(bpw <= 3.0, "{bpw}");
    assert!(
        bpw > 3.0 - (2.0 + 0.25) * (h * i) as f64 / numel as f64,
        "{bpw}"
    );
    assert_eq!(bpw, bytes as f64 * 8.0 / numel as f64);
    let kinds: std::collections::BTreeSet<u64> = module_bits.values().copied().collect();
    assert!(
        kinds.len() >= 2,
        "a budget between the grids mixes them: {kinds:?}"
    );
    // one config group per grid used, naming exactly its modules
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let q = &c["quantization_config"];
    let groups = q["config_groups"].as_object().unwrap();
    assert_eq!(groups.len(), kinds.len(), "{q}");
    let mut named = 0;
    let st =
        compress::safetensors_file::SafetensorsFile::open(&out.join("model.safetensors")).unwrap();
    for g in groups.values() {
        let bits = g["weights"]["num_bits"].as_u64().unwrap();
        for m in g["targets"].as_array().unwrap() {
            let m = m.as_str().unwrap();
            assert_eq!(module_bits[m], bits, "{m} in the {bits}-bit group");
            named += 1;
            // packed codes of the group's width: 32 / bits codes per int32 along the inputs
            let packed = &st.tensors[&format!("{m}.weight_packed")];
            let shape = compress::safetensors_file::to_i64(
                st.tensors[&format!("{m}.weight_shape")].dtype,
                st.bytes(&st.tensors[&format!("{m}.weight_shape")]),
            )
            .unwrap();
            let per = 32 / bits as usize;
            assert_eq!(
                packed.shape,
                vec![shape[0] as usize, (shape[1] as usize).div_ceil(per)],
                "{m}"
            );
        }
    }
    assert_eq!(named, module_bits.len());
    // read back: the evaluation of the written file ran
    let ppl = r["eval"]["wiki.txt"]["after"]["perplexity"].as_f64();
    assert!(ppl.is_some_and(f64::is_finite), "{}", r["eval"]);
    // the report shows the allocation per layer and the bytes of each grid
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("## Size budget: the grid of each linear"),
        "{md}"
    );
    let table: u64 = md
        .split("| grid | linears | bytes |")
        .nth(1)
        .unwrap()
        .lines()
        .filter_map(|l| {
            l.trim_end_matches('|')
                .rsplit('|')
                .next()?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert_eq!(table, bytes, "{md}");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("Stored bits per weight per linear"));
    // the output-error measure allocates under the same target
    let rel = run(&budget_pipeline(
        d.path(),
        "rel",
        &BUDGET.replace("budget: {", "budget: {sensitivity: output_error, "),
    ));
    let rb = rel["output"]["bits_per_weight"].as_f64().unwrap();
    assert!(
        rb <= 3.0 && rb > 3.0 - (2.0 + 0.25) * (h * i) as f64 / numel as f64,
        "{rb}"
    );
    // the local relative measure allocates under the same target (the default is the
    // end-to-end KL, measured on `kl_tokens` of calibration)
    let kl = run(&budget_pipeline(
        d.path(),
        "kl",
        &BUDGET.replace("budget: {", "budget: {sensitivity: relative, "),
    ));
    let kb = kl["output"]["bits_per_weight"].as_f64().unwrap();
    assert!(
        kb <= 3.0 && kb > 3.0 - (2.0 + 0.25) * (h * i) as f64 / numel as f64,
        "{kb}"
    );
    for rec in kl["layers"].as_array().unwrap() {
        let d = rec["notes"]["scan_damage"].as_f64().unwrap();
        assert!(d.is_finite() && d >= 0.0, "{rec}");
    }
    // deterministic: a second run writes the same bytes
    let r2 = run(&budget_pipeline(d.path(), "b2", BUDGET));
    assert_eq!(
        r2["output"]["bits_per_weight"],
        r["output"]["bits_per_weight"]
    );
    for f in ["model.safetensors", "config.json"] {
        assert!(
            std::fs::read(out.join(f)).unwrap()
                == std::fs::read(d.path().join("b2").join(f)).unwrap(),
            "{f} differs between two runs"
        );
    }
}

/// SIGKILL inside a layer after the budget's scan: the resumed run takes the allocation from
/// its resume state and writes the bytes of an uninterrupted run.
#[test]
fn budget_resumes_without_a_second_scan() {
    let d = tempfile::tempdir().unwrap();
    let full = budget_pipeline(d.path(), "full", BUDGET);
    common::run_ok(&full);
    let p = budget_pipeline(d.path(), "killed", BUDGET);
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
        log.contains("budget allocation from the resume state"),
        "{log}"
    );
    assert!(!log.contains("budget scan of the dense model"), "{log}");
    for f in ["model.safetensors", "config.json"] {
        assert!(
            std::fs::read(d.path().join("full").join(f)).unwrap()
                == std::fs::read(out.join(f)).unwrap(),
            "{f} differs after the resume"
        );
    }
}

#[test]
fn budget_fields_are_checked() {
    let d = tempfile::tempdir().unwrap();
    for (pass, export, want) in [
        (
            "budget: {candidates: [{bits: 4}]}",
            "compressed-tensors",
            "one of `bits_per_weight` or `bytes`",
        ),
        (
            "budget: {bits_per_weight: 3, bytes: 9, candidates: [{bits: 4}]}",
            "compressed-tensors",
            "one of `bits_per_weight` or `bytes`",
        ),
        (
            "budget: {bits_per_weight: 3, candidates: []}",
            "compressed-tensors",
            "candidates",
        ),
        (
            "budget: {bits_per_weight: 3, candidates: [{bits: 9}]}",
            "compressed-tensors",
            "candidates[0]",
        ),
        (
            "budget: {bits_per_weight: 3, candidates: [{scheme: W8A8}]}",
            "compressed-tensors",
            "weight-only",
        ),
        (
            "budget: {bits_per_weight: 3, candidates: [{bits: 4, colour: red}]}",
            "compressed-tensors",
            "colour",
        ),
        (
            "budget: {bits_per_weight: 3, candidates: [{bits: 4}]}",
            "dense",
            "packed export format",
        ),
        (
            "budget: {bits_per_weight: 3, sensitivity: fisher, candidates: [{bits: 4}]}",
            "compressed-tensors",
            "output_error",
        ),
        (
            "budget: {bits_per_weight: 1.5, candidates: [{bits: 2, group_size: 64}, {bits: 4}]}",
            "compressed-tensors",
            "below what the smallest candidate takes",
        ),
    ] {
        let p = common::ref_pipeline(d.path(), "bad", &[pass], &format!("format: {export}"));
        let o = Command::new(bin()).arg(&p).arg("--quiet").output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{pass}: {err}");
        assert!(!d.path().join("bad").exists(), "{pass}");
    }
}
