//! `bench`: benchmarks that print figures and ratios (speed and memory targets live here, not in
//! timed tests; results go to BENCHMARKS.md with the command that produced them).
//!
//! ```text
//! bench gen-checkpoint --preset 1b --out /tmp/bench-1b         # random-weight Llama checkpoint
//! bench identity --model /tmp/bench-1b --out /tmp/bench-1b-id  # peak RSS of `passes: []`
//! bench eval-speed --model M --data FILE --windows 64          # perplexity tokens/s
//! bench floor --model M                                        # FLOP floor of a pass here
//! bench peer-speed                                             # pass times vs llm-compressor
//! ```
//!
//! Memory of `identity` is measured on a child process (the `compress` binary beside this one),
//! so nothing the bench itself allocated is counted: after the child is reaped,
//! `getrusage(RUSAGE_CHILDREN).ru_maxrss` is the kernel's high-water mark of its resident set
//! over its whole life, including the last milliseconds (reading back, identity check, report).
//! A poller reading `/proc/<pid>/status` every 20 ms gives a cross-check (`VmHWM` at the last
//! sample) and *when* the peak happened. Caveat of `RUSAGE_CHILDREN` on Linux: at `exec` the
//! kernel folds the spawning process's high-water mark into the child's, so the figure is
//! max(child, bench at spawn); the bench keeps itself small before spawning and prints its own
//! high-water mark as the floor. `--stages` runs the same work in-process stage by stage,
//! resetting the high-water mark between stages (`echo 5 > /proc/self/clear_refs`), to show
//! which stage the peak belongs to.

mod eval_speed;
mod floor;
mod gemm;
mod gen_checkpoint;
mod helpers;
mod identity;
mod peer_speed;
mod speed;

#[cfg(not(feature = "cuda"))]
use anyhow::bail;
use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use eval_speed::eval_speed;
use floor::floor;
use gemm::gemm_rates;
use gen_checkpoint::{gen_checkpoint, DtypeArg, Shape};
use helpers::default_ref_model;
use identity::identity;
use peer_speed::peer_speed;
use speed::speed;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "bench",
    about = "Benchmarks of the compress engine: checkpoint generator, identity-pipeline memory, eval throughput"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Preset {
    /// hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 kv heads, vocab 32000
    /// (TinyLlama-1.1B shape, ≈1.1 B parameters, ≈2.2 GB in bf16).
    #[value(name = "1b")]
    OneB,
}

