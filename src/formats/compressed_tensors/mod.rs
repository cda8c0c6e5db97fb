//! compressed-tensors `pack-quantized` (compressed-tensors 0.19 `pack_to_int32`): each row
//! (or column) is one dense little-endian bit stream, value `k` at stream bits
//! `k·bits..(k+1)·bits` — a value may straddle two words for widths that do not divide 32
//! (3, 5, 6, 7) — in `ceil(n·bits/32)` words, the unused high bits of the last word zero;
//! stored value `q + 2^(b-1)`. `weight_packed` is packed along the input dim
//! (`[out, ceil(in·bits/32)]`: 576 3-bit inputs → 54 words); the asymmetric
//! `weight_zero_point` (group/channel strategies) along dim 0
//! (`[ceil(out·bits/32), n_groups]`). A tensor-strategy zero point is stored unpacked
//! (I8 `[1]`), as compressed-tensors does. (Before compressed-tensors' dense packing, and in
//! an earlier version of this file, `32 / bits` values went into each word with the top bits
//! left empty: a different layout for 3/5/6/7 bits that loaders misread silently.)

use super::bits::{bytes_to_i32s, i32s_to_bytes, i64s_to_bytes, pack_bits, unpack_stream};
use super::Order;
use super::{get_i64s, NamedTensor, Stored, TensorGetter};
use crate::quant::{QuantizedLinear, Strategy};
use crate::safetensors_file::{from_f32, to_f32, to_i64, DType};
use anyhow::{bail, ensure, Context, Result};

mod bitmask;
mod config;
pub mod float;

pub use bitmask::*;
pub use config::*;

fn check_bits_ct(bits: u32) -> Result<()> {
    ensure!(
        (1..=8).contains(&bits),
        "compressed-tensors packing supports 1..=8 bits, not {bits}"
    );
    Ok(())
}

/// Int32 words compressed-tensors packs `n` values of `bits` bits into: `ceil(n·bits/32)`.
pub fn ct_packed_len(n: usize, bits: u32) -> usize {
    (n * bits as usize).div_ceil(32)
}

/// compressed-tensors `pack_to_int32`: `values` is `[rows, cols]` row-major signed codes;
/// `packed_dim` 1 packs each row as one dense little-endian bit stream →
/// `[rows, ceil(cols·bits/32)]`, 0 packs each column → `[ceil(rows·bits/32), cols]`.
/// Returns (packed words, packed shape).
pub fn ct_pack(
    values: &[i8],
    rows: usize,
    cols: usize,
    bits: u32,
    packed_dim: usize,
) -> Result<(Vec<i32>, [usize; 2])> {
    check_bits_ct(bits)?;
    ensure!(
        values.len() == rows * cols,
        "pack: {} values for shape [{rows}, {cols}]",
        values.len()
    );
    ensure!(packed_dim <= 1, "pack: packed_dim must be 0 or 1");
    let offset = 1i32 << (bits - 1);
    let (qmin, qmax) = (-offset, offset - 1);
    let unsigned = |v: i8| -> Result<u32> {
        let v = v as i32;
        ensure!(
            v >= qmin && v <= qmax,
            "pack: code {v} outside [{qmin}, {qmax}] for {bits} bits"
        );
        Ok((v + offset) as u32)
    };
    // (number of streams, values per stream, value k of stream s)
    let (streams, len) = if packed_dim == 1 {
        (rows, cols)
    } else {
        (cols, rows)
    };
    let at = |s: usize, k: usize| {
        if packed_dim == 1 {
            values[s * cols + k]
        } else {
            values[k * cols + s]
        }
    };
    let words = ct_packed_len(len, bits);
    let mut out = vec![0i32; streams * words];
    for s in 0..streams {
        let stream = (0..len)
            .map(|k| unsigned(at(s, k)))
            .collect::<Result<Vec<u32>>>()?;
        for (w, x) in pack_bits(&stream, bits)?.into_iter().enumerate() {
            if packed_dim == 1 {
                out[s * words + w] = x as i32;
            } else {
                out[w * cols + s] = x as i32;
            }
        }
    }
    let shape = if packed_dim == 1 {
        [rows, words]
    } else {
        [words, cols]
    };
    Ok((out, shape))
}

