//! GPTQ — Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
//! Generative Pre-trained Transformers" (ICLR 2023), Algorithm 1.
//!
//! For a linear W [rows, cols] with input Hessian H = 2/n · XᵀX (eq. 1's second derivative):
//! 1. dead inputs (H_jj = 0): H_jj ← 1, W[:, j] ← 0;
//! 2. optional act-order: process columns by descending H_jj;
//! 3. dampening H ← H + λ I, λ = damp · mean(diag H); when Cholesky fails, damp grows ×10
//!    (recorded as a warning) instead of crashing;
//! 4. U = upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU; eq. 3 written with Cholesky rows);
//! 5. for each column j (in lazy blocks of B columns): q_j = quant(w_j);
//!    e_j = (w_j − q_j) / U_jj; w_{j+1:} ← w_{j+1:} − e_j · U_{j, j+1:}  (eq. 3 / Alg. 1);
//!    the updates of later blocks are applied once per block as one matrix product;
//! 6. group parameters are computed at each group boundary from the already-updated weights
//!    (or, with `static_groups`, once from the original weights).
//!
//! Every row's updates are independent of the other rows (U is shared), so rows run in
//! parallel with rayon; results do not depend on the thread count.

pub mod gptaq;
mod grid;
use grid::GridRule;
pub use grid::{Grid, GridRow, Ordering};

use super::harness::{Done, PerLinear, Schedule};
use super::input_site;
use super::{sweep, Scheme};
use crate::engine::stats::StatsRequest;
use crate::engine::{LayerCtx, Pass};
use crate::model::layer::Site;
use crate::model::DType;
use crate::quant::scale_dtype_for;
use crate::quant::{Observer, QuantArgs, QuantizedLinear, Strategy};
use anyhow::{bail, Context, Result};
use gptaq::{asymmetric_target, Target};
use ndarray::Array2;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptqSpec {
    /// A named scheme (see [`Scheme::scheme`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default = "super::default_bits")]
    pub bits: u32,
    #[serde(default = "super::default_strategy")]
    pub strategy: Strategy,
    #[serde(default = "super::default_group")]
    pub group_size: i64,
    #[serde(default = "super::default_true")]
    pub sym: bool,
    #[serde(default = "super::default_observer")]
    pub observer: Observer,
    #[serde(default = "super::default_targets")]
    pub targets: Vec<String>,
    #[serde(default = "super::default_ignore")]
    pub ignore: Vec<String>,
    /// λ = damp · mean(diag H).
    #[serde(default = "d_damp")]
    pub damp: f64,
    /// Columns per lazy-update block.
    #[serde(default = "d_block")]
    pub block_size: usize,
    /// Quantize columns in order of descending H_jj. Default by width, from measurements on a
    /// real checkpoint (SmolLM2-135M, BENCHMARKS.md): on for 4 bits and more (as
    /// llm-compressor's `actorder: static`; in column order GPTQ was worse than RTN at W4 g64,
    /// 43.82 vs 42.11, with static order 39.82), off below (at W3 g64 column order with group
    /// parameters from the updated weights gave 121.87 against 151.64 with static order: fixed
    /// groups clip the error-fed weights on a 3-bit grid).
    #[serde(default)]
    pub act_order: Option<bool>,
    /// With act_order: group parameters from the original weights, groups in column order
    /// (no g_idx needed by the serving engine, no act-order kernel). Default: on with
    /// act_order; `false` gives GPTQ's dynamic groups in activation order (g_idx written).
    #[serde(default)]
    pub static_groups: Option<bool>,
    /// q/k/v → o → gate/up → down, re-running the partial layer between (statistics of later
    /// linears see the quantized earlier ones). Off by default, as in the GPTQ reference and
    /// llm-compressor: every linear's Hessian comes from the layer's original inputs (one
    /// statistics forward per layer). Measured on ref-llama-9m, off was better at W3 g128
    /// (BENCHMARKS.md) and 1.4× faster.
    #[serde(default)]
    pub true_sequential: bool,
    /// Quantize the linears' inputs per token too (`8`: W8A8), as `rtn`'s field.
    #[serde(default)]
    pub act_bits: Option<u32>,
    /// `student` (GPTQ): reproduce each linear's own output on the compressed model's inputs;
    /// `teacher` (GPTAQ, `passes/gptq/gptaq.rs`): reproduce the dense linear on the dense model's
    /// inputs, so each layer also corrects the error of the layers compressed before it.
    #[serde(default)]
    pub target: Target,
    /// With `target: teacher`: the fraction α of the asymmetric correction applied (1: the exact
    /// least-squares target; 0: plain GPTQ). Default 0.25, the paper's: on a real checkpoint
    /// (SmolLM2-135M, W3 g64) the exact target (α = 1) overfits the calibration's asymmetry
    /// layer after layer and wrecks the model (BENCHMARKS.md, "Teacher-targeted GPTQ").
    #[serde(default)]
    pub teacher_alpha: Option<f64>,
}

