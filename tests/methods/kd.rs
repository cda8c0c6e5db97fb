//! The `kd` pass (block-wise distillation) end to end on the reference model: deterministic
//! whatever the thread count, never worse than the layer it started from, composing with the
//! quantizing, low-rank and pruning passes, and resumable after a SIGKILL inside a
//! distillation layer with the bytes of an uninterrupted run.

use crate::common;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn pipeline(dir: &Path, name: &str, passes: &str) -> (PathBuf, PathBuf) {
    let out = dir.join(name);
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &p,
        format!(
            "model: {}\noutput: {}\ncalibration: {{path: {}, samples: 8, seq_len: 64, seed: 2}}\n\
             passes:\n{passes}export: {{format: compressed-tensors}}\n",
            common::ref_model().display(),
            out.display(),
            common::shared().join("data/calib/c4_calib.jsonl").display()
        ),
    )
    .unwrap();
    (p, out)
}

const KD: &str = "  - kd: {lr: 0.002, steps: 6, batch: 3, seed: 5}\n";

fn run_threads(p: &Path, threads: &str) {
    let o = Command::new(common::bin())
        .arg(p)
        .arg("--quiet")
        .env("RAYON_NUM_THREADS", threads)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn report(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap()
}

/// The kd records: (rel. error before, after as recorded, kept).
fn kd_records(r: &serde_json::Value) -> Vec<(f64, f64, String)> {
    r["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["pass"] == "kd")
        .map(|l| {
            (
                l["notes"]["rel_error_before"].as_f64().unwrap(),
                l["rel_output_error"].as_f64().unwrap(),
                l["notes"]["kept"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn sha(out: &Path) -> String {
    compress::util::sha256_file(&out.join("model.safetensors")).unwrap()
}

#[test]
fn gptq_then_kd_is_deterministic_with_one_or_two_threads_and_never_worse() {
    let d = tempfile::tempdir().unwrap();
    let gptq = "  - gptq: {bits: 3, group_size: 128}\n";
    let (p0, o0) = pipeline(d.path(), "gptq", gptq);
    common::run_ok(&p0);
    let mut digests = Vec::new();
    for threads in ["1", "2"] {
        let (p, o) = pipeline(d.path(), &format!("kd{threads}"), &format!("{gptq}{KD}"));
        run_threads(&p, threads);
        digests.push(sha(&o));
        let recs = kd_records(&report(&o));
        assert_eq!(recs.len(), 6, "one kd record per layer");
        for (before, after, _) in &recs {
            assert!(after <= before, "kd made a layer worse: {before} → {after}");
        }
        assert!(
            recs.iter().any(|r| r.2 == "distilled" && r.1 < r.0),
            "no layer was improved: {recs:?}"
        );
    }
    assert_eq!(
        digests[0], digests[1],
        "outputs differ between 1 and 2 threads"
    );
    assert_ne!(digests[0], sha(&o0), "kd changed nothing in the export");
}

#[test]
fn kd_composes_with_svd_llm_and_sparsegpt() {
    let d = tempfile::tempdir().unwrap();
    let (p, o) = pipeline(
        d.path(),
        "svd",
        &format!("  - svd_llm: {{ratio: 0.4, targets: [\"re:.*_proj$\"]}}\n{KD}"),
    );
    common::run_ok(&p);
    let r = report(&o);
    let groups: Vec<String> = r["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["pass"] == "kd")
        .flat_map(|l| l["notes"]["groups"].as_array().unwrap().clone())
        .map(|g| g.as_str().unwrap().to_string())
        .collect();
    assert!(groups.iter().any(|g| g == "factors"), "{groups:?}");
    assert_eq!(kd_records(&r).len(), 6);

    let (p, o) = pipeline(
        d.path(),
        "sparse",
        &format!("  - sparsegpt: {{pattern: \"2:4\", targets: [\"re:.*_proj$\"]}}\n{KD}"),
    );
    common::run_ok(&p);
    let r = report(&o);
    assert_eq!(kd_records(&r).len(), 6);
    // 2:4 on every decoder linear: the masks survive distillation (exactly half zero)
    let zeros = compress::model::Checkpoint::open(&o).unwrap();
    for l in 0..6 {
        let w = zeros
            .f32(&format!("model.layers.{l}.mlp.up_proj.weight"))
            .unwrap();
        let z = w.iter().filter(|v| **v == 0.0).count();
        assert!(z * 2 >= w.len(), "layer {l}: {z} zeros of {}", w.len());
    }
}

/// SIGKILL while a distillation layer runs (after layer 2's checkpoint, inside layer 3 or
/// later), resume: the same bytes as an uninterrupted run.
#[test]
fn killed_during_kd_resumes_byte_identical() {
    let d = tempfile::tempdir().unwrap();
    let passes = format!("  - gptq: {{bits: 3, group_size: 128}}\n{KD}");
    let (p_full, full) = pipeline(d.path(), "full", &passes);
    common::run_ok(&p_full);
    let (p, out) = pipeline(d.path(), "killed", &passes);
    // into layer 3: GPTQ takes a few ms on this model, distillation most of the layer
    common::kill_in_layer(&p, &out, 3, Duration::from_millis(150));
    common::resume_same_bytes(&p, &out, &full);
    assert_eq!(
        kd_records(&report(&out)).len(),
        6,
        "kd records of every layer"
    );
}

/// The tuned values leave in every format: the same [gptq, kd] run written as compressed-tensors,
/// GPTQ v1 and dense, and [sparsegpt 2:4, kd] written as compressed-tensors and GGUF Q8_0, read
/// back with the tuned RMSNorm weights (equal across formats, not the input model's) and
/// quantization scales (the dequantized weights agree across formats up to the scales' storage
/// rounding and differ from plain GPTQ's).
#[test]
fn kd_values_export_in_every_format() {
    use compress::model::layer::LayerWeights;
    use compress::model::Checkpoint;
    let d = tempfile::tempdir().unwrap();
    let run = |name: &str, passes: &str, export: &str| -> LayerWeights {
        let (p, o) = pipeline(d.path(), name, passes);
        let y = std::fs::read_to_string(&p).unwrap().replace(
            "export: {format: compressed-tensors}",
            &format!("export: {{{export}}}"),
        );
        std::fs::write(&p, y).unwrap();
        common::run_ok(&p);
        LayerWeights::load(&Checkpoint::open(&o).unwrap(), 3).unwrap()
    };
    let gptq = "  - gptq: {bits: 4, group_size: 128}\n";
    let kd = format!("{gptq}{KD}");
    let sparse = format!("  - sparsegpt: {{pattern: \"2:4\", targets: [\"re:.*_proj$\"]}}\n{KD}");
    let plain = run("plain", gptq, "format: compressed-tensors");
    let quantized: Vec<(&str, LayerWeights)> = ["compressed-tensors", "gptq", "dense"]
        .into_iter()
        .map(|f| (f, run(&format!("kd-{f}"), &kd, &format!("format: {f}"))))
        .collect();
    let pruned = [
        (
            "compressed-tensors",
            run("sp-ct", &sparse, "format: compressed-tensors"),
        ),
        (
            "gguf",
            run("sp-gguf", &sparse, "format: gguf, gguf_type: q8_0"),
        ),
    ];
    let input = LayerWeights::load(&Checkpoint::open(&common::ref_model()).unwrap(), 3).unwrap();
    let max_rel = |a: &[f32], b: &[f32]| {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    };
    for group in [&quantized[..], &pruned[..]] {
        for (name, (w_in, _)) in &input.norms {
            for (fmt, lw) in group {
                let w = &lw.norms[name].0;
                assert!(
                    max_rel(w, w_in) > 1e-3,
                    "{fmt}: {name} is the input model's"
                );
                // bf16 in the safetensors formats; GGUF stores norms in f32 from the same values
                let r = max_rel(w, &group[0].1.norms[name].0);
                assert!(
                    r < 1e-2,
                    "{fmt}: {name} differs from the compressed-tensors export by {r}"
                );
            }
        }
    }
    for lin in ["self_attn.q_proj", "mlp.down_proj"] {
        let ct = quantized[0].1.linears[lin].weight();
        let ct = ct.as_slice().unwrap();
        let pl = plain.linears[lin].weight();
        assert!(
            max_rel(ct, pl.as_slice().unwrap()) > 1e-3,
            "{lin}: kd left the scales as GPTQ found them"
        );
        for (fmt, lw) in &quantized[1..] {
            let w = lw.linears[lin].weight();
            let r = max_rel(w.as_slice().unwrap(), ct);
            assert!(r < 2e-2, "{fmt}: {lin} differs by {r}");
        }
    }
}
