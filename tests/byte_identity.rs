//! Existing pipelines write the same bytes as before the block refactor (issue #15).
//!
//! What is covered elsewhere by files we did not write: RTN W4 g128 sym/asym, W8 g128 and W8A8
//! through the binary against llm-compressor's checkpoints in `../shared/golden`
//! (`tests/pipeline_e2e.rs`, `tests/golden_compressed_tensors.rs`), and the identity pipeline
//! against its input (`identical_to_input`, `tests/pipeline_e2e.rs`). Every other method has no
//! golden file, so this test pins the SHA-256 of `model.safetensors` and `config.json` that
//! each pipeline below writes on the reference model (8 calibration windows of 128 tokens, no
//! evaluation: a few seconds in all).
//!
//! How the hashes were produced: commit 9c40714 (the last commit touching `src/` before this
//! test; its `src/` equals b225518's) built with `cargo build --release`, then this test run
//! with `COMPRESS_BYTE_IDENTITY_BIN=<that build>/compress`: the test runs the given binary
//! instead of this build's and, on a mismatch, prints the table of hashes it got. Run the same
//! way against an older build to see which pipelines it already wrote identically; the
//! `since` column says the oldest commit checked to give the same bytes (6b7498f is the commit
//! before the refactor started; GPTQ's numerics were changed on purpose after it, in 88c02a8
//! and 2c486f5, and the other methods did not exist yet).

mod common;
use std::path::{Path, PathBuf};

/// (name, passes YAML, export format, SHA-256 of model.safetensors, of config.json, since).
const PIPELINES: &[(&str, &str, &str, &str, &str, &str)] = &[
    ("rtn-w4g128-gptqfmt", "  - rtn: {bits: 4, group_size: 128, sym: true}", "gptq", "3ce7620024d77c4a6d7fa7d04cb74c5e880c38e298529b79889d00188924c68e", "f1b5479477ed452d086a9740136fc0305ff9394565196b3dce1a38f2bd5a7cf3", "model 6b7498f; config 9c40714 (6b7498f wrote true_sequential: true for RTN, fixed in e965093)"),
    ("rtn-w4g64-asym-dense", "  - rtn: {bits: 4, group_size: 64, sym: false}", "dense", "7352a588f2a662a179d59bca27586c5add4d2f49b84ec87ea55362a3fe268a51", "2894a11d8d836f658a9707dc5c007b4f242eea66e825059dc5f129de1b8a3c48", "6b7498f"),
    ("rtn-w3-mse", "  - rtn: {bits: 3, group_size: 128, sym: true, observer: mse}", "compressed-tensors", "25bd7f487f601f25bf93aecc2982b1221bb0214fa57cfc95a2a83bfd631e75bf", "0ed779f177e2fc4d7fcfacd66357ec8ce09b573502c1463ca8229ccc922b462d", "model 6b7498f; config 9c40714 (6b7498f wrote observer memoryless_minmax for mse, issue #15 item 4)"),
    ("gptq-w4g128", "  - gptq: {bits: 4, group_size: 128, sym: true, damp: 0.01}", "compressed-tensors", "227e87f190893a7f2b63c22e5b9dd9ab04100770e16f5b4b018dc179b3b488b8", "5161093175e337f432e179734a39675ed4a4503e313a0a9fa04007e0b1653b98", "9c40714"),
    ("gptq-w4g128-v1", "  - gptq: {bits: 4, group_size: 128, sym: true, damp: 0.01}", "gptq", "1fbd569792e58580419a85052141727b5cbad8623a7e70581b106fce77ebd26c", "f3c0220aeeb3834d289e04ceb4cab3840fdbca6fa3d0f99a37de58d9fb6c1df0", "9c40714"),
    ("gptq-w3g64-colorder", "  - gptq: {bits: 3, group_size: 64, sym: true}", "gptq", "3f60a87435917b3a9faea84a1bea637f4475c89860716872f4a2823a20f6422b", "4427d995e8dea11805b37858c34379ed973c67243583563fe6bc4de339aa5164", "9c40714"),
    ("gptq-w4-dynamic-groups", "  - gptq: {bits: 4, group_size: 64, sym: false, act_order: true, static_groups: false, true_sequential: true}", "compressed-tensors", "2df0f5a65fff8bcd310bc1b11dc370b93c025b6bbafbe2033e4319a179cd34a0", "6cbe0dbc1e47039c12c37a56b351e0eb97d04dc4274f5ff342efb04f610eac3e", "9c40714"),
    ("awq-rtn", "  - awq: {bits: 4, group_size: 128, sym: false}\n  - rtn: {bits: 4, group_size: 128, sym: false}", "compressed-tensors", "27adcbfd0ef90b747ab6609ec8435cfaded11975b24b8468f7cbe2a84e277012", "4839177335168e7bdf3ed502523972755ba8a2c7c11558e494e43a2aa5c24641", "9c40714"),
    ("awq-gptq", "  - awq: {bits: 4, group_size: 128, sym: false}\n  - gptq: {bits: 4, group_size: 128, sym: false}", "compressed-tensors", "9a5394e5431ec16ea5b350f67731c76d678895b35a8cf042098ac16acbf449c4", "dfa4dd1e2813a72e6f17c04a482e844c6f42c564b475970f1a6c7e0a48b2b688", "9c40714"),
    ("smoothquant-gptq-w8a8", "  - smoothquant: {smoothing_strength: 0.8}\n  - gptq: {bits: 8, strategy: channel, act_bits: 8}", "compressed-tensors", "b408e1d40eeea40160c16dfcaf975fddd521bf4660e5211aee40d1b60679efaa", "fba8e5f939a4834d8e36b54df34dd0b34cf3b167f18e9ef4ed4a9a111e8fccf8", "9c40714"),
    ("magnitude-50", "  - magnitude: {sparsity: 0.5}", "compressed-tensors", "390a03f98213d145a5d3d6f45e402eb0873030caa2bb6ff9fbdfbbb7790bccb5", "8008b9b6f3512a1d21f5f71d3951899c1e2a517229d7be0871ae1a172e123de2", "9c40714"),
    ("wanda-2of4", "  - wanda: {sparsity: 0.5, pattern: \"2:4\"}", "compressed-tensors", "700c2ea1c85e55e17e58671fe49f361095b64aceae83d911d5fce338001dc97c", "74ca107949069c37012e2d25c3d4eace60cf1616c74420e061dcd41b83e1ed5c", "9c40714"),
    ("sparsegpt-50", "  - sparsegpt: {sparsity: 0.5}", "compressed-tensors", "8b53caf3f5fab809cd1ed5c6059eb2bd86565eba8c4c2cdde4e971f9ed45bf8e", "8008b9b6f3512a1d21f5f71d3951899c1e2a517229d7be0871ae1a172e123de2", "9c40714"),
    ("sparsegpt-2of4-gptq", "  - sparsegpt: {pattern: \"2:4\"}\n  - gptq: {bits: 4, group_size: 128, sym: true}", "compressed-tensors", "390dc8f4038c40b8e8982534776cfd76a1fb54ea720bb97a0ec71d599e3eba80", "47dfd850c11dc01207ff1f833cd0bf3734d3027bfb9dac5ca9f76b9b4f40071e", "9c40714"),
    ("svd-20", "  - svd: {ratio: 0.2}", "compressed-tensors", "35e18dca8fa5d10e1fc525f2505ec842cd02c908b4996aa293aa1597aac2315a", "66eb7652a15915927b823577535590eee849537970ebdcc330ebef97dd046c7d", "9c40714"),
    ("svd-llm-rank64-dense", "  - svd_llm: {rank: 64}", "dense", "540a59254eb86c58751d0617245b29ba7a30be8bcd327ce02a0f4f831135841d", "2894a11d8d836f658a9707dc5c007b4f242eea66e825059dc5f129de1b8a3c48", "9c40714"),
];

