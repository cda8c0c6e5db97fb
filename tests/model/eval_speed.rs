//! Issue #21's evaluation changes keep the bits: the LM head and the loss computed a block of
//! rows at a time (8 rows or more: faer multiplies a single row in another order) give exactly
//! the perplexity of full [b·t, vocab] logits.

use crate::common;
use compress::eval::ppl::{nll_sum, perplexity, perplexity_chunked};
use compress::model::llama::Model;
use compress::model::Checkpoint;
use rand::{Rng, SeedableRng};

#[test]
fn blocked_head_and_loss_give_the_same_bits_as_full_logits() {
    let ckpt = Checkpoint::open(&common::ref_model()).unwrap();
    let model = Model::open(&ckpt, &Default::default(), 64, u64::MAX).unwrap();
    let vocab = model.config.vocab_size;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
    let (seq_len, windows) = (37, 5);
    let tokens: Vec<u32> = (0..seq_len * windows + 3)
        .map(|_| rng.gen_range(0..vocab as u32))
        .collect();

    // the simple reference: full logits of each batch, the loss of each window summed in order
    let batch = 2;
    let (mut total, mut count, mut w) = (0f64, 0usize, 0);
    while w < windows {
        let b = batch.min(windows - w);
        let ids = &tokens[w * seq_len..(w + b) * seq_len];
        let logits = model.logits(ids, b, seq_len).unwrap();
        for i in 0..b {
            let rows = &logits[i * seq_len * vocab..((i + 1) * seq_len - 1) * vocab];
            total += nll_sum(rows, vocab, &ids[i * seq_len + 1..(i + 1) * seq_len]);
            count += seq_len - 1;
        }
        w += b;
    }
    let want = total / count as f64;

    for chunk in [8, 13, 29, 36, 37, 100] {
        let r = perplexity_chunked(&model, &tokens, seq_len, batch, chunk, &mut |_| ()).unwrap();
        assert_eq!(r.nll.to_bits(), want.to_bits(), "chunk {chunk}");
        assert_eq!(r.windows, windows);
    }
    let r = perplexity(&model, &tokens, seq_len, batch, &mut |_| ()).unwrap();
    assert_eq!(r.nll.to_bits(), want.to_bits());

    // logits_range: the same bits as those rows of the full logits
    let x = model.hidden(&tokens[..2 * seq_len], 2, seq_len).unwrap();
    let full = model.outer.logits(&x);
    for (r0, r1) in [(0, 8), (3, 40), (36, 74)] {
        let part = model.outer.logits_range(&x, r0, r1);
        assert!(part == full[r0 * vocab..r1 * vocab], "rows {r0}..{r1}");
    }
}

/// `compress eval --protocol llama-perplexity` scores what llama.cpp's `llama-perplexity`
/// scores: each chunk's first token replaced by BOS, and only the logits at positions
/// n_ctx/2 … n_ctx − 2 (tools/perplexity/perplexity.cpp: `first = n_ctx/2`,
/// `n_ctx - 1 - first` tokens per chunk). The reference: full logits, rows picked by hand.
#[test]
fn llama_cpp_protocol_scores_the_second_half_of_each_chunk_after_bos() {
    use compress::eval::ppl::{perplexity_with, Protocol};
    let ckpt = Checkpoint::open(&common::ref_model()).unwrap();
    let tok = compress::calib::load_tokenizer(&ckpt.tokenizer_path()).unwrap();
    let bos = compress::calib::added_bos(&tok).unwrap();
    assert_eq!(
        bos,
        Some(0),
        "ref-llama-9m's tokenizer puts <|begin_of_text|> (0) first"
    );
    let model = Model::open(&ckpt, &Default::default(), 64, u64::MAX).unwrap();
    let vocab = model.config.vocab_size;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(22);
    for (seq_len, windows, batch) in [(40, 5, 2), (33, 3, 4)] {
        let tokens: Vec<u32> = (0..seq_len * windows + 7)
            .map(|_| rng.gen_range(1..vocab as u32))
            .collect();
        let first = seq_len / 2;
        let (mut total, mut count) = (0f64, 0usize);
        for w in 0..windows {
            let mut ids = tokens[w * seq_len..(w + 1) * seq_len].to_vec();
            ids[0] = 0;
            let logits = model.logits(&ids, 1, seq_len).unwrap();
            let rows = &logits[first * vocab..(seq_len - 1) * vocab];
            total += nll_sum(rows, vocab, &ids[first + 1..]);
            count += seq_len - 1 - first;
        }
        let want = total / count as f64;
        let r = perplexity_with(
            &model,
            &tokens,
            seq_len,
            batch,
            Protocol::LlamaCpp { bos },
            &mut |_| (),
        )
        .unwrap();
        assert!(
            (r.nll - want).abs() <= 1e-12 * want,
            "seq {seq_len}: {} vs {want}",
            r.nll
        );
        assert_eq!(r.windows, windows);
        // and it is not the default protocol's number
        let d = perplexity(&model, &tokens, seq_len, batch, &mut |_| ()).unwrap();
        assert!((d.nll - r.nll).abs() > 1e-6);
    }
}

/// The CLI names the protocol in its JSON, and a typo is one clear error.
#[test]
fn compress_eval_takes_the_llama_cpp_protocol() {
    use std::process::Command;
    let d = tempfile::tempdir().unwrap();
    let data = common::wiki_head(d.path(), "wiki.txt", 12_000);
    let eval = |protocol: &str| {
        Command::new(common::bin())
            .args(["eval", "--model"])
            .arg(common::ref_model())
            .arg("--data")
            .arg(&data)
            .args(["--seq-len", "128", "--json", "--protocol", protocol])
            .output()
            .unwrap()
    };
    let ppl = |o: &std::process::Output, protocol: &str| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["protocol"], protocol);
        v["results"]["wiki.txt"]["perplexity"].as_f64().unwrap()
    };
    let (w, l) = (
        ppl(&eval("windows"), "windows"),
        ppl(&eval("llama-perplexity"), "llama-perplexity"),
    );
    // the second half of each window has more context: lower perplexity
    assert!(l < w, "llama-perplexity protocol {l} vs windows {w}");
    let o = eval("llama");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--protocol: `llama`"));
}
