//! SparseGPT — Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
//! Pruned in One-Shot" (ICML 2023), Algorithm 1.
//!
//! The layer-wise problem is GPTQ's, min ‖WX − ŴX‖², with H = 2/n·XᵀX: columns are visited
//! left to right and each is fixed — pruned weights to zero — with the error moved onto the
//! later columns through the Cholesky factor U of H⁻¹ (the OBS update, eq. 3/Alg. 1; the sweep
//! itself is shared with GPTQ in `sweep.rs`). What SparseGPT adds is the mask:
//!
//! * **adaptive mask selection** (§3.2): at the start of every block of B_s columns (the lazy
//!   block, `block_size`, default 128), rank the block's weights of all rows by the OBS
//!   saliency w² / [H⁻¹]_jj² = w² / U_jj² computed on the weights *as updated so far*, and
//!   prune the lowest p% of the block;
//! * **N:M** (§3.3): at every M-th column, in each row, prune the M−N lowest-saliency weights
//!   of the next M columns;
//! * **joint sparsification and quantization** (§3.4, `quantize:`): in the same sweep, every
//!   kept weight is quantized (GPTQ's grid; group parameters from the updated weights) and its
//!   quantization error is compensated along with the pruning error.
//!
//! Dead inputs and dampening (with GPTQ's step-up-and-record policy when Cholesky fails) are
//! as in GPTQ.

use super::gptq::{Grid, GridRow, Ordering};
use super::harness::{Done, PerLinear, Schedule};
use super::prune::{Pattern, PruneSpec};
use super::sweep::{self, ColumnRule, Factor};
use super::Scheme;
use crate::engine::stats::StatsRequest;
use crate::engine::{LayerCtx, Pass};
use crate::model::layer::Mask;
use crate::model::DType;
use crate::quant::{scale_dtype_for, QuantArgs, QuantizedLinear};
use anyhow::{bail, Context, Result};
use ndarray::Array2;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparseGptSpec {
    #[serde(flatten)]
    pub prune: PruneSpec,
    /// λ = damp · mean(diag H), stepped up ×10 (and recorded) when Cholesky fails.
    #[serde(default = "d_damp")]
    pub damp: f64,
    /// Columns per mask-selection and lazy-update block (B_s = B in the paper).
    #[serde(default = "d_block")]
    pub block_size: usize,
    /// Joint mode: quantize the kept weights in the same sweep (bits, group_size, sym, …).
    #[serde(default)]
    pub quantize: Option<JointScheme>,
}

/// The grid of the joint mode (the quantization fields of `rtn`/`gptq`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JointScheme {
    #[serde(default = "d_bits")]
    pub bits: u32,
    #[serde(default = "d_group")]
    pub group_size: i64,
    #[serde(default = "d_true")]
    pub sym: bool,
}

fn d_damp() -> f64 {
    0.01
}
fn d_block() -> usize {
    128
}
fn d_bits() -> u32 {
    4
}
fn d_group() -> i64 {
    128
}
fn d_true() -> bool {
    true
}

impl JointScheme {
    pub fn args(&self) -> Result<QuantArgs> {
        Scheme {
            scheme: None,
            bits: self.bits,
            strategy: crate::quant::Strategy::Group,
            group_size: self.group_size,
            sym: self.sym,
            observer: crate::quant::Observer::MinMax,
            targets: vec![],
            ignore: vec![],
            act_bits: None,
        }
        .args()
    }
}

impl SparseGptSpec {
    pub fn validate(&self) -> Result<()> {
        self.prune.validate()?;
        if !(self.damp > 0.0 && self.damp < 1.0) {
            bail!("field `damp` must be in (0, 1), found {}", self.damp);
        }
        if self.block_size == 0 {
            bail!("field `block_size` must be at least 1");
        }
        if let Pattern::NM { m, .. } = self.prune.pattern {
            if !self.block_size.is_multiple_of(m) {
                bail!(
                    "field `block_size` ({}) must be a multiple of M ({m}) for pattern {}",
                    self.block_size,
                    self.prune.pattern
                );
            }
        }
        if let Some(q) = &self.quantize {
            q.args()?.validate()?;
        }
        Ok(())
    }
}

