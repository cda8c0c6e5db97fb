//! Our RTN quantizer + compressed-tensors packer against checkpoints written by llm-compressor /
//! compressed-tensors themselves (../shared/golden/compressed_tensors): every tensor of every
//! decoder-layer linear must match in name, dtype, shape and bytes.

use compress::formats::compressed_tensors::{
    compressed_tensors_tensors, read_compressed_tensors_quantized,
};
use compress::formats::dequantized;
use compress::model::arch::LLAMA;
use compress::quant::{quantize_rtn, Observer, QuantArgs, Strategy};
use compress::safetensors_file::{to_f32, DType, SafetensorsFile};
use ndarray::ArrayView2;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

/// The weight scheme of a golden folder, from its config.json `quantization_config`.
fn scheme(dir: &Path) -> QuantArgs {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let qc = &cfg["quantization_config"];
    assert_eq!(qc["format"], "pack-quantized");
    let groups = qc["config_groups"].as_object().unwrap();
    assert_eq!(groups.len(), 1);
    let w = &groups.values().next().unwrap()["weights"];
    assert_eq!(w["type"], "int");
    assert_eq!(w["observer"], "memoryless_minmax");
    assert!(w["actorder"].is_null());
    let strategy = match w["strategy"].as_str().unwrap() {
        "group" => Strategy::Group,
        "channel" => Strategy::Channel,
        "tensor" => Strategy::Tensor,
        s => panic!("unexpected strategy {s}"),
    };
    QuantArgs::int(
        w["num_bits"].as_u64().unwrap() as u32,
        w["symmetric"].as_bool().unwrap(),
        strategy,
        w["group_size"].as_u64().unwrap_or(0) as usize,
        Observer::MinMax,
    )
}

