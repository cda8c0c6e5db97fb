//! Dense f32 weights of a linear, whatever format the checkpoint stores it in: plain
//! floating point, compressed-tensors `pack-quantized`, or GPTQ v1. This is how `compress eval`
//! and the report read back every format we write (the unpacking itself lives with each
//! format in `crate::formats`).

use super::checkpoint::Checkpoint;
use super::layer::read_checked;
use crate::formats;
use crate::safetensors_file::DType;
use anyhow::{bail, Context, Result};
use serde_json::Value;

/// (bits, group_size (0 = not grouped), symmetric, method) from config.json's
/// `quantization_config`.
fn scheme(ckpt: &Checkpoint) -> Result<Option<(u32, usize, bool, String)>> {
    let Some(q) = ckpt.config.raw.get("quantization_config") else {
        return Ok(None);
    };
    let file = ckpt.dir.join("config.json");
    let method = q
        .get("quant_method")
        .and_then(|m| m.as_str())
        .with_context(|| {
            format!(
                "{}: `quantization_config.quant_method` missing",
                file.display()
            )
        })?;
    match method {
        "compressed-tensors" => {
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
                return Ok(Some((8, 0, true, "int-quantized".into())));
            }
            let bits = w
                .get("num_bits")
                .and_then(Value::as_u64)
                .context("`num_bits` missing")? as u32;
            let gs = w.get("group_size").and_then(Value::as_u64).unwrap_or(0) as usize;
            let sym = w.get("symmetric").and_then(Value::as_bool).unwrap_or(true);
            Ok(Some((bits, gs, sym, method.to_string())))
        }
        "gptq" => {
            let bits = q
                .get("bits")
                .and_then(Value::as_u64)
                .context("gptq `bits` missing")? as u32;
            let gs = q.get("group_size").and_then(Value::as_i64).unwrap_or(-1);
            let sym = q.get("sym").and_then(Value::as_bool).unwrap_or(true);
            Ok(Some((bits, gs.max(0) as usize, sym, method.to_string())))
        }
        other => bail!(
            "{}: quantization method `{other}` is not supported",
            file.display()
        ),
    }
}

/// `prefix` is the module name (`model.layers.0.self_attn.q_proj`); returns the weight
/// [out, in] as f32 and the storage dtype of its floating-point parts.
pub fn dense_weight(ckpt: &Checkpoint, prefix: &str, shape: &[usize]) -> Result<(Vec<f32>, DType)> {
    let w = format!("{prefix}.weight");
    let integer = ckpt.has(&w) && ckpt.info(&w)?.0.dtype == DType::I8;
    if ckpt.has(&w) && !integer {
        let v = read_checked(ckpt, &w, shape)?;
        return Ok((v, ckpt.info(&w)?.0.dtype));
    }
    let Some((bits, gs, sym, method)) = scheme(ckpt)? else {
        bail!("{}: missing tensor `{w}`", ckpt.dir.display());
    };
    let get = |name: &str| -> Result<(DType, Vec<usize>, Vec<u8>)> {
        let (info, bytes) = ckpt.raw(name)?;
        Ok((info.dtype, info.shape.clone(), bytes.to_vec()))
    };
    let (v, scale_name) = match method.as_str() {
        "int-quantized" => (
            formats::dequantized(formats::compressed_tensors::read_int_quantized(
                &get, prefix,
            )),
            format!("{prefix}.weight_scale"),
        ),
        "compressed-tensors" => (
            formats::dequantized(
                formats::compressed_tensors::read_compressed_tensors_quantized(
                    &get, prefix, bits, gs, sym,
                ),
            ),
            format!("{prefix}.weight_scale"),
        ),
        _ => (
            formats::dequantized(formats::gptq::read_gptq_quantized(
                &get, prefix, bits, gs, sym,
            )),
            format!("{prefix}.scales"),
        ),
    };
    let path = ckpt
        .info(&scale_name)
        .map(|(_, p)| p.display().to_string())
        .unwrap_or_default();
    let v = v.with_context(|| format!("{path}: reading quantized `{prefix}`"))?;
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
    Ok((v, dt))
}

/// Bits of the dynamic per-token activation quantizer config.json's `quantization_config`
/// puts on linear `module` (W8A8's `input_activations`), if any: the module is quantized
/// (not in `ignore`) and the group's input activations are dynamic, per token, symmetric.
pub fn input_activation_bits(ckpt: &Checkpoint, module: &str) -> Result<Option<u32>> {
    let Some(q) = ckpt.config.raw.get("quantization_config") else {
        return Ok(None);
    };
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
    let file = ckpt.dir.join("config.json");
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
