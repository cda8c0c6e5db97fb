//! compressed-tensors' float formats (compressed-tensors 0.19 compressors):
//!
//! - `float-quantized` (FP8): `weight` F8_E4M3 `[out, in]` and `weight_scale` in the weights'
//!   dtype — `[1]` per tensor, `[out, 1]` per channel, `[⌈out/br⌉, ⌈in/bc⌉]` per block.
//! - `nvfp4-pack-quantized`: `weight_packed` U8 `[out, in/2]` — two E2M1 codes per byte, the
//!   even column in the low nibble (sign in bit 3) — `weight_scale` F8_E4M3 `[out, in/16]`,
//!   `weight_global_scale` F32 `[1]`; a value is code · scale / global.
//! - `mxfp4-pack-quantized`: `weight_packed` as NVFP4, `weight_scale` U8 `[out, in/32]` holding
//!   E8M0 exponents (2^(e−127)).
//! - `mxfp8-quantized`: `weight` F8_E4M3 `[out, in]`, `weight_scale` U8 exponents `[out, in/32]`.

use super::super::{NamedTensor, TensorGetter};
use crate::number::{FloatFormat, ScaleType};
use crate::quant::{QuantArgs, QuantizedLinear, Strategy};
use crate::safetensors_file::{from_f32, to_f32, DType};
use anyhow::{bail, ensure, Context, Result};

/// The compressed-tensors format a float grid is written in; `None` for integer grids.
pub fn format_name(a: &QuantArgs) -> Option<&'static str> {
    let f = a.float?;
    Some(match (f, a.scale_type) {
        (FloatFormat::E2M1, Some(ScaleType::E8M0)) => "mxfp4-pack-quantized",
        (FloatFormat::E2M1, _) => "nvfp4-pack-quantized",
        (_, Some(ScaleType::E8M0)) => "mxfp8-quantized",
        _ => "float-quantized",
    })
}

/// compressed-tensors' `scale_dtype` field for a scale type.
pub fn scale_dtype_name(t: Option<ScaleType>) -> Option<&'static str> {
    Some(match t? {
        ScaleType::E4M3 => "torch.float8_e4m3fn",
        ScaleType::E8M0 => "torch.uint8",
        ScaleType::BF16 => "torch.bfloat16",
        ScaleType::F16 => "torch.float16",
        ScaleType::F32 => "torch.float32",
    })
}

/// The scale type a `scale_dtype` field names.
pub fn scale_type_of(name: &str) -> Result<ScaleType> {
    Ok(match name {
        "torch.float8_e4m3fn" => ScaleType::E4M3,
        "torch.uint8" => ScaleType::E8M0,
        "torch.bfloat16" => ScaleType::BF16,
        "torch.float16" => ScaleType::F16,
        "torch.float32" => ScaleType::F32,
        _ => bail!("scale_dtype `{name}` is not one compressed-tensors writes"),
    })
}

/// Two 4-bit codes per byte, the even column in the low nibble.
fn pack_nibbles(codes: &[i8], out: usize, inn: usize) -> Result<Vec<u8>> {
    ensure!(
        inn.is_multiple_of(2),
        "FP4 packing needs an even number of columns, found {inn}"
    );
    let _ = out;
    Ok(codes
        .chunks_exact(2)
        .map(|p| (p[0] as u8 & 0xf) | ((p[1] as u8 & 0xf) << 4))
        .collect())
}

fn unpack_nibbles(bytes: &[u8]) -> Vec<i8> {
    bytes
        .iter()
        .flat_map(|b| [(b & 0xf) as i8, (b >> 4) as i8])
        .collect()
}

/// The stored scales: one row per block of rows for the block strategy, the single scale of a
/// tensor, else `[out, n_groups]`; with their shape.
fn stored_scales(q: &QuantizedLinear) -> (Vec<f32>, Vec<usize>) {
    let (out, _) = q.shape;
    let ng = q.n_groups();
    match (q.args.strategy, q.args.block) {
        (Strategy::Tensor, _) => (vec![q.scales[0]], vec![1]),
        (Strategy::Block, Some([br, _])) => {
            let rows: Vec<usize> = (0..out).step_by(br).collect();
            let v = rows
                .iter()
                .flat_map(|&r| q.scales[r * ng..(r + 1) * ng].iter().copied())
                .collect();
            (v, vec![rows.len(), ng])
        }
        _ => (q.scales.clone(), vec![out, ng]),
    }
}

