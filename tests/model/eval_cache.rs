//! The baseline once (issue #21): the input model's scores come from the eval cache on the
//! second run of a pipeline over the same checkpoint and data; a tampered, truncated or foreign
//! entry is recomputed, never trusted; a changed data file misses.

use crate::common;
use common::{bin, ref_model, shared};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Run {
    report: Value,
    stderr: String,
}

fn run(pipeline: &Path, extra: &[&str]) -> Run {
    let o = Command::new(bin())
        .arg(pipeline)
        .args(["--json", "--overwrite"])
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{stderr}");
    Run {
        report: serde_json::from_slice(&o.stdout).unwrap(),
        stderr,
    }
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn before(r: &Run) -> Value {
    r.report["eval"]["wiki.txt"]["before"].clone()
}

#[test]
fn baseline_cache_miss_hit_tamper_and_data_change() {
    let d = tempfile::tempdir().unwrap();
    // a short excerpt: 4 windows of 64 tokens or so
    let text = std::fs::read_to_string(shared().join("data/eval/wikitext2/wiki.test.raw")).unwrap();
    let cut = text.char_indices().nth(1500).map(|(i, _)| i).unwrap();
    let data = d.path().join("wiki.txt");
    std::fs::write(&data, &text[..cut]).unwrap();
    let cache = d.path().join("cache");
    let p = d.path().join("p.yaml");
    std::fs::write(
        &p,
        format!(
            "model: {}\noutput: {}\npasses:\n  - rtn: {{bits: 4, group_size: 128}}\nexport: {{format: compressed-tensors}}\neval: {{datasets: [{}], seq_len: 64, tasks: [piqa], limit: 4, tasks_dir: {}, cache: {}}}\n",
            ref_model().display(),
            d.path().join("out").display(),
            data.display(),
            shared().join("data/eval/tasks").display(),
            cache.display()
        ),
    )
    .unwrap();

    // 1. miss: computed and stored (one entry for the data set, one for the task)
    let r1 = run(&p, &[]);
    let b = &r1.report["baseline"];
    assert_eq!(b["source"], "computed", "{b}");
    assert_eq!(b["cache_dir"], cache.display().to_string());
    assert_eq!(b["items"]["wiki.txt"]["source"], "computed");
    assert_eq!(b["items"]["piqa"]["source"], "computed");
    assert!(
        r1.stderr.contains("before wiki.txt: perplexity"),
        "{}",
        r1.stderr
    );
    assert!(!r1.stderr.contains("from the eval cache"));
    let e = entries(&cache);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(before(&r1)["perplexity"].as_f64().unwrap() > 1.0);

    // 2. hit: the input model is not evaluated (the log says where each score came from and
    // the evaluation's own log line is absent); the scores are the same bits
    let r2 = run(&p, &[]);
    let b = &r2.report["baseline"];
    assert_eq!(b["source"], "cache", "{b}");
    let ppl_entry = PathBuf::from(b["items"]["wiki.txt"]["entry"].as_str().unwrap());
    assert!(e.contains(&ppl_entry));
    assert!(r2.stderr.contains("before wiki.txt: perplexity"));
    assert!(r2.stderr.contains("(from the eval cache)"), "{}", r2.stderr);
    let evaluated = |r: &Run| {
        r.stderr
            .lines()
            .any(|l| l.contains("before wiki.txt: perplexity") && l.ends_with("windows)"))
    };
    assert!(evaluated(&r1), "{}", r1.stderr);
    assert!(!evaluated(&r2), "{}", r2.stderr);
    assert!(!r2.stderr.contains("not trusted"));
    assert_eq!(before(&r2), before(&r1));
    assert_eq!(
        r2.report["tasks"]["piqa"]["before"],
        r1.report["tasks"]["piqa"]["before"]
    );
    // the output is evaluated in every run
    assert_eq!(
        r2.report["eval"]["wiki.txt"]["after"],
        r1.report["eval"]["wiki.txt"]["after"]
    );
    let md = std::fs::read_to_string(d.path().join("out/report.md")).unwrap();
    assert!(md.contains("read from the eval cache"), "{md}");

    // 3. tampered: a changed score inside the entry no longer matches its checksum
    let good = std::fs::read_to_string(&ppl_entry).unwrap();
    let ppl = before(&r1)["perplexity"].as_f64().unwrap();
    let tampered = good.replace(&format!("{ppl}"), "1.5");
    assert_ne!(tampered, good, "the perplexity is spelled out in the entry");
    std::fs::write(&ppl_entry, &tampered).unwrap();
    let r3 = run(&p, &[]);
    assert!(r3.stderr.contains("is not trusted"), "{}", r3.stderr);
    assert_eq!(
        r3.report["baseline"]["items"]["wiki.txt"]["source"],
        "computed"
    );
    assert_eq!(r3.report["baseline"]["items"]["piqa"]["source"], "cache");
    assert_eq!(r3.report["baseline"]["source"], "mixed");
    assert_eq!(before(&r3), before(&r1));
    // ... and replaced by a valid entry
    let rewritten: Value = serde_json::from_slice(&std::fs::read(&ppl_entry).unwrap()).unwrap();
    let content: Value = serde_json::from_str(rewritten["content"].as_str().unwrap()).unwrap();
    assert_eq!(content["result"], before(&r1));
    let r3b = run(&p, &[]);
    assert_eq!(r3b.report["baseline"]["source"], "cache");

    // 4. truncated, and foreign (the task's entry copied over the data set's)
    std::fs::write(&ppl_entry, &good[..good.len() / 2]).unwrap();
    let r4 = run(&p, &[]);
    assert!(
        r4.stderr.contains("corrupted or truncated"),
        "{}",
        r4.stderr
    );
    assert_eq!(before(&r4), before(&r1));
    let task_entry = r1.report["baseline"]["items"]["piqa"]["entry"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::copy(&task_entry, &ppl_entry).unwrap();
    let r5 = run(&p, &[]);
    assert!(r5.stderr.contains("foreign"), "{}", r5.stderr);
    assert_eq!(
        r5.report["baseline"]["items"]["wiki.txt"]["source"],
        "computed"
    );
    assert_eq!(before(&r5), before(&r1));

    // 5. a changed data file is another key: computed, a third entry
    std::fs::write(&data, format!("{}\n more text", &text[..cut])).unwrap();
    let r6 = run(&p, &[]);
    assert_eq!(
        r6.report["baseline"]["items"]["wiki.txt"]["source"],
        "computed"
    );
    assert_eq!(r6.report["baseline"]["items"]["piqa"]["source"], "cache");
    assert_eq!(entries(&cache).len(), 3);

    // 6. --no-cache: computed, nothing read or written; --cache DIR overrides the pipeline's
    let r7 = run(&p, &["--no-cache"]);
    assert_eq!(r7.report["baseline"]["source"], "computed");
    assert_eq!(r7.report["baseline"]["cache_dir"], Value::Null);
    assert!(!r7.stderr.contains("from the eval cache"));
    assert_eq!(entries(&cache).len(), 3);
    let other = d.path().join("other");
    let r8 = run(&p, &["--cache", other.to_str().unwrap()]);
    assert_eq!(r8.report["baseline"]["source"], "computed");
    assert_eq!(entries(&other).len(), 2);
}
