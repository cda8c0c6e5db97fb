//! Pipelines end to end through the binary: identity, RTN against llm-compressor's golden
//! files, GPTQ into every format, read back and evaluated.

use crate::common;
use compress::model::Checkpoint;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn run(yaml: &str, dir: &Path, extra: &[&str]) -> Value {
    let p = dir.join("p.yaml");
    std::fs::write(&p, yaml).unwrap();
    let o = Command::new(common::bin())
        .arg(&p)
        .args(["--quiet", "--json"])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "compress failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("--json prints one JSON object")
}

fn model() -> String {
    common::ref_model().display().to_string()
}

#[test]
fn identity_pipeline_is_byte_identical_and_says_so() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("id");
    // --model / --output override the file's values
    let r = run(
        "model: /nonexistent\noutput: /nonexistent/out\npasses: []\n",
        d.path(),
        &["--model", &model(), "--output", out.to_str().unwrap()],
    );
    assert_eq!(r["schema"], "compress.report/2");
    assert_eq!(r["output"]["identical_to_input"], true);
    let a = Checkpoint::open(&common::ref_model()).unwrap();
    let b = Checkpoint::open(&out).unwrap();
    assert!(compress::runner::tensors_identical(&a, &b).unwrap());
    assert_eq!(a.config.raw, b.config.raw);
    for f in ["report.json", "report.md", "tokenizer.json", "config.json"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("byte-identical"));
}

fn assert_matches_golden(out: &Path, golden: &str) {
    let g = common::shared()
        .join("golden/compressed_tensors")
        .join(golden);
    let ours = Checkpoint::open(out).unwrap();
    let gold = Checkpoint::open(&g).unwrap();
    let on: Vec<&String> = ours.names().collect();
    let gn: Vec<&String> = gold.names().collect();
    assert_eq!(on, gn, "tensor names differ");
    for n in gn {
        let (ia, ba) = ours.raw(n).unwrap();
        let (ib, bb) = gold.raw(n).unwrap();
        assert_eq!(ia.dtype, ib.dtype, "{n} dtype");
        assert_eq!(ia.shape, ib.shape, "{n} shape");
        assert!(ba == bb, "{n}: bytes differ");
    }
    let mut qa = ours.config.raw["quantization_config"].clone();
    let mut qb = gold.config.raw["quantization_config"].clone();
    qa.as_object_mut().unwrap().remove("version");
    qb.as_object_mut().unwrap().remove("version");
    assert_eq!(qa, qb, "quantization_config differs");
}

#[test]
fn rtn_reproduces_llm_compressor_byte_for_byte() {
    let d = tempfile::tempdir().unwrap();
    for (golden, scheme) in [
        (
            "ref-llama-9m-rtn-w4g128",
            "{bits: 4, group_size: 128, sym: true}",
        ),
        (
            "ref-llama-9m-rtn-w4g128-asym",
            "{bits: 4, group_size: 128, sym: false}",
        ),
        // llm-compressor's W8A16 preset is group 128 (see the golden config.json)
        (
            "ref-llama-9m-rtn-w8ch",
            "{bits: 8, group_size: 128, sym: true}",
        ),
        // the float schemes by their preset names: FP8 per channel (bf16 scales) and in
        // 128×128 blocks, NVFP4 (E4M3 group scales under a global scale shared by q/k/v and by
        // gate/up), MXFP4 (E8M0 exponents)
        ("ref-llama-9m-rtn-fp8-dynamic", "{scheme: FP8_DYNAMIC}"),
        ("ref-llama-9m-rtn-fp8-block", "{scheme: FP8_BLOCK}"),
        ("ref-llama-9m-rtn-nvfp4a16", "{scheme: NVFP4A16}"),
        ("ref-llama-9m-rtn-mxfp4a16", "{scheme: mxfp4a16}"),
    ] {
        let out = d.path().join(golden);
        let r = run(
            &format!(
                "model: {}\noutput: {}\npasses:\n  - rtn: {scheme}\nexport: {{format: compressed-tensors}}\n",
                model(),
                out.display()
            ),
            d.path(),
            &[],
        );
        assert_eq!(r["output"]["format"], "compressed-tensors");
        assert_matches_golden(&out, golden);
    }
}

