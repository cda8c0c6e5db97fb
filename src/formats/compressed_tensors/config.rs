//! compressed-tensors' `quantization_config` block: what we write for a scheme (weights,
//! input activations, format name) and what we read back from one.

use super::float;
use super::Order;
use crate::quant::{QuantArgs, Strategy};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

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
    if FLOAT_FORMATS.contains(&fmt) {
        let a = float::read_args_block(w, "weights")
            .with_context(|| format!("{}: `quantization_config`", file.display()))?;
        return Ok((a.bits, a.group_size, a.symmetric, fmt.into()));
    }
    if fmt != "pack-quantized" && fmt != "int-quantized" {
        bail!(
            "{}: compressed-tensors format `{fmt}` is not supported (pack-quantized, int-quantized, {} are)",
            file.display(),
            FLOAT_FORMATS.join(", ")
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

/// The float formats [`float::float_tensors`] writes.
pub const FLOAT_FORMATS: [&str; 4] = [
    "float-quantized",
    "nvfp4-pack-quantized",
    "mxfp4-pack-quantized",
    "mxfp8-quantized",
];

/// The float weights' arguments of a `quantization_config` block (`q`, of config.json `file`).
pub fn read_float_weights(q: &Value, file: &std::path::Path) -> Result<QuantArgs> {
    let w = q
        .pointer("/config_groups/group_0/weights")
        .with_context(|| format!("{}: config group has no `weights`", file.display()))?;
    float::read_args_block(w, "weights")
        .with_context(|| format!("{}: `quantization_config`", file.display()))
}

/// The dynamic activation quantizer a `quantization_config` block (`q`, of config.json `file`)
/// puts on linear `module`, if any (see `model::dequant::input_activations`): integer per
/// token (W8A8), or a float grid per token or group.
pub fn read_input_activations(
    q: &Value,
    module: &str,
    file: &std::path::Path,
) -> Result<Option<QuantArgs>> {
    if let Some(a) = q
        .pointer("/config_groups/group_0/input_activations")
        .filter(|a| a.get("type").and_then(Value::as_str) == Some("float"))
    {
        let ignored = q
            .get("ignore")
            .and_then(Value::as_array)
            .is_some_and(|v| v.iter().any(|x| x.as_str() == Some(module)));
        if ignored {
            return Ok(None);
        }
        if a.get("dynamic") != Some(&Value::Bool(true)) {
            bail!(
                "{}: static `input_activations` (calibrated scales) are not supported",
                file.display()
            );
        }
        return float::read_args_block(a, "input_activations")
            .map(Some)
            .with_context(|| format!("{}: `quantization_config`", file.display()));
    }
    Ok(read_input_activation_bits(q, module, file)?
        .map(|b| QuantArgs::int(b, true, Strategy::Token, 0, crate::quant::Observer::MinMax)))
}

/// Bits of the dynamic per-token integer activation quantizer a `quantization_config` block
/// (`q`, of config.json `file`) puts on linear `module`, if any.
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

/// int8 kernels read: 8-bit weights with quantized activations) rather than `pack-quantized`.
pub fn int_quantized(a: &QuantArgs, input: Option<&QuantArgs>) -> bool {
    a.float.is_none() && a.bits == 8 && input.is_some()
}

/// compressed-tensors' `strategy` and `group_size` fields of `a`.
fn strategy_fields(a: &QuantArgs) -> (&'static str, Value) {
    match a.strategy {
        Strategy::Group => ("group", json!(a.group_size)),
        Strategy::Channel => ("channel", Value::Null),
        Strategy::Tensor => ("tensor", Value::Null),
        Strategy::Block => ("block", Value::Null),
        Strategy::TensorGroup => ("tensor_group", json!(a.group_size)),
        Strategy::Token => ("token", Value::Null),
    }
}

/// The `input_activations` block of a dynamic activation quantizer (W8A8's int8 per token,
/// FP8's per token or per group of 128, MX's groups of 32).
pub fn input_activations_block(a: &QuantArgs) -> Value {
    if a.float.is_none() {
        return input_activations(a.bits);
    }
    let (strategy, group_size) = strategy_fields(a);
    json!({
        "actorder": null,
        "block_structure": null,
        "dynamic": true,
        "group_size": group_size,
        "num_bits": a.bits,
        "observer": null,
        "observer_kwargs": {},
        "scale_dtype": float::scale_dtype_name(a.scale_type),
        "strategy": strategy,
        "symmetric": a.symmetric,
        "type": "float",
        "zp_dtype": null
    })
}

/// The `quantization_config` block compressed-tensors (and so vLLM and transformers) reads, for
/// linears quantized with `a` in column order `order`; `unquantized` are the decoder linears
/// left dense; `input` the dynamic quantizer of their input activations, if any.
pub fn quantization_config(
    a: &QuantArgs,
    order: Order,
    unquantized: &[String],
    input: Option<&QuantArgs>,
) -> Value {
    let format = match float::format_name(a) {
        Some(f) => f,
        None if int_quantized(a, input) => "int-quantized",
        None => "pack-quantized",
    };
    // `targets: ["Linear"]` matches every nn.Linear the loader builds, `lm_head` included
    // even when it is tied to the embedding and has no tensor of its own: everything we
    // left unquantized must be listed, or transformers/vLLM turn it into a quantized
    // linear without tensors (tied checkpoints then fail to load). In module order, as
    // llm-compressor lists them: the decoder's, then lm_head.
    let mut ignore: Vec<String> = unquantized.to_vec();
    ignore.push("lm_head".into());
    let (strategy, group_size) = strategy_fields(a);
    let float = a.float.is_some();
    json!({
        "config_groups": {
            "group_0": {
                "format": format,
                "input_activations": input.map(input_activations_block),
                "output_activations": null,
                "targets": ["Linear"],
                "weights": {
                    "actorder": match order {
                        Order::Columns => Value::Null,
                        Order::Static => json!("static"),
                        Order::Dynamic => json!("group"),
                    },
                    "block_structure": a.block,
                    "dynamic": false,
                    "group_size": group_size,
                    "num_bits": a.bits,
                    "observer": match a.observer {
                        crate::quant::Observer::MinMax => "memoryless_minmax",
                        crate::quant::Observer::Mse => "memoryless_mse",
                    },
                    "observer_kwargs": {},
                    "scale_dtype": float::scale_dtype_name(a.scale_type),
                    "strategy": strategy,
                    "symmetric": a.symmetric,
                    "type": a.num().kind(),
                    "zp_dtype": if a.symmetric || float { Value::Null } else { json!("torch.int8") }
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