fn check_folder(name: &str, expect: (u32, bool, Strategy, usize)) {
    let dir = shared().join("golden/compressed_tensors").join(name);
    let args = scheme(&dir);
    assert_eq!(
        (args.bits, args.symmetric, args.strategy, args.group_size),
        expect,
        "{name}: scheme in config.json changed"
    );
    let golden = SafetensorsFile::open(&dir.join("model.safetensors")).unwrap();
    let model =
        SafetensorsFile::open(&shared().join("models/ref-llama-9m/model.safetensors")).unwrap();
    let n_layers = (0..)
        .take_while(|l| {
            model
                .tensors
                .contains_key(&format!("model.layers.{l}.self_attn.q_proj.weight"))
        })
        .count();
    assert!(n_layers > 0);

    let mut failures = Vec::new();
    let mut n_tensors = 0;
    for l in 0..n_layers {
        for lin in LLAMA.linear_names() {
            let prefix = format!("model.layers.{l}.{lin}");
            let info = &model.tensors[&format!("{prefix}.weight")];
            assert_eq!(info.dtype, DType::BF16);
            let w = to_f32(info.dtype, model.bytes(info)).unwrap();
            let view = ArrayView2::from_shape((info.shape[0], info.shape[1]), &w).unwrap();
            let q = quantize_rtn(view, &args, DType::BF16).unwrap();
            let ours = compressed_tensors_tensors(&prefix, &q).unwrap();

            // Same set of tensor names for this module.
            let gold_names: BTreeSet<String> = golden
                .tensors
                .keys()
                .filter(|k| k.starts_with(&format!("{prefix}.")))
                .cloned()
                .collect();
            let our_names: BTreeSet<String> = ours.iter().map(|t| t.0.clone()).collect();
            assert_eq!(our_names, gold_names, "{name}: tensor names of {prefix}");

            for (tname, dtype, shape, bytes) in &ours {
                n_tensors += 1;
                let g = &golden.tensors[tname];
                assert_eq!(*dtype, g.dtype, "{name}: dtype of {tname}");
                assert_eq!(*shape, g.shape, "{name}: shape of {tname}");
                let gb = golden.bytes(g);
                if bytes.as_slice() != gb {
                    let es = dtype.size();
                    let bad = bytes
                        .chunks(es)
                        .zip(gb.chunks(es))
                        .filter(|(a, b)| a != b)
                        .count();
                    failures.push(format!(
                        "{tname}: {bad} of {} elements differ",
                        bytes.len() / es
                    ));
                }
            }

            // Read-back through the golden tensors gives our dequantized weights.
            let get = |n: &str| -> anyhow::Result<(DType, Vec<usize>, Vec<u8>)> {
                let t = golden
                    .tensors
                    .get(n)
                    .ok_or_else(|| anyhow::anyhow!("missing {n}"))?;
                Ok((t.dtype, t.shape.clone(), golden.bytes(t).to_vec()))
            };
            let dense = dequantized(read_compressed_tensors_quantized(
                &get,
                &prefix,
                args.bits,
                args.group_size,
                args.symmetric,
            ))
            .unwrap();
            let ours_dense = q.dequantize();
            assert_eq!(
                dense.as_slice(),
                ours_dense.as_slice().unwrap(),
                "{name}: read-back of {prefix}"
            );
        }
    }
    assert!(n_tensors > 0);
    assert!(
        failures.is_empty(),
        "{name}: {} of {n_tensors} tensors differ from the golden checkpoint:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn rtn_w4g128_symmetric_matches_compressed_tensors() {
    check_folder("ref-llama-9m-rtn-w4g128", (4, true, Strategy::Group, 128));
}

#[test]
fn rtn_w4g128_asymmetric_matches_compressed_tensors() {
    check_folder(
        "ref-llama-9m-rtn-w4g128-asym",
        (4, false, Strategy::Group, 128),
    );
}

/// llm-compressor 0.14's W8A16 preset is 8-bit symmetric *group 128* (not per channel):
/// the golden config.json says so and the scales are [out, in/128].
#[test]
fn rtn_w8_symmetric_matches_compressed_tensors() {
    check_folder("ref-llama-9m-rtn-w8ch", (8, true, Strategy::Group, 128));
}

/// W8A8 (llm-compressor's `W8A8` preset, RTN): our pipeline writes the golden checkpoint
/// tensor for tensor and byte for byte, its `quantization_config` key for key, and reading it
/// back puts the per-token int8 activation quantizer on every quantized linear.
#[test]
fn rtn_w8a8_pipeline_writes_the_golden_checkpoint() {
    let gold_dir = shared().join("golden/compressed_tensors/ref-llama-9m-rtn-w8a8");
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("w8a8");
    let p = d.path().join("p.yaml");
    std::fs::write(
        &p,
        format!(
            "model: {}\noutput: {}\npasses:\n  - rtn: {{bits: 8, strategy: channel, act_bits: 8}}\nexport: {{format: compressed-tensors}}\n",
            shared().join("models/ref-llama-9m").display(),
            out.display()
        ),
    )
    .unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_compress"))
        .arg(&p)
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours = SafetensorsFile::open(&out.join("model.safetensors")).unwrap();
    let gold = SafetensorsFile::open(&gold_dir.join("model.safetensors")).unwrap();
    let on: BTreeSet<&String> = ours.tensors.keys().collect();
    let gn: BTreeSet<&String> = gold.tensors.keys().collect();
    assert_eq!(on, gn, "tensor names");
    for (n, g) in &gold.tensors {
        let t = &ours.tensors[n];
        assert_eq!((t.dtype, &t.shape), (g.dtype, &g.shape), "{n}");
        assert!(ours.bytes(t) == gold.bytes(g), "{n}: bytes differ");
    }
    let cfg = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap()
    };
    assert_eq!(
        cfg(&out)["quantization_config"],
        cfg(&gold_dir)["quantization_config"]
    );
    let ck = compress::model::Checkpoint::open(&out).unwrap();
    let lw = compress::model::layer::LayerWeights::load(&ck, 0).unwrap();
    for lin in LLAMA.linear_names() {
        assert_eq!(
            lw.linears[lin].act_quant().and_then(|a| a.per_token_bits()),
            Some(8),
            "{lin}"
        );
    }
}

