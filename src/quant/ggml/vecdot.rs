//! llama.cpp's activation formats (`vec_dot_type`): the round trip a matmul's input row takes on
//! its CPU backend, kept apart because it models llama.cpp's inference, not the file.

use super::helpers::{bf16_bits, nearest_int};
use super::{GgmlType, QK_K};
use half::f16;

/// The format llama.cpp's CPU backend converts a matmul's activations to before its dot
/// products with a weight of a given type (`type_traits_cpu[type].vec_dot_type`): the weight
/// stays as stored and the input row is quantized, so llama.cpp computes Σ w·x̂ with x̂ the
/// row's round trip through this format, not Σ w·x.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VecDot {
    /// Q4_0, Q5_0, Q8_0 weights: blocks of 32, d = amax/127 stored as fp16,
    /// q = round(x·127/amax) (x86's `quantize_row_q8_0`, round half to even).
    Q8_0,
    /// Q4_1, Q5_1: the same values as Q8_0 (plus a block sum the dot product uses for the min).
    Q8_1,
    /// k-quants: blocks of 256, q = min(127, nearest(−127/max · x)) with max the signed
    /// largest-magnitude element, d = 1/iscale in f32 (`quantize_row_q8_K_ref`).
    Q8K,
    /// F16 weights: the row rounded to fp16.
    F16,
    /// BF16 weights: the row rounded to bf16.
    BF16,
}

impl VecDot {
    /// llama.cpp's `vec_dot_type` of weight type `ty`; `None` for f32 (f32 activations).
    pub fn of(ty: GgmlType) -> Option<Self> {
        match ty {
            GgmlType::F32 => None,
            GgmlType::F16 => Some(VecDot::F16),
            GgmlType::BF16 => Some(VecDot::BF16),
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => Some(VecDot::Q8_0),
            GgmlType::Q4_1 | GgmlType::Q5_1 => Some(VecDot::Q8_1),
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => Some(VecDot::Q8K),
        }
    }

    /// Replace one activation row (its length a multiple of the block) by its round trip
    /// through this format.
    pub fn round_trip(self, row: &mut [f32]) {
        match self {
            VecDot::Q8_0 | VecDot::Q8_1 => {
                for b in row.chunks_mut(32) {
                    let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let d = f16::from_f32(amax / 127.0).to_f32();
                    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                    for v in b.iter_mut() {
                        *v = crate::quant::round_half_even(*v * id) * d;
                    }
                }
            }
            VecDot::Q8K => {
                for b in row.chunks_mut(QK_K) {
                    let (mut amax, mut max) = (0f32, 0f32);
                    for &v in b.iter() {
                        if v.abs() > amax {
                            amax = v.abs();
                            max = v;
                        }
                    }
                    if amax == 0.0 {
                        b.fill(0.0);
                        continue;
                    }
                    let iscale = -127.0 / max;
                    let d = 1.0 / iscale;
                    for v in b.iter_mut() {
                        *v = d * nearest_int(iscale * *v).min(127) as f32;
                    }
                }
            }
            VecDot::F16 => row.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
            VecDot::BF16 => row
                .iter_mut()
                .for_each(|v| *v = f32::from_bits((bf16_bits(*v) as u32) << 16)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::weights;
    use super::*;

    #[test]
    fn llama_cpp_activation_round_trips_match_a_simple_reference() {
        // Q8_0 / Q8_1: every value is q·fp16(amax/127) with q = round(x·127/amax) in
        // [−127, 127]; Q8_K: d·q with d = −max/127 (signed largest element), q ≤ 127; against
        // a scalar reference written from the formats' definitions, on random rows
        let mut x = weights(2 * QK_K, 23);
        x[40] = 0.0;
        x[300..332].fill(0.0); // an all-zero block of 32
        for t in [
            VecDot::Q8_0,
            VecDot::Q8_1,
            VecDot::Q8K,
            VecDot::F16,
            VecDot::BF16,
        ] {
            let mut y = x.clone();
            t.round_trip(&mut y);
            let bs = match t {
                VecDot::Q8K => QK_K,
                VecDot::Q8_0 | VecDot::Q8_1 => 32,
                _ => 1,
            };
            for (xb, yb) in x.chunks(bs).zip(y.chunks(bs)) {
                let amax = xb.iter().fold(0f64, |a, v| a.max(v.abs() as f64));
                for (a, b) in xb.iter().zip(yb) {
                    let want = match t {
                        VecDot::Q8_0 | VecDot::Q8_1 => {
                            let d = f16::from_f64(amax / 127.0).to_f64();
                            let q = if amax == 0.0 {
                                0.0
                            } else {
                                (*a as f64 * 127.0 / amax).round_ties_even()
                            };
                            assert!(q.abs() <= 127.0);
                            q * d
                        }
                        VecDot::Q8K => {
                            let max =
                                xb.iter()
                                    .copied()
                                    .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m })
                                    as f64;
                            let d = -max / 127.0;
                            let q = if max == 0.0 {
                                0.0
                            } else {
                                (*a as f64 / d).round_ties_even().min(127.0)
                            };
                            q * d
                        }
                        VecDot::F16 => f16::from_f32(*a).to_f64(),
                        VecDot::BF16 => half::bf16::from_f32(*a).to_f64(),
                    };
                    // the same code, up to the last bit of f32 arithmetic
                    assert!(
                        (*b as f64 - want).abs() <= 1e-6 * amax.max(1e-30),
                        "{t:?}: {a} → {b}, want {want}"
                    );
                }
            }
            if bs > 1 {
                assert!(y[300..332].iter().all(|v| *v == 0.0), "{t:?}");
            }
            assert_ne!(x, y, "{t:?} changed nothing");
        }
        assert_eq!(VecDot::of(GgmlType::Q4K), Some(VecDot::Q8K));
        assert_eq!(VecDot::of(GgmlType::Q4_1), Some(VecDot::Q8_1));
        assert_eq!(VecDot::of(GgmlType::Q5_0), Some(VecDot::Q8_0));
        assert_eq!(VecDot::of(GgmlType::F32), None);
    }
}