#[derive(Subcommand)]
enum Cmd {
    /// GPTQ's device stages on random Llama-shaped layers (needs `--features cuda` and a GPU):
    /// Hessians and forward products over the calibration tokens, factor + sweep per linear,
    /// download + pack. Defaults: Llama-3-8B's shapes, 512 × 2048 tokens, W4 g128.
    GpuGptq {
        #[arg(long, default_value_t = 32)]
        layers: usize,
        #[arg(long, default_value_t = 4096)]
        hidden: usize,
        #[arg(long, default_value_t = 14336)]
        intermediate: usize,
        #[arg(long, default_value_t = 32)]
        heads: usize,
        #[arg(long, default_value_t = 8)]
        kv_heads: usize,
        /// Calibration tokens (512 samples × 2048).
        #[arg(long, default_value_t = 512 * 2048)]
        tokens: usize,
        /// Tokens per device batch.
        #[arg(long, default_value_t = 8192)]
        chunk: usize,
        #[arg(long, default_value_t = 128)]
        group: usize,
        #[arg(long, default_value_t = 4)]
        bits: u32,
        /// Print the figures as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Write a random-weight Llama-shaped HF checkpoint (weights ~ N(0, 0.02), norms = 1).
    GenCheckpoint {
        #[arg(long)]
        out: PathBuf,
        /// Shape preset; explicit shape flags override its values.
        #[arg(long, value_enum)]
        preset: Option<Preset>,
        #[arg(long)]
        hidden: Option<usize>,
        #[arg(long)]
        intermediate: Option<usize>,
        #[arg(long)]
        layers: Option<usize>,
        #[arg(long)]
        heads: Option<usize>,
        #[arg(long)]
        kv_heads: Option<usize>,
        #[arg(long)]
        vocab: Option<usize>,
        #[arg(long, value_enum, default_value = "bf16")]
        dtype: DtypeArg,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Largest safetensors shard in bytes (default 4 GiB: the 1b preset is one file).
        #[arg(long, default_value_t = 4 << 30)]
        shard_bytes: usize,
        /// Model folder whose config.json keys, tokenizer.json and tokenizer_config.json are
        /// copied (default: ../shared/models/ref-llama-9m).
        #[arg(long)]
        reference: Option<PathBuf>,
        /// Replace an existing output folder.
        #[arg(long)]
        overwrite: bool,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Run the identity pipeline (`passes: []`, dense export) and measure wall time and peak RSS.
    Identity {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing output folder.
        #[arg(long)]
        overwrite: bool,
        /// The `compress` binary to run (default: the one beside this binary).
        #[arg(long)]
        compress: Option<PathBuf>,
        /// Run the pipeline in this process (`runner::run_pipeline`; peak = own VmHWM).
        #[arg(long, conflicts_with = "stages")]
        in_process: bool,
        /// In-process, stage by stage, resetting the high-water mark between stages; the
        /// last stage is the identity check done with per-tensor page release.
        #[arg(long)]
        stages: bool,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// The arithmetic floor of a layer-wise pass on this machine: the FLOPs of the calibration
    /// forwards and Hessian products GPTQ/SparseGPT and AWQ need on a model, over the f32 GEMM
    /// rate measured here on that model's layer shapes, beside a peer's measured seconds.
    Floor {
        #[arg(long)]
        model: PathBuf,
        /// Calibration tokens (default 128 × 512).
        #[arg(long, default_value_t = 128 * 512)]
        tokens: usize,
        /// Window length (attention context).
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        /// Tokens AWQ's candidates run on (`search_samples` × seq_len; default 32 × 512).
        #[arg(long, default_value_t = 32 * 512)]
        awq_search_tokens: usize,
        /// AWQ's α grid.
        #[arg(long, default_value_t = 20)]
        awq_grid: usize,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Pass times against llm-compressor's on the reference model, in one run: each recipe of
    /// the peer table (`../shared/golden/peer/README.md`) run by `compress` with the peer's
    /// calibration (first 128 c4_calib documents ≤ 512 tokens) and no evaluation; prints our
    /// compress seconds and the pass's own seconds beside the peer's `oneshot()` seconds, the
    /// ratio, and the FLOP floor of the calibration forwards at this machine's GEMM rate.
    PeerSpeed {
        /// Model (default ../shared/models/ref-llama-9m, the peer table's).
        #[arg(long)]
        model: Option<PathBuf>,
        /// The peer table (default ../shared/golden/peer/README.md).
        #[arg(long)]
        peer: Option<PathBuf>,
        /// Recipes to run (default: all of gptq-w4g128, gptq-w3g128, wanda-50, sparsegpt-50,
        /// sparsegpt-24, awq-w4g128, magnitude-50).
        #[arg(long, value_delimiter = ',')]
        recipes: Vec<String>,
        /// Work folder for the pipelines and outputs (default: a temp folder).
        #[arg(long)]
        work: Option<PathBuf>,
        /// The `compress` binary (default: the one beside this binary).
        #[arg(long)]
        compress: Option<PathBuf>,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Issue #21's figures in one run: per model, `compress eval` tokens/s in f32 and bf16
    /// against transformers float32 (`../shared/tools/ref_eval.py`, where `--python` has torch
    /// and transformers); the W4A16 GPTQ pipeline's wall time with an empty eval cache and
    /// again with the baseline cached; the GPTQ pass against llm-compressor's `oneshot()`
    /// (`peer-speed --recipes gptq-w4g128`). Run from the repository root.
    Speed {
        /// Models to evaluate (default ../shared/models/ref-llama-9m).
        #[arg(long = "model")]
        models: Vec<PathBuf>,
        /// Evaluation text (default: the first 40,000 bytes of wikitext2's test file).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Python with torch and transformers for the reference evaluation.
        #[arg(long, default_value = "python3")]
        python: String,
        /// The pipeline timed twice (default pipelines/w4a16-gptq.yaml; its output and eval
        /// cache are redirected into the work folder).
        #[arg(long)]
        pipeline: Option<PathBuf>,
        /// Leave out the pipeline and peer rows (evaluation only).
        #[arg(long)]
        eval_only: bool,
        /// The `compress` binary (default: the one beside this binary).
        #[arg(long)]
        compress: Option<PathBuf>,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// GFLOP/s of y = x·Wᵀ in f32 (faer) and in bf16 (`eval.precision: bf16`), best of three,
    /// on each `n×k×out` shape given (default: SmolLM2-135M's and a 1B model's eval shapes).
    Gemm {
        /// Shapes as `n,k,out`.
        #[arg(long = "shape")]
        shapes: Vec<String>,
    },
    /// Tokens per second of perplexity evaluation on the first N windows of a text file.
    EvalSpeed {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        /// Windows to evaluate (fewer if the text is shorter).
        #[arg(long, default_value_t = 64)]
        windows: usize,
        /// Windows per forward batch (as `compress eval --batch`).
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// f32 or bf16 (linears in bf16 with f32 accumulation).
        #[arg(long, default_value = "f32")]
        precision: String,
    },
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::GenCheckpoint {
            out,
            preset,
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            vocab,
            dtype,
            seed,
            shard_bytes,
            reference,
            overwrite,
            json,
        } => {
            let p = preset.map(|p| match p {
                Preset::OneB => [2048, 5632, 22, 32, 4, 32000],
            });
            let pick = |v: Option<usize>, i: usize, flag: &str| -> Result<usize> {
                v.or(p.map(|p| p[i]))
                    .with_context(|| format!("--{flag} is required without --preset"))
            };
            let shape = Shape {
                hidden: pick(hidden, 0, "hidden")?,
                intermediate: pick(intermediate, 1, "intermediate")?,
                layers: pick(layers, 2, "layers")?,
                heads: pick(heads, 3, "heads")?,
                kv_heads: pick(kv_heads, 4, "kv-heads")?,
                vocab: pick(vocab, 5, "vocab")?,
            };
            let reference = reference.unwrap_or_else(default_ref_model);
            gen_checkpoint(
                &out,
                shape,
                dtype,
                seed,
                shard_bytes,
                &reference,
                overwrite,
                json,
            )
        }
        Cmd::Identity {
            model,
            out,
            overwrite,
            compress,
            in_process,
            stages,
            json,
        } => identity(&model, &out, overwrite, compress, in_process, stages, json),
        Cmd::Floor {
            model,
            tokens,
            seq_len,
            awq_search_tokens,
            awq_grid,
            json,
        } => floor(&model, tokens, seq_len, awq_search_tokens, awq_grid, json),
        Cmd::PeerSpeed {
            model,
            peer,
            recipes,
            work,
            compress,
            json,
        } => peer_speed(model, peer, recipes, work, compress, json),
        Cmd::Gemm { shapes } => gemm_rates(&shapes),
        Cmd::Speed {
            models,
            data,
            python,
            pipeline,
            eval_only,
            compress,
            json,
        } => speed(models, data, &python, pipeline, eval_only, compress, json),
        Cmd::EvalSpeed {
            model,
            data,
            seq_len,
            windows,
            batch,
            json,
            precision,
        } => eval_speed(&model, &data, seq_len, windows, batch, json, &precision),
        Cmd::GpuGptq {
            layers,
            hidden,
            intermediate,
            heads,
            kv_heads,
            tokens,
            chunk,
            group,
            bits,
            json,
        } => {
            #[cfg(feature = "cuda")]
            {
                let shape = compress::backend::cuda_bench::Shape {
                    layers,
                    hidden,
                    intermediate,
                    heads,
                    kv_heads,
                    tokens,
                    chunk,
                    group,
                    bits,
                };
                let v = compress::backend::cuda_bench::gptq_layers(&shape, false)?;
                if json {
                    println!("{v}");
                }
                Ok(())
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = (
                    layers,
                    hidden,
                    intermediate,
                    heads,
                    kv_heads,
                    tokens,
                    chunk,
                    group,
                    bits,
                    json,
                );
                bail!("gpu-gptq needs a build with `--features cuda`")
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    compress::util::tune_allocator();
    compress::progress::set_quiet(false);
    match real_main(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
