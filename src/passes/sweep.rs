//! The optimal-brain-surgeon column sweep shared by GPTQ and SparseGPT.
//!
//! Both papers solve the same layer-wise problem, min ‖WX − ŴX‖², one column at a time: fix
//! column j of W to a new value (GPTQ: its quantization; SparseGPT: zero where the mask drops
//! it, or its quantization in the joint mode) and move the error onto the columns not yet
//! fixed, with U the upper Cholesky factor of H⁻¹ (H = 2/n·XᵀX, dampened):
//!
//!   e_j = (w_j − ŵ_j) / U_jj,   w_{j+1:} ← w_{j+1:} − e_j · U_{j, j+1:}
//!
//! (GPTQ eq. 3 / Algorithm 1; SparseGPT Algorithm 1, which is the same update). Updates to
//! columns past the current block of B columns are applied once per block as a matrix product
//! ("lazy batch updates"). Rows are independent given U, so inside a block every row runs in
//! parallel; between blocks a hook sees every row's current weights — SparseGPT chooses its
//! adaptive mask there, from the weights as the earlier blocks left them.
//!
//! The caller decides what a column becomes ([`ColumnRule`]); this file only sweeps.

use anyhow::{bail, Result};
use ndarray::Array2;
use rayon::prelude::*;

/// The Cholesky factor of the dampened, permuted inverse Hessian.
pub struct Factor {
    /// U, row-major [cols, cols] in f32 (upper triangular): H⁻¹ = UᵀU.
    pub u: Vec<f32>,
    pub cols: usize,
    /// The dampening fraction finally used.
    pub damp: f64,
}

impl Factor {
    /// U for `h` (already permuted) with λ = damp · mean(diag H) added to the diagonal; when
    /// Cholesky fails, damp grows ×10 up to 1 (the caller records the value used).
    pub fn new(h: &Array2<f64>, damp: f64) -> Result<Self> {
        let cols = h.nrows();
        let mean_diag = (0..cols).map(|j| h[[j, j]]).sum::<f64>() / cols as f64;
        let mut used = damp;
        let u = loop {
            let mut hd = h.clone();
            let lambda = used * mean_diag;
            for j in 0..cols {
                hd[[j, j]] += lambda;
            }
            match crate::linalg::inverse_upper_cholesky(&hd) {
                Ok(u) => break u,
                Err(e) => {
                    if used >= 1.0 {
                        bail!("H is not positive definite even with damp {used}: {e}");
                    }
                    used = (used * 10.0).min(1.0);
                }
            }
        };
        Ok(Factor {
            u: u.iter().map(|&x| x as f32).collect(),
            cols,
            damp: used,
        })
    }

    /// U_jj.
    pub fn diag(&self, j: usize) -> f32 {
        self.u[j * self.cols + j]
    }
}

/// What each column becomes. `S` is per-row state (codes, current group parameters, an N:M
/// mask), `B` what the block hook computed for all rows (an adaptive mask).
pub trait ColumnRule: Sync {
    type Row: Send;
    type Block: Sync;
    /// Before columns `i1..i2`, with every row's current weights `w` [rows, cols].
    fn begin_block(&self, i1: usize, i2: usize, w: &[f32], f: &Factor) -> Self::Block;
    /// The fixed value of column `i` of row `r` (current weights `wr`, updated so far).
    fn column(
        &self,
        block: &Self::Block,
        row: &mut Self::Row,
        r: usize,
        i: usize,
        wr: &[f32],
        f: &Factor,
    ) -> f32;
}

/// Sweep `w` ([rows, cols] row-major, columns already in processing order) in blocks of
/// `block_size`, fixing each column by `rule`. `w` ends holding the fixed values; returns
/// Σ e² per row (the paper's loss, up to the constant ½).
pub fn sweep<R: ColumnRule>(
    w: &mut [f32],
    cols: usize,
    f: &Factor,
    block_size: usize,
    rule: &R,
    rows_state: &mut [R::Row],
) -> Vec<f64> {
    let u = &f.u;
    let mut loss = vec![0f64; rows_state.len()];
    let mut i1 = 0;
    while i1 < cols {
        let i2 = (i1 + block_size).min(cols);
        let block = rule.begin_block(i1, i2, w, f);
        w.par_chunks_mut(cols)
            .zip(rows_state.par_iter_mut())
            .zip(loss.par_iter_mut())
            .enumerate()
            .for_each(|(r, ((wr, st), lr))| {
                let mut err = [0f32; 1024];
                let mut err_v;
                let err: &mut [f32] = if i2 - i1 <= err.len() {
                    &mut err[..i2 - i1]
                } else {
                    err_v = vec![0f32; i2 - i1];
                    &mut err_v
                };
                for i in i1..i2 {
                    let x = wr[i];
                    let fixed = rule.column(&block, st, r, i, wr, f);
                    let e = (x - fixed) / u[i * cols + i];
                    *lr += (e as f64) * (e as f64);
                    wr[i] = fixed;
                    // w_{i+1..i2} -= e · U[i, i+1..i2]   (within the block)
                    let urow = &u[i * cols..(i + 1) * cols];
                    for k in i + 1..i2 {
                        wr[k] -= e * urow[k];
                    }
                    err[i - i1] = e;
                }
                // lazy batch update of the later columns: w_{i2..} -= E · U[i1..i2, i2..]
                for (bi, e) in err.iter().enumerate() {
                    let urow = &u[(i1 + bi) * cols..(i1 + bi + 1) * cols];
                    for k in i2..cols {
                        wr[k] -= e * urow[k];
                    }
                }
            });
        i1 = i2;
    }
    loss
}

/// Columns by descending H_jj (GPTQ's act-order; a stable sort keeps ties in column order).
pub fn act_order(h: &Array2<f64>) -> Vec<usize> {
    let mut p: Vec<usize> = (0..h.nrows()).collect();
    p.sort_by(|&a, &b| {
        h[[b, b]]
            .partial_cmp(&h[[a, a]])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    p
}

/// `w` and `h` with columns (and Hessian rows/columns) taken in order `perm`.
pub fn permute(w: &Array2<f32>, h: &Array2<f64>, perm: &[usize]) -> (Vec<f32>, Array2<f64>) {
    let (rows, cols) = w.dim();
    let mut wp = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        wp.extend(perm.iter().map(|&j| w[[r, j]]));
    }
    let hp = Array2::from_shape_fn((cols, cols), |(i, j)| h[[perm[i], perm[j]]]);
    (wp, hp)
}

/// Dead inputs (H_jj = 0, the column never saw a non-zero input): H_jj ← 1 and W[:, j] ← 0,
/// as both papers' reference code does.
pub fn fix_dead_inputs(w: &mut Array2<f32>, h: &mut Array2<f64>) {
    for j in 0..h.nrows() {
        if h[[j, j]] == 0.0 {
            h[[j, j]] = 1.0;
            w.column_mut(j).fill(0.0);
        }
    }
}
