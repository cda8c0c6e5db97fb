//! Mixture-of-experts checkpoints (ref-qwen3moe-20m: 6 layers, 8 experts, 2 routed per token)
//! through the calibrated methods: each expert's statistics come from the tokens routed to it
//! (or every token, `calibration.experts: all`), an expert no token reaches falls back to
//! round-to-nearest with a warning naming it, routers stay dense, and a run killed inside a
//! layer resumes to the same bytes.

use crate::common;
use compress::model::Checkpoint;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn moe_model() -> PathBuf {
    common::shared().join("models/ref-qwen3moe-20m")
}

/// `dir/NAME.yaml`: the MoE model through `dir/NAME` with `samples` × `seq_len` c4 windows,
/// the calibration block's extra fields, one pass, compressed-tensors.
fn pipeline(
    dir: &Path,
    name: &str,
    samples: usize,
    seq_len: usize,
    extra: &str,
    pass: &str,
) -> PathBuf {
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &p,
        format!(
            "model: {}\noutput: {}\n\
             calibration: {{path: {}, field: text, samples: {samples}, seq_len: {seq_len}, seed: 0{extra}}}\n\
             passes:\n  - {pass}\nexport: {{format: compressed-tensors}}\n",
            moe_model().display(),
            dir.join(name).display(),
            common::shared().join("data/calib/c4_calib.jsonl").display(),
        ),
    )
    .unwrap();
    p
}

/// The `tokens` note of every record whose linear is `mlp.experts.E.gate_proj`, by (layer, E).
fn expert_tokens(r: &Value) -> Vec<(u64, usize, u64)> {
    r["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| {
            let name = l["linear"].as_str()?;
            let e = name
                .strip_prefix("mlp.experts.")?
                .strip_suffix(".gate_proj")?
                .parse()
                .ok()?;
            Some((l["layer"].as_u64()?, e, l["notes"]["tokens"].as_u64()?))
        })
        .collect()
}

