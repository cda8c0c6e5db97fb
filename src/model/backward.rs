//! The decoder block's backward pass, beside the forward it mirrors (`llama.rs`, `ops.rs`,
//! `attention.rs`): given the block input X and ∂L/∂Y at its output, the gradient with respect
//! to X and to the block's *continuous* parameters — what block-wise distillation (`passes/kd.rs`)
//! tunes while the integer codes, masks and dense weights stay fixed:
//!
//! * RMSNorm weights (`input_layernorm`, `post_attention_layernorm`, Qwen3's q/k norms);
//! * linear biases;
//! * quantization scales s and, for asymmetric grids, zero points z of W = (Q − z)·s, with the
//!   integer codes Q held fixed and z rounded to an integer in the forward (straight-through:
//!   ∂round(z)/∂z := 1);
//! * the two factors of a low-rank linear, W = U·V.
//!
//! A sparse linear keeps its mask: its masked codes dequantize to 0 for any scale, and its
//! zero points are not tunable (moving them would un-prune). An activation quantizer on a
//! linear's input (W8A8) is passed straight through for ∂L/∂X.
//!
//! The block (transformers' `LlamaDecoderLayer`):
//!
//!   h₁ = RMSNorm(x; γ₁)                       RMSNorm(x)ᵢ = γᵢ·xᵢ·ρ, ρ = (mean(x²) + ε)^{-1/2}
//!   q, k, v = h₁W_qᵀ(+b), h₁W_kᵀ(+b), h₁W_vᵀ(+b);   Qwen3: q, k ← RMSNorm per head
//!   q̃, k̃ = RoPE(q), RoPE(k)                  (rotate-half)
//!   A = softmax(q̃k̃ᵀ/√d + causal) v           (GQA: head h reads kv group h / (n_h/n_kv))
//!   r = x + A W_oᵀ
//!   h₂ = RMSNorm(r; γ₂)
//!   y = r + (silu(h₂W_gᵀ) ⊙ h₂W_uᵀ) W_dᵀ
//!
//! and its adjoints, each written next to the step it reverses in [`backward`]:
//!
//!   linear  y = xWᵀ + b:   ∂x = ∂y W,  ∂W = ∂yᵀx,  ∂b = Σ_rows ∂y
//!           W = U V:       ∂U = ∂yᵀ(xVᵀ),  ∂V = (∂y U)ᵀ x,  ∂x = (∂y U) V
//!           W = (Q − z)s:  ∂s_{rg} = Σ_{j∈g} ∂W_{rj}(Q_{rj} − z_{rg}),  ∂z_{rg} = −s_{rg} Σ_{j∈g} ∂W_{rj}
//!   RMSNorm: ∂γ = Σ_rows ∂h ⊙ x ρ,   ∂x = ρ(γ⊙∂h) − x ρ³ ⟨γ⊙∂h, x⟩ / d
//!   RoPE:    the transpose of the rotation (rotate by −θ)
//!   softmax attention (per head):  P = softmax(S), O = P V:
//!           ∂V = Pᵀ∂O,  ∂P = ∂O Vᵀ,  ∂S = P ⊙ (∂P − rowsum(∂P ⊙ P)),  ∂Q = ∂S K/√d,  ∂K = ∂Sᵀ Q/√d
//!   SwiGLU:  a = silu(g)·u:  ∂u = ∂a silu(g),  ∂g = ∂a u σ(g)(1 + g(1 − σ(g)))
//!
//! The forward here runs the same kernels as the model's forward, so on unchanged parameters
//! it computes the same block output (tested); the backward is checked against central finite
//! differences for every parameter group.

use super::layer::{LayerWeights, Linear, Repr};
use super::llama::{Act, Rope};
use super::ops;
use crate::config::ModelConfig;
use anyhow::{ensure, Context, Result};
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// The groups of continuous parameters distillation can tune.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Group {
    Norms,
    Scales,
    Zeros,
    Factors,
    Biases,
}

/// Which tensor of its owner a parameter is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// An RMSNorm weight (owner: the norm's name).
    Norm,
    Bias,
    Scales,
    /// Zero points as reals (the forward rounds them).
    Zeros,
    /// Low-rank factor U [out, r].
    U,
    /// Low-rank factor V [r, in].
    V,
}

impl Field {
    pub fn group(&self) -> Group {
        match self {
            Field::Norm => Group::Norms,
            Field::Bias => Group::Biases,
            Field::Scales => Group::Scales,
            Field::Zeros => Group::Zeros,
            Field::U | Field::V => Group::Factors,
        }
    }
}

