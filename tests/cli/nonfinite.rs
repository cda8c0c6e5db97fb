//! Calibration activations that overflow to NaN/Inf inside the model are detected at the
//! linear input where they appear, and handled as `calibration.on_nonfinite` says: `error`
//! stops the run naming layer, input and calibration window; `drop_sample` leaves exactly the
//! affected windows out and finishes, recording them in the report.
//!
//! The model is the reference checkpoint with one planted overflow: a "spike" token whose
//! embedding points along a few dimensions D, and layer 0's query/key row 0 of head 0 reading
//! c·Σ_{i∈D} x_i. The attention score of that token with itself, c²·S_T²/√d, overflows f32 to
//! +Inf (then Inf − Inf = NaN in the softmax) while every ordinary token's score stays finite,
//! so only the calibration windows that contain the spike token go non-finite. A run with
//! dropped windows, killed and resumed, writes the same bytes.

use crate::common;
use compress::safetensors_file::{from_f32, parse_header, to_f32, DType};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const HIDDEN: usize = 256;
const SAMPLES: usize = 64;
const SEQ: usize = 128;

struct Planted {
    model: PathBuf,
    spike: u32,
}

fn tensor(bytes: &[u8], name: &str) -> (usize, usize, Vec<f32>) {
    let (t, _) = parse_header(bytes, Path::new("model.safetensors")).unwrap();
    let i = &t[name];
    assert_eq!(i.dtype, DType::BF16);
    (
        i.start,
        i.end,
        to_f32(i.dtype, &bytes[i.start..i.end]).unwrap(),
    )
}

fn put(bytes: &mut [u8], at: (usize, usize), v: &[f32]) {
    let b = from_f32(DType::BF16, v);
    assert_eq!(b.len(), at.1 - at.0);
    bytes[at.0..at.1].copy_from_slice(&b);
}

fn bf16(x: f32) -> f32 {
    to_f32(DType::BF16, &from_f32(DType::BF16, &[x])).unwrap()[0]
}

/// The calibration windows the pipeline below draws (same file, tokenizer, count, seed).
fn windows() -> Vec<Vec<u32>> {
    let tok = compress::calib::load_tokenizer(&common::ref_model().join("tokenizer.json")).unwrap();
    let text = compress::calib::read_text(&calib_file(), "text").unwrap();
    let tokens = compress::calib::tokenize(&tok, &text).unwrap();
    compress::calib::random_windows(&tokens, SAMPLES, SEQ, 0).unwrap()
}

fn calib_file() -> PathBuf {
    common::shared().join("data/calib/c4_calib.jsonl")
}

fn plant(dir: &Path, w: &[Vec<u32>]) -> Planted {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(common::ref_model().join(f), m.join(f)).unwrap();
    }
    let mut bytes = std::fs::read(common::ref_model().join("model.safetensors")).unwrap();
    // The spike: a token in some windows but not most.
    let spike = (0u32..8192)
        .find(|&t| {
            let n = w.iter().filter(|x| x.contains(&t)).count();
            (4..=16).contains(&n)
        })
        .expect("a token in 4..=16 of the windows");
    let (es, ee, mut emb) = tensor(&bytes, "model.embed_tokens.weight");
    let (ls, le, mut ln) = tensor(&bytes, "model.layers.0.input_layernorm.weight");
    // S_j = Σ_{i∈D} x_i of token j after RMSNorm (with unit norm weights on D). Choose D (a
    // block of k dims) with the widest gap between the spike's S_T = 16·√k and the largest
    // |S_j| of every other token.
    let (mut best, mut best_ratio) = (0..4, 0.0);
    for k in [4, 8, 16, 32, 64] {
        for s0 in (0..HIDDEN).step_by(k) {
            let d = s0..s0 + k;
            let smax = (0..8192)
                .filter(|&t| t != spike as usize)
                .map(|t| {
                    let r = &emb[t * HIDDEN..(t + 1) * HIDDEN];
                    let ms = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / HIDDEN as f64;
                    (d.clone().map(|i| r[i] as f64).sum::<f64>() / (ms + 1e-5).sqrt()).abs()
                })
                .fold(0.0, f64::max);
            let ratio = 16.0 * (k as f64).sqrt() / smax;
            if ratio > best_ratio {
                (best, best_ratio) = (d, ratio);
            }
        }
    }
    // Overflow needs c²S_T² > 8·MAX whether the 1/√64 scale comes before or after the dot
    // product; safety needs c²S_max² < MAX. Both hold when S_T/S_max > √8 (with margin).
    assert!(
        best_ratio > 3.3,
        "no direction separates the spike well enough: {best_ratio}"
    );
    let k = best.len();
    let (st, smax) = (
        16.0 * (k as f64).sqrt(),
        16.0 * (k as f64).sqrt() / best_ratio,
    );
    let c2 = f32::MAX as f64 * 8f64.sqrt() / (st * smax);
    let c = bf16(c2.sqrt() as f32);
    let row = &mut emb[spike as usize * HIDDEN..(spike as usize + 1) * HIDDEN];
    row.iter_mut().for_each(|v| *v = 0.0);
    best.clone().for_each(|i| row[i] = 1.0);
    best.clone().for_each(|i| ln[i] = 1.0);
    put(&mut bytes, (es, ee), &emb);
    put(&mut bytes, (ls, le), &ln);
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
    ] {
        let (s, e, mut w) = tensor(&bytes, name);
        w[..HIDDEN].iter_mut().for_each(|v| *v = 0.0);
        best.clone().for_each(|i| w[i] = c);
        put(&mut bytes, (s, e), &w);
    }
    std::fs::write(m.join("model.safetensors"), bytes).unwrap();
    Planted { model: m, spike }
}

