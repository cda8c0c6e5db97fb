//! tokenizer.json files from the wild: a `truncation` (and `padding`) block saved inside the
//! file must not cut evaluation or calibration texts (it once scored the first 512 tokens of a
//! 71,000-token text as the data set's perplexity).

use crate::common;
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

/// Calibration reads texts through the same loader: the saved truncation is off there too.
/// And a set cut short (as the saved truncation cut it before the fix) is flagged: it yields
/// fewer windows than the text's length allows, which the report and `compress eval` say.
#[test]
fn calibration_ignores_truncation_and_a_cut_set_is_flagged() {
    let d = tempfile::tempdir().unwrap();
    let m = common::model_copy(d.path());
    let p = m.join("tokenizer.json");
    let mut t: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    t["truncation"] = serde_json::json!({"direction": "Right", "max_length": 64, "strategy": "LongestFirst", "stride": 0});
    std::fs::write(&p, serde_json::to_vec(&t).unwrap()).unwrap();
    let text =
        compress::calib::read_text(&common::shared().join("data/calib/c4_calib.jsonl"), "text")
            .unwrap();
    let ours = compress::calib::load_tokenizer(&p).unwrap();
    let plain =
        compress::calib::load_tokenizer(&common::ref_model().join("tokenizer.json")).unwrap();
    let ids = compress::calib::tokenize(&ours, &text).unwrap();
    assert_eq!(ids, compress::calib::tokenize(&plain, &text).unwrap());
    assert!(ids.len() > 10_000);

    // the file as saved, truncation on: 64 tokens of a long text
    let raw = tokenizers::Tokenizer::from_file(&p).unwrap();
    let cut = raw.encode(text.as_str(), false).unwrap().get_ids().len();
    assert_eq!(cut, 64);
    let seq = 32;
    let floor = compress::calib::min_tokens(&ours, &text) / seq;
    assert!(floor > 2 && floor <= ids.len() / seq, "{floor}");
    let result = |tokens: usize| compress::eval::ppl::PplResult {
        perplexity: 1.0,
        tokens,
        windows: tokens / seq,
        nll: 0.0,
        min_windows: Some(floor),
    };
    let w = result(cut).short_warning("c4").unwrap();
    assert!(w.contains("the text was cut short"), "{w}");
    assert_eq!(result(ids.len()).short_warning("c4"), None);
}

/// `compress eval` reports the floor, and a whole text stays above it.
#[test]
fn whole_sets_are_not_flagged() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("text.txt");
    let src = std::fs::read(common::shared().join("data/eval/wikitext2/wiki.test.raw")).unwrap();
    std::fs::write(&data, &src[..20_000]).unwrap();
    let r = eval_ppl(&common::ref_model(), &data);
    let (w, min) = (
        r["windows"].as_u64().unwrap(),
        r["min_windows"].as_u64().unwrap(),
    );
    assert!(min > 0 && min <= w, "{r}");
}
