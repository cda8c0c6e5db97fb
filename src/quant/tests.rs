//! Unit tests of the quantizer core against the reference formulas and simple loops.

#![allow(clippy::needless_range_loop)]

use super::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn args(bits: u32, symmetric: bool, strategy: Strategy, group_size: usize) -> QuantArgs {
    QuantArgs::int(bits, symmetric, strategy, group_size, Observer::MinMax)
}

fn random(out: usize, inn: usize, seed: u64, dtype: DType) -> Array2<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Array2::from_shape_fn((out, inn), |_| {
        let mut v: f32 = rng.gen_range(-1.0..1.0) * 0.05;
        if v == 0.0 {
            v = 1e-3;
        }
        round_to(dtype, v)
    })
}

#[test]
fn ranges() {
    assert_eq!(qrange(4), (-8, 7));
    assert_eq!(qrange(8), (-128, 127));
    assert_eq!(qrange(3), (-4, 3));
    assert_eq!(qrange(2), (-2, 1));
}

#[test]
fn round_to_bf16_is_nearest_even() {
    // 1 + 2^-8 is exactly halfway between bf16 1.0 and 1 + 2^-7 → even (1.0).
    assert_eq!(round_to(DType::BF16, 1.0 + 1.0 / 256.0), 1.0);
    assert_eq!(round_to(DType::BF16, 1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
    assert_eq!(round_to(DType::F32, 1.0 + 1.0 / 256.0), 1.0 + 1.0 / 256.0);
    assert_eq!(round_half_even(2.5), 2.0);
    assert_eq!(round_half_even(-0.5), 0.0);
    assert_eq!(round_half_even(3.5), 4.0);
}

#[test]
fn scales_follow_reference_formulas() {
    let a = args(4, true, Strategy::Group, 4);
    // max |x| = 0.75 → 0.75 / 7.5 = 0.1 → bf16(0.1)
    let (s, z) = group_params(&[0.5, -0.75, 0.25, 0.0], &a, DType::F32);
    assert_eq!(s, 0.75 / 7.5);
    assert_eq!(z, 0);
    let (sb, _) = group_params(&[0.5, -0.75, 0.25, 0.0], &a, DType::BF16);
    assert_eq!(sb, half::bf16::from_f32(0.1).to_f32());
    // all positive: min is clamped to 0 → asym zero point = qmin
    let aa = args(4, false, Strategy::Group, 4);
    let (s, z) = group_params(&[0.1, 0.2, 0.3, 1.5], &aa, DType::F32);
    assert_eq!(s, 1.5 / 15.0);
    assert_eq!(z, -8);
    // all zero → eps
    let (s, z) = group_params(&[0.0; 4], &a, DType::BF16);
    assert_eq!((s, z), (0.0078125, 0));
    let (s, _) = group_params(&[0.0; 4], &aa, DType::F32);
    assert_eq!(s, f32::EPSILON);
}

#[test]
fn round_trip_error_within_half_scale() {
    for &dtype in &[DType::F32, DType::BF16] {
        for &bits in &[2u32, 3, 4, 8] {
            for &sym in &[true, false] {
                for &(strategy, gs) in &[
                    (Strategy::Group, 32usize),
                    (Strategy::Channel, 0),
                    (Strategy::Tensor, 0),
                ] {
                    let w = random(16, 128, bits as u64 * 7 + sym as u64, dtype);
                    let a = args(bits, sym, strategy, gs);
                    let q = quantize_rtn(w.view(), &a, dtype).unwrap();
                    q.validate().unwrap();
                    let d = q.dequantize();
                    let (qmin, qmax) = qrange(bits);
                    for r in 0..16 {
                        for j in 0..128 {
                            let g = q.group_of(j);
                            let s = q.scale_at(r, g);
                            let z = q.zero_at(r, g);
                            let err = (d[[r, j]] - w[[r, j]]).abs();
                            // bf16 rounding of w/scale adds up to 2^-8 relative error on top.
                            let slack = if dtype == DType::BF16 {
                                s * (qmax - qmin) as f32 / 128.0
                            } else {
                                s * 1e-4
                            };
                            assert!(
                                err <= s / 2.0 + slack,
                                "bits {bits} sym {sym} {strategy:?} {dtype:?}: err {err} scale {s} zp {z}"
                            );
                            let c = q.codes[r * 128 + j] as i32;
                            assert!(c >= qmin && c <= qmax);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn matches_simple_reference_in_f32() {
    // Straightforward f64 reference of the same formulas (no dtype rounding).
    let w = random(8, 64, 42, DType::F32);
    for &sym in &[true, false] {
        let a = args(4, sym, Strategy::Group, 16);
        let q = quantize_rtn(w.view(), &a, DType::F32).unwrap();
        let mut mismatches = 0;
        for r in 0..8 {
            for g in 0..4 {
                let vals: Vec<f64> = (0..16).map(|k| w[[r, g * 16 + k]] as f64).collect();
                let mn = vals.iter().cloned().fold(0.0f64, f64::min);
                let mx = vals.iter().cloned().fold(0.0f64, f64::max);
                let (s, z) = if sym {
                    (mn.abs().max(mx) / 7.5, 0.0)
                } else {
                    let s = (mx - mn) / 15.0;
                    (s, (-8.0 - mn / s).clamp(-8.0, 7.0).round())
                };
                assert!(((q.scale_at(r, g) as f64) - s).abs() <= s * 1e-6);
                assert_eq!(q.zero_at(r, g) as f64, z);
                for k in 0..16 {
                    let x = vals[k] / s + z;
                    let want = x.round_ties_even().clamp(-8.0, 7.0) as i32;
                    let got = q.codes[r * 64 + g * 16 + k] as i32;
                    // f32 vs f64 may disagree only at (near) exact .5 ties, e.g. the element
                    // equal to -max in a symmetric group sits at exactly -7.5.
                    let near_tie = (x - x.floor() - 0.5).abs() < 1e-5;
                    if got != want && !(near_tie && (got - want).abs() == 1) {
                        mismatches += 1;
                    }
                }
            }
        }
        assert_eq!(mismatches, 0);
    }
}

#[test]
fn group_size_must_divide() {
    let w = random(4, 100, 1, DType::F32);
    assert!(quantize_rtn(w.view(), &args(4, true, Strategy::Group, 32), DType::F32).is_err());
    assert!(quantize_rtn(w.view(), &args(4, true, Strategy::Group, 50), DType::F32).is_ok());
}

#[test]
fn g_idx_is_honoured_by_dequantize() {
    let w = random(4, 64, 3, DType::F32);
    let a = args(4, false, Strategy::Group, 16);
    let mut q = quantize_rtn(w.view(), &a, DType::F32).unwrap();
    let plain = q.dequantize();
    // Identity g_idx gives the same result.
    q.g_idx = Some((0..64).map(|j| j / 16).collect());
    assert_eq!(q.dequantize(), plain);
    // Permuted g_idx: column j takes group g_idx[j].
    q.g_idx = Some((0..64).map(|j| j % 4).collect());
    let d = q.dequantize();
    for r in 0..4 {
        for j in 0..64 {
            let g = j % 4;
            let want = dequantize_value(
                q.codes[r * 64 + j] as i32,
                q.scale_at(r, g),
                q.zero_at(r, g),
            );
            assert_eq!(d[[r, j]], want);
        }
    }
}

#[test]
fn mse_observer_never_worse_than_minmax() {
    let w = random(8, 128, 9, DType::F32);
    for &sym in &[true, false] {
        let mut a = args(3, sym, Strategy::Group, 32);
        for r in 0..8 {
            for g in 0..4 {
                let vals: Vec<f32> = (0..32).map(|k| w[[r, g * 32 + k]]).collect();
                a.observer = Observer::MinMax;
                let (s0, z0) = group_params(&vals, &a, DType::F32);
                a.observer = Observer::Mse;
                let (s1, z1) = group_params(&vals, &a, DType::F32);
                let e0 = group_error(&vals, s0, z0, &a, DType::F32, MSE_NORM);
                let e1 = group_error(&vals, s1, z1, &a, DType::F32, MSE_NORM);
                assert!(e1 <= e0);
                assert!(s1 <= s0 * 1.0001);
            }
        }
    }
}

#[test]
fn args_hold_number_types_and_integer_ones_serialize_as_before() {
    let a = args(4, true, Strategy::Group, 128);
    assert_eq!(
        a,
        QuantArgs::int(4, true, Strategy::Group, 128, Observer::MinMax)
    );
    assert_eq!(a.num(), NumType::Int { bits: 4 });
    // the resume state and the reports of integer runs keep their bytes
    assert_eq!(
        serde_json::to_string(&a).unwrap(),
        r#"{"bits":4,"symmetric":true,"strategy":"group","group_size":128,"observer":"minmax"}"#
    );
    a.validate().unwrap();
    // NVFP4's weights: E2M1 in groups of 16, E4M3 scales under a global scale
    let nvfp4 = QuantArgs {
        bits: 4,
        float: Some(FloatFormat::E2M1),
        scale_type: Some(ScaleType::E4M3),
        global_scale: true,
        strategy: Strategy::TensorGroup,
        group_size: 16,
        ..a.clone()
    };
    assert_eq!(
        nvfp4.num(),
        NumType::Float {
            format: FloatFormat::E2M1
        }
    );
    let back: QuantArgs = serde_json::from_str(&serde_json::to_string(&nvfp4).unwrap()).unwrap();
    assert_eq!(back, nvfp4);
    nvfp4.validate().unwrap();
    // a float grid must be one a scheme defines, with its own bits
    let e = QuantArgs {
        strategy: Strategy::Channel,
        ..nvfp4.clone()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("e2m1") && e.contains("Channel"), "{e}");
    let e = QuantArgs { bits: 8, ..nvfp4 }
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("4 bits"), "{e}");
    // integer grids take no block
    let block = QuantArgs {
        strategy: Strategy::Block,
        block: Some([128, 128]),
        ..a
    };
    assert!(block.validate().is_err());
}

#[test]
fn bits_per_weight_counts_parameters() {
    let w = random(4, 256, 5, DType::BF16);
    let q = quantize_rtn(w.view(), &args(4, true, Strategy::Group, 128), DType::BF16).unwrap();
    assert_eq!(q.n_groups(), 2);
    assert!((q.bits_per_weight() - (4.0 + 16.0 / 128.0)).abs() < 1e-12);
    let q = quantize_rtn(w.view(), &args(4, false, Strategy::Group, 128), DType::BF16).unwrap();
    assert!((q.bits_per_weight() - (4.0 + 20.0 / 128.0)).abs() < 1e-12);
    let q = quantize_rtn(w.view(), &args(8, true, Strategy::Channel, 0), DType::BF16).unwrap();
    assert_eq!(q.n_groups(), 1);
    assert!((q.bits_per_weight() - (8.0 + 16.0 / 256.0)).abs() < 1e-12);
}