/// The tensors of one linear quantized onto a float grid.
pub fn float_tensors(prefix: &str, q: &QuantizedLinear) -> Result<Vec<NamedTensor>> {
    q.validate()?;
    let format = format_name(&q.args).context("not a float grid")?;
    let (out, inn) = q.shape;
    let (scales, sshape) = stored_scales(q);
    let mut v = Vec::new();
    let codes: Vec<u8> = q.codes.iter().map(|&c| c as u8).collect();
    match format {
        "float-quantized" | "mxfp8-quantized" => v.push((
            format!("{prefix}.weight"),
            DType::F8E4M3,
            vec![out, inn],
            codes,
        )),
        _ => v.push((
            format!("{prefix}.weight_packed"),
            DType::U8,
            vec![out, inn / 2],
            pack_nibbles(&q.codes, out, inn)?,
        )),
    }
    let (sdt, sbytes) = match q.args.scale_type {
        Some(ScaleType::E8M0) => (
            DType::U8,
            scales
                .iter()
                .map(|&s| FloatFormat::E8M0.encode(s))
                .collect(),
        ),
        _ => (q.scale_dtype, from_f32(q.scale_dtype, &scales)),
    };
    // every scale must be exactly representable where it is stored
    let back = match q.args.scale_type {
        Some(ScaleType::E8M0) => sbytes
            .iter()
            .map(|&e| FloatFormat::E8M0.decode(e))
            .collect(),
        _ => to_f32(sdt, &sbytes).context("scale dtype is not a float type")?,
    };
    if let Some((s, b)) = scales.iter().zip(&back).find(|(s, b)| s != b) {
        bail!(
            "`{prefix}`: scale {s} is not representable in {} (stored as {b})",
            sdt.name()
        );
    }
    v.push((format!("{prefix}.weight_scale"), sdt, sshape, sbytes));
    if let Some(g) = q.global_scale {
        v.push((
            format!("{prefix}.weight_global_scale"),
            DType::F32,
            vec![1],
            g.to_le_bytes().to_vec(),
        ));
    }
    Ok(v)
}

/// Bytes [`float_tensors`] writes for `q`.
pub fn stored_bytes(q: &QuantizedLinear) -> usize {
    let (out, inn) = q.shape;
    let (scales, _) = stored_scales(q);
    let scale_bytes = match q.args.scale_type {
        Some(ScaleType::E8M0 | ScaleType::E4M3) => 1,
        _ => q.scale_dtype.size(),
    };
    (out * inn * q.args.bits as usize).div_ceil(8)
        + scales.len() * scale_bytes
        + if q.global_scale.is_some() { 4 } else { 0 }
}

