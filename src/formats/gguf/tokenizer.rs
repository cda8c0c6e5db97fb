//! The tokenizer's GGUF metadata (`tokenizer.*`) from tokenizer.json: tokens and their types,
//! merges, the pre-tokenizer's llama.cpp name, special token ids, BOS and the chat template.

use super::metadata::js;
use super::value::Value;
use crate::config::ModelConfig;
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::Path;

/// conversion/base.py `does_token_look_special`: added tokens some models forget to mark
/// special.
fn does_token_look_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// `tokenizer.ggml.pre` from the pre-tokenizer's structure (llama.cpp identifies it by hashing
/// the tokenization of a test text; these are the structures of the families we read).
fn pre_tokenizer(tok: &Json, file: &Path) -> Result<&'static str> {
    let f = file.display();
    let pre = js(tok, "pre_tokenizer").with_context(|| format!("{f}: no `pre_tokenizer`"))?;
    let is_bytelevel_regex = |p: &Json| {
        p.get("type").and_then(Json::as_str) == Some("ByteLevel")
            && p.get("use_regex").and_then(Json::as_bool).unwrap_or(true)
    };
    if is_bytelevel_regex(pre) {
        return Ok("gpt-2");
    }
    if pre.get("type").and_then(Json::as_str) == Some("Sequence") {
        if let Some(ps) = pre.get("pretokenizers").and_then(Json::as_array) {
            // a regex Split then byte-level without its own regex: Qwen2's and Llama-3's
            // patterns (llama.cpp's `qwen2` and `llama-bpe` pre-tokenizers)
            let split = ps.first().filter(|p| {
                p.get("type").and_then(Json::as_str) == Some("Split")
                    && ps.len() == 2
                    && ps[1].get("type").and_then(Json::as_str) == Some("ByteLevel")
                    && ps[1].get("use_regex").and_then(Json::as_bool) == Some(false)
            });
            if let Some(re) = split
                .and_then(|p| p.get("pattern"))
                .and_then(|p| p.get("Regex"))
                .and_then(Json::as_str)
            {
                if re == QWEN2_SPLIT {
                    return Ok("qwen2");
                }
                if re == LLAMA3_SPLIT {
                    return Ok("llama-bpe");
                }
            }
            if ps.len() == 2
                && ps[0].get("type").and_then(Json::as_str) == Some("Digits")
                && ps[0].get("individual_digits").and_then(Json::as_bool) == Some(true)
                && is_bytelevel_regex(&ps[1])
            {
                return Ok("smollm");
            }
        }
    }
    bail!("{f}: pre-tokenizer {pre} is not one whose llama.cpp name we know (GPT-2 byte level, SmolLM, Qwen2, Llama-3)")
}