#[test]
fn gptq_sees_each_experts_routed_tokens_or_all_of_them() {
    let d = tempfile::tempdir().unwrap();
    let (samples, seq) = (8, 64);
    let tokens = (samples * seq) as u64;
    let routed = common::run_json(&pipeline(
        d.path(),
        "routed",
        samples,
        seq,
        "",
        "gptq: {scheme: W4A16}",
    ));
    let all = common::run_json(&pipeline(
        d.path(),
        "all",
        samples,
        seq,
        ", experts: all",
        "gptq: {scheme: W4A16}",
    ));
    let (tr, ta) = (expert_tokens(&routed), expert_tokens(&all));
    assert_eq!(tr.len(), 6 * 8, "a record per expert per layer: {tr:?}");
    assert_eq!(ta.len(), 6 * 8);
    for l in 0..6 {
        // each token goes to two experts
        let sum: u64 = tr.iter().filter(|x| x.0 == l).map(|x| x.2).sum();
        assert_eq!(sum, 2 * tokens, "layer {l}: {tr:?}");
        assert!(ta.iter().filter(|x| x.0 == l).all(|x| x.2 == tokens));
    }
    // routing is uneven: the routed counts differ between experts
    let l0: Vec<u64> = tr.iter().filter(|x| x.0 == 0).map(|x| x.2).collect();
    assert!(l0.iter().min() < l0.iter().max(), "{l0:?}");
    // the routers are not quantized and keep their bytes; the two modes give other experts
    let src = Checkpoint::open(&moe_model()).unwrap();
    let (a, b) = (
        Checkpoint::open(&d.path().join("routed")).unwrap(),
        Checkpoint::open(&d.path().join("all")).unwrap(),
    );
    for l in 0..6 {
        let router = format!("model.layers.{l}.mlp.gate.weight");
        assert_eq!(a.raw(&router).unwrap().1, src.raw(&router).unwrap().1);
        assert!(!routed["layers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["linear"] == "mlp.gate"));
    }
    let e0 = "model.layers.0.mlp.experts.0.gate_proj.weight_packed";
    assert_ne!(a.raw(e0).unwrap().1, b.raw(e0).unwrap().1);
    assert!(
        routed["warnings"].as_array().unwrap().is_empty(),
        "{}",
        routed["warnings"]
    );
}

/// Two calibration tokens reach at most four of the eight experts of a layer: the others have
/// no statistics. They are quantized as RTN quantizes them (GPTQ with the identity Hessian),
/// and a warning names each one.
#[test]
fn an_expert_no_token_reaches_is_rounded_to_nearest_with_a_warning() {
    let d = tempfile::tempdir().unwrap();
    let r = common::run_json(&pipeline(
        d.path(),
        "gptq",
        1,
        2,
        "",
        "gptq: {scheme: W4A16}",
    ));
    common::run_json(&pipeline(d.path(), "rtn", 1, 2, "", "rtn: {scheme: W4A16}"));
    let warnings: Vec<String> = r["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().to_string())
        .collect();
    let starved: Vec<(u64, usize)> = expert_tokens(&r)
        .into_iter()
        .filter(|x| x.2 == 0)
        .map(|x| (x.0, x.1))
        .collect();
    assert!(starved.len() >= 6 * 4, "{starved:?}");
    let (g, n) = (
        Checkpoint::open(&d.path().join("gptq")).unwrap(),
        Checkpoint::open(&d.path().join("rtn")).unwrap(),
    );
    for (l, e) in starved {
        for lin in ["gate_proj", "up_proj", "down_proj"] {
            let m = format!("model.layers.{l}.mlp.experts.{e}.{lin}");
            assert!(
                warnings
                    .iter()
                    .any(|w| w.starts_with(&format!("{m}:")) && w.contains("no calibration token")),
                "no warning for {m}: {warnings:?}"
            );
            for t in ["weight_packed", "weight_scale"] {
                let k = format!("{m}.{t}");
                assert!(
                    g.raw(&k).unwrap().1 == n.raw(&k).unwrap().1,
                    "{k} is not RTN's"
                );
            }
        }
    }
}

/// SIGKILL inside layer 2 of a GPTQ run over the experts, then `--resume`: the same bytes as
/// an uninterrupted run.
#[test]
fn a_moe_run_killed_mid_layer_resumes_to_the_same_bytes() {
    let d = tempfile::tempdir().unwrap();
    let full = pipeline(d.path(), "full", 32, 256, "", "gptq: {scheme: W4A16}");
    common::run_ok(&full);
    let cut = pipeline(d.path(), "cut", 32, 256, "", "gptq: {scheme: W4A16}");
    let out = d.path().join("cut");
    common::kill_in_layer(&cut, &out, 2, std::time::Duration::from_millis(300));
    common::resume_same_bytes(&cut, &out, &d.path().join("full"));
}

/// AWQ on a mixture scales the MLP norm's mapping too: the experts' gate/up are searched and
/// quantized, and the dense router, which reads the same normed input, absorbs the scale —
/// router(norm(x)) is unchanged up to bf16 rounding (column j of the router times norm weight
/// j is the same product before and after), while the norm itself did change.
#[test]
fn awq_scales_the_experts_and_the_router_absorbs_it() {
    let d = tempfile::tempdir().unwrap();
    let r = common::run_json(&pipeline(
        d.path(),
        "awq",
        8,
        64,
        "",
        "awq: {bits: 4, group_size: 128, sym: true}\n  - rtn: {bits: 4, group_size: 128}",
    ));
    let records = r["layers"].as_array().unwrap();
    let awq = |linear: &str| {
        records
            .iter()
            .any(|x| x["layer"] == 0 && x["linear"] == linear && x["pass"] == "awq")
    };
    assert!(awq("mlp.experts.3.gate_proj") && awq("mlp.experts.3.up_proj"));
    assert!(!awq("mlp.gate"), "the router is compensated, not quantized");
    let src = Checkpoint::open(&moe_model()).unwrap();
    let out = Checkpoint::open(&d.path().join("awq")).unwrap();
    let hidden = src.config.hidden_size;
    let mut moved = 0f64;
    for l in 0..src.config.num_layers {
        let norm = format!("model.layers.{l}.post_attention_layernorm.weight");
        let router = format!("model.layers.{l}.mlp.gate.weight");
        let (n0, n1) = (src.f32(&norm).unwrap(), out.f32(&norm).unwrap());
        let (r0, r1) = (src.f32(&router).unwrap(), out.f32(&router).unwrap());
        for (i, (a, b)) in r0.iter().zip(&r1).enumerate() {
            let j = i % hidden;
            let (before, after) = ((a * n0[j]) as f64, (b * n1[j]) as f64);
            // two bf16 roundings (norm and router) of a product: 2^-8 relative each
            assert!(
                (after - before).abs() <= 1e-2 * before.abs() + 1e-6,
                "layer {l} router[{i}]: {before} vs {after}"
            );
        }
        moved += n0
            .iter()
            .zip(&n1)
            .map(|(a, b)| ((a - b) / a).abs() as f64)
            .sum::<f64>()
            / hidden as f64;
    }
    assert!(moved > 1e-3, "the MLP norm was scaled ({moved})");
}

/// A copy of transformers fixture `name` (vocabulary 128) in `dir/name` with a tokenizer of
/// its own: one token per ASCII character (id = code), anything else `<unk>` (id 0), so that
/// calibration text can run through it.
fn fixture_with_tokenizer(dir: &Path, name: &str) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/transformers")
        .join(name);
    let m = dir.join(name);
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), m.join(f)).unwrap();
    }
    let mut vocab = serde_json::Map::new();
    vocab.insert("<unk>".into(), 0.into());
    for c in 1u8..128 {
        vocab.insert((c as char).to_string(), (c as u64).into());
    }
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 0, "content": "<unk>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated",
                          "invert": false},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    std::fs::write(m.join("tokenizer.json"), tok.to_string()).unwrap();
    m
}

