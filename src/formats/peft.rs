//! PEFT LoRA adapters (Hugging Face `peft`, also served by vLLM's LoRA support): the folder
//! holds `adapter_config.json` (a `LoraConfig`) and `adapter_model.safetensors` with, per
//! adapted module, `base_model.model.<module>.lora_A.weight` [r, in] and `….lora_B.weight`
//! [out, r], the names `PeftModel.save_pretrained` writes for a `*ForCausalLM`. The module's
//! output is base(x) + scaling · (x·Aᵀ)·Bᵀ with scaling = lora_alpha / r (or / √r with
//! `use_rslora`); we write lora_alpha = r, so scaling is 1 and A, B are the adapter as the
//! linear holds it. Pure functions: names, the config block and its reader.

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// The folder beside the checkpoint that holds the adapter.
pub const DIR: &str = "adapter";
pub const CONFIG: &str = "adapter_config.json";
/// The safetensors file's name without extension (the writer adds `.safetensors`).
pub const STEM: &str = "adapter_model";

/// `lora_A` and `lora_B` tensor names of a module (`model.layers.3.self_attn.q_proj`).
pub fn tensor_names(module: &str) -> (String, String) {
    (
        format!("base_model.model.{module}.lora_A.weight"),
        format!("base_model.model.{module}.lora_B.weight"),
    )
}

/// `adapter_config.json` for adapters of the given (module, rank), scaling 1 everywhere: r and
/// lora_alpha are the most common rank, other ranks go in rank_pattern / alpha_pattern (keyed
/// by the full module name); target_modules are the modules' last names.
pub fn adapter_config(modules: &[(String, usize)], base_model: &str) -> Result<Value> {
    let mut count: BTreeMap<usize, usize> = BTreeMap::new();
    for (_, r) in modules {
        *count.entry(*r).or_default() += 1;
    }
    let Some((&r, _)) = count.iter().max_by_key(|(r, c)| (**c, usize::MAX - **r)) else {
        bail!("internal: an adapter with no modules");
    };
    let mut targets: Vec<String> = modules
        .iter()
        .map(|(m, _)| m.rsplit('.').next().unwrap_or(m).to_string())
        .collect();
    targets.sort();
    targets.dedup();
    let mut pattern = Map::new();
    for (m, mr) in modules {
        if *mr != r {
            pattern.insert(m.clone(), json!(mr));
        }
    }
    Ok(json!({
        "alpha_pattern": pattern.clone(),
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": pattern,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": false,
    }))
}

/// What a reader needs from `adapter_config.json`: the scaling of each module's B·A.
#[derive(Debug)]
pub struct LoraScaling {
    r: f64,
    alpha: f64,
    rslora: bool,
    rank_pattern: BTreeMap<String, f64>,
    alpha_pattern: BTreeMap<String, f64>,
}

impl LoraScaling {
    /// lora_alpha / r for `module` (patterns match the full name or a dotted suffix of it).
    pub fn of(&self, module: &str) -> f64 {
        let find = |p: &BTreeMap<String, f64>, d: f64| {
            p.iter()
                .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
                .map_or(d, |(_, v)| *v)
        };
        let (r, a) = (
            find(&self.rank_pattern, self.r),
            find(&self.alpha_pattern, self.alpha),
        );
        if self.rslora {
            a / r.sqrt()
        } else {
            a / r
        }
    }
}

/// Read `adapter_config.json`: a LoRA adapter without DoRA, with its fields checked.
pub fn read_config(path: &Path) -> Result<LoraScaling> {
    let p = path.display();
    let text = std::fs::read(path).with_context(|| format!("cannot read {p}"))?;
    let v: Value = serde_json::from_slice(&text).with_context(|| format!("{p}: not valid JSON"))?;
    let peft_type = v.get("peft_type").and_then(Value::as_str);
    if peft_type != Some("LORA") {
        bail!("{p}: field `peft_type` must be \"LORA\", found {peft_type:?}");
    }
    if v.get("use_dora").and_then(Value::as_bool) == Some(true) {
        bail!("{p}: field `use_dora`: DoRA adapters are not supported");
    }
    let num = |k: &str| -> Result<f64> {
        v.get(k)
            .and_then(Value::as_f64)
            .filter(|x| *x > 0.0 && x.is_finite())
            .with_context(|| format!("{p}: field `{k}` must be a positive number"))
    };
    let pattern = |k: &str| -> Result<BTreeMap<String, f64>> {
        let mut out = BTreeMap::new();
        if let Some(m) = v.get(k).and_then(Value::as_object) {
            for (name, x) in m {
                let x = x.as_f64().filter(|x| *x > 0.0).with_context(|| {
                    format!("{p}: field `{k}.{name}` must be a positive number")
                })?;
                out.insert(name.clone(), x);
            }
        }
        Ok(out)
    };
    Ok(LoraScaling {
        r: num("r")?,
        alpha: num("lora_alpha")?,
        rslora: v.get("use_rslora").and_then(Value::as_bool) == Some(true),
        rank_pattern: pattern("rank_pattern")?,
        alpha_pattern: pattern("alpha_pattern")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_scaling_one_and_reads_back() {
        let mods = vec![
            ("model.layers.0.self_attn.q_proj".to_string(), 32),
            ("model.layers.0.mlp.down_proj".to_string(), 32),
            ("model.layers.1.self_attn.k_proj".to_string(), 16),
        ];
        let c = adapter_config(&mods, "..").unwrap();
        assert_eq!(c["r"], 32);
        assert_eq!(c["lora_alpha"], 32);
        assert_eq!(c["rank_pattern"]["model.layers.1.self_attn.k_proj"], 16);
        assert_eq!(
            c["target_modules"],
            json!(["down_proj", "k_proj", "q_proj"])
        );
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(CONFIG);
        std::fs::write(&p, serde_json::to_vec(&c).unwrap()).unwrap();
        let s = read_config(&p).unwrap();
        for (m, _) in &mods {
            assert_eq!(s.of(m), 1.0, "{m}");
        }
        // peft's own scaling rule on a config we did not write
        let mut c2 = c.clone();
        c2["lora_alpha"] = json!(64);
        c2["use_rslora"] = json!(true);
        std::fs::write(&p, serde_json::to_vec(&c2).unwrap()).unwrap();
        assert_eq!(
            read_config(&p).unwrap().of("model.layers.0.mlp.down_proj"),
            64.0 / 32f64.sqrt()
        );
        c2["peft_type"] = json!("IA3");
        std::fs::write(&p, serde_json::to_vec(&c2).unwrap()).unwrap();
        let e = read_config(&p).unwrap_err().to_string();
        assert!(
            e.contains("adapter_config.json") && e.contains("peft_type"),
            "{e}"
        );
        assert_eq!(
            tensor_names("model.layers.2.self_attn.q_proj").0,
            "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"
        );
    }
}
