//! `bench eval-speed`: tokens per second of perplexity evaluation on the first N windows of
//! a text file.

use super::helpers::mib;
use anyhow::Result;
use compress::model::Checkpoint;
use serde_json::json;
use std::path::Path;
use std::time::Instant;

pub(super) fn eval_speed(
    model: &Path,
    data: &Path,
    seq_len: usize,
    windows: usize,
    batch: usize,
    as_json: bool,
    precision: &str,
) -> Result<()> {
    let precision = compress::model::Precision::parse(precision)?;
    anyhow::ensure!(seq_len >= 2, "--seq-len must be at least 2");
    anyhow::ensure!(windows >= 1, "--windows must be at least 1");
    anyhow::ensure!(batch >= 1, "--batch must be at least 1");
    let t = Instant::now();
    let ckpt = Checkpoint::open(model)?;
    let m = compress::model::llama::Model::load(&ckpt, seq_len)?.with_precision(precision);
    let load_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let tok = compress::calib::load_tokenizer(&ckpt.tokenizer_path())?;
    let text = compress::calib::read_text(data, "text")?;
    let tokens = compress::calib::tokenize(&tok, &text)?;
    let tok_s = t.elapsed().as_secs_f64();
    let avail = tokens.len() / seq_len;
    let n = windows.min(avail);
    anyhow::ensure!(
        n > 0,
        "{}: {} tokens, fewer than one window of {seq_len}",
        data.display(),
        tokens.len()
    );
    if n < windows {
        eprintln!(
            "[bench] only {n} windows of {seq_len} tokens in {}",
            data.display()
        );
    }
    let t = Instant::now();
    let r =
        compress::eval::ppl::perplexity(&m, &tokens[..n * seq_len], seq_len, batch, &mut |_| {})?;
    let eval_s = t.elapsed().as_secs_f64();
    let toks = n * seq_len;
    let tps = toks as f64 / eval_s.max(1e-9);
    let threads = rayon::current_num_threads();
    let peak = compress::util::peak_rss_bytes().unwrap_or(0);
    let params = ckpt.config.num_params();
    // The embedding is a lookup, not a matmul: FLOPs ≈ 2 × (other parameters) per token.
    let matmul_params = params - ckpt.config.vocab_size * ckpt.config.hidden_size;
    let gflops = 2.0 * matmul_params as f64 * tps / 1e9;
    let v = json!({
        "model": model.display().to_string(), "data": data.display().to_string(),
        "seq_len": seq_len, "windows": n, "batch": batch, "tokens": toks,
        "precision": precision.name(), "bf16_kernel": compress::model::bf16::native(),
        "parameters": params, "threads": threads,
        "load_seconds": load_s, "tokenize_seconds": tok_s, "eval_seconds": eval_s,
        "tokens_per_second": tps, "ms_per_window": 1e3 * eval_s / n as f64,
        "perplexity_of_these_windows": r.perplexity, "peak_rss_bytes": peak,
        "gflops_per_second_approx": gflops,
    });
    if as_json {
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    println!("eval-speed {} on {}", model.display(), data.display());
    println!("| figure | value |\n|---|---:|");
    println!("| parameters | {params} |");
    println!("| windows × seq_len (batch) | {n} × {seq_len} ({batch}) |");
    println!("| threads (rayon) | {threads} |");
    println!(
        "| precision | {}{} |",
        precision.name(),
        match (precision, compress::model::bf16::native()) {
            (compress::model::Precision::F32, _) => "",
            (_, true) => " (AVX512-BF16 kernel)",
            (_, false) => " (no AVX512-BF16: bf16-rounded values, f32 GEMM)",
        }
    );
    println!("| model load | {load_s:.2} s |");
    println!(
        "| tokenize whole file | {tok_s:.2} s ({} tokens) |",
        tokens.len()
    );
    println!("| eval time | {eval_s:.2} s |");
    println!("| tokens / s | {tps:.0} |");
    println!("| ms / window | {:.1} |", 1e3 * eval_s / n as f64);
    println!("| ≈ GFLOP/s (2 × non-embedding params × tokens/s; attention scores excluded) | {gflops:.1} |");
    println!("| perplexity of these {n} windows | {:.4} |", r.perplexity);
    println!("| peak RSS | {} |", mib(peak));
    Ok(())
}
