//! Teacher-targeted GPTQ — Li, Yin, Panda et al., "GPTAQ (GPTQv2): Efficient Finetuning-Free
//! Quantization with Asymmetric Calibration" (ICML 2025). Selected by `gptq: {target: teacher}`.
//!
//! GPTQ quantizes each linear to reproduce *its own* output on the inputs the compressed model
//! feeds it (the student stream X): min ‖W X − Ŵ X‖². The errors of earlier compressed layers
//! are in X, and nothing asks Ŵ to undo them. Asymmetric calibration asks the quantized linear,
//! fed the student's inputs, to reproduce the dense linear W_t on the dense model's inputs X̃
//! (the teacher stream), the paper's objective (eq. 5, columns of X are tokens):
//!
//! ```text
//!   min_Ŵ ‖W_t X̃ − Ŵ X‖²_F
//! ```
//!
//! Its unconstrained minimiser is the least-squares solution W* = W_t X̃ Xᵀ (X Xᵀ)⁻¹, and the
//! residual W_t X̃ − W* X is orthogonal to the rows of X, so for every Ŵ
//!
//! ```text
//!   ‖W_t X̃ − Ŵ X‖² = ‖W_t X̃ − W* X‖² + ‖(W* − Ŵ) X‖²          (Pythagoras)
//! ```
//!
//! The first term does not depend on Ŵ: the asymmetric problem is GPTQ's problem with target W*
//! and GPTQ's Hessian H = 2/n · X Xᵀ. This file computes W*; `gptq.rs` then runs its column
//! sweep on W* unchanged (so the GPU kernel, masks, act-order and every grid apply as they are).
//!
//! W* is written around the weights W the layer holds now (the dense ones, or what an earlier
//! pass such as AWQ or SparseGPT left), with ΔX = X̃ − X and D = 2/n · ΔX Xᵀ (the paper's
//! `dXXT`, collected by the engine, [`crate::engine::LayerCtx::asymmetry`]):
//!
//! ```text
//!   W* = W + α · (W_t D + (W_t − W) H) · (H + λI)⁻¹
//! ```
//!
//! With α = 1 and λ = 0 this is exactly W_t X̃ Xᵀ (X Xᵀ)⁻¹; λ = damp · mean(diag H) is GPTQ's
//! dampening (stepped up ×10 when the Cholesky factorization fails), which makes W* a ridge
//! solution and keeps it finite where X spans few directions. When nothing upstream changed
//! (the first layer: X̃ = X and W_t = W) the correction is exactly zero and this is plain GPTQ.
//!
//! The paper reaches the same objective inside the sweep: each column's asymmetry term is pushed
//! onto the columns not yet quantized through P = triu(ΔX Xᵀ Uᵀ) U (its eq. 13, U the Cholesky
//! factor of H⁻¹), and its reference code scales P by α = 0.25. Moving the whole least-squares
//! correction in front of the sweep optimises the same objective and also lets columns processed
//! early absorb part of the asymmetry of later ones; α keeps the paper's role (0 = plain GPTQ).

use anyhow::{bail, Result};
use ndarray::Array2;
use serde::{Deserialize, Serialize};

/// What GPTQ's layer-wise objective reproduces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The linear's own output on the student stream: min ‖W X − Ŵ X‖² (GPTQ).
    #[default]
    Student,
    /// The dense linear's output on the teacher stream: min ‖W_t X̃ − Ŵ X‖² (GPTAQ).
    Teacher,
}

