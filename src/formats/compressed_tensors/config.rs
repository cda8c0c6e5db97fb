//! compressed-tensors' `quantization_config` block: what we write for a scheme (weights,
//! input activations, format name) and what we read back from one.

use super::float;
use super::Order;
use crate::quant::{QuantArgs, Strategy};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// Whether a `targets` / `ignore` entry names `module`: the module's name, a `re:` regex
/// matched from its start (compressed-tensors' `find_name_or_class_matches`), or the class
/// `Linear` when `class` is allowed.
fn names(pattern: &str, module: &str, class: bool) -> bool {
    match pattern.strip_prefix("re:") {
        Some(r) => regex::Regex::new(&format!("^(?:{r})")).is_ok_and(|re| re.is_match(module)),
        None => pattern == module || (class && pattern == "Linear"),
    }
}

/// The config group of a `quantization_config` block (`q`, of config.json `file`) that
/// quantizes linear `module`: the group naming it, else one targeting `Linear`; `None` when
/// `module` is in `ignore` or no group targets it. An empty `module` asks for the first group.
pub fn group_for<'a>(
    q: &'a Value,
    module: &str,
    file: &std::path::Path,
) -> Result<Option<&'a Value>> {
    let groups = q
        .get("config_groups")
        .and_then(|g| g.as_object())
        .filter(|g| !g.is_empty())
        .with_context(|| {
            format!(
                "{}: `quantization_config.config_groups` missing",
                file.display()
            )
        })?;
    if module.is_empty() {
        return Ok(groups.values().next());
    }
    let ignored = q.get("ignore").and_then(Value::as_array).is_some_and(|v| {
        v.iter()
            .filter_map(Value::as_str)
            .any(|p| names(p, module, false))
    });
    if ignored {
        return Ok(None);
    }
    let targets = |g: &Value, class: bool| {
        g.get("targets").and_then(Value::as_array).is_some_and(|v| {
            v.iter()
                .filter_map(Value::as_str)
                .any(|p| names(p, module, class))
        })
    };
    Ok(groups
        .values()
        .find(|g| targets(g, false))
        .or_else(|| groups.values().find(|g| targets(g, true))))
}