pub struct SparseGpt {
    spec: SparseGptSpec,
    joint: Option<QuantArgs>,
    select: super::select::Selector,
}

impl SparseGpt {
    pub fn new(spec: &SparseGptSpec) -> Result<Self> {
        spec.validate()?;
        Ok(SparseGpt {
            spec: spec.clone(),
            joint: spec.quantize.as_ref().map(|q| q.args()).transpose()?,
            select: super::select::Selector::new(&spec.prune.targets, &spec.prune.ignore)?,
        })
    }
}

/// What pruning one matrix produced.
pub struct SparseGptResult {
    pub mask: Mask,
    /// The updated weights (pruned ones exactly zero).
    pub weight: Array2<f32>,
    /// Joint mode: the codes of the kept weights (pruned ones at the zero point).
    pub quant: Option<QuantizedLinear>,
    /// Σ e² of the sweep.
    pub loss: f64,
    pub damp: f64,
}

/// SparseGPT on one weight matrix `w` [rows, cols] with Hessian `h` [cols, cols].
#[allow(clippy::too_many_arguments)]
pub fn sparsegpt_prune(
    w: &Array2<f32>,
    h: &Array2<f64>,
    pattern: Pattern,
    sparsity: f64,
    damp: f64,
    block_size: usize,
    joint: Option<(&QuantArgs, DType)>,
) -> Result<SparseGptResult> {
    let (rows, cols) = w.dim();
    if h.dim() != (cols, cols) {
        bail!("Hessian is {:?}, expected [{cols}, {cols}]", h.dim());
    }
    if let Pattern::NM { m, .. } = pattern {
        if !cols.is_multiple_of(m) {
            bail!("pattern {pattern}: in_features {cols} is not a multiple of {m}");
        }
    }
    let mut w = w.clone();
    let mut h = h.clone();
    sweep::fix_dead_inputs(&mut w, &mut h);
    let order = Ordering {
        act_order: false,
        static_groups: false,
    };
    let grid = joint
        .map(|(a, dt)| Grid::new(&w, a, dt, order, (0..cols).collect(), None))
        .transpose()?;
    let f = Factor::new(&h, damp)?;
    let rule = Rule {
        pattern,
        sparsity,
        rows,
        cols,
        grid: grid.as_ref(),
    };
    let mut wr: Vec<f32> = w.iter().copied().collect();
    let mut states: Vec<Row> = (0..rows)
        .map(|_| Row {
            keep: vec![true; cols],
            grid: grid.as_ref().map(|g| g.row()),
        })
        .collect();
    let loss = sweep::sweep(&mut wr, cols, &f, block_size, &rule, &mut states);
    let keep: Vec<bool> = states.iter().flat_map(|s| s.keep.iter().copied()).collect();
    let quant = grid.map(|g| g.finish(states.into_iter().filter_map(|s| s.grid).collect()));
    Ok(SparseGptResult {
        mask: Mask::new((rows, cols), keep)?,
        weight: Array2::from_shape_vec((rows, cols), wr)?,
        quant,
        loss: loss.iter().sum(),
        damp: f.damp,
    })
}

struct Rule<'a> {
    pattern: Pattern,
    sparsity: f64,
    rows: usize,
    cols: usize,
    grid: Option<&'a Grid>,
}

struct Row {
    /// This row's mask so far (`false` = pruned).
    keep: Vec<bool>,
    grid: Option<GridRow>,
}

