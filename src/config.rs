//! `config.json` of the Llama family: llama, mistral, qwen2 (q/k/v bias), qwen3 (q/k RMSNorm),
//! and its mixtures of experts: qwen3_moe, mixtral, qwen2_moe (a shared expert).

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// Architectures whose decoder layer we run exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    /// Qwen3 with a mixture-of-experts MLP in every layer.
    Qwen3Moe,
    /// Mistral's layer with a mixture of experts (`block_sparse_moe`, experts `w1/w3/w2`).
    Mixtral,
    /// Qwen2's layer with a mixture of experts plus a shared expert behind a sigmoid gate.
    Qwen2Moe,
}

impl Arch {
    pub fn name(&self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Mixtral => "mixtral",
            Arch::Qwen2Moe => "qwen2_moe",
        }
    }
}

/// Llama-3 style frequency-dependent RoPE scaling (`rope_type: llama3`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// Which tokens a mixture's experts see in calibration forwards (their statistics); the
/// layer's output follows the router either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpertCalibration {
    /// The tokens routed to each expert.
    #[default]
    Routed,
    /// Every token through every expert.
    All,
}

/// A mixture-of-experts MLP: `experts` SwiGLUs of width `intermediate`, `top_k` of them run
/// per token, their softmax weights renormalised to sum to one when `norm_topk_prob`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeConfig {
    pub experts: usize,
    pub top_k: usize,
    pub intermediate: usize,
    pub norm_topk_prob: bool,
    /// The width of the shared expert every token also runs through (qwen2_moe), scaled by
    /// sigmoid of its gate.
    pub shared: Option<usize>,
    /// What calibration forwards show each expert (set by the engine from the pipeline's
    /// `calibration.experts`; routed when read from config.json).
    pub calibrate: ExpertCalibration,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// `None` = default RoPE; linear scaling is folded into `rope_linear_factor`.
    pub rope_llama3: Option<Llama3Scaling>,
    pub rope_linear_factor: f64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub qk_norm: bool,
    /// The mixture of experts in every layer's MLP, for `qwen3_moe`.
    pub moe: Option<MoeConfig>,
    /// The whole config.json as read, so exporters can write it back with additions.
    pub raw: Value,
}

fn get_usize(v: &Value, key: &str, file: &Path) -> Result<usize> {
    match v.get(key) {
        Some(x) => x.as_u64().map(|x| x as usize).with_context(|| {
            format!(
                "{}: field `{key}` must be a non-negative integer, found {x}",
                file.display()
            )
        }),
        None => bail!("{}: missing field `{key}`", file.display()),
    }
}

fn get_f64_or(v: &Value, key: &str, default: f64, file: &Path) -> Result<f64> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x.as_f64().with_context(|| {
            format!(
                "{}: field `{key}` must be a number, found {x}",
                file.display()
            )
        }),
    }
}

