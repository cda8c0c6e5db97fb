//! lm-evaluation-harness zero-shot scoring (src/eval/tasks.rs) on the reference model.

use compress::eval::tasks::{
    encode_pair, evaluate, hellaswag_query, load, loglikelihood, mc_metrics, mean_stderr, pick,
    preprocess_hellaswag, Doc, Task,
};
use compress::model::llama::Model;
use compress::model::Checkpoint;
use std::path::PathBuf;
use tokenizers::Tokenizer;

const MAX_LEN: usize = 2048;

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

fn data_root() -> PathBuf {
    shared().join("data/eval/tasks")
}

fn ref_model() -> (Model<'static>, Tokenizer) {
    let ckpt = Checkpoint::open(&shared().join("models/ref-llama-9m")).unwrap();
    let model = Model::load(&ckpt, MAX_LEN).unwrap();
    let tok = compress::calib::load_tokenizer(&ckpt.tokenizer_path()).unwrap();
    (model, tok)
}

/// Σ log softmax at the continuation tokens and the greedy flag, straight from `model.logits`
/// on the concatenated (left-truncated) sequence, in f64.
fn by_hand(model: &Model, ctx: &[u32], cont: &[u32], max_len: usize) -> (f64, bool) {
    let all: Vec<u32> = ctx.iter().chain(cont).copied().collect();
    let window = &all[all.len().saturating_sub(max_len + 1)..];
    let input = &window[..window.len() - 1];
    let t = input.len();
    let v = model.config.vocab_size;
    let logits = model.logits(input, 1, t).unwrap();
    let mut sum = 0f64;
    let mut greedy = true;
    for (j, &tgt) in cont.iter().enumerate() {
        let p = t - cont.len() + j;
        let row: Vec<f64> = logits[p * v..(p + 1) * v]
            .iter()
            .map(|&x| x as f64)
            .collect();
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        sum += row[tgt as usize] - lse;
        let arg = (0..v).fold(0, |b, i| if row[i] > row[b] { i } else { b });
        greedy &= arg == tgt as usize;
    }
    (sum, greedy)
}