/// One tunable tensor: `owner` is a norm name or a linear name (`mlp.down_proj`).
#[derive(Clone, Debug)]
pub struct Param {
    pub owner: String,
    pub field: Field,
    pub values: Vec<f32>,
}

/// The tunable tensors of a block, in a fixed order (norms by name, then linears by name and
/// field), and — with the same layout — their gradients.
#[derive(Clone, Debug, Default)]
pub struct Params {
    pub list: Vec<Param>,
}

impl Params {
    /// The current values of the groups in `groups` that `layer` has (a dense linear has no
    /// scales, a symmetric or sparse one no tunable zero points, only factored linears have
    /// factors; quantized factors and per-tensor grids stay fixed).
    pub fn of(layer: &LayerWeights, groups: &[Group]) -> Params {
        let has = |g| groups.contains(&g);
        let mut list = Vec::new();
        if has(Group::Norms) {
            for (n, (v, _)) in &layer.norms {
                list.push(Param {
                    owner: n.clone(),
                    field: Field::Norm,
                    values: v.clone(),
                });
            }
        }
        for (name, lin) in &layer.linears {
            let mut push = |field, values: Vec<f32>| {
                list.push(Param {
                    owner: name.clone(),
                    field,
                    values,
                })
            };
            if has(Group::Biases) {
                if let Some(b) = &lin.bias {
                    push(Field::Bias, b.clone());
                }
            }
            // a per-tensor grid has one scale for the whole matrix: left as it is
            let per_row = |q: &crate::quant::QuantizedLinear| {
                q.args.strategy != crate::quant::Strategy::Tensor
            };
            if let Some(q) = lin.quant().filter(|q| per_row(q)) {
                if has(Group::Scales) {
                    push(Field::Scales, q.scales.clone());
                }
                if let (true, Some(z), None) = (has(Group::Zeros), &q.zeros, lin.mask()) {
                    push(Field::Zeros, z.iter().map(|&z| z as f32).collect());
                }
            }
            if let (true, Repr::Factored { u, v }) = (has(Group::Factors), lin.repr()) {
                if u.quant.is_none() && v.quant.is_none() {
                    push(Field::U, u.values.iter().copied().collect());
                    push(Field::V, v.values.iter().copied().collect());
                }
            }
        }
        Params { list }
    }

    pub fn get(&self, owner: &str, field: Field) -> Option<&[f32]> {
        self.list
            .iter()
            .find(|p| p.owner == owner && p.field == field)
            .map(|p| p.values.as_slice())
    }

    fn index(&self, owner: &str, field: Field) -> Option<usize> {
        self.list
            .iter()
            .position(|p| p.owner == owner && p.field == field)
    }

    /// Zeros of the same layout (a gradient accumulator).
    pub fn zeros_like(&self) -> Params {
        Params {
            list: self
                .list
                .iter()
                .map(|p| Param {
                    owner: p.owner.clone(),
                    field: p.field,
                    values: vec![0.0; p.values.len()],
                })
                .collect(),
        }
    }

    /// self += other (same layout), elementwise in a fixed order.
    pub fn add(&mut self, other: &Params) {
        for (a, b) in self.list.iter_mut().zip(&other.list) {
            a.values
                .iter_mut()
                .zip(&b.values)
                .for_each(|(a, b)| *a += b);
        }
    }

