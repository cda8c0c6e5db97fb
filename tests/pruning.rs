//! Pruning pipelines end to end through the binary: the written checkpoint has the pattern the
//! pass promised (checked on the values read back), the config block says what was measured,
//! GPTQ after SparseGPT keeps the mask, and evaluation reads the result.

mod common;
use compress::model::layer::{LayerWeights, LINEARS};
use compress::model::Checkpoint;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn run(yaml: &str, dir: &Path) -> Value {
    let p = dir.join("p.yaml");
    std::fs::write(&p, yaml).unwrap();
    let o = Command::new(common::bin())
        .arg(&p)
        .args(["--quiet", "--json"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "compress failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The pipeline, evaluated on the first 24 KB of wikitext2's test set (written beside `out`).
fn pipeline(out: &Path, passes: &str) -> String {
    let eval = out.with_file_name("wiki-head.txt");
    let text = std::fs::read(common::shared().join("data/eval/wikitext2/wiki.test.raw")).unwrap();
    std::fs::write(&eval, &text[..24_000]).unwrap();
    format!(
        "model: {}\noutput: {}\ncalibration: {{path: {}, samples: 16, seq_len: 128}}\n\
         passes:\n{passes}export: {{format: compressed-tensors}}\n\
         eval: {{datasets: [{}], seq_len: 128}}\n",
        common::ref_model().display(),
        out.display(),
        common::shared().join("data/calib/c4_calib.jsonl").display(),
        eval.display()
    )
}

/// Fraction of zeros over the decoder linears as read back, and whether every group of 4
/// consecutive inputs holds at most 2 non-zeros.
fn read_back(out: &Path) -> (f64, bool) {
    let ck = Checkpoint::open(out).unwrap();
    let (mut zeros, mut n, mut two_four) = (0usize, 0usize, true);
    for l in 0..ck.config.num_layers {
        let lw = LayerWeights::load(&ck, l).unwrap();
        for name in LINEARS {
            let w = lw.linears[name].weight().as_slice().unwrap().to_vec();
            zeros += w.iter().filter(|v| **v == 0.0).count();
            n += w.len();
            two_four &= w
                .chunks(4)
                .all(|g| g.iter().filter(|v| **v != 0.0).count() <= 2);
        }
    }
    (zeros as f64 / n as f64, two_four)
}

#[test]
fn sparsegpt_2of4_then_gptq_keeps_the_pattern_in_the_packed_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let r = run(
        &pipeline(
            &out,
            "  - sparsegpt: {pattern: \"2:4\", targets: [\"re:.*_proj$\"]}\n  - gptq: {bits: 4, group_size: 64}\n",
        ),
        d.path(),
    );
    let (sparsity, two_four) = read_back(&out);
    assert!(two_four, "every group of 4 has at most 2 non-zeros");
    assert!(sparsity >= 0.5, "{sparsity}");
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let sc = &cfg["quantization_config"]["sparsity_config"];
    assert_eq!(sc["sparsity_structure"], "2:4");
    assert_eq!(sc["format"], "dense");
    assert!((sc["global_sparsity"].as_f64().unwrap() - sparsity).abs() < 1e-12);
    assert_eq!(
        cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"],
        4
    );
    // per-linear sparsity in the records, and the report's figure is the written one
    let recs = r["layers"].as_array().unwrap();
    assert!(recs
        .iter()
        .filter(|x| x["pass"] == "sparsegpt")
        .all(|x| x["notes"]["sparsity"].as_f64().unwrap() == 0.5));
    assert!((r["output"]["sparsity"].as_f64().unwrap() - sparsity).abs() < 1e-12);
    let ppl = first(&r)["after"]["perplexity"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0);
}

#[test]
fn wanda_and_magnitude_write_dense_zeros_with_top_level_metadata() {
    for pass in ["wanda", "magnitude"] {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("o");
        let r = run(
            &pipeline(&out, &format!("  - {pass}: {{sparsity: 0.5}}\n")),
            d.path(),
        );
        let (sparsity, _) = read_back(&out);
        assert!((sparsity - 0.5).abs() < 1e-3, "{pass}: {sparsity}");
        let cfg: Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        // no quantization_config: transformers refuses one without config groups
        assert!(cfg.get("quantization_config").is_none());
        assert_eq!(cfg["sparsity_config"]["sparsity_structure"], "unstructured");
        assert_eq!(r["output"]["bits_per_weight"], 16.0);
        let ppl = first(&r)["after"]["perplexity"].as_f64().unwrap();
        let before = first(&r)["before"]["perplexity"].as_f64().unwrap();
        assert!(
            ppl > before,
            "{pass}: pruning half the weights costs something"
        );
    }
}

/// The one evaluated data set of a report.
fn first(r: &Value) -> &Value {
    r["eval"].as_object().unwrap().values().next().unwrap()
}
