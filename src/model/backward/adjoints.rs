//! The adjoints of the block's parameter-free kernels: RMSNorm, RoPE, the head transpose and
//! causal softmax attention (GQA), each the transpose of the forward step in `model::ops`.

use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

/// RMSNorm's adjoint over rows of width d: returns ∂x and adds ∂γ into `dgamma`.
/// ρ is computed exactly as `ops::rms_norm` computes it.
pub(super) fn rms_norm_backward(
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
pub(super) fn rope_transpose_backward(
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
pub(super) fn heads_untranspose(dy: &[f32], b: usize, t: usize, h: usize, hd: usize) -> Vec<f32> {
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