impl ColumnRule for Rule<'_> {
    type Row = Row;
    /// Unstructured: the block's pruned positions, [rows, i2 − i1].
    type Block = Option<(usize, Vec<bool>)>;

    fn begin_block(&self, i1: usize, i2: usize, w: &[f32], f: &Factor) -> Self::Block {
        if self.pattern != Pattern::Unstructured {
            return None;
        }
        // §3.2: saliency w²/U_jj² of the block's weights as updated so far; prune the lowest
        // (the k lowest by a total order — saliency, then position — so ties are broken the
        // same way on every run; a selection, not a sort: O(n) instead of O(n log n))
        let width = i2 - i1;
        let mut sal: Vec<(f32, usize)> = vec![(0.0, 0); self.rows * width];
        sal.par_chunks_mut(width).enumerate().for_each(|(r, row)| {
            for (c, s) in row.iter_mut().enumerate() {
                let j = i1 + c;
                let d = f.diag(j);
                let x = w[r * self.cols + j];
                *s = (x * x / (d * d), r * width + c);
            }
        });
        let k = (sal.len() as f64 * self.sparsity).floor() as usize;
        let mut pruned = vec![false; self.rows * width];
        if k == sal.len() {
            pruned.fill(true);
        } else if k > 0 {
            let (lower, kth, _) =
                sal.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            pruned[kth.1] = true;
            for (_, i) in lower.iter() {
                pruned[*i] = true;
            }
        }
        Some((i1, pruned))
    }

    fn column(
        &self,
        block: &Self::Block,
        st: &mut Row,
        r: usize,
        i: usize,
        wr: &[f32],
        f: &Factor,
    ) -> f32 {
        let pruned = match (self.pattern, block) {
            (Pattern::NM { n, m }, _) => {
                if i.is_multiple_of(m) {
                    // §3.3: the M−N lowest w²/U_jj² of the next M columns of this row
                    let mut idx: Vec<usize> = (i..i + m).collect();
                    idx.sort_by(|&a, &b| {
                        let s = |j: usize| wr[j] * wr[j] / (f.diag(j) * f.diag(j));
                        s(a).total_cmp(&s(b)).then(a.cmp(&b))
                    });
                    for &j in idx.iter().take(m - n) {
                        st.keep[j] = false;
                    }
                }
                !st.keep[i]
            }
            (Pattern::Unstructured, Some((i1, p))) => {
                let width = p.len() / self.rows;
                let gone = p[r * width + (i - i1)];
                if gone {
                    st.keep[i] = false;
                }
                gone
            }
            (Pattern::Unstructured, None) => false,
        };
        match (self.grid, st.grid.as_mut()) {
            (Some(g), Some(gr)) => g.column(gr, r, i, wr, pruned),
            _ if pruned => 0.0,
            _ => wr[i],
        }
    }
}

impl Pass for SparseGpt {
    fn name(&self) -> String {
        "sparsegpt".into()
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest {
            hessian: true,
            ..Default::default()
        }
    }

