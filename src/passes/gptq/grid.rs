//! GPTQ's quantization grid (Frantar et al. 2022, Algorithm 1 step 6): the per-row or
//! per-group scale and zero point a column is rounded with, integer or float, as the sweep
//! reaches it.

use super::sweep;
use crate::model::DType;
use crate::quant::QuantizedLinear;
use crate::quant::{
    dequantize_value, group_params, quantize_value, round_to, Observer, QuantArgs, Strategy,
};
use anyhow::{bail, Result};
use ndarray::Array2;

/// Column order options of [`super::gptq_quantize_masked`].
#[derive(Clone, Copy, Debug)]
pub struct Ordering {
    pub act_order: bool,
    pub static_groups: bool,
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
pub(super) struct GridRule<'a> {
    pub(super) grid: &'a Grid,
    pub(super) keep: Option<&'a [bool]>,
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
