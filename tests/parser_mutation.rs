//! Randomized mutation tests of the parsers that read untrusted files: the safetensors header,
//! config.json and the pipeline YAML. Every mutated input must give `Ok` or an `Err` — never a
//! panic, never a huge allocation. (A seeded, bounded stand-in for coverage-guided fuzzing,
//! which needs a nightly toolchain this project's machines do not have.)

mod common;
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
    for _ in 0..3000 {
        let m = mutate(&mut r, &src);
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m) {
            if let Ok(c) = ModelConfig::from_value(v, Path::new("config.json")) {
                // a config that parses yields consistent shapes
                let _ = c.num_params();
                let _ = c.rope_inv_freq();
            }
        }
    }
}

#[test]
fn pipeline_yaml_never_panics() {
    let src = std::fs::read(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pipelines/w4a16-gptq.yaml"),
    )
    .unwrap();
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for _ in 0..3000 {
        let m = mutate(&mut r, &src);
        let text = String::from_utf8_lossy(&m);
        if let Ok(p) = Pipeline::from_str(&text, Path::new("p.yaml")) {
            for s in &p.passes {
                let _ = s.build();
            }
        }
    }
}
