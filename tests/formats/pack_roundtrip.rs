//! Pack/unpack round trips of the compressed-tensors and GPTQ v1 layouts on random codes.

use compress::formats::compressed_tensors::*;
use compress::formats::gptq::*;
use compress::formats::{dequantized, NamedTensor};
use compress::quant::{qrange, Observer, QuantArgs, QuantizedLinear, Strategy};
use compress::safetensors_file::DType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

#[allow(clippy::too_many_arguments)]
fn random_linear(
    rng: &mut ChaCha8Rng,
    bits: u32,
    symmetric: bool,
    strategy: Strategy,
    out: usize,
    inn: usize,
    group_size: usize,
    with_g_idx: bool,
) -> QuantizedLinear {
    let (qmin, qmax) = qrange(bits);
    let ng = match strategy {
        Strategy::Group => inn / group_size,
        _ => 1,
    };
    let codes: Vec<i8> = (0..out * inn)
        .map(|_| rng.gen_range(qmin..=qmax) as i8)
        .collect();
    let scales: Vec<f32> = match strategy {
        Strategy::Tensor => vec![half::bf16::from_f32(rng.gen_range(1e-3..1e-1)).to_f32(); out],
        _ => (0..out * ng)
            .map(|_| half::bf16::from_f32(rng.gen_range(1e-3..1e-1)).to_f32())
            .collect(),
    };
    let zeros = if symmetric {
        None
    } else {
        Some(match strategy {
            Strategy::Tensor => vec![rng.gen_range(qmin..=qmax) as i8; out],
            // include the extremes so that GPTQ's zero-1 of 0 (unsigned) is exercised
            _ => (0..out * ng)
                .map(|i| match i % 7 {
                    0 => qmin as i8,
                    1 => qmax as i8,
                    _ => rng.gen_range(qmin..=qmax) as i8,
                })
                .collect(),
        })
    };
    let g_idx = if with_g_idx {
        let mut g: Vec<i32> = (0..inn).map(|j| (j * ng / inn) as i32).collect();
        // shuffle (activation order)
        for i in (1..inn).rev() {
            let k = rng.gen_range(0..=i);
            g.swap(i, k);
        }
        Some(g)
    } else {
        None
    };
    QuantizedLinear {
        args: QuantArgs::int(bits, symmetric, strategy, group_size, Observer::MinMax),
        codes,
        scales,
        zeros,
        g_idx,
        static_order: false,
        true_sequential: false,
        scale_dtype: DType::BF16,
        global_scale: None,
        shape: (out, inn),
    }
}

fn getter(ts: &[NamedTensor]) -> HashMap<String, (DType, Vec<usize>, Vec<u8>)> {
    ts.iter()
        .map(|(n, d, s, b)| (n.clone(), (*d, s.clone(), b.clone())))
        .collect()
}

fn same(a: &QuantizedLinear, b: &QuantizedLinear) {
    assert_eq!(a.shape, b.shape);
    assert_eq!(a.codes, b.codes);
    assert_eq!(a.scales, b.scales);
    assert_eq!(a.zeros, b.zeros);
    assert_eq!(a.g_idx, b.g_idx);
}

#[test]
fn ct_raw_pack_unpack_all_widths() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for bits in 1..=8u32 {
        let (qmin, qmax) = qrange(bits);
        for &(rows, cols) in &[(3usize, 37usize), (32, 64), (1, 1), (17, 10)] {
            let v: Vec<i8> = (0..rows * cols)
                .map(|_| rng.gen_range(qmin..=qmax) as i8)
                .collect();
            for dim in 0..2 {
                let (p, shape) = ct_pack(&v, rows, cols, bits, dim).unwrap();
                // compressed-tensors 0.19: one dense bit stream, ceil(n·bits/32) words
                let want = if dim == 1 {
                    [rows, (cols * bits as usize).div_ceil(32)]
                } else {
                    [(rows * bits as usize).div_ceil(32), cols]
                };
                assert_eq!(shape, want);
                assert_eq!(
                    ct_unpack(&p, shape, bits, [rows, cols], dim).unwrap(),
                    v,
                    "bits {bits} dim {dim}"
                );
            }
        }
        // out-of-range codes are refused
        assert!(ct_pack(&[(qmax + 1) as i8], 1, 1, bits, 1).is_err() || qmax == 127);
    }
}

