//! The block descriptions (`model::arch`) against real checkpoints: every tensor a fixture
//! written by transformers holds for a decoder layer is one the table names, with the table's
//! shape; and the producer → consumer mappings scale folding relies on.

use crate::common;
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
        "qwen3-moe",
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
    let a = find(cfg.block().attention.input);
    assert_eq!(a.producer, Producer::Norm("input_layernorm"));
    assert_eq!(
        a.consumers,
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    );
    assert!(a.foldable);
    let o = find(cfg.block().attention.o_in);
    assert_eq!(o.producer, Producer::Linear("self_attn.v_proj"));
    assert_eq!(o.consumers, ["self_attn.o_proj"]);
    // GQA: v_proj has fewer outputs than o_proj has inputs
    assert!(cfg.num_kv_heads < cfg.num_heads);
    assert!(!o.foldable);
    let g = find(cfg.block().mlp.input);
    assert_eq!(g.producer, Producer::Norm("post_attention_layernorm"));
    assert_eq!(g.consumers, ["mlp.gate_proj", "mlp.up_proj"]);
    let d = find(cfg.block().dense_mlp().unwrap().down_in);
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

/// Every site of every family's table agrees with its readers and its parts: the width is each
/// reader's input dimension, a part's input site is the output of the part's norm, and each
/// linear the parts name is a linear of the table reading a site inside that part.
#[test]
fn sites_and_parts_agree_with_the_linears() {
    use compress::model::arch::{Ffn, Parent, Part, LLAMA, QWEN3};
    for dir in fixtures() {
        let ckpt = Checkpoint::open(&dir).unwrap();
        let cfg = &ckpt.config;
        let block = cfg.block();
        for s in &block.sites {
            let readers: Vec<&str> = block.readers(s.site).collect();
            assert!(
                !readers.is_empty(),
                "{}: site {} has no reader",
                dir.display(),
                s.name
            );
            for r in &readers {
                let l = block.linear(r).unwrap();
                assert_eq!(cfg.dim(l.inp), cfg.dim(s.width), "{}: {r}", dir.display());
            }
            if let Parent::Linear(p) = s.parent {
                assert_eq!(readers, [p], "a linear parent is the site's one reader");
            }
        }
        let a = &block.attention;
        let mlp: Vec<&str> = match &block.mlp.ffn {
            Ffn::Dense(m) => vec![m.gate, m.up, m.down],
            Ffn::Moe {
                router,
                experts,
                shared,
            } => std::iter::once(*router)
                .chain(
                    shared
                        .iter()
                        .flat_map(|s| [s.swiglu.gate, s.swiglu.up, s.swiglu.down, s.gate]),
                )
                .chain(experts.iter().flat_map(|e| [e.gate, e.up, e.down]))
                .collect(),
        };
        assert_eq!(
            mlp.len() + 4,
            block.linears.len(),
            "{}: the parts name every linear",
            dir.display()
        );
        for (part, norm, names) in [
            (Part::Attention, a.norm, vec![a.q, a.k, a.v, a.o]),
            (Part::Mlp, block.mlp.norm, mlp),
        ] {
            let input = block.part_input(part);
            assert_eq!(block.site(input).producer, Producer::Norm(norm));
            for n in names {
                let site = block
                    .site_of(n)
                    .unwrap_or_else(|| panic!("{n} not in the table"));
                assert_eq!(block.site(site).part, part, "{n}");
            }
        }
        assert_eq!(
            block.attention.qk_norm.is_some(),
            block.norms.iter().any(|(n, _)| n.ends_with("q_norm")),
            "{}",
            dir.display()
        );
    }
    // qwen3 is llama's table plus the q/k norms
    assert_eq!(LLAMA.linears.len(), QWEN3.linears.len());
    assert!(LLAMA.attention.qk_norm.is_none() && QWEN3.attention.qk_norm.is_some());
}

