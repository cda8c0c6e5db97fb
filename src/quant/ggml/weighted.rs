//! Importance-weighted encoders (llama.cpp's `quantize_row_*_impl` with an imatrix), apart from
//! the reference encoders because their searches weigh each column's error.

use super::helpers::{
    fp16, fp16_at, make_qkx2_quants, make_qp_quants, make_qx_quants, nearest_int,
};
use super::kquants::{get_scale_min_k4, pack_q4_k, pack_q5_k, q6_k_block_w};
use super::legacy::pack_q5;
use super::{quantize, GgmlType, QK_K};
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// Encode a `[rows, n_per_row]` row-major matrix as `ty` with per-column importance weights
/// `qw` (length `n_per_row`): llama.cpp's `quantize_<type>(…, quant_weights)` with an imatrix
/// (`quantize_row_*_impl`): the error each element contributes is weighted by its column's
/// importance (llama-imatrix stores the mean of x² over the calibration tokens per input
/// column). Q8_0 and the float types ignore the weights, as llama.cpp does.
pub fn quantize_weighted(ty: GgmlType, x: &[f32], n_per_row: usize, qw: &[f32]) -> Result<Vec<u8>> {
    ensure!(
        qw.len() == n_per_row && n_per_row > 0 && x.len().is_multiple_of(n_per_row),
        "importance weights: {} for rows of {n_per_row} ({} values)",
        qw.len(),
        x.len()
    );
    ensure!(
        qw.iter().all(|w| w.is_finite() && *w >= 0.0),
        "importance weights must be finite and non-negative"
    );
    let row_bytes = ty.bytes_for(n_per_row)?;
    if matches!(
        ty,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0
    ) {
        return quantize(ty, x);
    }
    let mut out = vec![0u8; x.len() / n_per_row * row_bytes];
    out.par_chunks_mut(row_bytes)
        .zip(x.par_chunks(n_per_row))
        .for_each(|(y, xr)| weighted_row(ty, xr, qw, y));
    Ok(out)
}

fn weighted_row(ty: GgmlType, x: &[f32], qw: &[f32], y: &mut [u8]) {
    let bs = ty.block_size();
    let ts = ty.type_size();
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
            // sigma2 over the whole row (quantize_row_q4_0_impl & co.)
            let mut sum_x2 = 0f32;
            for &v in x {
                sum_x2 += v * v;
            }
            let sigma2 = sum_x2 / x.len() as f32;
            let mut weight = [0f32; 32];
            for ((xb, qb), yb) in x.chunks(bs).zip(qw.chunks(bs)).zip(y.chunks_mut(ts)) {
                for j in 0..32 {
                    weight[j] = qb[j] * (sigma2 + xb[j] * xb[j]).sqrt();
                }
                match ty {
                    GgmlType::Q4_0 | GgmlType::Q5_0 => {
                        let nmax = if ty == GgmlType::Q4_0 { 8 } else { 16 };
                        let mut l = [0i8; 32];
                        let d = make_qx_quants(nmax, xb, &mut l, Some(&weight));
                        yb[..2].copy_from_slice(&fp16(d));
                        let l: Vec<u8> = l.iter().map(|v| *v as u8).collect();
                        if ty == GgmlType::Q4_0 {
                            for j in 0..16 {
                                yb[2 + j] = l[j] | (l[j + 16] << 4);
                            }
                        } else {
                            pack_q5(&l, &mut yb[2..22]);
                        }
                    }
                    _ => {
                        let nmax = if ty == GgmlType::Q4_1 { 15 } else { 31 };
                        let mut l = [0u8; 32];
                        let (d, min) =
                            make_qkx2_quants(nmax, xb, &weight, &mut l, -0.9, 0.05, 36, false);
                        yb[..2].copy_from_slice(&fp16(d));
                        yb[2..4].copy_from_slice(&fp16(-min));
                        if ty == GgmlType::Q4_1 {
                            for j in 0..16 {
                                yb[4 + j] = l[j] | (l[j + 16] << 4);
                            }
                        } else {
                            pack_q5(&l, &mut yb[4..24]);
                        }
                    }
                }
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            for ((xb, qb), yb) in x.chunks(bs).zip(qw.chunks(bs)).zip(y.chunks_mut(ts)) {
                let nmax = if ty == GgmlType::Q4K { 15 } else { 31 };
                let l = k_scales_and_levels_w(xb, qb, nmax, &mut yb[..16]);
                if ty == GgmlType::Q4K {
                    pack_q4_k(&l, &mut yb[16..144]);
                } else {
                    pack_q5_k(&l, &mut yb[16..176]);
                }
            }
        }
        GgmlType::Q6K => {
            for ((xb, qb), yb) in x.chunks(bs).zip(qw.chunks(bs)).zip(y.chunks_mut(ts)) {
                q6_k_block_w(xb, Some(qb), yb);
            }
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 => {}
    }
}

/// `quantize_row_q4_K_impl` / `quantize_row_q5_K_impl` with importance weights, first half:
/// per sub-block weights qw·sqrt(σ² + x²) (σ² = 2·mean x² of the super-block), a
/// `make_qkx3_quants` search, then the 8 scales and mins quantized by `make_qp_quants`
/// weighted by each sub-block's total weight; levels re-derived from the stored scales.
fn k_scales_and_levels_w(x: &[f32], qw: &[f32], nmax: i32, hdr: &mut [u8]) -> [u8; QK_K] {
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut sw = [0f32; 8];
    let mut weights = [0f32; 32];
    let mut sum_x2 = 0f32;
    for &v in x {
        sum_x2 += v * v;
    }
    let sigma2 = 2.0 * sum_x2 / QK_K as f32;
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        for l in 0..32 {
            weights[l] = qw[32 * j + l] * (sigma2 + xs[l] * xs[l]).sqrt();
        }
        let mut sumw = 0f32;
        for w in &weights {
            sumw += w;
        }
        sw[j] = sumw;
        // make_qkx3_quants with weights given is make_qkx2_quants
        let (s, m) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            -0.9,
            0.05,
            36,
            false,
        );
        scales[j] = s;
        mins[j] = m;
    }
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    let d_block = make_qp_quants(63, &scales, &mut ls, &sw);
    let m_block = make_qp_quants(63, &mins, &mut lm, &sw);
    let sc = &mut hdr[4..16];
    sc.iter_mut().for_each(|v| *v = 0);
    for j in 0..8 {
        // quantize_row_q5_K_impl clamps to 63; q4_K's levels are ≤ 63 already
        let (a, b) = (ls[j].min(63), lm[j].min(63));
        if j < 4 {
            sc[j] = a;
            sc[j + 4] = b;
        } else {
            sc[j + 4] = (a & 0x0f) | ((b & 0x0f) << 4);
            sc[j - 4] |= (a >> 4) << 6;
            sc[j] |= (b >> 4) << 6;
        }
    }
    hdr[0..2].copy_from_slice(&fp16(d_block));
    hdr[2..4].copy_from_slice(&fp16(m_block));
    let dd = fp16_at(hdr, 0);
    let dmin = fp16_at(hdr, 2);
    for j in 0..8 {
        let (s, m) = get_scale_min_k4(j, &hdr[4..16]);
        let d = dd * s as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax) as u8;
        }
    }
    l
}