/// The paper's α (its reference code's default).
pub const DEFAULT_TEACHER_ALPHA: f64 = 0.25;

fn d_damp() -> f64 {
    0.01
}
fn d_block() -> usize {
    128
}

impl GptqSpec {
    pub fn scheme(&self) -> Scheme {
        Scheme {
            scheme: self.scheme.clone(),
            bits: self.bits,
            strategy: self.strategy,
            group_size: self.group_size,
            sym: self.sym,
            observer: self.observer,
            targets: self.targets.clone(),
            ignore: self.ignore.clone(),
            act_bits: self.act_bits,
        }
    }

    /// Static groups: on by default whenever act_order is.
    pub fn static_groups(&self) -> bool {
        self.act_order() && self.static_groups.unwrap_or(true)
    }

    /// Activation order: as given, else on for 4 bits and more (see the field).
    /// α of the teacher-targeted correction (`teacher_alpha`, default the paper's 0.25).
    pub fn teacher_alpha(&self) -> f64 {
        self.teacher_alpha.unwrap_or(DEFAULT_TEACHER_ALPHA)
    }

    pub fn act_order(&self) -> bool {
        self.act_order.unwrap_or(self.bits >= 4)
    }

    pub fn validate(&self) -> Result<()> {
        self.scheme().args()?.validate()?;
        self.scheme().act_quant()?;
        if !(self.damp > 0.0 && self.damp < 1.0) {
            bail!("field `damp` must be in (0, 1), found {}", self.damp);
        }
        if self.block_size == 0 {
            bail!("field `block_size` must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.teacher_alpha()) {
            bail!(
                "field `teacher_alpha` must be in [0, 1], found {}",
                self.teacher_alpha()
            );
        }
        if self.target == Target::Student && self.teacher_alpha.is_some() {
            bail!("field `teacher_alpha` only applies with `target: teacher`");
        }
        if self.static_groups == Some(true) && !self.act_order() {
            bail!("field `static_groups` only applies with `act_order: true`");
        }
        Ok(())
    }
}

pub struct Gptq {
    spec: GptqSpec,
    act: Option<crate::model::layer::ActQuant>,
    args: QuantArgs,
    select: super::select::Selector,
}

impl Gptq {
    pub fn new(spec: &GptqSpec) -> Result<Self> {
        spec.validate()?;
        let s = spec.scheme();
        Ok(Gptq {
            act: s.act_quant()?,
            spec: spec.clone(),
            args: s.args()?,
            select: s.selector()?,
        })
    }
}

/// What quantizing one matrix produced.
pub struct GptqResult {
    pub quant: QuantizedLinear,
    pub dequant: Array2<f32>,
    /// Σ ((w − q) / U_jj)² over all weights.
    pub loss: f64,
    /// The dampening fraction finally used.
    pub damp: f64,
}

/// GPTQ on one weight matrix `w` [rows, cols] with Hessian `h` [cols, cols].
#[allow(clippy::too_many_arguments)]
pub fn gptq_quantize(
    w: &Array2<f32>,
    h: &Array2<f64>,
    args: &QuantArgs,
    scale_dtype: DType,
    damp: f64,
    block_size: usize,
    act_order: bool,
    static_groups: bool,
) -> Result<GptqResult> {
    let order = Ordering {
        act_order,
        static_groups,
    };
    let global = args.global_scale.then(|| {
        crate::quant::float::global_scale(crate::quant::float::amax(w.iter().copied()), scale_dtype)
    });
    gptq_quantize_masked(
        w,
        h,
        args,
        scale_dtype,
        damp,
        block_size,
        order,
        None,
        global,
    )
}

/// GPTQ that keeps a sparsity mask: `keep` ([rows, cols], `false` = pruned) columns are fixed
/// to exactly zero (their code is the zero point) and their error is fed forward like any
/// other, so SparseGPT followed by GPTQ stays sparse and compensated. `global` is NVFP4's
/// global scale (fused over the linears sharing an input) for grids that have one.
#[allow(clippy::too_many_arguments)]
pub fn gptq_quantize_masked(
    w: &Array2<f32>,
    h: &Array2<f64>,
    args: &QuantArgs,
    scale_dtype: DType,
    damp: f64,
    block_size: usize,
    order: Ordering,
    keep: Option<&[bool]>,
    global: Option<f32>,
) -> Result<GptqResult> {
    let (rows, cols) = w.dim();
    if h.dim() != (cols, cols) {
        bail!("Hessian is {:?}, expected [{cols}, {cols}]", h.dim());
    }
    let mut w = w.clone();
    let mut h = h.clone();
    // 1. dead inputs
    sweep::fix_dead_inputs(&mut w, &mut h);
    // 2. act-order permutation
    let perm: Vec<usize> = if order.act_order {
        sweep::act_order(&h)
    } else {
        (0..cols).collect()
    };
    let grid = Grid::new(&w, args, scale_dtype, order, perm, global)?;
    let (mut wp, hp) = sweep::permute(&w, &h, &grid.perm);
    // On an active GPU the same sweep runs there (kernels/quant.cu `gptq_block`); masks and
    // the MSE observer's dynamic groups stay on the CPU.
    if keep.is_none() {
        if let Some(r) = grid.sweep_on_device(&wp, rows, &hp, damp, block_size) {
            let (states, loss, damp) = r?;
            let quant = grid.finish(states);
            let dequant = quant.dequantize();
            return Ok(GptqResult {
                quant,
                dequant,
                loss,
                damp,
            });
        }
    }
    // 3.–4. dampening and the Cholesky factor of H⁻¹
    let f = sweep::Factor::new(&hp, damp)?;
    // 5. the column sweep, rows in parallel
    let keep_p: Option<Vec<bool>> = keep.map(|k| {
        (0..rows)
            .flat_map(|r| grid.perm.iter().map(move |&j| k[r * cols + j]))
            .collect()
    });
    let rule = GridRule {
        grid: &grid,
        keep: keep_p.as_deref(),
    };
    let mut states: Vec<GridRow> = (0..rows).map(|_| grid.row()).collect();
    let loss = sweep::sweep(&mut wp, cols, &f, block_size, &rule, &mut states);
    let quant = grid.finish(states);
    let dequant = quant.dequantize();
    Ok(GptqResult {
        quant,
        dequant,
        loss: loss.iter().sum(),
        damp: f.damp,
    })
}

/// The fallback of an expert with no Hessian, as its warning says it.
pub(crate) const STARVED: &str = "rounded to nearest (no Hessian)";

impl Gptq {
    /// An expert no calibration token reached: round-to-nearest onto the same grid (RTN's
    /// bytes), recorded with `tokens: 0` and `fallback: rtn`.
    pub(crate) fn round_starved_expert(
        &self,
        ctx: &mut LayerCtx,
        name: &str,
        global: Option<f32>,
    ) -> Result<Done> {
        let lin = ctx.layer.linears.get_mut(name).context("linear present")?;
        let mut q = super::rtn::round_to_nearest(
            lin.weight(),
            &self.args,
            scale_dtype_for(lin.dtype),
            global,
        )?;
        // the layout the other linears of this pass declare: columns in their own order, which
        // is activation order for an identity Hessian (all diagonals equal)
        q.static_order = self.spec.static_groups();
        q.true_sequential = self.spec.true_sequential;
        if self.spec.act_order() && !self.spec.static_groups() {
            let g = self.args.group_width(q.shape.1);
            q.g_idx = Some((0..q.shape.1).map(|j| (j / g) as i32).collect());
        }
        lin.set_quantized(q)?;
        lin.set_act_quant(self.act);
        Ok(Done::default().note("tokens", 0).note("fallback", "rtn"))
    }
}

impl Gptq {
    /// GPTQ of `w` (stored as `dtype`) with Hessian `h` onto this pass's grid, in its column
    /// order, keeping the mask `keep`; nothing is set on the layer.
    pub(crate) fn sweep(
        &self,
        w: &Array2<f32>,
        h: &Array2<f64>,
        dtype: DType,
        damp: f64,
        keep: Option<&[bool]>,
        global: Option<f32>,
    ) -> Result<GptqResult> {
        gptq_quantize_masked(
            w,
            h,
            &self.args,
            scale_dtype_for(dtype),
            damp,
            self.spec.block_size,
            Ordering {
                act_order: self.spec.act_order(),
                static_groups: self.spec.static_groups(),
            },
            keep,
            global,
        )
    }

