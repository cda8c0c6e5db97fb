//! The forward pass against transformers' float32 outputs (../shared/golden/ref-llama-9m).

use crate::common;
use compress::model::llama::Model;
use compress::model::Checkpoint;
use compress::safetensors_file::{to_f32, to_i64, SafetensorsFile};

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    // relative to the largest magnitude of the reference (elementwise relative error is
    // meaningless at values near zero)
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y).abs() as f64) / scale)
        .fold(0.0, f64::max)
}

#[test]
fn logits_and_hidden_states_match_transformers() {
    let g = SafetensorsFile::open(&common::shared().join("golden/ref-llama-9m/logits.safetensors"))
        .unwrap();
    let ids_i = &g.tensors["input_ids"];
    let ids: Vec<u32> = to_i64(ids_i.dtype, g.bytes(ids_i))
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    let lg = &g.tensors["logits"];
    let gold_logits = to_f32(lg.dtype, g.bytes(lg)).unwrap();
    let hs = &g.tensors["hidden_states"];
    let gold_hidden = to_f32(hs.dtype, g.bytes(hs)).unwrap();

    let ckpt = Checkpoint::open(&common::ref_model()).unwrap();
    let model = Model::load(&ckpt, 128).unwrap();
    let t = ids.len();
    let h = ckpt.config.hidden_size;

    // Tokenizer agrees with the golden ids.
    let tok = compress::calib::load_tokenizer(&ckpt.tokenizer_path()).unwrap();
    let text = std::fs::read_to_string(common::shared().join("data/eval/wikitext2/wiki.test.raw"))
        .unwrap();
    let all = compress::calib::tokenize(&tok, &text).unwrap();
    assert_eq!(&all[..t], &ids[..], "tokenizer disagrees with transformers");
    assert_eq!(all.len(), 342955);

    // Per-layer hidden states.
    let mut x = model.outer.embed(&ids, 1, t).unwrap();
    let n_layers = ckpt.config.num_layers;
    for l in 0..=n_layers {
        let got = if l == n_layers {
            model.outer.final_norm(&x)
        } else {
            x.data.clone()
        };
        let want = &gold_hidden[l * t * h..(l + 1) * t * h];
        let e = max_rel(&got, want);
        assert!(e <= 1e-4, "hidden state {l}: max relative error {e:e}");
        if l < n_layers {
            x = model.forward_layer(l, &x).unwrap();
        }
    }
    let logits = model.logits(&ids, 1, t).unwrap();
    // Streaming the layers from the checkpoint computes the same bits.
    let streamed = Model::streamed(&ckpt, 128).unwrap();
    assert!(streamed.is_streamed() && !model.is_streamed());
    assert!(Model::open(&ckpt, &Default::default(), 128, 0)
        .unwrap()
        .is_streamed());
    assert!(!Model::open(&ckpt, &Default::default(), 128, u64::MAX)
        .unwrap()
        .is_streamed());
    assert!(streamed.logits(&ids, 1, t).unwrap() == logits);
    let e = max_rel(&logits, &gold_logits);
    eprintln!("logits max relative error {e:e}");
    assert!(e <= 1e-4, "logits: max relative error {e:e}");
}
