//! Dense f32 weights of a linear, whatever format the checkpoint stores it in: plain
//! floating point, compressed-tensors `pack-quantized`, or GPTQ v1. This is how `compress eval`
//! and the report read back every format we write (the unpacking and the reading of the config
//! block live with each format in `crate::formats`).

use super::checkpoint::{read_checked, Checkpoint};
use crate::formats;
use crate::quant::QuantizedLinear;
use crate::safetensors_file::DType;
use anyhow::{bail, Context, Result};

/// (bits, group_size (0 = not grouped), symmetric, method) from config.json's
/// `quantization_config`, read by the format that wrote it.
fn scheme(ckpt: &Checkpoint, module: &str) -> Result<Option<(u32, usize, bool, String)>> {
    match ckpt.config.raw.get("quantization_config") {
        None => Ok(None),
        Some(q) => formats::read_scheme(q, module, &ckpt.dir.join("config.json")).map(Some),
    }
}

/// `prefix` is the module name (`model.layers.0.self_attn.q_proj`); returns the weight
/// [out, in] as f32 and the storage dtype of its floating-point parts.
pub fn dense_weight(ckpt: &Checkpoint, prefix: &str, shape: &[usize]) -> Result<(Vec<f32>, DType)> {
    let (v, dt, _) = stored_weight(ckpt, prefix, shape)?;
    Ok((v, dt))
}

/// [`dense_weight`], and the integer codes it was dequantized from when the checkpoint stores
/// the linear quantized (compressed-tensors `pack-quantized` / `int-quantized`, GPTQ v1).
pub fn stored_weight(
    ckpt: &Checkpoint,
    prefix: &str,
    shape: &[usize],
) -> Result<(Vec<f32>, DType, Option<QuantizedLinear>)> {
    let w = format!("{prefix}.weight");
    // codes: I8 (int-quantized) or F8_E4M3 (float-quantized, mxfp8-quantized) need scales
    let integer = ckpt.has(&w) && matches!(ckpt.info(&w)?.0.dtype, DType::I8 | DType::F8E4M3);
    if ckpt.has(&w) && !integer {
        let v = read_checked(ckpt, &w, shape)?;
        return Ok((v, ckpt.info(&w)?.0.dtype, None));
    }
    let get = |name: &str| -> Result<(DType, Vec<usize>, Vec<u8>)> {
        let (info, bytes) = ckpt.raw(name)?;
        Ok((info.dtype, info.shape.clone(), bytes.to_vec()))
    };
    if !ckpt.has(&w) && ckpt.has(&format!("{prefix}.bitmask")) {
        // compressed-tensors `sparse-bitmask`
        let path = ckpt
            .info(&format!("{prefix}.bitmask"))
            .map(|(_, p)| p.display().to_string())
            .unwrap_or_default();
        let (v, dt, dims) = formats::compressed_tensors::read_bitmask(&get, prefix)
            .with_context(|| format!("{path}: reading sparse-bitmask `{prefix}`"))?;
        if [dims.0, dims.1] != shape {
            bail!("{path}: sparse-bitmask `{prefix}` is {dims:?}, config.json implies {shape:?}");
        }
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            bail!("{path}: sparse-bitmask `{prefix}` holds a non-finite value at flat index {i}");
        }
        return Ok((v, dt, None));
    }
    let Some((bits, gs, sym, method)) = scheme(ckpt, prefix)? else {
        bail!("{}: missing tensor `{w}`", ckpt.dir.display());
    };
    let (q, scale_name) = match method.as_str() {
        "int-quantized" => (
            formats::compressed_tensors::read_int_quantized(&get, prefix),
            format!("{prefix}.weight_scale"),
        ),
        f if formats::compressed_tensors::FLOAT_FORMATS.contains(&f) => {
            let file = ckpt.dir.join("config.json");
            let q = ckpt
                .config
                .raw
                .get("quantization_config")
                .context("quantization_config")?;
            let args = formats::compressed_tensors::read_float_weights(q, prefix, &file)?;
            (
                formats::compressed_tensors::float::read_float(&get, prefix, &args),
                format!("{prefix}.weight_scale"),
            )
        }
        "compressed-tensors" => (
            formats::compressed_tensors::read_compressed_tensors_quantized(
                &get, prefix, bits, gs, sym,
            ),
            format!("{prefix}.weight_scale"),
        ),
        _ => (
            formats::gptq::read_gptq_quantized(&get, prefix, bits, gs, sym),
            format!("{prefix}.scales"),
        ),
    };
    let path = ckpt
        .info(&scale_name)
        .map(|(_, p)| p.display().to_string())
        .unwrap_or_default();
    let q = q.with_context(|| format!("{path}: reading quantized `{prefix}`"))?;
    let v = q.dequantize().into_raw_vec_and_offset().0;
    if v.len() != shape.iter().product::<usize>() {
        bail!(
            "{path}: quantized `{prefix}` has {} values, config.json implies {shape:?}",
            v.len()
        );
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        bail!("{path}: quantized `{prefix}` dequantizes to a non-finite value at flat index {i}");
    }
    let dt = ckpt
        .info(&scale_name)
        .map(|(i, _)| i.dtype)
        .unwrap_or(DType::F32);
    // E4M3 / E8M0 scales (NVFP4, MX) are not the model's dtype: the embedding's is
    let dt = if dt.is_float() {
        dt
    } else {
        ckpt.info("model.embed_tokens.weight")
            .map(|(i, _)| i.dtype)
            .ok()
            .filter(DType::is_float)
            .unwrap_or(DType::BF16)
    };
    Ok((v, dt, Some(q)))
}

/// The dynamic activation quantizer config.json's `quantization_config` puts on linear
/// `module` (W8A8's int8 per token, FP8's per token or per group, MX's groups), if any: the
/// module is quantized (not in `ignore`) and the group's input activations are dynamic.
/// `act_quant` false (`--no-act-quant`) reads none.
pub fn input_activations(
    ckpt: &Checkpoint,
    module: &str,
    act_quant: bool,
) -> Result<Option<crate::model::layer::ActQuant>> {
    let file = ckpt.dir.join("config.json");
    match ckpt.config.raw.get("quantization_config") {
        None => Ok(None),
        Some(_) if !act_quant => Ok(None),
        // GPTQ v1 quantizes weights only; a bitmask-only block has no config groups
        Some(q)
            if q.get("quant_method").and_then(|m| m.as_str()) != Some("compressed-tensors")
                || q.get("config_groups").is_none() =>
        {
            Ok(None)
        }
        Some(q) => formats::compressed_tensors::read_input_activations(q, module, &file)?
            .map(|a| {
                crate::model::layer::ActQuant::from_args(&a)
                    .with_context(|| format!("{}: `input_activations`", file.display()))
            })
            .transpose(),
    }
}
