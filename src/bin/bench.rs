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

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use compress::export::writer::SafetensorsWriter;
use compress::model::{Checkpoint, DType, ModelConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DtypeArg {
    Bf16,
    F16,
    F32,
}

impl DtypeArg {
    fn dtype(self) -> DType {
        match self {
            DtypeArg::Bf16 => DType::BF16,
            DtypeArg::F16 => DType::F16,
            DtypeArg::F32 => DType::F32,
        }
    }
    fn hf_name(self) -> &'static str {
        match self {
            DtypeArg::Bf16 => "bfloat16",
            DtypeArg::F16 => "float16",
            DtypeArg::F32 => "float32",
        }
    }
}

fn default_ref_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/models/ref-llama-9m")
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

// ---------------------------------------------------------------------------------------------
// Small helpers

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

fn proc_status_kb(path: &str, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn own_rss() -> Option<u64> {
    proc_status_kb("/proc/self/status", "VmRSS:")
}

/// Reset this process's RSS high-water mark to its current RSS (Linux ≥ 4.0).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[cfg(target_os = "linux")]
mod rusage {
    use std::os::raw::{c_int, c_long};

    /// `struct rusage` of Linux: two `struct timeval` then fourteen `long`s.
    #[repr(C)]
    struct RUsage {
        utime: [c_long; 2],
        stime: [c_long; 2],
        maxrss: c_long,
        rest: [c_long; 13],
    }

    extern "C" {
        fn getrusage(who: c_int, usage: *mut RUsage) -> c_int;
    }

    const RUSAGE_CHILDREN: c_int = -1;

    /// (max RSS of any reaped child in bytes, children's user seconds, system seconds).
    pub fn children() -> Option<(u64, f64, f64)> {
        let mut u = RUsage {
            utime: [0; 2],
            stime: [0; 2],
            maxrss: 0,
            rest: [0; 13],
        };
        // SAFETY: `u` has the layout of Linux's `struct rusage` and outlives the call.
        let rc = unsafe { getrusage(RUSAGE_CHILDREN, &mut u) };
        if rc != 0 {
            return None;
        }
        let secs = |t: [c_long; 2]| t[0] as f64 + t[1] as f64 * 1e-6;
        Some((u.maxrss as u64 * 1024, secs(u.utime), secs(u.stime)))
    }
}

#[cfg(not(target_os = "linux"))]
mod rusage {
    pub fn children() -> Option<(u64, f64, f64)> {
        None
    }
}

/// splitmix64: independent seeds for (seed, tensor, chunk), so output does not depend on the
/// number of threads.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn put(dtype: DType, buf: &mut [u8], i: usize, x: f32) {
    match dtype {
        DType::BF16 => {
            buf[2 * i..2 * i + 2].copy_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes())
        }
        DType::F16 => {
            buf[2 * i..2 * i + 2].copy_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes())
        }
        _ => buf[4 * i..4 * i + 4].copy_from_slice(&x.to_le_bytes()),
    }
}

/// Fill `out` (numel × dtype bytes) with N(0, std²) samples (Box–Muller), in parallel chunks.
fn fill_normal(out: &mut [u8], dtype: DType, std: f32, seed: u64, tensor: u64) {
    const CHUNK: usize = 1 << 16; // elements
    let es = dtype.size();
    out.par_chunks_mut(CHUNK * es)
        .enumerate()
        .for_each(|(ci, buf)| {
            let mut rng = ChaCha8Rng::seed_from_u64(mix(mix(mix(seed) ^ tensor) ^ ci as u64));
            let n = buf.len() / es;
            let mut i = 0;
            while i < n {
                let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
                let u2: f64 = rng.gen::<f64>();
                let r = (-2.0 * u1.ln()).sqrt();
                let t = std::f64::consts::TAU * u2;
                put(dtype, buf, i, (r * t.cos()) as f32 * std);
                if i + 1 < n {
                    put(dtype, buf, i + 1, (r * t.sin()) as f32 * std);
                }
                i += 2;
            }
        });
}

fn fill_const(out: &mut [u8], dtype: DType, x: f32) {
    let n = out.len() / dtype.size();
    for i in 0..n {
        put(dtype, out, i, x);
    }
}

// ---------------------------------------------------------------------------------------------
// gen-checkpoint

struct Shape {
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
}

