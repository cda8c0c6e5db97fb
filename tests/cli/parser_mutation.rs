//! Randomized mutation tests of the parsers that read untrusted files: the safetensors header,
//! config.json and the pipeline YAML. Every mutated input must give `Ok` or an `Err` — never a
//! panic, never a huge allocation. (A seeded, bounded stand-in for coverage-guided fuzzing,
//! which needs a nightly toolchain this project's machines do not have.)

use crate::common;
use compress::model::ModelConfig;
use compress::pipeline::Pipeline;
use compress::safetensors_file::parse_header;
use rand::{Rng, SeedableRng};
use std::path::Path;

fn mutate(r: &mut impl Rng, src: &[u8]) -> Vec<u8> {
    let mut v = src.to_vec();
    for _ in 0..r.gen_range(1..8) {
        if v.is_empty() {
            v.push(r.gen());
            continue;
        }
        let i = r.gen_range(0..v.len());
        match r.gen_range(0..6) {
            0 => v[i] = r.gen(),
            1 => v[i] = b"0123456789-.e\"{}[],:"[r.gen_range(0..20)],
            2 => {
                v.remove(i);
            }
            3 => v.insert(i, r.gen()),
            4 => v.truncate(i),
            _ => {
                let j = r.gen_range(0..v.len());
                let (a, b) = (i.min(j), i.max(j));
                let chunk = v[a..b].to_vec();
                v.splice(b..b, chunk);
            }
        }
    }
    v
}

#[test]
fn safetensors_header_never_panics() {
    let f = common::ref_model().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    // header plus a little data: mutations hit the length prefix, the JSON and the offsets
    let head = &bytes[..8 + n + 64];
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let (mut ok, mut err) = (0, 0);
    for _ in 0..3000 {
        let m = mutate(&mut r, head);
        match parse_header(&m, Path::new("fuzz.safetensors")) {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(e.to_string().contains("fuzz.safetensors"), "{e}");
                err += 1
            }
        }
    }
    assert!(err > 0 && ok + err == 3000);
}

#[test]
fn config_json_never_panics() {
    let src = std::fs::read(common::ref_model().join("config.json")).unwrap();
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..3000 {
        let m = mutate(&mut r, &src);
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m) else {
            continue;
        };
        match ModelConfig::from_value(v, Path::new("fuzz/config.json")) {
            Ok(c) => {
                // a config that parses yields consistent shapes
                accepted += 1;
                assert!(c.num_params() > 0);
                assert_eq!(c.rope_inv_freq().len(), c.head_dim / 2);
                assert!(c.hidden_size > 0 && c.num_layers > 0 && c.vocab_size > 0);
                assert_eq!(c.num_heads % c.num_kv_heads, 0);
                assert!(!c.layer_tensors(0).is_empty());
            }
            Err(e) => {
                // valid JSON the config reader refuses: the message names the file
                refused += 1;
                assert!(format!("{e:#}").contains("fuzz/config.json"), "{e:#}");
            }
        }
    }
    // both outcomes occur: the mutations reach the field checks, not only the JSON parser
    assert!(
        accepted > 0 && refused > 0,
        "{accepted} accepted, {refused} refused"
    );
}

#[test]
fn pipeline_yaml_never_panics() {
    let src = std::fs::read(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pipelines/w4a16-gptq.yaml"),
    )
    .unwrap();
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..3000 {
        let m = mutate(&mut r, &src);
        let text = String::from_utf8_lossy(&m);
        match Pipeline::from_str(&text, Path::new("fuzz/p.yaml")) {
            Ok(p) => {
                accepted += 1;
                // what parses also validates and builds its passes (the parser checks them)
                p.validate(Path::new("fuzz/p.yaml")).unwrap();
                for s in &p.passes {
                    s.build().unwrap();
                }
            }
            Err(e) => {
                refused += 1;
                assert!(format!("{e:#}").contains("fuzz/p.yaml"), "{e:#}");
            }
        }
    }
    assert!(
        accepted > 0 && refused > 0,
        "{accepted} accepted, {refused} refused"
    );
}
