//! The block descriptions (`model::arch`) against real checkpoints: every tensor a fixture
//! written by transformers holds for a decoder layer is one the table names, with the table's
//! shape; and the producer → consumer mappings scale folding relies on.

mod common;
use compress::model::arch::{Producer, Site};
use compress::model::{Checkpoint, ModelConfig};
use std::path::Path;

fn fixtures() -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = [
        "llama-tied",
        "llama3-rope",
        "llama-linear-rope",
        "mistral",
        "qwen2",
        "qwen3",
    ]
    .iter()
    .map(|n| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/transformers")
            .join(n)
    })
    .collect();
    v.push(common::ref_model());
    v
}

#[test]
fn table_names_every_layer_tensor_with_its_shape() {
    for dir in fixtures() {
        let ckpt = Checkpoint::open(&dir).unwrap();
        let cfg = &ckpt.config;
        for l in 0..cfg.num_layers {
            let mut want: Vec<(String, Vec<usize>)> = cfg.layer_tensors(l);
            want.sort();
            let prefix = format!("model.layers.{l}.");
            let mut got: Vec<(String, Vec<usize>)> = ckpt
                .names()
                .filter(|n| n.starts_with(&prefix))
                .map(|n| (n.clone(), ckpt.info(n).unwrap().0.shape.clone()))
                .collect();
            got.sort();
            assert_eq!(got, want, "{} layer {l}", dir.display());
        }
    }
}

#[test]
fn mappings_say_where_scales_fold() {
    let ckpt = Checkpoint::open(&common::ref_model()).unwrap();
    let cfg = &ckpt.config;
    let m = cfg.block().mappings(cfg);
    let find = |s: Site| m.iter().find(|x| x.site == s).unwrap();
    let a = find(Site::AttnIn);
    assert_eq!(a.producer, Producer::Norm("input_layernorm"));
    assert_eq!(
        a.consumers,
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    );
    assert!(a.foldable);
    let o = find(Site::OIn);
    assert_eq!(o.producer, Producer::Linear("self_attn.v_proj"));
    assert_eq!(o.consumers, ["self_attn.o_proj"]);
    // GQA: v_proj has fewer outputs than o_proj has inputs
    assert!(cfg.num_kv_heads < cfg.num_heads);
    assert!(!o.foldable);
    let g = find(Site::MlpIn);
    assert_eq!(g.producer, Producer::Norm("post_attention_layernorm"));
    assert_eq!(g.consumers, ["mlp.gate_proj", "mlp.up_proj"]);
    let d = find(Site::DownIn);
    assert_eq!(d.producer, Producer::Linear("mlp.up_proj"));
    assert_eq!(d.consumers, ["mlp.down_proj"]);
    assert!(d.foldable);

    // without grouped-query attention v → o folds
    let mut raw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(common::ref_model().join("config.json")).unwrap())
            .unwrap();
    raw["num_key_value_heads"] = raw["num_attention_heads"].clone();
    let mha = ModelConfig::from_value(raw, Path::new("config.json")).unwrap();
    let m = mha.block().mappings(&mha);
    assert!(m.iter().all(|x| x.foldable), "{m:?}");
}
