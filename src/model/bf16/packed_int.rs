//! Integer-coded weights as the bf16 kernel's panels (`eval.precision: bf16` on a quantized
//! linear): the weight stays in memory as its 4- or 8-bit codes plus per-group scales and
//! offsets, and each [`super::NR`]-column panel is decoded into bf16 pairs one k-chunk
//! at a time, into a buffer that lives in cache, right before the kernel multiplies it against
//! a block of rows. Memory traffic and the resident weight fall with the bits (4-bit codes are
//! a quarter of bf16 panels, an eighth of f32), and the decoded values are exactly the ones
//! [`super::PackedBf16::pack`] would round from the dequantized f32 weight:
//!
//! * dequantization is `(q − z)·s` in f32 ([`crate::quant::dequantize_value`]); here each code
//!   is stored as u = q + o (o = 8 for nibbles, 128 for bytes) and the offset o + z is kept per
//!   (group, column) in f32, so `(u − (o + z))·s` is the same small integer times the same scale
//!   — the same f32, bit for bit;
//! * that f32 is rounded to bf16 with the same round-to-nearest-even.
//!
//! So a bf16 evaluation of a quantized checkpoint gives the same numbers from its codes as
//! from its dequantized weights (tested), with a fraction of the memory.

use super::NR;
use crate::quant::QuantizedLinear;
use rayon::prelude::*;

/// A quantized weight [out, k] as nibble or byte panels with per-(group, column) scales.
pub struct IntPanels {
    pub(super) out: usize,
    pub(super) k: usize,
    /// Pairs per row, ⌈k/2⌉.
    pub(super) kp: usize,
    /// Codes in [-8, 7] stored as nibbles (else bytes).
    nibbles: bool,
    /// Per panel of NR columns, per pair p: nibbles — NR bytes, the low nibble element 2p, the
    /// high one 2p + 1; bytes — NR bytes of element 2p, then NR of element 2p + 1.
    codes: Vec<u8>,
    /// Group of each input column, 2·kp entries (a padding column past an odd k repeats the
    /// last group).
    group: Vec<u32>,
    /// [groups, np·NR]: the scale of (group, output column); 0 past `out`.
    scales: Vec<f32>,
    /// [groups, np·NR]: the storage offset plus the zero point of (group, output column).
    offsets: Vec<f32>,
}

impl IntPanels {
    /// Lay out `q`'s codes for the kernel.
    pub fn new(q: &QuantizedLinear) -> Self {
        let (out, k) = q.shape;
        let kp = k.div_ceil(2);
        let np = out.div_ceil(NR);
        let width = np * NR;
        let nibbles = q.codes.iter().all(|c| (-8..=7).contains(c));
        let base: i32 = if nibbles { 8 } else { 128 };
        let ng = q.n_groups().max(1);
        let group: Vec<u32> = (0..2 * kp)
            .map(|c| q.group_of(c.min(k.saturating_sub(1))) as u32)
            .collect();
        let mut scales = vec![0f32; ng * width];
        let mut offsets = vec![0f32; ng * width];
        for g in 0..ng {
            for j in 0..out {
                scales[g * width + j] = q.scale_at(j, g);
                offsets[g * width + j] = (base + q.zero_at(j, g)) as f32;
            }
        }
        let per_pair = if nibbles { NR } else { 2 * NR };
        let mut codes = vec![0u8; np * kp * per_pair];
        let code = |j: usize, c: usize| -> u8 {
            if j < out && c < k {
                (q.codes[j * k + c] as i32 + base) as u8
            } else {
                // padding: decodes to (o − (o + z))·s, masked or never read
                base as u8
            }
        };
        codes
            .par_chunks_mut(kp * per_pair)
            .enumerate()
            .for_each(|(pi, panel)| {
                for p in 0..kp {
                    let d = &mut panel[p * per_pair..(p + 1) * per_pair];
                    for c in 0..NR {
                        let j = pi * NR + c;
                        let (lo, hi) = (code(j, 2 * p), code(j, 2 * p + 1));
                        if nibbles {
                            d[c] = lo | (hi << 4);
                        } else {
                            d[c] = lo;
                            d[NR + c] = hi;
                        }
                    }
                }
            });
        IntPanels {
            out,
            k,
            kp,
            nibbles,
            codes,
            group,
            scales,
            offsets,
        }
    }

