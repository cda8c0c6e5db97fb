//! What the engine offers a pass beyond accumulated statistics: the raw inputs at a site, the
//! block's output with candidate weights, and the teacher stream (the dense model's hidden
//! states at the layer's input and output, carried beside the compressed stream) — and that a
//! resumed run restores the teacher stream from the work folder.

use crate::common;
use anyhow::Result;
use compress::engine::stats::StatsRequest;
use compress::engine::{LayerCtx, LayerSink, Pass};
use compress::export::{Exporter, Format};
use compress::model::arch::LLAMA;
use compress::model::llama::{Act, Part};
use compress::model::Checkpoint;
use compress::resume::{Fingerprint, ResumableSink};
use std::sync::{Arc, Mutex};

/// What the probe saw at each layer: (layer, Σ teacher_in, Σ teacher_out, Σ student inputs).
type Log = Arc<Mutex<Vec<(usize, f64, f64, f64)>>>;

fn sum(a: &[Act]) -> f64 {
    a.iter()
        .flat_map(|x| x.data.iter())
        .map(|&v| v as f64)
        .sum()
}

/// A test-only pass: checks the streams, then rounds every weight to a coarse grid (so the
/// student drifts from the teacher), and optionally fails at one layer (a crash).
struct Probe {
    log: Log,
    fail_at: Option<usize>,
}

impl Pass for Probe {
    fn name(&self) -> String {
        "probe".into()
    }
    fn stats(&self) -> StatsRequest {
        StatsRequest {
            teacher: true,
            ..Default::default()
        }
    }
    fn apply(&self, ctx: &mut LayerCtx) -> Result<()> {
        let l = ctx.index();
        if Some(l) == self.fail_at {
            anyhow::bail!("simulated crash at layer {l}");
        }
        let (tin, tout) = ctx.teacher()?;
        let (tin, tout) = (tin.to_vec(), tout.to_vec());
        // (a) raw inputs at a site: every token's row, `hidden` wide; bounded on request
        let tokens: usize = ctx.inputs().iter().map(|x| x.b * x.t).sum();
        let rows = ctx.site_inputs(ctx.config.block().mlp.input, None)?;
        assert_eq!(rows.iter().map(|(v, d)| v.len() / d).sum::<usize>(), tokens);
        assert!(rows.iter().all(|(_, d)| *d == ctx.config.hidden_size));
        let few = ctx.site_inputs(ctx.config.block().dense_mlp().unwrap().down_in, Some(10))?;
        assert_eq!(few.iter().map(|(v, d)| v.len() / d).sum::<usize>(), 10);
        assert_eq!(few[0].1, ctx.config.intermediate_size);
        // (b) the block's output with candidate weights: the dense layer on the teacher's input
        // is the teacher's output (at layer 0 the student's input is the teacher's)
        let dense_out = ctx.block_output(&ctx.layer)?;
        if l == 0 {
            assert_eq!(sum(ctx.inputs()), sum(&tin));
            for (a, b) in dense_out.iter().zip(&tout) {
                assert_eq!(
                    a.data, b.data,
                    "dense block output ≠ teacher output at layer 0"
                );
            }
        } else {
            // earlier layers were compressed: the student has drifted from the teacher
            assert_ne!(sum(ctx.inputs()), sum(&tin));
        }
        // (c) sub-blocks: block output = x + attention(x̂) + mlp(norm(x + attention(x̂)))
        let ai = ctx.part_inputs(Part::Attention)?;
        let attn = ctx.part_output(&ctx.layer, Part::Attention, &ai)?;
        let mi = ctx.part_inputs(Part::Mlp)?;
        let mlp = ctx.part_output(&ctx.layer, Part::Mlp, &mi)?;
        for (((x, a), m), y) in ctx.inputs().iter().zip(&attn).zip(&mlp).zip(&dense_out) {
            let r: Vec<f32> = x
                .data
                .iter()
                .zip(a)
                .zip(m)
                .map(|((x, a), m)| (x + a) + m)
                .collect();
            assert_eq!(r, y.data, "block output ≠ x + attention + mlp");
        }
        // a candidate changes the block's output
        for name in LLAMA.linear_names() {
            let lin = ctx.layer.linears.get_mut(name).unwrap();
            let w = lin.weight().mapv(|w| (w * 20.0).round() / 20.0);
            lin.set_weight(w)?;
        }
        let cand = ctx.block_output(&ctx.layer)?;
        assert_ne!(sum(&cand), sum(&dense_out));
        self.log
            .lock()
            .unwrap()
            .push((l, sum(&tin), sum(&tout), sum(ctx.inputs())));
        Ok(())
    }
}