    /// The dampening fraction λ / mean(diag H).
    pub fn damp(&self) -> f64 {
        self.spec.damp
    }

    /// The weights' grid.
    pub fn args(&self) -> &QuantArgs {
        &self.args
    }

    /// The column order the config blocks state for this pass's linears.
    pub fn order(&self) -> crate::formats::Order {
        match (self.spec.act_order(), self.spec.static_groups()) {
            (false, _) => crate::formats::Order::Columns,
            (true, true) => crate::formats::Order::Static,
            (true, false) => crate::formats::Order::Dynamic,
        }
    }

    /// GPTQ of the layer's linear `name` onto this pass's grid with its input Hessian `h`
    /// (aiming at `target` with its dampening when given: GPTAQ), then the codes set on the
    /// linear. `global`: NVFP4's fused global scale.
    pub(crate) fn quantize_linear(
        &self,
        ctx: &mut LayerCtx,
        name: &str,
        h: &Array2<f64>,
        target: Option<(Array2<f32>, f64)>,
        global: Option<f32>,
    ) -> Result<Done> {
        let lin = &ctx.layer.linears[name];
        // a pruned linear keeps its mask (SparseGPT/Wanda then GPTQ)
        let keep = lin.mask().map(|m| m.keep.as_slice());
        let (aim, damp) = match &target {
            Some((t, d)) => (t, *d),
            None => (lin.weight(), self.spec.damp),
        };
        let mut r = self.sweep(aim, h, lin.dtype, damp, keep, global)?;
        let rel = crate::linalg::rel_output_error(lin.weight(), &r.dequant, h);
        // how far the teacher target moved the weights: ‖W* − W‖ / ‖W‖
        let shift = target.as_ref().map(|(aim, _)| {
            let w = lin.weight();
            let num: f64 = aim
                .iter()
                .zip(w)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            let den: f64 = w.iter().map(|a| (*a as f64).powi(2)).sum();
            (num / den.max(1e-30)).sqrt()
        });
        r.quant.true_sequential = self.spec.true_sequential;
        let lin = ctx.layer.linears.get_mut(name).context("linear present")?;
        lin.set_quantized(r.quant)?;
        if let Some(a) = &self.act {
            a.check_width(lin.shape().1)?;
        }
        lin.set_act_quant(self.act);
        let mut done = Done {
            error: Some(rel),
            loss: Some(r.loss),
            damp: Some((self.spec.damp, r.damp)),
            ..Default::default()
        };
        // a mixture's expert: the calibration tokens its statistics saw
        let site = input_site(ctx, name)?;
        if ctx.config.block().site(site).expert.is_some() {
            done = done.note("tokens", ctx.stats(site)?.n);
        }
        if let Some(shift) = shift {
            done = done.note("target", "teacher").note("target_shift", shift);
        }
        Ok(done)
    }