    /// Bytes held (codes, scales, offsets, groups).
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * (self.scales.len() + self.offsets.len() + self.group.len())
    }

    /// Decode pairs p0..p1 of panel `pi` into `buf` ((p1 − p0) × NR lanes, bf16 pairs as
    /// [`super::PackedBf16`]'s panels hold them).
    pub fn decode(&self, pi: usize, p0: usize, p1: usize, buf: &mut [u32]) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was just detected
            return unsafe { self.decode_avx512(pi, p0, p1, buf) };
        }
        self.decode_portable(pi, p0, p1, buf)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn decode_avx512(&self, pi: usize, p0: usize, p1: usize, buf: &mut [u32]) {
        // the same loops, compiled with 16-lane vectors
        self.decode_portable(pi, p0, p1, buf)
    }

    #[inline(always)]
    fn decode_portable(&self, pi: usize, p0: usize, p1: usize, buf: &mut [u32]) {
        let width = self.out.div_ceil(NR) * NR;
        let j0 = pi * NR;
        let per_pair = if self.nibbles { NR } else { 2 * NR };
        let panel = &self.codes[pi * self.kp * per_pair..(pi + 1) * self.kp * per_pair];
        let odd_end = self.k % 2 == 1;
        for p in p0..p1 {
            let (g0, g1) = (self.group[2 * p] as usize, self.group[2 * p + 1] as usize);
            let s0: &[f32; NR] = self.scales[g0 * width + j0..][..NR]
                .try_into()
                .expect("NR lanes");
            let o0: &[f32; NR] = self.offsets[g0 * width + j0..][..NR]
                .try_into()
                .expect("NR lanes");
            let s1: &[f32; NR] = self.scales[g1 * width + j0..][..NR]
                .try_into()
                .expect("NR lanes");
            let o1: &[f32; NR] = self.offsets[g1 * width + j0..][..NR]
                .try_into()
                .expect("NR lanes");
            let d: &mut [u32; NR] = (&mut buf[(p - p0) * NR..(p - p0 + 1) * NR])
                .try_into()
                .expect("NR lanes");
            let last_odd = odd_end && p + 1 == self.kp;
            if self.nibbles {
                let c: &[u8; NR] = panel[p * NR..(p + 1) * NR].try_into().expect("NR codes");
                for l in 0..NR {
                    let lo = (c[l] & 15) as f32;
                    let hi = (c[l] >> 4) as f32;
                    d[l] = pair((lo - o0[l]) * s0[l], (hi - o1[l]) * s1[l]);
                }
            } else {
                let c: &[u8; 2 * NR] = panel[p * 2 * NR..(p + 1) * 2 * NR]
                    .try_into()
                    .expect("2·NR codes");
                for l in 0..NR {
                    let lo = c[l] as f32;
                    let hi = c[NR + l] as f32;
                    d[l] = pair((lo - o0[l]) * s0[l], (hi - o1[l]) * s1[l]);
                }
            }
            if last_odd {
                // past an odd k the high half is zero, as in a packed bf16 panel
                d.iter_mut().for_each(|v| *v &= 0xFFFF);
            }
        }
    }
}

#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    super::to_bf16(lo) as u32 | ((super::to_bf16(hi) as u32) << 16)
}

#[cfg(test)]
mod tests {
    use super::super::PackedBf16;
    use super::*;
    use crate::quant::{quantize_rtn, Observer, QuantArgs, Strategy};
    use crate::safetensors_file::DType;
    use ndarray::Array2;
    use rand::{Rng, SeedableRng};

