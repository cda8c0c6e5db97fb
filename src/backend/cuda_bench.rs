//! GPU benchmark of GPTQ's device stages on Llama-shaped random layers (`bench gpu-gptq`):
//! no weights to download, everything generated on the device from a seed.
//!
//! Per layer, over `tokens` calibration tokens in chunks: random bf16 activations at the four
//! input sites (standing in for the layer forward's; the attention itself is not computed
//! here), the linears' forward products on them (cuBLAS bf16, f32 accumulation), and the four
//! Hessians XᵀX (same); then per linear the dampened Cholesky factor of H⁻¹ (cuSOLVER, f64)
//! and the GPTQ column sweep (kernels/quant.cu + SGEMM lazy updates), W4 g128 symmetric; then
//! the codes and scales come back to the host and are packed into compressed-tensors' int32
//! words (the seven linears of a layer in parallel). Prints per-stage seconds, the achieved TFLOP/s of the product stages against the
//! measured bf16 GEMM rate, and the peak device memory in use.

use super::cuda::Gpu;
use super::SweepJob;
use crate::model::arch::{Dim, LLAMA};
use crate::quant::{Observer, QuantArgs, QuantizedLinear, Strategy};
use anyhow::Result;
use rayon::prelude::*;
use serde_json::{json, Value};
use std::time::Instant;

/// Shapes of the benchmark (Llama-3-8B by default in the CLI).
#[derive(Clone, Debug)]
pub struct Shape {
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub tokens: usize,
    pub chunk: usize,
    pub group: usize,
    pub bits: u32,
}

struct Mem<'a> {
    gpu: &'a Gpu,
    total: usize,
    min_free: usize,
}

impl Mem<'_> {
    fn sample(&mut self) -> Result<()> {
        let (free, total) = self.gpu.mem_info()?;
        self.total = total;
        self.min_free = self.min_free.min(free);
        Ok(())
    }
}

