//! The decoder layer as the engine runs it (GPU when there is one, else CPU), and running the
//! calibration batches side by side: the forward mechanics every other engine file calls.

use crate::model::layer::{LayerWeights, Site};
use crate::model::llama::{Act, DecoderLayer, Inner, Rope, Step};
use crate::model::ModelConfig;
use anyhow::{bail, Context, Result};

/// Batches in flight per thread when they run side by side (bounds the rows held at once).
const SIDE_BY_SIDE_GROUP: usize = 4;

/// The largest batch (rows × the layer's widest dimension) that runs side by side: on the
/// reference model (widths 256/768), peer calibration (one document per batch, ≤ 512 tokens)
/// took 9.4–10.3 s side by side against 13.1–15.9 s with threaded GEMMs, and 8 × 512-token
/// batches 13.6 s against 15.8–16.8 s, the same bytes written.
const SIDE_BY_SIDE_MAX_CELLS: usize = 1 << 22;
/// Layers wider than this never run side by side: each batch in flight holds its own XᵀX per
/// site (widest² floats), and their products are large enough to split well.
const SIDE_BY_SIDE_MAX_WIDTH: usize = 2048;

/// The decoder layer as the engine runs it: on the active GPU when there is one (the layer's
/// weights uploaded once; each batch's hidden states go up, the site inputs the hooks see and
/// the output come back), else on the CPU. Both compute the same function (`tests/cuda.rs`).
/// Layers whose linears quantize their inputs (W8A8) run on the CPU.
pub(super) struct LayerRun<'a> {
    cpu: DecoderLayer<'a>,
    /// The same layer for forwards without hooks (a mixture's experts on routed rows only).
    plain: DecoderLayer<'a>,
    #[cfg(feature = "cuda")]
    gpu: Option<(
        crate::backend::cuda_layer::GpuLayer,
        crate::backend::cuda_layer::GpuRope,
    )>,
}

impl<'a> LayerRun<'a> {
    pub(super) fn new(
        layer: &'a LayerWeights,
        cfg: &'a ModelConfig,
        inputs: &[Act],
    ) -> Result<Self> {
        #[cfg(feature = "cuda")]
        let gpu = {
            use crate::backend::cuda_layer::{GpuLayer, GpuRope};
            let max_t = inputs.iter().map(|a| a.t).max().unwrap_or(1);
            // (a mixture of experts runs on the CPU: the GPU layer is the dense one)
            if layer.linears.values().all(|l| l.act_quant().is_none())
                && !inputs.is_empty()
                && !cfg.block().is_moe()
            {
                crate::backend::with_gpu(|g| -> Result<_> {
                    Ok((
                        GpuLayer::upload(g, layer, cfg)?,
                        GpuRope::new(g, cfg, max_t)?,
                    ))
                })
                .transpose()?
            } else {
                None
            }
        };
        #[cfg(not(feature = "cuda"))]
        let _ = inputs;
        Ok(LayerRun {
            cpu: DecoderLayer::new(layer, cfg),
            plain: DecoderLayer::new(layer, cfg).routed_only(),
            #[cfg(feature = "cuda")]
            gpu,
        })
    }

    pub(super) fn forward_until(
        &self,
        x: &Act,
        rope: &Rope,
        hook: &mut crate::model::llama::Hook,
        stop: Option<Site>,
    ) -> Result<Option<Act>> {
        #[cfg(feature = "cuda")]
        if let Some((gl, gr)) = &self.gpu {
            if let Some(r) = crate::backend::with_gpu(|g| {
                gl.forward_hooked(g, &x.data, x.b, x.t, gr, hook, stop)
            }) {
                return Ok(r?.map(|data| Act {
                    data,
                    b: x.b,
                    t: x.t,
                }));
            }
        }
        self.cpu.forward_until(x, rope, hook, stop)
    }

    /// The statistics forward: `hook` gets each site's rows and, when `grams`, their XᵀX —
    /// computed on the GPU when the layer runs there, else `None` (the caller computes it).
    pub(super) fn forward_stats(
        &self,
        x: &Act,
        rope: &Rope,
        hook: &mut crate::model::llama::StatsHook,
        grams: bool,
        stop: Option<Site>,
        from: Option<&Inner>,
    ) -> Result<Option<Inner>> {
        #[cfg(feature = "cuda")]
        if let (Some((gl, gr)), None) = (&self.gpu, from) {
            if let Some(r) = crate::backend::with_gpu(|g| {
                gl.forward_with_grams(g, &x.data, x.b, x.t, gr, hook, grams, stop)
            }) {
                return r.map(|_| None);
            }
        }
        let _ = grams;
        let mut h = |site: Site, v: &[f32], rows: usize, d: usize| hook(site, v, rows, d, None);
        Ok(match self.cpu.forward_from(x, from, rope, &mut h, stop)? {
            Step::Stopped(inner) => Some(inner),
            Step::Done(_) => None,
        })
    }

