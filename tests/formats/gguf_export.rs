//! GGUF export end to end on the reference model (`export: {format: gguf}`): the written
//! model.gguf is read by our own reader (names, ggml types of llama.cpp's mixes, shapes,
//! metadata, every tensor's bytes equal to llama.cpp's reference encoder applied to the source
//! weights in the converter's layout), read back for evaluation (the report's perplexity is the
//! GGUF file's), and, when a Python with the `gguf` package is available
//! (`COMPRESS_GGUF_PYTHON`, or /work/ggufvenv/bin/python), parsed by gguf-py's GGUFReader.

use crate::common;
use compress::formats::gguf::{self, GgufFile, Value};
use compress::model::Checkpoint;
use compress::quant::ggml::{self, GgmlType};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(yaml: &str, dir: &Path) -> Json {
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

fn pipeline(out: &Path, ty: &str, extra: &str) -> String {
    let eval = out.with_file_name("wiki-head.txt");
    let text = std::fs::read(common::shared().join("data/eval/wikitext2/wiki.test.raw")).unwrap();
    std::fs::write(&eval, &text[..24_000]).unwrap();
    format!(
        "model: {}\noutput: {}\npasses: []\nexport: {{format: gguf, gguf_type: {ty}{extra}}}\n\
         eval: {{datasets: [{}], seq_len: 128}}\n",
        common::ref_model().display(),
        out.display(),
        eval.display()
    )
}

fn types(g: &GgufFile) -> Vec<(String, GgmlType)> {
    g.tensors
        .iter()
        .map(|(t, _)| (t.name.clone(), t.ty))
        .collect()
}

/// Every tensor of `g` holds exactly the reference encoding of the source tensor in the
/// converter's layout (Q/K rows permuted), and has the HF shape reversed.
fn check_bytes(g: &GgufFile, src: &Checkpoint) {
    for (t, r) in &g.tensors {
        let [hf] = gguf::hf_names(&t.name, &src.config)
            .unwrap()
            .try_into()
            .unwrap();
        let shape = src.info(&hf).unwrap().0.shape.clone();
        let want_dims: Vec<u64> = shape.iter().rev().map(|d| *d as u64).collect();
        assert_eq!(t.dims, want_dims, "{}", t.name);
        let mut v = src.f32(&hf).unwrap();
        if let Some(h) = gguf::permute_heads(&hf, &src.config) {
            v = gguf::permute_rows(&v, shape[0], shape[1], h, false).unwrap();
        }
        let want = ggml::quantize(t.ty, &v).unwrap();
        assert!(g.bytes(r) == want.as_slice(), "{}: bytes differ", t.name);
    }
}

#[test]
fn q4_0_file_layout_metadata_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let report = run(&pipeline(&out, "q4_0", ""), dir.path());
    let src = Checkpoint::open(&common::ref_model()).unwrap();
    let g = GgufFile::open(&out.join("model.gguf")).unwrap();
    assert_eq!(g.version, 3);
    // no passes, but GGUF re-encodes every tensor: no identity verdict, and no linear byte
    // count from the engine (it would count the dense weights, not the file's)
    assert!(
        report["output"]["identical_to_input"].is_null(),
        "{}",
        report["output"]
    );
    assert!(
        report["output"]["linear_bytes"].is_null(),
        "{}",
        report["output"]
    );

    // names and types: llama.cpp's Q4_0 mix (output Q6_K, norms F32, the rest Q4_0)
    let n_layers = src.config.num_layers;
    assert_eq!(g.tensors.len(), 2 + 9 * n_layers + 1); // embd, output_norm, output
    for (name, ty) in types(&g) {
        let want = if name == "output.weight" {
            GgmlType::Q6K
        } else if name.ends_with("norm.weight") {
            GgmlType::F32
        } else {
            GgmlType::Q4_0
        };
        assert_eq!(ty, want, "{name}");
    }
    for n in [
        "token_embd.weight",
        "output.weight",
        "output_norm.weight",
        "blk.5.ffn_down.weight",
    ] {
        assert!(g.tensor(n).is_some(), "missing {n}");
    }
    check_bytes(&g, &src);
    // 32-byte alignment of every tensor
    assert!(g.tensors.iter().all(|(_, r)| r.start % 32 == 0));

    // metadata llama.cpp needs
    let cfg = &src.config;
    assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
    for (k, v) in [
        ("llama.block_count", cfg.num_layers),
        ("llama.embedding_length", cfg.hidden_size),
        ("llama.feed_forward_length", cfg.intermediate_size),
        ("llama.attention.head_count", cfg.num_heads),
        ("llama.attention.head_count_kv", cfg.num_kv_heads),
        ("llama.context_length", 2048),
        ("llama.vocab_size", cfg.vocab_size),
        ("llama.rope.dimension_count", cfg.head_dim),
        ("general.file_type", 2),
        ("general.quantization_version", 2),
        ("tokenizer.ggml.bos_token_id", 0),
        ("tokenizer.ggml.eos_token_id", 1),
    ] {
        assert_eq!(g.get_u64(k).unwrap(), v as u64, "{k}");
    }
    assert_eq!(g.get_f64("llama.rope.freq_base").unwrap(), 10000.0);
    assert_eq!(
        g.get_f64("llama.attention.layer_norm_rms_epsilon").unwrap() as f32,
        1e-5
    );
    assert_eq!(g.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), "gpt-2");
    assert_eq!(g.kv["tokenizer.ggml.add_bos_token"], Value::Bool(true));
    let Value::Array(_, toks) = &g.kv["tokenizer.ggml.tokens"] else {
        panic!("tokens")
    };
    assert_eq!(toks.len(), cfg.vocab_size);
    assert_eq!(toks[0], Value::Str("<|begin_of_text|>".into()));
    let Value::Array(_, tt) = &g.kv["tokenizer.ggml.token_type"] else {
        panic!("token types")
    };
    assert_eq!(
        (&tt[0], &tt[1], &tt[300]),
        (&Value::I32(3), &Value::I32(3), &Value::I32(1))
    );
    let Value::Array(_, merges) = &g.kv["tokenizer.ggml.merges"] else {
        panic!("merges")
    };
    assert_eq!(merges.len(), 7934);

    // read back: the evaluated weights are the GGUF file's, un-permuted to the HF layout
    let back = Checkpoint::open(&out).unwrap();
    let q = back.f32("model.layers.2.self_attn.q_proj.weight").unwrap();
    let orig = src.f32("model.layers.2.self_attn.q_proj.weight").unwrap();
    let (_, enc) = g.f32("blk.2.attn_q.weight").unwrap();
    let unperm = gguf::permute_rows(&enc, 256, 256, cfg.num_heads, true).unwrap();
    assert_eq!(q, unperm);
    let err = q
        .iter()
        .zip(&orig)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let amax = orig.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        err > 0.0 && err < amax / 8.0,
        "Q4_0 error {err} (max |w| {amax})"
    );
    assert!(!back.has("lm_head.weight") || g.tensor("output.weight").is_some());

    // the report scored that file: after within a few percent of before on this model
    let e = &report["eval"]["wiki-head.txt"];
    let before = e["before"]["perplexity"].as_f64().unwrap();
    let after = e["after"]["perplexity"].as_f64().unwrap();
    assert!(after > before && after < before * 1.5, "{before} → {after}");
    assert_eq!(report["output"]["format"], "gguf");
    let bpw = report["output"]["bits_per_weight"].as_f64().unwrap();
    assert!(
        (bpw - 4.5).abs() < 1e-9,
        "Q4_0 stores 4.5 bits per weight, report says {bpw}"
    );

    python_reader_check(&out.join("model.gguf"), &g);

    // llama.cpp's activation conversion: the decoder linears quantize their inputs to Q8_0
    // blocks (Q4_0's vec_dot_type), the head's (Q6_K) to Q8_K; perplexity moves a little
    let em = Checkpoint::open(&out).unwrap();
    let opts = compress::model::EvalOptions {
        llama_cpp_activations: true,
        ..Default::default()
    };
    let lw = compress::model::layer::LayerWeights::load_eval(&em, 1, &opts).unwrap();
    for (name, lin) in &lw.linears {
        assert_eq!(
            lin.act_quant(),
            Some(compress::model::layer::ActQuant::Ggml(ggml::VecDot::Q8_0)),
            "{name}"
        );
    }
    let eval = |extra: &[&str]| {
        let o = Command::new(common::bin())
            .args(["eval", "--model"])
            .arg(&out)
            .arg("--data")
            .arg(dir.path().join("wiki-head.txt"))
            .args(["--seq-len", "128", "--json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Json = serde_json::from_slice(&o.stdout).unwrap();
        v["results"]["wiki-head.txt"]["perplexity"]
            .as_f64()
            .unwrap()
    };
    let (plain, llama) = (eval(&[]), eval(&["--llama-cpp-activations"]));
    assert!(
        (plain - after).abs() < 1e-9 * after,
        "{plain} vs the report's {after}"
    );
    assert!(
        llama != plain && (llama / plain - 1.0).abs() < 0.01,
        "with llama.cpp's activations {llama}, without {plain}"
    );
    // a safetensors checkpoint has no stored ggml types to emulate
    let o = Command::new(common::bin())
        .args(["eval", "--model"])
        .arg(common::ref_model())
        .arg("--data")
        .arg(dir.path().join("wiki-head.txt"))
        .args(["--seq-len", "128", "--llama-cpp-activations"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("GGUF"), "{err}");
}

#[test]
fn q4_k_m_mix_and_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    run(
        &pipeline(
            &out,
            "q4_k_m",
            ", tensor_types: [{pattern: 'blk\\.0\\.attn_q', type: q8_0}]",
        ),
        dir.path(),
    );
    let src = Checkpoint::open(&common::ref_model()).unwrap();
    let g = GgufFile::open(&out.join("model.gguf")).unwrap();
    // 6 layers: use_more_bits(i, 6) holds for i = 2 and 5 → attn_v, ffn_down in Q6_K there
    for (name, ty) in types(&g) {
        let layer = name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok());
        let want = match (name.as_str(), layer) {
            ("output.weight", _) => GgmlType::Q6K,
            (n, _) if n.ends_with("norm.weight") => GgmlType::F32,
            ("blk.0.attn_q.weight", _) => GgmlType::Q8_0,
            (n, Some(l))
                if (n.ends_with("attn_v.weight") || n.ends_with("ffn_down.weight"))
                    && (l == 2 || l == 5) =>
            {
                GgmlType::Q6K
            }
            _ => GgmlType::Q4K,
        };
        assert_eq!(ty, want, "{name}");
    }
    assert_eq!(g.get_u64("general.file_type").unwrap(), 15);
    check_bytes(&g, &src);
}