/// compressed-tensors `unpack_from_int32`: inverse of [`ct_pack`]; `shape` is the unpacked
/// `[rows, cols]` (padding bits are dropped).
pub fn ct_unpack(
    packed: &[i32],
    packed_shape: [usize; 2],
    bits: u32,
    shape: [usize; 2],
    packed_dim: usize,
) -> Result<Vec<i8>> {
    check_bits_ct(bits)?;
    let [rows, cols] = shape;
    let want = if packed_dim == 1 {
        [rows, ct_packed_len(cols, bits)]
    } else {
        [ct_packed_len(rows, bits), cols]
    };
    ensure!(
        packed_shape == want,
        "unpack: packed shape {packed_shape:?} does not match {want:?} for {bits}-bit values of shape {shape:?} packed along dim {packed_dim}"
    );
    ensure!(
        packed.len() == want[0] * want[1],
        "unpack: {} words for shape {want:?}",
        packed.len()
    );
    let offset = 1i32 << (bits - 1);
    let mut out = vec![0i8; rows * cols];
    if packed_dim == 1 {
        for r in 0..rows {
            let words: Vec<u32> = packed[r * want[1]..(r + 1) * want[1]]
                .iter()
                .map(|&w| w as u32)
                .collect();
            for (c, u) in unpack_stream(&words, cols, bits)?.into_iter().enumerate() {
                out[r * cols + c] = (u as i32 - offset) as i8;
            }
        }
    } else {
        for c in 0..cols {
            let words: Vec<u32> = (0..want[0]).map(|w| packed[w * cols + c] as u32).collect();
            for (r, u) in unpack_stream(&words, rows, bits)?.into_iter().enumerate() {
                out[r * cols + c] = (u as i32 - offset) as i8;
            }
        }
    }
    Ok(out)
}

fn scale_bytes(q: &QuantizedLinear, dtype: DType, values: &[f32]) -> Result<Vec<u8>> {
    for &s in values {
        let back =
            to_f32(dtype, &from_f32(dtype, &[s])).context("scale dtype is not a float type")?[0];
        ensure!(
            back == s,
            "scale {s} of a {}x{} linear is not representable in {}",
            q.shape.0,
            q.shape.1,
            dtype.name()
        );
    }
    Ok(from_f32(dtype, values))
}

/// The tensors compressed-tensors `pack-quantized` writes for one linear:
/// `{prefix}.weight_packed` I32, `.weight_scale` (in `q.scale_dtype`; `[1]` tensor strategy,
/// `[out, 1]` channel, `[out, n_groups]` group), `.weight_shape` I64 `[2]`,
/// `.weight_zero_point` when asymmetric, `.weight_g_idx` I32 `[in]` when `g_idx` is set.
pub fn compressed_tensors_tensors(prefix: &str, q: &QuantizedLinear) -> Result<Vec<NamedTensor>> {
    q.validate()?;
    let bits = q.args.bits;
    let (out, inn) = q.shape;
    let ng = q.n_groups();
    let mut v = Vec::new();

    let (packed, pshape) = ct_pack(&q.codes, out, inn, bits, 1)?;
    v.push((
        format!("{prefix}.weight_packed"),
        DType::I32,
        pshape.to_vec(),
        i32s_to_bytes(&packed),
    ));

    let tensor = q.args.strategy == Strategy::Tensor;
    let (sv, sshape) = if tensor {
        (vec![q.scales[0]], vec![1])
    } else {
        (q.scales.clone(), vec![out, ng])
    };
    v.push((
        format!("{prefix}.weight_scale"),
        q.scale_dtype,
        sshape,
        scale_bytes(q, q.scale_dtype, &sv)?,
    ));

    v.push((
        format!("{prefix}.weight_shape"),
        DType::I64,
        vec![2],
        i64s_to_bytes(&[out as i64, inn as i64]),
    ));

    if !q.args.symmetric {
        let z = q
            .zeros
            .as_ref()
            .context("asymmetric quantized linear without zero points")?;
        if tensor {
            v.push((
                format!("{prefix}.weight_zero_point"),
                DType::I8,
                vec![1],
                vec![z[0] as u8],
            ));
        } else {
            let (pz, zshape) = ct_pack(z, out, ng, bits, 0)?;
            v.push((
                format!("{prefix}.weight_zero_point"),
                DType::I32,
                zshape.to_vec(),
                i32s_to_bytes(&pz),
            ));
        }
    }
    if let Some(g) = &q.g_idx {
        v.push((
            format!("{prefix}.weight_g_idx"),
            DType::I32,
            vec![inn],
            i32s_to_bytes(g),
        ));
    }
    Ok(v)
}

