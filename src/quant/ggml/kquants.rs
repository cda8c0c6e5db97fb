//! k-quants (Q4_K, Q5_K, Q6_K; super-blocks of 256): the `quantize_row_*_ref` encoders, the
//! 6-bit scale/min unpacker, the packers of their levels and the decoders.

use super::helpers::{fp16, fp16_at, make_qkx2_quants, make_qx_quants, nearest_int, GROUP_MAX_EPS};
use super::QK_K;

/// `get_scale_min_k4`: the j-th 6-bit scale and min of a Q4_K/Q5_K super-block.
#[inline]
pub(super) fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The shared first half of `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref`: per sub-block of
/// 32 a `make_qkx2_quants` search with weights av_x + |x|, then the 8 scales and 8 mins
/// quantized to 6 bits against their maxima and packed into `scales[12]`; returns the levels
/// re-derived from the stored (rounded) scales, as the C code does.
fn k_scales_and_levels(x: &[f32], nmax: i32, rmin: f32, nstep: i32, hdr: &mut [u8]) -> [u8; QK_K] {
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut weights = [0f32; 32];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            rmin,
            0.1,
            nstep,
            false,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut hdr[4..16];
    sc.iter_mut().for_each(|v| *v = 0);
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    hdr[0..2].copy_from_slice(&fp16(max_scale / 63.0));
    hdr[2..4].copy_from_slice(&fp16(max_min / 63.0));
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
            let q = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax);
            l[32 * j + ii] = q as u8;
        }
    }
    l
}

/// `quantize_row_q4_K_ref` for one super-block.
pub(super) fn q4_k_block(x: &[f32], y: &mut [u8]) {
    let l = k_scales_and_levels(x, 15, -1.0, 20, &mut y[..16]);
    pack_q4_k(&l, &mut y[16..144]);
}

/// `quantize_row_q5_K_ref` for one super-block.
pub(super) fn q5_k_block(x: &[f32], y: &mut [u8]) {
    let l = k_scales_and_levels(x, 31, -0.5, 15, &mut y[..16]);
    pack_q5_k(&l, &mut y[16..176]);
}

/// `quantize_row_q6_K_ref` for one super-block: 16 sub-blocks of 16 with `make_qx_quants`
/// (32 levels each side), the sub-block scales as int8 against the largest one.
pub(super) fn q6_k_block(x: &[f32], y: &mut [u8]) {
    q6_k_block_w(x, None, y)
}

/// `quantize_row_q6_K_impl` (with importance weights `qw` for this super-block; `None` is the
/// reference encoder): the sub-block search weighs by `qw` instead of x².
pub(super) fn q6_k_block_w(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let s = make_qx_quants(
            32,
            &x[16 * ib..16 * ib + 16],
            &mut l[16 * ib..16 * ib + 16],
            qw.map(|q| &q[16 * ib..16 * ib + 16]),
        );
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        y.iter_mut().for_each(|v| *v = 0);
        return;
    }
    let iscale = -128.0 / max_scale;
    y[208..210].copy_from_slice(&fp16(1.0 / iscale));
    let d_all = fp16_at(y, 208);
    for ib in 0..16 {
        y[192 + ib] = (nearest_int(iscale * scales[ib]).min(127) as i8) as u8;
    }
    for j in 0..16 {
        let d = d_all * (y[192 + j] as i8) as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
            l[16 * j + ii] = (q + 32) as i8;
        }
    }
    let mut lu = [0u8; QK_K];
    lu.iter_mut().zip(&l).for_each(|(u, v)| *u = *v as u8);
    pack_q6_k(&lu, &mut y[..192]);
}

