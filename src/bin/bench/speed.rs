//! `bench speed`: issue #21's figures in one run (eval tokens/s against transformers, the
//! pipeline with an empty and a warm eval cache, GPTQ against llm-compressor).

use super::helpers::{default_ref_model, run_child, ChildRun};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Best of three timings of `f` after one warm-up run, in seconds.
/// `compress eval` (in `precision`) and transformers float32 on `model` and `data`: wall
/// seconds, tokens and perplexity of each.
fn speed_eval(bin: &Path, model: &Path, data: &Path, precision: &str) -> Result<(f64, u64, f64)> {
    let t = Instant::now();
    let o = std::process::Command::new(bin)
        .args([
            "eval",
            "--json",
            "--quiet",
            "--precision",
            precision,
            "--model",
        ])
        .arg(model)
        .arg("--data")
        .arg(data)
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    let wall = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        o.status.success(),
        "compress eval on {}: {}",
        model.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout)?;
    let r = v["results"]
        .as_object()
        .and_then(|m| m.values().next())
        .context("compress eval printed no result")?;
    Ok((
        wall,
        r["tokens"].as_u64().unwrap_or(0),
        r["perplexity"].as_f64().unwrap_or(f64::NAN),
    ))
}

/// transformers float32 through `../shared/tools/ref_eval.py`: (its seconds, model load
/// included; perplexity), or why it could not run.
fn speed_reference(
    python: &str,
    model: &Path,
    data: &Path,
) -> std::result::Result<(f64, f64), String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/ref_eval.py");
    let o = std::process::Command::new(python)
        .arg(&script)
        .arg(model)
        .arg("--data")
        .arg(data)
        .args(["--seq-len", "512"])
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        return Err(err.lines().last().unwrap_or("failed").to_string());
    }
    let v: Value = serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())?;
    let ppl = v["results"]
        .as_object()
        .and_then(|m| m.values().next())
        .and_then(|r| r["ppl"].as_f64())
        .unwrap_or(f64::NAN);
    Ok((v["seconds"].as_f64().unwrap_or(f64::NAN), ppl))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn speed(
    models: Vec<PathBuf>,
    data: Option<PathBuf>,
    python: &str,
    pipeline: Option<PathBuf>,
    eval_only: bool,
    compress_bin: Option<PathBuf>,
    as_json: bool,
) -> Result<()> {
    let bin = match compress_bin {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("compress"),
    };
    let work = std::env::temp_dir().join(format!("compress-speed-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let data = match data {
        Some(d) => d,
        None => {
            let wiki = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/data/eval/wikitext2/wiki.test.raw");
            let bytes = std::fs::read(&wiki).with_context(|| format!("{}", wiki.display()))?;
            let d = work.join("w40k.txt");
            std::fs::write(&d, &bytes[..bytes.len().min(40_000)])?;
            d
        }
    };
    let models = if models.is_empty() {
        vec![default_ref_model()]
    } else {
        models
    };
    let mut eval_rows = Vec::new();
    for m in &models {
        let (f32_s, tokens, f32_ppl) = speed_eval(&bin, m, &data, "f32")?;
        let (bf16_s, _, bf16_ppl) = speed_eval(&bin, m, &data, "bf16")?;
        let reference = speed_reference(python, m, &data);
        let (tf_s, tf_ppl) = match &reference {
            Ok((s, p)) => (Some(*s), Some(*p)),
            Err(_) => (None, None),
        };
        eval_rows.push(json!({
            "model": m.display().to_string(),
            "tokens": tokens,
            "f32_s": f32_s, "f32_tokens_per_s": tokens as f64 / f32_s, "f32_ppl": f32_ppl,
            "bf16_s": bf16_s, "bf16_tokens_per_s": tokens as f64 / bf16_s, "bf16_ppl": bf16_ppl,
            "transformers_s": tf_s, "transformers_ppl": tf_ppl,
            "transformers_error": reference.err(),
            "f32_ratio": tf_s.map(|t| t / f32_s),
            "bf16_ratio": tf_s.map(|t| t / bf16_s),
        }));
    }
    let mut pipeline_row = Value::Null;
    let mut peer_row = Value::Null;
    if !eval_only {
        // the pipeline, redirected: output and eval cache in the work folder
        let src = pipeline.unwrap_or_else(|| PathBuf::from("pipelines/w4a16-gptq.yaml"));
        let text = std::fs::read_to_string(&src).with_context(|| format!("{}", src.display()))?;
        let mut y: serde_yaml::Value =
            serde_yaml::from_str(&text).with_context(|| format!("{}", src.display()))?;
        let map = y.as_mapping_mut().context("pipeline is not a mapping")?;
        map.insert(
            "output".into(),
            work.join("out").display().to_string().into(),
        );
        if let Some(e) = map.get_mut("eval").and_then(|e| e.as_mapping_mut()) {
            e.insert(
                "cache".into(),
                work.join("cache").display().to_string().into(),
            );
        }
        let yaml = work.join("pipeline.yaml");
        std::fs::write(&yaml, serde_yaml::to_string(&y)?)?;
        let first = run_child(&bin, &yaml, true)?;
        let second = run_child(&bin, &yaml, true)?;
        let row = |r: &ChildRun| {
            json!({
                "wall_s": r.wall,
                "compress_s": r.report["timing"]["compress_seconds"],
                "eval_before_s": r.report["timing"]["eval_before_seconds"],
                "eval_after_s": r.report["timing"]["eval_after_seconds"],
                "baseline": r.report["baseline"]["source"],
            })
        };
        pipeline_row = json!({
            "pipeline": src.display().to_string(),
            "first": row(&first),
            "cached": row(&second),
            "ratio": first.wall / second.wall,
        });
        let o = std::process::Command::new(std::env::current_exe()?)
            .args([
                "peer-speed",
                "--json",
                "--recipes",
                "gptq-w4g128",
                "--compress",
            ])
            .arg(&bin)
            .output()?;
        anyhow::ensure!(
            o.status.success(),
            "bench peer-speed failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: Value = serde_json::from_slice(&o.stdout)?;
        peer_row = json!({
            "gptq_floor_s": v["floor"]["gptq_floor_s"],
            "row": v["rows"][0],
        });
    }
    std::fs::remove_dir_all(&work)?;
    let out = json!({
        "threads": rayon::current_num_threads(),
        "data": data.display().to_string(),
        "eval": eval_rows,
        "pipeline": pipeline_row,
        "gptq_vs_llm_compressor": peer_row,
    });
    if as_json {
        println!("{out}");
        return Ok(());
    }
    let f = |v: &Value, d: usize| v.as_f64().map_or("—".into(), |x| format!("{x:.d$}"));
    println!(
        "{} threads; evaluation text {}",
        rayon::current_num_threads(),
        data.display()
    );
    println!("| model | tokens | ours f32 s | ours bf16 s | transformers f32 s | f32 vs transformers | bf16 vs transformers | perplexity f32 / bf16 / transformers |");
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for r in &eval_rows {
        println!(
            "| {} | {} | {} | {} | {} | {}× | {}× | {} / {} / {} |",
            r["model"].as_str().unwrap_or("?"),
            r["tokens"],
            f(&r["f32_s"], 2),
            f(&r["bf16_s"], 2),
            f(&r["transformers_s"], 1),
            f(&r["f32_ratio"], 2),
            f(&r["bf16_ratio"], 2),
            f(&r["f32_ppl"], 4),
            f(&r["bf16_ppl"], 4),
            f(&r["transformers_ppl"], 4),
        );
        if let Some(e) = r["transformers_error"].as_str() {
            println!("  (transformers not run: {e})");
        }
    }
    if !eval_only {
        let p = &pipeline_row;
        println!(
            "pipeline {}: first run {} s (compress {} s, eval before {} s, after {} s, baseline {}), again {} s (eval before {} s, baseline {}): {}× faster",
            p["pipeline"].as_str().unwrap_or("?"),
            f(&p["first"]["wall_s"], 1),
            f(&p["first"]["compress_s"], 1),
            f(&p["first"]["eval_before_s"], 1),
            f(&p["first"]["eval_after_s"], 1),
            p["first"]["baseline"].as_str().unwrap_or("—"),
            f(&p["cached"]["wall_s"], 1),
            f(&p["cached"]["eval_before_s"], 1),
            p["cached"]["baseline"].as_str().unwrap_or("—"),
            f(&p["ratio"], 2),
        );
        let g = &peer_row["row"];
        println!(
            "GPTQ W4 g128 (peer calibration, no eval): ours {} s, llm-compressor oneshot {} s: {}× its time (f32 floor {} s)",
            f(&g["compress_s"], 1),
            f(&g["peer_oneshot_s"], 1),
            f(&g["ratio"], 2),
            f(&peer_row["gptq_floor_s"], 1),
        );
    }
    Ok(())
}
