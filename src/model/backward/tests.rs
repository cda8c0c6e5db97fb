//! Tests of the block backward (against the model's forward and central finite differences),
//! and the random blocks and inputs they (and `passes/kd.rs`) are built on.

use super::*;
use crate::config::ModelConfig;
use crate::model::layer::{Factor, Mask};
use crate::model::layer::{LayerWeights, Linear};
use crate::model::llama::DecoderLayer;
use crate::model::llama::{Act, Rope};
use crate::quant::{Observer, QuantArgs, Strategy};
use crate::safetensors_file::DType;
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

pub fn rnd(n: usize, amp: f32, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-amp..amp)).collect()
}

pub fn tiny_config(model_type: &str) -> ModelConfig {
    let raw = serde_json::json!({"model_type": model_type, "hidden_size": 32,
        "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 50, "rms_norm_eps": 1e-5});
    ModelConfig::from_value(raw, std::path::Path::new("config.json")).unwrap()
}

fn args(bits: u32, symmetric: bool, strategy: Strategy, group_size: usize) -> QuantArgs {
    QuantArgs::int(bits, symmetric, strategy, group_size, Observer::MinMax)
}

/// A random block holding every representation: q asymmetric group-quantized, k symmetric
/// quantized, v factored, o sparse + quantized, gate dense, up sparse (dense values), down
/// asymmetric per-channel quantized; biases where the family has them; random norms.
pub fn random_block(cfg: &ModelConfig, seed: u64) -> LayerWeights {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut linears = BTreeMap::new();
    for name in cfg.block().linear_names() {
        let desc = cfg.block().linear(name).unwrap();
        let (out, inn) = match name {
            "self_attn.q_proj" => (cfg.num_heads * cfg.head_dim, cfg.hidden_size),
            "self_attn.k_proj" | "self_attn.v_proj" => {
                (cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size)
            }
            "self_attn.o_proj" => (cfg.hidden_size, cfg.num_heads * cfg.head_dim),
            "mlp.down_proj" => (cfg.hidden_size, cfg.intermediate_size),
            _ => (cfg.intermediate_size, cfg.hidden_size),
        };
        let amp = 1.7 / (inn as f32).sqrt();
        let w = Array2::from_shape_vec((out, inn), rnd(out * inn, amp, &mut rng)).unwrap();
        let bias = cfg.has_bias(desc).then(|| rnd(out, 0.3, &mut rng));
        let mut l = Linear::dense(w.clone(), bias, DType::BF16);
        let quant = |l: &mut Linear, a: QuantArgs| {
            let q = crate::quant::quantize_rtn(l.weight().view(), &a, DType::BF16).unwrap();
            l.set_quantized(q).unwrap();
        };
        match name {
            "self_attn.q_proj" => quant(&mut l, args(3, false, Strategy::Group, 16)),
            "self_attn.k_proj" => quant(&mut l, args(4, true, Strategy::Group, 16)),
            "self_attn.v_proj" => {
                let r = 5;
                let u = Array2::from_shape_vec((out, r), rnd(out * r, 0.5, &mut rng));
                let v = Array2::from_shape_vec((r, inn), rnd(r * inn, 0.5, &mut rng));
                let f = |values| Factor {
                    values,
                    quant: None,
                };
                l.set_factored(f(u.unwrap()), f(v.unwrap())).unwrap();
            }
            "self_attn.o_proj" | "mlp.up_proj" => {
                let keep: Vec<bool> = (0..out * inn).map(|i| i % 4 < 2).collect();
                l.set_mask(Mask::new((out, inn), keep).unwrap()).unwrap();
                if name == "self_attn.o_proj" {
                    quant(&mut l, args(4, true, Strategy::Group, 16));
                }
            }
            "mlp.down_proj" => quant(&mut l, args(3, false, Strategy::Channel, 0)),
            _ => {}
        }
        linears.insert(name.to_string(), l);
    }
    let mut norms = BTreeMap::new();
    for (n, _) in &cfg.block().norms {
        let d = if n.contains("q_norm") || n.contains("k_norm") {
            cfg.head_dim
        } else {
            cfg.hidden_size
        };
        let v: Vec<f32> = (0..d).map(|_| rng.gen_range(0.5f32..1.5)).collect();
        norms.insert(n.to_string(), (v, DType::BF16));
    }
    LayerWeights {
        index: 0,
        linears,
        norms,
        norms_modified: false,
    }
}

pub fn random_act(cfg: &ModelConfig, b: usize, t: usize, seed: u64) -> Act {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    Act {
        data: rnd(b * t * cfg.hidden_size, 1.5, &mut rng),
        b,
        t,
    }
}

const ALL: [Group; 5] = [
    Group::Norms,
    Group::Scales,
    Group::Zeros,
    Group::Factors,
    Group::Biases,
];

#[test]
fn forward_is_the_models_forward() {
    for ty in ["llama", "qwen2", "qwen3"] {
        let cfg = tiny_config(ty);
        let layer = random_block(&cfg, 1);
        let x = random_act(&cfg, 2, 9, 2);
        let rope = Rope::new(&cfg, 16).unwrap();
        let p = Params::of(&layer, &ALL);
        let (y, _) = Block::new(&layer, &cfg, &p)
            .unwrap()
            .forward(&x, &rope)
            .unwrap();
        let mut no = |_: crate::model::layer::Site, _: &[f32], _: usize, _: usize| Ok(());
        let want = DecoderLayer::new(&layer, &cfg)
            .forward(&x, &rope, &mut no)
            .unwrap();
        let err = y
            .iter()
            .zip(&want.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err <= 1e-6, "{ty}: max abs difference {err}");
    }
}

/// L = ½ Σ (y − target)² in f64.
fn loss(block: &Block, x: &Act, rope: &Rope, target: &[f32]) -> f64 {
    let (y, _) = block.forward(x, rope).unwrap();
    y.iter()
        .zip(target)
        .map(|(a, b)| 0.5 * ((*a as f64) - (*b as f64)).powi(2))
        .sum()
}

/// Directional central differences (L(θ + hδ) − L(θ − hδ)) / 2h against ⟨∂L/∂θ, δ⟩ for
/// every parameter tensor (one random direction each) and for the input, on random blocks
/// of three families (biases: qwen2; per-head q/k norms: qwen3). Zero points are checked on
/// the unrounded function, whose derivative the straight-through gradient is.
#[test]
fn gradients_match_finite_differences() {
    for (fam, ty) in ["llama", "qwen2", "qwen3"].iter().enumerate() {
        let cfg = tiny_config(ty);
        let layer = random_block(&cfg, 10 + fam as u64);
        let x = random_act(&cfg, 2, 7, 20 + fam as u64);
        let rope = Rope::new(&cfg, 16).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(30 + fam as u64);
        let target = rnd(x.data.len(), 1.0, &mut rng);
        let p = Params::of(&layer, &ALL);
        let mut groups: Vec<Group> = p.list.iter().map(|q| q.field.group()).collect();
        groups.dedup();
        for g in ALL {
            if g == Group::Biases && *ty != "qwen2" {
                continue;
            }
            assert!(groups.contains(&g), "{ty}: no {g:?} parameters to check");
        }
        let block = Block::with_rounding(&layer, &cfg, &p, false).unwrap();
        let (y, tape) = block.forward(&x, &rope).unwrap();
        let dy: Vec<f32> = y.iter().zip(&target).map(|(a, b)| a - b).collect();
        let mut grads = p.zeros_like();
        let dx = block.backward(&tape, &dy, &rope, &mut grads).unwrap();
        let check = |what: &str, an: f64, fd: f64| {
            // a check of a vanishing gradient would pass whatever the backward computes
            assert!(
                fd.abs() > 1e-2,
                "{ty} {what}: finite differences {fd:.3e} too small to check"
            );
            let tol = 2e-2 * an.abs().max(fd.abs()) + 1e-3;
            assert!(
                (an - fd).abs() <= tol,
                "{ty} {what}: analytic {an:.6e}, finite differences {fd:.6e}"
            );
        };
        for (i, par) in p.list.iter().enumerate() {
            let rms =
                (par.values.iter().map(|v| v * v).sum::<f32>() / par.values.len() as f32).sqrt();
            let h = 1e-2 * rms.max(0.05);
            let dir = rnd(par.values.len(), 1.0, &mut rng);
            let an: f64 = grads.list[i]
                .values
                .iter()
                .zip(&dir)
                .map(|(g, d)| *g as f64 * *d as f64)
                .sum();
            let at = |sign: f32| {
                let mut q = p.clone();
                q.list[i]
                    .values
                    .iter_mut()
                    .zip(&dir)
                    .for_each(|(v, d)| *v += sign * h * d);
                let b = Block::with_rounding(&layer, &cfg, &q, false).unwrap();
                loss(&b, &x, &rope, &target)
            };
            let fd = (at(1.0) - at(-1.0)) / (2.0 * h as f64);
            check(&format!("{} {:?}", par.owner, par.field), an, fd);
        }
        // the input
        let dir = rnd(x.data.len(), 1.0, &mut rng);
        let h = 1e-2f32;
        let an: f64 = dx
            .iter()
            .zip(&dir)
            .map(|(g, d)| *g as f64 * *d as f64)
            .sum();
        let at = |sign: f32| {
            let mut xx = x.clone();
            xx.data
                .iter_mut()
                .zip(&dir)
                .for_each(|(v, d)| *v += sign * h * d);
            loss(&block, &xx, &rope, &target)
        };
        check("input", an, (at(1.0) - at(-1.0)) / (2.0 * h as f64));
    }
}

/// Attention's adjoint on its own, at a length past one forward block (64 rows), with GQA.
#[test]
fn attention_backward_matches_finite_differences() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let (b, nh, nkv, t, hd) = (1, 4, 2, 70, 8);
    let q = rnd(b * nh * t * hd, 1.0, &mut rng);
    let k = rnd(b * nkv * t * hd, 1.0, &mut rng);
    let v = rnd(b * nkv * t * hd, 1.0, &mut rng);
    let w = rnd(b * t * nh * hd, 1.0, &mut rng);
    let f = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
        let o = crate::model::attention::causal_attention(q, k, v, b, nh, nkv, t, hd);
        o.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum()
    };
    let (dq, dk, dv) = causal_attention_backward(&q, &k, &v, &w, b, nh, nkv, t, hd);
    for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
        let dir = rnd(grad.len(), 1.0, &mut rng);
        let h = 1e-2f32;
        let shifted = |s: f32| {
            let mut a = [q.clone(), k.clone(), v.clone()];
            a[which]
                .iter_mut()
                .zip(&dir)
                .for_each(|(x, d)| *x += s * h * d);
            f(&a[0], &a[1], &a[2])
        };
        let fd = (shifted(1.0) - shifted(-1.0)) / (2.0 * h as f64);
        let an: f64 = grad
            .iter()
            .zip(&dir)
            .map(|(g, d)| *g as f64 * *d as f64)
            .sum();
        assert!(
            (an - fd).abs() <= 1e-2 * an.abs().max(fd.abs()) + 1e-3,
            "tensor {which}: analytic {an}, finite differences {fd}"
        );
    }
}
