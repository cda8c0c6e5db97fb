//! `bench gemm`: GFLOP/s of y = x·Wᵀ in f32, bf16 and from W4 g128 codes on given shapes.

use super::helpers::best_of_three;
use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub(super) fn gemm_rates(shapes: &[String]) -> Result<()> {
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
        // kernel from the codes (src/model/bf16/packed_int.rs)
        let args = compress::quant::QuantArgs::int(
            4,
            true,
            if k % 128 == 0 {
                compress::quant::Strategy::Group
            } else {
                compress::quant::Strategy::Channel
            },
            128,
            compress::quant::Observer::MinMax,
        );
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