fn pipeline(dir: &Path, model: &Path, policy: &str) -> PathBuf {
    pipeline_to(dir, model, policy, "out")
}

fn pipeline_to(dir: &Path, model: &Path, policy: &str, out: &str) -> PathBuf {
    let p = dir.join(format!("{out}{policy}.yaml"));
    std::fs::write(
        &p,
        format!(
            "model: {}\noutput: {}\ncalibration: {{path: {}, samples: {SAMPLES}, seq_len: {SEQ}, seed: 0, batch: 4{policy}}}\n\
             passes:\n  - gptq: {{bits: 4, group_size: 128}}\nexport: {{format: compressed-tensors}}\n",
            model.display(),
            dir.join(out).display(),
            calib_file().display(),
        ),
    )
    .unwrap();
    p
}

#[test]
fn nonfinite_activations_refused_or_dropped_as_the_pipeline_says() {
    let d = tempfile::tempdir().unwrap();
    let w = windows();
    let planted = plant(d.path(), &w);
    let expected: Vec<usize> = (0..w.len())
        .filter(|&i| w[i].contains(&planted.spike))
        .collect();

    // Default policy (`error`): exit 2, one line naming layer 0, the o_proj input (where the
    // attention output turns NaN) and the windows; nothing left behind.
    let o = Command::new(common::bin())
        .arg(pipeline(d.path(), &planted.model, ""))
        .arg("--quiet")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for n in ["layer 0", "self_attn.o_proj", "not finite", "on_nonfinite"] {
        assert!(err.contains(n), "stderr lacks `{n}`: {err}");
    }
    assert!(!d.path().join("out").exists() && !d.path().join(".out.partial").exists());

    // `drop_sample`: the run completes without exactly the windows that hold the spike token.
    let p = pipeline(d.path(), &planted.model, ", on_nonfinite: drop_sample");
    let o = Command::new(common::bin())
        .arg(&p)
        .args(["--quiet", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("out/report.json")).unwrap()).unwrap();
    let dropped: Vec<usize> = r["dropped_calibration_samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(dropped, expected);
    let warnings: Vec<&str> = r["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        warnings.iter().any(|w| w.contains("layer 0")
            && w.contains(&format!(
                "left out {} calibration sample(s)",
                expected.len()
            ))
            && w.contains(&format!("{} remain", SAMPLES - expected.len()))),
        "{warnings:?}"
    );
    // The compressed model holds only finite weights and every linear was quantized.
    let sites: BTreeSet<&str> = r["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["linear"].as_str().unwrap())
        .collect();
    assert_eq!(sites.len(), 7, "{sites:?}");
    let md = std::fs::read_to_string(d.path().join("out/report.md")).unwrap();
    assert!(md.contains("Calibration windows left out"), "{md}");

    // Killed after layers with dropped windows and resumed: the same bytes and the same
    // dropped list (the resume state carries the reduced calibration set).
    let p = pipeline_to(
        d.path(),
        &planted.model,
        ", on_nonfinite: drop_sample",
        "resumed",
    );
    let state = d.path().join(".resumed.partial/.resume/state.json");
    let mut child = Command::new(common::bin())
        .arg(&p)
        .arg("--quiet")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    loop {
        let n = std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["next_layer"].as_u64())
            .unwrap_or(0);
        if n >= 2 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let o = Command::new(common::bin())
        .arg(&p)
        .arg("--resume")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("resuming at layer"), "{log}");
    let a = d.path().join("out");
    let b = d.path().join("resumed");
    assert!(
        std::fs::read(a.join("model.safetensors")).unwrap()
            == std::fs::read(b.join("model.safetensors")).unwrap()
    );
    let r2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        r2["dropped_calibration_samples"],
        r["dropped_calibration_samples"]
    );
}