fn calib(ckpt: &Checkpoint) -> Vec<Vec<u32>> {
    let tok = compress::calib::load_tokenizer(&ckpt.tokenizer_path()).unwrap();
    let text =
        compress::calib::read_text(&common::shared().join("data/calib/c4_calib.jsonl"), "text")
            .unwrap();
    let ids = compress::calib::tokenize(&tok, &text).unwrap();
    compress::calib::random_windows(&ids, 6, 64, 7).unwrap()
}

struct Null;
impl LayerSink for Null {
    fn layer(&mut self, _: &Checkpoint, _: &compress::model::layer::LayerWeights) -> Result<()> {
        Ok(())
    }
}

#[test]
fn passes_read_raw_inputs_candidates_and_the_teacher_and_resume_restores_it() {
    let ckpt = Checkpoint::open(&common::ref_model()).unwrap();
    let windows = calib(&ckpt);
    let opts = compress::engine::StreamOptions {
        batch: 4,
        ..Default::default()
    };
    // uninterrupted
    let full: Log = Default::default();
    let passes: Vec<Box<dyn Pass>> = vec![Box::new(Probe {
        log: full.clone(),
        fail_at: None,
    })];
    compress::engine::run(&ckpt, &passes, &windows, &opts, &mut Null, None).unwrap();
    let full = full.lock().unwrap().clone();
    assert_eq!(full.len(), ckpt.config.num_layers);

    // a run that dies at layer 3, its state on disk after layer 2, then resumed from disk
    let d = tempfile::tempdir().unwrap();
    let work = d.path().join("w");
    std::fs::create_dir_all(&work).unwrap();
    let fp = Fingerprint {
        pipeline: "test".into(),
        model: "test".into(),
        calibration: "test".into(),
        tool: "test".into(),
    };
    let first: Log = Default::default();
    {
        let mut ex = Exporter::begin(Format::Dense, &work, &ckpt, 1 << 30).unwrap();
        let mut sink = ResumableSink {
            exporter: &mut ex,
            work: work.clone(),
            fingerprint: fp.clone(),
            layer_digests: Vec::new(),
            prepared: Vec::new(),
        };
        let passes: Vec<Box<dyn Pass>> = vec![Box::new(Probe {
            log: first.clone(),
            fail_at: Some(3),
        })];
        let e = compress::engine::run(&ckpt, &passes, &windows, &opts, &mut sink, None);
        assert!(e.is_err());
    }
    let state = compress::resume::load(&work).unwrap().unwrap();
    assert_eq!(state.next_layer, 3);
    assert!(
        !state.teacher_shapes.is_empty(),
        "the teacher stream is saved"
    );
    assert!(work.join(".resume/teacher-3.bin").exists());
    compress::resume::validate(&work, &state, ckpt.config.hidden_size).unwrap();
    let rp = compress::resume::resume_point(&work, &state, ckpt.config.hidden_size).unwrap();
    let resumed: Log = Default::default();
    let mut ex = Exporter::resume(Format::Dense, &work, 1 << 30, state.exporter.clone()).unwrap();
    let mut sink = ResumableSink {
        exporter: &mut ex,
        work: work.clone(),
        fingerprint: fp,
        layer_digests: state.layer_digests.clone(),
        prepared: Vec::new(),
    };
    let passes: Vec<Box<dyn Pass>> = vec![Box::new(Probe {
        log: resumed.clone(),
        fail_at: None,
    })];
    compress::engine::run(&ckpt, &passes, &windows, &opts, &mut sink, Some(rp)).unwrap();
    let mut seen = first.lock().unwrap().clone();
    seen.extend(resumed.lock().unwrap().iter().cloned());
    assert_eq!(
        seen, full,
        "teacher and student streams after resume differ"
    );
}