/// The asymmetric target W* (module docs) and the dampening fraction finally used.
///
/// `w`: the layer's current weights [rows, d]; `w_teacher`: the dense weights [rows, d];
/// `h`: GPTQ's Hessian 2/n · XXᵀ [d, d]; `d_stat`: 2/n · ΔX Xᵀ [d, d].
pub fn asymmetric_target(
    w: &Array2<f32>,
    w_teacher: &Array2<f32>,
    h: &Array2<f64>,
    d_stat: &Array2<f64>,
    damp: f64,
    alpha: f64,
) -> Result<(Array2<f32>, f64)> {
    let (rows, cols) = w.dim();
    if w_teacher.dim() != (rows, cols) {
        bail!(
            "teacher weight is {:?}, the layer's is {:?}",
            w_teacher.dim(),
            w.dim()
        );
    }
    if h.dim() != (cols, cols) || d_stat.dim() != (cols, cols) {
        bail!(
            "statistics are {:?} and {:?}, expected [{cols}, {cols}]",
            h.dim(),
            d_stat.dim()
        );
    }
    let wt = w_teacher.mapv(|v| v as f64);
    let wc = w.mapv(|v| v as f64);
    // R = W_t D + (W_t − W) H
    let mut r = crate::linalg::matmul(&wt, d_stat);
    if wt != wc {
        r += &crate::linalg::matmul(&(&wt - &wc), h);
    }
    if alpha == 0.0 || r.iter().all(|&v| v == 0.0) {
        return Ok((w.clone(), damp));
    }
    r *= alpha;
    // (H + λI), dead inputs (H_jj = 0) as GPTQ treats them
    let mut hd = h.clone();
    for j in 0..cols {
        if hd[[j, j]] == 0.0 {
            hd[[j, j]] = 1.0;
        }
    }
    let mean_diag = (0..cols).map(|j| hd[[j, j]]).sum::<f64>() / cols as f64;
    let mut used = damp;
    let y = loop {
        let mut a = hd.clone();
        for j in 0..cols {
            a[[j, j]] += used * mean_diag;
        }
        match crate::linalg::solve_right_spd(&r, &a) {
            Ok(y) => break y,
            Err(e) => {
                if used >= 1.0 {
                    bail!("H is not positive definite even with damp {used}: {e}");
                }
                used = (used * 10.0).min(1.0);
            }
        }
    };
    let target = Array2::from_shape_fn((rows, cols), |(i, j)| (wc[[i, j]] + y[[i, j]]) as f32);
    if target.iter().any(|v| !v.is_finite()) {
        bail!("the teacher target is not finite (degenerate statistics)");
    }
    Ok((target, used))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DType;
    use crate::passes::gptq::gptq_quantize; // the parent: GPTQ with this target
    use crate::quant::{Observer, QuantArgs, Strategy};
    use rand::{Rng, SeedableRng};

    /// Tokens as rows: X [n, d] correlated (a random mixing of iid inputs), X̃ = X + a shift
    /// that is itself correlated with X (how upstream quantization error behaves).
    fn streams(n: usize, d: usize, seed: u64) -> (Array2<f64>, Array2<f64>) {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let z = Array2::from_shape_fn((n, d), |_| r.gen_range(-1.0..1.0));
        let mix = Array2::from_shape_fn(
            (d, d),
            |(i, j)| {
                if i == j {
                    1.0
                } else {
                    r.gen_range(-0.3..0.3)
                }
            },
        );
        let x = z.dot(&mix);
        let shift = Array2::from_shape_fn((d, d), |_| r.gen_range(-0.08..0.08));
        let noise = Array2::from_shape_fn((n, d), |_| r.gen_range(-0.05..0.05));
        let xt = &x + &x.dot(&shift) + &noise;
        (x, xt)
    }

    fn stats(x: &Array2<f64>, xt: &Array2<f64>) -> (Array2<f64>, Array2<f64>) {
        let n = x.nrows() as f64;
        let h = x.t().dot(x) * (2.0 / n);
        let d = (xt - x).t().dot(x) * (2.0 / n);
        (h, d)
    }

    fn weight(rows: usize, d: usize, seed: u64) -> Array2<f32> {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        Array2::from_shape_fn((rows, d), |_| r.gen_range(-0.5f32..0.5))
    }

    /// ‖X̃ W_tᵀ − X Ŵᵀ‖² (tokens as rows).
    fn asym_loss(wt: &Array2<f32>, w_hat: &Array2<f32>, x: &Array2<f64>, xt: &Array2<f64>) -> f64 {
        let a = xt.dot(&wt.mapv(|v| v as f64).t());
        let b = x.dot(&w_hat.mapv(|v| v as f64).t());
        (&a - &b).iter().map(|v| v * v).sum()
    }

    #[test]
    fn without_asymmetry_the_target_is_the_weight_itself() {
        let (x, _) = streams(200, 24, 1);
        let (h, _) = stats(&x, &x);
        let w = weight(8, 24, 2);
        let zero = Array2::zeros((24, 24));
        let (t, damp) = asymmetric_target(&w, &w, &h, &zero, 0.01, 1.0).unwrap();
        assert_eq!(t, w);
        assert_eq!(damp, 0.01);
        // α = 0 is plain GPTQ whatever the streams
        let (x, xt) = streams(200, 24, 3);
        let (h, d) = stats(&x, &xt);
        assert_eq!(asymmetric_target(&w, &w, &h, &d, 0.01, 0.0).unwrap().0, w);
    }

    #[test]
    fn the_target_solves_the_asymmetric_least_squares_and_splits_the_loss() {
        let (x, xt) = streams(400, 20, 4);
        let (h, d) = stats(&x, &xt);
        let wt = weight(6, 20, 5);
        // the layer's weights differ from the teacher's (an earlier pass changed them)
        let w = &wt + &weight(6, 20, 6).mapv(|v| 0.1 * v);
        let (ws, _) = asymmetric_target(&w, &wt, &h, &d, 1e-12, 1.0).unwrap();
        // normal equations: W* XᵀX = W_t X̃ᵀX
        let lhs = ws.mapv(|v| v as f64).dot(&x.t().dot(&x));
        let rhs = wt.mapv(|v| v as f64).dot(&xt.t().dot(&x));
        let scale = rhs.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = (&lhs - &rhs).iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(worst < 1e-5 * scale, "normal equations off by {worst}");
        // Pythagoras: for any Ŵ, loss(Ŵ) = loss(W*) + ‖X (W* − Ŵ)ᵀ‖²
        let w_hat = weight(6, 20, 7);
        let split = asym_loss(&wt, &ws, &x, &xt)
            + x.dot(&(&ws - &w_hat).mapv(|v| v as f64).t())
                .iter()
                .map(|v| v * v)
                .sum::<f64>();
        let direct = asym_loss(&wt, &w_hat, &x, &xt);
        assert!(
            (split - direct).abs() < 1e-5 * direct,
            "{split} vs {direct}"
        );
    }

    #[test]
    fn teacher_targeted_gptq_lowers_the_asymmetric_loss() {
        let args = QuantArgs::int(3, true, Strategy::Group, 16, Observer::MinMax);
        for seed in 0..4 {
            let (x, xt) = streams(512, 64, 10 + seed);
            let (h, d) = stats(&x, &xt);
            let w = weight(32, 64, 20 + seed);
            let plain = gptq_quantize(&w, &h, &args, DType::F32, 0.01, 16, false, false)
                .unwrap()
                .dequant;
            let (ws, damp) = asymmetric_target(&w, &w, &h, &d, 0.01, 1.0).unwrap();
            let teacher = gptq_quantize(&ws, &h, &args, DType::F32, damp, 16, false, false)
                .unwrap()
                .dequant;
            let (lp, lt) = (
                asym_loss(&w, &plain, &x, &xt),
                asym_loss(&w, &teacher, &x, &xt),
            );
            assert!(lt < 0.9 * lp, "seed {seed}: teacher {lt} vs plain {lp}");
        }
    }

    #[test]
    fn mismatched_shapes_are_refused() {
        let w = weight(4, 8, 1);
        let h = Array2::eye(8);
        assert!(asymmetric_target(&w, &weight(4, 6, 2), &h, &h, 0.01, 1.0).is_err());
        assert!(asymmetric_target(&w, &w, &Array2::eye(6), &h, 0.01, 1.0).is_err());
    }
}
