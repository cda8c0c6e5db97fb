//! The CUDA path against the CPU path (built with `--features cuda`).
//!
//! `kernels_compile_under_nvrtc` needs libnvrtc only (no GPU); the others need a GPU. All are
//! `#[ignore]`d, so a run without them lists them as ignored rather than passing; run
//! explicitly (`--include-ignored`, as `scripts/cuda-device-check.sh run` does) they fail when
//! what they need is absent. CI has neither and compiles this file only (`cargo check
//! --features cuda`); BENCHMARKS.md says when it last ran on a GPU.
//!
//! The comparisons share one process-wide switch (`backend::cpu_only`), so they run in one
//! test, in sequence.
#![cfg(feature = "cuda")]

mod common;

use common::shared;
use compress::backend;
use compress::model::DType;
use compress::passes::gptq::{gptq_quantize, GptqResult};
use compress::quant::{quantize_rtn, Observer, QuantArgs, QuantizedLinear, Strategy};
use compress::safetensors_file::SafetensorsFile;
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Activate the first GPU (fails the test when there is none).
fn gpu() {
    match backend::activate(0) {
        Ok(name) => eprintln!("GPU: {name}"),
        Err(e) => panic!("no usable CUDA device: {e:#}"),
    }
}

#[test]
#[ignore = "needs CUDA (libnvrtc, a GPU): scripts/cuda-device-check.sh"]
fn kernels_compile_under_nvrtc() {
    let d = tempfile::tempdir().unwrap();
    std::env::set_var("COMPRESS_KERNEL_CACHE", d.path());
    for arch in ["compute_80", "compute_90"] {
        for (name, src) in [
            ("quant", backend::cuda::QUANT_CU),
            ("util", backend::cuda::UTIL_CU),
            ("layer", backend::cuda::LAYER_CU),
        ] {
            match backend::cuda::compile(name, src, arch) {
                Ok(ptx) => {
                    let text = ptx.to_src();
                    assert!(
                        text.contains(".entry"),
                        "{name} {arch}: no kernel in the PTX"
                    );
                }
                Err(e) => panic!("{name} for {arch}: {e:#}"),
            }
        }
    }
    // the second compile of the same source comes from the cache
    let n = std::fs::read_dir(d.path()).unwrap().count();
    assert_eq!(n, 6, "one cached PTX per source and architecture");
    backend::cuda::compile("quant", backend::cuda::QUANT_CU, "compute_90").unwrap();
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 6);
}

fn random_weights(rows: usize, cols: usize, dtype: DType, rng: &mut ChaCha8Rng) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |(r, _)| {
        // rows of different magnitude, a few exact zeros
        let x: f32 = rng.gen_range(-1.0..1.0) * (0.01 + r as f32 * 0.003);
        let x = if rng.gen_range(0..50) == 0 { 0.0 } else { x };
        compress::quant::round_to(dtype, x)
    })
}

fn same_quant(a: &QuantizedLinear, b: &QuantizedLinear, what: &str) {
    assert_eq!(a.codes, b.codes, "{what}: codes");
    assert_eq!(
        a.scales.iter().map(|s| s.to_bits()).collect::<Vec<_>>(),
        b.scales.iter().map(|s| s.to_bits()).collect::<Vec<_>>(),
        "{what}: scales"
    );
    assert_eq!(a.zeros, b.zeros, "{what}: zeros");
}

/// ‖(W − Q) Xᵀ‖ / ‖W Xᵀ‖ through H: tr((W−Q) H (W−Q)ᵀ) / tr(W H Wᵀ).
fn rel_err(w: &Array2<f32>, q: &Array2<f32>, h: &Array2<f64>) -> f64 {
    compress::linalg::rel_output_error(w, q, h)
}

fn gptq_problem(rows: usize, cols: usize, n: usize, seed: u64) -> (Array2<f32>, Array2<f64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let w = random_weights(rows, cols, DType::BF16, &mut rng);
    // correlated inputs: x = z · M with a random mixing matrix, one dead column
    let m = Array2::from_shape_fn((cols, cols), |(i, j)| {
        if i == j {
            1.0
        } else {
            rng.gen_range(-0.2..0.2f64)
        }
    });
    let z = Array2::from_shape_fn((n, cols), |_| rng.gen_range(-1.0..1.0f64));
    let mut x = z.dot(&m);
    x.column_mut(3).fill(0.0);
    let h = x.t().dot(&x) * (2.0 / n as f64);
    (w, h)
}