/// Mixtral (`block_sparse_moe`, experts w1/w3/w2) and Qwen2-MoE (a shared expert behind a
/// sigmoid gate) through every calibrated method: each run succeeds, the routers and the shared
/// expert's gate stay dense, every expert linear and the shared expert are compressed, GPTQ
/// records each routed expert's tokens (top-2: they sum to twice the calibration tokens), and
/// the written checkpoint loads and runs.
#[test]
fn mixtral_and_qwen2_moe_through_every_calibrated_method() {
    let d = tempfile::tempdir().unwrap();
    let data = common::shared().join("data/calib/c4_calib.jsonl");
    for name in ["mixtral", "qwen2-moe"] {
        let model = fixture_with_tokenizer(d.path(), name);
        let ckpt = Checkpoint::open(&model).unwrap();
        let block = ckpt.config.block();
        let (samples, seq) = (4, 32);
        for (tag, passes) in [
            ("gptq", "  - gptq: {bits: 4, group_size: 32}\n"),
            ("awq", "  - awq: {bits: 4, group_size: 32, sym: true}\n  - rtn: {bits: 4, group_size: 32}\n"),
            ("sparsegpt", "  - sparsegpt: {sparsity: 0.5}\n"),
            ("wanda", "  - wanda: {sparsity: 0.5}\n"),
            ("svd_llm", "  - svd_llm: {ratio: 0.2}\n"),
        ] {
            let out = d.path().join(format!("{name}-{tag}"));
            let p = d.path().join(format!("{name}-{tag}.yaml"));
            std::fs::write(
                &p,
                format!(
                    "model: {}\noutput: {}\n\
                     calibration: {{path: {}, field: text, samples: {samples}, seq_len: {seq}, seed: 0}}\n\
                     passes:\n{passes}export: {{format: compressed-tensors}}\n",
                    model.display(),
                    out.display(),
                    data.display()
                ),
            )
            .unwrap();
            let r = common::run_json(&p);
            let records = r["layers"].as_array().unwrap();
            let touched = |linear: &str| {
                records
                    .iter()
                    .any(|l| l["linear"] == linear && l["pass"] != "awq")
            };
            for l in &block.linears {
                assert_eq!(
                    touched(l.name),
                    !l.router,
                    "{name} {tag}: {} (router: {})",
                    l.name,
                    l.router
                );
            }
            if tag == "gptq" {
                let tokens: u64 = records
                    .iter()
                    .filter(|l| {
                        l["layer"] == 0
                            && block
                                .linear(l["linear"].as_str().unwrap())
                                .is_some_and(|x| {
                                    block.site(x.site).expert.is_some()
                                        && Some(x.name)
                                            == block.site(x.site).expert.map(|e| {
                                                match &block.mlp.ffn {
                                                    compress::model::arch::Ffn::Moe {
                                                        experts,
                                                        ..
                                                    } => experts[e].gate,
                                                    _ => unreachable!(),
                                                }
                                            })
                                })
                    })
                    .map(|l| l["notes"]["tokens"].as_u64().unwrap())
                    .sum();
                assert_eq!(tokens, 2 * (samples * seq) as u64, "{name}: tokens per expert");
            }
            // the written checkpoint loads and predicts
            let q = Checkpoint::open(&out).unwrap();
            let ids: Vec<u32> = (0..32).map(|i| (i * 37 % 128) as u32).collect();
            let logits = compress::model::llama::Model::load(&q, 32)
                .unwrap()
                .logits(&ids, 1, 32)
                .unwrap();
            assert!(logits.iter().all(|x| x.is_finite()), "{name} {tag}");
        }
    }
}

