//! A linear as the differentiable forward sees it ([`Eff`]): its forward and its adjoint
//! through W = (Q − z)·s, W = U·V and the bias, with the two GEMMs the weight gradients use.

use super::params::{Field, Params};
use crate::model::layer::{Linear, Repr};
use crate::model::ops;
use anyhow::{Context, Result};
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

/// A linear as the differentiable forward sees it: its effective matrix (or factors) built from
/// the fixed representation and the current parameters.
pub(super) struct Eff<'a> {
    name: &'a str,
    lin: &'a Linear,
    /// W [out, in] (unless factored).
    w: Vec<f32>,
    /// (U [out, r], V [r, in], r) for a factored linear.
    uv: Option<(Vec<f32>, Vec<f32>, usize)>,
    bias: Option<Vec<f32>>,
    /// Scales and rounded zero points in use (quantized with tuned parameters), [out, n_groups].
    scales: Vec<f32>,
    zeros: Option<Vec<f32>>,
    out: usize,
    inn: usize,
}

impl<'a> Eff<'a> {
    pub(super) fn new(
        name: &'a str,
        lin: &'a Linear,
        p: &Params,
        round_zeros: bool,
    ) -> Result<Self> {
        let (out, inn) = lin.shape();
        let bias = p
            .get(name, Field::Bias)
            .map(|b| b.to_vec())
            .or_else(|| lin.bias.clone());
        let mut zeros = None;
        let mut scales = Vec::new();
        let mut uv = None;
        let w = match (lin.repr(), lin.quant()) {
            (Repr::Factored { u, v }, _) => {
                let r = u.values.ncols();
                let uu = match p.get(name, Field::U) {
                    Some(x) => x.to_vec(),
                    None => u.values.iter().copied().collect(),
                };
                let vv = match p.get(name, Field::V) {
                    Some(x) => x.to_vec(),
                    None => v.values.iter().copied().collect(),
                };
                uv = Some((uu, vv, r));
                Vec::new()
            }
            (_, Some(q))
                if p.get(name, Field::Scales).is_some() || p.get(name, Field::Zeros).is_some() =>
            {
                let ng = q.n_groups();
                let s = p.get(name, Field::Scales).unwrap_or(&q.scales);
                let z: Option<Vec<f32>> = match (p.get(name, Field::Zeros), &q.zeros) {
                    (Some(z), _) if round_zeros => {
                        Some(z.iter().map(|v| v.round_ties_even()).collect())
                    }
                    (Some(z), _) => Some(z.to_vec()),
                    (None, Some(z)) => Some(z.iter().map(|&v| v as f32).collect()),
                    (None, None) => None,
                };
                let groups: Vec<usize> = (0..inn).map(|j| q.group_of(j)).collect();
                let mut w = vec![0f32; out * inn];
                w.par_chunks_mut(inn.max(1))
                    .enumerate()
                    .for_each(|(r, row)| {
                        for (j, x) in row.iter_mut().enumerate() {
                            let g = groups[j];
                            // (Q − z)·s as `quant::dequantize_value` computes it
                            let zz = z.as_ref().map_or(0.0, |z| z[r * ng + g]);
                            *x = (q.codes[r * inn + j] as f32 - zz) * s[r * ng + g];
                        }
                    });
                zeros = z;
                scales = s.to_vec();
                w
            }
            _ => lin
                .weight()
                .as_slice()
                .context("weight not contiguous")?
                .to_vec(),
        };
        Ok(Eff {
            name,
            lin,
            w,
            uv,
            bias,
            scales,
            zeros,
            out,
            inn,
        })
    }