/// The Split regex of Qwen2/Qwen3's tokenizer.json (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama-3's (digits in runs of up to three; llama.cpp `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.*` keys from tokenizer.json (+ tokenizer_config.json when present): a byte-level
/// BPE with merges → `tokenizer.ggml.model = gpt2`, the tokens with their types as
/// `get_vocab_base` assigns them, the merges, the special token ids, `add_bos_token`, the chat
/// template.
pub fn tokenizer_metadata(dir: &Path, cfg: &ModelConfig) -> Result<Vec<(String, Value)>> {
    let tpath = dir.join("tokenizer.json");
    let f = tpath.display().to_string();
    let tok: Json =
        serde_json::from_slice(&std::fs::read(&tpath).with_context(|| format!("cannot read {f}"))?)
            .with_context(|| format!("{f}: not valid JSON"))?;
    let model = js(&tok, "model").with_context(|| format!("{f}: no `model`"))?;
    let mtype = model.get("type").and_then(Json::as_str).unwrap_or("");
    ensure!(
        mtype == "BPE",
        "{f}: GGUF export supports byte-level BPE tokenizers (llama.cpp `gpt2`), found `{mtype}`"
    );
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .with_context(|| format!("{f}: `model.vocab` missing"))?;
    let n = cfg.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    for (t, id) in vocab {
        let id = id
            .as_u64()
            .with_context(|| format!("{f}: id of `{t}` is not an integer"))?
            as usize;
        ensure!(id < n, "{f}: token `{t}` has id {id} ≥ vocab_size {n}");
        tokens[id] = Some(t.clone());
    }
    let mut types = vec![1i32; n]; // NORMAL
    let mut special: BTreeMap<String, usize> = BTreeMap::new();
    if let Some(added) = js(&tok, "added_tokens").and_then(Json::as_array) {
        for a in added {
            let id = a
                .get("id")
                .and_then(Json::as_u64)
                .with_context(|| format!("{f}: added token without an id"))?
                as usize;
            let content = a
                .get("content")
                .and_then(Json::as_str)
                .with_context(|| format!("{f}: added token {id} without content"))?;
            ensure!(
                id < n,
                "{f}: added token `{content}` has id {id} ≥ vocab_size {n}"
            );
            tokens[id] = Some(content.to_string());
            let is_special = a.get("special").and_then(Json::as_bool).unwrap_or(false);
            // get_vocab_base: special (or special-looking) added tokens are CONTROL, others
            // USER_DEFINED
            let looks_special = does_token_look_special(content);
            types[id] = if is_special || looks_special { 3 } else { 4 };
            special.insert(content.to_string(), id);
        }
    }
    let mut list = Vec::with_capacity(n);
    for (i, t) in tokens.into_iter().enumerate() {
        match t {
            Some(t) => list.push(t),
            None => {
                list.push(format!("[PAD{i}]"));
                types[i] = 5; // UNUSED
            }
        }
    }
    let merges: Vec<String> = match model.get("merges").and_then(Json::as_array) {
        Some(m) => m
            .iter()
            .map(|x| match x {
                Json::String(s) => Ok(s.clone()),
                Json::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                    (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                    _ => bail!("{f}: a merge is not a pair of strings"),
                },
                _ => bail!("{f}: a merge is neither a string nor a pair"),
            })
            .collect::<Result<_>>()?,
        None => bail!("{f}: `model.merges` missing: not a BPE tokenizer llama.cpp can load"),
    };
    let mut kv: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), Value::Str("gpt2".into())),
        (
            "tokenizer.ggml.pre".into(),
            Value::Str(pre_tokenizer(&tok, &tpath)?.into()),
        ),
        ("tokenizer.ggml.tokens".into(), Value::strings(list)),
        ("tokenizer.ggml.token_type".into(), Value::i32s(types)),
        ("tokenizer.ggml.merges".into(), Value::strings(merges)),
    ];
    // special ids: tokenizer_config.json's tokens by content, else config.json's ids
    // (gguf-py SpecialVocab)
    let tc: Json = std::fs::read(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Json::Null);
    let content_of = |k: &str| -> Option<String> {
        match js(&tc, k)? {
            Json::String(s) => Some(s.clone()),
            o => o.get("content").and_then(Json::as_str).map(String::from),
        }
    };
    for (kind, cfg_key) in [
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("unk", ""),
        ("pad", "pad_token_id"),
    ] {
        let id = content_of(&format!("{kind}_token"))
            .and_then(|c| {
                special
                    .get(&c)
                    .copied()
                    .or_else(|| vocab.get(&c).and_then(Json::as_u64).map(|x| x as usize))
            })
            .or_else(|| {
                if cfg_key.is_empty() {
                    None
                } else {
                    js(&cfg.raw, cfg_key)
                        .and_then(Json::as_u64)
                        .map(|x| x as usize)
                }
            });
        if let Some(id) = id.filter(|i| *i < n) {
            kv.push((
                format!("tokenizer.ggml.{kind}_token_id"),
                Value::U32(id as u32),
            ));
        }
    }
    // add_bos: tokenizer_config's flag, else whether the post-processor's single-sequence
    // template starts with a special token
    let add_bos = js(&tc, "add_bos_token")
        .and_then(Json::as_bool)
        .or_else(|| {
            let single = tok.pointer("/post_processor/single")?.as_array()?;
            Some(single.first()?.get("SpecialToken").is_some())
        });
    // conversion/llama.py: SmolLM-sized vocabularies (49152) never add BOS in llama.cpp
    let add_bos = if cfg.vocab_size == 49152 {
        Some(false)
    } else {
        add_bos
    };
    if let Some(b) = add_bos {
        kv.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(b)));
    }
    if let Some(t) = js(&tc, "chat_template").and_then(Json::as_str) {
        kv.push(("tokenizer.chat_template".into(), Value::Str(t.into())));
    } else if let Ok(t) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        kv.push(("tokenizer.chat_template".into(), Value::Str(t)));
    }
    Ok(kv)
}
