//! The model's GGUF metadata (`general.*` and `<arch>.*` keys) from config.json, apart from the
//! tokenizer's keys, which come from tokenizer.json.

use super::mix::FileType;
use super::names::arch_name;
use super::value::Value;
use super::{ALIGNMENT, QUANTIZATION_VERSION};
use crate::config::ModelConfig;
use anyhow::{bail, Result};
use serde_json::Value as Json;

pub(super) fn js<'a>(v: &'a Json, k: &str) -> Option<&'a Json> {
    v.get(k).filter(|x| !x.is_null())
}

/// `general.*` and `llama.*` keys for `cfg` (conversion/base.py `set_gguf_parameters`,
/// conversion/llama.py), plus `general.file_type` and `general.quantization_version`.
pub fn model_metadata(cfg: &ModelConfig, ft: FileType, name: &str) -> Result<Vec<(String, Value)>> {
    let arch = arch_name(cfg)?;
    let a = |k: &str| format!("{arch}.{k}");
    let mut kv: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str(arch.into())),
        ("general.type".into(), Value::Str("model".into())),
        ("general.name".into(), Value::Str(name.into())),
        (a("block_count"), Value::U32(cfg.num_layers as u32)),
    ];
    if let Some(n) = js(&cfg.raw, "max_position_embeddings").and_then(Json::as_u64) {
        kv.push((a("context_length"), Value::U32(n as u32)));
    }
    kv.extend([
        (a("embedding_length"), Value::U32(cfg.hidden_size as u32)),
        (
            a("feed_forward_length"),
            Value::U32(cfg.intermediate_size as u32),
        ),
        (a("attention.head_count"), Value::U32(cfg.num_heads as u32)),
        (
            a("attention.head_count_kv"),
            Value::U32(cfg.num_kv_heads as u32),
        ),
    ]);
    // a mixture (conversion/base.py, qwen.py): expert count and how many run per token; the
    // Qwen families also state the experts' width (llama's experts are feed_forward_length
    // wide) and the shared expert's
    if let Some(m) = cfg.moe {
        kv.push((a("expert_count"), Value::U32(m.experts as u32)));
        kv.push((a("expert_used_count"), Value::U32(m.top_k as u32)));
        if arch != "llama" {
            kv.push((
                a("expert_feed_forward_length"),
                Value::U32(m.intermediate as u32),
            ));
        }
        if let Some(s) = m.shared {
            kv.push((a("expert_shared_feed_forward_length"), Value::U32(s as u32)));
        }
    }
    if cfg.rope_llama3.is_some() {
        bail!("GGUF export of Llama-3 frequency-scaled RoPE (rope_type llama3: the converter's rope_freqs tensor) is not supported yet");
    }
    if cfg.rope_linear_factor != 1.0 {
        kv.push((a("rope.scaling.type"), Value::Str("linear".into())));
        kv.push((
            a("rope.scaling.factor"),
            Value::F32(cfg.rope_linear_factor as f32),
        ));
    }
    kv.push((a("rope.freq_base"), Value::F32(cfg.rope_theta as f32)));
    kv.push((
        a("attention.layer_norm_rms_epsilon"),
        Value::F32(cfg.rms_norm_eps as f32),
    ));
    if js(&cfg.raw, "head_dim").is_some() {
        kv.push((a("attention.key_length"), Value::U32(cfg.head_dim as u32)));
        kv.push((a("attention.value_length"), Value::U32(cfg.head_dim as u32)));
    }
    kv.push(("general.file_type".into(), Value::U32(ft.id())));
    kv.push((a("vocab_size"), Value::U32(cfg.vocab_size as u32)));
    kv.push((a("rope.dimension_count"), Value::U32(cfg.head_dim as u32)));
    if ft.base().is_quantized() {
        kv.push((
            "general.quantization_version".into(),
            Value::U32(QUANTIZATION_VERSION),
        ));
    }
    kv.push(("general.alignment".into(), Value::U32(ALIGNMENT as u32)));
    Ok(kv)
}