/// compressed-tensors `int-quantized` (W8A8's weights, what vLLM's int8 kernels load): the codes
/// as an I8 `weight` [out, in] and `weight_scale` [out, 1]; 8-bit symmetric per-channel only.
pub fn int_quantized_tensors(prefix: &str, q: &QuantizedLinear) -> Result<Vec<NamedTensor>> {
    q.validate()?;
    ensure!(
        q.args.bits == 8 && q.args.symmetric && q.args.strategy == Strategy::Channel,
        "`{prefix}`: int-quantized stores 8-bit symmetric per-channel weights, found {} bits, {:?}, sym {}",
        q.args.bits,
        q.args.strategy,
        q.args.symmetric
    );
    let (out, inn) = q.shape;
    Ok(vec![
        (
            format!("{prefix}.weight"),
            DType::I8,
            vec![out, inn],
            q.codes.iter().map(|&c| c as u8).collect(),
        ),
        (
            format!("{prefix}.weight_scale"),
            q.scale_dtype,
            vec![out, 1],
            scale_bytes(q, q.scale_dtype, &q.scales)?,
        ),
    ])
}

/// Read an `int-quantized` linear back.
pub fn read_int_quantized(get: TensorGetter, prefix: &str) -> Result<QuantizedLinear> {
    let wname = format!("{prefix}.weight");
    let (dt, shape, bytes) = get(&wname)?;
    ensure!(
        dt == DType::I8 && shape.len() == 2,
        "`{wname}`: expected a 2-d I8 tensor, found {} {shape:?}",
        dt.name()
    );
    let (out, inn) = (shape[0], shape[1]);
    let sname = format!("{prefix}.weight_scale");
    let (sdt, sshape, sbytes) = get(&sname)?;
    ensure!(
        sshape.iter().product::<usize>() == out,
        "`{sname}`: shape {sshape:?} for {out} output channels"
    );
    let scales = to_f32(sdt, &sbytes).with_context(|| format!("`{sname}`: not a float tensor"))?;
    Stored {
        bits: 8,
        symmetric: true,
        strategy: Strategy::Channel,
        group_size: 0,
        codes: bytes.iter().map(|&b| b as i8).collect(),
        scales,
        zeros: None,
        g_idx: None,
        scale_dtype: sdt,
        shape: (out, inn),
    }
    .linear(prefix)
}

/// Bytes [`compressed_tensors_tensors`] writes for `q`, computed from the shapes alone.
pub fn stored_bytes(q: &QuantizedLinear) -> usize {
    if q.args.float.is_some() {
        return float::stored_bytes(q);
    }
    let (out, inn) = q.shape;
    let bits = q.args.bits;
    let tensor = q.args.strategy == Strategy::Tensor;
    let ng = q.n_groups();
    let mut b = out * ct_packed_len(inn, bits) * 4 + 2 * 8;
    b += if tensor { 1 } else { out * ng } * q.scale_dtype.size();
    if !q.args.symmetric {
        b += if tensor {
            1
        } else {
            ct_packed_len(out, bits) * ng * 4
        };
    }
    if q.g_idx.is_some() {
        b += inn * 4;
    }
    b
}