/// (bits, group_size, symmetric, method) of the config group that quantizes `module` in a
/// compressed-tensors `quantization_config` block (see [`super::read_scheme`]).
pub fn read_config_block(
    q: &Value,
    module: &str,
    file: &std::path::Path,
) -> Result<(u32, usize, bool, String)> {
    let g = group_for(q, module, file)?.with_context(|| {
        format!(
            "{}: no `quantization_config` group targets `{module}`",
            file.display()
        )
    })?;
    let w = g
        .get("weights")
        .with_context(|| format!("{}: config group has no `weights`", file.display()))?;
    // each group states its format; a file of one group may state it at the top only
    let fmt = g
        .get("format")
        .and_then(|f| f.as_str())
        .or_else(|| q.get("format").and_then(|f| f.as_str()))
        .unwrap_or("");
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

/// The float weights' arguments of the config group quantizing `module` (`""`: the first)
/// in a `quantization_config` block (`q`, of config.json `file`).
pub fn read_float_weights(q: &Value, module: &str, file: &std::path::Path) -> Result<QuantArgs> {
    let w = group_for(q, module, file)?
        .and_then(|g| g.get("weights"))
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
    let Some(g) = group_for(q, module, file)? else {
        return Ok(None);
    };
    if let Some(a) = g
        .get("input_activations")
        .filter(|a| a.get("type").and_then(Value::as_str) == Some("float"))
    {
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
    let Some(a) = group_for(q, module, file)?
        .and_then(|g| g.get("input_activations"))
        .filter(|a| !a.is_null())
    else {
        return Ok(None);
    };
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
    let g = ConfigGroup {
        args: a.clone(),
        order,
        input: input.cloned(),
        targets: vec!["Linear".into()],
    };
    quantization_config_groups(&[g], unquantized)
}

/// One config group: a scheme and the modules it targets.
pub struct ConfigGroup {
    pub args: QuantArgs,
    pub order: Order,
    pub input: Option<QuantArgs>,
    /// `Linear` (every linear not ignored) or the module names.
    pub targets: Vec<String>,
}

/// compressed-tensors' format name of a group.
fn group_format(a: &QuantArgs, input: Option<&QuantArgs>) -> &'static str {
    match float::format_name(a) {
        Some(f) => f,
        None if int_quantized(a, input) => "int-quantized",
        None => "pack-quantized",
    }
}

/// The `quantization_config` block of several config groups (`group_0`, `group_1`, … as
/// given: mixed schemes in one checkpoint, as a size budget writes them; vLLM and
/// compressed-tensors match each module to the group that names it). The top-level `format`
/// is the groups' common one, or `mixed-precision`.
pub fn quantization_config_groups(groups: &[ConfigGroup], unquantized: &[String]) -> Value {
    // `targets: ["Linear"]` matches every nn.Linear the loader builds, `lm_head` included
    // even when it is tied to the embedding and has no tensor of its own: everything we
    // left unquantized must be listed, or transformers/vLLM turn it into a quantized
    // linear without tensors (tied checkpoints then fail to load). In module order, as
    // llm-compressor lists them: the decoder's, then lm_head.
    let mut ignore: Vec<String> = unquantized.to_vec();
    ignore.push("lm_head".into());
    let formats: Vec<&str> = groups
        .iter()
        .map(|g| group_format(&g.args, g.input.as_ref()))
        .collect();
    let format = match formats.first() {
        Some(f) if formats.iter().all(|x| x == f) => *f,
        _ => "mixed-precision",
    };
    let config_groups: serde_json::Map<String, Value> = groups
        .iter()
        .zip(&formats)
        .enumerate()
        .map(|(i, (g, f))| (format!("group_{i}"), group_block(g, f)))
        .collect();
    json!({
        "config_groups": config_groups,
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

/// One entry of `config_groups`.
fn group_block(g: &ConfigGroup, format: &str) -> Value {
    let a = &g.args;
    let (strategy, group_size) = strategy_fields(a);
    let float = a.float.is_some();
    json!({
        "format": format,
        "input_activations": g.input.as_ref().map(input_activations_block),
        "output_activations": null,
        "targets": g.targets,
        "weights": {
            "actorder": match g.order {
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Observer;

    fn int(bits: u32, group: usize) -> QuantArgs {
        QuantArgs::int(bits, true, Strategy::Group, group, Observer::MinMax)
    }

    #[test]
    fn mixed_groups_name_their_modules_and_read_back_per_module() {
        let f = std::path::Path::new("config.json");
        let groups = [
            ConfigGroup {
                args: int(4, 128),
                order: Order::Static,
                input: None,
                targets: vec!["model.layers.0.mlp.up_proj".into()],
            },
            ConfigGroup {
                args: int(2, 64),
                order: Order::Columns,
                input: None,
                targets: vec!["model.layers.0.mlp.down_proj".into()],
            },
            ConfigGroup {
                args: int(8, 0),
                order: Order::Columns,
                input: Some(QuantArgs::int(
                    8,
                    true,
                    Strategy::Token,
                    0,
                    Observer::MinMax,
                )),
                targets: vec!["re:.*self_attn.*".into()],
            },
        ];
        let q = quantization_config_groups(&groups, &["model.layers.0.mlp.gate_proj".into()]);
        assert_eq!(q["format"], "mixed-precision");
        assert_eq!(q["config_groups"]["group_1"]["format"], "pack-quantized");
        assert_eq!(q["config_groups"]["group_2"]["format"], "int-quantized");
        let scheme = |m: &str| read_config_block(&q, m, f).unwrap();
        assert_eq!(scheme("model.layers.0.mlp.up_proj").0, 4);
        assert_eq!(scheme("model.layers.0.mlp.down_proj").0, 2);
        assert_eq!(scheme("model.layers.0.mlp.down_proj").1, 64);
        assert_eq!(scheme("model.layers.1.self_attn.q_proj").3, "int-quantized");
        // activations only where the module's group quantizes them
        assert_eq!(
            read_input_activation_bits(&q, "model.layers.1.self_attn.q_proj", f).unwrap(),
            Some(8)
        );
        assert_eq!(
            read_input_activation_bits(&q, "model.layers.0.mlp.up_proj", f).unwrap(),
            None
        );
        // ignored and unmatched modules have no group
        assert!(group_for(&q, "model.layers.0.mlp.gate_proj", f)
            .unwrap()
            .is_none());
        assert!(group_for(&q, "model.layers.1.mlp.up_proj", f)
            .unwrap()
            .is_none());
        let e = read_config_block(&q, "model.layers.1.mlp.up_proj", f).unwrap_err();
        assert!(
            e.to_string()
                .contains("no `quantization_config` group targets"),
            "{e}"
        );
        // a name beats the class: `Linear` is the fallback
        let mut q2 = q.clone();
        q2["config_groups"]["group_0"]["targets"] = json!(["Linear"]);
        assert_eq!(
            read_config_block(&q2, "model.layers.0.mlp.down_proj", f)
                .unwrap()
                .0,
            2
        );
        assert_eq!(
            read_config_block(&q2, "model.layers.5.mlp.up_proj", f)
                .unwrap()
                .0,
            4
        );
        // one group keeps the single-scheme block (`targets: ["Linear"]`, its own format)
        let one = quantization_config(&int(4, 128), Order::Static, &[], None);
        assert_eq!(one["format"], "pack-quantized");
        assert_eq!(
            one["config_groups"]["group_0"]["targets"],
            json!(["Linear"])
        );
    }
}
