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
use crate::quant::{QuantArgs, QuantizedLinear, Strategy};
use crate::safetensors_file::{from_f32, to_f32, to_i64, DType};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

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

/// (bits, group_size, symmetric, method) of a compressed-tensors `quantization_config` block
/// (see [`super::read_scheme`]).
pub fn read_config_block(q: &Value, file: &std::path::Path) -> Result<(u32, usize, bool, String)> {
    let groups = q
        .get("config_groups")
        .and_then(|g| g.as_object())
        .with_context(|| {
            format!(
                "{}: `quantization_config.config_groups` missing",
                file.display()
            )
        })?;
    if groups.len() != 1 {
        bail!(
            "{}: only one quantization config group is supported, found {}",
            file.display(),
            groups.len()
        );
    }
    let w = groups
        .values()
        .next()
        .and_then(|g| g.get("weights"))
        .with_context(|| format!("{}: config group has no `weights`", file.display()))?;
    let fmt = q.get("format").and_then(|f| f.as_str()).unwrap_or("");
    if fmt != "pack-quantized" && fmt != "int-quantized" {
        bail!(
            "{}: compressed-tensors format `{fmt}` is not supported (pack-quantized and int-quantized are)",
            file.display()
        );
    }
    if fmt == "int-quantized" {
        return Ok((8, 0, true, "int-quantized".into()));
    }
    let bits = w
        .get("num_bits")
        .and_then(Value::as_u64)
        .context("`num_bits` missing")? as u32;
    let gs = w.get("group_size").and_then(Value::as_u64).unwrap_or(0) as usize;
    let sym = w.get("symmetric").and_then(Value::as_bool).unwrap_or(true);
    Ok((bits, gs, sym, "compressed-tensors".into()))
}

/// Bits of the dynamic per-token activation quantizer a `quantization_config` block (`q`, of
/// config.json `file`) puts on linear `module`, if any (see
/// `model::dequant::input_activation_bits`).
pub fn read_input_activation_bits(
    q: &Value,
    module: &str,
    file: &std::path::Path,
) -> Result<Option<u32>> {
    let ignored = q
        .get("ignore")
        .and_then(Value::as_array)
        .is_some_and(|v| v.iter().any(|x| x.as_str() == Some(module)));
    let Some(a) = q
        .pointer("/config_groups/group_0/input_activations")
        .filter(|a| !a.is_null())
    else {
        return Ok(None);
    };
    if ignored {
        return Ok(None);
    }
    let ok = a.get("dynamic") == Some(&Value::Bool(true))
        && a.get("strategy").and_then(Value::as_str) == Some("token")
        && a.get("symmetric") != Some(&Value::Bool(false));
    if !ok {
        bail!(
            "{}: `input_activations` other than dynamic symmetric per-token are not supported",
            file.display()
        );
    }
    let bits = a
        .get("num_bits")
        .and_then(Value::as_u64)
        .with_context(|| format!("{}: `input_activations.num_bits` missing", file.display()))?;
    Ok(Some(bits as u32))
}

/// The `input_activations` block of W8A8: dynamic, symmetric, per token.
pub fn input_activations(bits: u32) -> Value {
    json!({
        "actorder": null,
        "block_structure": null,
        "dynamic": true,
        "group_size": null,
        "num_bits": bits,
        "observer": null,
        "observer_kwargs": {},
        "scale_dtype": null,
        "strategy": "token",
        "symmetric": true,
        "type": "int",
        "zp_dtype": null
    })
}

/// Bytes [`compressed_tensors_tensors`] writes for `q`, computed from the shapes alone.
pub fn stored_bytes(q: &QuantizedLinear) -> usize {
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

/// How sparse linears are stored (`export.sparse_format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SparseFormat {
    /// The weight matrix with exact zeros (loads everywhere).
    #[default]
    Dense,
    /// compressed-tensors `sparse-bitmask`: the non-zeros and a bit per position.
    Bitmask,
}

