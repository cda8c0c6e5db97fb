//! The forward pass of every supported architecture variant against transformers' own float32
//! outputs on tiny random checkpoints (tests/fixtures/transformers, made by its gen.py):
//! qwen2 (q/k/v biases, head_dim from hidden/heads), qwen3 (per-head q/k RMSNorm before RoPE,
//! head_dim × heads ≠ hidden), mistral, Llama-3 and linear RoPE scaling, tied embeddings, and
//! the mixtures of experts qwen3_moe, mixtral and qwen2_moe (a shared expert).
//! Every hidden state and the logits must agree to 1e-4 of the largest reference magnitude.

use crate::common;
use compress::model::llama::Model;
use compress::model::Checkpoint;
use compress::safetensors_file::{to_f32, to_i64, SafetensorsFile};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/transformers")
        .join(name)
}

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y).abs() as f64) / scale)
        .fold(0.0, f64::max)
}

fn check(name: &str) {
    let dir = fixture(name);
    let g = SafetensorsFile::open(&dir.join("golden.safetensors")).unwrap();
    let get = |k: &str| {
        let t = &g.tensors[k];
        (t.shape.clone(), t)
    };
    let (ishape, it) = get("input_ids");
    let ids: Vec<u32> = to_i64(it.dtype, g.bytes(it))
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    let (b, t) = (ishape[0], ishape[1]);
    let (_, lt) = get("logits");
    let gold_logits = to_f32(lt.dtype, g.bytes(lt)).unwrap();
    let (hshape, ht) = get("hidden_states");
    let gold_hidden = to_f32(ht.dtype, g.bytes(ht)).unwrap();

    let ckpt = Checkpoint::open(&dir).unwrap();
    ckpt.validate_dense().unwrap();
    let n = ckpt.config.num_layers;
    let h = ckpt.config.hidden_size;
    assert_eq!(hshape, vec![n + 1, b, t, h]);
    let model = Model::load(&ckpt, t).unwrap();
    let mut x = model.outer.embed(&ids, b, t).unwrap();
    for l in 0..=n {
        // transformers' last hidden state is after the final norm
        let got = if l == n {
            model.outer.final_norm(&x)
        } else {
            x.data.clone()
        };
        let e = max_rel(&got, &gold_hidden[l * b * t * h..(l + 1) * b * t * h]);
        assert!(
            e <= 1e-4,
            "{name}: hidden state {l}: max relative error {e:e}"
        );
        if l < n {
            x = model.forward_layer(l, &x).unwrap();
        }
    }
    let logits = model.logits(&ids, b, t).unwrap();
    let e = max_rel(&logits, &gold_logits);
    eprintln!("{name}: logits max relative error {e:e}");
    assert!(e <= 1e-4, "{name}: logits: max relative error {e:e}");
}

#[test]
fn qwen2_biases() {
    check("qwen2");
}

#[test]
fn qwen3_qk_norm() {
    check("qwen3");
}

/// Qwen3-MoE: the router's softmax and top-2 of 4 experts with renormalised weights, each
/// expert on the rows routed to it, summed in expert order as transformers does.
#[test]
fn qwen3_moe_router_and_experts() {
    check("qwen3-moe");
}

/// Mixtral: `block_sparse_moe`, experts w1 (gate) / w3 (up) / w2 (down), always renormalised.
#[test]
fn mixtral_block_sparse_moe() {
    check("mixtral");
}

/// Qwen2-MoE: top-2 of 4 experts with the softmax weights as they are (`norm_topk_prob`
/// false), plus the shared expert every token runs through, scaled by sigmoid of its gate.
#[test]
fn qwen2_moe_shared_expert() {
    check("qwen2-moe");
}

#[test]
fn mistral() {
    check("mistral");
}

#[test]
fn llama3_rope_scaling() {
    check("llama3-rope");
}

#[test]
fn linear_rope_scaling() {
    check("llama-linear-rope");
}

#[test]
fn tied_embeddings() {
    check("llama-tied");
}

/// RTN W8 g32 through the compressed-tensors exporter and back: the written checkpoint keeps
/// the architecture's extra tensors (biases, q/k norms), loads, and predicts like the dense one.
fn quantized_roundtrip(name: &str) {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    common::run_rtn(d.path(), &fixture(name), &out, "bits: 8, group_size: 32");
    let dense = Checkpoint::open(&fixture(name)).unwrap();
    let q = Checkpoint::open(&out).unwrap();
    let block = dense.config.block();
    // a decoder linear that `targets: Linear` quantizes (routers and gates stay dense)
    let packed = |n: &str| {
        let module = n
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(_, r)| r.strip_suffix(".weight"));
        module
            .and_then(|m| block.linear(m))
            .is_some_and(|l| !l.router)
    };
    for n in dense.names() {
        if !packed(n) {
            assert!(
                q.has(n),
                "{name}: {n} missing from the quantized checkpoint"
            );
        } else {
            let base = n.trim_end_matches(".weight");
            assert!(
                q.has(&format!("{base}.weight_packed")),
                "{name}: {base} not packed"
            );
        }
    }
    let ids: Vec<u32> = (0..48).map(|i| (i * 37 % 128) as u32).collect();
    let a = Model::load(&dense, 24)
        .unwrap()
        .logits(&ids, 2, 24)
        .unwrap();
    let b = Model::load(&q, 24).unwrap().logits(&ids, 2, 24).unwrap();
    // per token: W8 moves every logit row a little; in a mixture a token whose router saw
    // two experts nearly tied may switch expert, which moves its row more (one such token of
    // 48 in `mixtral`), so a mixture may have up to two rows beyond the bound
    let vocab = dense.config.vocab_size;
    let per: Vec<f64> = b
        .chunks(vocab)
        .zip(a.chunks(vocab))
        .map(|(y, x)| max_rel(y, x))
        .collect();
    let far = per.iter().filter(|e| **e >= 0.05).count();
    let allowed = if dense.config.moe.is_some() { 2 } else { 0 };
    let e = per.iter().fold(0f64, |m, e| m.max(*e));
    eprintln!("{name}: W8 logits max relative change {e:e}, {far} rows beyond 5%");
    assert!(
        e > 0.0 && far <= allowed && e < 0.5,
        "{name}: W8 logits changed by {e:e}, {far} rows beyond 5%"
    );
}

#[test]
fn quantized_roundtrip_every_variant() {
    for name in [
        "qwen2",
        "qwen3",
        "mistral",
        "llama3-rope",
        "llama-linear-rope",
        "llama-tied",
        "qwen3-moe",
        "mixtral",
        "qwen2-moe",
    ] {
        quantized_roundtrip(name);
    }
}