/// The case: 3-bit rows of 576 inputs are 54 words (576·3/32), not 58; value 10 of a
/// row straddles words 0 and 1.
#[test]
fn ct_3bit_is_one_dense_stream() {
    let v: Vec<i8> = (0..576).map(|i| ((i * 5 % 8) as i8) - 4).collect();
    let (p, shape) = ct_pack(&v, 1, 576, 3, 1).unwrap();
    assert_eq!(shape, [1, 54]);
    let u = |i: usize| (v[i] as i32 + 4) as u32;
    let w0 = p[0] as u32;
    let w1 = p[1] as u32;
    for i in 0..10 {
        assert_eq!((w0 >> (3 * i)) & 7, u(i), "value {i}");
    }
    // value 10: bits 30..33 — two bits in word 0, one in word 1
    assert_eq!((w0 >> 30) | ((w1 & 1) << 2), u(10));
    assert_eq!((w1 >> 1) & 7, u(11));
    assert_eq!(ct_unpack(&p, shape, 3, [1, 576], 1).unwrap(), v);
}

#[test]
fn ct_4bit_word_layout() {
    // value j of a word at bits 4j, stored q + 8
    let v: Vec<i8> = vec![-8, -7, 0, 7, 1, 2, 3, 4];
    let (p, _) = ct_pack(&v, 1, 8, 4, 1).unwrap();
    let mut w = 0u32;
    for (j, &x) in v.iter().enumerate() {
        w |= ((x as i32 + 8) as u32) << (4 * j);
    }
    assert_eq!(p, vec![w as i32]);
}

#[test]
fn compressed_tensors_round_trips() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for bits in 2..=8u32 {
        for &sym in &[true, false] {
            for &(strategy, gs) in &[
                (Strategy::Group, 32usize),
                (Strategy::Channel, 0),
                (Strategy::Tensor, 0),
            ] {
                for &with_g in &[false, true] {
                    if with_g && strategy != Strategy::Group {
                        continue;
                    }
                    let q = random_linear(&mut rng, bits, sym, strategy, 48, 128, gs, with_g);
                    let ts = compressed_tensors_tensors("m.l", &q).unwrap();
                    let names: Vec<&str> = ts.iter().map(|t| t.0.as_str()).collect();
                    assert!(names.contains(&"m.l.weight_packed"));
                    assert!(names.contains(&"m.l.weight_scale"));
                    assert!(names.contains(&"m.l.weight_shape"));
                    assert_eq!(names.contains(&"m.l.weight_zero_point"), !sym);
                    assert_eq!(names.contains(&"m.l.weight_g_idx"), with_g);
                    let map = getter(&ts);
                    let get = |n: &str| {
                        map.get(n)
                            .cloned()
                            .ok_or_else(|| anyhow::anyhow!("missing {n}"))
                    };
                    let back =
                        read_compressed_tensors_quantized(&get, "m.l", bits, gs, sym).unwrap();
                    same(&q, &back);
                    let dense = dequantized(read_compressed_tensors_quantized(
                        &get, "m.l", bits, gs, sym,
                    ))
                    .unwrap();
                    assert_eq!(dense.as_slice(), q.dequantize().as_slice().unwrap());
                }
            }
        }
    }
}

#[test]
fn gptq_raw_pack_unpack() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for &bits in &[2u32, 3, 4, 8] {
        let (qmin, qmax) = qrange(bits);
        let (out, inn) = (64, 96);
        let codes: Vec<i8> = (0..out * inn)
            .map(|_| rng.gen_range(qmin..=qmax) as i8)
            .collect();
        let qw = gptq_pack_qweight(&codes, out, inn, bits).unwrap();
        assert_eq!(qw.len(), inn / 32 * bits as usize * out);
        assert_eq!(gptq_unpack_qweight(&qw, out, inn, bits).unwrap(), codes);
        let zu: Vec<u32> = (0..3 * out)
            .map(|_| rng.gen_range(0..(1u32 << bits)))
            .collect();
        let qz = gptq_pack_qzeros(&zu, 3, out, bits).unwrap();
        assert_eq!(qz.len(), 3 * out / 32 * bits as usize);
        assert_eq!(gptq_unpack_qzeros(&qz, 3, out, bits).unwrap(), zu);
    }
    // 4 bit: qweight word k of column o holds inputs 8k..8k+8 at nibbles 0..8
    let codes: Vec<i8> = (0..32).map(|j| (j % 16 - 8) as i8).collect();
    let qw = gptq_pack_qweight(&codes, 1, 32, 4).unwrap();
    assert_eq!(qw[0] as u32, 0x7654_3210);
    // v1 zero convention: symmetric 4-bit zero 8 is stored as 7 in every nibble
    let qz = gptq_pack_qzeros(&[8u32; 32], 1, 32, 4).unwrap();
    assert_eq!(qz, vec![0x7777_7777; 4]);
    // 5..7 bits are refused
    assert!(gptq_pack_qweight(&codes, 1, 32, 5).is_err());
}