#[test]
fn two_choice_item_matches_hand_computed_loglikelihoods() {
    let (model, tok) = ref_model();
    let context = "Question: What color is the sky on a clear day?\nAnswer:";
    let choices = ["blue", "a bright shade of green grass"];
    let reqs: Vec<(Vec<u32>, Vec<u32>)> = choices
        .iter()
        .map(|c| encode_pair(&tok, context, &format!(" {c}")).unwrap())
        .collect();
    // Harness tokenization: BOS + encode(context); continuation = encode(whole)[len(ctx):].
    let bos = tok.encode("", true).unwrap().get_ids().to_vec();
    assert_eq!(bos.len(), 1);
    for (c, (ctx, cont)) in choices.iter().zip(&reqs) {
        assert_eq!(ctx[0], bos[0]);
        let whole = compress::calib::tokenize(&tok, &format!("{context} {c}")).unwrap();
        assert_eq!(&whole[..ctx.len()], &ctx[..]);
        assert_eq!(&whole[ctx.len()..], &cont[..]);
        assert!(!cont.is_empty());
    }
    let got = loglikelihood(&model, &reqs, MAX_LEN).unwrap();
    let hand: Vec<(f64, bool)> = reqs
        .iter()
        .map(|(c, k)| by_hand(&model, c, k, MAX_LEN))
        .collect();
    for (g, h) in got.iter().zip(&hand) {
        assert!((g.0 - h.0).abs() < 1e-3, "ll {} vs hand {}", g.0, h.0);
        assert!(g.0 < 0.0);
        assert_eq!(g.1, h.1);
    }
    let lens: Vec<usize> = choices.iter().map(|c| c.chars().count()).collect();
    let lg: Vec<f64> = got.iter().map(|x| x.0).collect();
    let lh: Vec<f64> = hand.iter().map(|x| x.0).collect();
    assert_eq!(pick(&lg, &lens, false), pick(&lh, &lens, false));
    assert_eq!(pick(&lg, &lens, true), pick(&lh, &lens, true));
    // The same decisions through mc_metrics (gold = hand's argmax → acc 1).
    let doc = Doc {
        context: context.to_string(),
        choices: choices.iter().map(|s| s.to_string()).collect(),
        gold: pick(&lh, &lens, false),
    };
    let (m, _) = mc_metrics(
        Task::Piqa,
        std::slice::from_ref(&doc),
        std::slice::from_ref(&lg),
    );
    assert_eq!(m["acc"], 1.0);
    assert_eq!(
        m["acc_norm"],
        (pick(&lh, &lens, true) == doc.gold) as u8 as f64
    );

    // Left truncation: at most max_len input tokens, scored as the harness windows them.
    let small = 9; // < context + continuation, ≥ the longest continuation (7 tokens)
    let trunc = loglikelihood(&model, &reqs, small).unwrap();
    for ((c, k), g) in reqs.iter().zip(&trunc) {
        let h = by_hand(&model, c, k, small);
        assert!(
            (g.0 - h.0).abs() < 1e-3,
            "truncated ll {} vs hand {}",
            g.0,
            h.0
        );
        assert_eq!(g.1, h.1);
    }

    // Batched with requests of other lengths (right padding) = alone.
    let mut mixed = reqs.clone();
    mixed.push(encode_pair(&tok, "The cat sat on the", " mat").unwrap());
    mixed.push(
        encode_pair(
            &tok,
            "Once upon a time there was a little girl who lived in a small house near the",
            " forest",
        )
        .unwrap(),
    );
    let all = loglikelihood(&model, &mixed, MAX_LEN).unwrap();
    for (i, (c, k)) in mixed.iter().enumerate() {
        let h = by_hand(&model, c, k, MAX_LEN);
        assert!(
            (all[i].0 - h.0).abs() < 1e-3,
            "req {i}: {} vs {}",
            all[i].0,
            h.0
        );
        assert_eq!(all[i].1, h.1, "req {i} greedy");
    }
}

#[test]
fn acc_norm_normalises_by_length() {
    // Summed ll prefers the short choice; per-character ll prefers the long one.
    let lls = [-10.0, -12.0];
    let lens = [5, 20];
    assert_eq!(pick(&lls, &lens, false), 0);
    assert_eq!(pick(&lls, &lens, true), 1); // -2.0 vs -0.6
                                            // numpy argmax: first maximum on ties.
    assert_eq!(pick(&[-1.0, -1.0, -2.0], &[1, 1, 1], false), 0);
    assert_eq!(pick(&[-4.0, -2.0], &[4, 2], true), 0);

    // Through mc_metrics: gold = the long choice → acc 0, acc_norm 1. The harness's acc_norm
    // divides by len(choice) in characters (no leading space); acc_bytes by UTF-8 bytes.
    let doc = Doc {
        context: "Q".into(),
        choices: vec!["short".into(), "a much longer one..".into()],
        gold: 1,
    };
    let (m, s) = mc_metrics(Task::ArcEasy, &[doc], &[vec![-10.0, -12.0]]);
    assert_eq!(m["acc"], 0.0);
    assert_eq!(m["acc_norm"], 1.0);
    assert_eq!(m["acc_bytes"], 1.0);
    assert!(!s.contains_key("acc")); // n = 1: no sample stddev, so none is reported
                                     // chars vs bytes: "ééééé" is 5 chars, 10 bytes.
    let doc = Doc {
        context: "Q".into(),
        choices: vec!["abcdefg".into(), "ééééé".into()],
        gold: 1,
    };
    // per char: -7/7 = -1.0 vs -4.5/5 = -0.9 → 1; per byte: -1.0 vs -0.45 → 1 as well;
    // use lls where they disagree: -6.3/7 = -0.9 vs -4.75/5 = -0.95 (char → 0),
    // -4.75/10 = -0.475 (byte → 1).
    let (m, _) = mc_metrics(Task::Hellaswag, &[doc], &[vec![-6.3, -4.75]]);
    assert_eq!(m["acc_norm"], 0.0);
    assert_eq!(m["acc_bytes"], 1.0);

    // BoolQ reports acc only.
    let doc = Doc {
        context: "P\nQuestion: q?\nAnswer:".into(),
        choices: vec!["no".into(), "yes".into()],
        gold: 1,
    };
    let (m, _) = mc_metrics(Task::Boolq, &[doc], &[vec![-3.0, -1.0]]);
    assert_eq!(m.keys().collect::<Vec<_>>(), vec!["acc"]);
    assert_eq!(m["acc"], 1.0);

    // mean_stderr = sqrt(p(1-p)/(n-1)) for 0/1 scores.
    let xs = [1.0, 0.0, 1.0, 1.0];
    let p: f64 = 0.75;
    assert!((mean_stderr(&xs) - (p * (1.0 - p) / 3.0).sqrt()).abs() < 1e-12);
}