impl SparseFormat {
    /// The `format` of the `sparsity_config` block.
    pub fn name(&self) -> &'static str {
        match self {
            SparseFormat::Dense => "dense",
            SparseFormat::Bitmask => "sparse-bitmask",
        }
    }
}

/// compressed-tensors' `sparse-bitmask` layout of one sparse linear `[rows, cols]` (its
/// `BitmaskTensor`, row-major): `{prefix}.shape` I64 `[2]`; `{prefix}.compressed` the non-zero
/// values in row-major order, in the weight's dtype; `{prefix}.bitmask` U8
/// `[rows, ceil(cols/8)]`, column j of a row at bit j % 8 of byte j / 8 (numpy `packbits`,
/// `bitorder="little"`), set where the value is non-zero; `{prefix}.row_offsets` I64 `[rows]`,
/// where each row's values start in `compressed`. A value whose stored form is zero (an f32
/// that rounds to ±0 in bf16) counts as a zero, as the library's `tensor != 0` on the stored
/// tensor does.
pub fn bitmask_tensors(
    prefix: &str,
    w: &[f32],
    (rows, cols): (usize, usize),
    dtype: DType,
) -> Result<Vec<NamedTensor>> {
    ensure!(
        w.len() == rows * cols,
        "`{prefix}`: {} values for [{rows}, {cols}]",
        w.len()
    );
    let stored = to_f32(dtype, &from_f32(dtype, w)).context("bitmask: float dtype expected")?;
    let width = cols.div_ceil(8);
    let mut bitmask = vec![0u8; rows * width];
    let mut values = Vec::new();
    let mut offsets = Vec::with_capacity(rows);
    for r in 0..rows {
        offsets.push(values.len() as i64);
        for c in 0..cols {
            let v = stored[r * cols + c];
            if v != 0.0 {
                bitmask[r * width + c / 8] |= 1 << (c % 8);
                values.push(v);
            }
        }
    }
    Ok(vec![
        (
            format!("{prefix}.shape"),
            DType::I64,
            vec![2],
            i64s_to_bytes(&[rows as i64, cols as i64]),
        ),
        (
            format!("{prefix}.compressed"),
            dtype,
            vec![values.len()],
            from_f32(dtype, &values),
        ),
        (
            format!("{prefix}.bitmask"),
            DType::U8,
            vec![rows, width],
            bitmask,
        ),
        (
            format!("{prefix}.row_offsets"),
            DType::I64,
            vec![rows],
            i64s_to_bytes(&offsets),
        ),
    ])
}

/// Read a `sparse-bitmask` linear back to its dense `[rows, cols]` values (row-major) and the
/// values' dtype, checking every tensor against the others.
pub fn read_bitmask(get: TensorGetter, prefix: &str) -> Result<(Vec<f32>, DType, (usize, usize))> {
    let (_, shape) = get_i64s(get, &format!("{prefix}.shape"))?;
    ensure!(
        shape.len() == 2 && shape.iter().all(|d| *d > 0),
        "`{prefix}.shape` must hold two positive dims, found {shape:?}"
    );
    let (rows, cols) = (shape[0] as usize, shape[1] as usize);
    let width = cols.div_ceil(8);
    let (mdt, mshape, mask) = get(&format!("{prefix}.bitmask"))?;
    ensure!(
        matches!(mdt, DType::U8 | DType::I8) && mshape == [rows, width],
        "`{prefix}.bitmask` is {} {mshape:?}, expected uint8 [{rows}, {width}]",
        mdt.name()
    );
    let (vdt, _, vbytes) = get(&format!("{prefix}.compressed"))?;
    let values = to_f32(vdt, &vbytes).with_context(|| {
        format!(
            "`{prefix}.compressed`: expected a float tensor, found {}",
            vdt.name()
        )
    })?;
    let (_, offsets) = get_i64s(get, &format!("{prefix}.row_offsets"))?;
    ensure!(
        offsets.len() == rows,
        "`{prefix}.row_offsets` has {} entries for {rows} rows",
        offsets.len()
    );
    let mut w = vec![0f32; rows * cols];
    let mut k = 0usize;
    for r in 0..rows {
        ensure!(
            offsets[r] == k as i64,
            "`{prefix}.row_offsets[{r}]` is {}, the bitmask puts row {r} at {k}",
            offsets[r]
        );
        for c in 0..cols {
            if mask[r * width + c / 8] >> (c % 8) & 1 == 1 {
                let v = *values.get(k).with_context(|| {
                    format!(
                        "`{prefix}.compressed` holds {} values, the bitmask sets more",
                        values.len()
                    )
                })?;
                w[r * cols + c] = v;
                k += 1;
            }
        }
    }
    ensure!(
        k == values.len(),
        "`{prefix}.compressed` holds {} values, the bitmask sets {k}",
        values.len()
    );
    Ok((w, vdt, (rows, cols)))
}

