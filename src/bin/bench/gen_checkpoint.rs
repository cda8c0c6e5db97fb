//! `bench gen-checkpoint`: a random-weight Llama-shaped HF checkpoint (weights ~ N(0, 0.02),
//! norms = 1), with the seeded, thread-count-independent samplers that fill its tensors.

use super::helpers::mib;
use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use compress::export::writer::SafetensorsWriter;
use compress::model::{Checkpoint, DType, ModelConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Instant;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(super) enum DtypeArg {
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

pub(super) struct Shape {
    pub(super) hidden: usize,
    pub(super) intermediate: usize,
    pub(super) layers: usize,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) vocab: usize,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn gen_checkpoint(
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
