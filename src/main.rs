//! `compress` command line: a thin layer over the library (see `compress::runner`).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use compress::runner::{self, RunOptions};
use std::path::PathBuf;
use std::process::ExitCode;

/// `println!` for results on stdout, except that a reader that went away (`compress … --json |
/// head`) ends the process quietly with status 0, as ripgrep and coreutils do, instead of the
/// panic `println!` raises on EPIPE. The run's work is done by then (outputs are written before
/// anything is printed).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        stdout_done(writeln!(out, $($t)*).and_then(|_| out.flush()));
    }};
}

/// `print!` (no newline added) with [`say!`]'s handling of a reader that went away.
macro_rules! put {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        stdout_done(write!(out, $($t)*).and_then(|_| out.flush()));
    }};
}

fn stdout_done(r: std::io::Result<()>) {
    if let Err(e) = r {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
    }
}

#[derive(Parser)]
#[command(
    name = "compress",
    version,
    about = "Offline LLM compression: GPTQ/RTN quantization, layer-wise streaming, exporters for vLLM / transformers, evaluation reports",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Pipeline YAML to run (same as `compress run PIPELINE`).
    pipeline: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
    /// No progress bars or log lines (errors still go to stderr).
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(clap::Args, Clone, Default)]
struct RunArgs {
    /// Override the pipeline's `model`.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Override the pipeline's `output`.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Replace an existing output folder.
    #[arg(long)]
    overwrite: bool,
    /// Continue an interrupted run from the last complete layer (refused if the pipeline,
    /// the model or the calibration data changed).
    #[arg(long)]
    resume: bool,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Override the pipeline's `device`: cpu, cuda:N or auto.
    #[arg(long)]
    device: Option<String>,
    /// Eval cache folder for the input model's scores (default: the pipeline's `eval.cache`,
    /// else $XDG_CACHE_HOME/compress/eval or ~/.cache/compress/eval).
    #[arg(long, value_name = "DIR", conflicts_with = "no_cache")]
    cache: Option<PathBuf>,
    /// Evaluate the input model again instead of reading its scores from the eval cache.
    #[arg(long)]
    no_cache: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a pipeline.
    Run {
        pipeline: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Perplexity of a checkpoint (dense or one we wrote) on text files.
    Eval {
        #[arg(long)]
        model: PathBuf,
        /// Text file, or .jsonl whose `text` fields are joined with "\n\n". Repeatable.
        #[arg(long, required_unless_present = "tasks")]
        data: Vec<PathBuf>,
        /// Zero-shot tasks, comma-separated: piqa,arc_easy,arc_challenge,hellaswag,boolq,lambada.
        #[arg(long, value_delimiter = ',')]
        tasks: Vec<String>,
        /// Folder with the task data.
        #[arg(long, default_value = "../shared/data/eval/tasks")]
        tasks_dir: PathBuf,
        /// Score only the first N items of each task.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        /// Windows per forward batch.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Ignore the activation quantizers a W8A8 checkpoint declares (float inputs, the
        /// stored weights): what a loader that decompresses only the weights computes.
        #[arg(long)]
        no_act_quant: bool,
        /// GGUF checkpoints: quantize each matmul's input as llama.cpp's CPU backend does for
        /// the stored weight type (Q8_0 / Q8_1 / Q8_K blocks, f16), to compare with
        /// `llama-perplexity` number for number.
        #[arg(long)]
        llama_cpp_activations: bool,
        /// f32 (default) or bf16: the linears with bf16 weights and inputs, f32 accumulation
        /// (the AVX512-BF16 kernel where the CPU has it).
        #[arg(long, default_value = "f32")]
        precision: String,
        /// Which tokens are scored: `windows` (default; every predicted token of each window,
        /// as our reports) or `llama-perplexity` (llama.cpp's: the first token of each window
        /// replaced by BOS when the tokenizer adds one, only the second half scored), to compare
        /// with `llama-perplexity -c SEQ_LEN` on the same windows.
        #[arg(long, default_value = "windows")]
        protocol: String,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Re-render report.md and report.html of an output folder from its report.json.
    Report { dir: PathBuf },
    /// Several runs' reports side by side (Markdown on stdout; `--html FILE` for a page).
    Compare {
        /// Output folders (or report.json files).
        #[arg(required = true, num_args = 1..)]
        runs: Vec<PathBuf>,
        #[arg(long)]
        html: Option<PathBuf>,
    },
    /// Describe a checkpoint: architecture, shapes, dtypes, sizes, quantization metadata.
    Inspect {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Logits of a checkpoint (dense or one we wrote, dequantized as eval reads it) on given
    /// token ids, as a safetensors file (`input_ids` I64 [b, t], `logits` F32 [b, t, vocab]):
    /// for comparing our reading of a checkpoint with another loader's.
    Logits {
        #[arg(long)]
        model: PathBuf,
        /// One sequence of comma-separated token ids; repeat for a batch (equal lengths).
        #[arg(long, required = true)]
        ids: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Check an output folder: every file listed in checksums.sha256 and matching it, nothing
    /// extra, and every tensor loading (quantized ones unpacked). Exit 0 when intact.
    Verify {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn run_cmd(pipeline: PathBuf, a: RunArgs) -> Result<()> {
    let opts = RunOptions {
        model: a.model,
        output: a.output,
        overwrite: a.overwrite,
        resume: a.resume,
        device: a.device,
        cache: a.cache,
        no_cache: a.no_cache,
    };
    let report = runner::run_pipeline(&pipeline, &opts)?;
    if a.json {
        say!("{}", serde_json::to_string(&report)?);
    } else if !compress::progress::quiet() {
        say!("{}", report.to_markdown());
    }
    Ok(())
}

fn real_main(cli: Cli) -> Result<()> {
    compress::progress::set_quiet(cli.quiet);
    match cli.cmd {
        Some(Cmd::Run { pipeline, run }) => run_cmd(pipeline, run),
        Some(Cmd::Eval {
            model,
            data,
            seq_len,
            batch,
            json,
            tasks,
            tasks_dir,
            limit,
            no_act_quant,
            llama_cpp_activations,
            precision,
            protocol,
        }) => {
            anyhow::ensure!(seq_len >= 2, "--seq-len must be at least 2");
            anyhow::ensure!(batch >= 1, "--batch must be at least 1");
            for t in &tasks {
                compress::eval::tasks::Task::from_name(t)?;
            }
            let ckpt = compress::model::Checkpoint::open(&model)?;
            let opts = compress::model::EvalOptions {
                act_quant: !no_act_quant,
                llama_cpp_activations,
                precision: compress::model::Precision::parse(&precision)?,
            };
            let protocol_name = protocol;
            let protocol = runner::protocol_named(&ckpt, &protocol_name)?;
            let res = if data.is_empty() {
                Default::default()
            } else {
                runner::eval_perplexity_protocol(
                    &ckpt,
                    &opts,
                    &data,
                    seq_len,
                    batch,
                    "eval",
                    protocol,
                    &mut |_, _, _| Ok(()),
                )?
            };
            let tres = if tasks.is_empty() {
                Default::default()
            } else {
                runner::eval_tasks(&ckpt, &opts, &tasks, &tasks_dir, limit, "eval")?
            };
            if json {
                let v = serde_json::json!({"model": model.display().to_string(), "seq_len": seq_len, "protocol": protocol_name, "results": res, "tasks": tres});
                say!("{}", serde_json::to_string(&v)?);
            } else {
                if !res.is_empty() {
                    say!(
                        "{:<24} {:>12} {:>10} {:>8}",
                        "dataset",
                        "perplexity",
                        "tokens",
                        "windows"
                    );
                    for (k, r) in &res {
                        say!(
                            "{:<24} {:>12.4} {:>10} {:>8}",
                            k,
                            r.perplexity,
                            r.tokens,
                            r.windows
                        );
                    }
                }
                if !tres.is_empty() {
                    say!(
                        "{:<16} {:<12} {:>10} {:>10} {:>6}",
                        "task",
                        "metric",
                        "value",
                        "stderr",
                        "n"
                    );
                    for (k, r) in &tres {
                        for (m, v) in &r.metrics {
                            let e = r
                                .stderr
                                .get(m)
                                .map(|e| format!("{e:.4}"))
                                .unwrap_or("—".into());
                            say!("{:<16} {:<12} {:>10.4} {:>10} {:>6}", k, m, v, e, r.n);
                        }
                    }
                }
            }
            Ok(())
        }
        Some(Cmd::Report { dir }) => {
            let r = compress::report::Report::from_file(&dir.join("report.json"))?;
            r.write(&dir)?;
            compress::runner::write_checksums(&dir)?;
            compress::info!("re-rendered {}/report.md and report.html", dir.display());
            Ok(())
        }
        Some(Cmd::Compare { runs, html }) => {
            let mut v = Vec::new();
            for r in &runs {
                let p = if r.is_dir() {
                    r.join("report.json")
                } else {
                    r.clone()
                };
                let rep = compress::report::Report::from_file(&p)?;
                let name = r
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_else(|| r.display().to_string());
                v.push((name, rep));
            }
            put!("{}", compress::report::html::render_compare_markdown(&v));
            if let Some(h) = html {
                std::fs::write(&h, compress::report::html::render_compare_html(&v))
                    .with_context(|| format!("cannot write {}", h.display()))?;
            }
            Ok(())
        }
        Some(Cmd::Verify { dir, json }) => {
            let v = compress::verify::verify(&dir)?;
            if json {
                say!("{}", serde_json::to_string(&v)?);
            } else {
                say!(
                    "{}: intact ({} files, {:.2} MiB, all checksums match; {} {} layers load{})",
                    dir.display(),
                    v.files,
                    v.bytes as f64 / (1024.0 * 1024.0),
                    v.layers,
                    v.architecture,
                    v.format.map(|f| format!(", {f}")).unwrap_or_default()
                );
            }
            Ok(())
        }
        Some(Cmd::Logits { model, ids, out }) => runner::write_logits(&model, &ids, &out),
        Some(Cmd::Inspect { dir, json }) => {
            let v = compress::inspect::inspect(&dir)?;
            if json {
                say!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                put!("{}", compress::inspect::to_text(&v));
            }
            Ok(())
        }
        None => match cli.pipeline {
            Some(p) => run_cmd(p, cli.run),
            None => anyhow::bail!("no pipeline given: run `compress PIPELINE.yaml` (see --help)"),
        },
    }
}

fn main() -> ExitCode {
    compress::util::tune_allocator();
    let cli = Cli::parse();
    // With --json a failed run also answers on stdout, for batch orchestration.
    let json = match &cli.cmd {
        None => cli.run.json,
        Some(Cmd::Run { run, .. }) => run.json,
        Some(Cmd::Eval { json, .. } | Cmd::Inspect { json, .. } | Cmd::Verify { json, .. }) => {
            *json
        }
        _ => false,
    };
    // SIGINT / SIGTERM / SIGHUP (a scheduler stopping the job): say what is kept and exit 130.
    // Checkpoints are written by rename, so stopping at any instant leaves a consistent state.
    let _ = ctrlc::set_handler(move || {
        let resume = compress::util::resumable_work();
        let msg = match &resume {
            Some(w) => format!(
                "interrupted: the work folder {} is kept: re-run with --resume",
                w.display()
            ),
            None => "interrupted".to_string(),
        };
        eprintln!("error: {msg}");
        if json {
            let v = serde_json::json!({"status": "interrupted", "error": msg, "exit_code": 130,
                "resume_from": resume.map(|w| w.display().to_string())});
            say!("{v}");
        }
        std::process::exit(130);
    });
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if json {
                let resume = e
                    .downcast_ref::<runner::KeptForResume>()
                    .map(|k| k.0.display().to_string());
                let v = serde_json::json!({"status": "error", "error": format!("{e:#}"), "exit_code": 2, "resume_from": resume});
                say!("{v}");
            }
            ExitCode::from(2)
        }
    }
}