/// The `sparsity_config` block (compressed-tensors' `SparsityCompressionConfig`): `format`
/// `dense` (weights with exact zeros) or `sparse-bitmask`, `global_sparsity` is the measured
/// fraction of zeros over the decoder-layer linears, `sparsity_structure` `2:4` when every group
/// of four consecutive inputs of every sparse linear holds at most two non-zeros (checked on the
/// written values), else `unstructured`.
pub fn sparsity_config(
    global: f64,
    structure: &str,
    dense_linears: &[String],
    format: SparseFormat,
) -> Value {
    let mut ignore: Vec<String> = vec!["lm_head".into()];
    ignore.extend(dense_linears.iter().cloned());
    json!({
        "format": format.name(),
        "global_sparsity": global,
        "ignore": ignore,
        "registry_requires_subclass": false,
        "sparsity_structure": structure,
        "targets": ["Linear"],
    })
}

/// The `quantization_config` block compressed-tensors (and so vLLM and transformers) reads, for
/// linears quantized with `a` in column order `order`; `unquantized` are the decoder linears
/// left dense.
pub fn quantization_config(
    a: &QuantArgs,
    order: Order,
    unquantized: &[String],
    act_bits: Option<u32>,
) -> Value {
    let format = if act_bits.is_some() {
        "int-quantized"
    } else {
        "pack-quantized"
    };
    // `targets: ["Linear"]` matches every nn.Linear the loader builds, `lm_head` included
    // even when it is tied to the embedding and has no tensor of its own: everything we
    // left unquantized must be listed, or transformers/vLLM turn it into a quantized
    // linear without tensors (tied checkpoints then fail to load).
    let mut ignore: Vec<String> = vec!["lm_head".into()];
    ignore.extend(unquantized.iter().cloned());
    let (strategy, group_size) = match a.strategy {
        Strategy::Group => ("group", json!(a.group_size)),
        Strategy::Channel => ("channel", Value::Null),
        Strategy::Tensor => ("tensor", Value::Null),
        Strategy::Block => ("block", Value::Null),
        Strategy::TensorGroup => ("tensor_group", json!(a.group_size)),
        Strategy::Token => ("token", Value::Null),
    };
    json!({
        "config_groups": {
            "group_0": {
                "format": format,
                "input_activations": act_bits.map(input_activations),
                "output_activations": null,
                "targets": ["Linear"],
                "weights": {
                    "actorder": match order {
                        Order::Columns => Value::Null,
                        Order::Static => json!("static"),
                        Order::Dynamic => json!("group"),
                    },
                    "block_structure": null,
                    "dynamic": false,
                    "group_size": group_size,
                    "num_bits": a.bits,
                    "observer": match a.observer {
                        crate::quant::Observer::MinMax => "memoryless_minmax",
                        crate::quant::Observer::Mse => "memoryless_mse",
                    },
                    "observer_kwargs": {},
                    "scale_dtype": null,
                    "strategy": strategy,
                    "symmetric": a.symmetric,
                    "type": "int",
                    "zp_dtype": if a.symmetric { Value::Null } else { json!("torch.int8") }
                }
            }
        },
        "format": format,
        "global_compression_ratio": null,
        "ignore": ignore,
        "kv_cache_scheme": null,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.19.0"
    })
}