/// Run the benchmark; returns the figures as JSON (also printed as they come unless quiet).
pub fn gptq_layers(shape: &Shape, quiet: bool) -> Result<Value> {
    let t_init = Instant::now();
    let gpu = Gpu::new(0)?;
    let init_s = t_init.elapsed().as_secs_f64();
    let s = gpu.stream().clone();
    let (free0, total) = gpu.mem_info()?;
    let mut mem = Mem {
        gpu: &gpu,
        total,
        min_free: free0,
    };
    let say = |m: String| {
        if !quiet {
            eprintln!("{m}");
        }
    };
    say(format!(
        "device {} ({}), {:.1} GiB free of {:.1}; init (context, NVRTC/cache, cuBLAS, cuSOLVER) {init_s:.2}s",
        gpu.name,
        gpu.arch,
        free0 as f64 / (1u64 << 30) as f64,
        total as f64 / (1u64 << 30) as f64
    ));

    // The device's bf16 GEMM ceiling: 8192³ on random data, 3 warm-ups, 10 timed.
    let n = 8192;
    let a = gpu.random_bf16(n * n, 1, 1.0)?;
    let b = gpu.random_bf16(n * n, 2, 1.0)?;
    let mut c = s.alloc_zeros::<u16>(n * n)?;
    for _ in 0..3 {
        gpu.linear_bf16(&a, &b, &mut c, n, n, n)?;
    }
    gpu.synchronize()?;
    let t = Instant::now();
    for _ in 0..10 {
        gpu.linear_bf16(&a, &b, &mut c, n, n, n)?;
    }
    gpu.synchronize()?;
    let gemm_tflops = 10.0 * 2.0 * (n as f64).powi(3) / t.elapsed().as_secs_f64() / 1e12;
    drop((a, b, c));
    say(format!("bf16 GEMM 8192³: {gemm_tflops:.0} TFLOP/s"));

    let (h, i) = (shape.hidden, shape.intermediate);
    let kvd = h / shape.heads * shape.kv_heads;
    // (name, out, in, site): the Llama block's table at this shape; sites in execution order
    // (0 attention input, 1 o_proj input, 2 MLP input, 3 down input)
    let dim = |d: Dim| match d {
        Dim::Hidden | Dim::QHeads => h,
        Dim::Intermediate => i,
        Dim::KvHeads => kvd,
        Dim::HeadDim => h / shape.heads,
        Dim::ExpertIntermediate | Dim::Experts | Dim::SharedIntermediate | Dim::One => 0,
    };
    let linears: Vec<(&str, usize, usize, usize)> = LLAMA
        .linears
        .iter()
        .map(|l| (l.name, dim(l.out), dim(l.inp), l.site.0 as usize))
        .collect();
    let site_dim = [h, h, h, i];
    let args = QuantArgs::int(
        shape.bits,
        true,
        Strategy::Group,
        shape.group,
        Observer::MinMax,
    );
    let chunks = shape.tokens.div_ceil(shape.chunk);
    let mut t_fill = 0.0;
    let mut t_hess = 0.0;
    let mut t_fwd = 0.0;
    let mut t_factor_sweep = 0.0;
    let mut t_pack = 0.0;
    let mut t_download = 0.0;
    let mut t_weights = 0.0;
    let mut packed_bytes = 0usize;
    let hess_flops_per_tok: f64 = site_dim.iter().map(|&d| 2.0 * (d * d) as f64).sum();
    let fwd_flops_per_tok: f64 = linears.iter().map(|l| 2.0 * (l.1 * l.2) as f64).sum();
    let t_all = Instant::now();
    for layer in 0..shape.layers {
        let t = Instant::now();
        let weights: Vec<_> = linears
            .iter()
            .enumerate()
            .map(|(k, l)| gpu.random_bf16(l.1 * l.2, (layer * 16 + k) as u64 + 100, 0.02))
            .collect::<Result<_>>()?;
        gpu.synchronize()?;
        t_weights += t.elapsed().as_secs_f64();
        let mut hs = site_dim
            .iter()
            .map(|&d| s.alloc_zeros::<f32>(d * d))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut outs = linears
            .iter()
            .map(|l| s.alloc_zeros::<u16>(shape.chunk * l.1))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        for ch in 0..chunks {
            let rows = shape.chunk.min(shape.tokens - ch * shape.chunk);
            let t = Instant::now();
            let xs = site_dim
                .iter()
                .enumerate()
                .map(|(k, &d)| {
                    gpu.random_bf16(rows * d, ((layer * 4 + k) * 1_000_003 + ch) as u64, 1.0)
                })
                .collect::<Result<Vec<_>>>()?;
            gpu.synchronize()?;
            t_fill += t.elapsed().as_secs_f64();
            let t = Instant::now();
            for (k, x) in xs.iter().enumerate() {
                gpu.xtx_bf16(x, rows, site_dim[k], &mut hs[k])?;
            }
            gpu.synchronize()?;
            t_hess += t.elapsed().as_secs_f64();
            let t = Instant::now();
            for (k, l) in linears.iter().enumerate() {
                gpu.linear_bf16(&xs[l.3], &weights[k], &mut outs[k], rows, l.1, l.2)?;
            }
            gpu.synchronize()?;
            t_fwd += t.elapsed().as_secs_f64();
            if ch == 0 {
                mem.sample()?;
            }
        }
        drop(outs);
        let mut quants = Vec::with_capacity(linears.len());
        for (k, l) in linears.iter().enumerate() {
            let t = Instant::now();
            let (rows, cols) = (l.1, l.2);
            let hf = gpu.hessian_f64(&hs[l.3], shape.tokens)?;
            let mut w = gpu.bf16_to_f32(&weights[k])?;
            let job = SweepJob {
                w: &[],
                rows,
                cols,
                h: &[],
                damp: 0.01,
                block_size: 128,
                gs: shape.group,
                n_groups: cols / shape.group,
                bits: shape.bits,
                sym: true,
                scale_dtype: 1,
                fixed: None,
            };
            let d = gpu.gptq_sweep_dev(&mut w, &hf, &job, None)?;
            mem.sample()?;
            drop((hf, w));
            t_factor_sweep += t.elapsed().as_secs_f64();
            let t = Instant::now();
            quants.push((
                l.0,
                QuantizedLinear {
                    args: args.clone(),
                    codes: s.memcpy_dtov(&d.codes)?,
                    scales: s.memcpy_dtov(&d.dyn_scales)?,
                    zeros: None,
                    g_idx: None,
                    static_order: false,
                    true_sequential: false,
                    scale_dtype: crate::model::DType::BF16,
                    global_scale: None,
                    shape: (rows, cols),
                },
            ));
            t_download += t.elapsed().as_secs_f64();
        }
        // pack the layer's seven linears on the host, in parallel
        let t = Instant::now();
        let sizes = quants
            .par_iter()
            .map(|(name, q)| {
                crate::formats::compressed_tensors::compressed_tensors_tensors(
                    &format!("model.layers.{layer}.{name}"),
                    q,
                )
                .map(|ts| ts.iter().map(|t| t.3.len()).sum::<usize>())
            })
            .collect::<Result<Vec<_>>>()?;
        packed_bytes += sizes.iter().sum::<usize>();
        t_pack += t.elapsed().as_secs_f64();
        if layer == 0 || layer + 1 == shape.layers || (layer + 1) % 8 == 0 {
            say(format!(
                "layer {}/{}: {:.1}s so far (fill {t_fill:.1}, Hessians {t_hess:.1}, forward products {t_fwd:.1}, factor+sweep {t_factor_sweep:.1}, download {t_download:.1}, pack {t_pack:.1})",
                layer + 1,
                shape.layers,
                t_all.elapsed().as_secs_f64()
            ));
        }
    }
    let total_s = t_all.elapsed().as_secs_f64();
    let toks = (shape.tokens * shape.layers) as f64;
    let hess_tflops = hess_flops_per_tok * toks / t_hess / 1e12;
    let fwd_tflops = fwd_flops_per_tok * toks / t_fwd / 1e12;
    let peak_used = mem.total - mem.min_free;
    let baseline_used = mem.total - free0;
    let v = json!({
        "device": gpu.name,
        "arch": gpu.arch,
        "shape": {
            "layers": shape.layers, "hidden": h, "intermediate": i, "heads": shape.heads,
            "kv_heads": shape.kv_heads, "tokens": shape.tokens, "chunk": shape.chunk,
            "bits": shape.bits, "group": shape.group,
        },
        "init_seconds": init_s,
        "bf16_gemm_tflops": gemm_tflops,
        "seconds": {
            "total": total_s,
            "random_weights": t_weights,
            "random_activations": t_fill,
            "hessians": t_hess,
            "forward_products": t_fwd,
            "factor_and_sweep": t_factor_sweep,
            "download": t_download,
            "pack_host_parallel": t_pack,
        },
        "hessian_tflops": hess_tflops,
        "forward_products_tflops": fwd_tflops,
        "packed_bytes": packed_bytes,
        "peak_device_bytes_in_use": peak_used,
        "device_bytes_in_use_at_start": baseline_used,
    });
    say(format!(
        "total {total_s:.1}s: Hessians {t_hess:.1}s ({hess_tflops:.0} TFLOP/s, {:.0}% of GEMM), forward products {t_fwd:.1}s ({fwd_tflops:.0} TFLOP/s), factor+sweep {t_factor_sweep:.1}s, download {t_download:.1}s, pack {t_pack:.1}s; peak device memory in use {:.2} GiB (at start {:.2})",
        100.0 * hess_tflops / gemm_tflops,
        peak_used as f64 / (1u64 << 30) as f64,
        baseline_used as f64 / (1u64 << 30) as f64
    ));
    Ok(v)
}
