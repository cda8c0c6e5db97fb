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

use super::input_site;
use super::{sweep, Scheme};
use crate::engine::stats::StatsRequest;
use crate::engine::{LayerCtx, LinearRecord, Pass};
use crate::model::layer::Site;
use crate::model::DType;
use crate::quant::scale_dtype_for;
use crate::quant::{
    dequantize_value, group_params, quantize_value, round_to, Observer, QuantArgs, QuantizedLinear,
    Strategy,
};
use anyhow::{bail, Context, Result};
use gptaq::{asymmetric_target, Target};
use ndarray::Array2;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptqSpec {
    /// A named scheme (see [`Scheme::scheme`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default = "d_bits")]
    pub bits: u32,
    #[serde(default = "d_strategy")]
    pub strategy: Strategy,
    #[serde(default = "d_group")]
    pub group_size: i64,
    #[serde(default = "d_true")]
    pub sym: bool,
    #[serde(default = "d_observer")]
    pub observer: Observer,
    #[serde(default = "d_targets")]
    pub targets: Vec<String>,
    #[serde(default = "d_ignore")]
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

fn d_bits() -> u32 {
    4
}
fn d_strategy() -> Strategy {
    Strategy::Group
}
fn d_group() -> i64 {
    128
}
fn d_true() -> bool {
    true
}
fn d_observer() -> Observer {
    Observer::MinMax
}
fn d_targets() -> Vec<String> {
    vec!["Linear".into()]
}
fn d_ignore() -> Vec<String> {
    vec!["lm_head".into()]
}
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

/// Column order options of [`gptq_quantize_masked`].
#[derive(Clone, Copy, Debug)]
pub struct Ordering {
    pub act_order: bool,
    pub static_groups: bool,
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

/// The quantization grid of one linear as GPTQ walks it: per-row parameters that do not follow
/// the updates (channel/tensor strategies, from the original W as the reference does, and
/// static groups), or group parameters computed at each group boundary from the
/// already-updated weights (step 6).
pub struct Grid {
    args: QuantArgs,
    scale_dtype: DType,
    order: Ordering,
    /// Processing order of the columns.
    pub perm: Vec<usize>,
    gs: usize,
    n_groups: usize,
    cols: usize,
    fixed: Option<(Vec<f32>, Vec<i32>)>,
    /// NVFP4's global scale (float grids with one).
    global: Option<f32>,
}

/// One row's codes and parameters as the sweep fills them (in processing order).
pub struct GridRow {
    codes: Vec<i8>,
    scales: Vec<f32>,
    zeros: Vec<i32>,
    cur: (f32, i32),
}

impl Grid {
    pub fn new(
        w: &Array2<f32>,
        args: &QuantArgs,
        scale_dtype: DType,
        order: Ordering,
        perm: Vec<usize>,
        global: Option<f32>,
    ) -> Result<Self> {
        let (rows, cols) = w.dim();
        let params = |v: &[f32]| Self::params_of(v, args, scale_dtype, global);
        let gs = match args.strategy {
            Strategy::Block => args.group_width(cols),
            Strategy::Group | Strategy::TensorGroup => {
                if cols % args.group_size != 0 {
                    bail!(
                        "in_features {cols} is not a multiple of group_size {}",
                        args.group_size
                    );
                }
                args.group_size
            }
            _ => cols,
        };
        let n_groups = cols.div_ceil(gs);
        let fixed: Option<(Vec<f32>, Vec<i32>)> = match args.strategy {
            Strategy::Tensor => {
                let all: Vec<f32> = w.iter().copied().collect();
                let (s, z) = params(&all);
                Some((vec![s; rows], vec![z; rows]))
            }
            Strategy::Channel => {
                let mut s = vec![0f32; rows];
                let mut z = vec![0i32; rows];
                for r in 0..rows {
                    let row: Vec<f32> = w.row(r).to_vec();
                    let (a, b) = params(&row);
                    s[r] = a;
                    z[r] = b;
                }
                Some((s, z))
            }
            Strategy::Group | Strategy::TensorGroup if order.static_groups => {
                let mut s = vec![0f32; rows * n_groups];
                let mut z = vec![0i32; rows * n_groups];
                for r in 0..rows {
                    for g in 0..n_groups {
                        let v: Vec<f32> = (g * gs..(g + 1) * gs).map(|j| w[[r, j]]).collect();
                        let (a, b) = params(&v);
                        s[r * n_groups + g] = a;
                        z[r * n_groups + g] = b;
                    }
                }
                Some((s, z))
            }
            Strategy::Group | Strategy::TensorGroup => None,
            // FP8 blocks: each 128×128 tile's scale from the original weights (held per row)
            Strategy::Block => {
                let q = crate::quant::float::quantize(w.view(), args, scale_dtype, global)?;
                Some((q.scales, vec![0; rows * n_groups]))
            }
            s => bail!("GPTQ: strategy {s:?} quantizes activations, not weights"),
        };
        Ok(Grid {
            args: args.clone(),
            scale_dtype,
            order,
            perm,
            gs,
            n_groups,
            cols,
            fixed,
            global,
        })
    }

    /// Scale and zero point of one group of values: the integer grid's observer, or a float
    /// grid's scale of the group's largest magnitude (zero point 0).
    fn params_of(
        v: &[f32],
        args: &QuantArgs,
        scale_dtype: DType,
        global: Option<f32>,
    ) -> (f32, i32) {
        match args.float {
            None => group_params(v, args, scale_dtype),
            Some(_) => (
                crate::quant::float::group_scale(
                    crate::quant::float::amax(v.iter().copied()),
                    args,
                    scale_dtype,
                    global,
                ),
                0,
            ),
        }
    }

    /// Run the sweep on the active GPU ([`crate::backend::gptq_sweep`]): `None` when no GPU is
    /// active or the grid needs what the kernel does not do (dynamic groups with the MSE
    /// observer, dtypes without a device rounding). Returns the rows' states, Σ loss, damp.
    #[allow(clippy::type_complexity)]
    pub fn sweep_on_device(
        &self,
        wp: &[f32],
        rows: usize,
        hp: &Array2<f64>,
        damp: f64,
        block_size: usize,
    ) -> Option<Result<(Vec<GridRow>, f64, f64)>> {
        let scale_dtype = crate::backend::dtype_code(self.scale_dtype)?;
        if self.fixed.is_none() && self.args.observer != Observer::MinMax {
            return None;
        }
        if self.args.float.is_some() {
            // the device kernel knows integer grids only
            return None;
        }
        let gcol: Vec<i32> = match self.args.strategy {
            Strategy::Group => self.perm.iter().map(|&j| (j / self.gs) as i32).collect(),
            _ => vec![0; self.cols],
        };
        let fixed_z: Option<Vec<i32>> = self.fixed.as_ref().map(|(_, z)| z.clone());
        let job = crate::backend::SweepJob {
            w: wp,
            rows,
            cols: self.cols,
            h: hp.as_slice()?,
            damp,
            block_size,
            gs: self.gs,
            n_groups: match self.fixed {
                // channel/tensor parameters are one per row
                Some(_) if self.args.strategy != Strategy::Group => 1,
                _ => self.n_groups,
            },
            bits: self.args.bits,
            sym: self.args.symmetric,
            scale_dtype,
            fixed: self
                .fixed
                .as_ref()
                .map(|(s, _)| crate::backend::FixedParams {
                    scales: s,
                    zeros: fixed_z.as_deref().unwrap_or(&[]),
                    gcol: &gcol,
                }),
        };
        let out = crate::backend::gptq_sweep(&job)?;
        Some(out.map(|o| {
            let (ng, cols) = (self.n_groups, self.cols);
            let states = (0..rows)
                .map(|r| GridRow {
                    codes: o.codes[r * cols..(r + 1) * cols].to_vec(),
                    scales: o.dyn_scales[r * ng..(r + 1) * ng].to_vec(),
                    zeros: o.dyn_zeros[r * ng..(r + 1) * ng].to_vec(),
                    cur: (1.0, 0),
                })
                .collect();
            (states, o.loss.iter().sum(), o.damp)
        }))
    }

    pub fn row(&self) -> GridRow {
        GridRow {
            codes: vec![0; self.cols],
            scales: vec![0.0; self.n_groups],
            zeros: vec![0; self.n_groups],
            cur: (1.0, 0),
        }
    }

    /// Fix column `i` (processing order) of row `r`: its grid value, or exactly zero (code =
    /// zero point) when `pruned`. `wr` is the row's current weights.
    pub fn column(&self, st: &mut GridRow, r: usize, i: usize, wr: &[f32], pruned: bool) -> f32 {
        let (args, gs, ng) = (&self.args, self.gs, self.n_groups);
        match (args.strategy, &self.fixed) {
            (Strategy::Group | Strategy::TensorGroup | Strategy::Block, Some((s, z))) => {
                let g = self.perm[i] / gs;
                st.cur = (s[r * ng + g], z[r * ng + g]);
            }
            (Strategy::Group | Strategy::TensorGroup, None) => {
                if i.is_multiple_of(gs) {
                    st.cur = Self::params_of(&wr[i..i + gs], args, self.scale_dtype, self.global);
                    st.scales[i / gs] = st.cur.0;
                    st.zeros[i / gs] = st.cur.1;
                }
            }
            (_, Some((s, z))) => st.cur = (s[r], z[r]),
            (_, None) => unreachable!("channel/tensor parameters are fixed"),
        }
        if pruned {
            st.codes[i] = st.cur.1 as i8;
            return 0.0;
        }
        if let Some(fmt) = args.float {
            // float grids: the code nearest w / scale in f32, as for the integer grid below;
            // its value is what the stored weight dequantizes to
            let c = crate::quant::float::encode(wr[i], st.cur.0, self.global, fmt, DType::F32);
            st.codes[i] = c as i8;
            return crate::quant::float::decode(c, st.cur.0, self.global, fmt);
        }
        // The working weights are f32 (updated by the error feedback), so w/scale is computed
        // in f32 as llm-compressor's GPTQ does (GPTQ_PRECISION), even when the scales are bf16
        // values; only RTN on the stored weights rounds every op to the weight dtype, as
        // compressed-tensors does on bf16 tensors.
        let q = quantize_value(wr[i], st.cur.0, st.cur.1, args, DType::F32);
        st.codes[i] = q as i8;
        // (q − z)·s as the reference computes it: in the scale's dtype (a bf16 product for
        // bf16 checkpoints), which is also what the stored weight dequantizes to; the error
        // fed forward is measured against that.
        round_to(self.scale_dtype, dequantize_value(q, st.cur.0, st.cur.1))
    }

    /// Undo the permutation and record the parameters.
    pub fn finish(self, states: Vec<GridRow>) -> QuantizedLinear {
        let (rows, cols, gs) = (states.len(), self.cols, self.gs);
        let perm = &self.perm;
        let mut codes = vec![0i8; rows * cols];
        for (r, st) in states.iter().enumerate() {
            for j in 0..cols {
                codes[r * cols + perm[j]] = st.codes[j];
            }
        }
        let act_order = self.order.act_order;
        let (scales, zeros, g_idx) = match (self.args.strategy, self.fixed) {
            (Strategy::Group | Strategy::TensorGroup | Strategy::Block, Some((s, z))) => {
                (s, z, None)
            }
            (Strategy::Group | Strategy::TensorGroup, None) => {
                let g_idx = act_order.then(|| {
                    let mut g = vec![0i32; cols];
                    for (j, &p) in perm.iter().enumerate() {
                        g[p] = (j / gs) as i32;
                    }
                    g
                });
                let s = states.iter().flat_map(|st| st.scales.clone()).collect();
                let z = states.iter().flat_map(|st| st.zeros.clone()).collect();
                (s, z, g_idx)
            }
            (Strategy::Tensor, Some((s, z))) => (vec![s[0]], vec![z[0]], None),
            (_, Some((s, z))) => (s, z, None),
            (_, None) => unreachable!(),
        };
        QuantizedLinear {
            args: self.args.clone(),
            codes,
            scales,
            zeros: (!self.args.symmetric).then(|| zeros.iter().map(|&z| z as i8).collect()),
            g_idx,
            static_order: act_order && self.order.static_groups,
            true_sequential: false,
            scale_dtype: match self.args.float {
                Some(_) => crate::quant::float::scale_storage(&self.args, self.scale_dtype),
                None => self.scale_dtype,
            },
            global_scale: self.global,
            shape: (rows, cols),
        }
    }
}

/// GPTQ's column rule: quantize, keeping a fixed mask when given (processing order).
struct GridRule<'a> {
    grid: &'a Grid,
    keep: Option<&'a [bool]>,
}

impl sweep::ColumnRule for GridRule<'_> {
    type Row = GridRow;
    type Block = ();
    fn begin_block(&self, _: usize, _: usize, _: &[f32], _: &sweep::Factor) {}
    fn column(
        &self,
        _: &(),
        st: &mut GridRow,
        r: usize,
        i: usize,
        wr: &[f32],
        _: &sweep::Factor,
    ) -> f32 {
        let pruned = self.keep.is_some_and(|k| !k[r * self.grid.cols + i]);
        self.grid.column(st, r, i, wr, pruned)
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
        let block = ctx.config.block();
        let sites: Vec<Site> = block.sites.iter().map(|s| s.site).collect();
        let groups: Vec<Vec<&str>> = if self.spec.true_sequential {
            sites.iter().map(|s| block.readers(*s).collect()).collect()
        } else {
            vec![block.linear_names().collect()]
        };
        let teacher = self.spec.target == Target::Teacher;
        // NVFP4: one global scale per input site, from the layer's original weights
        let globals = if self.args.global_scale {
            let selected: Vec<&str> = block
                .linear_names()
                .filter(|n| self.select.selects_in(ctx, n))
                .collect();
            super::fused_global_scales(ctx, &selected)?
        } else {
            Default::default()
        };
        // GPTAQ's asymmetry statistic per input site, collected on the same weights as the
        // Hessians it pairs with
        let mut asym: std::collections::BTreeMap<Site, Array2<f64>> = Default::default();
        if !self.spec.true_sequential {
            // every linear's statistics from the layer's original inputs, one forward
            ctx.refresh()?;
            if teacher {
                asym = ctx.asymmetry(&sites)?;
            }
        }
        for group in groups {
            if self.spec.true_sequential {
                // statistics on the current (partially quantized) layer
                ctx.invalidate();
                if teacher {
                    let site = input_site(ctx, group.first().context("empty group")?)?;
                    asym = ctx.asymmetry(&[site])?;
                }
            }
            for name in group {
                let module = ctx.module_name(name);
                if !self.select.selects_in(ctx, name) {
                    continue;
                }
                let t = Instant::now();
                let h = ctx
                    .stats(input_site(ctx, name)?)?
                    .hessian()
                    .ok_or_else(|| anyhow::anyhow!("no Hessian collected"))?;
                // teacher target (GPTAQ): the weights the sweep aims at
                let mut target: Option<(Array2<f32>, f64)> = None;
                if teacher {
                    let site = input_site(ctx, name)?;
                    let wt = ctx.teacher_layer()?.linears[name].weight().clone();
                    let lin = &ctx.layer.linears[name];
                    target = Some(
                        asymmetric_target(
                            lin.weight(),
                            &wt,
                            &h,
                            asym.get(&site).context("no asymmetry statistic")?,
                            self.spec.damp,
                            self.spec.teacher_alpha(),
                        )
                        .map_err(|e| anyhow::anyhow!("{module}: {e}"))?,
                    );
                }
                let lin = &ctx.layer.linears[name];
                // a pruned linear keeps its mask (SparseGPT/Wanda then GPTQ)
                let keep = lin.mask().map(|m| m.keep.as_slice());
                let (aim, damp) = match &target {
                    Some((t, d)) => (t, *d),
                    None => (lin.weight(), self.spec.damp),
                };
                let mut r = gptq_quantize_masked(
                    aim,
                    &h,
                    &self.args,
                    scale_dtype_for(lin.dtype),
                    damp,
                    self.spec.block_size,
                    Ordering {
                        act_order: self.spec.act_order(),
                        static_groups: self.spec.static_groups(),
                    },
                    keep,
                    globals.get(name).copied(),
                )
                .map_err(|e| anyhow::anyhow!("{module}: {e}"))?;
                let rel = crate::linalg::rel_output_error(lin.weight(), &r.dequant, &h);
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
                ctx.warn_damp(&module, self.spec.damp, r.damp);
                r.quant.true_sequential = self.spec.true_sequential;
                let lin = ctx.layer.linears.get_mut(name).expect("linear present");
                lin.set_quantized(r.quant)
                    .map_err(|e| anyhow::anyhow!("{module}: {e}"))?;
                if let Some(a) = &self.act {
                    a.check_width(lin.shape().1)
                        .map_err(|e| anyhow::anyhow!("{module}: {e}"))?;
                }
                lin.set_act_quant(self.act);
                let mut notes = std::collections::BTreeMap::new();
                notes.insert("damp".into(), json!(r.damp));
                if let Some(shift) = shift {
                    notes.insert("target".into(), json!("teacher"));
                    notes.insert("target_shift".into(), json!(shift));
                }
                ctx.records.push(
                    LinearRecord::new(ctx.index(), name, "gptq", t)
                        .error(rel)
                        .loss(r.loss)
                        .notes(notes),
                );
            }
        }
        Ok(())
    }
}