    /// Number of scalar parameters.
    pub fn len(&self) -> usize {
        self.list.iter().map(|p| p.values.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A linear as the differentiable forward sees it: its effective matrix (or factors) built from
/// the fixed representation and the current parameters.
struct Eff<'a> {
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
    fn new(name: &'a str, lin: &'a Linear, p: &Params, round_zeros: bool) -> Result<Self> {
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
    fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
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
    fn backward(&self, x: &[f32], dy: &[f32], n: usize, grads: &mut Params) -> Vec<f32> {
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

/// RMSNorm's adjoint over rows of width d: returns ∂x and adds ∂γ into `dgamma`.
/// ρ is computed exactly as `ops::rms_norm` computes it.
fn rms_norm_backward(
    x: &[f32],
    d: usize,
    gamma: &[f32],
    eps: f32,
    dh: &[f32],
    dgamma: Option<&mut [f32]>,
) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    let rho: Vec<f32> = x
        .par_chunks(d)
        .map(|xr| {
            let ms = xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d as f64;
            1.0 / ((ms as f32) + eps).sqrt()
        })
        .collect();
    dx.par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(dh.par_chunks(d)))
        .zip(rho.par_iter())
        .for_each(|((dxr, (xr, dhr)), &r)| {
            // ⟨γ⊙∂h, x⟩
            let dot: f64 = (0..d)
                .map(|j| (gamma[j] * dhr[j]) as f64 * xr[j] as f64)
                .sum();
            let c = (dot as f32) * r * r * r / d as f32;
            for j in 0..d {
                dxr[j] = r * gamma[j] * dhr[j] - xr[j] * c;
            }
        });
    if let Some(dg) = dgamma {
        for ((xr, dhr), &r) in x.chunks(d).zip(dh.chunks(d)).zip(&rho) {
            for j in 0..d {
                dg[j] += dhr[j] * xr[j] * r;
            }
        }
    }
    dx
}

/// The adjoint of `ops::rope_transpose`: ∂ [b, h, t, hd] → ∂x [b, t, h, hd] (rotation by −θ).
fn rope_transpose_backward(
    dy: &[f32],
    b: usize,
    t: usize,
    h: usize,
    hd: usize,
    cos: &[f32],
    sin: &[f32],
) -> Vec<f32> {
    let half = hd / 2;
    debug_assert_eq!(dy.len(), b * t * h * hd);
    let mut dx = vec![0f32; dy.len()];
    dx.par_chunks_mut(h * hd).enumerate().for_each(|(bt, out)| {
        let (bi, ti) = (bt / t, bt % t);
        let (c, s) = (
            &cos[ti * half..(ti + 1) * half],
            &sin[ti * half..(ti + 1) * half],
        );
        for hi in 0..h {
            let src = &dy[((bi * h + hi) * t + ti) * hd..][..hd];
            let dst = &mut out[hi * hd..(hi + 1) * hd];
            for i in 0..half {
                let (d1, d2) = (src[i], src[i + half]);
                dst[i] = d1 * c[i] + d2 * s[i];
                dst[i + half] = -d1 * s[i] + d2 * c[i];
            }
        }
    });
    dx
}

/// The adjoint of `ops::heads_transpose`: [b, h, t, hd] → [b, t, h, hd].
fn heads_untranspose(dy: &[f32], b: usize, t: usize, h: usize, hd: usize) -> Vec<f32> {
    let mut dx = vec![0f32; dy.len()];
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                dx[((bi * t + ti) * h + hi) * hd..][..hd]
                    .copy_from_slice(&dy[((bi * h + hi) * t + ti) * hd..][..hd]);
            }
        }
    }
    dx
}

/// The adjoint of `attention::causal_attention`: given q [b, nh, t, hd], k, v [b, nkv, t, hd]
/// and ∂out [b, t, nh·hd], return (∂q, ∂k, ∂v) in the layouts of q, k, v. P is recomputed
/// per head as the forward computes it; the heads of a KV group add their ∂k, ∂v in head order.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    hd: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rep = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let per_head: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..b * nh)
        .into_par_iter()
        .map(|bh| {
            let (bi, h) = (bh / nh, bh % nh);
            let g = h / rep;
            let qh = &q[(bi * nh + h) * t * hd..][..t * hd];
            let kh = &k[(bi * nkv + g) * t * hd..][..t * hd];
            let vh = &v[(bi * nkv + g) * t * hd..][..t * hd];
            let mut dout_h = vec![0f32; t * hd];
            for i in 0..t {
                dout_h[i * hd..(i + 1) * hd]
                    .copy_from_slice(&dout[((bi * t + i) * nh + h) * hd..][..hd]);
            }
            // S = Q Kᵀ/√d, P = softmax over j ≤ i (as the forward: exp of terms below −30 is 0)
            let mut p = vec![0f32; t * t];
            mm(&mut p, qh, t, hd, false, kh, t, true, scale);
            for i in 0..t {
                let row = &mut p[i * t..(i + 1) * t];
                let (live, masked) = row.split_at_mut(i + 1);
                crate::model::ops::softmax_row(live);
                masked.iter_mut().for_each(|x| *x = 0.0);
            }
            // ∂V = Pᵀ ∂O
            let mut dv = vec![0f32; t * hd];
            mm(&mut dv, &p, t, t, true, &dout_h, hd, false, 1.0);
            // ∂P = ∂O Vᵀ, ∂S = P ⊙ (∂P − rowsum(∂P ⊙ P))
            let mut ds = vec![0f32; t * t];
            mm(&mut ds, &dout_h, t, hd, false, vh, t, true, 1.0);
            for i in 0..t {
                let (pr, dr) = (&p[i * t..(i + 1) * t], &mut ds[i * t..(i + 1) * t]);
                let c: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                dr.iter_mut().zip(pr).for_each(|(d, p)| *d = p * (*d - c));
            }
            // ∂Q = ∂S K/√d, ∂K = ∂Sᵀ Q/√d
            let mut dq = vec![0f32; t * hd];
            mm(&mut dq, &ds, t, t, false, kh, hd, false, scale);
            let mut dk = vec![0f32; t * hd];
            mm(&mut dk, &ds, t, t, true, qh, hd, false, scale);
            (dq, dk, dv)
        })
        .collect();
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    for (bh, (hq, hk, hv)) in per_head.iter().enumerate() {
        let (bi, h) = (bh / nh, bh % nh);
        let g = h / rep;
        dq[(bi * nh + h) * t * hd..][..t * hd].copy_from_slice(hq);
        let o = (bi * nkv + g) * t * hd;
        dk[o..o + t * hd]
            .iter_mut()
            .zip(hk)
            .for_each(|(a, b)| *a += b);
        dv[o..o + t * hd]
            .iter_mut()
            .zip(hv)
            .for_each(|(a, b)| *a += b);
    }
    (dq, dk, dv)
}