/// A mixture of experts (ref-qwen3moe-20m: 8 experts, 2 routed): every expert linear
/// quantized under its own name, the routers (`mlp.gate`) left dense by `targets: Linear`
/// and listed in `ignore` — llm-compressor's W4A16 with `ignore: [lm_head, 're:.*mlp.gate$']`,
/// tensor for tensor and its config block.
#[test]
fn moe_rtn_reproduces_llm_compressor_byte_for_byte() {
    let d = tempfile::tempdir().unwrap();
    let golden = "ref-qwen3moe-20m-rtn-w4g128";
    let out = d.path().join(golden);
    let r = run(
        &format!(
            "model: {}\noutput: {}\npasses:\n  - rtn: {{scheme: W4A16}}\nexport: {{format: compressed-tensors}}\n",
            common::shared().join("models/ref-qwen3moe-20m").display(),
            out.display()
        ),
        d.path(),
        &[],
    );
    assert_eq!(r["model"]["architecture"], "qwen3_moe");
    assert_matches_golden(&out, golden);
}

fn ppl_of(r: &Value, which: &str) -> f64 {
    r["eval"]["wiki.test.raw"][which]["perplexity"]
        .as_f64()
        .unwrap()
}

#[test]
fn gptq_every_format_reads_back_and_evaluates() {
    let d = tempfile::tempdir().unwrap();
    let wiki = common::shared().join("data/eval/wikitext2/wiki.test.raw");
    // A short slice of wikitext keeps the test fast: the first 40k bytes.
    let text = std::fs::read_to_string(&wiki).unwrap();
    let cut: String = text.chars().take(40_000).collect();
    let small = d.path().join("wiki.test.raw");
    std::fs::write(&small, cut).unwrap();
    let mut ppl = Vec::new();
    for fmt in ["compressed-tensors", "gptq", "dense"] {
        let out = d.path().join(fmt);
        let r = run(
            &format!(
                "model: {}\noutput: {}\ncalibration: {{path: {}, samples: 16, seq_len: 256, seed: 0}}\n\
                 passes:\n  - gptq: {{bits: 4, group_size: 128, act_order: true}}\n\
                 export: {{format: {fmt}}}\neval: {{datasets: [{}], seq_len: 256}}\n",
                model(),
                out.display(),
                common::shared().join("data/calib/c4_calib.jsonl").display(),
                small.display()
            ),
            d.path(),
            &[],
        );
        let (before, after) = (ppl_of(&r, "before"), ppl_of(&r, "after"));
        assert!(
            after > before * 0.98 && after < before * 1.05,
            "{fmt}: {before} → {after}"
        );
        assert_eq!(r["layers"].as_array().unwrap().len(), 6 * 7);
        for rec in r["layers"].as_array().unwrap() {
            let e = rec["rel_output_error"].as_f64().unwrap();
            assert!(e > 0.0 && e < 0.05, "{fmt}: relative output error {e}");
        }
        if fmt != "dense" {
            let bpw = r["output"]["bits_per_weight"].as_f64().unwrap();
            assert!(bpw > 4.0 && bpw < 4.6, "{fmt}: {bpw} bits per weight");
        }
        // `compress eval` on the artifact gives the report's number
        let o = Command::new(common::bin())
            .args(["eval", "--quiet", "--json", "--seq-len", "256", "--model"])
            .arg(&out)
            .arg("--data")
            .arg(&small)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let e: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(e["seq_len"], 256);
        assert_eq!(
            e["results"]["wiki.test.raw"]["perplexity"]
                .as_f64()
                .unwrap(),
            after
        );
        ppl.push(after);
    }
    // Same integers in every format: the read-back perplexities agree closely (GPTQ stores
    // f16 scales, the others bf16 / dequantized bf16).
    for p in &ppl[1..] {
        assert!((p / ppl[0] - 1.0).abs() < 2e-3, "{ppl:?}");
    }
    // the GPTQ checkpoint carries its metadata
    let q: Value =
        serde_json::from_slice(&std::fs::read(d.path().join("gptq/quantize_config.json")).unwrap())
            .unwrap();
    assert_eq!(q["bits"], 4);
    assert_eq!(q["desc_act"], true);
}