/// ql[128] and qh[64] of a Q6_K super-block from levels 0..=63.
pub(super) fn pack_q6_k(l: &[u8], y: &mut [u8]) {
    let (ql, rest) = y.split_at_mut(128);
    let qh = &mut rest[..64];
    for (c, j) in (0..QK_K).step_by(128).enumerate() {
        for i in 0..32 {
            let lv = |o: usize| l[j + i + o];
            ql[64 * c + i] = (lv(0) & 0x0f) | ((lv(64) & 0x0f) << 4);
            ql[64 * c + i + 32] = (lv(32) & 0x0f) | ((lv(96) & 0x0f) << 4);
            qh[32 * c + i] =
                (lv(0) >> 4) | ((lv(32) >> 4) << 2) | ((lv(64) >> 4) << 4) | ((lv(96) >> 4) << 6);
        }
    }
}

pub(super) fn pack_q4_k(l: &[u8; QK_K], q: &mut [u8]) {
    for (c, j) in (0..QK_K).step_by(64).enumerate() {
        for i in 0..32 {
            q[32 * c + i] = l[j + i] | (l[j + i + 32] << 4);
        }
    }
}

pub(super) fn pack_q5_k(l: &[u8; QK_K], y: &mut [u8]) {
    let (qh, ql) = y.split_at_mut(32);
    qh.iter_mut().for_each(|v| *v = 0);
    let (mut m1, mut m2) = (1u8, 2u8);
    for (c, n) in (0..QK_K).step_by(64).enumerate() {
        for j in 0..32 {
            let mut l1 = l[n + j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = l[n + j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql[32 * c + j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
}

pub(super) fn dq4_k(b: &[u8], y: &mut [f32]) {
    let d = fp16_at(b, 0);
    let min = fp16_at(b, 2);
    let sc = &b[4..16];
    let q = &b[16..144];
    for c in 0..4 {
        let (s1, m1) = get_scale_min_k4(2 * c, sc);
        let (s2, m2) = get_scale_min_k4(2 * c + 1, sc);
        let (d1, mm1) = (d * s1 as f32, min * m1 as f32);
        let (d2, mm2) = (d * s2 as f32, min * m2 as f32);
        for l in 0..32 {
            y[64 * c + l] = d1 * (q[32 * c + l] & 0x0f) as f32 - mm1;
            y[64 * c + 32 + l] = d2 * (q[32 * c + l] >> 4) as f32 - mm2;
        }
    }
}

pub(super) fn dq5_k(b: &[u8], y: &mut [f32]) {
    let d = fp16_at(b, 0);
    let min = fp16_at(b, 2);
    let sc = &b[4..16];
    let qh = &b[16..48];
    let ql = &b[48..176];
    let (mut u1, mut u2) = (1u8, 2u8);
    for c in 0..4 {
        let (s1, m1) = get_scale_min_k4(2 * c, sc);
        let (s2, m2) = get_scale_min_k4(2 * c + 1, sc);
        let (d1, mm1) = (d * s1 as f32, min * m1 as f32);
        let (d2, mm2) = (d * s2 as f32, min * m2 as f32);
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[64 * c + l] = d1 * ((ql[32 * c + l] & 0x0f) as i32 + h1) as f32 - mm1;
            y[64 * c + 32 + l] = d2 * ((ql[32 * c + l] >> 4) as i32 + h2) as f32 - mm2;
        }
        u1 <<= 2;
        u2 <<= 2;
    }
}

pub(super) fn dq6_k(b: &[u8], y: &mut [f32]) {
    let d = fp16_at(b, 208);
    for c in 0..2 {
        let ql = &b[64 * c..64 * c + 64];
        let qh = &b[128 + 32 * c..128 + 32 * c + 32];
        let sc = &b[192 + 8 * c..192 + 8 * c + 8];
        let yc = &mut y[128 * c..128 * c + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * (sc[is + k] as i8) as f32;
            yc[l] = s(0) * q1 as f32;
            yc[l + 32] = s(2) * q2 as f32;
            yc[l + 64] = s(4) * q3 as f32;
            yc[l + 96] = s(6) * q4 as f32;
        }
    }
}
