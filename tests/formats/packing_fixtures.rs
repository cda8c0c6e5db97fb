//! Our packers against bytes the reference packers wrote (tests/fixtures/packing/, made by
//! tests/interop/make_packing_fixtures.py with compressed-tensors and GPTQModel themselves):
//! every fixture must be reproduced byte for byte and read back to the codes it came from.

use compress::formats::bits::*;
use compress::formats::compressed_tensors::*;
use compress::formats::gptq::*;
use compress::quant::{Observer, QuantArgs, QuantizedLinear, Strategy};
use compress::safetensors_file::DType;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/packing")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

struct T {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn tensors(bytes: &[u8]) -> HashMap<String, T> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                T {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    bytes: v.data().to_vec(),
                },
            )
        })
        .collect()
}

fn get<'a>(ts: &'a HashMap<String, T>, name: &str) -> &'a T {
    ts.get(name)
        .unwrap_or_else(|| panic!("fixture tensor `{name}` missing"))
}

fn i8s(t: &T) -> Vec<i8> {
    assert_eq!(t.dtype, Dtype::I8);
    t.bytes.iter().map(|&b| b as i8).collect()
}

fn i32s(t: &T) -> Vec<i32> {
    assert_eq!(t.dtype, Dtype::I32);
    bytes_to_i32s(&t.bytes).unwrap()
}

fn our_dtype(d: Dtype) -> DType {
    match d {
        Dtype::BF16 => DType::BF16,
        Dtype::F16 => DType::F16,
        Dtype::F32 => DType::F32,
        Dtype::I8 => DType::I8,
        Dtype::I32 => DType::I32,
        Dtype::I64 => DType::I64,
        other => panic!("unexpected fixture dtype {other:?}"),
    }
}

fn floats(t: &T) -> Vec<f32> {
    compress::safetensors_file::to_f32(our_dtype(t.dtype), &t.bytes).unwrap()
}