#[allow(clippy::too_many_arguments)]
fn gen_checkpoint(
    out: &Path,
    shape: Shape,
    dtype: DtypeArg,
    seed: u64,
    shard_bytes: usize,
    reference: &Path,
    overwrite: bool,
    as_json: bool,
) -> Result<()> {
    let Shape {
        hidden,
        intermediate,
        layers,
        heads,
        kv_heads,
        vocab,
    } = shape;
    if hidden == 0 || intermediate == 0 || layers == 0 || heads == 0 || kv_heads == 0 || vocab == 0
    {
        bail!("every shape value must be positive");
    }
    if hidden % heads != 0 || (hidden / heads) % 2 != 0 {
        bail!("--hidden ({hidden}) must be a multiple of --heads ({heads}) with an even head_dim");
    }
    if heads % kv_heads != 0 {
        bail!("--kv-heads ({kv_heads}) must divide --heads ({heads})");
    }
    if out.exists() {
        if !overwrite {
            bail!(
                "output {} already exists (pass --overwrite to replace it)",
                out.display()
            );
        }
        std::fs::remove_dir_all(out).with_context(|| format!("cannot remove {}", out.display()))?;
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let work = compress::util::work_dir_for(out);
    if work.exists() {
        std::fs::remove_dir_all(&work)
            .with_context(|| format!("cannot remove {}", work.display()))?;
    }
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let t0 = Instant::now();

    // config.json: the reference model's keys, with our shape.
    let ref_cfg = reference.join("config.json");
    let mut cfg: Value = match std::fs::read_to_string(&ref_cfg) {
        Ok(t) => serde_json::from_str(&t)
            .with_context(|| format!("{}: not valid JSON", ref_cfg.display()))?,
        Err(_) => {
            eprintln!(
                "[bench] warning: {} not readable; writing a minimal llama config.json",
                ref_cfg.display()
            );
            json!({
                "architectures": ["LlamaForCausalLM"], "attention_bias": false,
                "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1,
                "hidden_act": "silu", "initializer_range": 0.02,
                "max_position_embeddings": 2048, "mlp_bias": false, "pad_token_id": null,
                "pretraining_tp": 1, "rms_norm_eps": 1e-05,
                "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
                "tie_word_embeddings": false, "use_cache": true
            })
        }
    };
    let o = cfg
        .as_object_mut()
        .context("reference config.json is not an object")?;
    o.insert("architectures".into(), json!(["LlamaForCausalLM"]));
    o.insert("model_type".into(), json!("llama"));
    o.insert("dtype".into(), json!(dtype.hf_name()));
    o.insert("hidden_size".into(), json!(hidden));
    o.insert("intermediate_size".into(), json!(intermediate));
    o.insert("num_hidden_layers".into(), json!(layers));
    o.insert("num_attention_heads".into(), json!(heads));
    o.insert("num_key_value_heads".into(), json!(kv_heads));
    o.insert("head_dim".into(), json!(hidden / heads));
    o.insert("vocab_size".into(), json!(vocab));
    o.insert("tie_word_embeddings".into(), json!(false));
    o.insert("attention_bias".into(), json!(false));
    o.insert("mlp_bias".into(), json!(false));
    let cfg_path = work.join("config.json");
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg)?)
        .with_context(|| format!("cannot write {}", cfg_path.display()))?;
    let mc = ModelConfig::from_file(&cfg_path)?;

    // Tokenizer files, so the checkpoint is usable by eval (token ids < 8192).
    let mut copied = Vec::new();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let src = reference.join(f);
        if src.is_file() {
            // read + write, not fs::copy: the copy must not inherit read-only permissions.
            let bytes =
                std::fs::read(&src).with_context(|| format!("cannot read {}", src.display()))?;
            compress::util::write_file(&work.join(f), &bytes)?;
            copied.push(f);
        } else {
            eprintln!(
                "[bench] warning: {} missing; the checkpoint has no {f}",
                src.display()
            );
        }
    }
    if vocab < 8192 && copied.contains(&"tokenizer.json") {
        eprintln!("[bench] warning: vocab {vocab} < 8192: the copied tokenizer can emit ids past the embedding");
    }

    // Weights, tensor by tensor: memory stays O(largest tensor).
    let dt = dtype.dtype();
    let tensors = mc.expected_tensors();
    let total: u64 = tensors
        .iter()
        .map(|(_, s)| (s.iter().product::<usize>() * dt.size()) as u64)
        .sum();
    let mut w = SafetensorsWriter::new(&work, shard_bytes);
    let pb = compress::progress::bar(tensors.len() as u64, "tensors");
    let mut gen_s = 0.0;
    for (ti, (name, shape)) in tensors.iter().enumerate() {
        let numel: usize = shape.iter().product();
        let mut bytes = vec![0u8; numel * dt.size()];
        let t = Instant::now();
        if name.ends_with("norm.weight") {
            fill_const(&mut bytes, dt, 1.0);
        } else if name.ends_with(".bias") {
            fill_const(&mut bytes, dt, 0.0);
        } else {
            fill_normal(&mut bytes, dt, 0.02, seed, ti as u64);
        }
        gen_s += t.elapsed().as_secs_f64();
        w.add(name, dt, shape, &bytes)?;
        pb.inc(1);
    }
    let (mut files, spills) = w.finish()?;
    compress::export::writer::remove_spills(&spills)?;
    pb.finish_and_clear();
    files.push("config.json".into());
    files.extend(copied.iter().map(|s| s.to_string()));
    compress::util::publish(&work, out)?;
    let secs = t0.elapsed().as_secs_f64();
    let params = mc.num_params();
    let size = Checkpoint::open(out)?.safetensors_bytes();
    let peak = compress::util::peak_rss_bytes().unwrap_or(0);
    let v = json!({
        "out": out.display().to_string(),
        "hidden": hidden, "intermediate": intermediate, "layers": layers, "heads": heads,
        "kv_heads": kv_heads, "vocab": vocab, "dtype": dt.name(), "seed": seed,
        "parameters": params, "tensors": tensors.len(), "safetensors_bytes": size,
        "files": files, "seconds": secs, "generate_seconds": gen_s,
        "peak_rss_bytes": peak,
    });
    if as_json {
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!("gen-checkpoint {}", out.display());
        println!("| figure | value |\n|---|---:|");
        println!(
            "| shape | h{hidden} i{intermediate} L{layers} heads {heads}/{kv_heads} vocab {vocab} {} |",
            dt.name()
        );
        println!("| parameters | {params} ({:.3} B) |", params as f64 / 1e9);
        println!("| safetensors bytes | {size} ({}) |", mib(size));
        println!("| files | {} |", files.join(", "));
        println!("| wall time | {secs:.1} s |");
        println!(
            "| of which sampling | {gen_s:.1} s ({:.0} M params/s) |",
            params as f64 / gen_s.max(1e-9) / 1e6
        );
        println!(
            "| write throughput | {:.0} MiB/s |",
            total as f64 / 1048576.0 / secs.max(1e-9)
        );
        println!(
            "| generator peak RSS | {} ({:.1}% of size) |",
            mib(peak),
            100.0 * peak as f64 / size.max(1) as f64
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// identity

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

struct ChildRun {
    wall: f64,
    report: Value,
    rusage_maxrss: Option<u64>,
    user_s: f64,
    sys_s: f64,
    polled_hwm: Option<u64>,
    polled_peak_rss: u64,
    polled_peak_at: f64,
    samples: usize,
    bench_floor: Option<u64>,
}

fn run_child(compress_bin: &Path, yaml: &Path, overwrite: bool) -> Result<ChildRun> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let bench_floor = compress::util::peak_rss_bytes();
    let mut cmd = Command::new(compress_bin);
    cmd.arg("run")
        .arg(yaml)
        .arg("--json")
        .arg("--quiet")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if overwrite {
        cmd.arg("--overwrite");
    }
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", compress_bin.display()))?;
    let mut stdout = child.stdout.take().context("no child stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let status_path = format!("/proc/{}/status", child.id());
    let (mut hwm, mut peak, mut peak_at, mut samples) = (None, 0u64, 0.0, 0usize);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if let Some(h) = proc_status_kb(&status_path, "VmHWM:") {
            hwm = Some(h);
        }
        if let Some(r) = proc_status_kb(&status_path, "VmRSS:") {
            samples += 1;
            if r > peak {
                peak = r;
                peak_at = t0.elapsed().as_secs_f64();
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = t0.elapsed().as_secs_f64();
    let text = reader.join().unwrap_or_default();
    if !status.success() {
        bail!("{} exited with {status}", compress_bin.display());
    }
    let report: Value = serde_json::from_str(text.trim())
        .with_context(|| format!("{}: stdout is not one JSON report", compress_bin.display()))?;
    let ru = rusage::children();
    Ok(ChildRun {
        wall,
        report,
        rusage_maxrss: ru.map(|r| r.0),
        user_s: ru.map(|r| r.1).unwrap_or(0.0),
        sys_s: ru.map(|r| r.2).unwrap_or(0.0),
        polled_hwm: hwm,
        polled_peak_rss: peak,
        polled_peak_at: peak_at,
        samples,
        bench_floor,
    })
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

fn identity(
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

// ---------------------------------------------------------------------------------------------
// eval-speed

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

fn peer_speed(
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
fn speed(
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

fn gemm_rates(shapes: &[String]) -> Result<()> {
    let defaults = [
        "2048,576,1536",
        "2048,1536,576",
        "2048,576,49152",
        "2048,2048,8192",
        "16,2048,8192",
    ];
    let list: Vec<String> = if shapes.is_empty() {
        defaults.iter().map(|s| s.to_string()).collect()
    } else {
        shapes.to_vec()
    };
    println!(
        "threads {}, bf16 path: {}",
        rayon::current_num_threads(),
        if compress::model::bf16::native() {
            "AVX512-BF16 kernel"
        } else {
            "fallback (no AVX512-BF16: bf16-rounded values through the f32 GEMM)"
        }
    );
    println!(
        "| n × k × out | f32 GFLOP/s | bf16 GFLOP/s | bf16 / f32 | W4 g128 codes GFLOP/s | codes / bf16 | weight MiB f32 / bf16 / codes |\n|---|---:|---:|---:|---:|---:|---|"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for s in &list {
        let d: Vec<usize> = s
            .split(',')
            .map(|v| v.trim().parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .with_context(|| format!("--shape {s}: expected n,k,out"))?;
        anyhow::ensure!(
            d.len() == 3 && d.iter().all(|v| *v > 0),
            "--shape {s}: expected n,k,out"
        );
        let (n, k, out) = (d[0], d[1], d[2]);
        let x: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let w: Vec<f32> = (0..out * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let t32 = best_of_three(|| {
            std::hint::black_box(compress::model::ops::linear(&x, n, k, &w, out, None));
        });
        let p = compress::model::bf16::PackedBf16::pack(&w, out, k);
        let t16 = best_of_three(|| {
            std::hint::black_box(p.matmul(&x, n, None));
        });
        // the same weight as 4-bit codes, groups of 128 (or one group per row), read by the
        // kernel from the codes (src/model/packed_int.rs)
        let args = compress::quant::QuantArgs {
            bits: 4,
            symmetric: true,
            strategy: if k % 128 == 0 {
                compress::quant::Strategy::Group
            } else {
                compress::quant::Strategy::Channel
            },
            group_size: 128,
            observer: compress::quant::Observer::MinMax,
        };
        let wa = ndarray::ArrayView2::from_shape((out, k), &w[..])?;
        let q = compress::quant::quantize_rtn(wa, &args, compress::safetensors_file::DType::BF16)?;
        let pq = compress::model::bf16::PackedBf16::pack_quantized(&q);
        let tq = best_of_three(|| {
            std::hint::black_box(pq.matmul(&x, n, None));
        });
        let fl = 2.0 * (n * k * out) as f64;
        let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
        println!(
            "| {n} × {k} × {out} | {:.1} | {:.1} | {:.2}× | {:.1} | {:.2}× | {:.1} / {:.1} / {:.1} |",
            fl / t32 / 1e9,
            fl / t16 / 1e9,
            t32 / t16,
            fl / tq / 1e9,
            t16 / tq,
            mib(4 * w.len()),
            mib(p.bytes()),
            mib(pq.bytes()),
        );
    }
    Ok(())
}

fn best_of_three(mut f: impl FnMut()) -> f64 {
    f();
    (0..3)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// FLOPs per layer of what a layer-wise pass computes, from the model's shapes: a forward of T
/// tokens (linears 2·m·n per token; causal attention 2·2·heads·head_dim per (query, key) pair,
/// (L + 1)/2 keys on average), the Hessians XᵀX of the four input sites (lower triangle,
/// d(d + 1) per token), and AWQ's candidate forwards (per α: the attention with o_proj for
/// q/k/v, the MLP for gate/up, down_proj alone for up → down; v → o where shapes allow).
fn floor(
    model: &Path,
    tokens: usize,
    seq_len: usize,
    awq_tokens: usize,
    awq_grid: usize,
    as_json: bool,
) -> Result<()> {
    let c = Checkpoint::open(model)?.config;
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let f = |x: usize| x as f64;
    let attn_lin = 2.0 * f(h) * (f(q) + 2.0 * f(kv)) + 2.0 * f(q) * f(h);
    let attn_core = 4.0 * f(q) * f(seq_len + 1) / 2.0;
    let mlp = 6.0 * f(h) * f(i);
    let per_token = attn_lin + attn_core + mlp;
    let forward = f(tokens) * per_token;
    let hess = f(tokens) * [h, q, h, i].iter().map(|d| f(*d) * f(d + 1)).sum::<f64>();
    let v_to_o = if kv == q { 2.0 * f(q) * f(h) } else { 0.0 };
    let awq_search =
        f(awq_grid) * f(awq_tokens) * (attn_lin + attn_core + mlp + 2.0 * f(i) * f(h) + v_to_o);
    let layers = f(c.num_layers);
    let gptq = layers * (2.0 * forward + hess);
    let awq = layers * (2.0 * forward + awq_search);
    // the machine's f32 rates on this model's shapes (8192-token chunks)
    let n = 8192;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x: Vec<f32> = (0..n * i.max(h))
        .map(|_| rng.gen_range(-1.0..1.0))
        .collect();
    let w: Vec<f32> = (0..i * h).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let t_gemm = best_of_three(|| {
        std::hint::black_box(compress::model::ops::linear(&x[..n * h], n, h, &w, i, None));
    });
    let gemm_rate = 2.0 * f(n) * f(h) * f(i) / t_gemm;
    let t_gram = best_of_three(|| {
        std::hint::black_box(compress::model::ops::gram(&x[..n * i], n, i));
    });
    let gram_rate = f(n) * f(i) * f(i + 1) / t_gram;
    let secs = |fl: f64| fl / gemm_rate;
    let hess_s = layers * hess / gram_rate;
    let gptq_floor = layers * 2.0 * forward / gemm_rate + hess_s;
    let awq_floor = secs(awq);
    let out = json!({
        "model": model.display().to_string(),
        "tokens": tokens,
        "threads": rayon::current_num_threads(),
        "gemm_gflops": gemm_rate / 1e9,
        "gram_gflops": gram_rate / 1e9,
        "forward_gflop_per_layer": forward / 1e9,
        "hessian_gflop_per_layer": hess / 1e9,
        "gptq_tflop": gptq / 1e12,
        "gptq_floor_s": gptq_floor,
        "awq_search_gflop_per_layer": awq_search / 1e9,
        "awq_tflop": awq / 1e12,
        "awq_floor_s": awq_floor,
    });
    if as_json {
        println!("{out}");
        return Ok(());
    }
    println!(
        "{}: {} layers, hidden {h}, intermediate {i}, {tokens} calibration tokens, {} threads",
        model.display(),
        c.num_layers,
        rayon::current_num_threads()
    );
    println!(
        "f32 GEMM [{n}×{h}]·[{h}×{i}]: {:.1} GFLOP/s; XᵀX [{n}×{i}] lower triangle: {:.1} GFLOP/s",
        gemm_rate / 1e9,
        gram_rate / 1e9
    );
    println!(
        "per layer: forward {:.1} GFLOP, Hessians {:.1} GFLOP, AWQ search ({awq_grid} α × {awq_tokens} tokens) {:.1} GFLOP",
        forward / 1e9,
        hess / 1e9,
        awq_search / 1e9
    );
    println!(
        "GPTQ / SparseGPT (statistics forward + propagation forward + Hessians): {:.2} TFLOP → floor {:.1} s at these rates",
        gptq / 1e12,
        gptq_floor
    );
    println!(
        "AWQ (statistics + propagation forwards + candidate forwards): {:.2} TFLOP → floor {:.1} s",
        awq / 1e12,
        awq_floor
    );
    Ok(())
}

fn eval_speed(
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

// ---------------------------------------------------------------------------------------------

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