/// Read a linear written by [`float_tensors`] back, with the weights' arguments `args` from the
/// config's `weights` block.
pub fn read_float(get: TensorGetter, prefix: &str, args: &QuantArgs) -> Result<QuantizedLinear> {
    let fmt = args.float.context("not a float grid")?;
    let format = format_name(args).expect("a float grid");
    let (codes, out, inn) = if fmt == FloatFormat::E2M1 {
        let n = format!("{prefix}.weight_packed");
        let (dt, shape, bytes) = get(&n)?;
        ensure!(
            dt == DType::U8 && shape.len() == 2,
            "`{n}`: expected a 2-d U8 tensor ({format}), found {} {shape:?}",
            dt.name()
        );
        (unpack_nibbles(&bytes), shape[0], shape[1] * 2)
    } else {
        let n = format!("{prefix}.weight");
        let (dt, shape, bytes) = get(&n)?;
        ensure!(
            dt == DType::F8E4M3 && shape.len() == 2,
            "`{n}`: expected a 2-d F8_E4M3 tensor ({format}), found {} {shape:?}",
            dt.name()
        );
        (bytes.iter().map(|&b| b as i8).collect(), shape[0], shape[1])
    };
    let ng = args.groups_per_row(inn)?;
    let sname = format!("{prefix}.weight_scale");
    let (sdt, sshape, sbytes) = get(&sname)?;
    let stored: Vec<f32> = match args.scale_type {
        Some(ScaleType::E8M0) => {
            ensure!(
                sdt == DType::U8,
                "`{sname}`: expected U8 exponents, found {}",
                sdt.name()
            );
            sbytes
                .iter()
                .map(|&e| FloatFormat::E8M0.decode(e))
                .collect()
        }
        _ => to_f32(sdt, &sbytes).with_context(|| format!("`{sname}`: not a float tensor"))?,
    };
    let (want, scales): (Vec<usize>, Vec<f32>) = match (args.strategy, args.block) {
        (Strategy::Tensor, _) => (vec![1], vec![stored.first().copied().unwrap_or(0.0); out]),
        (Strategy::Block, Some([br, _])) => (
            vec![out.div_ceil(br), ng],
            (0..out)
                .flat_map(|r| {
                    let b = r / br;
                    stored[(b * ng).min(stored.len())..((b + 1) * ng).min(stored.len())].to_vec()
                })
                .collect(),
        ),
        _ => (vec![out, ng], stored.clone()),
    };
    ensure!(
        sshape.iter().product::<usize>() == want.iter().product::<usize>()
            && scales.len() == out * ng,
        "`{sname}`: shape {sshape:?}, expected {want:?} for a {out}×{inn} linear"
    );
    let global_scale = if args.global_scale {
        let g = format!("{prefix}.weight_global_scale");
        let (gdt, gshape, gbytes) = get(&g)?;
        let v = to_f32(gdt, &gbytes).with_context(|| format!("`{g}`: not a float tensor"))?;
        ensure!(
            v.len() == 1 && gshape.iter().product::<usize>() == 1,
            "`{g}`: expected one value, found shape {gshape:?}"
        );
        Some(v[0])
    } else {
        None
    };
    let q = QuantizedLinear {
        args: args.clone(),
        codes,
        scales,
        zeros: None,
        g_idx: None,
        static_order: false,
        true_sequential: false,
        scale_dtype: crate::quant::float::scale_storage(args, sdt),
        global_scale,
        shape: (out, inn),
    };
    q.validate().with_context(|| format!("`{prefix}`"))?;
    Ok(q)
}

/// The arguments of a float `weights` or `input_activations` block (`what` names it in errors).
pub fn read_args_block(b: &serde_json::Value, what: &str) -> Result<QuantArgs> {
    use serde_json::Value;
    let s = |k: &str| b.get(k).and_then(Value::as_str);
    let n = |k: &str| b.get(k).and_then(Value::as_u64);
    let bits = n("num_bits").with_context(|| format!("`{what}.num_bits` missing"))? as u32;
    let float = match (s("type"), bits) {
        (Some("float"), 8) => FloatFormat::E4M3,
        (Some("float"), 4) => FloatFormat::E2M1,
        (t, b) => bail!("`{what}`: type {t:?} with {b} bits is not a float grid we read"),
    };
    let strategy = match s("strategy") {
        Some("tensor") => Strategy::Tensor,
        Some("channel") => Strategy::Channel,
        Some("group") => Strategy::Group,
        Some("block") => Strategy::Block,
        Some("tensor_group") => Strategy::TensorGroup,
        Some("token") => Strategy::Token,
        other => bail!("`{what}.strategy` {other:?} is not supported"),
    };
    let block = match b.get("block_structure").and_then(Value::as_array) {
        Some(v) if v.len() == 2 => Some([
            v[0].as_u64().context("`block_structure` holds integers")? as usize,
            v[1].as_u64().context("`block_structure` holds integers")? as usize,
        ]),
        Some(v) => bail!(
            "`{what}.block_structure` has {} entries, expected 2",
            v.len()
        ),
        None => None,
    };
    let scale_type = s("scale_dtype").map(scale_type_of).transpose()?;
    Ok(QuantArgs {
        bits,
        symmetric: b.get("symmetric").and_then(Value::as_bool).unwrap_or(true),
        strategy,
        group_size: n("group_size").unwrap_or(0) as usize,
        observer: crate::quant::Observer::MinMax,
        float: Some(float),
        scale_type,
        global_scale: strategy == Strategy::TensorGroup,
        block,
    })
}
