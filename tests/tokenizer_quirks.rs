//! tokenizer.json files from the wild: a `truncation` (and `padding`) block saved inside the
//! file must not cut evaluation or calibration texts (it once scored the first 512 tokens of a
//! 71,000-token text as the data set's perplexity).

mod common;
use std::process::Command;

fn eval_ppl(model: &std::path::Path, data: &std::path::Path) -> serde_json::Value {
    let o = Command::new(common::bin())
        .args(["eval", "--quiet", "--json", "--seq-len", "128", "--model"])
        .arg(model)
        .arg("--data")
        .arg(data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["results"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone()
}

#[test]
fn saved_truncation_and_padding_are_ignored() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("text.txt");
    let src = std::fs::read(common::shared().join("data/eval/wikitext2/wiki.test.raw")).unwrap();
    std::fs::write(&data, &src[..20_000]).unwrap();
    let plain = eval_ppl(&common::ref_model(), &data);

    let m = common::model_copy(d.path());
    let p = m.join("tokenizer.json");
    let mut t: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    t["truncation"] = serde_json::json!({"direction": "Right", "max_length": 64, "strategy": "LongestFirst", "stride": 0});
    t["padding"] = serde_json::json!({"strategy": {"Fixed": 4096}, "direction": "Right", "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"});
    std::fs::write(&p, serde_json::to_vec(&t).unwrap()).unwrap();
    let quirky = eval_ppl(&m, &data);
    assert!(plain["windows"].as_u64().unwrap() > 20, "{plain}");
    assert_eq!(
        plain, quirky,
        "a saved truncation/padding block changed the evaluation"
    );

    // and it is said once
    let o = Command::new(common::bin())
        .args(["eval", "--seq-len", "128", "--model"])
        .arg(&m)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        err.matches("ignoring the saved truncation").count(),
        1,
        "{err}"
    );
}
