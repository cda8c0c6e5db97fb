//! The legacy block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; blocks of 32): the `quantize_row_*_ref`
//! encoders, the decoders, and the Q5 bit packer the imatrix encoders and code packer share.

use super::helpers::{fp16, fp16_at};

/// The element of largest magnitude (the first one on ties), as `quantize_row_q4_0_ref` finds it.
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// `quantize_row_q4_0_ref`: d = max/−8 (max = the signed largest-magnitude element),
/// q = min(15, trunc(x/d + 8.5)).
pub(super) fn q4_0_block(x: &[f32], y: &mut [u8]) {
    let d = signed_absmax(x) / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&fp16(d));
    for j in 0..16 {
        let x0 = x[j] * id;
        let x1 = x[16 + j] * id;
        let q0 = ((x0 + 8.5) as i8 as i32).min(15) as u8;
        let q1 = ((x1 + 8.5) as i8 as i32).min(15) as u8;
        y[2 + j] = q0 | (q1 << 4);
    }
}

/// `quantize_row_q4_1_ref`: d = (max − min)/15, m = min, q = min(15, trunc((x − min)/d + 0.5)).
pub(super) fn q4_1_block(x: &[f32], y: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&fp16(d));
    y[2..4].copy_from_slice(&fp16(min));
    for j in 0..16 {
        let x0 = (x[j] - min) * id;
        let x1 = (x[16 + j] - min) * id;
        let q0 = ((x0 + 0.5) as i8 as i32).min(15) as u8;
        let q1 = ((x1 + 0.5) as i8 as i32).min(15) as u8;
        y[4 + j] = q0 | (q1 << 4);
    }
}

/// `quantize_row_q5_0_ref`: d = max/−16, q = min(31, trunc(x/d + 16.5)); the 5th bits in qh.
pub(super) fn q5_0_block(x: &[f32], y: &mut [u8]) {
    let d = signed_absmax(x) / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&fp16(d));
    let mut qh = 0u32;
    for j in 0..16 {
        let x0 = x[j] * id;
        let x1 = x[16 + j] * id;
        let q0 = ((x0 + 16.5) as i8 as i32).min(31) as u8;
        let q1 = ((x1 + 16.5) as i8 as i32).min(31) as u8;
        y[6 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
        qh |= (((q0 & 0x10) >> 4) as u32) << j;
        qh |= (((q1 & 0x10) >> 4) as u32) << (j + 16);
    }
    y[2..6].copy_from_slice(&qh.to_le_bytes());
}

/// `quantize_row_q5_1_ref`: d = (max − min)/31, m = min, q = trunc((x − min)/d + 0.5).
pub(super) fn q5_1_block(x: &[f32], y: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&fp16(d));
    y[2..4].copy_from_slice(&fp16(min));
    let mut qh = 0u32;
    for j in 0..16 {
        let x0 = (x[j] - min) * id;
        let x1 = (x[16 + j] - min) * id;
        let q0 = (x0 + 0.5) as u8;
        let q1 = (x1 + 0.5) as u8;
        y[8 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
        qh |= (((q0 & 0x10) >> 4) as u32) << j;
        qh |= (((q1 & 0x10) >> 4) as u32) << (j + 16);
    }
    y[4..8].copy_from_slice(&qh.to_le_bytes());
}

/// `quantize_row_q8_0_ref`: d = amax/127, q = roundf(x/d) (half away from zero).
pub(super) fn q8_0_block(x: &[f32], y: &mut [u8]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&fp16(d));
    for j in 0..32 {
        y[2 + j] = ((x[j] * id).round() as i8) as u8;
    }
}

pub(super) fn dq4_0(b: &[u8], y: &mut [f32]) {
    let d = fp16_at(b, 0);
    for j in 0..16 {
        y[j] = ((b[2 + j] & 0x0f) as i32 - 8) as f32 * d;
        y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
    }
}

pub(super) fn dq4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (fp16_at(b, 0), fp16_at(b, 2));
    for j in 0..16 {
        y[j] = (b[4 + j] & 0x0f) as f32 * d + m;
        y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
    }
}

pub(super) fn dq5_0(b: &[u8], y: &mut [f32]) {
    let d = fp16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as i32;
        let h1 = ((qh >> (j + 12)) & 0x10) as i32;
        y[j] = ((((b[6 + j] & 0x0f) as i32) | h0) - 16) as f32 * d;
        y[j + 16] = ((((b[6 + j] >> 4) as i32) | h1) - 16) as f32 * d;
    }
}

pub(super) fn dq5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (fp16_at(b, 0), fp16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as i32;
        let h1 = ((qh >> (j + 12)) & 0x10) as i32;
        y[j] = (((b[8 + j] & 0x0f) as i32) | h0) as f32 * d + m;
        y[j + 16] = (((b[8 + j] >> 4) as i32) | h1) as f32 * d + m;
    }
}

pub(super) fn dq8_0(b: &[u8], y: &mut [f32]) {
    let d = fp16_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// qh (u32, the 5th bits) and qs of a Q5_0/Q5_1 block from levels 0..=31.
pub(super) fn pack_q5(l: &[u8], out: &mut [u8]) {
    let mut qh = 0u32;
    for j in 0..16 {
        let (a, b) = (l[j], l[j + 16]);
        out[4 + j] = (a & 0x0f) | ((b & 0x0f) << 4);
        qh |= (((a & 0x10) >> 4) as u32) << j;
        qh |= (((b & 0x10) >> 4) as u32) << (j + 16);
    }
    out[..4].copy_from_slice(&qh.to_le_bytes());
}