fn binary() -> PathBuf {
    std::env::var_os("COMPRESS_BYTE_IDENTITY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(common::bin)
}

fn run(dir: &Path, name: &str, passes: &str, format: &str) -> (String, String) {
    let out = dir.join(name);
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &p,
        format!(
            "model: {}\noutput: {}\ncalibration: {{path: {}, samples: 8, seq_len: 128, seed: 0, batch: 8}}\n\
             passes:\n{passes}\nexport: {{format: {format}}}\n",
            common::ref_model().display(),
            out.display(),
            common::shared().join("data/calib/c4_calib.jsonl").display()
        ),
    )
    .unwrap();
    let o = std::process::Command::new(binary())
        .arg(&p)
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let h = |f: &str| compress::util::sha256_file(&out.join(f)).unwrap();
    (h("model.safetensors"), h("config.json"))
}

#[test]
fn existing_pipelines_write_the_pinned_bytes() {
    let d = tempfile::tempdir().unwrap();
    let mut table = String::new();
    let mut bad = Vec::new();
    for &(name, passes, format, model, config, since) in PIPELINES {
        let (m, c) = run(d.path(), name, passes, format);
        table.push_str(&format!(
            "    (\"{name}\", {passes:?}, \"{format}\", \"{m}\", \"{c}\", \"{since}\"),\n"
        ));
        if (m.as_str(), c.as_str()) != (model, config) {
            bad.push(name);
        }
    }
    assert!(PIPELINES.len() >= 12);
    assert!(
        bad.is_empty(),
        "{} wrote other bytes than pinned; hashes got:\n{table}",
        bad.join(", ")
    );
}
