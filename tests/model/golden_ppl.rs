//! Every golden perplexity (transformers, float32) within 0.1%, with the same token and window
//! counts: wikitext2 / ptb / c4_eval at seq_len 128 and 512.

use crate::common;
use compress::model::llama::Model;
use compress::model::Checkpoint;

#[test]
fn perplexity_matches_transformers_on_every_golden_set() {
    let g: serde_json::Value = serde_json::from_slice(
        &std::fs::read(common::shared().join("golden/ref-llama-9m/ppl.json")).unwrap(),
    )
    .unwrap();
    let ckpt = Checkpoint::open(&common::ref_model()).unwrap();
    let tok = compress::calib::load_tokenizer(&ckpt.tokenizer_path()).unwrap();
    let model = Model::load(&ckpt, 512).unwrap();
    for (set, file) in g["files"].as_object().unwrap() {
        let text =
            compress::calib::read_text(&common::shared().join(file.as_str().unwrap()), "text")
                .unwrap();
        let tokens = compress::calib::tokenize(&tok, &text).unwrap();
        for seq in [128usize, 512] {
            let want = &g["results"][set][seq.to_string()];
            let r = compress::eval::ppl::perplexity(&model, &tokens, seq, 8, &mut |_| {}).unwrap();
            assert_eq!(
                r.tokens as u64,
                want["tokens"].as_u64().unwrap(),
                "{set}@{seq} tokens"
            );
            assert_eq!(
                r.windows as u64,
                want["windows"].as_u64().unwrap(),
                "{set}@{seq} windows"
            );
            let rel = (r.perplexity / want["ppl"].as_f64().unwrap() - 1.0).abs();
            eprintln!(
                "{set}@{seq}: {:.4} vs {:.4} (rel {rel:.2e})",
                r.perplexity, want["ppl"]
            );
            assert!(
                rel <= 1e-3,
                "{set}@{seq}: {} vs {}",
                r.perplexity,
                want["ppl"]
            );
        }
    }
}
