//! `bench identity`: wall time and peak RSS of the identity pipeline (`passes: []`, dense
//! export), in a child `compress` process, in-process, or in-process stage by stage.

use super::helpers::{mib, own_rss, reset_peak_rss, run_child};
use anyhow::{bail, Context, Result};
use compress::model::Checkpoint;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn yaml_str(p: &Path) -> Result<String> {
    // A JSON string is a valid YAML double-quoted scalar.
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    };
    Ok(serde_json::to_string(&abs.display().to_string())?)
}

fn write_identity_yaml(model: &Path, out: &Path) -> Result<PathBuf> {
    let path = std::env::temp_dir().join(format!(
        "bench-identity-{}-{}.yaml",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let text = format!(
        "# written by `bench identity`\nmodel: {}\noutput: {}\npasses: []\nexport:\n  format: dense\n",
        yaml_str(model)?,
        yaml_str(out)?
    );
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Stage-by-stage in-process measurement. Each stage starts with the high-water mark reset to
/// the current RSS.
fn identity_stages(model: &Path, out: &Path, size: u64) -> Result<Vec<Value>> {
    use compress::export::{Exporter, Format};
    let mut rows = Vec::new();
    let mut stage = |name: &str, f: &mut dyn FnMut() -> Result<String>| -> Result<()> {
        let reset = reset_peak_rss();
        let before = own_rss().unwrap_or(0);
        let t = Instant::now();
        let note = f()?;
        let secs = t.elapsed().as_secs_f64();
        let peak = compress::util::peak_rss_bytes().unwrap_or(0);
        let after = own_rss().unwrap_or(0);
        rows.push(json!({
            "stage": name, "seconds": secs, "rss_before_bytes": before,
            "peak_rss_bytes": peak, "rss_after_bytes": after,
            "peak_over_size": peak as f64 / size.max(1) as f64,
            "hwm_reset": reset, "note": note,
        }));
        Ok(())
    };
    let work = compress::util::work_dir_for(out);
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    {
        let mut ckpt = None;
        stage("open + validate input", &mut || {
            let c = Checkpoint::open(model)?;
            c.validate_dense()?;
            ckpt = Some(c);
            Ok(String::new())
        })?;
        let c = ckpt.as_ref().context("no checkpoint")?;
        stage("stream layers + dense export", &mut || {
            let mut ex = Exporter::begin(Format::Dense, &work, c, 4 << 30)?;
            compress::engine::run(c, &[], &[], &Default::default(), &mut ex, None)?;
            let (files, spills) = ex.finish(c)?;
            compress::export::writer::remove_spills(&spills)?;
            Ok(files.join(", "))
        })?;
    }
    stage("identity check as runner does (no release)", &mut || {
        let a = Checkpoint::open(model)?;
        let b = Checkpoint::open(&work)?;
        let same = compress::runner::tensors_identical(&a, &b)?;
        Ok(format!("identical: {same}"))
    })?;
    stage("identity check, releasing each tensor", &mut || {
        let a = Checkpoint::open(model)?;
        let b = Checkpoint::open(&work)?;
        let na: Vec<&String> = a.names().collect();
        let nb: Vec<&String> = b.names().collect();
        let mut same = na == nb;
        if same {
            for n in na {
                let (ia, ba) = a.raw(n)?;
                let (ib, bb) = b.raw(n)?;
                let eq = ia.dtype == ib.dtype && ia.shape == ib.shape && ba == bb;
                a.release(n);
                b.release(n);
                if !eq {
                    same = false;
                    break;
                }
            }
        }
        Ok(format!("identical: {same}"))
    })?;
    if out.exists() {
        std::fs::remove_dir_all(out)?;
    }
    compress::util::publish(&work, out)?;
    Ok(rows)
}

pub(super) fn identity(
    model: &Path,
    out: &Path,
    overwrite: bool,
    compress_bin: Option<PathBuf>,
    in_process: bool,
    stages: bool,
    as_json: bool,
) -> Result<()> {
    // Size from file metadata only: the bench maps nothing before the child runs.
    let size = Checkpoint::open(model)?.safetensors_bytes();
    if out.exists() && !overwrite {
        bail!(
            "output {} already exists (pass --overwrite to replace it)",
            out.display()
        );
    }
    let limit = 0.25;
    if stages {
        let rows = identity_stages(model, out, size)?;
        if as_json {
            println!(
                "{}",
                serde_json::to_string(
                    &json!({"model": model.display().to_string(), "size_bytes": size, "stages": rows})
                )?
            );
        } else {
            println!(
                "identity stages (in-process, high-water mark reset per stage): {} ({} safetensors)",
                model.display(),
                mib(size)
            );
            println!(
                "| stage | seconds | RSS before | peak RSS | RSS after | peak / size | note |"
            );
            println!("|---|---:|---:|---:|---:|---:|---|");
            for r in &rows {
                let b = |k: &str| r[k].as_u64().unwrap_or(0);
                println!(
                    "| {} | {:.2} | {} | {} | {} | {:.1}% | {} |",
                    r["stage"].as_str().unwrap_or(""),
                    r["seconds"].as_f64().unwrap_or(0.0),
                    mib(b("rss_before_bytes")),
                    mib(b("peak_rss_bytes")),
                    mib(b("rss_after_bytes")),
                    100.0 * r["peak_over_size"].as_f64().unwrap_or(0.0),
                    r["note"].as_str().unwrap_or("")
                );
            }
            if rows.iter().any(|r| r["hwm_reset"] == json!(false)) {
                println!("(warning: /proc/self/clear_refs not writable: peaks are cumulative)");
            }
        }
        return Ok(());
    }

    let yaml = write_identity_yaml(model, out)?;
    let result = if in_process {
        let t0 = Instant::now();
        let r = compress::runner::run_pipeline(
            &yaml,
            &compress::runner::RunOptions {
                model: None,
                output: None,
                overwrite,
                resume: false,
                device: None,
                ..Default::default()
            },
        );
        let wall = t0.elapsed().as_secs_f64();
        r.and_then(|rep| {
            let v = serde_json::to_value(&rep)?;
            Ok((wall, v, compress::util::peak_rss_bytes(), None))
        })
    } else {
        let bin = match compress_bin {
            Some(b) => b,
            None => std::env::current_exe()?.with_file_name(if cfg!(windows) {
                "compress.exe"
            } else {
                "compress"
            }),
        };
        run_child(&bin, &yaml, overwrite)
            .map(|c| (c.wall, c.report.clone(), c.rusage_maxrss, Some(c)))
    };
    let _ = std::fs::remove_file(&yaml);
    let (wall, report, peak, child) = result?;
    let peak = peak.unwrap_or(0);
    let identical = report["output"]["identical_to_input"].as_bool();
    let out_size = report["output"]["size_bytes"].as_u64().unwrap_or(0);
    let report_peak = report["peak_rss_bytes"].as_u64();
    let ratio = peak as f64 / size.max(1) as f64;
    let mut v = json!({
        "model": model.display().to_string(),
        "output": out.display().to_string(),
        "mode": if in_process { "in-process" } else { "child" },
        "parameters": report["model"]["parameters"],
        "size_bytes": size,
        "output_size_bytes": out_size,
        "wall_seconds": wall,
        "report_total_seconds": report["timing"]["total_seconds"],
        "report_compress_seconds": report["timing"]["compress_seconds"],
        "peak_rss_bytes": peak,
        "peak_rss_over_size": ratio,
        "under_25_percent": ratio < limit,
        "report_peak_rss_bytes": report_peak,
        "identical_to_input": identical,
    });
    if let Some(c) = &child {
        v["child_user_seconds"] = json!(c.user_s);
        v["child_sys_seconds"] = json!(c.sys_s);
        v["polled_vmhwm_bytes"] = json!(c.polled_hwm);
        v["polled_peak_vmrss_bytes"] = json!(c.polled_peak_rss);
        v["polled_peak_at_seconds"] = json!(c.polled_peak_at);
        v["polled_samples"] = json!(c.samples);
        v["bench_rss_floor_bytes"] = json!(c.bench_floor);
    }
    if as_json {
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    println!(
        "identity pipeline ({}): {} → {}",
        if in_process {
            "in-process"
        } else {
            "child process"
        },
        model.display(),
        out.display()
    );
    println!("| figure | value |\n|---|---:|");
    if let Some(p) = report["model"]["parameters"].as_u64() {
        println!("| parameters | {p} ({:.3} B) |", p as f64 / 1e9);
    }
    println!("| checkpoint size on disk (safetensors) | {} |", mib(size));
    println!("| output size on disk (safetensors) | {} |", mib(out_size));
    println!("| wall time | {wall:.2} s |");
    if let Some(t) = report["timing"]["compress_seconds"].as_f64() {
        println!("| of which stream + export (report) | {t:.2} s |");
    }
    println!(
        "| throughput (size / wall) | {:.0} MiB/s |",
        size as f64 / 1048576.0 / wall.max(1e-9)
    );
    let src = if in_process {
        "own VmHWM"
    } else {
        "getrusage(RUSAGE_CHILDREN).ru_maxrss"
    };
    println!("| peak RSS ({src}) | {} |", mib(peak));
    println!(
        "| peak RSS / size on disk | {:.1}% ({} 25%) |",
        100.0 * ratio,
        if ratio < limit { "<" } else { "≥" }
    );
    if let Some(c) = &child {
        if let (Some(h), true) = (c.polled_hwm, c.samples > 0) {
            println!(
                "| child VmHWM at last 20 ms poll ({} samples) | {} |",
                c.samples,
                mib(h)
            );
        }
        if c.samples > 0 {
            println!(
                "| child VmRSS max over polls | {} at {:.2} s of {wall:.2} s |",
                mib(c.polled_peak_rss),
                c.polled_peak_at
            );
        }
        println!(
            "| child CPU user / sys | {:.2} s / {:.2} s |",
            c.user_s, c.sys_s
        );
        if let Some(f) = c.bench_floor {
            println!("| bench's own peak RSS at spawn (floor) | {} |", mib(f));
        }
    }
    if let Some(r) = report_peak {
        println!(
            "| report.peak_rss_bytes (before report written) | {} |",
            mib(r)
        );
    }
    println!(
        "| report identical_to_input | {} |",
        identical.map(|b| b.to_string()).unwrap_or("absent".into())
    );
    Ok(())
}