/// The `(bits, dim, rows, cols)` cases in ct_pack_to_int32.safetensors (`b{bits}.d{dim}.{r}x{c}`).
fn ct_cases(ts: &HashMap<String, T>) -> BTreeSet<(u32, usize, usize, usize)> {
    ts.keys()
        .filter_map(|k| k.strip_suffix(".codes"))
        .map(|k| {
            let p: Vec<&str> = k.split('.').collect();
            let (r, c) = p[2].split_once('x').unwrap();
            (
                p[0][1..].parse().unwrap(),
                p[1][1..].parse().unwrap(),
                r.parse().unwrap(),
                c.parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn ct_pack_to_int32_reproduced_byte_for_byte() {
    let ts = tensors(&fixture("ct_pack_to_int32.safetensors"));
    let cases = ct_cases(&ts);
    // every width 1..=8, both packed dims, and packed lengths that are not multiples of 32
    for bits in 1..=8 {
        for dim in 0..=1 {
            assert!(
                cases.iter().any(|&(b, d, r, c)| b == bits
                    && d == dim
                    && (if dim == 1 { c } else { r }) % 32 != 0),
                "fixture lacks a {bits}-bit dim-{dim} case with a ragged tail"
            );
        }
    }
    for &(bits, dim, r, c) in &cases {
        let key = format!("b{bits}.d{dim}.{r}x{c}");
        let codes = i8s(get(&ts, &format!("{key}.codes")));
        let want = get(&ts, &format!("{key}.packed"));
        assert_eq!(want.dtype, Dtype::I32, "{key}");
        let (packed, shape) = ct_pack(&codes, r, c, bits, dim).unwrap();
        assert_eq!(shape.to_vec(), want.shape, "{key}: packed shape");
        assert_eq!(i32s_to_bytes(&packed), want.bytes, "{key}: packed bytes");
        let back = ct_unpack(
            &i32s(want),
            [want.shape[0], want.shape[1]],
            bits,
            [r, c],
            dim,
        )
        .unwrap();
        assert_eq!(back, codes, "{key}: unpack of the reference bytes");
    }
    assert_eq!(
        cases.len() * 2,
        ts.len(),
        "every fixture tensor was checked"
    );
}

#[test]
fn ct_compressor_tensors_reproduced_byte_for_byte() {
    let ts = tensors(&fixture("ct_compressor.safetensors"));
    let names: BTreeSet<&str> = ts.keys().filter_map(|k| k.strip_suffix(".args")).collect();
    assert!(names.len() >= 8, "{names:?}");
    for name in names {
        let a: Vec<i64> = get(&ts, &format!("{name}.args"))
            .bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let (bits, sym, strategy, gs) = (
            a[0] as u32,
            a[1] != 0,
            [Strategy::Group, Strategy::Channel, Strategy::Tensor][a[2] as usize],
            a[3] as usize,
        );
        let ct = get(&ts, &format!("{name}.codes"));
        let (out, inn) = (ct.shape[0], ct.shape[1]);
        let codes = i8s(ct);
        let ws = get(&ts, &format!("{name}.weight_scale"));
        let svals = floats(ws);
        let zvals = i8s(get(&ts, &format!("{name}.zero")));
        let (scales, zeros) = if strategy == Strategy::Tensor {
            (vec![svals[0]; out], vec![zvals[0]; out])
        } else {
            (svals, zvals)
        };
        let q = QuantizedLinear {
            args: QuantArgs::int(bits, sym, strategy, gs, Observer::MinMax),
            codes: codes.clone(),
            scales,
            zeros: if sym { None } else { Some(zeros) },
            g_idx: None,
            static_order: false,
            true_sequential: false,
            scale_dtype: our_dtype(ws.dtype),
            global_scale: None,
            shape: (out, inn),
        };
        let ours = compressed_tensors_tensors("m", &q).unwrap();
        let mut expected: BTreeSet<String> = ["weight_packed", "weight_scale", "weight_shape"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if ts.contains_key(&format!("{name}.weight_zero_point")) {
            expected.insert("weight_zero_point".into());
        }
        let got: BTreeSet<String> = ours
            .iter()
            .map(|(n, ..)| n.strip_prefix("m.").unwrap().to_string())
            .collect();
        assert_eq!(got, expected, "{name}: tensor names");
        for (n, dt, shape, bytes) in &ours {
            let field = n.strip_prefix("m.").unwrap();
            let want = get(&ts, &format!("{name}.{field}"));
            assert_eq!(*dt, our_dtype(want.dtype), "{name}.{field}: dtype");
            assert_eq!(shape, &want.shape, "{name}.{field}: shape");
            assert_eq!(bytes, &want.bytes, "{name}.{field}: bytes");
        }
        // and our reader takes the reference tensors back to the same linear
        let map: HashMap<String, (DType, Vec<usize>, Vec<u8>)> = expected
            .iter()
            .map(|f| {
                let t = get(&ts, &format!("{name}.{f}"));
                (
                    format!("m.{f}"),
                    (our_dtype(t.dtype), t.shape.clone(), t.bytes.clone()),
                )
            })
            .collect();
        let getter = |n: &str| -> anyhow::Result<(DType, Vec<usize>, Vec<u8>)> {
            map.get(n)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no tensor {n}"))
        };
        let back = read_compressed_tensors_quantized(&getter, "m", bits, gs, sym).unwrap();
        assert_eq!(back.codes, q.codes, "{name}: codes read back");
        assert_eq!(back.scales, q.scales, "{name}: scales read back");
        assert_eq!(back.zeros, q.zeros, "{name}: zero points read back");
    }
}

/// `(bits, shape name)` of gptq_v1.safetensors (`b{bits}.{g32|ch}.…`).
fn gptq_cases(ts: &HashMap<String, T>) -> BTreeSet<(u32, String)> {
    ts.keys()
        .filter_map(|k| k.strip_suffix(".qweight"))
        .map(|k| {
            let (b, s) = k.split_once('.').unwrap();
            (b[1..].parse().unwrap(), s.to_string())
        })
        .collect()
}

#[test]
fn gptq_v1_qweight_reproduced_byte_for_byte() {
    let ts = tensors(&fixture("gptq_v1.safetensors"));
    let cases = gptq_cases(&ts);
    let widths: BTreeSet<u32> = cases.iter().map(|c| c.0).collect();
    assert_eq!(widths, [2, 3, 4, 8].into_iter().collect());
    for (bits, s) in &cases {
        let key = format!("b{bits}.{s}");
        let ct = get(&ts, &format!("{key}.codes"));
        let (out, inn) = (ct.shape[0], ct.shape[1]);
        let codes = i8s(ct);
        let want = get(&ts, &format!("{key}.qweight"));
        assert_eq!(want.shape, vec![inn / 32 * *bits as usize, out], "{key}");
        let ours = gptq_pack_qweight(&codes, out, inn, *bits).unwrap();
        assert_eq!(i32s_to_bytes(&ours), want.bytes, "{key}: qweight bytes");
        let back = gptq_unpack_qweight(&i32s(want), out, inn, *bits).unwrap();
        assert_eq!(back, codes, "{key}: qweight read back");
    }
}

/// Zero points 1..=2^b-1 (symmetric: 2^(b-1)): v1 stores `zero - 1` per field, nothing
/// borrows, and GPTQModel's packed-word v2→v1 subtraction equals our per-field layout.
#[test]
fn gptq_v1_qzeros_reproduced_byte_for_byte() {
    let ts = tensors(&fixture("gptq_v1.safetensors"));
    for (bits, s) in gptq_cases(&ts) {
        for v in ["sym", "asym"] {
            let key = format!("b{bits}.{s}.{v}");
            let zt = get(&ts, &format!("{key}.zeros"));
            let (groups, out) = (zt.shape[0], zt.shape[1]);
            let zeros: Vec<u32> = i32s(zt).into_iter().map(|z| z as u32).collect();
            let want = get(&ts, &format!("{key}.qzeros"));
            assert_eq!(want.shape, vec![groups, out / 32 * bits as usize], "{key}");
            let ours = gptq_pack_qzeros(&zeros, groups, out, bits).unwrap();
            assert_eq!(i32s_to_bytes(&ours), want.bytes, "{key}: qzeros bytes");
            let back = gptq_unpack_qzeros(&i32s(want), groups, out, bits).unwrap();
            assert_eq!(back, zeros, "{key}: qzeros read back");
        }
    }
}

/// The whole GPTQ v1 linear (`gptq_tensors`): qweight, qzeros, F16 scales and g_idx as
/// GPTQModel's packer stores them, and `read_gptq_quantized` on the reference tensors.
#[test]
fn gptq_v1_linear_tensors_reproduced_byte_for_byte() {
    let ts = tensors(&fixture("gptq_v1.safetensors"));
    for (bits, s) in gptq_cases(&ts) {
        for v in ["sym", "asym"] {
            let key = format!("b{bits}.{s}");
            let ct = get(&ts, &format!("{key}.codes"));
            let (out, inn) = (ct.shape[0], ct.shape[1]);
            let st = get(&ts, &format!("{key}.scales"));
            let ng = st.shape[0];
            let s_go = floats(st); // [ng, out]
            let zt = get(&ts, &format!("{key}.{v}.zeros")); // [ng, out] unsigned
            let z_go = i32s(zt);
            let h = 1i32 << (bits - 1);
            let mut scales = vec![0f32; out * ng];
            let mut zeros = vec![0i8; out * ng];
            for g in 0..ng {
                for o in 0..out {
                    scales[o * ng + g] = s_go[g * out + o];
                    zeros[o * ng + g] = (z_go[g * out + o] - h) as i8;
                }
            }
            let sym = v == "sym";
            let q = QuantizedLinear {
                args: QuantArgs::int(
                    bits,
                    sym,
                    if ng == 1 {
                        Strategy::Channel
                    } else {
                        Strategy::Group
                    },
                    inn / ng,
                    Observer::MinMax,
                ),
                codes: i8s(ct),
                scales,
                zeros: if sym { None } else { Some(zeros) },
                g_idx: None,
                static_order: false,
                true_sequential: false,
                scale_dtype: DType::F16,
                global_scale: None,
                shape: (out, inn),
            };
            let ours = gptq_tensors("m", &q).unwrap();
            let mut map = HashMap::new();
            for (n, dt, shape, bytes) in &ours {
                let field = n.strip_prefix("m.").unwrap();
                let fname = match field {
                    "qzeros" => format!("{key}.{v}.qzeros"),
                    f => format!("{key}.{f}"),
                };
                let want = get(&ts, &fname);
                assert_eq!(*dt, our_dtype(want.dtype), "{fname}: dtype");
                assert_eq!(shape, &want.shape, "{fname}: shape");
                assert_eq!(bytes, &want.bytes, "{fname}: bytes");
                map.insert(
                    n.clone(),
                    (
                        our_dtype(want.dtype),
                        want.shape.clone(),
                        want.bytes.clone(),
                    ),
                );
            }
            let getter = |n: &str| -> anyhow::Result<(DType, Vec<usize>, Vec<u8>)> {
                map.get(n)
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("no tensor {n}"))
            };
            let back = read_gptq_quantized(&getter, "m", bits, inn / ng, sym).unwrap();
            assert_eq!(back.codes, q.codes, "{key}.{v}: codes read back");
            assert_eq!(back.scales, q.scales, "{key}.{v}: scales read back");
            assert_eq!(back.zeros, q.zeros, "{key}.{v}: zeros read back");
        }
    }
}

/// Asymmetric zero points that include 0. GPTQ v1 stores `zero - 1`, which a field cannot hold
/// for 0; GPTQModel (the loader transformers uses) subtracts 0x55555555 / 0x11111111 /
/// 0x01010101 from each packed 32-bit word at save (`convert_gptq_v2_to_v1_format_module`,
/// 2/4/8 bits), so the -1 borrows from the next field, and adds the same constant back at load;
/// 3 bits is shifted per field. `gptq_pack_qzeros` / `gptq_unpack_qzeros` do the same.
#[test]
fn gptq_v1_qzeros_with_zero_point_0_match_gptqmodel() {
    let ts = tensors(&fixture("gptq_v1.safetensors"));
    let mut failures = Vec::new();
    for (bits, s) in gptq_cases(&ts) {
        let key = format!("b{bits}.{s}.asym0");
        let zt = get(&ts, &format!("{key}.zeros"));
        let (groups, out) = (zt.shape[0], zt.shape[1]);
        let zeros: Vec<u32> = i32s(zt).into_iter().map(|z| z as u32).collect();
        assert!(zeros.contains(&0), "{key}: fixture has no zero point 0");
        let want = i32s(get(&ts, &format!("{key}.qzeros")));
        let ours = gptq_pack_qzeros(&zeros, groups, out, bits).unwrap();
        let words = ours.iter().zip(&want).filter(|(a, b)| a != b).count();
        let back = gptq_unpack_qzeros(&want, groups, out, bits).unwrap();
        let wrong = back.iter().zip(&zeros).filter(|(a, b)| a != b).count();
        if words > 0 || wrong > 0 {
            failures.push(format!(
                "{key}: {words}/{} qzeros words differ; {wrong}/{} zeros misread from GPTQModel's bytes",
                want.len(),
                zeros.len()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
