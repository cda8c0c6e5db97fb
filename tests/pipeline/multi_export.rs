//! `export: [...]`: one run (one calibration, one pass of every layer) writes several artifacts —
//! the first at `output`, each further one in its own subfolder — and each is byte for byte
//! the file a run with that export alone writes, read back and evaluated on its own, listed in
//! `checksums.sha256` and checked by `compress verify`. A kill during the layers or during the
//! further artifacts' evaluation resumes to the same bytes and numbers.

use crate::common;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn wiki_head(dir: &Path) -> PathBuf {
    common::wiki_head(dir, "wiki-head.txt", 20_000)
}

/// `dir/NAME.yaml`: the reference model, 8 × 128 calibration windows, `passes` (YAML list
/// items), `export` (the YAML value of `export:`), perplexity on the wikitext2 head.
fn pipeline(dir: &Path, name: &str, passes: &[&str], export: &str) -> PathBuf {
    let p = dir.join(format!("{name}.yaml"));
    let passes: String = passes.iter().map(|s| format!("  - {s}\n")).collect();
    std::fs::write(
        &p,
        format!(
            "model: {}\noutput: {}\n\
             calibration: {{path: {}, samples: 8, seq_len: 128, seed: 0}}\n\
             passes:\n{passes}export: {export}\n\
             eval: {{datasets: [{}], seq_len: 128, baseline: false}}\n",
            common::ref_model().display(),
            dir.join(name).display(),
            common::shared().join("data/calib/c4_calib.jsonl").display(),
            dir.join("wiki-head.txt").display(),
        ),
    )
    .unwrap();
    p
}

fn report(out: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap()
}

fn ppl(eval: &Value) -> f64 {
    eval["wiki-head.txt"]["after"]["perplexity"]
        .as_f64()
        .unwrap_or_else(|| panic!("no perplexity in {eval}"))
}

fn same_file(a: &Path, b: &Path) {
    assert!(
        std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
        "{} differs from {}",
        a.display(),
        b.display()
    );
}

fn verify(out: &Path) -> std::process::Output {
    Command::new(common::bin())
        .arg("verify")
        .arg(out)
        .output()
        .unwrap()
}

const GPTQ: &str = "gptq: {bits: 4, group_size: 64}";
const LIST: &str = "[{format: compressed-tensors}, {format: gptq}, {format: dense, dir: bf16}]";

#[test]
fn each_artifact_of_a_list_is_what_its_own_run_writes() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    wiki_head(dir);
    common::run_ok(&pipeline(dir, "many", &[GPTQ], LIST));
    let many = dir.join("many");
    let r = report(&many);
    let also = r["output"]["also"].as_array().expect("output.also");
    assert_eq!(also.len(), 2, "{also:?}");
    for (i, (export, sub, files)) in [
        ("{format: compressed-tensors}", "", "model.safetensors"),
        ("{format: gptq}", "gptq", "model.safetensors"),
        ("{format: dense}", "bf16", "model.safetensors"),
    ]
    .into_iter()
    .enumerate()
    {
        let one = format!("one{i}");
        common::run_ok(&pipeline(dir, &one, &[GPTQ], export));
        let art = if sub.is_empty() {
            many.clone()
        } else {
            many.join(sub)
        };
        for f in [files, "config.json", "tokenizer.json"] {
            same_file(&art.join(f), &dir.join(&one).join(f));
        }
        // its perplexity is that of its own run, read back from its own folder
        let want = ppl(&report(&dir.join(&one))["eval"]);
        let got = if sub.is_empty() {
            ppl(&r["eval"])
        } else {
            assert_eq!(also[i - 1]["dir"], sub);
            let files: Vec<&str> = also[i - 1]["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap())
                .collect();
            assert!(
                files.contains(&format!("{sub}/model.safetensors").as_str()),
                "{files:?}"
            );
            ppl(&also[i - 1]["eval"])
        };
        assert_eq!(got, want, "{export}: perplexity of the listed artifact");
    }
    // the bf16 dense artifact is not the packed one: their perplexities differ only by the
    // bf16 rounding of the dequantized weights, and the sizes as the formats say
    assert!(also[1]["size_bytes"].as_u64().unwrap() > r["output"]["size_bytes"].as_u64().unwrap());
    let md = std::fs::read_to_string(many.join("report.md")).unwrap();
    assert!(md.contains("## Further exports"), "{md}");
    assert!(md.contains("`gptq/`") && md.contains("`bf16/`"), "{md}");

    // every file of every artifact is in checksums.sha256, and verify checks them all
    let sums = std::fs::read_to_string(many.join("checksums.sha256")).unwrap();
    for f in [
        "gptq/model.safetensors",
        "bf16/config.json",
        "model.safetensors",
    ] {
        assert!(
            sums.contains(&format!("  {f}\n")),
            "{f} not listed:\n{sums}"
        );
    }
    let o = verify(&many);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p = many.join("gptq/model.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    let n = b.len();
    b[n - 3] ^= 0x40;
    std::fs::write(&p, b).unwrap();
    let o = verify(&many);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("gptq/model.safetensors"), "{err}");
}