#[test]
fn gguf_pipeline_errors_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let p = dir.path().join("p.yaml");
    for (yaml, msg) in [
        (
            format!("model: {}\noutput: {}\nexport: {{format: gguf}}\n", common::ref_model().display(), out.display()),
            "export.gguf_type` is required",
        ),
        (
            format!("model: {}\noutput: {}\nexport: {{format: gguf, gguf_type: q3_x}}\n", common::ref_model().display(), out.display()),
            "q3_x",
        ),
        (
            format!("model: {}\noutput: {}\nexport: {{format: dense, gguf_type: q4_0}}\n", common::ref_model().display(), out.display()),
            "needs `format: gguf`",
        ),
        (
            format!("model: {}\noutput: {}\nexport: {{format: gguf, gguf_type: q4_0, tensor_types: [{{pattern: '(', type: q8_0}}]}}\n", common::ref_model().display(), out.display()),
            "not a valid regex",
        ),
        (
            format!("model: {}\noutput: {}\ncalibration: {{path: x.txt}}\npasses: [{{imatrix: {{}}}}]\nexport: {{format: compressed-tensors}}\n", common::ref_model().display(), out.display()),
            "only informs a GGUF export",
        ),
    ] {
        std::fs::write(&p, yaml).unwrap();
        let o = Command::new(common::bin()).arg(&p).arg("--quiet").output().unwrap();
        assert_eq!(o.status.code(), Some(2));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(msg), "expected `{msg}` in: {err}");
        assert!(!out.exists());
    }
}