#[test]
fn loaders_return_documented_sets() {
    let root = data_root();
    for task in Task::ALL {
        let docs = load(task, &root, None).unwrap();
        assert_eq!(docs.len(), task.expected_len(), "{}", task.name());
        for (i, d) in docs.iter().enumerate() {
            assert!(
                !d.context.trim().is_empty(),
                "{} {i}: empty context",
                task.name()
            );
            assert!(d.gold < d.choices.len(), "{} {i}: gold", task.name());
            for c in &d.choices {
                assert!(!c.is_empty(), "{} {i}: empty choice", task.name());
            }
            let n = d.choices.len();
            match task {
                Task::Piqa | Task::Boolq => assert_eq!(n, 2),
                Task::ArcEasy | Task::ArcChallenge => assert!((3..=5).contains(&n)),
                Task::Hellaswag => assert_eq!(n, 4),
                Task::Lambada => {
                    assert_eq!(n, 1);
                    assert!(!d.choices[0].contains(' '));
                }
            }
        }
        // limit = first N items.
        let first = load(task, &root, Some(7)).unwrap();
        assert_eq!(&first[..], &docs[..7]);
    }

    let piqa = load(Task::Piqa, &root, Some(1)).unwrap();
    assert_eq!(
        piqa[0].context,
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    );
    assert_eq!(piqa[0].gold, 0);

    let arc = load(Task::ArcEasy, &root, Some(1)).unwrap();
    assert_eq!(
        arc[0].context,
        "Question: Which statement best explains why photosynthesis is the foundation of most \
         food webs?\nAnswer:"
    );
    assert_eq!(arc[0].gold, 0);
    assert_eq!(
        arc[0].continuation(0),
        " Sunlight is the source of energy for nearly all ecosystems."
    );
    // ARC answer keys "1".."4" index the choices labelled "1".."4".
    let raw = std::fs::read_to_string(root.join("arc/ARC-Challenge-Test.jsonl")).unwrap();
    let docs = load(Task::ArcChallenge, &root, None).unwrap();
    let mut numeric = 0;
    for (line, d) in raw.lines().zip(&docs) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let key = v["answerKey"].as_str().unwrap();
        if let Ok(k) = key.parse::<usize>() {
            numeric += 1;
            assert_eq!(v["question"]["choices"][d.gold]["label"], key);
            assert_eq!(d.gold, k - 1);
        }
    }
    assert_eq!(numeric, 22);

    let hs = load(Task::Hellaswag, &root, Some(2)).unwrap();
    assert_eq!(
        hs[0].context,
        "Roof shingle removal: A man is sitting on a roof. He"
    );
    assert_eq!(hs[0].choices[3], "starts pulling up roofing on a roof.");
    assert_eq!(hs[0].gold, 3);
    assert_eq!(
        hs[1].context,
        "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady"
    );

    let bq = load(Task::Boolq, &root, Some(1)).unwrap();
    assert!(bq[0].context.starts_with("Ethanol fuel -- All biomass"));
    assert!(bq[0]
        .context
        .ends_with("\nQuestion: does ethanol take more energy make that produces?\nAnswer:"));
    assert_eq!(bq[0].choices, vec!["no", "yes"]);
    assert_eq!(bq[0].gold, 0);

    let lb = load(Task::Lambada, &root, Some(1)).unwrap();
    assert_eq!(lb[0].choices, vec!["signs"]);
    assert!(lb[0].context.ends_with("I don't care about"));
    assert_eq!(lb[0].continuation(0), " signs");
}