#[test]
fn example_pipelines_parse() {
    for e in
        std::fs::read_dir(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pipelines"))
            .unwrap()
    {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        let pl = compress::pipeline::Pipeline::from_file(&p)
            .unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
        for s in &pl.passes {
            s.build().unwrap();
        }
    }
}

#[test]
fn output_carries_a_checksum_manifest() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    run(
        &format!("model: {}\noutput: {}\n", model(), out.display()),
        d.path(),
        &[],
    );
    let m = std::fs::read_to_string(out.join("checksums.sha256")).unwrap();
    let mut listed = 0;
    for line in m.lines() {
        let (h, name) = line.split_once("  ").unwrap();
        assert_eq!(
            h,
            compress::util::sha256_file(&out.join(name)).unwrap(),
            "{name}"
        );
        listed += 1;
    }
    let files = std::fs::read_dir(&out).unwrap().count();
    assert_eq!(listed, files - 1, "every file but the manifest is listed");
    assert!(m.contains("model.safetensors") && m.contains("report.json"));
}

/// Same inputs, pipeline and seed → byte-identical output and identical report numbers
/// (perplexities, per-linear losses and errors), whatever the thread count (1, 2, 3).
#[test]
fn output_is_identical_with_one_and_two_threads() {
    let d = tempfile::tempdir().unwrap();
    let text = std::fs::read(common::shared().join("data/eval/wikitext2/wiki.test.raw")).unwrap();
    let small = d.path().join("small.txt");
    std::fs::write(&small, &text[..20_000]).unwrap();
    let mut digests = Vec::new();
    let mut numbers = Vec::new();
    for threads in ["1", "2", "3"] {
        let out = d.path().join(format!("t{threads}"));
        let p = d.path().join("p.yaml");
        std::fs::write(
            &p,
            format!(
                "model: {}\noutput: {}\ncalibration: {{path: {}, samples: 8, seq_len: 128, seed: 3}}\n\
                 passes:\n  - gptq: {{bits: 4, group_size: 64, act_order: true, true_sequential: true}}\n\
                 export: {{format: compressed-tensors}}\neval: {{datasets: [{}], seq_len: 128}}\n",
                model(),
                out.display(),
                common::shared().join("data/calib/c4_calib.jsonl").display(),
                small.display()
            ),
        )
        .unwrap();
        let o = Command::new(common::bin())
            .arg(&p)
            .arg("--quiet")
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        digests.push(compress::util::sha256_file(&out.join("model.safetensors")).unwrap());
        let mut r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
        for rec in r["layers"].as_array_mut().unwrap() {
            rec.as_object_mut().unwrap().remove("seconds");
        }
        assert!(
            r["eval"]["small.txt"]["after"]["perplexity"].is_number(),
            "{}",
            r["eval"]
        );
        numbers.push((r["eval"].clone(), r["layers"].clone(), r["summary"].clone()));
    }
    assert_eq!(
        digests[0], digests[1],
        "outputs differ between 1 and 2 threads"
    );
    assert!(
        numbers[0] == numbers[1],
        "report numbers differ between 1 and 2 threads"
    );
}

