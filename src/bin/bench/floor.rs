//! `bench floor`: the FLOP floor of a layer-wise pass (calibration forwards, Hessians, AWQ's
//! candidates) at the f32 GEMM and XᵀX rates measured here on the model's shapes.

use super::helpers::best_of_three;
use anyhow::Result;
use compress::model::Checkpoint;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::path::Path;

/// FLOPs per layer of what a layer-wise pass computes, from the model's shapes: a forward of T
/// tokens (linears 2·m·n per token; causal attention 2·2·heads·head_dim per (query, key) pair,
/// (L + 1)/2 keys on average), the Hessians XᵀX of the four input sites (lower triangle,
/// d(d + 1) per token), and AWQ's candidate forwards (per α: the attention with o_proj for
/// q/k/v, the MLP for gate/up, down_proj alone for up → down; v → o where shapes allow).
pub(super) fn floor(
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