    fn apply(&self, ctx: &mut LayerCtx) -> Result<()> {
        // every linear's Hessian from the layer's inputs before pruning (one statistics
        // forward), as the reference implementation and llm-compressor do
        let harness = PerLinear {
            pass: "sparsegpt",
            select: &self.select,
            schedule: Schedule::OneForward,
        };
        harness.each(ctx, |ctx, l| {
            let h = super::hessian_or_identity(
                ctx,
                l.name,
                "pruned by weight magnitude (identity Hessian)",
            )?;
            let target = self.spec.prune.target_at(ctx.index())?;
            let lin = &ctx.layer.linears[l.name];
            let joint = self.joint.as_ref().map(|a| (a, scale_dtype_for(lin.dtype)));
            let r = sparsegpt_prune(
                lin.weight(),
                &h,
                self.spec.prune.pattern,
                target,
                self.spec.damp,
                self.spec.block_size,
                joint,
            )?;
            let sparsity = r.mask.sparsity();
            let lin = ctx
                .layer
                .linears
                .get_mut(l.name)
                .context("linear present")?;
            let before = lin.weight().clone();
            lin.set_mask(r.mask)?;
            match r.quant {
                Some(q) => lin.set_quantized(q),
                None => lin.set_weight(r.weight),
            }?;
            let mut done = Done {
                error: Some(crate::linalg::rel_output_error(&before, lin.weight(), &h)),
                loss: Some(r.loss),
                damp: Some((self.spec.damp, r.damp)),
                ..Default::default()
            }
            .note("sparsity", sparsity);
            done.notes.extend(self.spec.prune.notes_at(ctx.index()));
            Ok(done)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn problem(rows: usize, cols: usize, n: usize, seed: u64) -> (Array2<f32>, Array2<f64>) {
        crate::testing::correlated_problem(rows, cols, n, seed, false)
    }

    fn out_err(w: &Array2<f32>, wh: &Array2<f32>, h: &Array2<f64>) -> f64 {
        crate::linalg::rel_output_error(w, wh, h)
    }

    #[test]
    fn beats_magnitude_and_wanda_on_correlated_inputs() {
        let (w, h) = problem(32, 64, 256, 1);
        let norms: Vec<f64> = (0..64).map(|j| (h[[j, j]] / 2.0 * 256.0).sqrt()).collect();
        for pattern in [Pattern::Unstructured, Pattern::NM { n: 2, m: 4 }] {
            let sg = sparsegpt_prune(&w, &h, pattern, 0.5, 0.01, 32, None).unwrap();
            let mag: Vec<f32> = w.iter().map(|v| v.abs()).collect();
            let mm =
                super::super::prune::mask_from_scores(&mag, 32, 64, pattern, 0.5, false).unwrap();
            let wa = super::super::wanda::wanda_scores(&w, &norms);
            let wm =
                super::super::prune::mask_from_scores(&wa, 32, 64, pattern, 0.5, true).unwrap();
            let apply = |m: &Mask| {
                let mut x = w.clone();
                x.iter_mut().zip(&m.keep).for_each(|(v, k)| {
                    if !k {
                        *v = 0.0
                    }
                });
                x
            };
            let (e_sg, e_mag, e_wanda) = (
                out_err(&w, &sg.weight, &h),
                out_err(&w, &apply(&mm), &h),
                out_err(&w, &apply(&wm), &h),
            );
            assert!((sg.mask.sparsity() - 0.5).abs() < 1e-9, "{pattern}");
            assert!(
                e_sg < e_mag && e_sg < e_wanda,
                "{pattern}: sparsegpt {e_sg} magnitude {e_mag} wanda {e_wanda}"
            );
            // pruned weights are exactly zero
            assert!(sg
                .weight
                .iter()
                .zip(&sg.mask.keep)
                .all(|(v, k)| *k || *v == 0.0));
        }
    }

    #[test]
    fn identity_hessian_is_magnitude() {
        let (w, _) = problem(16, 32, 64, 2);
        let h = Array2::from_diag(&ndarray::Array1::from_elem(32, 1.0f64));
        // one block over all columns: SparseGPT ranks w²/U_jj² with U_jj all equal = |w|
        let sg = sparsegpt_prune(&w, &h, Pattern::Unstructured, 0.5, 0.01, 32, None).unwrap();
        let mag: Vec<f32> = w.iter().map(|v| v.abs()).collect();
        let mm =
            super::super::prune::mask_from_scores(&mag, 16, 32, Pattern::Unstructured, 0.5, false)
                .unwrap();
        assert_eq!(sg.mask, mm);
        // no correlation, nothing to compensate: kept weights unchanged
        for ((a, b), k) in sg.weight.iter().zip(w.iter()).zip(&sg.mask.keep) {
            assert_eq!(*a, if *k { *b } else { 0.0 });
        }
        let sg = sparsegpt_prune(&w, &h, Pattern::NM { n: 2, m: 4 }, 0.5, 0.01, 32, None).unwrap();
        let mm = super::super::prune::mask_from_scores(
            &mag,
            16,
            32,
            Pattern::NM { n: 2, m: 4 },
            0.5,
            false,
        )
        .unwrap();
        assert_eq!(sg.mask, mm);
    }

    #[test]
    fn joint_mode_keeps_the_mask_and_quantizes_the_rest() {
        let (w, h) = problem(16, 64, 256, 3);
        let args = JointScheme {
            bits: 4,
            group_size: 32,
            sym: false,
        }
        .args()
        .unwrap();
        let r = sparsegpt_prune(
            &w,
            &h,
            Pattern::NM { n: 2, m: 4 },
            0.5,
            0.01,
            32,
            Some((&args, DType::F32)),
        )
        .unwrap();
        let q = r.quant.unwrap();
        let dq = q.dequantize();
        for (i, k) in r.mask.keep.iter().enumerate() {
            if !k {
                assert_eq!(dq.as_slice().unwrap()[i], 0.0);
            }
        }
        assert_eq!(
            dq, r.weight,
            "the sweep's fixed values are the dequantized codes"
        );
        for g in r.mask.keep.chunks(4) {
            assert_eq!(g.iter().filter(|k| **k).count(), 2);
        }
    }
}
