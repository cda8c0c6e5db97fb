//! Pruning pipelines end to end through the binary: the written checkpoint has the pattern the
//! pass promised (checked on the values read back), the config block says what was measured,
//! GPTQ after SparseGPT keeps the mask, and evaluation reads the result.

use crate::common;
use compress::model::arch::LLAMA;
use compress::model::layer::LayerWeights;
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
        for name in LLAMA.linear_names() {
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
    // per-linear sparsity in the records, and the report's figure is what the masks pruned
    // (2:4 on every targeted linear: exactly half); the written zeros above also hold weights
    // that GPTQ rounded to zero, which compressed-tensors' `global_sparsity` counts as
    // llm-compressor's does
    let recs = r["layers"].as_array().unwrap();
    assert!(recs
        .iter()
        .filter(|x| x["pass"] == "sparsegpt")
        .all(|x| x["notes"]["sparsity"].as_f64().unwrap() == 0.5));
    assert!((r["output"]["sparsity"].as_f64().unwrap() - 0.5).abs() < 1e-12);
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

/// `export.sparse_format: bitmask` writes compressed-tensors' `sparse-bitmask` layout (values +
/// bits + row offsets, no `.weight`) for the pruned linears; it reads back to exactly the
/// weights the dense export writes, evaluates to the same perplexity, and is smaller.
/// (`scripts/bitmask-check.py` checks the same folders with the library's own decompressor.)
#[test]
fn bitmask_export_reads_back_to_the_dense_export() {
    let d = tempfile::tempdir().unwrap();
    let (dense, bits) = (d.path().join("dense"), d.path().join("bits"));
    let passes = "  - magnitude: {sparsity: 0.5, targets: [\"re:.*_proj$\"]}\n";
    let rd = run(&pipeline(&dense, passes), d.path());
    let y = pipeline(&bits, passes).replace(
        "export: {format: compressed-tensors}",
        "export: {format: compressed-tensors, sparse_format: bitmask}",
    );
    let rb = run(&y, d.path());
    let ppl = |r: &Value| first(r)["after"]["perplexity"].as_f64().unwrap();
    assert_eq!(ppl(&rd), ppl(&rb));

    let cfg: Value =
        serde_json::from_slice(&std::fs::read(bits.join("config.json")).unwrap()).unwrap();
    let sc = &cfg["quantization_config"]["sparsity_config"];
    assert_eq!(sc["format"], "sparse-bitmask");
    assert_eq!(
        cfg["quantization_config"]["quant_method"],
        "compressed-tensors"
    );
    assert!(cfg.get("sparsity_config").is_none());

    let (cd, cb) = (
        Checkpoint::open(&dense).unwrap(),
        Checkpoint::open(&bits).unwrap(),
    );
    let get = |name: &str| -> anyhow::Result<_> {
        let (info, bytes) = cb.raw(name)?;
        Ok((info.dtype, info.shape.clone(), bytes.to_vec()))
    };
    for l in 0..cd.config.num_layers {
        for name in LLAMA.linear_names() {
            let m = format!("model.layers.{l}.{name}");
            assert!(!cb.has(&format!("{m}.weight")), "{m}.weight written");
            let (w, dt, dims) =
                compress::formats::compressed_tensors::read_bitmask(&get, &m).unwrap();
            let (info, bytes) = cd.raw(&format!("{m}.weight")).unwrap();
            assert_eq!(dt, info.dtype);
            assert_eq!(vec![dims.0, dims.1], info.shape);
            let want = compress::safetensors_file::to_f32(info.dtype, bytes).unwrap();
            assert_eq!(w, want, "{m}");
            // at 50% the row offsets advance by half a row each
            let (_, off) = cb.raw(&format!("{m}.row_offsets")).unwrap();
            let off =
                compress::safetensors_file::to_i64(compress::safetensors_file::DType::I64, off)
                    .unwrap();
            assert_eq!(
                off[1] as usize,
                w[..dims.1].iter().filter(|v| **v != 0.0).count()
            );
        }
    }
    let size = |p: &Path| {
        std::fs::metadata(p.join("model.safetensors"))
            .unwrap()
            .len()
    };
    assert!(
        size(&bits) < size(&dense),
        "{} vs {}",
        size(&bits),
        size(&dense)
    );
}

#[test]
fn bitmask_is_refused_where_it_has_no_layout() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    for (passes, export, want) in [
        (
            "  - magnitude: {sparsity: 0.5}\n",
            "export: {format: gptq, sparse_format: bitmask}",
            "sparse_format",
        ),
        (
            "  - sparsegpt: {pattern: \"2:4\"}\n  - rtn: {bits: 4, group_size: 64}\n",
            "export: {format: compressed-tensors, sparse_format: bitmask}",
            "sparse and quantized",
        ),
    ] {
        let y = pipeline(&out, passes).replace("export: {format: compressed-tensors}", export);
        let p = d.path().join("bad.yaml");
        std::fs::write(&p, y).unwrap();
        let o = Command::new(common::bin())
            .arg(&p)
            .arg("--quiet")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{export}");
        assert!(err.contains(want), "{export}: {err}");
        assert!(!out.exists(), "nothing written");
    }
}