#[test]
fn gptq_round_trips() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for &bits in &[2u32, 3, 4, 8] {
        for &sym in &[true, false] {
            for &(strategy, gs) in &[(Strategy::Group, 32usize), (Strategy::Channel, 0)] {
                for &with_g in &[false, true] {
                    if with_g && strategy != Strategy::Group {
                        continue;
                    }
                    let q = random_linear(&mut rng, bits, sym, strategy, 64, 128, gs, with_g);
                    let ts = gptq_tensors("m.l", &q).unwrap();
                    let shapes: HashMap<&str, Vec<usize>> =
                        ts.iter().map(|t| (t.0.as_str(), t.2.clone())).collect();
                    let ng = q.n_groups();
                    assert_eq!(shapes["m.l.qweight"], vec![128 / 32 * bits as usize, 64]);
                    assert_eq!(shapes["m.l.qzeros"], vec![ng, 64 / 32 * bits as usize]);
                    assert_eq!(shapes["m.l.scales"], vec![ng, 64]);
                    assert_eq!(shapes["m.l.g_idx"], vec![128]);
                    let map = getter(&ts);
                    let get = |n: &str| {
                        map.get(n)
                            .cloned()
                            .ok_or_else(|| anyhow::anyhow!("missing {n}"))
                    };
                    let back = read_gptq_quantized(&get, "m.l", bits, gs, sym).unwrap();
                    assert_eq!(back.codes, q.codes);
                    assert_eq!(back.zeros, q.zeros);
                    assert_eq!(back.g_idx, q.g_idx);
                    assert_eq!(back.scale_dtype, DType::F16);
                    // scales went through f16
                    let s16: Vec<f32> = q
                        .scales
                        .iter()
                        .map(|&s| half::f16::from_f32(s).to_f32())
                        .collect();
                    assert_eq!(back.scales, s16);
                    let dense =
                        dequantized(read_gptq_quantized(&get, "m.l", bits, gs, sym)).unwrap();
                    assert_eq!(dense.as_slice(), back.dequantize().as_slice().unwrap());
                    // without g_idx the reader falls back to group_size
                    if !with_g && strategy == Strategy::Group {
                        let get2 = |n: &str| {
                            if n.ends_with(".g_idx") {
                                anyhow::bail!("absent")
                            }
                            get(n)
                        };
                        let b2 = read_gptq_quantized(&get2, "m.l", bits, gs, sym).unwrap();
                        assert_eq!(b2.codes, q.codes);
                        assert_eq!(b2.g_idx, None);
                    }
                }
            }
        }
    }
}

#[test]
fn gptq_tensor_strategy_exports_one_group() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let q = random_linear(&mut rng, 4, false, Strategy::Tensor, 32, 64, 0, false);
    let ts = gptq_tensors("x", &q).unwrap();
    let map = getter(&ts);
    let get = |n: &str| {
        map.get(n)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("missing {n}"))
    };
    let dense = dequantized(read_gptq_quantized(&get, "x", 4, 0, false)).unwrap();
    let want: Vec<f32> = q.dequantize().iter().copied().collect();
    assert_eq!(dense, want);
}

#[test]
fn packers_refuse_bad_shapes() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    // GPTQ needs in and out multiples of 32
    let q = random_linear(&mut rng, 4, true, Strategy::Channel, 40, 64, 0, false);
    assert!(gptq_tensors("x", &q).is_err());
    let q = random_linear(&mut rng, 4, true, Strategy::Channel, 32, 48, 0, false);
    assert!(gptq_tensors("x", &q).is_err());
    // compressed-tensors pads instead
    let q = random_linear(&mut rng, 3, false, Strategy::Channel, 33, 47, 0, false);
    let ts = compressed_tensors_tensors("x", &q).unwrap();
    let map = getter(&ts);
    assert_eq!(map["x.weight_packed"].1, vec![33, 5]);
    assert_eq!(map["x.weight_zero_point"].1, vec![4, 1]);
    let get = |n: &str| {
        map.get(n)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("missing {n}"))
    };
    let back = read_compressed_tensors_quantized(&get, "x", 3, 0, false).unwrap();
    same(&q, &back);
}