/// A calibration overflow inside one expert is attributed to the windows whose tokens the router
/// sent there. Layer 0's expert E (the one the fewest windows reach) gets up_proj weights of
/// 3e38, so every token routed to it turns infinite at its down_proj input while the MLP's input
/// stays finite. The rows there are the routed tokens, which do not say their window: the
/// engine runs each window alone to find them. Expected: the windows whose single-window
/// forward of the unchanged layer 0 routes a token to E (seen from the rows its input site gets).
#[test]
fn a_nonfinite_expert_drops_exactly_the_windows_routed_to_it() {
    use compress::model::layer::LayerWeights;
    use compress::model::llama::{DecoderLayer, Model, Rope};
    const SAMPLES: usize = 24;
    const SEQ: usize = 8;
    let d = tempfile::tempdir().unwrap();
    let calib = common::shared().join("data/calib/c4_calib.jsonl");
    let tok = compress::calib::load_tokenizer(&moe_model().join("tokenizer.json")).unwrap();
    let text = compress::calib::read_text(&calib, "text").unwrap();
    let tokens = compress::calib::tokenize(&tok, &text).unwrap();
    let windows = compress::calib::random_windows(&tokens, SAMPLES, SEQ, 0).unwrap();
    let src = Checkpoint::open(&moe_model()).unwrap();
    let cfg = &src.config;
    let model = Model::load(&src, SEQ).unwrap();
    let w0 = LayerWeights::load(&src, 0).unwrap();
    let layer = DecoderLayer::new(&w0, cfg);
    let rope = Rope::new(cfg, SEQ).unwrap();
    let block = cfg.block();
    // reached[w][e]: window w routes a token to expert e in layer 0
    let reached: Vec<Vec<bool>> = windows
        .iter()
        .map(|w| {
            let x = model.outer.embed(w, 1, SEQ).unwrap();
            let mut hit = vec![false; 8];
            let mut hook = |site, _: &[f32], rows: usize, _d: usize| {
                if let Some(e) = block.site(site).expert {
                    hit[e] |= rows > 0;
                }
                Ok(())
            };
            layer.forward(&x, &rope, &mut hook).unwrap();
            hit
        })
        .collect();
    let (e, n) = (0..8)
        .map(|e| (e, reached.iter().filter(|r| r[e]).count()))
        .filter(|(_, n)| *n > 0 && *n < SAMPLES)
        .min_by_key(|(_, n)| *n)
        .expect("an expert some windows reach and others do not");
    let expected: Vec<usize> = (0..SAMPLES).filter(|&w| reached[w][e]).collect();
    assert_eq!(expected.len(), n);
    // the poisoned copy
    let m = d.path().join("model");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        if moe_model().join(f).exists() {
            std::fs::copy(moe_model().join(f), m.join(f)).unwrap();
        }
    }
    let mut bytes = std::fs::read(moe_model().join("model.safetensors")).unwrap();
    let name = format!("model.layers.0.mlp.experts.{e}.up_proj.weight");
    let (t, _) =
        compress::safetensors_file::parse_header(&bytes, Path::new("model.safetensors")).unwrap();
    let info = &t[&name];
    let n_el = (info.end - info.start) / 2;
    let big = compress::safetensors_file::from_f32(info.dtype, &vec![3e38f32; n_el]);
    bytes[info.start..info.end].copy_from_slice(&big);
    std::fs::write(m.join("model.safetensors"), bytes).unwrap();
    let p = |policy: &str| {
        let p = d.path().join(format!("p{}.yaml", policy.len()));
        std::fs::write(
            &p,
            format!(
                "model: {}\noutput: {}\ncalibration: {{path: {}, field: text, samples: {SAMPLES}, seq_len: {SEQ}, seed: 0{policy}}}\n\
                 passes:\n  - gptq: {{scheme: W4A16}}\nexport: {{format: compressed-tensors}}\n",
                m.display(),
                d.path().join("out").display(),
                calib.display()
            ),
        )
        .unwrap();
        p
    };
    // `error`: one line naming the expert's down_proj, the routed rows and the windows
    let o = std::process::Command::new(common::bin())
        .arg(p(""))
        .arg("--quiet")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    for want in [format!("mlp.experts.{e}.down_proj"), "routed".to_string()] {
        assert!(err.contains(&want), "stderr lacks `{want}`: {err}");
    }
    // the windows named are those of the batch where it failed: the expected ones up to there
    let named: Vec<usize> = err
        .split("window(s) ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap_or_default()
        .split(", ")
        .filter_map(|w| w.trim().parse().ok())
        .collect();
    let last = *named.last().expect("windows named");
    let want: Vec<usize> = expected.iter().copied().filter(|w| *w <= last).collect();
    assert_eq!(named, want, "{err}");
    // `drop_sample`: exactly those windows are left out
    let r = common::run_json(&p(", on_nonfinite: drop_sample"));
    let dropped: Vec<usize> = r["dropped_calibration_samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(dropped, expected, "expert {e}");
}
