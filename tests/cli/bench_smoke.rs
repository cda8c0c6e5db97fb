//! Smoke test of the `bench` binary: generate a tiny random Llama checkpoint, check that
//! `compress inspect` counts the parameters its config implies, run the identity pipeline on it
//! through `bench identity` (which runs `compress` as a child) and check the output tensors are
//! byte-identical to the input.

use compress::model::Checkpoint;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_bench");
const COMPRESS: &str = env!("CARGO_BIN_EXE_compress");

fn run_json(bin: &str, args: &[&str]) -> Value {
    let out = Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    assert!(
        out.status.success(),
        "{bin} {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{bin} {args:?}: stdout is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

#[test]
fn bench_generates_inspectable_checkpoint_and_identity_is_byte_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    let (h, i, layers, heads, kv, vocab) = (64usize, 160usize, 2usize, 4usize, 2usize, 8192usize);
    let gen = run_json(
        BENCH,
        &[
            "gen-checkpoint",
            "--out",
            p(&model),
            "--hidden",
            &h.to_string(),
            "--intermediate",
            &i.to_string(),
            "--layers",
            &layers.to_string(),
            "--heads",
            &heads.to_string(),
            "--kv-heads",
            &kv.to_string(),
            "--vocab",
            &vocab.to_string(),
            "--seed",
            "7",
            "--json",
        ],
    );

    // Parameter count written out by hand from the shapes (untied head, GQA).
    let hd = h / heads;
    let per_layer = 2 * h // input / post-attention norms
        + heads * hd * h // q
        + 2 * kv * hd * h // k, v
        + h * heads * hd // o
        + 3 * i * h; // gate, up, down
    let want = 2 * vocab * h + layers * per_layer + h;
    assert_eq!(gen["parameters"].as_u64(), Some(want as u64));

    let info = run_json(COMPRESS, &["inspect", p(&model), "--json"]);
    assert_eq!(info["architecture"], "llama");
    assert_eq!(info["parameters"].as_u64(), Some(want as u64));
    assert_eq!(info["stored_elements"].as_u64(), Some(want as u64));
    assert_eq!(info["layers"].as_u64(), Some(layers as u64));
    assert_eq!(info["kv_heads"].as_u64(), Some(kv as u64));
    assert_eq!(
        info["dtypes"]["BF16"].as_u64(),
        info["tensor_count"].as_u64()
    );
    assert_eq!(
        info["size_on_disk_bytes"].as_u64(),
        gen["safetensors_bytes"].as_u64()
    );
    let ref_tok =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/ref-llama-9m/tokenizer.json");
    if ref_tok.is_file() {
        assert_eq!(
            std::fs::read(model.join("tokenizer.json")).unwrap(),
            std::fs::read(&ref_tok).unwrap()
        );
    }

    // Weights look like N(0, 0.02); norms are exactly one.
    let ck = Checkpoint::open(&model).unwrap();
    ck.validate_dense().unwrap();
    let q = ck.f32("model.layers.0.mlp.gate_proj.weight").unwrap();
    let n = q.len() as f64;
    let mean = q.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (q.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(mean.abs() < 1e-3, "mean {mean}");
    assert!((std - 0.02).abs() < 1e-3, "std {std}");
    assert!(ck
        .f32("model.layers.1.input_layernorm.weight")
        .unwrap()
        .iter()
        .all(|&x| x == 1.0));

    // Identity pipeline through the bench (child `compress` process).
    let out = tmp.path().join("tiny-identity");
    let r = run_json(
        BENCH,
        &[
            "identity",
            "--model",
            p(&model),
            "--out",
            p(&out),
            "--compress",
            COMPRESS,
            "--json",
        ],
    );
    assert_eq!(r["identical_to_input"], Value::Bool(true), "{r}");
    assert!(r["peak_rss_bytes"].as_u64().unwrap_or(0) > 0, "{r}");
    assert_eq!(r["size_bytes"], gen["safetensors_bytes"]);

    // Check byte identity independently of the report.
    let a = Checkpoint::open(&model).unwrap();
    let b = Checkpoint::open(&out).unwrap();
    let na: Vec<&String> = a.names().collect();
    let nb: Vec<&String> = b.names().collect();
    assert_eq!(na, nb);
    for name in na {
        let (ia, ba) = a.raw(name).unwrap();
        let (ib, bb) = b.raw(name).unwrap();
        assert_eq!(ia.dtype, ib.dtype, "{name}");
        assert_eq!(ia.shape, ib.shape, "{name}");
        assert!(ba == bb, "tensor {name} differs");
    }
    assert!(out.join("report.json").is_file());
}

/// `bench floor` counts the FLOPs of the reference model's calibration work from its shapes
/// (checked by hand here) and measures positive rates; `bench peer-speed` runs a peer recipe and
/// reads the peer's seconds from the peer table.
#[test]
fn floor_and_peer_speed_report_their_figures() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/ref-llama-9m");
    let f = run_json(
        BENCH,
        &["floor", "--json", "--tokens", "1000", "--model", p(&model)],
    );
    // hidden 256, 4 heads × 64, 2 kv heads × 64, intermediate 768, seq 512: per token
    // 2·256·(256 + 2·128) + 2·256·256 + 4·256·513/2 + 6·256·768 = 1,835,520 FLOP
    let fwd = f["forward_gflop_per_layer"].as_f64().unwrap() * 1e9;
    assert!((fwd - 1000.0 * 1_835_520.0).abs() < 1.0, "{fwd}");
    // Hessians: d(d + 1) per token for inputs 256, 256, 256, 768
    let hess = f["hessian_gflop_per_layer"].as_f64().unwrap() * 1e9;
    let want = 1000.0 * (3.0 * 256.0 * 257.0 + 768.0 * 769.0);
    assert!((hess - want).abs() < 1.0, "{hess}");
    assert!(f["gemm_gflops"].as_f64().unwrap() > 0.0 && f["gptq_floor_s"].as_f64().unwrap() > 0.0);
    let tmp = tempfile::tempdir().unwrap();
    let s = run_json(
        BENCH,
        &[
            "peer-speed",
            "--json",
            "--recipes",
            "magnitude-50",
            "--work",
            p(tmp.path()),
            "--compress",
            COMPRESS,
        ],
    );
    let rows = s["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["recipe"], "magnitude-50");
    assert_eq!(rows[0]["peer_oneshot_s"].as_f64(), Some(0.2));
    assert!(rows[0]["pass_s"]["magnitude"].as_f64().unwrap() > 0.0);
    assert!(s["calibration_tokens"].as_u64().unwrap() > 30_000);
}

/// `bench speed` prints issue #21's figures in one run: eval rows (tokens, perplexities equal
/// to `compress eval`'s; transformers' absence reported, not hidden), the pipeline twice with
/// the second run's baseline from the eval cache, and the GPTQ row against the peer's seconds.
#[test]
fn speed_reports_eval_pipeline_and_peer_rows() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/ref-llama-9m");
    let wiki =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/eval/wikitext2/wiki.test.raw");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("w6k.txt");
    std::fs::write(&data, &std::fs::read(&wiki).unwrap()[..6000]).unwrap();
    let yaml = tmp.path().join("p.yaml");
    std::fs::write(
        &yaml,
        format!(
            "model: {}\noutput: {}\npasses:\n  - rtn: {{bits: 4, group_size: 128}}\n\
             export: {{format: compressed-tensors}}\neval: {{datasets: [{}], seq_len: 256}}\n",
            p(&model),
            p(&tmp.path().join("never-written")),
            p(&data)
        ),
    )
    .unwrap();
    let s = run_json(
        BENCH,
        &[
            "speed",
            "--json",
            "--model",
            p(&model),
            "--data",
            p(&data),
            "--python",
            "false",
            "--pipeline",
            p(&yaml),
            "--compress",
            COMPRESS,
        ],
    );
    let e = &s["eval"][0];
    assert!(e["tokens"].as_u64().unwrap() > 1000, "{e}");
    let direct = run_json(
        COMPRESS,
        &[
            "eval",
            "--json",
            "--quiet",
            "--model",
            p(&model),
            "--data",
            p(&data),
        ],
    );
    assert_eq!(
        e["f32_ppl"].as_f64(),
        direct["results"]["w6k.txt"]["perplexity"].as_f64()
    );
    assert!(e["bf16_ppl"].as_f64().unwrap() > 0.0);
    assert!(e["transformers_s"].is_null() && e["transformers_error"].is_string());
    let pl = &s["pipeline"];
    assert_eq!(pl["first"]["baseline"], "computed");
    assert_eq!(pl["cached"]["baseline"], "cache");
    assert!(pl["ratio"].as_f64().unwrap() > 0.0);
    assert!(
        !tmp.path().join("never-written").exists(),
        "the output was not redirected"
    );
    let g = &s["gptq_vs_llm_compressor"];
    assert_eq!(g["row"]["recipe"], "gptq-w4g128");
    assert_eq!(g["row"]["peer_oneshot_s"].as_f64(), Some(14.8));
    assert!(g["row"]["ratio"].as_f64().unwrap() > 0.0);
}