#[test]
#[ignore = "needs CUDA (libnvrtc, a GPU): scripts/cuda-device-check.sh"]
fn gpu_path_matches_cpu() {
    gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(7);

    // 1. RTN: bit-identical codes, scales and zero points.
    let mut n_rtn = 0;
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for bits in [2, 3, 4, 8] {
            for sym in [true, false] {
                for (strategy, gs) in [
                    (Strategy::Group, 32),
                    (Strategy::Group, 128),
                    (Strategy::Channel, 0),
                ] {
                    let args = QuantArgs::int(bits, sym, strategy, gs, Observer::MinMax);
                    let w = random_weights(67, 256, dtype, &mut rng);
                    let before = backend::device_calls();
                    let g = backend::rtn(w.view(), &args, dtype).unwrap();
                    assert_eq!(backend::device_calls(), before + 1, "RTN ran on the GPU");
                    let c = quantize_rtn(w.view(), &args, dtype).unwrap();
                    same_quant(
                        &g,
                        &c,
                        &format!("RTN {dtype:?} {bits}b sym={sym} {strategy:?} {gs}"),
                    );
                    n_rtn += 1;
                }
            }
        }
    }
    eprintln!("RTN: {n_rtn} schemes bit-identical");

    // 2. The dequantize kernel equals QuantizedLinear::dequantize (with and without g_idx).
    let args = QuantArgs::int(4, false, Strategy::Group, 32, Observer::MinMax);
    let w = random_weights(40, 128, DType::BF16, &mut rng);
    let mut q = quantize_rtn(w.view(), &args, DType::BF16).unwrap();
    for with_gidx in [false, true] {
        if with_gidx {
            q.g_idx = Some((0..128i32).map(|j| (j * 7) % 4).collect());
        }
        let zeros: Option<Vec<i32>> = q
            .zeros
            .as_ref()
            .map(|z| z.iter().map(|&v| v as i32).collect());
        let d = backend::with_gpu(|g| {
            g.dequantize(
                &q.codes,
                &q.scales,
                zeros.as_deref(),
                q.g_idx.as_deref(),
                40,
                128,
                32,
            )
        })
        .unwrap()
        .unwrap();
        let c = q.dequantize();
        assert_eq!(
            d.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            c.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "dequantize g_idx={with_gidx}"
        );
    }

    // 3. GPTQ: the same problem on both devices. The sweep is the same arithmetic; only the
    //    lazy update's summation order (cuBLAS) and the f64 Cholesky differ, so a few codes
    //    flip at rounding ties and the output error must agree closely.
    let (w, h) = gptq_problem(96, 512, 2048, 11);
    for (label, bits, strategy, gs, act_order, static_groups, sym) in [
        ("W4 g128 sym", 4, Strategy::Group, 128, false, false, true),
        ("W4 g64 asym", 4, Strategy::Group, 64, false, false, false),
        (
            "W3 g128 act-order static",
            3,
            Strategy::Group,
            128,
            true,
            true,
            true,
        ),
        (
            "W4 g128 act-order dynamic",
            4,
            Strategy::Group,
            128,
            true,
            false,
            true,
        ),
        ("W8 channel", 8, Strategy::Channel, 0, true, false, true),
    ] {
        let args = QuantArgs::int(bits, sym, strategy, gs, Observer::MinMax);
        let run = || -> GptqResult {
            gptq_quantize(
                &w,
                &h,
                &args,
                DType::BF16,
                0.01,
                128,
                act_order,
                static_groups,
            )
            .unwrap()
        };
        let before = backend::device_calls();
        let g = run();
        assert_eq!(
            backend::device_calls(),
            before + 1,
            "{label}: GPTQ ran on the GPU"
        );
        let c = backend::cpu_only(run);
        assert_eq!(
            backend::device_calls(),
            before + 1,
            "{label}: the reference ran on the CPU"
        );
        let (eg, ec) = (rel_err(&w, &g.dequant, &h), rel_err(&w, &c.dequant, &h));
        let same = g
            .quant
            .codes
            .iter()
            .zip(&c.quant.codes)
            .filter(|(a, b)| a == b)
            .count();
        let frac = same as f64 / c.quant.codes.len() as f64;
        eprintln!(
            "GPTQ {label}: rel. output error GPU {eg:.6} CPU {ec:.6}; codes equal {:.4}; loss {:.4} / {:.4}",
            frac, g.loss, c.loss
        );
        assert!((eg - ec).abs() <= 0.01 * ec, "{label}: {eg} vs {ec}");
        assert!(frac > 0.99, "{label}: only {frac} of the codes agree");
        assert!((g.loss - c.loss).abs() <= 0.01 * c.loss, "{label}: loss");
        assert_eq!(g.quant.g_idx, c.quant.g_idx, "{label}: g_idx");
        assert_eq!(g.damp, c.damp, "{label}: damp");
    }

    // 4. The decoder layer's forward on the GPU equals the CPU's (f32 both; products and
    //    reductions are summed in other orders, so within float tolerance), layer after layer
    //    of the reference model on random token ids.
    {
        use compress::backend::cuda_layer::{GpuLayer, GpuRope};
        use compress::model::layer::LayerWeights;
        use compress::model::llama::{DecoderLayer, Outer, Rope};
        let ck = compress::model::Checkpoint::open(&shared().join("models/ref-llama-9m")).unwrap();
        let cfg = ck.config.clone();
        let (b, t) = (2, 200);
        let ids: Vec<u32> = (0..b * t)
            .map(|_| rng.gen_range(0..cfg.vocab_size as u32))
            .collect();
        let outer = Outer::load(&ck, false).unwrap();
        let mut x_cpu = outer.embed(&ids, b, t).unwrap();
        let mut x_gpu = x_cpu.data.clone();
        let rope = Rope::new(&cfg, t).unwrap();
        let grope = backend::with_gpu(|g| GpuRope::new(g, &cfg, t))
            .unwrap()
            .unwrap();
        let mut no_hook = |_: compress::model::layer::Site, _: &[f32], _: usize, _: usize| Ok(());
        for l in 0..cfg.num_layers {
            let lw = LayerWeights::load(&ck, l).unwrap();
            x_cpu = DecoderLayer::new(&lw, &cfg)
                .forward(&x_cpu, &rope, &mut no_hook)
                .unwrap();
            x_gpu = backend::with_gpu(|g| {
                let gl = GpuLayer::upload(g, &lw, &cfg)?;
                gl.forward(g, &x_gpu, b, t, &grope)
            })
            .unwrap()
            .unwrap();
            assert!(
                x_gpu.iter().all(|v| v.is_finite()),
                "layer {l}: non-finite output"
            );
            let num: f64 = x_gpu
                .iter()
                .zip(&x_cpu.data)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            let den: f64 = x_cpu.data.iter().map(|a| (*a as f64).powi(2)).sum();
            let rel = (num / den).sqrt();
            eprintln!("layer {l}: GPU forward vs CPU, relative difference {rel:.2e}");
            assert!(
                rel < 1e-4,
                "layer {l}: GPU forward differs from the CPU's by {rel}"
            );
        }
    }

    // 5. The reference model: RTN W4 g128 on the GPU writes llm-compressor's golden checkpoint
    //    byte for byte; GPTQ W4 g128's perplexity is within 0.5% of the CPU path's.
    let d = tempfile::tempdir().unwrap();
    let model = shared().join("models/ref-llama-9m");
    let write = |name: &str, passes: &str, eval: &str| -> std::path::PathBuf {
        let p = d.path().join(format!("{name}.yaml"));
        std::fs::write(
            &p,
            format!(
                "model: {}\noutput: {}\ncalibration: {{path: {}, field: text, samples: 32, seq_len: 512, seed: 0}}\npasses:\n{passes}\nexport: {{format: compressed-tensors}}\n{eval}",
                model.display(),
                d.path().join(name).display(),
                shared().join("data/calib/c4_calib.jsonl").display()
            ),
        )
        .unwrap();
        p
    };
    let opts = |device: &str| compress::runner::RunOptions {
        model: None,
        output: None,
        overwrite: true,
        resume: false,
        device: Some(device.into()),
        ..Default::default()
    };
    let rtn = write("rtn", "  - rtn: {bits: 4, group_size: 128}", "");
    let before = backend::device_calls();
    compress::runner::run_pipeline(&rtn, &opts("cuda:0")).unwrap();
    assert!(
        backend::device_calls() > before,
        "the RTN pipeline ran on the GPU"
    );
    let ours = SafetensorsFile::open(&d.path().join("rtn/model.safetensors")).unwrap();
    let gold = SafetensorsFile::open(
        &shared().join("golden/compressed_tensors/ref-llama-9m-rtn-w4g128/model.safetensors"),
    )
    .unwrap();
    for (n, g) in &gold.tensors {
        let t = &ours.tensors[n];
        assert!(
            ours.bytes(t) == gold.bytes(g),
            "{n}: bytes differ from the golden file"
        );
    }
    eprintln!(
        "RTN W4 g128 on the GPU: {} tensors equal the golden file",
        gold.tensors.len()
    );

    let eval = format!(
        "eval: {{datasets: [{}], seq_len: 512, baseline: false}}\n",
        shared().join("data/eval/ptb/ptb.test.txt").display()
    );
    let gptq = write(
        "gptq",
        "  - gptq: {bits: 4, group_size: 128, targets: [\"re:.*_proj$\"]}",
        &eval,
    );
    let ppl = |r: &compress::report::Report| -> f64 {
        r.eval
            .values()
            .next()
            .unwrap()
            .after
            .as_ref()
            .unwrap()
            .perplexity
    };
    let before = backend::device_calls();
    let on_gpu = compress::runner::run_pipeline(&gptq, &opts("cuda:0")).unwrap();
    assert!(
        backend::device_calls() > before,
        "the GPTQ pipeline ran on the GPU"
    );
    let on_cpu = backend::cpu_only(|| compress::runner::run_pipeline(&gptq, &opts("cpu")).unwrap());
    let (pg, pc) = (ppl(&on_gpu), ppl(&on_cpu));
    eprintln!("GPTQ W4 g128 ptb perplexity: GPU {pg:.4}, CPU {pc:.4}");
    assert!((pg - pc).abs() <= 0.005 * pc, "GPU {pg} vs CPU {pc}");
}