#[test]
fn one_imatrix_run_writes_several_gguf_types() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    wiki_head(dir);
    let list = "[{format: gguf, gguf_type: q4_k_m}, {format: gguf, gguf_type: q4_0}]";
    common::run_ok(&pipeline(dir, "many", &["imatrix: {}"], list));
    let r = report(&dir.join("many"));
    assert_eq!(r["output"]["also"][0]["dir"], "gguf-q4_0");
    for (i, (t, art)) in [("q4_k_m", ""), ("q4_0", "gguf-q4_0")]
        .into_iter()
        .enumerate()
    {
        let one = format!("one{i}");
        let export = format!("{{format: gguf, gguf_type: {t}}}");
        common::run_ok(&pipeline(dir, &one, &["imatrix: {}"], &export));
        same_file(
            &dir.join("many").join(art).join("model.gguf"),
            &dir.join(&one).join("model.gguf"),
        );
        let want = ppl(&report(&dir.join(&one))["eval"]);
        let got = if art.is_empty() {
            ppl(&r["eval"])
        } else {
            ppl(&r["output"]["also"][0]["eval"])
        };
        assert_eq!(got, want, "{t}");
    }
    assert!(verify(&dir.join("many")).status.success());
}

/// Where a killed run stood: its resume state's next layer, or how many perplexities of the
/// written artifacts its evaluation cache holds (`after` = at `output`, `after <dir>` = the
/// further ones).
fn stood(out: &Path) -> (Option<u64>, usize, usize) {
    let w = out
        .with_file_name(format!(
            ".{}.partial",
            out.file_name().unwrap().to_string_lossy()
        ))
        .join(".resume");
    let st: Value = std::fs::read(w.join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let ev: Value = std::fs::read(w.join("eval.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let keys: Vec<String> = ev["entries"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let next = st["exported"]
        .is_null()
        .then(|| st["next_layer"].as_u64())
        .flatten();
    (
        next,
        keys.iter().filter(|k| k.starts_with("ppl/after/")).count(),
        keys.iter().filter(|k| k.starts_with("ppl/after ")).count(),
    )
}

/// Start `p`, SIGKILL it as soon as `at` holds of where it stands.
fn kill_when(p: &Path, out: &Path, at: impl Fn((Option<u64>, usize, usize)) -> bool) {
    let mut child = Command::new(common::bin())
        .arg(p)
        .args(["--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !at(stood(out)) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run finished before the kill point"
        );
        assert!(t0.elapsed() < Duration::from_secs(300));
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.exists(), "killed run published its output");
}

#[test]
fn kills_during_layers_and_further_evaluation_resume_to_the_same_artifacts() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    wiki_head(dir);
    // two data sets, so a kill can land between the further artifact's two evaluations
    let second = dir.join("wiki-head-2.txt");
    std::fs::copy(dir.join("wiki-head.txt"), &second).unwrap();
    let with_two = |name: &str| {
        let p = pipeline(dir, name, &[GPTQ], LIST);
        let t = std::fs::read_to_string(&p).unwrap().replace(
            "wiki-head.txt]",
            &format!("wiki-head.txt, {}]", second.display()),
        );
        std::fs::write(&p, t).unwrap();
        p
    };
    common::run_ok(&with_two("full"));
    let full = report(&dir.join("full"));
    for (name, at) in [
        (
            "in-layers",
            Box::new(|s: (Option<u64>, usize, usize)| s.0.is_some_and(|n| (2..6).contains(&n)))
                as Box<dyn Fn((Option<u64>, usize, usize)) -> bool>,
        ),
        ("in-further-eval", Box::new(|s| s.2 == 1)),
    ] {
        let p = with_two(name);
        let out = dir.join(name);
        kill_when(&p, &out, at);
        let o = Command::new(common::bin())
            .arg(&p)
            .args(["--quiet", "--resume"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for f in [
            "model.safetensors",
            "gptq/model.safetensors",
            "gptq/quantize_config.json",
            "bf16/model.safetensors",
        ] {
            same_file(&dir.join("full").join(f), &out.join(f));
        }
        let r = report(&out);
        assert_eq!(r["eval"], full["eval"], "{name}");
        for i in 0..2 {
            assert_eq!(
                r["output"]["also"][i]["eval"], full["output"]["also"][i]["eval"],
                "{name}: further export {i}"
            );
        }
        assert!(verify(&out).status.success(), "{name}");
    }
}

#[test]
fn export_lists_are_checked_before_any_work() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    wiki_head(dir);
    for (export, passes, want) in [
        ("[]", vec![GPTQ], "export: []"),
        (
            "[{format: gptq}, {format: dense}, {format: dense}]",
            vec![GPTQ],
            "two exports would write to `dense`",
        ),
        ("[{format: gptq, dir: x}]", vec![GPTQ], "export.dir"),
        (
            "[{format: gptq}, {format: dense, dir: ../up}]",
            vec![GPTQ],
            "not a plain folder name",
        ),
        (
            "[{format: gptq}, {format: dense, dir: adapter}]",
            vec![GPTQ],
            "compensation adapter",
        ),
        (
            "[{format: gptq}, {format: gguf}]",
            vec![GPTQ],
            "export[1].gguf_type",
        ),
        (
            "[{format: gptq}, {format: dense, colour: red}]",
            vec![GPTQ],
            "unknown field `colour`",
        ),
        (
            "[{format: gguf, gguf_type: q4_k_m}, {format: gguf, gguf_type: q4_0}]",
            vec!["gptq_ggml: {}"],
            "sweeps onto one GGUF mix",
        ),
    ] {
        let p = pipeline(dir, "bad", &passes, export);
        let o = Command::new(common::bin())
            .arg(&p)
            .arg("--quiet")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{export}: accepted");
        assert!(err.contains(want), "{export}: `{want}` not in: {err}");
        assert!(err.contains("bad.yaml"), "{export}: file not named: {err}");
        if export.contains("colour") || export == "[]" {
            assert!(err.contains("at line 6"), "{export}: no line: {err}");
        }
        assert!(!dir.join("bad").exists(), "{export}: output written");
    }
}