fn gguf_python() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("COMPRESS_GGUF_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from("/work/ggufvenv/bin/python");
    p.exists().then_some(p)
}

/// gguf-py's GGUFReader (llama.cpp's own Python reader) sees the same names, types, shapes and
/// metadata keys as ours.
fn python_reader_check(path: &Path, g: &GgufFile) {
    let Some(py) = gguf_python() else {
        eprintln!("skipped: gguf-py reader check: no Python with the `gguf` package (set COMPRESS_GGUF_PYTHON)");
        return;
    };
    let script = r#"
import json, sys
from gguf import GGUFReader
r = GGUFReader(sys.argv[1])
print(json.dumps({
    "keys": [k for k in r.fields if not k.startswith("GGUF.")],
    "tensors": [[t.name, t.tensor_type.name, [int(x) for x in t.shape]] for t in r.tensors],
    "arch": bytes(r.fields["general.architecture"].parts[-1]).decode(),
    "n_tokens": len(r.fields["tokenizer.ggml.tokens"].data),
}))
"#;
    let o = Command::new(&py)
        .arg("-c")
        .arg(script)
        .arg(path)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "gguf-py: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Json = serde_json::from_slice(&o.stdout).unwrap();
    let keys: Vec<&str> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    let ours: Vec<&str> = g.kv.keys().map(|k| k.as_str()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(sorted, ours);
    assert_eq!(v["arch"], "llama");
    assert_eq!(v["n_tokens"].as_u64().unwrap() as usize, 8192);
    let ts = v["tensors"].as_array().unwrap();
    assert_eq!(ts.len(), g.tensors.len());
    for (t, (e, _)) in ts.iter().zip(&g.tensors) {
        assert_eq!(t[0], e.name.as_str());
        assert_eq!(
            t[1].as_str().unwrap().to_ascii_lowercase(),
            e.ty.name().to_ascii_lowercase()
        );
        let dims: Vec<u64> = t[2]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(dims, e.dims, "{}", e.name);
    }
    eprintln!(
        "gguf-py GGUFReader agrees: {} tensors, {} metadata keys",
        ts.len(),
        keys.len()
    );
}

/// Mean x² per input column of layer 0's q/k/v input (RMSNorm of the embeddings times the
/// norm weight) over the first tokens of the calibration text: an independent estimate of the
/// importance the `imatrix` pass gives q_proj of layer 0.
fn layer0_importance(src: &Checkpoint) -> Vec<f32> {
    let tok = compress::calib::load_tokenizer(&src.tokenizer_path()).unwrap();
    let text =
        compress::calib::read_text(&common::shared().join("data/calib/c4_calib.jsonl"), "text")
            .unwrap();
    let ids = compress::calib::tokenize(&tok, &text[..40_000]).unwrap();
    let d = src.config.hidden_size;
    let emb = src.f32("model.embed_tokens.weight").unwrap();
    let g = src.f32("model.layers.0.input_layernorm.weight").unwrap();
    let eps = src.config.rms_norm_eps as f32;
    let mut acc = vec![0f64; d];
    for &t in &ids {
        let e = &emb[t as usize * d..(t as usize + 1) * d];
        let ms = e.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for j in 0..d {
            let x = e[j] * r * g[j];
            acc[j] += (x * x) as f64;
        }
    }
    acc.iter().map(|a| (a / ids.len() as f64) as f32).collect()
}

/// Q4_K_M of the reference model twice: without passes (llama.cpp's rounding) and with
/// `pass` on 32 × 128 calibration windows. Returns the second run's report and pipeline, and
/// both files.
fn plain_and_calibrated(dir: &Path, pass: &str) -> (Json, String, GgufFile, GgufFile) {
    let plain = dir.join("plain");
    run(&pipeline(&plain, "q4_k_m", ""), dir);
    let out = dir.join("calibrated");
    let yaml = pipeline(&out, "q4_k_m", "").replace(
        "passes: []\n",
        &format!(
            "calibration: {{path: {}, samples: 32, seq_len: 128}}\npasses:\n  - {pass}\n",
            common::shared().join("data/calib/c4_calib.jsonl").display()
        ),
    );
    let report = run(&yaml, dir);
    let p = GgufFile::open(&plain.join("model.gguf")).unwrap();
    let g = GgufFile::open(&out.join("model.gguf")).unwrap();
    (report, yaml, p, g)
}

#[test]
fn imatrix_weighs_the_rounding_as_llama_quantize_does() {
    let dir = tempfile::tempdir().unwrap();
    let (report, _, p, g) = plain_and_calibrated(dir.path(), "imatrix: {}");
    let src = Checkpoint::open(&common::ref_model()).unwrap();
    assert_eq!(types(&p), types(&g), "the imatrix does not change the mix");
    let mut differ = 0;
    for ((t, r), (_, rp)) in g.tensors.iter().zip(&p.tensors) {
        let same = g.bytes(r) == p.bytes(rp);
        if t.name.starts_with("blk.") && !t.name.ends_with("norm.weight") {
            differ += (!same) as usize;
        } else {
            // no importance for the embedding, the output and the norms
            assert!(same, "{}", t.name);
        }
    }
    assert_eq!(
        differ,
        7 * src.config.num_layers,
        "every decoder linear re-encoded"
    );
    // the importance-weighted error of layer 0's q_proj is lower than plain rounding's
    let qw = layer0_importance(&src);
    let w = src.f32("model.layers.0.self_attn.q_proj.weight").unwrap();
    let werr = |f: &GgufFile| {
        let (_, enc) = f.f32("blk.0.attn_q.weight").unwrap();
        let back = gguf::permute_rows(&enc, 256, 256, src.config.num_heads, true).unwrap();
        w.iter()
            .zip(&back)
            .enumerate()
            .map(|(i, (a, b))| qw[i % 256] as f64 * ((a - b) as f64).powi(2))
            .sum::<f64>()
    };
    let (ep, ei) = (werr(&p), werr(&g));
    assert!(ei < ep, "weighted error with imatrix {ei} ≥ without {ep}");
    assert_eq!(report["layers"][0]["pass"], "imatrix");
}

/// A GGUF export killed (SIGKILL) after some layers resumes and writes the same model.gguf as
/// an uninterrupted run: with the exporter's weighted rounding (`imatrix`) and with the blocks
/// `gptq_ggml` computed before the kill.
#[test]
fn killed_gguf_run_resumes_byte_identical() {
    let d = tempfile::tempdir().unwrap();
    for pass in ["imatrix: {}", "gptq_ggml: {}"] {
        let tag = pass.split(':').next().unwrap();
        let yaml = |out: &Path| {
            format!(
                "model: {}\noutput: {}\ncalibration: {{path: {}, samples: 64, seq_len: 256, seed: 1}}\n\
                 passes:\n  - {pass}\nexport: {{format: gguf, gguf_type: q4_k_m}}\n",
                common::ref_model().display(),
                out.display(),
                common::shared().join("data/calib/c4_calib.jsonl").display()
            )
        };
        let full = d.path().join(format!("{tag}-full"));
        std::fs::write(d.path().join("full.yaml"), yaml(&full)).unwrap();
        common::run_ok(&d.path().join("full.yaml"));

        let out = d.path().join(format!("{tag}-resumed"));
        let p = d.path().join("resumed.yaml");
        std::fs::write(&p, yaml(&out)).unwrap();
        common::kill_in_layer(&p, &out, 2, std::time::Duration::ZERO);
        assert!(!out.exists());
        let o = Command::new(common::bin())
            .arg(&p)
            .args(["--quiet", "--resume"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            std::fs::read(full.join("model.gguf")).unwrap()
                == std::fs::read(out.join("model.gguf")).unwrap(),
            "{tag}: model.gguf differs after resume"
        );
        assert!(!out.join(".shard0.spill").exists());
    }
}

/// `gptq_ggml` sweeps each decoder linear onto the grid the GGUF mix gives it, and the file
/// holds exactly those blocks: same types as llama.cpp's mix, every decoder linear re-encoded,
/// the report's records naming each linear's type as the file stores it, and layer 0's q_proj
/// with a lower output error on calibration-like inputs than llama.cpp's rounding of it.
#[test]
fn gptq_ggml_writes_the_blocks_it_compensated() {
    let dir = tempfile::tempdir().unwrap();
    let (report, yaml, p, g) = plain_and_calibrated(dir.path(), "gptq_ggml: {}");
    let src = Checkpoint::open(&common::ref_model()).unwrap();
    assert_eq!(types(&p), types(&g), "gptq_ggml keeps llama.cpp's mix");
    let ty_of: std::collections::HashMap<String, GgmlType> = types(&g).into_iter().collect();
    let records = report["layers"].as_array().unwrap();
    let swept: Vec<&Json> = records
        .iter()
        .filter(|r| r["pass"] == "gptq_ggml")
        .collect();
    assert_eq!(swept.len(), 7 * src.config.num_layers);
    for r in &swept {
        let hf = format!(
            "model.layers.{}.{}.weight",
            r["layer"].as_u64().unwrap(),
            r["linear"].as_str().unwrap()
        );
        let name = gguf::gguf_name(&hf).unwrap();
        assert_eq!(r["notes"]["type"], ty_of[&name].name(), "{name}");
        let (_, rp) = p.tensor(&name).unwrap();
        let (_, rg) = g.tensor(&name).unwrap();
        assert_ne!(p.bytes(rp), g.bytes(rg), "{name} re-encoded");
    }
    // output error of layer 0's q_proj on normed calibration embeddings: X W̃ᵀ vs X Wᵀ
    let tok = compress::calib::load_tokenizer(&src.tokenizer_path()).unwrap();
    let text =
        compress::calib::read_text(&common::shared().join("data/calib/c4_calib.jsonl"), "text")
            .unwrap();
    let ids = compress::calib::tokenize(&tok, &text[..40_000]).unwrap();
    let d = src.config.hidden_size;
    let emb = src.f32("model.embed_tokens.weight").unwrap();
    let gn = src.f32("model.layers.0.input_layernorm.weight").unwrap();
    let eps = src.config.rms_norm_eps as f32;
    let w = src.f32("model.layers.0.self_attn.q_proj.weight").unwrap();
    let out_err = |f: &GgufFile| {
        let (_, enc) = f.f32("blk.0.attn_q.weight").unwrap();
        let back = gguf::permute_rows(&enc, d, d, src.config.num_heads, true).unwrap();
        let dw: Vec<f32> = w.iter().zip(&back).map(|(a, b)| a - b).collect();
        let mut e = 0f64;
        for &t in ids.iter().step_by(4) {
            let x = &emb[t as usize * d..(t as usize + 1) * d];
            let r = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt();
            let xn: Vec<f32> = x.iter().zip(&gn).map(|(v, g)| v * r * g).collect();
            for row in dw.chunks(d) {
                let y: f32 = row.iter().zip(&xn).map(|(a, b)| a * b).sum();
                e += (y as f64).powi(2);
            }
        }
        e
    };
    let (ep, eg) = (out_err(&p), out_err(&g));
    assert!(
        eg < ep,
        "output error with GPTQ {eg} ≥ llama.cpp rounding's {ep}"
    );
    let ppl = |r: &Json| {
        r["eval"]["wiki-head.txt"]["after"]["perplexity"]
            .as_f64()
            .unwrap()
    };
    assert!(ppl(&report).is_finite());
    // a pass that names another grid than the export writes is refused up front
    let bad = yaml.replace("gptq_ggml: {}", "gptq_ggml: {gguf_type: q4_0}");
    std::fs::write(dir.path().join("bad.yaml"), &bad).unwrap();
    let o = Command::new(common::bin())
        .arg(dir.path().join("bad.yaml"))
        .arg("--quiet")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("gguf_type"), "{err}");
}

/// The reference tokenizer cut to the first `n` ids (no merges), with Qwen2's pre-tokenizer (a
/// regex Split, then byte level without its own regex): enough for a fixture model of `n` tokens.
fn qwen_tokenizer(n: usize) -> Json {
    let mut t: Json =
        serde_json::from_slice(&std::fs::read(common::ref_model().join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = t["model"]["vocab"].as_object().unwrap().clone();
    t["model"]["vocab"] = Json::Object(
        vocab
            .into_iter()
            .filter(|(_, id)| id.as_u64().unwrap() < n as u64)
            .collect(),
    );
    t["model"]["merges"] = Json::Array(vec![]);
    if let Some(a) = t["added_tokens"].as_array() {
        let keep: Vec<Json> = a
            .iter()
            .filter(|x| x["id"].as_u64().unwrap() < n as u64)
            .cloned()
            .collect();
        t["added_tokens"] = Json::Array(keep);
    }
    t["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
         "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]});
    t
}

/// qwen2 (attention biases) and qwen3 (q/k norms, head_dim 32 ≠ hidden/heads) export under
/// their own GGUF architectures as llama.cpp's converter writes them — names, biases and norms
/// present, Q and K rows not permuted (only the llama converter permutes), Qwen2's
/// pre-tokenizer named — and read back to the source's logits exactly (f32 is lossless).
#[test]
fn qwen_architectures_export_under_their_own_names() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/transformers");
    for (arch, own) in [
        ("qwen2", "blk.0.attn_q.bias"),
        ("qwen3", "blk.0.attn_q_norm.weight"),
    ] {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir(&src).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(fixtures.join(arch).join(f), src.join(f)).unwrap();
        }
        std::fs::write(
            src.join("tokenizer.json"),
            serde_json::to_vec(&qwen_tokenizer(128)).unwrap(),
        )
        .unwrap();
        let out = d.path().join("out");
        let yaml = format!(
            "model: {}\noutput: {}\npasses: []\nexport: {{format: gguf, gguf_type: f32}}\n",
            src.display(),
            out.display()
        );
        std::fs::write(d.path().join("p.yaml"), yaml).unwrap();
        common::run_ok(&d.path().join("p.yaml"));
        let g = GgufFile::open(&out.join("model.gguf")).unwrap();
        assert_eq!(g.get_str("general.architecture").unwrap(), arch);
        assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), "qwen2");
        assert!(g.tensor(own).is_some(), "{arch}: no {own}");
        let c = Checkpoint::open(&src).unwrap();
        assert_eq!(
            g.get_u64(&format!("{arch}.block_count")).unwrap(),
            c.config.num_layers as u64
        );
        let (_, q) = g.f32("blk.0.attn_q.weight").unwrap();
        assert_eq!(
            q,
            c.f32("model.layers.0.self_attn.q_proj.weight").unwrap(),
            "{arch}: Q rows as in the HF checkpoint"
        );
        let ids = "3,17,42,99,5,64,127,8";
        let logits = |m: &Path, f: &str| {
            let o = Command::new(common::bin())
                .args(["logits", "--quiet", "--ids", ids, "--model"])
                .arg(m)
                .arg("--out")
                .arg(d.path().join(f))
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let st = compress::safetensors_file::SafetensorsFile::open(&d.path().join(f)).unwrap();
            let t = &st.tensors["logits"];
            compress::safetensors_file::to_f32(t.dtype, st.bytes(t)).unwrap()
        };
        assert_eq!(logits(&src, "a.st"), logits(&out, "b.st"), "{arch}: logits");
    }
}

