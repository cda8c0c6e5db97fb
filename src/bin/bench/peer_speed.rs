//! `bench peer-speed`: pass times of the peer table's recipes against llm-compressor's
//! `oneshot()` seconds, with the FLOP floor of the calibration forwards (`bench floor`).

use super::helpers::{default_ref_model, run_child};
use anyhow::{Context, Result};
use compress::model::Checkpoint;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The peer table's recipes as our passes (llm-compressor's defaults: GPTQ static act order,
/// symmetric W4A16 / W3 group 128, 50% per linear; AWQ on the W4A16 scheme then RTN).
const PEER_RECIPES: [(&str, &str); 7] = [
    ("gptq-w4g128", "gptq: {bits: 4, group_size: 128}"),
    ("gptq-w3g128", "gptq: {bits: 3, group_size: 128}"),
    ("wanda-50", "wanda: {sparsity: 0.5}"),
    ("sparsegpt-50", "sparsegpt: {sparsity: 0.5}"),
    ("sparsegpt-24", "sparsegpt: {pattern: '2:4'}"),
    (
        "awq-w4g128",
        "awq: {bits: 4, group_size: 128, sym: true}\n  - rtn: {bits: 4, group_size: 128}",
    ),
    ("magnitude-50", "magnitude: {sparsity: 0.5}"),
];

/// `oneshot s` of each row of the peer table (a Markdown table: recipe | oneshot s | …).
fn peer_seconds(readme: &Path) -> Result<std::collections::HashMap<String, f64>> {
    let text = std::fs::read_to_string(readme)
        .with_context(|| format!("cannot read {}", readme.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let secs = cells.get(2)?.parse::<f64>().ok()?;
            Some((cells.get(1)?.to_string(), secs))
        })
        .collect())
}

/// Calibration tokens of the first `n` documents of a jsonl file, each cut to `seq_len`.
fn document_tokens(model: &Path, jsonl: &Path, n: usize, seq_len: usize) -> Result<usize> {
    let ckpt = Checkpoint::open(model)?;
    let tok = compress::calib::load_tokenizer(&ckpt.tokenizer_path())?;
    let text = std::fs::read_to_string(jsonl)
        .with_context(|| format!("cannot read {}", jsonl.display()))?;
    let mut total = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()).take(n) {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}: not a JSON line", jsonl.display()))?;
        let doc = v["text"].as_str().unwrap_or_default();
        total += compress::calib::tokenize(&tok, doc)?.len().min(seq_len);
    }
    Ok(total)
}

pub(super) fn peer_speed(
    model: Option<PathBuf>,
    peer: Option<PathBuf>,
    recipes: Vec<String>,
    work: Option<PathBuf>,
    compress_bin: Option<PathBuf>,
    as_json: bool,
) -> Result<()> {
    let model = model.unwrap_or_else(default_ref_model);
    let shared = model.join("../..");
    let peer = peer.unwrap_or_else(|| shared.join("golden/peer/README.md"));
    let calib = shared.join("data/calib/c4_calib.jsonl");
    let peer_s = peer_seconds(&peer)?;
    let bin = match compress_bin {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("compress"),
    };
    let own_work = work.is_none();
    let work = work.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("compress-peer-speed-{}", std::process::id()))
    });
    std::fs::create_dir_all(&work)?;
    let tokens = document_tokens(&model, &calib, 128, 512)?;
    // the floor: statistics + propagation forwards and Hessians at this machine's GEMM rate
    let floor_json = {
        let o = std::process::Command::new(std::env::current_exe()?)
            .args([
                "floor",
                "--json",
                "--tokens",
                &tokens.to_string(),
                "--model",
            ])
            .arg(&model)
            .output()?;
        anyhow::ensure!(o.status.success(), "bench floor failed");
        serde_json::from_slice::<Value>(&o.stdout)?
    };
    let floor = floor_json["gptq_floor_s"].as_f64().unwrap_or(f64::NAN);
    let mut rows = Vec::new();
    for (name, pass) in PEER_RECIPES {
        if !recipes.is_empty() && !recipes.iter().any(|r| r == name) {
            continue;
        }
        let yaml = work.join(format!("{name}.yaml"));
        let out = work.join(name);
        std::fs::write(
            &yaml,
            format!(
                "model: {}\noutput: {}\ncalibration: {{path: {}, sampling: documents, samples: 128, seq_len: 512}}\npasses:\n  - {}\nexport: {{format: compressed-tensors}}\n",
                model.display(),
                out.display(),
                calib.display(),
                pass
            ),
        )?;
        let run = run_child(&bin, &yaml, true)?;
        let r = run.report;
        let compress_s = r["timing"]["compress_seconds"].as_f64().unwrap_or(f64::NAN);
        let mut own = std::collections::BTreeMap::<String, f64>::new();
        for rec in r["layers"].as_array().into_iter().flatten() {
            let p = rec["pass"].as_str().unwrap_or("?").to_string();
            *own.entry(p).or_default() += rec["seconds"].as_f64().unwrap_or(0.0);
        }
        let theirs = peer_s.get(name).copied();
        rows.push(json!({
            "recipe": name,
            "compress_s": compress_s,
            "pass_s": own,
            "peer_oneshot_s": theirs,
            "ratio": theirs.map(|t| compress_s / t),
        }));
    }
    if own_work {
        std::fs::remove_dir_all(&work)?;
    }
    let out = json!({
        "model": model.display().to_string(),
        "calibration_tokens": tokens,
        "threads": rayon::current_num_threads(),
        "floor": floor_json,
        "rows": rows,
    });
    if as_json {
        println!("{out}");
        return Ok(());
    }
    println!(
        "{}: {tokens} calibration tokens (first 128 c4_calib documents ≤ 512), {} threads",
        model.display(),
        rayon::current_num_threads()
    );
    println!(
        "floor of statistics + propagation forwards + Hessians: {floor:.1} s (f32 GEMM {:.0} GFLOP/s)",
        floor_json["gemm_gflops"].as_f64().unwrap_or(f64::NAN)
    );
    println!("| recipe | ours compress s | pass's own s | llm-compressor oneshot s | ratio |");
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        let own: Vec<String> = r["pass_s"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k} {:.1}", v.as_f64().unwrap_or(0.0)))
            .collect();
        println!(
            "| {} | {:.1} | {} | {} | {} |",
            r["recipe"].as_str().unwrap_or("?"),
            r["compress_s"].as_f64().unwrap_or(f64::NAN),
            own.join(", "),
            r["peer_oneshot_s"]
                .as_f64()
                .map_or("—".into(), |v| format!("{v:.1}")),
            r["ratio"]
                .as_f64()
                .map_or("—".into(), |v| format!("{v:.2}×"))
        );
    }
    Ok(())
}
