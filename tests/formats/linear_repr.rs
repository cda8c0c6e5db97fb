//! Linears that own their representation: two test-only passes (not shipped) give one linear
//! an exact factorization (U·V at full rank) and another a 2:4 mask, a third is quantized with
//! RTN. The calibration forward, the evaluation model read back from the exported checkpoint,
//! and a naive reference forward written here (plain loops, no shared kernels) must compute the
//! same function; the engine's byte count must equal the bytes written. The second test runs
//! the same passes through a whole run (`runner::run_pipeline_with`) and `compress eval`: both
//! perplexities equal the plain-loop reference's, and report.json counts the bytes on disk.

use crate::common;
use anyhow::Result;
use compress::engine::stats::StatsRequest;
use compress::engine::{LayerCtx, Pass};
use compress::export::{Exporter, Format};
use compress::model::layer::{Factor, Mask};
use compress::model::llama::Model;
use compress::model::{Checkpoint, ModelConfig};
use ndarray::Array2;
use std::collections::BTreeMap;
use std::path::Path;

const FACTORED: (usize, &str) = (0, "mlp.up_proj");
const PRUNED: (usize, &str) = (1, "self_attn.q_proj");

/// W = U·V exactly: V = D·P (a permutation scaled by powers of two), U = W·Pᵀ·D⁻¹.
struct Factorize;
/// 2:4 along the input dimension: in every 4 consecutive inputs of a row keep the 2 largest |w|.
struct Prune24;

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The block output of the compressed layer equals that of the same function written dense.
fn check_calibration_forward(ctx: &LayerCtx, name: &str) -> Result<()> {
    let compressed = ctx.block_output(&ctx.layer)?;
    let mut dense = ctx.layer.clone();
    let w = dense.linears[name].weight().clone();
    let lin = dense.linears.get_mut(name).unwrap();
    *lin = compress::model::layer::Linear::dense(w, lin.bias.clone(), lin.dtype);
    let reference = ctx.block_output(&dense)?;
    for (a, b) in compressed.iter().zip(&reference) {
        let e = max_rel(&a.data, &b.data);
        assert!(e < 1e-5, "calibration forward differs from dense: {e}");
    }
    Ok(())
}

impl Pass for Factorize {
    fn name(&self) -> String {
        "test-factorize".into()
    }
    fn stats(&self) -> StatsRequest {
        StatsRequest {
            inputs: true,
            ..Default::default()
        }
    }
    fn apply(&self, ctx: &mut LayerCtx) -> Result<()> {
        if ctx.index() != FACTORED.0 {
            return Ok(());
        }
        let lin = ctx.layer.linears.get_mut(FACTORED.1).unwrap();
        let w = lin.weight().clone();
        let (out, k) = w.dim();
        let perm: Vec<usize> = (0..k).map(|i| (i * 37 + 11) % k).collect();
        let d = |i: usize| [0.5f32, 1.0, 2.0, 4.0][i % 4];
        // V[i, perm[i]] = d(i); U[o, i] = W[o, perm[i]] / d(i)
        let mut v = Array2::zeros((k, k));
        let mut u = Array2::zeros((out, k));
        for i in 0..k {
            v[[i, perm[i]]] = d(i);
            for o in 0..out {
                u[[o, i]] = w[[o, perm[i]]] / d(i);
            }
        }
        lin.set_factored(
            Factor {
                values: u,
                quant: None,
            },
            Factor {
                values: v,
                quant: None,
            },
        )?;
        assert_eq!(lin.weight(), &w, "the factorization is exact");
        check_calibration_forward(ctx, FACTORED.1)
    }
}

impl Pass for Prune24 {
    fn name(&self) -> String {
        "test-prune-2of4".into()
    }
    fn stats(&self) -> StatsRequest {
        StatsRequest {
            inputs: true,
            ..Default::default()
        }
    }
    fn apply(&self, ctx: &mut LayerCtx) -> Result<()> {
        if ctx.index() != PRUNED.0 {
            return Ok(());
        }
        let lin = ctx.layer.linears.get_mut(PRUNED.1).unwrap();
        let (out, k) = lin.shape();
        let w = lin.weight().as_slice().unwrap().to_vec();
        let mut keep = vec![false; out * k];
        for g in 0..out * k / 4 {
            let mut idx: Vec<usize> = (g * 4..g * 4 + 4).collect();
            idx.sort_by(|a, b| w[*b].abs().total_cmp(&w[*a].abs()).then(a.cmp(b)));
            keep[idx[0]] = true;
            keep[idx[1]] = true;
        }
        lin.set_mask(Mask::new((out, k), keep)?)?;
        check_calibration_forward(ctx, PRUNED.1)
    }
}