/// A mixture's table from its config.json: the router (dense by default) and, per expert, a
/// site of its own for gate/up (the rows routed to it) and one for down; sites in forward
/// order; the MLP's norm maps onto the router and every expert's gate/up at once.
#[test]
fn a_mixture_of_experts_block_is_built_from_its_config() {
    use compress::model::arch::{Dim, Ffn};
    let ckpt = Checkpoint::open(&common::shared().join("models/ref-qwen3moe-20m")).unwrap();
    let cfg = &ckpt.config;
    let block = cfg.block();
    let moe = cfg.moe.unwrap();
    assert_eq!((moe.experts, moe.top_k, moe.intermediate), (8, 2, 384));
    assert!(moe.norm_topk_prob && block.is_moe());
    let Ffn::Moe {
        router,
        experts,
        shared: None,
    } = &block.mlp.ffn
    else {
        panic!("not a mixture without a shared expert")
    };
    assert_eq!(experts.len(), 8);
    let r = block.linear(router).unwrap();
    assert!(r.router && r.site == block.mlp.input && r.out == Dim::Experts);
    assert_eq!(block.linears.len(), 4 + 1 + 8 * 3);
    assert_eq!(block.sites.len(), 3 + 8 * 2);
    for (i, s) in block.sites.iter().enumerate() {
        assert_eq!(s.site.0 as usize, i, "sites are indexed in forward order");
    }
    for (e, x) in experts.iter().enumerate() {
        assert_eq!(block.site(x.input).expert, Some(e));
        assert_eq!(block.site(x.down_in).expert, Some(e));
        assert!(x.input > block.mlp.input && x.down_in > x.input);
        assert_eq!(cfg.dim(block.linear(x.down).unwrap().inp), 384);
        assert_eq!(block.readers(x.input).collect::<Vec<_>>(), [x.gate, x.up]);
    }
    let maps = block.mappings(cfg);
    let norm = maps.iter().find(|m| m.site == block.mlp.input).unwrap();
    assert_eq!(norm.consumers.len(), 1 + 2 * 8);
    assert_eq!(
        maps.iter()
            .filter(|m| m.producer == Producer::Norm("post_attention_layernorm"))
            .count(),
        1
    );
    // a config the tables cannot express is refused by name
    let mut raw = cfg.raw.clone();
    raw["mlp_only_layers"] = serde_json::json!([0]);
    let e = ModelConfig::from_value(raw, Path::new("config.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("mlp_only_layers"), "{e}");
}

/// The two other mixtures from their transformers fixtures: Mixtral names its mixture
/// `block_sparse_moe` and an expert's linears w1 (gate) / w3 (up) / w2 (down), with experts
/// `intermediate_size` wide; Qwen2-MoE adds a shared expert on the MLP's input (every row, a
/// site of its own for its down_proj, before the routed experts) and its one-logit gate, both
/// consumers of the MLP norm's mapping, the gate dense like the router.
#[test]
fn mixtral_and_qwen2_moe_tables() {
    use compress::model::arch::{Dim, Ffn};
    let fixture = |n: &str| {
        Checkpoint::open(
            &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/transformers")
                .join(n),
        )
        .unwrap()
    };
    let m = fixture("mixtral");
    let block = m.config.block();
    let Ffn::Moe {
        router,
        experts,
        shared: None,
    } = &block.mlp.ffn
    else {
        panic!("mixtral: not a mixture without a shared expert")
    };
    assert_eq!(*router, "block_sparse_moe.gate");
    let e1 = experts[1];
    assert_eq!(
        (e1.gate, e1.up, e1.down),
        (
            "block_sparse_moe.experts.1.w1",
            "block_sparse_moe.experts.1.w3",
            "block_sparse_moe.experts.1.w2"
        )
    );
    let moe = m.config.moe.unwrap();
    assert_eq!((moe.experts, moe.top_k, moe.intermediate), (4, 2, 32));
    assert!(moe.norm_topk_prob && moe.shared.is_none());

    let q = fixture("qwen2-moe");
    let cfg = &q.config;
    let block = cfg.block();
    let Ffn::Moe {
        router,
        experts,
        shared: Some(sh),
    } = &block.mlp.ffn
    else {
        panic!("qwen2_moe: no shared expert")
    };
    let moe = cfg.moe.unwrap();
    assert!(!moe.norm_topk_prob && moe.shared == Some(64) && cfg.attention_bias);
    assert_eq!(sh.swiglu.input, block.mlp.input);
    assert_eq!(block.site(sh.swiglu.down_in).expert, None);
    assert!(
        sh.swiglu.down_in < experts[0].input,
        "the shared expert runs first"
    );
    let g = block.linear(sh.gate).unwrap();
    assert!(g.router && g.out == Dim::One && g.site == block.mlp.input);
    assert_eq!(cfg.dim(block.linear(sh.swiglu.down).unwrap().inp), 64);
    assert_eq!(block.linears.len(), 4 + 1 + 4 + 4 * 3);
    let maps = block.mappings(cfg);
    let norm = maps.iter().find(|m| m.site == block.mlp.input).unwrap();
    assert_eq!(norm.consumers.len(), 1 + 3 + 2 * 4);
    assert!(norm.consumers.contains(router) && norm.consumers.contains(&sh.gate));
    // every site's kept state inside the mixture is the MLP's normed input
    assert_eq!(block.kept_width(sh.swiglu.down_in), Dim::Hidden);
}