    /// The harness of this pass.
    fn harness(&self) -> PerLinear<'_> {
        PerLinear {
            pass: "gptq",
            select: &self.select,
            schedule: if self.spec.true_sequential {
                Schedule::TrueSequential
            } else {
                Schedule::OneForward
            },
        }
    }
}

impl Pass for Gptq {
    fn name(&self) -> String {
        "gptq".into()
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest {
            hessian: true,
            teacher: self.spec.target == Target::Teacher,
            ..Default::default()
        }
    }

    fn apply(&self, ctx: &mut LayerCtx) -> Result<()> {
        let harness = self.harness();
        // NVFP4: one global scale per input site, from the layer's original weights
        let globals = if self.args.global_scale {
            super::fused_global_scales(ctx, &harness.selected(ctx))?
        } else {
            Default::default()
        };
        let teacher = self.spec.target == Target::Teacher;
        harness.run(
            ctx,
            // GPTAQ's asymmetry statistic per input site, on the weights the group's Hessians
            // are collected on
            |ctx, group| {
                if !teacher {
                    return Ok(Default::default());
                }
                let mut sites: Vec<Site> = group
                    .iter()
                    .map(|n| input_site(ctx, n))
                    .collect::<Result<_>>()?;
                sites.dedup();
                ctx.asymmetry(&sites)
            },
            |ctx, asym, lin| {
                let global = globals.get(lin.name).copied();
                let Some(h) = super::linear_hessian(ctx, lin.name, STARVED)? else {
                    return self.round_starved_expert(ctx, lin.name, global);
                };
                // teacher target (GPTAQ): the weights the sweep aims at
                let target = if teacher {
                    let site = input_site(ctx, lin.name)?;
                    let wt = ctx.teacher_layer()?.linears[lin.name].weight();
                    Some(asymmetric_target(
                        ctx.layer.linears[lin.name].weight(),
                        wt,
                        &h,
                        asym.get(&site).context("no asymmetry statistic")?,
                        self.spec.damp,
                        self.spec.teacher_alpha(),
                    )?)
                } else {
                    None
                };
                self.quantize_linear(ctx, lin.name, &h, target, global)
            },
        )
    }
}