/// A plain-loop Llama forward (no faer, no shared kernels) over the tensors of `dir`, with
/// the given linears replaced by `overrides` ((layer, linear) → [out, in] values): logits
/// [t, vocab].
fn reference_logits(src: &Path, overrides: &[((usize, &str), Vec<f32>)], ids: &[u32]) -> Vec<f32> {
    let ck = Checkpoint::open(src).unwrap();
    let c: &ModelConfig = &ck.config;
    let (d, nh, nkv, hd, inter) = (
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.intermediate_size,
    );
    let eps = c.rms_norm_eps as f32;
    let t = ids.len();
    let get = |n: &str| ck.f32(n).unwrap();
    let norm = |x: &[f32], w: &[f32]| -> Vec<f32> {
        x.chunks(w.len())
            .flat_map(|r| {
                let ms = r.iter().map(|v| v * v).sum::<f32>() / r.len() as f32;
                let s = 1.0 / (ms + eps).sqrt();
                r.iter()
                    .zip(w)
                    .map(move |(v, g)| v * s * g)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let mm = |x: &[f32], w: &[f32], k: usize| -> Vec<f32> {
        let out = w.len() / k;
        let mut y = vec![0f32; x.len() / k * out];
        for (r, xr) in x.chunks(k).enumerate() {
            for o in 0..out {
                let mut s = 0f64;
                for j in 0..k {
                    s += xr[j] as f64 * w[o * k + j] as f64;
                }
                y[r * out + o] = s as f32;
            }
        }
        y
    };
    let inv: Vec<f64> = (0..hd / 2)
        .map(|i| 1.0 / (c.rope_theta).powf((2 * i) as f64 / hd as f64))
        .collect();
    let rope = |x: &mut [f32], heads: usize| {
        for p in 0..t {
            for h in 0..heads {
                let base = p * heads * hd + h * hd;
                for i in 0..hd / 2 {
                    let a = p as f64 * inv[i];
                    let (cs, sn) = (a.cos() as f32, a.sin() as f32);
                    let (x1, x2) = (x[base + i], x[base + i + hd / 2]);
                    x[base + i] = x1 * cs - x2 * sn;
                    x[base + i + hd / 2] = x2 * cs + x1 * sn;
                }
            }
        }
    };
    let emb = get("model.embed_tokens.weight");
    let mut x: Vec<f32> = ids
        .iter()
        .flat_map(|&i| emb[i as usize * d..(i as usize + 1) * d].to_vec())
        .collect();
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}.");
        let w = |n: &str| -> Vec<f32> {
            if let Some((_, v)) = overrides.iter().find(|(k, _)| *k == (l, n)) {
                v.clone()
            } else {
                get(&format!("{p}{n}.weight"))
            }
        };
        let h = norm(&x, &get(&format!("{p}input_layernorm.weight")));
        let mut q = mm(&h, &w("self_attn.q_proj"), d);
        let mut k = mm(&h, &w("self_attn.k_proj"), d);
        let v = mm(&h, &w("self_attn.v_proj"), d);
        rope(&mut q, nh);
        rope(&mut k, nkv);
        let mut att = vec![0f32; t * nh * hd];
        for head in 0..nh {
            let kh = head / (nh / nkv);
            for i in 0..t {
                let qi = &q[i * nh * hd + head * hd..][..hd];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let kj = &k[j * nkv * hd + kh * hd..][..hd];
                        qi.iter().zip(kj).map(|(a, b)| (a * b) as f64).sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for dd in 0..hd {
                    att[i * nh * hd + head * hd + dd] = (0..=i)
                        .map(|j| e[j] / z * v[j * nkv * hd + kh * hd + dd] as f64)
                        .sum::<f64>()
                        as f32;
                }
            }
        }
        let o = mm(&att, &w("self_attn.o_proj"), nh * hd);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let h = norm(&x, &get(&format!("{p}post_attention_layernorm.weight")));
        let g = mm(&h, &w("mlp.gate_proj"), d);
        let u = mm(&h, &w("mlp.up_proj"), d);
        let a: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        let dn = mm(&a, &w("mlp.down_proj"), inter);
        x.iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
    }
    let h = norm(&x, &get("model.norm.weight"));
    mm(&h, &get("lm_head.weight"), d)
}

#[test]
fn factored_sparse_and_quantized_linears_compute_one_function_everywhere() {
    let src = common::ref_model();
    let ckpt = Checkpoint::open(&src).unwrap();
    let tok = compress::calib::load_tokenizer(&ckpt.tokenizer_path()).unwrap();
    let text =
        compress::calib::read_text(&common::shared().join("data/calib/c4_calib.jsonl"), "text")
            .unwrap();
    let ids = compress::calib::tokenize(&tok, &text).unwrap();
    let windows = compress::calib::random_windows(&ids, 4, 64, 3).unwrap();
    let rtn: compress::passes::PassSpec = serde_json::from_value(serde_json::json!({"rtn": {
        "bits": 4, "group_size": 64, "sym": false,
        "targets": ["re:.*layers\\.2\\.mlp\\.down_proj"]}}))
    .unwrap();
    let passes: Vec<Box<dyn Pass>> =
        vec![Box::new(Factorize), Box::new(Prune24), rtn.build().unwrap()];
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut ex = Exporter::begin(Format::CompressedTensors, &out, &ckpt, 1 << 30).unwrap();
    let opts = compress::engine::StreamOptions {
        batch: 4,
        ..Default::default()
    };
    let er = compress::engine::run(&ckpt, &passes, &windows, &opts, &mut ex, None).unwrap();
    let (_, spills) = ex.finish(&ckpt).unwrap();
    compress::export::writer::remove_spills(&spills).unwrap();

    // the checkpoint holds what each representation says
    let written = Checkpoint::open(&out).unwrap();
    let fm = format!("model.layers.{}.{}", FACTORED.0, FACTORED.1);
    let pm = format!("model.layers.{}.{}", PRUNED.0, PRUNED.1);
    assert!(written.has(&format!("{fm}.weight_u")) && written.has(&format!("{fm}.weight_v")));
    assert!(!written.has(&format!("{fm}.weight")));
    assert_eq!(
        written.config.raw["low_rank"]["ranks"][&fm],
        serde_json::json!(ckpt.config.hidden_size)
    );
    assert!(written.has("model.layers.2.mlp.down_proj.weight_packed"));
    let pw = written.f32(&format!("{pm}.weight")).unwrap();
    for g in pw.chunks(4) {
        assert!(g.iter().filter(|v| **v == 0.0).count() >= 2, "2:4 pattern");
    }

    // the engine's byte count is the bytes written for the decoder linears
    let mut on_disk = 0;
    for n in written.names() {
        if n.starts_with("model.layers.") && n.contains("_proj.") && !n.ends_with(".bias") {
            let (info, _) = written.info(n).unwrap();
            on_disk += info.end - info.start;
        }
    }
    assert_eq!(er.linear_bytes, on_disk);
    let h = ckpt.config.hidden_size;
    let dense_bytes: usize = (0..ckpt.config.num_layers)
        .flat_map(|l| ckpt.config.layer_tensors(l))
        .filter(|(n, _)| n.ends_with("_proj.weight"))
        .map(|(_, s)| s.iter().product::<usize>() * 2)
        .sum();
    // the full-rank factors cost h·h more; the 4-bit down_proj costs less than bf16
    assert!(er.linear_bytes > dense_bytes - ckpt.config.intermediate_size * h);
    let mut layers_read = BTreeMap::new();
    for l in 0..3 {
        layers_read.insert(
            l,
            compress::model::layer::LayerWeights::load(&written, l).unwrap(),
        );
    }
    assert!(matches!(
        layers_read[&0].linears[FACTORED.1].repr(),
        compress::model::layer::Repr::Factored { .. }
    ));

    // evaluation of the written checkpoint = the naive reference of the same function
    let seq: Vec<u32> = ids[100..132].to_vec();
    let model = Model::load(&written, 64).unwrap();
    let got = model.logits(&seq, 1, seq.len()).unwrap();
    // the reference reads the source weights (the factored linear is exact), the pruned one as
    // written, the RTN-quantized one as dequantized by the reader
    let dq = layers_read[&2].linears["mlp.down_proj"].weight().clone();
    let plain = reference_logits(&src, &[(PRUNED, pw.clone())], &seq);
    let dq = dq.as_slice().unwrap().to_vec();
    let reference = reference_logits(&src, &[(PRUNED, pw), ((2, "mlp.down_proj"), dq)], &seq);
    assert!(
        max_rel(&plain, &reference) > 1e-4,
        "the quantized linear matters"
    );
    let e = max_rel(&got, &reference);
    assert!(e < 1e-4, "exported model vs reference: max rel error {e}");
}

/// Perplexity by the eval protocol (non-overlapping windows, every predicted token) from the
/// plain-loop reference.
fn reference_ppl(
    src: &Path,
    overrides: &[((usize, &str), Vec<f32>)],
    ids: &[u32],
    t: usize,
) -> f64 {
    let vocab = Checkpoint::open(src).unwrap().config.vocab_size;
    let (mut total, mut n) = (0f64, 0usize);
    for w in ids.chunks_exact(t) {
        let logits = reference_logits(src, overrides, w);
        for i in 0..t - 1 {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
            let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
            total += m + z.ln() - row[w[i + 1] as usize] as f64;
            n += 1;
        }
    }
    (total / n as f64).exp()
}

/// The same test-only passes through the whole run (`runner::run_pipeline_with`: calibration,
/// export, read-back evaluation, report) and `compress eval` on the written checkpoint: the
/// perplexity both measure is the plain-loop reference's, and the report counts the bytes the
/// factored, pruned and quantized linears take on disk.
#[test]
fn the_run_its_report_and_compress_eval_see_the_same_function() {
    let src = common::ref_model();
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("tiny.txt");
    let text = std::fs::read_to_string(common::shared().join("data/eval/wikitext2/wiki.test.raw"))
        .unwrap();
    std::fs::write(&data, text.chars().take(700).collect::<String>()).unwrap();
    let out = d.path().join("out");
    let p = d.path().join("p.yaml");
    std::fs::write(
        &p,
        format!(
            "model: {}\noutput: {}\n\
             calibration: {{path: {}, samples: 4, seq_len: 64, seed: 3}}\n\
             passes:\n  - rtn: {{bits: 4, group_size: 64, sym: false, targets: [\"re:.*layers\\\\.2\\\\.mlp\\\\.down_proj\"]}}\n\
             export: {{format: compressed-tensors}}\n\
             eval: {{datasets: [{}], seq_len: 32, baseline: false}}\n",
            src.display(),
            out.display(),
            common::shared().join("data/calib/c4_calib.jsonl").display(),
            data.display()
        ),
    )
    .unwrap();
    let report = compress::runner::run_pipeline_with(
        &p,
        &Default::default(),
        vec![Box::new(Factorize), Box::new(Prune24)],
    )
    .unwrap();

    // the report's byte count is what the decoder linears take on disk
    let written = Checkpoint::open(&out).unwrap();
    let mut on_disk = 0;
    for n in written.names() {
        if n.starts_with("model.layers.") && n.contains("_proj.") && !n.ends_with(".bias") {
            let (info, _) = written.info(n).unwrap();
            on_disk += info.end - info.start;
        }
    }
    assert_eq!(report.output.linear_bytes, Some(on_disk));
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(saved["output"]["linear_bytes"], serde_json::json!(on_disk));
    let fm = format!("model.layers.{}.{}", FACTORED.0, FACTORED.1);
    assert!(written.has(&format!("{fm}.weight_u")));
    let (out_f, in_f) = (
        ckpt_dim(&written, &format!("{fm}.weight_u"), 0),
        ckpt_dim(&written, &format!("{fm}.weight_v"), 1),
    );
    assert_eq!(out_f, written.config.intermediate_size);
    assert_eq!(in_f, written.config.hidden_size);

    // the reference: source weights (the factorization is exact), the 2:4 linear as written,
    // the 4-bit linear as dequantized by the reader
    let pm = format!("model.layers.{}.{}", PRUNED.0, PRUNED.1);
    let pw = written.f32(&format!("{pm}.weight")).unwrap();
    let dq = compress::model::layer::LayerWeights::load(&written, 2)
        .unwrap()
        .linears["mlp.down_proj"]
        .weight()
        .as_slice()
        .unwrap()
        .to_vec();
    let tok = compress::calib::load_tokenizer(&written.tokenizer_path()).unwrap();
    let ids = compress::calib::tokenize(&tok, &compress::calib::read_text(&data, "text").unwrap())
        .unwrap();
    assert!(ids.len() / 32 >= 3, "{} tokens", ids.len());
    let want = reference_ppl(&src, &[(PRUNED, pw), ((2, "mlp.down_proj"), dq)], &ids, 32);

    let after = report.eval["tiny.txt"].after.as_ref().unwrap();
    assert_eq!(after.windows, ids.len() / 32);
    let rel = |a: f64| (a - want).abs() / want;
    assert!(
        rel(after.perplexity) < 1e-5,
        "report: {} vs reference {want}",
        after.perplexity
    );

    let o = std::process::Command::new(common::bin())
        .args(["eval", "--quiet", "--json", "--seq-len", "32", "--model"])
        .arg(&out)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ev = v["results"]["tiny.txt"]["perplexity"].as_f64().unwrap();
    assert!(rel(ev) < 1e-5, "compress eval: {ev} vs reference {want}");
    assert_eq!(
        ev, after.perplexity,
        "compress eval and the report's read-back"
    );
}

fn ckpt_dim(ck: &Checkpoint, name: &str, i: usize) -> usize {
    ck.info(name).unwrap().0.shape[i]
}