/// The FP8 number format against compressed-tensors' own FP8_DYNAMIC checkpoint: its
/// `F8_E4M3` tensors read through the safetensors layer, and every code re-derived from the
/// reference model's bf16 weights as compressed-tensors computes it — per output channel
/// scale = bf16(max|w| / 448), code = E4M3(bf16(w / scale)), round to nearest even — byte for
/// byte, scales included. (The float schemes themselves are issue #39; this pins the number
/// format they will use.)
#[test]
fn fp8_e4m3_codes_match_compressed_tensors() {
    use compress::number::FloatFormat;
    let dir = shared().join("golden/compressed_tensors/ref-llama-9m-rtn-fp8-dynamic");
    let golden = SafetensorsFile::open(&dir.join("model.safetensors")).unwrap();
    let model =
        SafetensorsFile::open(&shared().join("models/ref-llama-9m/model.safetensors")).unwrap();
    let bf16 = |x: f32| half::bf16::from_f32(x).to_f32();
    let e4m3 = FloatFormat::E4M3;
    let (mut n, mut bad_codes, mut bad_scales) = (0usize, Vec::new(), Vec::new());
    for l in 0.. {
        let q = format!("model.layers.{l}.self_attn.q_proj.weight");
        if !model.tensors.contains_key(&q) {
            break;
        }
        for lin in LLAMA.linear_names() {
            let prefix = format!("model.layers.{l}.{lin}");
            let info = &model.tensors[&format!("{prefix}.weight")];
            let (rows, cols) = (info.shape[0], info.shape[1]);
            let w = to_f32(info.dtype, model.bytes(info)).unwrap();
            let gw = &golden.tensors[&format!("{prefix}.weight")];
            let gs = &golden.tensors[&format!("{prefix}.weight_scale")];
            assert_eq!(gw.dtype, DType::F8E4M3, "{prefix}.weight");
            assert_eq!(gw.dtype.name(), "F8_E4M3");
            assert_eq!(gw.shape, vec![rows, cols]);
            assert_eq!((gs.dtype, gs.shape.clone()), (DType::BF16, vec![rows, 1]));
            let codes = golden.bytes(gw);
            let scales = to_f32(DType::BF16, golden.bytes(gs)).unwrap();
            // the safetensors layer decodes the codes as the format does
            let decoded = to_f32(DType::F8E4M3, codes).unwrap();
            for (c, v) in codes.iter().zip(&decoded) {
                assert_eq!(v.to_bits(), e4m3.decode(*c).to_bits());
            }
            for r in 0..rows {
                let row = &w[r * cols..(r + 1) * cols];
                let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                let s = bf16(amax / 448.0);
                if s.to_bits() != scales[r].to_bits() {
                    bad_scales.push(format!("{prefix} row {r}: {s} vs {}", scales[r]));
                }
                for (c, x) in row.iter().enumerate() {
                    n += 1;
                    let ours = e4m3.encode(bf16(x / scales[r]));
                    if ours != codes[r * cols + c] {
                        bad_codes.push(format!(
                            "{prefix}[{r},{c}]: {x} / {} → {ours:#04x}, golden {:#04x}",
                            scales[r],
                            codes[r * cols + c]
                        ));
                    }
                }
            }
        }
    }
    assert!(n > 1_000_000, "{n} weights");
    assert!(
        bad_scales.is_empty(),
        "{} scales differ: {:?}",
        bad_scales.len(),
        &bad_scales[..bad_scales.len().min(5)]
    );
    assert!(
        bad_codes.is_empty(),
        "{} of {n} codes differ: {:?}",
        bad_codes.len(),
        &bad_codes[..bad_codes.len().min(5)]
    );
}

