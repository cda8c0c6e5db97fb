//! The codes of one encoded block (levels, unpack, pack) and its decoding grid (`BlockGrid`):
//! what GPTQ onto a ggml grid reads and writes, leaving scales and mins as encoded.

use super::helpers::fp16_at;
use super::kquants::{get_scale_min_k4, pack_q4_k, pack_q5_k, pack_q6_k};
use super::legacy::pack_q5;
use super::{GgmlType, QK_K};
use anyhow::{ensure, Result};

/// Levels a code of `ty` takes (0..levels): what a GPTQ sweep onto this grid chooses among.
pub fn levels(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4K => 16,
        GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5K => 32,
        GgmlType::Q6K => 64,
        GgmlType::Q8_0 => 256,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 0,
    }
}

/// The codes of one encoded block of `ty` (one per element, 0..levels; Q8_0's i8 q as q + 128),
/// leaving its scales and mins aside.
pub fn unpack_codes(ty: GgmlType, b: &[u8], codes: &mut [u8]) {
    let nib = |q: &[u8], c: &mut [u8]| {
        for j in 0..16 {
            c[j] = q[j] & 0x0f;
            c[j + 16] = q[j] >> 4;
        }
    };
    let q5 = |qh: &[u8], q: &[u8], c: &mut [u8]| {
        let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
        nib(q, c);
        for (j, v) in c.iter_mut().enumerate().take(32) {
            *v |= (((qh >> j) & 1) as u8) << 4;
        }
    };
    match ty {
        GgmlType::Q4_0 => nib(&b[2..18], codes),
        GgmlType::Q4_1 => nib(&b[4..20], codes),
        GgmlType::Q5_0 => q5(&b[2..6], &b[6..22], codes),
        GgmlType::Q5_1 => q5(&b[4..8], &b[8..24], codes),
        GgmlType::Q8_0 => {
            for j in 0..32 {
                codes[j] = ((b[2 + j] as i8) as i32 + 128) as u8;
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let (qh, q) = if ty == GgmlType::Q4K {
                (None, &b[16..144])
            } else {
                (Some(&b[16..48]), &b[48..176])
            };
            for c in 0..4 {
                for l in 0..32 {
                    codes[64 * c + l] = q[32 * c + l] & 0x0f;
                    codes[64 * c + 32 + l] = q[32 * c + l] >> 4;
                    if let Some(qh) = qh {
                        codes[64 * c + l] |= ((qh[l] >> (2 * c)) & 1) << 4;
                        codes[64 * c + 32 + l] |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                    }
                }
            }
        }
        GgmlType::Q6K => {
            for c in 0..2 {
                let ql = &b[64 * c..64 * c + 64];
                let qh = &b[128 + 32 * c..128 + 32 * c + 32];
                let o = &mut codes[128 * c..128 * c + 128];
                for l in 0..32 {
                    o[l] = (ql[l] & 0x0f) | ((qh[l] & 3) << 4);
                    o[l + 32] = (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4);
                    o[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    o[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {}
    }
}

/// Write `codes` (0..levels) into an encoded block of `ty`, keeping its scales and mins.
pub fn pack_codes(ty: GgmlType, b: &mut [u8], codes: &[u8]) {
    let nib = |q: &mut [u8], c: &[u8]| {
        for j in 0..16 {
            q[j] = (c[j] & 0x0f) | ((c[j + 16] & 0x0f) << 4);
        }
    };
    match ty {
        GgmlType::Q4_0 => nib(&mut b[2..18], codes),
        GgmlType::Q4_1 => nib(&mut b[4..20], codes),
        GgmlType::Q5_0 => pack_q5(codes, &mut b[2..22]),
        GgmlType::Q5_1 => pack_q5(codes, &mut b[4..24]),
        GgmlType::Q8_0 => {
            for j in 0..32 {
                b[2 + j] = ((codes[j] as i32 - 128) as i8) as u8;
            }
        }
        GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => {
            let mut l = [0u8; QK_K];
            l.copy_from_slice(&codes[..QK_K]);
            match ty {
                GgmlType::Q4K => pack_q4_k(&l, &mut b[16..144]),
                GgmlType::Q5K => pack_q5_k(&l, &mut b[16..176]),
                _ => pack_q6_k(&l, &mut b[..192]),
            }
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {}
    }
}

/// The grid of one encoded block: for each element the decoder's arithmetic with the block's
/// scales and mins, so `value(i, c)` is bit for bit what `dequantize` gives element `i` with
/// code `c`, and a sweep that picks codes one element at a time knows exactly what the file
/// will decode to. Every type decodes an element either as `(c − off)·a` (Q4_0, Q5_0, Q8_0,
/// Q6_K: `a` the block's or sub-block's scale) or as `c·a + b` (Q4_1, Q5_1, Q4_K, Q5_K: `b` the
/// min, subtracted); the parameters are per element (sub-block scales differ within a block).
/// Tested against `dequantize` for every element and every code.
pub struct BlockGrid {
    ty: GgmlType,
    /// the multiplier of each element
    a: Vec<f32>,
    /// the added term of each element (affine types only)
    b: Vec<f32>,
    /// the code offset of a centred type (0 for an affine one)
    off: i32,
    bytes: Vec<u8>,
    codes: Vec<u8>,
}

impl BlockGrid {
    /// The grid of the encoded block `b` (its scales and mins; its codes are kept as the
    /// starting codes).
    pub fn new(ty: GgmlType, b: &[u8]) -> Result<Self> {
        let (bs, nl) = (ty.block_size(), levels(ty));
        ensure!(nl > 0, "{} is not a block-quantized type", ty.name());
        ensure!(
            b.len() == ty.type_size(),
            "a {} block is {} bytes",
            ty.name(),
            ty.type_size()
        );
        let mut codes = vec![0u8; bs];
        unpack_codes(ty, b, &mut codes);
        let (mut a, mut add) = (vec![0f32; bs], Vec::new());
        let off = match ty {
            // dq4_0 / dq5_0 / dq8_0: (q − off) as f32 · d
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => {
                a.fill(fp16_at(b, 0));
                (nl / 2) as i32
            }
            // dq4_1 / dq5_1: q as f32 · d + m
            GgmlType::Q4_1 | GgmlType::Q5_1 => {
                a.fill(fp16_at(b, 0));
                add = vec![fp16_at(b, 2); bs];
                0
            }
            // dq4_k / dq5_k: (d·s) · q − (min·m), per sub-block of 32
            GgmlType::Q4K | GgmlType::Q5K => {
                let (d, min) = (fp16_at(b, 0), fp16_at(b, 2));
                add = vec![0f32; bs];
                for j in 0..8 {
                    let (s, m) = get_scale_min_k4(j, &b[4..16]);
                    a[32 * j..32 * (j + 1)].fill(d * s as f32);
                    add[32 * j..32 * (j + 1)].fill(-(min * m as f32));
                }
                0
            }
            // dq6_k: (d · sc) · (q − 32), sc an i8 per 16 elements
            GgmlType::Q6K => {
                let d = fp16_at(b, 208);
                for (i, v) in a.iter_mut().enumerate() {
                    let (half, l) = (i / 128, i % 128);
                    let sc = b[192 + 8 * half + (l % 32) / 16 + 2 * (l / 32)] as i8;
                    *v = d * sc as f32;
                }
                32
            }
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!("levels is 0"),
        };
        Ok(BlockGrid {
            ty,
            a,
            b: add,
            off,
            bytes: b.to_vec(),
            codes,
        })
    }

    /// The value element `i` decodes to with code `c`.
    pub fn value(&self, i: usize, c: usize) -> f32 {
        if self.b.is_empty() {
            (c as i32 - self.off) as f32 * self.a[i]
        } else {
            c as f32 * self.a[i] + self.b[i]
        }
    }

    /// Fix element `i` to the grid value nearest `x`; returns that value.
    pub fn fix(&mut self, i: usize, x: f32) -> f32 {
        let nl = levels(self.ty);
        let (v0, v1) = (self.value(i, 0), self.value(i, 1));
        let c = if v1 == v0 || !x.is_finite() {
            self.codes[i] as usize // a zero scale: every code decodes alike
        } else {
            // the grid is affine in the code: guess, then settle among the neighbours exactly
            let guess = ((x - v0) / (v1 - v0)).round().clamp(0.0, (nl - 1) as f32) as usize;
            let lo = guess.saturating_sub(1);
            let hi = (guess + 1).min(nl - 1);
            (lo..=hi)
                .min_by(|a, b| {
                    let (ea, eb) = ((self.value(i, *a) - x).abs(), (self.value(i, *b) - x).abs());
                    ea.total_cmp(&eb).then(a.cmp(b))
                })
                .unwrap_or(guess)
        };
        self.codes[i] = c as u8;
        self.value(i, c)
    }

    /// The block's bytes with the codes fixed so far.
    pub fn finish(mut self) -> Vec<u8> {
        pack_codes(self.ty, &mut self.bytes, &self.codes);
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::weights;
    use super::super::weighted::quantize_weighted;
    use super::super::{dequantize, quantize, ALL_TYPES};
    use super::*;

    #[test]
    fn block_codes_round_trip_and_the_grid_is_what_the_decoder_reads() {
        for ty in ALL_TYPES.iter().copied().filter(|t| t.is_quantized()) {
            let (bs, ts) = (ty.block_size(), ty.type_size());
            let x = weights(4 * QK_K, 11);
            let enc = quantize(ty, &x).unwrap();
            let dec = dequantize(ty, &enc, x.len()).unwrap();
            for (bi, b) in enc.chunks(ts).enumerate() {
                // codes out and back in: the same bytes
                let mut codes = vec![0u8; bs];
                unpack_codes(ty, b, &mut codes);
                assert!(codes.iter().all(|c| (*c as usize) < levels(ty)), "{ty:?}");
                let mut blank = b.to_vec();
                pack_codes(ty, &mut blank, &vec![0u8; bs]);
                pack_codes(ty, &mut blank, &codes);
                assert_eq!(blank, b, "{ty:?} block {bi}");
                // the grid's value at each element's code is the decoder's, bit for bit, and
                // fixing every element at its decoded value reproduces the block
                let mut g = BlockGrid::new(ty, b).unwrap();
                for i in 0..bs {
                    let want = dec[bi * bs + i];
                    assert_eq!(g.value(i, codes[i] as usize).to_bits(), want.to_bits());
                    assert_eq!(g.fix(i, want).to_bits(), want.to_bits(), "{ty:?} {bi}/{i}");
                }
                let again = g.finish();
                assert_eq!(
                    dequantize(ty, &again, bs).unwrap(),
                    &dec[bi * bs..(bi + 1) * bs]
                );
            }
        }
    }

    #[test]
    fn the_grid_gives_the_decoders_value_for_every_code() {
        // value(i, c) against `dequantize` of the block with every element set to code c, for
        // every element and every code (random blocks with outliers, so scales, mins and
        // sub-block scales of both signs occur)
        for ty in ALL_TYPES.iter().copied().filter(|t| t.is_quantized()) {
            let (bs, ts) = (ty.block_size(), ty.type_size());
            let mut x = weights(4 * QK_K, 17);
            x.iter_mut()
                .skip(7)
                .step_by(61)
                .for_each(|v| *v = -v.abs() * 3.0 - 0.01);
            for w in [quantize(ty, &x).unwrap(), {
                let qw: Vec<f32> = (0..QK_K).map(|j| 0.1 + (j % 7) as f32).collect();
                quantize_weighted(ty, &x, QK_K, &qw).unwrap()
            }] {
                for b in w.chunks(ts) {
                    let g = BlockGrid::new(ty, b).unwrap();
                    let mut scratch = b.to_vec();
                    for c in 0..levels(ty) {
                        pack_codes(ty, &mut scratch, &vec![c as u8; bs]);
                        let want = dequantize(ty, &scratch, bs).unwrap();
                        for (i, v) in want.iter().enumerate() {
                            assert_eq!(g.value(i, c).to_bits(), v.to_bits(), "{ty:?} {i} code {c}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn fixing_picks_the_nearest_grid_value() {
        for ty in ALL_TYPES.iter().copied().filter(|t| t.is_quantized()) {
            let bs = ty.block_size();
            let x = weights(bs, 5);
            let enc = quantize(ty, &x).unwrap();
            let mut g = BlockGrid::new(ty, &enc).unwrap();
            let probe = weights(bs, 6);
            for (i, p) in probe.iter().enumerate() {
                let best = (0..levels(ty))
                    .map(|c| (g.value(i, c) - p).abs())
                    .fold(f32::INFINITY, f32::min);
                let got = g.fix(i, *p);
                assert_eq!((got - p).abs(), best, "{ty:?} element {i}");
            }
            let bytes = g.finish();
            let back = dequantize(ty, &bytes, bs).unwrap();
            for (i, p) in probe.iter().enumerate() {
                let best = (0..levels(ty))
                    .map(|c| (BlockGrid::new(ty, &enc).unwrap().value(i, c) - p).abs())
                    .fold(f32::INFINITY, f32::min);
                assert_eq!((back[i] - p).abs(), best);
            }
        }
    }
}