/// The mixture of a `qwen3_moe`, `qwen2_moe` or `mixtral` config. Layers without experts
/// (`mlp_only_layers`, a `decoder_sparse_step` above 1) are refused: every layer of a block
/// table is alike.
fn moe_config(arch: Arch, raw: &Value, file: &Path) -> Result<MoeConfig> {
    let experts = match raw.get("num_experts") {
        Some(v) if !v.is_null() => get_usize(raw, "num_experts", file)?,
        _ => get_usize(raw, "num_local_experts", file)?,
    };
    let top_k = get_usize(raw, "num_experts_per_tok", file)?;
    if experts == 0 || experts > 4096 || top_k == 0 || top_k > experts {
        bail!(
            "{}: field `num_experts_per_tok` ({top_k}) must be between 1 and the expert count ({experts}, at most 4096)",
            file.display()
        );
    }
    let step = match raw.get("decoder_sparse_step") {
        None | Some(Value::Null) => 1,
        Some(_) => get_usize(raw, "decoder_sparse_step", file)?,
    };
    if step != 1 {
        bail!(
            "{}: field `decoder_sparse_step` = {step}: layers without experts are not supported (only 1)",
            file.display()
        );
    }
    if raw
        .get("mlp_only_layers")
        .and_then(|v| v.as_array())
        .is_some_and(|a| !a.is_empty())
    {
        bail!(
            "{}: field `mlp_only_layers`: layers without experts are not supported (only [])",
            file.display()
        );
    }
    // qwen2_moe's shared expert; a qwen3_moe config with one is not what transformers runs
    let shared = match (arch, raw.get("shared_expert_intermediate_size")) {
        (Arch::Qwen2Moe, _) => Some(get_usize(raw, "shared_expert_intermediate_size", file)?),
        (_, Some(v)) if v.as_u64().is_some_and(|v| v > 0) => bail!(
            "{}: field `shared_expert_intermediate_size`: a shared expert is read for `qwen2_moe` only, not `{}`",
            file.display(),
            arch.name()
        ),
        _ => None,
    };
    // Mixtral's experts are `intermediate_size` wide and always renormalised
    let (intermediate, norm_topk_prob) = match arch {
        Arch::Mixtral => (get_usize(raw, "intermediate_size", file)?, true),
        _ => (
            get_usize(raw, "moe_intermediate_size", file)?,
            raw.get("norm_topk_prob")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        ),
    };
    Ok(MoeConfig {
        experts,
        top_k,
        intermediate,
        norm_topk_prob,
        shared,
        calibrate: ExpertCalibration::Routed,
    })
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let raw: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_value(raw, path)
    }

    pub fn from_value(raw: Value, file: &Path) -> Result<Self> {
        if !raw.is_object() {
            bail!("{}: expected a JSON object", file.display());
        }
        let model_type = raw
            .get("model_type")
            .and_then(|v| v.as_str())
            .with_context(|| format!("{}: missing string field `model_type`", file.display()))?;
        let arch = match model_type {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "qwen3_moe" => Arch::Qwen3Moe,
            "mixtral" => Arch::Mixtral,
            "qwen2_moe" => Arch::Qwen2Moe,
            other => bail!(
                "{}: field `model_type`: unsupported architecture `{other}` (supported: llama, mistral, qwen2, qwen3, qwen3_moe, mixtral, qwen2_moe)",
                file.display()
            ),
        };
        let hidden_size = get_usize(&raw, "hidden_size", file)?;
        let num_heads = get_usize(&raw, "num_attention_heads", file)?;
        let num_kv_heads = match raw.get("num_key_value_heads") {
            None | Some(Value::Null) => num_heads,
            Some(_) => get_usize(&raw, "num_key_value_heads", file)?,
        };
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            bail!(
                "{}: field `num_key_value_heads` ({num_kv_heads}) must divide `num_attention_heads` ({num_heads})",
                file.display()
            );
        }
        let head_dim = match raw.get("head_dim") {
            None | Some(Value::Null) => {
                if hidden_size % num_heads != 0 {
                    bail!("{}: `hidden_size` is not a multiple of `num_attention_heads` and no `head_dim` is given", file.display());
                }
                hidden_size / num_heads
            }
            Some(_) => get_usize(&raw, "head_dim", file)?,
        };
        if head_dim % 2 != 0 {
            bail!(
                "{}: field `head_dim` must be even for RoPE, found {head_dim}",
                file.display()
            );
        }
        // transformers >= 5 nests RoPE settings in `rope_parameters`; older files use
        // `rope_theta` and `rope_scaling` at the top level.
        let rope = raw.get("rope_parameters").filter(|v| v.is_object());
        let rope_theta = match rope.and_then(|r| r.get("rope_theta")) {
            Some(v) => v.as_f64().with_context(|| {
                format!(
                    "{}: field `rope_parameters.rope_theta` must be a number",
                    file.display()
                )
            })?,
            None => get_f64_or(&raw, "rope_theta", 10000.0, file)?,
        };
        let scaling = rope
            .or_else(|| raw.get("rope_scaling").filter(|v| v.is_object()))
            .cloned();
        let mut rope_llama3 = None;
        let mut rope_linear_factor = 1.0;
        if let Some(s) = scaling {
            let ty = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            let num = |k: &str| -> Result<f64> {
                s.get(k).and_then(|v| v.as_f64()).with_context(|| {
                    format!(
                        "{}: rope scaling `{ty}` needs numeric field `{k}`",
                        file.display()
                    )
                })
            };
            match ty {
                "default" => {}
                "linear" => rope_linear_factor = num("factor")?,
                "llama3" => {
                    rope_llama3 = Some(Llama3Scaling {
                        factor: num("factor")?,
                        low_freq_factor: num("low_freq_factor")?,
                        high_freq_factor: num("high_freq_factor")?,
                        original_max_position_embeddings: num("original_max_position_embeddings")?,
                    })
                }
                other => bail!(
                    "{}: field `rope_type`: unsupported RoPE scaling `{other}` (supported: default, linear, llama3)",
                    file.display()
                ),
            }
        }
        let act = raw
            .get("hidden_act")
            .and_then(|v| v.as_str())
            .unwrap_or("silu");
        if act != "silu" {
            bail!(
                "{}: field `hidden_act`: only `silu` is supported, found `{act}`",
                file.display()
            );
        }
        let attention_bias = match arch {
            Arch::Qwen2 => true,
            // transformers 5's `qkv_bias` (default true, as Qwen2)
            Arch::Qwen2Moe => raw
                .get("qkv_bias")
                .and_then(|v| v.as_bool())
                .unwrap_or(true),
            _ => raw
                .get("attention_bias")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        };
        if raw
            .get("mlp_bias")
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
        {
            bail!(
                "{}: field `mlp_bias`: MLP biases are not supported",
                file.display()
            );
        }
        let moe = match arch {
            Arch::Qwen3Moe | Arch::Mixtral | Arch::Qwen2Moe => Some(moe_config(arch, &raw, file)?),
            _ => None,
        };
        let qk_norm = arch.qk_norm();
        let cfg = ModelConfig {
            arch,
            hidden_size,
            intermediate_size: get_usize(&raw, "intermediate_size", file)?,
            num_layers: get_usize(&raw, "num_hidden_layers", file)?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: get_usize(&raw, "vocab_size", file)?,
            rms_norm_eps: get_f64_or(&raw, "rms_norm_eps", 1e-6, file)?,
            rope_theta,
            rope_llama3,
            rope_linear_factor,
            tie_word_embeddings: raw
                .get("tie_word_embeddings")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            attention_bias,
            qk_norm,
            moe,
            raw,
        };
        cfg.check_sizes(file)?;
        Ok(cfg)
    }

    /// Every size at least 1 and the implied parameter count representable and below 10¹⁴:
    /// a corrupt or hostile config must be refused here, before shapes are multiplied out.
    fn check_sizes(&self, file: &Path) -> Result<()> {
        for (key, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("num_attention_heads", self.num_heads),
            (
                "moe_intermediate_size",
                self.moe.map_or(1, |m| m.intermediate),
            ),
            (
                "shared_expert_intermediate_size",
                self.moe.and_then(|m| m.shared).unwrap_or(1),
            ),
        ] {
            if v == 0 || v > 1 << 32 {
                bail!(
                    "{}: field `{key}` = {v} is out of range (1 ..= 2^32)",
                    file.display()
                );
            }
        }
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let total = (|| {
            let q = self.num_heads.checked_mul(hd)?;
            let kv = self.num_kv_heads.checked_mul(hd)?;
            // q, k, v, o projections and the three MLP matrices
            let attn = h.checked_mul(q.checked_mul(2)?.checked_add(kv.checked_mul(2)?)?)?;
            let mlp = match self.moe {
                None => h.checked_mul(i)?.checked_mul(3)?,
                Some(m) => h
                    .checked_mul(m.intermediate)?
                    .checked_mul(3)?
                    .checked_add(h)?
                    .checked_mul(m.experts)?
                    .checked_add(h.checked_mul(m.shared.unwrap_or(0))?.checked_mul(3)?)?,
            };
            attn.checked_add(mlp)?
                .checked_mul(self.num_layers)?
                .checked_add(self.vocab_size.checked_mul(h)?.checked_mul(2)?)
        })();
        match total {
            Some(n) if n < 100_000_000_000_000 => Ok(()),
            _ => bail!(
                "{}: the sizes imply more than 10^14 parameters (hidden_size {h}, intermediate_size {i}, \
                 num_hidden_layers {}, vocab_size {}): corrupt config",
                file.display(),
                self.num_layers,
                self.vocab_size
            ),
        }
    }

    /// Name and shape of every tensor a checkpoint of this config must hold.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let mut v = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for l in 0..self.num_layers {
            v.extend(self.layer_tensors(l));
        }
        v.push(("model.norm.weight".into(), vec![h]));
        if !self.tie_word_embeddings {
            v.push(("lm_head.weight".into(), vec![self.vocab_size, h]));
        }
        v
    }

    /// Tensors of decoder layer `l` with their shapes, from the family's block description
    /// (norms, linear weights, biases).
    pub fn layer_tensors(&self, l: usize) -> Vec<(String, Vec<usize>)> {
        let b = self.block();
        let p = format!("model.layers.{l}.");
        let mut v: Vec<(String, Vec<usize>)> = Vec::new();
        for (n, d) in &b.norms {
            v.push((format!("{p}{n}.weight"), vec![self.dim(*d)]));
        }
        for lin in &b.linears {
            v.push((
                format!("{p}{}.weight", lin.name),
                vec![self.dim(lin.out), self.dim(lin.inp)],
            ));
        }
        for lin in b.linears.iter().filter(|l| self.has_bias(l)) {
            v.push((format!("{p}{}.bias", lin.name), vec![self.dim(lin.out)]));
        }
        v
    }

    /// Total parameter count implied by the config.
    pub fn num_params(&self) -> usize {
        self.expected_tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// RoPE inverse frequencies, with linear or Llama-3 scaling applied as transformers does.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        // transformers computes these in float32: 1 / base^(2i/d).
        let mut inv: Vec<f64> = (0..d / 2)
            .map(|i| (1.0f32 / (self.rope_theta as f32).powf((2 * i) as f32 / d as f32)) as f64)
            .collect();
        if let Some(s) = &self.rope_llama3 {
            let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        inv.iter()
            .map(|f| (*f / self.rope_linear_factor) as f32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base(model_type: &str) -> Value {
        json!({"model_type": model_type, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 100, "rms_norm_eps": 1e-6})
    }

    /// Found by the `config_json` fuzz target: a huge `hidden_size` overflowed the parameter
    /// count (a panic). Absurd and zero sizes are refused with the field named.
    #[test]
    fn absurd_sizes_are_refused_not_overflowed() {
        let p = Path::new("config.json");
        let mut c = base("llama");
        c["hidden_size"] = json!(51244444444444444u64);
        c["num_attention_heads"] = json!(2);
        let e = ModelConfig::from_value(c, p).unwrap_err().to_string();
        assert!(
            e.contains("hidden_size") && e.contains("config.json"),
            "{e}"
        );
        for (k, v) in [
            ("vocab_size", json!(1u64 << 33)),
            ("num_hidden_layers", json!(1u64 << 32)),
            ("intermediate_size", json!(0)),
        ] {
            let mut c = base("llama");
            c[k] = v;
            let e = ModelConfig::from_value(c, p).unwrap_err().to_string();
            assert!(e.contains("config.json"), "{k}: {e}");
        }
        let mut c = base("llama");
        c["head_dim"] = json!(1u64 << 32);
        c["num_attention_heads"] = json!(1u64 << 32);
        c["num_key_value_heads"] = json!(1u64 << 32);
        assert!(ModelConfig::from_value(c, p).is_err());
    }

    #[test]
    fn family_variants_expect_their_tensors() {
        let p = Path::new("config.json");
        let q2 = ModelConfig::from_value(base("qwen2"), p).unwrap();
        let names: Vec<String> = q2.layer_tensors(0).into_iter().map(|(n, _)| n).collect();
        assert!(names.iter().any(|n| n.ends_with("self_attn.k_proj.bias")));
        assert!(!names.iter().any(|n| n.contains("q_norm")));
        let q3 = ModelConfig::from_value(base("qwen3"), p).unwrap();
        let t = q3.layer_tensors(0);
        assert!(t
            .iter()
            .any(|(n, s)| n.ends_with("self_attn.q_norm.weight") && s == &vec![16]));
        let m = ModelConfig::from_value(base("mistral"), p).unwrap();
        assert_eq!(m.layer_tensors(0).len(), 9);
        let mut tied = base("llama");
        tied["tie_word_embeddings"] = json!(true);
        let c = ModelConfig::from_value(tied, p).unwrap();
        assert!(!c
            .expected_tensors()
            .iter()
            .any(|(n, _)| n == "lm_head.weight"));
        let e = ModelConfig::from_value(base("gpt_neox"), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model_type") && e.contains("gpt_neox"));
    }

    /// transformers' `_compute_llama3_parameters`: high frequencies kept, low ones divided by
    /// `factor`, the band between interpolated.
    #[test]
    fn llama3_rope_scaling_bands() {
        let mut v = base("llama");
        v["head_dim"] = json!(128);
        v["rope_theta"] = json!(500000.0);
        let plain = ModelConfig::from_value(v.clone(), Path::new("c"))
            .unwrap()
            .rope_inv_freq();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = ModelConfig::from_value(v, Path::new("c")).unwrap();
        let scaled = c.rope_inv_freq();
        for (p, s) in plain.iter().zip(&scaled) {
            let wavelen = 2.0 * std::f64::consts::PI / *p as f64;
            if wavelen < 8192.0 / 4.0 {
                assert!((s - p).abs() <= 1e-12 * p.abs(), "high frequency changed");
            } else if wavelen > 8192.0 {
                assert!(
                    (s * 8.0 - p).abs() <= 1e-6 * p.abs(),
                    "low frequency not divided by 8"
                );
            } else {
                let smooth = (8192.0 / wavelen - 1.0) / 3.0;
                let want = (1.0 - smooth) * *p as f64 / 8.0 + smooth * *p as f64;
                assert!(
                    (*s as f64 - want).abs() <= 1e-6 * want,
                    "band interpolation"
                );
            }
        }
        assert!(scaled.last().unwrap() < plain.last().unwrap());
        // linear scaling divides every frequency
        let mut v = base("llama");
        v["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
        let lin = ModelConfig::from_value(v, Path::new("c"))
            .unwrap()
            .rope_inv_freq();
        let plain = ModelConfig::from_value(base("llama"), Path::new("c"))
            .unwrap()
            .rope_inv_freq();
        for (a, b) in lin.iter().zip(&plain) {
            assert!((a * 2.0 - b).abs() < 1e-7);
        }
    }
}
