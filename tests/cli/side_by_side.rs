//! Small calibration batches run side by side (one per thread, single-threaded GEMMs) give the
//! statistics and the layer outputs of running them one after another, bit for bit, and the
//! same first error. The engine chooses by the thread count, so the two runs below differ only
//! in the pool they run in.

use crate::common;
use compress::engine::collect_stats;
use compress::engine::stats::{SiteStats, StatsRequest};
use compress::model::arch::LLAMA;
use compress::model::layer::{LayerWeights, Site};
use compress::model::llama::{Act, Outer, Rope};
use compress::model::Checkpoint;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

/// Document-like batches: one window each, of varying lengths (as `sampling: documents`
/// gives), and two batches of several windows.
fn batches(outer: &Outer, vocab: usize) -> Vec<Act> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let shapes = [
        (1, 37),
        (1, 300),
        (1, 512),
        (3, 64),
        (1, 5),
        (1, 255),
        (2, 128),
        (1, 411),
        (1, 90),
        (1, 1),
        (1, 200),
    ];
    shapes
        .iter()
        .map(|&(b, t)| {
            let ids: Vec<u32> = (0..b * t).map(|_| rng.gen_range(0..vocab as u32)).collect();
            outer.embed(&ids, b, t).unwrap()
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn same_stats(a: &BTreeMap<Site, SiteStats>, b: &BTreeMap<Site, SiteStats>) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (site, sa) in a {
        let sb = &b[site];
        assert_eq!(sa.n, sb.n, "{site:?}");
        let h = |s: &SiteStats| {
            s.xtx
                .as_ref()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(h(sa), h(sb), "{site:?} XᵀX");
        assert_eq!(
            bits(sa.absmax.as_ref().unwrap()),
            bits(sb.absmax.as_ref().unwrap())
        );
        let f = |v: &Option<Vec<f64>>| {
            v.as_ref()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(f(&sa.sum_abs), f(&sb.sum_abs), "{site:?} Σ|x|");
        assert_eq!(f(&sa.sum_sq), f(&sb.sum_sq), "{site:?} Σx²");
        // not a trivial statistic
        assert!(sa.xtx.as_ref().unwrap().iter().any(|v| *v != 0.0));
    }
}

#[test]
fn side_by_side_batches_give_the_sequential_bits() {
    let ckpt = Checkpoint::open(&common::ref_model()).unwrap();
    let cfg = &ckpt.config;
    let outer = Outer::load(&ckpt, false).unwrap();
    let rope = Rope::new(cfg, 512).unwrap();
    let inputs = batches(&outer, cfg.vocab_size);
    let layer = LayerWeights::load(&ckpt, 1).unwrap();
    let all = StatsRequest {
        hessian: true,
        act_absmax: true,
        act_mean_abs: true,
        col_norm: true,
        ..Default::default()
    };
    let hessian_only = StatsRequest {
        hessian: true,
        ..Default::default()
    };
    for (req, until) in [
        (all, None),
        (all, Some(LLAMA.attention.o_in)),
        (hessian_only, None),
        (hessian_only, Some(LLAMA.mlp.input)),
    ] {
        let one = pool(1)
            .install(|| collect_stats(&layer, cfg, &inputs, &rope, req, until))
            .unwrap();
        let four = pool(4)
            .install(|| collect_stats(&layer, cfg, &inputs, &rope, req, until))
            .unwrap();
        if req.act_absmax {
            same_stats(&one, &four);
        } else {
            for (site, s) in &one {
                assert_eq!(s.n, four[site].n);
                assert_eq!(s.xtx, four[site].xtx, "{site:?}");
            }
        }
        let last = until.unwrap_or(LLAMA.dense_mlp().unwrap().down_in);
        assert!(one.contains_key(&last) && four.contains_key(&last));
    }
}

/// The whole pipeline's written bytes with batches side by side and one after another (GPTQ on
/// documents-mode calibration: statistics, partial forwards and propagation all take the
/// side-by-side path on the reference model).
#[test]
fn gptq_output_bytes_do_not_depend_on_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let mut digests = Vec::new();
    for threads in ["1", "3"] {
        let out = dir.path().join(format!("out-{threads}"));
        let p = dir.path().join(format!("p-{threads}.yaml"));
        std::fs::write(
            &p,
            format!(
                "model: {}\noutput: {}\ncalibration: {{path: {}, sampling: documents, samples: 12, seq_len: 256}}\npasses:\n  - gptq: {{bits: 4, group_size: 128}}\nexport: {{format: compressed-tensors}}\n",
                common::ref_model().display(),
                out.display(),
                common::shared().join("data/calib/c4_calib.jsonl").display(),
            ),
        )
        .unwrap();
        let o = std::process::Command::new(common::bin())
            .arg(&p)
            .arg("--quiet")
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        digests.push(std::fs::read(out.join("model.safetensors")).unwrap());
    }
    assert!(
        digests[0] == digests[1],
        "outputs differ between 1 and 3 threads"
    );
}

/// With a non-finite activation in two batches, both ways report the first of them.
#[test]
fn the_first_failing_batch_is_reported_either_way() {
    let ckpt = Checkpoint::open(&common::ref_model()).unwrap();
    let cfg = &ckpt.config;
    let outer = Outer::load(&ckpt, false).unwrap();
    let rope = Rope::new(cfg, 512).unwrap();
    let mut inputs = batches(&outer, cfg.vocab_size);
    inputs[3].data[70] = f32::NAN;
    inputs[7].data[5] = f32::INFINITY;
    let layer = LayerWeights::load(&ckpt, 0).unwrap();
    let req = StatsRequest {
        hessian: true,
        ..Default::default()
    };
    for threads in [1, 4] {
        let err = pool(threads)
            .install(|| collect_stats(&layer, cfg, &inputs, &rope, req, None))
            .unwrap_err();
        let nf = err
            .downcast_ref::<compress::engine::NonFinite>()
            .unwrap_or_else(|| panic!("not a NonFinite error: {err:#}"));
        assert_eq!(nf.batch, 3, "{threads} threads");
    }
}

/// The forward continued from activations kept at any site gives the output and the later
/// site inputs of the forward from the layer input, bit for bit, and skips the earlier hooks.
#[test]
fn continuing_from_kept_activations_is_the_whole_forward() {
    use compress::model::llama::{DecoderLayer, Step};
    let ckpt = Checkpoint::open(&common::ref_model()).unwrap();
    let cfg = &ckpt.config;
    let outer = Outer::load(&ckpt, false).unwrap();
    let rope = Rope::new(cfg, 512).unwrap();
    let inputs = batches(&outer, cfg.vocab_size);
    let layer = LayerWeights::load(&ckpt, 2).unwrap();
    let dl = DecoderLayer::new(&layer, cfg);
    for x in [&inputs[1], &inputs[3]] {
        let mut seen: Vec<(Site, Vec<u32>)> = Vec::new();
        let mut hook = |s: Site, v: &[f32], _: usize, _: usize| {
            seen.push((s, bits(v)));
            Ok(())
        };
        let Step::Done(full) = dl.forward_from(x, None, &rope, &mut hook, None).unwrap() else {
            panic!("stopped without a stop site")
        };
        assert_eq!(seen.len(), 4);
        for (i, stop) in LLAMA.sites.iter().map(|s| s.site).enumerate() {
            let mut none = |_: Site, _: &[f32], _: usize, _: usize| Ok(());
            let Step::Stopped(inner) = dl
                .forward_from(x, None, &rope, &mut none, Some(stop))
                .unwrap()
            else {
                panic!("did not stop at {stop:?}")
            };
            assert_eq!(inner.site, stop);
            assert_eq!(bits(&inner.v), seen[i].1, "kept input of {stop:?}");
            let mut later: Vec<(Site, Vec<u32>)> = Vec::new();
            let mut hook = |s: Site, v: &[f32], _: usize, _: usize| {
                later.push((s, bits(v)));
                Ok(())
            };
            let Step::Done(y) = dl
                .forward_from(x, Some(&inner), &rope, &mut hook, None)
                .unwrap()
            else {
                panic!("stopped without a stop site")
            };
            assert_eq!(bits(&y.data), bits(&full.data), "continued from {stop:?}");
            assert_eq!(later, seen[i + 1..].to_vec(), "hooks after {stop:?}");
        }
    }
}

/// Activations kept before a weight change are not what the changed layer computes, and
/// `Linear::same_forward` sees the change (so the engine runs such a layer from its input);
/// on unchanged weights continuing is exact. The engine's use of kept activations (GPTQ,
/// SparseGPT, AWQ + GPTQ, SmoothQuant + W8A8 GPTQ) is checked by the bytes pinned in
/// `tests/pipeline/byte_identity.rs`, which predate it.
#[test]
fn kept_activations_follow_weight_changes() {
    use compress::model::llama::{DecoderLayer, Step};
    let ckpt = Checkpoint::open(&common::ref_model()).unwrap();
    let cfg = &ckpt.config;
    let outer = Outer::load(&ckpt, false).unwrap();
    let rope = Rope::new(cfg, 512).unwrap();
    let x = &batches(&outer, cfg.vocab_size)[2];
    let layer = LayerWeights::load(&ckpt, 0).unwrap();
    let mut none = |_: Site, _: &[f32], _: usize, _: usize| Ok(());
    let Step::Stopped(inner) = DecoderLayer::new(&layer, cfg)
        .forward_from(x, None, &rope, &mut none, Some(LLAMA.mlp.input))
        .unwrap()
    else {
        panic!()
    };
    // o_proj changed after the activations were kept: continuing is wrong, running is right
    let mut changed = layer.clone();
    let o = changed.linears.get_mut("self_attn.o_proj").unwrap();
    let mut w = o.weight().clone();
    w[[3, 5]] += 0.25;
    o.set_weight(w).unwrap();
    assert!(!changed.linears["self_attn.o_proj"].same_forward(&layer.linears["self_attn.o_proj"]));
    assert!(layer.linears["self_attn.q_proj"].same_forward(&changed.linears["self_attn.q_proj"]));
    let run = |l: &LayerWeights, from| {
        let mut none = |_: Site, _: &[f32], _: usize, _: usize| Ok(());
        match DecoderLayer::new(l, cfg)
            .forward_from(x, from, &rope, &mut none, None)
            .unwrap()
        {
            Step::Done(y) => bits(&y.data),
            Step::Stopped(_) => panic!(),
        }
    };
    assert_ne!(run(&changed, None), run(&changed, Some(&inner)));
    assert_eq!(run(&layer, None), run(&layer, Some(&inner)));
}