#[test]
fn zero_shot_tasks_in_pipeline_and_cli() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let tasks = common::shared().join("data/eval/tasks");
    let r = run(
        &format!(
            "model: {}\noutput: {}\npasses:\n  - rtn: {{bits: 8, group_size: 128}}\n\
             eval: {{tasks: [piqa, boolq], tasks_dir: {}, limit: 12}}\n",
            model(),
            out.display(),
            tasks.display()
        ),
        d.path(),
        &[],
    );
    for t in ["piqa", "boolq"] {
        let b = &r["tasks"][t]["before"];
        let a = &r["tasks"][t]["after"];
        assert_eq!(a["n"], 12);
        let acc = a["metrics"]["acc"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
        assert!(b["metrics"]["acc"].is_number());
    }
    assert!(std::fs::read_to_string(out.join("report.md"))
        .unwrap()
        .contains("Zero-shot"));
    // `compress eval --tasks` gives the same numbers for the artifact
    let o = Command::new(common::bin())
        .args([
            "eval",
            "--quiet",
            "--json",
            "--tasks",
            "piqa,boolq",
            "--limit",
            "12",
            "--model",
        ])
        .arg(&out)
        .arg("--tasks-dir")
        .arg(&tasks)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(e["tasks"]["piqa"], r["tasks"]["piqa"]["after"]);
    // unknown task names are refused up front
    let o = Command::new(common::bin())
        .args(["eval", "--quiet", "--tasks", "mmlu", "--model"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn report_rerenders_and_runs_compare() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("rtn4"), d.path().join("rtn8"));
    for (out, bits) in [(&a, 4), (&b, 8)] {
        run(
            &format!(
                "model: {}\noutput: {}\npasses:\n  - rtn: {{bits: {bits}, group_size: 128}}\nexport: {{format: compressed-tensors}}\n",
                model(),
                out.display()
            ),
            d.path(),
            &[],
        );
        let html = std::fs::read_to_string(out.join("report.html")).unwrap();
        assert!(html.contains("<svg") && !html.contains("http://") && !html.contains("https://"));
    }
    // `compress report` re-renders from report.json alone
    std::fs::remove_file(a.join("report.html")).unwrap();
    std::fs::remove_file(a.join("report.md")).unwrap();
    let o = Command::new(common::bin())
        .args(["report", "--quiet"])
        .arg(&a)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(a.join("report.html").exists() && a.join("report.md").exists());
    let page = d.path().join("cmp.html");
    let o = Command::new(common::bin())
        .args(["compare", "--quiet"])
        .arg(&a)
        .arg(&b)
        .arg("--html")
        .arg(&page)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = String::from_utf8_lossy(&o.stdout);
    assert!(md.contains("rtn4") && md.contains("rtn8"), "{md}");
    assert!(std::fs::read_to_string(page).unwrap().contains("rtn8"));
}

#[test]
fn document_sampling_calibrates_on_whole_records() {
    let d = tempfile::tempdir().unwrap();
    let r = run(
        &format!(
            "model: {}\noutput: {}\ncalibration: {{path: {}, samples: 6, seq_len: 96, sampling: documents, batch: 4}}\n\
             passes:\n  - gptq: {{bits: 4, group_size: 128, true_sequential: false}}\nexport: {{format: gptq}}\n",
            model(),
            d.path().join("o").display(),
            common::shared().join("data/calib/c4_calib.jsonl").display()
        ),
        d.path(),
        &[],
    );
    assert_eq!(r["layers"].as_array().unwrap().len(), 42);
    assert_eq!(r["pipeline"]["calibration"]["sampling"], "documents");
    // the GPTQ config block states what the pass did, not a constant
    let qc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("o/quantize_config.json")).unwrap())
            .unwrap();
    assert_eq!(qc["true_sequential"], false);
}

/// A sharded output (index + several files) reads back like the single file it came from.
#[test]
fn sharded_checkpoints_are_written_and_read() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("sharded");
    run(
        &format!(
            "model: {}\noutput: {}\npasses: []\nexport: {{format: dense, max_shard_bytes: 3000000}}\n",
            model(),
            out.display()
        ),
        d.path(),
        &[],
    );
    assert!(out.join("model.safetensors.index.json").exists());
    let shards = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("model-")
        })
        .count();
    assert!(shards > 3, "{shards} shards");
    let a = Checkpoint::open(&common::ref_model()).unwrap();
    let b = Checkpoint::open(&out).unwrap();
    assert_eq!(b.files.len(), shards);
    assert!(compress::runner::tensors_identical(&a, &b).unwrap());
    // and the sharded checkpoint is a valid pipeline input
    let again = d.path().join("again");
    let r = run(
        &format!(
            "model: {}\noutput: {}\npasses: []\n",
            out.display(),
            again.display()
        ),
        d.path(),
        &[],
    );
    assert_eq!(r["output"]["identical_to_input"], true);
}