/// The three mixtures export as llama.cpp's converter writes them: qwen3_moe as `qwen3moe`,
/// qwen2_moe as `qwen2moe` (its shared expert as `ffn_*_shexp`, the shared gate a vector
/// `ffn_gate_inp_shexp`), mixtral as `llama` with Q/K permuted; each layer's experts stacked
/// into `ffn_{gate,up,down}_exps` ([experts, out, in], expert E's weight at index E), the
/// router as F32 `ffn_gate_inp`, the expert counts in the metadata — and read back to the
/// source's logits exactly (f32 is lossless). A qwen3_moe checkpoint whose weights are not
/// renormalised is refused: llama.cpp's qwen3moe graph always renormalises.
#[test]
fn mixtures_export_with_stacked_experts() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/transformers");
    for (name, arch, extra) in [
        ("qwen3-moe", "qwen3moe", "blk.1.attn_k_norm.weight"),
        ("qwen2-moe", "qwen2moe", "blk.1.ffn_down_shexp.weight"),
        ("mixtral", "llama", "blk.1.ffn_gate_inp.weight"),
    ] {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir(&src).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(fixtures.join(name).join(f), src.join(f)).unwrap();
        }
        std::fs::write(
            src.join("tokenizer.json"),
            serde_json::to_vec(&qwen_tokenizer(128)).unwrap(),
        )
        .unwrap();
        let out = d.path().join("out");
        let yaml = format!(
            "model: {}\noutput: {}\npasses: []\nexport: {{format: gguf, gguf_type: f32}}\n",
            src.display(),
            out.display()
        );
        std::fs::write(d.path().join("p.yaml"), &yaml).unwrap();
        common::run_ok(&d.path().join("p.yaml"));
        let g = GgufFile::open(&out.join("model.gguf")).unwrap();
        let c = Checkpoint::open(&src).unwrap();
        let moe = c.config.moe.unwrap();
        assert_eq!(g.get_str("general.architecture").unwrap(), arch);
        assert_eq!(
            g.get_u64(&format!("{arch}.expert_count")).unwrap(),
            moe.experts as u64
        );
        assert_eq!(
            g.get_u64(&format!("{arch}.expert_used_count")).unwrap(),
            moe.top_k as u64
        );
        assert!(g.tensor(extra).is_some(), "{name}: no {extra}");
        let block = c.config.block();
        let compress::model::arch::Ffn::Moe {
            experts, shared, ..
        } = &block.mlp.ffn
        else {
            panic!("{name}: not a mixture")
        };
        for (stack, pick) in [
            ("ffn_gate_exps", 0usize),
            ("ffn_up_exps", 1),
            ("ffn_down_exps", 2),
        ] {
            let gname = format!("blk.1.{stack}.weight");
            let (t, _) = g.tensor(&gname).unwrap();
            assert_eq!(t.ty, GgmlType::F32);
            let (_, all) = g.f32(&gname).unwrap();
            let per = all.len() / moe.experts;
            for (e, x) in experts.iter().enumerate() {
                let module = [x.gate, x.up, x.down][pick];
                let hf = format!("model.layers.1.{module}.weight");
                let shape = c.info(&hf).unwrap().0.shape.clone();
                assert_eq!(
                    t.dims,
                    [shape[1] as u64, shape[0] as u64, moe.experts as u64],
                    "{name}: {gname}"
                );
                assert_eq!(
                    &all[e * per..(e + 1) * per],
                    c.f32(&hf).unwrap().as_slice(),
                    "{name}: {gname} expert {e}"
                );
            }
        }
        let (router, _) = g.tensor("blk.0.ffn_gate_inp.weight").unwrap();
        assert_eq!(router.ty, GgmlType::F32);
        if let Some(sh) = shared {
            let (t, _) = g.tensor("blk.0.ffn_gate_inp_shexp.weight").unwrap();
            assert_eq!(t.dims, [c.config.hidden_size as u64], "{name}: shared gate");
            assert!(c.has(&format!("model.layers.0.{}.weight", sh.gate)));
            assert_eq!(
                g.get_u64(&format!("{arch}.expert_shared_feed_forward_length"))
                    .unwrap(),
                moe.shared.unwrap() as u64
            );
        }
        let ids = "3,17,42,99,5,64,127,8";
        let logits = |m: &Path, f: &str| {
            let o = Command::new(common::bin())
                .args(["logits", "--quiet", "--ids", ids, "--model"])
                .arg(m)
                .arg("--out")
                .arg(d.path().join(f))
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let st = compress::safetensors_file::SafetensorsFile::open(&d.path().join(f)).unwrap();
            let t = &st.tensors["logits"];
            compress::safetensors_file::to_f32(t.dtype, st.bytes(t)).unwrap()
        };
        assert_eq!(logits(&src, "a.st"), logits(&out, "b.st"), "{name}: logits");
        if name == "qwen3-moe" {
            // llama.cpp's qwen3moe graph always renormalises: a checkpoint that does not is
            // refused by name
            let mut cfg: Json =
                serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
            cfg["norm_topk_prob"] = Json::Bool(false);
            std::fs::write(src.join("config.json"), cfg.to_string()).unwrap();
            std::fs::remove_dir_all(&out).unwrap();
            let o = Command::new(common::bin())
                .arg(d.path().join("p.yaml"))
                .arg("--quiet")
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                !o.status.success() && err.contains("norm_topk_prob"),
                "{err}"
            );
            assert!(!out.exists(), "nothing published");
        }
    }
}