    /// Whether activations inside the layer can be kept and continued from (on the CPU; the
    /// GPU path computes its own and they never mix).
    pub(super) fn resumable(&self) -> bool {
        #[cfg(feature = "cuda")]
        if self.gpu.is_some() {
            return false;
        }
        true
    }

    /// Whether the calibration batches run side by side, one per thread with single-threaded
    /// GEMMs ([`crate::model::ops::single_threaded`]): on the CPU, for batches small enough
    /// that splitting each product over the threads costs more in synchronization than it
    /// gains (documents-mode calibration gives a batch per document, a few hundred tokens).
    pub(super) fn side_by_side(&self, inputs: &[Act], cfg: &ModelConfig) -> bool {
        #[cfg(feature = "cuda")]
        if self.gpu.is_some() {
            return false;
        }
        let widest = cfg.hidden_size.max(cfg.intermediate_size);
        let rows = inputs.iter().map(|a| a.rows()).max().unwrap_or(0);
        inputs.len() > 1
            && rayon::current_num_threads() > 1
            && widest <= SIDE_BY_SIDE_MAX_WIDTH
            && rows * widest <= SIDE_BY_SIDE_MAX_CELLS
    }

    /// `f` on every batch (its index, the batch), each result handed to `sink` in batch order.
    /// Side by side when `side_by_side` ([`Self::side_by_side`]): groups of
    /// [`SIDE_BY_SIDE_GROUP`] batches per thread, each batch's GEMMs on its own thread, a
    /// group's results sunk before the next group starts (bounding what is held); the first
    /// error in batch order is returned. Otherwise one batch after another.
    pub(super) fn each_batch<T: Send>(
        &self,
        inputs: &[Act],
        side_by_side: bool,
        f: impl Fn(usize, &Act) -> Result<T> + Sync,
        mut sink: impl FnMut(T) -> Result<()>,
    ) -> Result<()>
    where
        Self: Sync,
    {
        use rayon::prelude::*;
        if !side_by_side {
            for (bi, x) in inputs.iter().enumerate() {
                sink(f(bi, x)?)?;
            }
            return Ok(());
        }
        let per_group = SIDE_BY_SIDE_GROUP * rayon::current_num_threads();
        for (g, group) in inputs.chunks(per_group).enumerate() {
            let out: Vec<Result<T>> = group
                .par_iter()
                .enumerate()
                .with_max_len(1)
                .map(|(j, x)| crate::model::ops::single_threaded(|| f(g * per_group + j, x)))
                .collect();
            for r in out {
                sink(r?)?;
            }
        }
        Ok(())
    }

    /// The layer's output on every batch, in order (side by side for small batches).
    pub(super) fn forward_all(
        &self,
        inputs: &[Act],
        cfg: &ModelConfig,
        rope: &Rope,
    ) -> Result<Vec<Act>> {
        self.forward_all_from(inputs, cfg, rope, None)
    }

    /// As [`Self::forward_all`], continuing each batch from its kept activations when given
    /// (one per batch, from [`Kept`] checked against the layer).
    pub(super) fn forward_all_from(
        &self,
        inputs: &[Act],
        cfg: &ModelConfig,
        rope: &Rope,
        from: Option<&[Inner]>,
    ) -> Result<Vec<Act>> {
        let one = |j: usize, x: &Act| -> Result<Act> {
            match from {
                Some(f) if self.resumable() => {
                    let mut no_hook = |_: Site, _: &[f32], _: usize, _: usize| Ok(());
                    match self
                        .plain
                        .forward_from(x, Some(&f[j]), rope, &mut no_hook, None)?
                    {
                        Step::Done(y) => Ok(y),
                        Step::Stopped(_) => bail!("forward stopped early"),
                    }
                }
                _ => self.forward(x, rope),
            }
        };
        let mut out = Vec::with_capacity(inputs.len());
        self.each_batch(inputs, self.side_by_side(inputs, cfg), one, |y| {
            out.push(y);
            Ok(())
        })?;
        Ok(out)
    }

    fn forward(&self, x: &Act, rope: &Rope) -> Result<Act> {
        // on the GPU without a hook: no site input comes back to the host
        #[cfg(feature = "cuda")]
        if let Some((gl, gr)) = &self.gpu {
            if let Some(r) = crate::backend::with_gpu(|g| gl.forward(g, &x.data, x.b, x.t, gr)) {
                return Ok(Act {
                    data: r?,
                    b: x.b,
                    t: x.t,
                });
            }
        }
        let mut no_hook = |_: Site, _: &[f32], _: usize, _: usize| Ok(());
        self.plain
            .forward_until(x, rope, &mut no_hook, None)?
            .context("forward stopped early")
    }
}
