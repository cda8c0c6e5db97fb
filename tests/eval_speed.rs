//! Issue #21's evaluation changes keep the bits: the LM head and the loss computed a block of
//! rows at a time (8 rows or more: faer multiplies a single row in another order) give exactly
//! the perplexity of full [b·t, vocab] logits.

mod common;

use compress::eval::ppl::{nll_sum, perplexity, perplexity_chunked};
use compress::model::llama::Model;
use compress::model::Checkpoint;
use rand::{Rng, SeedableRng};

#[test]
fn blocked_head_and_loss_give_the_same_bits_as_full_logits() {
    let ckpt = Checkpoint::open(&common::ref_model()).unwrap();
    let model = Model::open(&ckpt, 64, u64::MAX).unwrap();
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