    fn quantized(
        out: usize,
        k: usize,
        bits: u32,
        symmetric: bool,
        strategy: Strategy,
        group_size: usize,
        act_order: bool,
        seed: u64,
    ) -> QuantizedLinear {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let w = Array2::from_shape_fn((out, k), |_| rng.gen_range(-1.0f32..1.0));
        let args = QuantArgs::int(bits, symmetric, strategy, group_size, Observer::MinMax);
        let mut q = quantize_rtn(w.view(), &args, DType::BF16).expect("quantizes");
        if act_order {
            // a permutation of the groups over the columns, as GPTQ's g_idx after act order
            let ng = q.n_groups() as i32;
            q.g_idx = Some((0..k).map(|_| rng.gen_range(0..ng)).collect());
        }
        q
    }

    /// Decoded panels times random rows equal the bf16 kernel on the dequantized weight, bit
    /// for bit: same shapes awkward for the tiles (odd k, columns not a multiple of NR, k over
    /// one KC chunk, rows over one MC_INT block), 4-bit symmetric / asymmetric, 8-bit,
    /// channel-wise, and g_idx groups in activation order.
    #[test]
    fn int_panels_equal_the_bf16_panels_of_the_dequantized_weight() {
        if !super::super::native() {
            eprintln!("skipped: this CPU has no AVX512-BF16, the integer panels are not used");
            return;
        }
        let cases = [
            (5, 7, 4, true, Strategy::Channel, 0, false),
            (33, 64, 4, false, Strategy::Group, 32, false),
            (70, 256, 4, true, Strategy::Group, 128, true),
            (40, 2 * 384 + 38, 4, false, Strategy::Group, 806, false),
            (65, 129, 8, true, Strategy::Channel, 0, false),
            (32, 96, 8, false, Strategy::Group, 32, true),
            (17, 48, 3, true, Strategy::Group, 16, false),
        ];
        for (i, &(out, k, bits, sym, strat, gs, act)) in cases.iter().enumerate() {
            let q = quantized(out, k, bits, sym, strat, gs, act, 100 + i as u64);
            let dq = q.dequantize();
            let dense = PackedBf16::pack(dq.as_slice().unwrap(), out, k);
            let int = PackedBf16::pack_quantized(&q);
            assert!(int.is_int());
            assert!(int.bytes() < dense.bytes() || k < 16, "case {i}");
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i as u64);
            for n in [1, 9, 300] {
                let x: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
                let bias: Vec<f32> = (0..out).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
                let a = dense.matmul(&x, n, Some(&bias));
                let b = int.matmul(&x, n, Some(&bias));
                let same = a.iter().zip(&b).all(|(u, v)| u.to_bits() == v.to_bits());
                assert!(same, "case {i} ({out}×{k}, {bits} bits), n {n}");
            }
        }
    }

    /// Each decoded lane is the bf16 rounding of (q − z)·s, element by element.
    #[test]
    fn decode_is_the_rounded_dequantization() {
        for (out, k, strat, gs, act) in [
            (45, 23, Strategy::Channel, 0, false),
            (45, 24, Strategy::Group, 8, true),
        ] {
            let q = quantized(out, k, 4, false, strat, gs, act, 7);
            let dq = q.dequantize();
            let p = IntPanels::new(&q);
            let mut buf = vec![0u32; p.kp * NR];
            for pi in 0..out.div_ceil(NR) {
                p.decode(pi, 0, p.kp, &mut buf);
                for j in pi * NR..(pi * NR + NR).min(out) {
                    for c in 0..2 * p.kp {
                        let lane = buf[(c / 2) * NR + j - pi * NR];
                        let h = if c % 2 == 0 {
                            lane as u16
                        } else {
                            (lane >> 16) as u16
                        };
                        let want = if c < k {
                            super::super::to_bf16(dq[[j, c]])
                        } else {
                            0
                        };
                        assert_eq!(h, want, "{out}×{k}: ({j}, {c})");
                    }
                }
            }
        }
    }
}