/// The float schemes read back: each golden checkpoint of llm-compressor, read through our
/// compressed-tensors float reader with the arguments of its own config.json, dequantizes to
/// exactly what our quantizer computes from the reference model (codes, scales and NVFP4's
/// fused global scale alike); our writer's tensors read back to the same linear.
#[test]
fn float_goldens_read_back_to_our_quantizer() {
    use compress::formats::compressed_tensors::float::{float_tensors, read_float};
    use compress::formats::compressed_tensors::read_float_weights;
    let model =
        SafetensorsFile::open(&shared().join("models/ref-llama-9m/model.safetensors")).unwrap();
    for name in ["fp8-dynamic", "fp8-block", "nvfp4a16", "mxfp4a16"] {
        let dir = shared().join(format!("golden/compressed_tensors/ref-llama-9m-rtn-{name}"));
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let args = read_float_weights(&cfg["quantization_config"], "", &dir).unwrap();
        let golden = SafetensorsFile::open(&dir.join("model.safetensors")).unwrap();
        let get = |st: &SafetensorsFile, n: &str| -> anyhow::Result<(DType, Vec<usize>, Vec<u8>)> {
            let t = st
                .tensors
                .get(n)
                .ok_or_else(|| anyhow::anyhow!("missing {n}"))?;
            Ok((t.dtype, t.shape.clone(), st.bytes(t).to_vec()))
        };
        for l in [0, 1] {
            // the global scale is shared by the linears reading one input
            let site_global = |lins: &[&str]| {
                let a = lins
                    .iter()
                    .map(|lin| {
                        let info = &model.tensors[&format!("model.layers.{l}.{lin}.weight")];
                        let w = to_f32(info.dtype, model.bytes(info)).unwrap();
                        compress::quant::float::amax(w)
                    })
                    .fold(0f32, f32::max);
                compress::quant::float::global_scale(a, DType::BF16)
            };
            for lin in LLAMA.linear_names() {
                let prefix = format!("model.layers.{l}.{lin}");
                let info = &model.tensors[&format!("{prefix}.weight")];
                let w = to_f32(info.dtype, model.bytes(info)).unwrap();
                let view = ArrayView2::from_shape((info.shape[0], info.shape[1]), &w).unwrap();
                let fused: &[&str] = if lin.ends_with("o_proj") || lin.ends_with("down_proj") {
                    &[lin]
                } else if lin.contains("attn") {
                    &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
                } else {
                    &["mlp.gate_proj", "mlp.up_proj"]
                };
                let global = args.global_scale.then(|| site_global(fused));
                let ours =
                    compress::quant::float::quantize(view, &args, DType::BF16, global).unwrap();
                let theirs = read_float(&|n| get(&golden, n), &prefix, &args).unwrap();
                assert_eq!(theirs.global_scale, ours.global_scale, "{name}: {prefix}");
                assert_eq!(
                    theirs.dequantize().as_slice().unwrap(),
                    ours.dequantize().as_slice().unwrap(),
                    "{name}: read-back of {prefix}"
                );
                // our writer → our reader
                let written = float_tensors(&prefix, &ours).unwrap();
                let back = read_float(
                    &|n| {
                        written
                            .iter()
                            .find(|t| t.0 == n)
                            .map(|t| (t.1, t.2.clone(), t.3.clone()))
                            .ok_or_else(|| anyhow::anyhow!("missing {n}"))
                    },
                    &prefix,
                    &args,
                )
                .unwrap();
                assert_eq!(back.codes, ours.codes, "{name}: {prefix} codes");
                assert_eq!(back.scales, ours.scales, "{name}: {prefix} scales");
            }
        }
    }
}

/// FP8_DYNAMIC end to end: the pipeline's report and `compress eval` of its output agree to the
/// last digit (the reader applies the per-token FP8 input quantizer the config declares), and
/// `--no-act-quant` — the weight-only figure — differs from it.
#[test]
fn fp8_dynamic_evaluates_the_same_read_back_with_its_activation_quantizer() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("fp8");
    let wiki = d.path().join("wiki.txt");
    let text = std::fs::read_to_string(shared().join("data/eval/wikitext2/wiki.test.raw")).unwrap();
    std::fs::write(&wiki, text.chars().take(30_000).collect::<String>()).unwrap();
    let p = d.path().join("p.yaml");
    std::fs::write(
        &p,
        format!(
            "model: {}\noutput: {}\npasses:\n  - rtn: {{scheme: FP8_DYNAMIC}}\nexport: {{format: compressed-tensors}}\neval: {{datasets: [{}], seq_len: 256}}\n",
            shared().join("models/ref-llama-9m").display(),
            out.display(),
            wiki.display()
        ),
    )
    .unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_compress"))
        .arg(&p)
        .args(["--quiet", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let after = r["eval"]["wiki.txt"]["after"]["perplexity"]
        .as_f64()
        .unwrap();
    let eval = |extra: &[&str]| -> f64 {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_compress"))
            .args(["eval", "--model"])
            .arg(&out)
            .arg("--data")
            .arg(&wiki)
            .args(["--seq-len", "256", "--quiet", "--json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["results"]["wiki.txt"]["perplexity"].as_f64().unwrap()
    };
    assert_eq!(eval(&[]), after);
    let weight_only = eval(&["--no-act-quant"]);
    assert_ne!(weight_only, after);
    assert!(
        (weight_only / after - 1.0).abs() < 0.01,
        "{weight_only} vs {after}"
    );
}
