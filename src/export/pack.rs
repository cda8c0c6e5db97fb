//! Bit packing of quantized linears into the tensors of the formats we write, and the inverse
//! readers used for read-back evaluation. Pure functions: no algorithms, no file I/O.
//!
//! * compressed-tensors `pack-quantized` (compressed-tensors 0.19 `pack_to_int32`): each row
//!   (or column) is one dense little-endian bit stream, value `k` at stream bits
//!   `k·bits..(k+1)·bits` — a value may straddle two words for widths that do not divide 32
//!   (3, 5, 6, 7) — in `ceil(n·bits/32)` words, the unused high bits of the last word zero;
//!   stored value `q + 2^(b-1)`. `weight_packed` is packed along the input dim
//!   (`[out, ceil(in·bits/32)]`: 576 3-bit inputs → 54 words); the asymmetric
//!   `weight_zero_point` (group/channel strategies) along dim 0
//!   (`[ceil(out·bits/32), n_groups]`). A tensor-strategy zero point is stored unpacked
//!   (I8 `[1]`), as compressed-tensors does. (Before compressed-tensors' dense packing, and in
//!   an earlier version of this file, `32 / bits` values went into each word with the top bits
//!   left empty: a different layout for 3/5/6/7 bits that loaders misread silently.)
//! * GPTQ v1 (AutoGPTQ `qlinear_cuda_old.pack`, GPTQModel): one continuous little-endian bit
//!   stream per column (`qweight`, along the input dim) or per group row (`qzeros`, along the
//!   output dim). For 2/4/8 bits this is the usual `32/bits` values per word; for 3 bits 32
//!   values span 3 words with values 10 and 21 straddling word boundaries, exactly AutoGPTQ's
//!   layout. `qzeros` stores `zero - 1` masked to `bits` (the v1 convention), where `zero` is the
//!   unsigned zero point (`zp + 2^(b-1)`; `2^(b-1)` when symmetric).

use crate::model::safetensors_file::{from_f32, to_f32, to_i64, DType};
use crate::quant::{Observer, QuantArgs, QuantizedLinear, Strategy};
use anyhow::{bail, ensure, Context, Result};

/// (name, dtype, shape, little-endian bytes)
pub type NamedTensor = (String, DType, Vec<usize>, Vec<u8>);

/// Reads a tensor by full name: (dtype, shape, little-endian bytes).
pub type TensorGetter<'a> = &'a dyn Fn(&str) -> Result<(DType, Vec<usize>, Vec<u8>)>;

// ---------------------------------------------------------------------------------------------
// bytes