#[test]
fn hellaswag_preprocessing() {
    // lm_eval/tasks/hellaswag/utils.py::preprocess (outputs checked with CPython).
    assert_eq!(
        preprocess_hellaswag(
            "  [header] How to buy a ring [title] Find a ring. [step] Your fiancé   is [substeps] here "
        ),
        " How to buy a ring. Find a ring. Your fiancé  is here"
    );
    assert_eq!(
        preprocess_hellaswag("Go to filters] ] render [www.x.org] ok [a [b] c]"),
        "Go to filters] ] render ok c]"
    );
    // ctx_b (lower-case fragment after the last sentence) is capitalized.
    assert_eq!(
        hellaswag_query(
            "Sharpening knives",
            "Sharpening knives: Then he takes a piece of bark. The stone particles stick. he"
        ),
        "Sharpening knives: Then he takes a piece of bark. The stone particles stick. He"
    );
    // WikiHow contexts (full sentences, empty ctx_b) are unchanged.
    let wh =
        "Personal Care and Style: How to buy a wedding band for men. Find a ring suitable for \
              his lifestyle.";
    assert_eq!(hellaswag_query("Personal Care and Style", wh), wh);
    assert_eq!(
        hellaswag_query("Camel ride", "Camel ride: A man [title] rides. a camel"),
        "Camel ride: A man. rides. A camel"
    );
}

#[test]
fn task_names() {
    for t in Task::ALL {
        assert_eq!(Task::from_name(t.name()).unwrap(), t);
    }
    assert_eq!(Task::from_name("lambada_openai").unwrap(), Task::Lambada);
    assert!(Task::from_name("mmlu").is_err());
}

#[test]
fn smoke_every_task_deterministic() {
    let (model, tok) = ref_model();
    let root = data_root();
    for task in Task::ALL {
        let a = evaluate(&model, &tok, task, &root, Some(20), MAX_LEN).unwrap();
        let b = evaluate(&model, &tok, task, &root, Some(20), MAX_LEN).unwrap();
        assert_eq!(a, b, "{} not deterministic", task.name());
        assert_eq!(a.n, 20);
        assert_eq!(a.task, task.name());
        assert!(a.metrics.contains_key("acc"));
        for (k, v) in &a.metrics {
            if k == "perplexity" {
                assert!(v.is_finite() && *v > 1.0, "{} ppl {v}", task.name());
            } else {
                assert!((0.0..=1.0).contains(v), "{} {k} = {v}", task.name());
                let se = a.stderr[k];
                assert!(
                    se.is_finite() && se >= 0.0,
                    "{} stderr {k} = {se}",
                    task.name()
                );
            }
        }
        if task.is_multiple_choice() && task != Task::Boolq {
            assert!(a.metrics.contains_key("acc_norm"));
        }
        if task == Task::Lambada {
            assert!(a.metrics.contains_key("perplexity"));
            assert!(!a.stderr.contains_key("perplexity"));
        }
        eprintln!("{}: {:?}", task.name(), a.metrics);
    }
}
