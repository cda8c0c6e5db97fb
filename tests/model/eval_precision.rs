//! `eval.precision: bf16` / `compress eval --precision bf16`: the linears compute with bf16
//! weights and inputs and f32 accumulation (src/model/bf16/). Its perplexity stays within
//! 0.2% of f32 on the reference model, it is a different computation (not the f32 bits), and
//! the eval cache keeps the two apart: an f32 run never reuses a bf16 baseline or the reverse.

use crate::common;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn wiki_head(dir: &Path) -> PathBuf {
    common::wiki_head(dir, "wiki.txt", 24_000)
}

fn eval(data: &Path, precision: &str) -> f64 {
    let o = Command::new(common::bin())
        .args(["eval", "--model"])
        .arg(common::ref_model())
        .arg("--data")
        .arg(data)
        .args(["--seq-len", "256", "--json", "--precision", precision])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["results"]["wiki.txt"]["perplexity"].as_f64().unwrap()
}

#[test]
fn bf16_eval_is_within_its_tolerance_of_f32() {
    let d = tempfile::tempdir().unwrap();
    let data = wiki_head(d.path());
    let (f32_ppl, bf16_ppl) = (eval(&data, "f32"), eval(&data, "bf16"));
    eprintln!(
        "ref-llama-9m, 24 KB of wikitext2, seq 256: f32 {f32_ppl:.4}, bf16 {bf16_ppl:.4} ({:+.4}%), bf16 kernel: {}",
        100.0 * (bf16_ppl - f32_ppl) / f32_ppl,
        compress::model::bf16::native()
    );
    assert_ne!(f32_ppl, bf16_ppl, "bf16 computed the same bits as f32");
    assert!(
        (bf16_ppl - f32_ppl).abs() <= 2e-3 * f32_ppl,
        "bf16 {bf16_ppl} vs f32 {f32_ppl}"
    );
    // a typo is one clear error
    let o = Command::new(common::bin())
        .args(["eval", "--model"])
        .arg(common::ref_model())
        .arg("--data")
        .arg(&data)
        .args(["--precision", "fp8"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("precision `fp8`"));
}

fn pipeline(dir: &Path, name: &str, precision: &str) -> PathBuf {
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &p,
        format!(
            "model: {}\noutput: {}\npasses:\n  - rtn: {{bits: 4, group_size: 128}}\n\
             export: {{format: compressed-tensors}}\n\
             eval: {{datasets: [{}], seq_len: 256, precision: {precision}, cache: {}}}\n",
            common::ref_model().display(),
            dir.join(name).display(),
            dir.join("wiki.txt").display(),
            dir.join("cache").display(),
        ),
    )
    .unwrap();
    p
}

fn report(dir: &Path, name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join(name).join("report.json")).unwrap()).unwrap()
}

#[test]
fn the_eval_cache_keeps_precisions_apart() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    wiki_head(dir);
    let before = |r: &Value| {
        r["eval"]["wiki.txt"]["before"]["perplexity"]
            .as_f64()
            .unwrap()
    };
    common::run_ok(&pipeline(dir, "b1", "bf16"));
    let b1 = report(dir, "b1");
    assert_eq!(b1["baseline"]["source"], "computed");
    assert_eq!(b1["pipeline"]["eval"]["precision"], "bf16");
    common::run_ok(&pipeline(dir, "f1", "f32"));
    let f1 = report(dir, "f1");
    assert_eq!(
        f1["baseline"]["source"], "computed",
        "f32 reused a bf16 entry"
    );
    assert_ne!(before(&f1), before(&b1));
    common::run_ok(&pipeline(dir, "b2", "bf16"));
    let b2 = report(dir, "b2");
    assert_eq!(b2["baseline"]["source"], "cache");
    assert_eq!(before(&b2), before(&b1));
    // the written artifact is evaluated in the same precision as the input model
    let after = |r: &Value| {
        r["eval"]["wiki.txt"]["after"]["perplexity"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(after(&b2), after(&b1));
    assert_ne!(after(&b1), after(&f1));
    assert!((after(&b1) - after(&f1)).abs() <= 2e-3 * after(&f1));
    // an unknown precision in the pipeline names the field
    let p = pipeline(dir, "bad", "fp8");
    let o = Command::new(common::bin())
        .arg(&p)
        .arg("--quiet")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("bad.yaml") && err.contains("precision"),
        "{err}"
    );
}

/// bf16 evaluation of a quantized checkpoint reads the integer codes
/// (src/model/bf16/packed_int.rs): the same logits, bit for bit, as packing its dequantized
/// weights — for compressed-tensors W4 (asymmetric, groups) and GPTQ v1 with g_idx in
/// activation order, resident and streamed — with a fraction of the memory.
#[test]
fn bf16_eval_of_quantized_checkpoints_reads_the_codes() {
    use compress::model::{llama::Model, Checkpoint, Precision};
    let d = tempfile::tempdir().unwrap();
    for (name, pass, export) in [
        (
            "ct",
            "rtn: {bits: 4, group_size: 64, sym: false}",
            "format: compressed-tensors",
        ),
        (
            "gptq",
            "gptq: {bits: 4, group_size: 128, act_order: true, static_groups: false}",
            "format: gptq",
        ),
    ] {
        let p = common::ref_pipeline(d.path(), name, &[pass], export);
        common::run_ok(&p);
        let dir = d.path().join(name);
        let ids: Vec<u32> = (0..2 * 48).map(|i| (i * 37 + 11) % 4000).collect();
        let dense = Model::load(&Checkpoint::open(&dir).unwrap(), 48)
            .unwrap()
            .with_precision(Precision::Bf16);
        let ckpt = Checkpoint::open(&dir).unwrap();
        let opts = compress::model::EvalOptions::in_precision(Precision::Bf16);
        let codes = Model::open(&ckpt, &opts, 48, u64::MAX).unwrap();
        let streamed = Model::open(&ckpt, &opts, 48, 0).unwrap();
        assert!(streamed.is_streamed() && !codes.is_streamed());
        let a = dense.logits(&ids, 2, 48).unwrap();
        let b = codes.logits(&ids, 2, 48).unwrap();
        let c = streamed.logits(&ids, 2, 48).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b), "{name}: codes vs dequantized panels");
        assert_eq!(bits(&a), bits(&c), "{name}: streamed");
        let (da, db) = (
            dense.resident_linear_bytes().unwrap(),
            codes.resident_linear_bytes().unwrap(),
        );
        eprintln!("{name}: decoder linears hold {da} bytes (f32 + bf16 panels), {db} from codes");
        if compress::model::bf16::native() {
            // 4-bit codes with f32 scales and offsets per group (≈ 0.6 bytes a weight) against
            // f32 + bf16 (6 bytes a weight)
            assert!(db * 8 < da, "{name}: {db} vs {da}");
        } else {
            // without AVX512-BF16 the fallback keeps one f32 copy (the bf16-rounded weight) and
            // the per-group parameters, against two f32 copies (original and rounded): about
            // half (0.51 for W4 g64 with offsets), never the whole
            assert!(db * 20 <= da * 11, "{name}: {db} vs {da}");
        }
    }
}