    /// The input as the linear sees it (activation-quantized for W8A8).
    fn input<'x>(&self, x: &'x [f32]) -> std::borrow::Cow<'x, [f32]> {
        match self.lin.act_quant() {
            Some(a) => {
                let mut v = x.to_vec();
                a.apply(&mut v, self.inn);
                std::borrow::Cow::Owned(v)
            }
            None => std::borrow::Cow::Borrowed(x),
        }
    }

    /// y = x Wᵀ + b, as `Linear::forward` computes it.
    pub(super) fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let x = self.input(x);
        match &self.uv {
            Some((u, v, r)) => {
                let h = ops::linear(&x, n, self.inn, v, *r, None);
                ops::linear(&h, n, *r, u, self.out, self.bias.as_deref())
            }
            None => ops::linear(&x, n, self.inn, &self.w, self.out, self.bias.as_deref()),
        }
    }

    /// Given ∂y [n, out] and the input x [n, in], return ∂x and add the parameter gradients
    /// into `grads`.
    pub(super) fn backward(&self, x: &[f32], dy: &[f32], n: usize, grads: &mut Params) -> Vec<f32> {
        let (out, inn) = (self.out, self.inn);
        let x = self.input(x);
        if let Some(i) = grads.index(self.name, Field::Bias) {
            // ∂b = Σ_rows ∂y
            let db = &mut grads.list[i].values;
            for row in dy.chunks(out) {
                db.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
        }
        match &self.uv {
            Some((u, v, r)) => {
                let r = *r;
                let gu = grads.index(self.name, Field::U);
                let gv = grads.index(self.name, Field::V);
                // h = x Vᵀ, ∂U = ∂yᵀ h
                if let Some(i) = gu {
                    let h = ops::linear(&x, n, inn, v, r, None);
                    gemm_tn(&mut grads.list[i].values, dy, n, out, &h, r);
                }
                // ∂h = ∂y U, ∂V = ∂hᵀ x, ∂x = ∂h V
                let dh = gemm_nn(dy, n, out, u, r);
                if let Some(i) = gv {
                    gemm_tn(&mut grads.list[i].values, &dh, n, r, &x, inn);
                }
                gemm_nn(&dh, n, r, v, inn)
            }
            None => {
                let gs = grads.index(self.name, Field::Scales);
                let gz = grads.index(self.name, Field::Zeros);
                if gs.is_some() || gz.is_some() {
                    // ∂W = ∂yᵀ x, then through W = (Q − z)·s with Q fixed
                    let mut dw = vec![0f32; out * inn];
                    gemm_tn(&mut dw, dy, n, out, &x, inn);
                    let q = self.lin.quant().expect("scales only for quantized linears");
                    let ng = q.n_groups();
                    let mut ds = vec![0f64; out * ng];
                    let mut dsum = vec![0f64; out * ng];
                    for r in 0..out {
                        for j in 0..inn {
                            let g = q.group_of(j);
                            let z = self.zeros.as_ref().map_or(0.0, |z| z[r * ng + g]);
                            let d = dw[r * inn + j] as f64;
                            ds[r * ng + g] += d * (q.codes[r * inn + j] as f64 - z as f64);
                            dsum[r * ng + g] += d;
                        }
                    }
                    if let Some(i) = gs {
                        grads.list[i]
                            .values
                            .iter_mut()
                            .zip(&ds)
                            .for_each(|(a, b)| *a += *b as f32);
                    }
                    if let Some(i) = gz {
                        grads.list[i]
                            .values
                            .iter_mut()
                            .zip(dsum.iter().zip(&self.scales))
                            .for_each(|(a, (d, s))| *a += (-d * *s as f64) as f32);
                    }
                }
                // ∂x = ∂y W
                gemm_nn(dy, n, out, &self.w, inn)
            }
        }
    }
}

/// c [m, n] += aᵀ b for a [k, m], b [k, n] (row-major): a weight gradient ∂yᵀx.
fn gemm_tn(c: &mut [f32], a: &[f32], k: usize, m: usize, b: &[f32], n: usize) {
    faer::linalg::matmul::matmul(
        MatMut::from_row_major_slice_mut(c, m, n),
        Accum::Add,
        MatRef::from_row_major_slice(a, k, m).transpose(),
        MatRef::from_row_major_slice(b, k, n),
        1.0,
        Par::rayon(0),
    );
}

/// a [m, k] · b [k, n] (row-major): an input gradient ∂y W.
fn gemm_nn(a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    faer::linalg::matmul::matmul(
        MatMut::from_row_major_slice_mut(&mut c, m, n),
        Accum::Replace,
        MatRef::from_row_major_slice(a, m, k),
        MatRef::from_row_major_slice(b, k, n),
        1.0,
        Par::rayon(0),
    );
    c
}