pub fn i32s_to_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn i64s_to_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn bytes_to_i32s(b: &[u8]) -> Result<Vec<i32>> {
    ensure!(
        b.len().is_multiple_of(4),
        "int32 tensor: {} bytes is not a multiple of 4",
        b.len()
    );
    Ok(b.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

// ---------------------------------------------------------------------------------------------
// compressed-tensors pack-quantized

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

fn get_i64s(get: TensorGetter, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
    let (dt, shape, bytes) = get(name)?;
    let v = to_i64(dt, &bytes)
        .with_context(|| format!("`{name}`: expected an integer tensor, found {}", dt.name()))?;
    Ok((shape, v))
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

    let q = QuantizedLinear {
        args: QuantArgs {
            bits,
            symmetric,
            strategy,
            group_size: if strategy == Strategy::Group {
                inn / ng
            } else {
                group_size
            },
            observer: Observer::MinMax,
        },
        codes,
        scales,
        zeros,
        g_idx,
        static_order: false,
        scale_dtype: sdt,
        shape: (out, inn),
    };
    q.validate().with_context(|| format!("`{prefix}`"))?;
    Ok(q)
}

/// Dense `[out, in]` f32 weights of one compressed-tensors linear (read-back evaluation).
pub fn read_compressed_tensors(
    get: TensorGetter,
    prefix: &str,
    bits: u32,
    group_size: usize,
    symmetric: bool,
) -> Result<Vec<f32>> {
    let q = read_compressed_tensors_quantized(get, prefix, bits, group_size, symmetric)?;
    Ok(q.dequantize().into_raw_vec_and_offset().0)
}

// ---------------------------------------------------------------------------------------------
// GPTQ v1

fn check_bits_gptq(bits: u32) -> Result<()> {
    ensure!(
        matches!(bits, 2 | 3 | 4 | 8),
        "GPTQ packing supports 2, 3, 4 and 8 bits, not {bits}"
    );
    Ok(())
}

/// Pack `n` unsigned `bits`-bit values (n·bits a multiple of 32) as one little-endian bit stream
/// into n·bits/32 words: value i occupies stream bits i·bits.. (it may straddle two words).
pub fn pack_stream(values: &[u32], bits: u32) -> Result<Vec<u32>> {
    ensure!(
        (values.len() * bits as usize).is_multiple_of(32),
        "pack: {} values of {bits} bits do not fill whole 32-bit words",
        values.len()
    );
    pack_bits(values, bits)
}

/// [`pack_stream`] for any `n`: ceil(n·bits/32) words, the unused high bits of the last word
/// zero. The one bit-stream layout behind both formats we pack.
pub fn pack_bits(values: &[u32], bits: u32) -> Result<Vec<u32>> {
    let nbits = values.len() * bits as usize;
    let mask = (1u64 << bits) - 1;
    let mut words = vec![0u32; nbits.div_ceil(32)];
    for (i, &v) in values.iter().enumerate() {
        ensure!(
            (v as u64) <= mask,
            "pack: value {v} does not fit in {bits} bits"
        );
        let bit = i * bits as usize;
        let (w, off) = (bit / 32, bit % 32);
        let wide = (v as u64) << off;
        words[w] |= wide as u32;
        if off + bits as usize > 32 {
            words[w + 1] |= (wide >> 32) as u32;
        }
    }
    Ok(words)
}

/// Inverse of [`pack_stream`]: `n` values of `bits` bits.
pub fn unpack_stream(words: &[u32], n: usize, bits: u32) -> Result<Vec<u32>> {
    ensure!(
        words.len() * 32 >= n * bits as usize,
        "unpack: {} words hold fewer than {n} {bits}-bit values",
        words.len()
    );
    let mask = (1u64 << bits) - 1;
    Ok((0..n)
        .map(|i| {
            let bit = i * bits as usize;
            let (w, off) = (bit / 32, bit % 32);
            let mut x = (words[w] as u64) >> off;
            if off + bits as usize > 32 {
                x |= (words[w + 1] as u64) << (32 - off);
            }
            (x & mask) as u32
        })
        .collect())
}

/// GPTQ `qweight` from the signed `[out, in]` codes of a linear: int32 `[in·bits/32, out]`,
/// packed along the input dim (stored value `q + 2^(b-1)`).
pub fn gptq_pack_qweight(codes: &[i8], out: usize, inn: usize, bits: u32) -> Result<Vec<i32>> {
    check_bits_gptq(bits)?;
    ensure!(
        codes.len() == out * inn,
        "qweight: {} codes for [{out}, {inn}]",
        codes.len()
    );
    ensure!(
        inn.is_multiple_of(32),
        "GPTQ packing needs the input dimension ({inn}) to be a multiple of 32"
    );
    let h = 1i32 << (bits - 1);
    let rows = inn / 32 * bits as usize;
    let mut q = vec![0i32; rows * out];
    for o in 0..out {
        let col: Vec<u32> = codes[o * inn..(o + 1) * inn]
            .iter()
            .map(|&c| (c as i32 + h) as u32)
            .collect();
        let words = pack_stream(&col, bits)?;
        for (k, w) in words.into_iter().enumerate() {
            q[k * out + o] = w as i32;
        }
    }
    Ok(q)
}

/// Inverse of [`gptq_pack_qweight`]: signed `[out, in]` codes.
pub fn gptq_unpack_qweight(qweight: &[i32], out: usize, inn: usize, bits: u32) -> Result<Vec<i8>> {
    check_bits_gptq(bits)?;
    ensure!(
        inn.is_multiple_of(32),
        "GPTQ: input dimension {inn} is not a multiple of 32"
    );
    let rows = inn / 32 * bits as usize;
    ensure!(
        qweight.len() == rows * out,
        "qweight: {} words, expected [{rows}, {out}]",
        qweight.len()
    );
    let h = 1i32 << (bits - 1);
    let mut codes = vec![0i8; out * inn];
    let mut col = vec![0u32; rows];
    for o in 0..out {
        for k in 0..rows {
            col[k] = qweight[k * out + o] as u32;
        }
        for (j, u) in unpack_stream(&col, inn, bits)?.into_iter().enumerate() {
            codes[o * inn + j] = (u as i32 - h) as i8;
        }
    }
    Ok(codes)
}

/// The word GPTQModel subtracts from (and adds back to) every packed `qzeros` word when it
/// converts between its internal v2 zeros and the v1 convention (`zero - 1`): one `1` per field.
/// `None` for 3 bits, where GPTQModel converts field by field.
fn gptq_v1_zero_offset(bits: u32) -> Option<u32> {
    match bits {
        2 => Some(0x5555_5555),
        4 => Some(0x1111_1111),
        8 => Some(0x0101_0101),
        _ => None,
    }
}

/// GPTQ v1 `qzeros`: `zeros_u` are the unsigned zero points `[groups, out]`; stores `zero - 1`
/// packed along the output dim → int32 `[groups, out·bits/32]`. For 2/4/8 bits the subtraction
/// is done on whole 32-bit words after packing, exactly as GPTQModel's
/// `convert_gptq_v2_to_v1_format` (a zero point of 0 borrows from the next field); for 3 bits
/// field by field. The two agree unless a zero point is 0 (asymmetric groups whose weights are
/// all ≥ 0), where readers that decode field by field (AutoGPTQ/exllama kernels) see the next
/// field one lower: [`gptq_zero_points_at_zero`] counts those for a warning.
pub fn gptq_pack_qzeros(zeros_u: &[u32], groups: usize, out: usize, bits: u32) -> Result<Vec<i32>> {
    check_bits_gptq(bits)?;
    ensure!(
        zeros_u.len() == groups * out,
        "qzeros: {} zeros for [{groups}, {out}]",
        zeros_u.len()
    );
    ensure!(
        out.is_multiple_of(32),
        "GPTQ packing needs the output dimension ({out}) to be a multiple of 32"
    );
    let mask = (1u32 << bits) - 1;
    let mut q = Vec::with_capacity(groups * out / 32 * bits as usize);
    for g in 0..groups {
        let row = &zeros_u[g * out..(g + 1) * out];
        ensure!(
            row.iter().all(|&z| z <= mask),
            "qzeros: a zero point does not fit in {bits} bits"
        );
        match gptq_v1_zero_offset(bits) {
            Some(off) => q.extend(
                pack_stream(row, bits)?
                    .into_iter()
                    .map(|w| w.wrapping_sub(off) as i32),
            ),
            None => {
                let row: Vec<u32> = row.iter().map(|&z| z.wrapping_sub(1) & mask).collect();
                q.extend(pack_stream(&row, bits)?.into_iter().map(|w| w as i32));
            }
        }
    }
    Ok(q)
}

/// Zero points equal to 0 in unsigned `[groups, out]` zeros: the one case where GPTQ v1 readers
/// disagree with each other (see [`gptq_pack_qzeros`]).
pub fn gptq_zero_points_at_zero(zeros_u: &[u32]) -> usize {
    zeros_u.iter().filter(|&&z| z == 0).count()
}

/// Inverse of [`gptq_pack_qzeros`]: unsigned zero points `[groups, out]`.
pub fn gptq_unpack_qzeros(
    qzeros: &[i32],
    groups: usize,
    out: usize,
    bits: u32,
) -> Result<Vec<u32>> {
    check_bits_gptq(bits)?;
    ensure!(
        out.is_multiple_of(32),
        "GPTQ: output dimension {out} is not a multiple of 32"
    );
    let wpr = out / 32 * bits as usize;
    ensure!(
        qzeros.len() == groups * wpr,
        "qzeros: {} words, expected [{groups}, {wpr}]",
        qzeros.len()
    );
    let mask = (1u32 << bits) - 1;
    let mut z = Vec::with_capacity(groups * out);
    for g in 0..groups {
        let words = qzeros[g * wpr..(g + 1) * wpr].iter().map(|&w| w as u32);
        match gptq_v1_zero_offset(bits) {
            Some(off) => {
                let words: Vec<u32> = words.map(|w| w.wrapping_add(off)).collect();
                z.extend(unpack_stream(&words, out, bits)?);
            }
            None => {
                let words: Vec<u32> = words.collect();
                z.extend(
                    unpack_stream(&words, out, bits)?
                        .into_iter()
                        .map(|s| s.wrapping_add(1) & mask),
                );
            }
        }
    }
    Ok(z)
}

/// The GPTQ v1 tensors of one linear: `{prefix}.qweight` I32 `[in·b/32, out]`, `.qzeros` I32
/// `[groups, out·b/32]`, `.scales` F16 `[groups, out]`, `.g_idx` I32 `[in]`.
/// Scales are converted to f16 (round to nearest even; values outside f16's range are an error).
pub fn gptq_tensors(prefix: &str, q: &QuantizedLinear) -> Result<Vec<NamedTensor>> {
    q.validate()?;
    let bits = q.args.bits;
    check_bits_gptq(bits)?;
    let (out, inn) = q.shape;
    let ng = q.n_groups();
    let h = 1i32 << (bits - 1);

    let qweight = gptq_pack_qweight(&q.codes, out, inn, bits)?;

    let mut zeros_u = vec![0u32; ng * out];
    let mut scales = vec![0f32; ng * out];
    for o in 0..out {
        for g in 0..ng {
            zeros_u[g * out + o] = (q.zero_at(o, g) + h) as u32;
            let s = q.scale_at(o, g);
            let s16 = half::f16::from_f32(s);
            ensure!(
                s16.is_finite(),
                "GPTQ export: scale {s} ({prefix}, row {o}, group {g}) overflows f16"
            );
            scales[g * out + o] = s16.to_f32();
        }
    }
    let qzeros = gptq_pack_qzeros(&zeros_u, ng, out, bits)?;
    let at_zero = gptq_zero_points_at_zero(&zeros_u);
    if at_zero > 0 && bits != 3 {
        crate::info!(
            "warning: {prefix}: {at_zero} zero point(s) are 0; GPTQ v1 stores them as GPTQModel does (transformers reads them exactly), but AutoGPTQ/exllama-style readers decode the next zero point one lower — prefer compressed-tensors for asymmetric {bits}-bit weights"
        );
    }
    let g_idx: Vec<i32> = (0..inn).map(|j| q.group_of(j) as i32).collect();

    Ok(vec![
        (
            format!("{prefix}.qweight"),
            DType::I32,
            vec![inn / 32 * bits as usize, out],
            i32s_to_bytes(&qweight),
        ),
        (
            format!("{prefix}.qzeros"),
            DType::I32,
            vec![ng, out / 32 * bits as usize],
            i32s_to_bytes(&qzeros),
        ),
        (
            format!("{prefix}.scales"),
            DType::F16,
            vec![ng, out],
            from_f32(DType::F16, &scales),
        ),
        (
            format!("{prefix}.g_idx"),
            DType::I32,
            vec![inn],
            i32s_to_bytes(&g_idx),
        ),
    ])
}

/// Read the GPTQ v1 tensors of one linear back into a [`QuantizedLinear`]. Shapes come from
/// `qweight`/`scales`; `g_idx` is read when present (else `j / group_size`) and dropped when it
/// is the plain contiguous assignment. With `symmetric`, every zero must be 2^(b-1).
pub fn read_gptq_quantized(
    get: TensorGetter,
    prefix: &str,
    bits: u32,
    group_size: usize,
    symmetric: bool,
) -> Result<QuantizedLinear> {
    check_bits_gptq(bits)?;
    let name = format!("{prefix}.qweight");
    let (dt, wshape, wbytes) = get(&name)?;
    ensure!(
        dt == DType::I32 && wshape.len() == 2,
        "`{name}`: expected a 2-d I32 tensor, found {} {wshape:?}",
        dt.name()
    );
    ensure!(
        (wshape[0] * 32) % bits as usize == 0,
        "`{name}`: {} rows do not hold whole groups of 32 {bits}-bit values",
        wshape[0]
    );
    let (inn, out) = (wshape[0] * 32 / bits as usize, wshape[1]);
    let codes = gptq_unpack_qweight(&bytes_to_i32s(&wbytes)?, out, inn, bits)
        .with_context(|| format!("`{name}`"))?;

    let sname = format!("{prefix}.scales");
    let (sdt, sshape, sbytes) = get(&sname)?;
    ensure!(
        sshape.len() == 2 && sshape[1] == out,
        "`{sname}`: shape {sshape:?} does not fit {out} outputs"
    );
    let ng = sshape[0];
    ensure!(ng > 0, "`{sname}`: no groups");
    let s = to_f32(sdt, &sbytes)
        .with_context(|| format!("`{sname}`: expected a float tensor, found {}", sdt.name()))?;

    let zname = format!("{prefix}.qzeros");
    let (zdt, zshape, zbytes) = get(&zname)?;
    ensure!(
        zdt == DType::I32 && zshape.len() == 2 && zshape[0] == ng,
        "`{zname}`: expected I32 [{ng}, _], found {} {zshape:?}",
        zdt.name()
    );
    let zu = gptq_unpack_qzeros(&bytes_to_i32s(&zbytes)?, ng, out, bits)
        .with_context(|| format!("`{zname}`"))?;

    let g_idx: Vec<i32> = match get_i64s(get, &format!("{prefix}.g_idx")) {
        Ok((_, g)) => {
            ensure!(
                g.len() == inn,
                "`{prefix}.g_idx`: {} entries for {inn} columns",
                g.len()
            );
            g.into_iter().map(|x| x as i32).collect()
        }
        Err(_) => {
            let gs = if group_size == 0 { inn } else { group_size };
            (0..inn).map(|j| (j / gs) as i32).collect()
        }
    };
    ensure!(
        g_idx.iter().all(|&g| g >= 0 && (g as usize) < ng),
        "`{prefix}.g_idx`: entries outside [0, {ng})"
    );

    let h = 1i32 << (bits - 1);
    let mut scales = vec![0f32; out * ng];
    let mut zeros = vec![0i8; out * ng];
    for g in 0..ng {
        for o in 0..out {
            scales[o * ng + g] = s[g * out + o];
            let z = zu[g * out + o] as i32 - h;
            if symmetric {
                ensure!(
                    z == 0,
                    "`{zname}`: symmetric checkpoint has zero point {} (expected {h})",
                    z + h
                );
            }
            zeros[o * ng + g] = z as i8;
        }
    }
    let width = inn / ng;
    let contiguous = inn % ng == 0
        && g_idx
            .iter()
            .enumerate()
            .all(|(j, &g)| g as usize == j / width);
    let strategy = if ng == 1 {
        Strategy::Channel
    } else {
        Strategy::Group
    };
    let q = QuantizedLinear {
        args: QuantArgs {
            bits,
            symmetric,
            strategy,
            group_size: if ng == 1 {
                inn
            } else if group_size > 0 {
                group_size
            } else {
                width
            },
            observer: Observer::MinMax,
        },
        codes,
        scales,
        zeros: if symmetric { None } else { Some(zeros) },
        g_idx: if contiguous { None } else { Some(g_idx) },
        static_order: false,
        scale_dtype: sdt,
        shape: (out, inn),
    };
    q.validate().with_context(|| format!("`{prefix}`"))?;
    Ok(q)
}

/// Dense `[out, in]` f32 weights of one GPTQ v1 linear: `(q - zero) * scale` per column group.
pub fn read_gptq(
    get: TensorGetter,
    prefix: &str,
    bits: u32,
    group_size: usize,
    symmetric: bool,
) -> Result<Vec<f32>> {
    let q = read_gptq_quantized(get, prefix, bits, group_size, symmetric)?;
    Ok(q.dequantize().into_raw_vec_and_offset().0)
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;

    #[test]
    fn ct_pack_matches_docstring_example() {
        // compressed-tensors docstring: 8 bit, [1, 2] → [129, 130, 0, 0] → 33409
        let (p, shape) = ct_pack(&[1, 2], 1, 2, 8, 1).unwrap();
        assert_eq!(shape, [1, 1]);
        assert_eq!(p, vec![33409]);
    }

    #[test]
    fn three_bit_gptq_layout_matches_autogptq() {
        // AutoGPTQ: word0 = v0..v9 at 3j, v10 low 2 bits at 30; word1 = v10 bit 2 at 0, v11..v20
        // at 3j+1, v21 bit 0 at 31; word2 = v21 high bits at 0..2, v22..v31 at 3j+2.
        let vals: Vec<u32> = (0..32).map(|i| (i * 5 + 3) % 8).collect();
        let w = pack_stream(&vals, 3).unwrap();
        let mut r = [0u32; 3];
        for j in 0..10 {
            r[0] |= vals[j] << (3 * j);
        }
        r[0] |= vals[10] << 30;
        r[1] |= (vals[10] >> 2) & 1;
        for j in 11..21 {
            r[1] |= vals[j] << (3 * (j - 11) + 1);
        }
        r[1] |= vals[21] << 31;
        r[2] |= (vals[21] >> 1) & 3;
        for j in 22..32 {
            r[2] |= vals[j] << (3 * (j - 22) + 2);
        }
        assert_eq!(w, r.to_vec());
        assert_eq!(unpack_stream(&w, 32, 3).unwrap(), vals);
    }
}