/// c [m, n] = α · op(a) · op(b), a stored [m, k] (or [k, m] when `ta`), b stored [k, n] (or
/// [n, k] when `tb`); one thread (callers run heads in parallel).
#[allow(clippy::too_many_arguments)]
fn mm(
    c: &mut [f32],
    a: &[f32],
    m: usize,
    k: usize,
    ta: bool,
    b: &[f32],
    n: usize,
    tb: bool,
    alpha: f32,
) {
    let am = if ta {
        MatRef::from_row_major_slice(a, k, m).transpose()
    } else {
        MatRef::from_row_major_slice(a, m, k)
    };
    let bm = if tb {
        MatRef::from_row_major_slice(b, n, k).transpose()
    } else {
        MatRef::from_row_major_slice(b, k, n)
    };
    faer::linalg::matmul::matmul(
        MatMut::from_row_major_slice_mut(c, m, n),
        Accum::Replace,
        am,
        bm,
        alpha,
        Par::Seq,
    );
}

/// What the forward keeps for the backward.
pub struct Tape {
    b: usize,
    t: usize,
    x: Vec<f32>,
    h1: Vec<f32>,
    /// q, k before the per-head norms (Qwen3) — the norms' inputs.
    q_pre: Vec<f32>,
    k_pre: Vec<f32>,
    /// After RoPE and the head transpose, [b, h, t, hd].
    qr: Vec<f32>,
    kr: Vec<f32>,
    vt: Vec<f32>,
    attn: Vec<f32>,
    r: Vec<f32>,
    h2: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    act: Vec<f32>,
}

/// The decoder block with parameters `p` (and everything else from `layer`), differentiable.
pub struct Block<'a> {
    cfg: &'a ModelConfig,
    layer: &'a LayerWeights,
    p: &'a Params,
    lin: std::collections::BTreeMap<&'a str, Eff<'a>>,
}

impl<'a> Block<'a> {
    pub fn new(layer: &'a LayerWeights, cfg: &'a ModelConfig, p: &'a Params) -> Result<Self> {
        Self::with_rounding(layer, cfg, p, true)
    }

    /// `round_zeros: false` evaluates zero points as given (real-valued): the function whose
    /// derivative the straight-through gradient is (for the finite-difference check).
    fn with_rounding(
        layer: &'a LayerWeights,
        cfg: &'a ModelConfig,
        p: &'a Params,
        round_zeros: bool,
    ) -> Result<Self> {
        let mut lin = std::collections::BTreeMap::new();
        for (name, l) in &layer.linears {
            lin.insert(name.as_str(), Eff::new(name, l, p, round_zeros)?);
        }
        Ok(Block { cfg, layer, p, lin })
    }

    fn norm(&self, name: &str) -> Result<&[f32]> {
        if let Some(v) = self.p.get(name, Field::Norm) {
            return Ok(v);
        }
        self.layer
            .norms
            .get(name)
            .map(|(v, _)| v.as_slice())
            .with_context(|| format!("layer {}: missing `{name}`", self.layer.index))
    }

