//! GPTQ v1 (AutoGPTQ `qlinear_cuda_old.pack`, GPTQModel): one continuous little-endian bit
//! stream per column (`qweight`, along the input dim) or per group row (`qzeros`, along the
//! output dim). For 2/4/8 bits this is the usual `32/bits` values per word; for 3 bits 32
//! values span 3 words with values 10 and 21 straddling word boundaries, exactly AutoGPTQ's
//! layout. `qzeros` stores `zero - 1` masked to `bits` (the v1 convention), where `zero` is the
//! unsigned zero point (`zp + 2^(b-1)`; `2^(b-1)` when symmetric).

use super::bits::{bytes_to_i32s, i32s_to_bytes, pack_stream, unpack_stream};
use super::Order;
use super::{get_i64s, NamedTensor, Stored, TensorGetter};
use crate::quant::{QuantArgs, QuantizedLinear, Strategy};
use crate::safetensors_file::{from_f32, to_f32, DType};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

fn check_bits_gptq(bits: u32) -> Result<()> {
    ensure!(
        matches!(bits, 2 | 3 | 4 | 8),
        "GPTQ packing supports 2, 3, 4 and 8 bits, not {bits}"
    );
    Ok(())
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
    Stored {
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
        codes,
        scales,
        zeros: if symmetric { None } else { Some(zeros) },
        g_idx: if contiguous { None } else { Some(g_idx) },
        scale_dtype: sdt,
        shape: (out, inn),
    }
    .linear(prefix)
}

/// (bits, group_size, symmetric, method) of a GPTQ v1 `quantization_config` block (see
/// [`super::read_scheme`]).
pub fn read_config_block(q: &Value) -> Result<(u32, usize, bool, String)> {
    let bits = q
        .get("bits")
        .and_then(Value::as_u64)
        .context("gptq `bits` missing")? as u32;
    let gs = q.get("group_size").and_then(Value::as_i64).unwrap_or(-1);
    let sym = q.get("sym").and_then(Value::as_bool).unwrap_or(true);
    Ok((bits, gs.max(0) as usize, sym, "gptq".into()))
}

/// quantize_config.json / the `quantization_config` block of a GPTQ v1 checkpoint for linears
/// quantized with `a` in column order `order`. GPTQ v1 has no per-module ignore list: every
/// decoder linear must be quantized.
/// `true_sequential` is what the quantizing pass recorded (false for RTN).
pub fn quantize_config(
    a: &QuantArgs,
    order: Order,
    unquantized: &[String],
    true_sequential: bool,
) -> Result<Value> {
    if !unquantized.is_empty() {
        bail!(
            "export gptq: every decoder linear must be quantized (GPTQ v1 has no per-module ignore list); left dense: {}",
            unquantized.join(", ")
        );
    }
    if a.strategy == Strategy::Tensor {
        bail!("export gptq: strategy `tensor` cannot be written in GPTQ v1; use group or channel");
    }
    let group_size: i64 = if a.strategy == Strategy::Group {
        a.group_size as i64
    } else {
        -1
    };
    Ok(json!({
        "bits": a.bits,
        "group_size": group_size,
        "desc_act": order != Order::Columns,
        "sym": a.symmetric,
        "static_groups": order == Order::Static,
        "true_sequential": true_sequential,
        "quant_method": "gptq",
        "checkpoint_format": "gptq"
    }))
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use crate::formats::compressed_tensors::ct_pack;

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