/// Read the compressed-tensors tensors of one linear back into a [`QuantizedLinear`].
/// The strategy follows the scale's shape (`[1]` tensor, `[out, 1]` channel, else group);
/// `group_size` is checked against it for the group strategy. Optional tensors
/// (`weight_g_idx`, and `weight_zero_point` when `symmetric`) are treated as absent when `get`
/// fails for them.
pub fn read_compressed_tensors_quantized(
    get: TensorGetter,
    prefix: &str,
    bits: u32,
    group_size: usize,
    symmetric: bool,
) -> Result<QuantizedLinear> {
    check_bits_ct(bits)?;
    let (_, shp) = get_i64s(get, &format!("{prefix}.weight_shape"))?;
    ensure!(
        shp.len() == 2 && shp.iter().all(|&x| x >= 0),
        "`{prefix}.weight_shape` must hold two non-negative integers, found {shp:?}"
    );
    let (out, inn) = (shp[0] as usize, shp[1] as usize);

    let name = format!("{prefix}.weight_packed");
    let (dt, pshape, bytes) = get(&name)?;
    ensure!(
        dt == DType::I32 && pshape.len() == 2,
        "`{name}`: expected a 2-d I32 tensor, found {} {pshape:?}",
        dt.name()
    );
    let codes = ct_unpack(
        &bytes_to_i32s(&bytes)?,
        [pshape[0], pshape[1]],
        bits,
        [out, inn],
        1,
    )
    .with_context(|| format!("`{name}`"))?;

    let name = format!("{prefix}.weight_scale");
    let (sdt, sshape, sbytes) = get(&name)?;
    let svals = to_f32(sdt, &sbytes)
        .with_context(|| format!("`{name}`: expected a float tensor, found {}", sdt.name()))?;
    let (strategy, ng) = match sshape.as_slice() {
        [1] => (Strategy::Tensor, 1),
        [r, 1] if *r == out => (Strategy::Channel, 1),
        [r, g] if *r == out && *g > 0 => (Strategy::Group, *g),
        _ => bail!("`{name}`: shape {sshape:?} does not fit a [{out}, {inn}] weight"),
    };
    if strategy == Strategy::Group {
        ensure!(
            inn % ng == 0,
            "`{name}`: {ng} groups do not divide {inn} columns"
        );
        ensure!(
            group_size == 0 || inn / ng == group_size,
            "`{name}`: {ng} groups over {inn} columns, but group_size is {group_size}"
        );
    }
    let scales: Vec<f32> = if strategy == Strategy::Tensor {
        vec![svals[0]; out]
    } else {
        svals
    };

    let zname = format!("{prefix}.weight_zero_point");
    let zeros = if symmetric {
        None
    } else {
        let (zdt, zshape, zbytes) = get(&zname)?;
        let z: Vec<i8> = match (strategy, zdt) {
            (Strategy::Tensor, _) => {
                let z = to_i64(zdt, &zbytes)
                    .with_context(|| format!("`{zname}`: not an integer tensor"))?;
                ensure!(
                    z.len() == 1,
                    "`{zname}`: expected one value, found {}",
                    z.len()
                );
                vec![z[0] as i8; out]
            }
            (_, DType::I32) if zshape.len() == 2 => ct_unpack(
                &bytes_to_i32s(&zbytes)?,
                [zshape[0], zshape[1]],
                bits,
                [out, ng],
                0,
            )
            .with_context(|| format!("`{zname}`"))?,
            _ => bail!(
                "`{zname}`: expected a packed 2-d I32 tensor, found {} {zshape:?}",
                zdt.name()
            ),
        };
        Some(z)
    };

    let g_idx = match get_i64s(get, &format!("{prefix}.weight_g_idx")) {
        Ok((_, g)) => {
            ensure!(
                g.len() == inn,
                "`{prefix}.weight_g_idx`: {} entries for {inn} columns",
                g.len()
            );
            if g.iter().any(|&x| x < 0) {
                None // -1 means "not initialised": column order
            } else {
                Some(g.into_iter().map(|x| x as i32).collect())
            }
        }
        Err(_) => None,
    };

    Stored {
        bits,
        symmetric,
        strategy,
        group_size: if strategy == Strategy::Group {
            inn / ng
        } else {
            group_size
        },
        codes,
        scales,
        zeros,
        g_idx,
        scale_dtype: sdt,
        shape: (out, inn),
    }
    .linear(prefix)
}