    fn eff(&self, name: &str) -> Result<&Eff<'a>> {
        self.lin
            .get(name)
            .with_context(|| format!("layer {}: missing `{name}`", self.layer.index))
    }

    /// The block output on `x`, and the tape for [`Block::backward`].
    pub fn forward(&self, x: &Act, rope: &Rope) -> Result<(Vec<f32>, Tape)> {
        let cfg = self.cfg;
        let (b, t) = (x.b, x.t);
        let n = b * t;
        let d = cfg.hidden_size;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps as f32;
        let (cos, sin, max_t) = rope.tables();
        ensure!(
            t <= max_t,
            "sequence of {t} tokens exceeds the RoPE table ({max_t})"
        );
        ensure!(x.data.len() == n * d, "hidden state has the wrong size");
        let h1 = ops::rms_norm(&x.data, d, self.norm("input_layernorm")?, eps);
        let q_pre = self.eff("self_attn.q_proj")?.forward(&h1, n);
        let k_pre = self.eff("self_attn.k_proj")?.forward(&h1, n);
        let v = self.eff("self_attn.v_proj")?.forward(&h1, n);
        let (q, k) = if cfg.qk_norm {
            (
                ops::rms_norm(&q_pre, hd, self.norm("self_attn.q_norm")?, eps),
                ops::rms_norm(&k_pre, hd, self.norm("self_attn.k_norm")?, eps),
            )
        } else {
            (q_pre.clone(), k_pre.clone())
        };
        let qr = ops::rope_transpose(&q, b, t, nh, hd, cos, sin);
        let kr = ops::rope_transpose(&k, b, t, nkv, hd, cos, sin);
        let vt = ops::heads_transpose(&v, b, t, nkv, hd);
        let attn = super::attention::causal_attention(&qr, &kr, &vt, b, nh, nkv, t, hd);
        let o = self.eff("self_attn.o_proj")?.forward(&attn, n);
        let mut r = x.data.clone();
        ops::add_assign(&mut r, &o);
        let h2 = ops::rms_norm(&r, d, self.norm("post_attention_layernorm")?, eps);
        let g = self.eff("mlp.gate_proj")?.forward(&h2, n);
        let u = self.eff("mlp.up_proj")?.forward(&h2, n);
        let act = ops::silu_mul(&g, &u);
        let dn = self.eff("mlp.down_proj")?.forward(&act, n);
        let mut y = r.clone();
        ops::add_assign(&mut y, &dn);
        let tape = Tape {
            b,
            t,
            x: x.data.clone(),
            h1,
            q_pre,
            k_pre,
            qr,
            kr,
            vt,
            attn,
            r,
            h2,
            g,
            u,
            act,
        };
        Ok((y, tape))
    }

    /// ∂L/∂x for ∂L/∂y = `dy`, adding the parameter gradients into `grads` (the layout of
    /// `Params::zeros_like` of this block's parameters).
    pub fn backward(
        &self,
        tape: &Tape,
        dy: &[f32],
        rope: &Rope,
        grads: &mut Params,
    ) -> Result<Vec<f32>> {
        let cfg = self.cfg;
        let (b, t) = (tape.b, tape.t);
        let n = b * t;
        let d = cfg.hidden_size;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps as f32;
        let (cos, sin, _) = rope.tables();
        ensure!(dy.len() == n * d, "output gradient has the wrong size");
        // y = r + down(a): ∂r = ∂y, ∂a = down'ᵀ ∂y
        let da = self.eff("mlp.down_proj")?.backward(&tape.act, dy, n, grads);
        // a = silu(g) u
        let mut dg = vec![0f32; da.len()];
        let mut du = vec![0f32; da.len()];
        dg.par_chunks_mut(4096)
            .zip(du.par_chunks_mut(4096))
            .zip(
                da.par_chunks(4096)
                    .zip(tape.g.par_chunks(4096).zip(tape.u.par_chunks(4096))),
            )
            .for_each(|((dg, du), (da, (g, u)))| {
                for i in 0..da.len() {
                    let s = 1.0 / (1.0 + crate::model::ops::exp_f32(-g[i]));
                    du[i] = da[i] * g[i] * s;
                    dg[i] = da[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                }
            });
        let mut dh2 = self.eff("mlp.gate_proj")?.backward(&tape.h2, &dg, n, grads);
        ops::add_assign(
            &mut dh2,
            &self.eff("mlp.up_proj")?.backward(&tape.h2, &du, n, grads),
        );
        // h₂ = RMSNorm(r): ∂r = ∂y + RMSNorm'ᵀ ∂h₂
        let mut dr = {
            let name = "post_attention_layernorm";
            let gi = grads.index(name, Field::Norm);
            let dgam = gi.map(|i| grads.list[i].values.as_mut_slice());
            rms_norm_backward(&tape.r, d, self.norm(name)?, eps, &dh2, dgam)
        };
        ops::add_assign(&mut dr, dy);
        // r = x + o_proj(A)
        let dattn = self
            .eff("self_attn.o_proj")?
            .backward(&tape.attn, &dr, n, grads);
        let (dqr, dkr, dvt) =
            causal_attention_backward(&tape.qr, &tape.kr, &tape.vt, &dattn, b, nh, nkv, t, hd);
        let mut dq = rope_transpose_backward(&dqr, b, t, nh, hd, cos, sin);
        let mut dk = rope_transpose_backward(&dkr, b, t, nkv, hd, cos, sin);
        let dv = heads_untranspose(&dvt, b, t, nkv, hd);
        if cfg.qk_norm {
            for (name, pre, dd) in [
                ("self_attn.q_norm", &tape.q_pre, &mut dq),
                ("self_attn.k_norm", &tape.k_pre, &mut dk),
            ] {
                let gi = grads.index(name, Field::Norm);
                let dgam = gi.map(|i| grads.list[i].values.as_mut_slice());
                *dd = rms_norm_backward(pre, hd, self.norm(name)?, eps, dd, dgam);
            }
        }
        let mut dh1 = self
            .eff("self_attn.q_proj")?
            .backward(&tape.h1, &dq, n, grads);
        ops::add_assign(
            &mut dh1,
            &self
                .eff("self_attn.k_proj")?
                .backward(&tape.h1, &dk, n, grads),
        );
        ops::add_assign(
            &mut dh1,
            &self
                .eff("self_attn.v_proj")?
                .backward(&tape.h1, &dv, n, grads),
        );
        let name = "input_layernorm";
        let gi = grads.index(name, Field::Norm);
        let dgam = gi.map(|i| grads.list[i].values.as_mut_slice());
        let mut dx = rms_norm_backward(&tape.x, d, self.norm(name)?, eps, &dh1, dgam);
        ops::add_assign(&mut dx, &dr);
        Ok(dx)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::layer::{Factor, Mask};
    use crate::model::llama::DecoderLayer;
    use crate::quant::{Observer, QuantArgs, Strategy};
    use crate::safetensors_file::DType;
    use ndarray::Array2;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;

    pub fn rnd(n: usize, amp: f32, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-amp..amp)).collect()
    }

    pub fn tiny_config(model_type: &str) -> ModelConfig {
        let raw = serde_json::json!({"model_type": model_type, "hidden_size": 32,
            "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 50, "rms_norm_eps": 1e-5});
        ModelConfig::from_value(raw, std::path::Path::new("config.json")).unwrap()
    }

    fn args(bits: u32, symmetric: bool, strategy: Strategy, group_size: usize) -> QuantArgs {
        QuantArgs {
            bits,
            symmetric,
            strategy,
            group_size,
            observer: Observer::MinMax,
        }
    }

    /// A random block holding every representation: q asymmetric group-quantized, k symmetric
    /// quantized, v factored, o sparse + quantized, gate dense, up sparse (dense values), down
    /// asymmetric per-channel quantized; biases where the family has them; random norms.
    pub fn random_block(cfg: &ModelConfig, seed: u64) -> LayerWeights {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut linears = BTreeMap::new();
        for name in cfg.block().linear_names() {
            let desc = cfg.block().linear(name).unwrap();
            let (out, inn) = match name {
                "self_attn.q_proj" => (cfg.num_heads * cfg.head_dim, cfg.hidden_size),
                "self_attn.k_proj" | "self_attn.v_proj" => {
                    (cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size)
                }
                "self_attn.o_proj" => (cfg.hidden_size, cfg.num_heads * cfg.head_dim),
                "mlp.down_proj" => (cfg.hidden_size, cfg.intermediate_size),
                _ => (cfg.intermediate_size, cfg.hidden_size),
            };
            let amp = 1.7 / (inn as f32).sqrt();
            let w = Array2::from_shape_vec((out, inn), rnd(out * inn, amp, &mut rng)).unwrap();
            let bias = cfg.has_bias(desc).then(|| rnd(out, 0.3, &mut rng));
            let mut l = Linear::dense(w.clone(), bias, DType::BF16);
            let quant = |l: &mut Linear, a: QuantArgs| {
                let q = crate::quant::quantize_rtn(l.weight().view(), &a, DType::BF16).unwrap();
                l.set_quantized(q).unwrap();
            };
            match name {
                "self_attn.q_proj" => quant(&mut l, args(3, false, Strategy::Group, 16)),
                "self_attn.k_proj" => quant(&mut l, args(4, true, Strategy::Group, 16)),
                "self_attn.v_proj" => {
                    let r = 5;
                    let u = Array2::from_shape_vec((out, r), rnd(out * r, 0.5, &mut rng));
                    let v = Array2::from_shape_vec((r, inn), rnd(r * inn, 0.5, &mut rng));
                    let f = |values| Factor {
                        values,
                        quant: None,
                    };
                    l.set_factored(f(u.unwrap()), f(v.unwrap())).unwrap();
                }
                "self_attn.o_proj" | "mlp.up_proj" => {
                    let keep: Vec<bool> = (0..out * inn).map(|i| i % 4 < 2).collect();
                    l.set_mask(Mask::new((out, inn), keep).unwrap()).unwrap();
                    if name == "self_attn.o_proj" {
                        quant(&mut l, args(4, true, Strategy::Group, 16));
                    }
                }
                "mlp.down_proj" => quant(&mut l, args(3, false, Strategy::Channel, 0)),
                _ => {}
            }
            linears.insert(name.to_string(), l);
        }
        let mut norms = BTreeMap::new();
        for (n, _) in cfg.block().norms {
            let d = if n.contains("q_norm") || n.contains("k_norm") {
                cfg.head_dim
            } else {
                cfg.hidden_size
            };
            let v: Vec<f32> = (0..d).map(|_| rng.gen_range(0.5f32..1.5)).collect();
            norms.insert(n.to_string(), (v, DType::BF16));
        }
        LayerWeights {
            index: 0,
            linears,
            norms,
            norms_modified: false,
        }
    }

    pub fn random_act(cfg: &ModelConfig, b: usize, t: usize, seed: u64) -> Act {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        Act {
            data: rnd(b * t * cfg.hidden_size, 1.5, &mut rng),
            b,
            t,
        }
    }

    const ALL: [Group; 5] = [
        Group::Norms,
        Group::Scales,
        Group::Zeros,
        Group::Factors,
        Group::Biases,
    ];

    #[test]
    fn forward_is_the_models_forward() {
        for ty in ["llama", "qwen2", "qwen3"] {
            let cfg = tiny_config(ty);
            let layer = random_block(&cfg, 1);
            let x = random_act(&cfg, 2, 9, 2);
            let rope = Rope::new(&cfg, 16).unwrap();
            let p = Params::of(&layer, &ALL);
            let (y, _) = Block::new(&layer, &cfg, &p)
                .unwrap()
                .forward(&x, &rope)
                .unwrap();
            let mut no = |_: crate::model::layer::Site, _: &[f32], _: usize, _: usize| Ok(());
            let want = DecoderLayer::new(&layer, &cfg)
                .forward(&x, &rope, &mut no)
                .unwrap();
            let err = y
                .iter()
                .zip(&want.data)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err <= 1e-6, "{ty}: max abs difference {err}");
        }
    }

    /// L = ½ Σ (y − target)² in f64.
    fn loss(block: &Block, x: &Act, rope: &Rope, target: &[f32]) -> f64 {
        let (y, _) = block.forward(x, rope).unwrap();
        y.iter()
            .zip(target)
            .map(|(a, b)| 0.5 * ((*a as f64) - (*b as f64)).powi(2))
            .sum()
    }

    /// Directional central differences (L(θ + hδ) − L(θ − hδ)) / 2h against ⟨∂L/∂θ, δ⟩ for
    /// every parameter tensor (one random direction each) and for the input, on random blocks
    /// of three families (biases: qwen2; per-head q/k norms: qwen3). Zero points are checked on
    /// the unrounded function, whose derivative the straight-through gradient is.
    #[test]
    fn gradients_match_finite_differences() {
        for (fam, ty) in ["llama", "qwen2", "qwen3"].iter().enumerate() {
            let cfg = tiny_config(ty);
            let layer = random_block(&cfg, 10 + fam as u64);
            let x = random_act(&cfg, 2, 7, 20 + fam as u64);
            let rope = Rope::new(&cfg, 16).unwrap();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(30 + fam as u64);
            let target = rnd(x.data.len(), 1.0, &mut rng);
            let p = Params::of(&layer, &ALL);
            let mut groups: Vec<Group> = p.list.iter().map(|q| q.field.group()).collect();
            groups.dedup();
            for g in ALL {
                if g == Group::Biases && *ty != "qwen2" {
                    continue;
                }
                assert!(groups.contains(&g), "{ty}: no {g:?} parameters to check");
            }
            let block = Block::with_rounding(&layer, &cfg, &p, false).unwrap();
            let (y, tape) = block.forward(&x, &rope).unwrap();
            let dy: Vec<f32> = y.iter().zip(&target).map(|(a, b)| a - b).collect();
            let mut grads = p.zeros_like();
            let dx = block.backward(&tape, &dy, &rope, &mut grads).unwrap();
            let check = |what: &str, an: f64, fd: f64| {
                // a check of a vanishing gradient would pass whatever the backward computes
                assert!(
                    fd.abs() > 1e-2,
                    "{ty} {what}: finite differences {fd:.3e} too small to check"
                );
                let tol = 2e-2 * an.abs().max(fd.abs()) + 1e-3;
                assert!(
                    (an - fd).abs() <= tol,
                    "{ty} {what}: analytic {an:.6e}, finite differences {fd:.6e}"
                );
            };
            for (i, par) in p.list.iter().enumerate() {
                let rms = (par.values.iter().map(|v| v * v).sum::<f32>() / par.values.len() as f32)
                    .sqrt();
                let h = 1e-2 * rms.max(0.05);
                let dir = rnd(par.values.len(), 1.0, &mut rng);
                let an: f64 = grads.list[i]
                    .values
                    .iter()
                    .zip(&dir)
                    .map(|(g, d)| *g as f64 * *d as f64)
                    .sum();
                let at = |sign: f32| {
                    let mut q = p.clone();
                    q.list[i]
                        .values
                        .iter_mut()
                        .zip(&dir)
                        .for_each(|(v, d)| *v += sign * h * d);
                    let b = Block::with_rounding(&layer, &cfg, &q, false).unwrap();
                    loss(&b, &x, &rope, &target)
                };
                let fd = (at(1.0) - at(-1.0)) / (2.0 * h as f64);
                check(&format!("{} {:?}", par.owner, par.field), an, fd);
            }
            // the input
            let dir = rnd(x.data.len(), 1.0, &mut rng);
            let h = 1e-2f32;
            let an: f64 = dx
                .iter()
                .zip(&dir)
                .map(|(g, d)| *g as f64 * *d as f64)
                .sum();
            let at = |sign: f32| {
                let mut xx = x.clone();
                xx.data
                    .iter_mut()
                    .zip(&dir)
                    .for_each(|(v, d)| *v += sign * h * d);
                loss(&block, &xx, &rope, &target)
            };
            check("input", an, (at(1.0) - at(-1.0)) / (2.0 * h as f64));
        }
    }

    /// Attention's adjoint on its own, at a length past one forward block (64 rows), with GQA.
    #[test]
    fn attention_backward_matches_finite_differences() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (b, nh, nkv, t, hd) = (1, 4, 2, 70, 8);
        let q = rnd(b * nh * t * hd, 1.0, &mut rng);
        let k = rnd(b * nkv * t * hd, 1.0, &mut rng);
        let v = rnd(b * nkv * t * hd, 1.0, &mut rng);
        let w = rnd(b * t * nh * hd, 1.0, &mut rng);
        let f = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            let o = crate::model::attention::causal_attention(q, k, v, b, nh, nkv, t, hd);
            o.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let (dq, dk, dv) = causal_attention_backward(&q, &k, &v, &w, b, nh, nkv, t, hd);
        for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
            let dir = rnd(grad.len(), 1.0, &mut rng);
            let h = 1e-2f32;
            let shifted = |s: f32| {
                let mut a = [q.clone(), k.clone(), v.clone()];
                a[which]
                    .iter_mut()
                    .zip(&dir)
                    .for_each(|(x, d)| *x += s * h * d);
                f(&a[0], &a[1], &a[2])
            };
            let fd = (shifted(1.0) - shifted(-1.0)) / (2.0 * h as f64);
            let an: f64 = grad
                .iter()
                .zip(&dir)
                .map(|(g, d)| *g as f64 * *d as f64)
                .sum();
            assert!(
                (an - fd).abs() <= 1e-2 * an.abs().max(fd.abs()) + 1e-3,
                "tensor {which}: analytic {an}, finite differences {fd}"
            );
        }
    }
}
