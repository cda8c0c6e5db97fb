//! The `quantization_config` block says what the pipeline meant: `ignore` lists `lm_head`
//! (tied or not) and every decoder linear left unquantized, so transformers and vLLM do not
//! build quantized modules without tensors (a tied checkpoint then fails to load).

use crate::common;
use std::path::Path;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/transformers")
        .join(name)
}

fn run(model: &Path, out: &Path, pass: &str, format: &str) -> serde_json::Value {
    let p = out.with_extension("yaml");
    std::fs::write(
        &p,
        format!(
            "model: {}\noutput: {}\npasses:\n  - {pass}\nexport: {{format: {format}}}\n",
            model.display(),
            out.display()
        ),
    )
    .unwrap();
    common::run_ok(&p);
    serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap()
}

#[test]
fn tied_checkpoint_ignores_lm_head() {
    let d = tempfile::tempdir().unwrap();
    let c = run(
        &fixture("llama-tied"),
        &d.path().join("o"),
        "rtn: {bits: 4, group_size: 32}",
        "compressed-tensors",
    );
    assert_eq!(c["tie_word_embeddings"], true);
    let q = &c["quantization_config"];
    assert_eq!(q["ignore"], serde_json::json!(["lm_head"]));
    assert_eq!(
        q["config_groups"]["group_0"]["targets"],
        serde_json::json!(["Linear"])
    );
    // and the checkpoint has no lm_head tensor of its own
    let st = std::fs::read(d.path().join("o/model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&st).unwrap();
    assert!(meta.tensors().keys().all(|k| !k.starts_with("lm_head")));
}

#[test]
fn untied_checkpoint_ignores_lm_head_and_skipped_linears() {
    let d = tempfile::tempdir().unwrap();
    let c = run(
        &common::ref_model(),
        &d.path().join("o"),
        "rtn: {bits: 4, group_size: 32, ignore: [lm_head, \"re:.*down_proj$\"]}",
        "compressed-tensors",
    );
    let ignore: Vec<String> = c["quantization_config"]["ignore"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    // in module order, as llm-compressor lists them: the decoder's linears, then lm_head
    assert_eq!(ignore.last().unwrap(), "lm_head");
    let layers = c["num_hidden_layers"].as_u64().unwrap() as usize;
    assert_eq!(ignore.len(), 1 + layers, "{ignore:?}");
    for l in 0..layers {
        assert!(ignore.contains(&format!("model.layers.{l}.mlp.down_proj")));
    }
}

/// GPTQ's default column order (static activation order) is stated in both formats' blocks;
/// `act_order: false` says none, and dynamic groups say `group` (g_idx written).
#[test]
fn gptq_column_order_is_stated() {
    let d = tempfile::tempdir().unwrap();
    let calib = common::shared().join("data/calib/c4_calib.jsonl");
    let run_gptq = |name: &str, gptq: &str, format: &str| -> serde_json::Value {
        let out = d.path().join(name);
        let p = d.path().join(format!("{name}.yaml"));
        std::fs::write(
            &p,
            format!(
                "model: {}\noutput: {}\ncalibration: {{path: {}, samples: 8, seq_len: 128, seed: 0}}\n\
                 passes:\n  - gptq: {{{gptq}}}\nexport: {{format: {format}}}\n",
                common::ref_model().display(),
                out.display(),
                calib.display()
            ),
        )
        .unwrap();
        common::run_ok(&p);
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap()
    };
    let w = |c: &serde_json::Value| {
        c["quantization_config"]["config_groups"]["group_0"]["weights"].clone()
    };
    let c = run_gptq(
        "ct-default",
        "bits: 4, group_size: 64",
        "compressed-tensors",
    );
    assert_eq!(w(&c)["actorder"], "static");
    let c = run_gptq(
        "ct-off",
        "bits: 4, group_size: 64, act_order: false",
        "compressed-tensors",
    );
    assert!(w(&c)["actorder"].is_null());
    let c = run_gptq(
        "ct-dyn",
        "bits: 4, group_size: 64, static_groups: false",
        "compressed-tensors",
    );
    assert_eq!(w(&c)["actorder"], "group");
    // below 4 bits the default is column order (BENCHMARKS.md: measured on a real checkpoint)
    let c = run_gptq(
        "ct-w3-default",
        "bits: 3, group_size: 64",
        "compressed-tensors",
    );
    assert!(w(&c)["actorder"].is_null());
    let c = run_gptq(
        "ct-w3-act",
        "bits: 3, group_size: 64, act_order: true",
        "compressed-tensors",
    );
    assert_eq!(w(&c)["actorder"], "static");
    let c = run_gptq("gptq-default", "bits: 4, group_size: 64", "gptq");
    assert_eq!(c["quantization_config"]["desc_act"], true);
    assert_eq!(c["quantization_config"]["static_groups"], true);
    let c = run_gptq(
        "gptq-off",
        "bits: 4, group_size: 64, act_order: false",
        "gptq",
    );
    assert_eq!(c["quantization_config"]["desc_act"], false);
    assert_eq!(c["quantization_config"]["static_groups"], false);
}
