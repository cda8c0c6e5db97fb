//! `compress inspect`: what a checkpoint holds.

use crate::model::Checkpoint;
use anyhow::Result;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

pub fn inspect(dir: &Path) -> Result<Value> {
    let ckpt = Checkpoint::open(dir)?;
    let c = &ckpt.config;
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let mut stored_params = 0usize;
    let mut tensors = Vec::new();
    for n in ckpt.names() {
        let (info, _) = ckpt.info(n)?;
        // a GGUF file's tensors are read as f32: say what the file stores
        let dtype = match ckpt.gguf_stored.as_ref().and_then(|g| g.get(n)) {
            Some((t, _)) => t.name().to_string(),
            None => info.dtype.name().to_string(),
        };
        *dtypes.entry(dtype.clone()).or_default() += 1;
        stored_params += info.numel();
        if !n.starts_with("model.layers.") || n.starts_with("model.layers.0.") {
            tensors.push(json!({"name": n, "dtype": dtype, "shape": info.shape}));
        }
    }
    Ok(json!({
        "path": dir.display().to_string(),
        "architecture": c.arch.name(),
        "layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "heads": c.num_heads,
        "kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_word_embeddings,
        "rope_theta": c.rope_theta,
        "parameters": c.num_params(),
        "stored_elements": stored_params,
        "tensor_count": ckpt.names().count(),
        "dtypes": dtypes,
        "files": ckpt.files.iter().map(|f| f.path.file_name().map(|n| n.to_string_lossy().to_string())).collect::<Vec<_>>(),
        "size_on_disk_bytes": ckpt.safetensors_bytes(),
        "quantization_config": match &ckpt.gguf_stored {
            Some(_) => json!({"format": "gguf", "file": crate::formats::gguf::FILE_NAME}),
            None => c.raw.get("quantization_config").cloned().unwrap_or(Value::Null),
        },
        "scheme": scheme_name(&ckpt),
        "tensors_outside_layers_and_layer_0": tensors,
    }))
}

/// The named scheme of a compressed-tensors float checkpoint (`NVFP4A16`, `FP8_DYNAMIC`, …).
fn scheme_name(ckpt: &Checkpoint) -> Option<&'static str> {
    use crate::formats::compressed_tensors as ct;
    let q = ckpt.config.raw.get("quantization_config")?;
    let format = q.get("format")?.as_str()?;
    if !ct::FLOAT_FORMATS.contains(&format) {
        return None;
    }
    let file = ckpt.dir.join("config.json");
    let w = ct::read_float_weights(q, "", &file).ok()?;
    // the input quantizer of any quantized linear (the ignore list names the others)
    let input = ct::read_input_activations(q, "", &file).ok()?;
    crate::quant::presets::name_of(&w, input.as_ref())
}

pub fn to_text(v: &Value) -> String {
    let mut s = String::new();
    let g = |k: &str| v.get(k).map(|x| x.to_string()).unwrap_or_default();
    s.push_str(&format!(
        "checkpoint      {}\n",
        v["path"].as_str().unwrap_or("")
    ));
    s.push_str(&format!(
        "architecture    {}\n",
        v["architecture"].as_str().unwrap_or("")
    ));
    s.push_str(&format!(
        "layers          {} (hidden {}, intermediate {}, heads {}/{} kv, head_dim {})\n",
        g("layers"),
        g("hidden_size"),
        g("intermediate_size"),
        g("heads"),
        g("kv_heads"),
        g("head_dim")
    ));
    s.push_str(&format!(
        "vocab           {} (tied embeddings: {})\n",
        g("vocab_size"),
        g("tie_word_embeddings")
    ));
    s.push_str(&format!("parameters      {}\n", g("parameters")));
    s.push_str(&format!(
        "tensors         {} ({})\n",
        g("tensor_count"),
        g("dtypes")
    ));
    s.push_str(&format!(
        "size on disk    {:.2} MiB in {}\n",
        v["size_on_disk_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        g("files")
    ));
    match &v["quantization_config"] {
        Value::Null => s.push_str("quantization    none\n"),
        q => {
            if let Some(name) = v["scheme"].as_str() {
                s.push_str(&format!("scheme          {name}\n"));
            }
            s.push_str(&format!("quantization    {}\n", q))
        }
    }
    s.push_str("tensors (outside layers, and layer 0):\n");
    if let Some(a) = v["tensors_outside_layers_and_layer_0"].as_array() {
        for t in a {
            s.push_str(&format!(
                "  {:<52} {:<5} {}\n",
                t["name"].as_str().unwrap_or(""),
                t["dtype"].as_str().unwrap_or(""),
                t["shape"]
            ));
        }
    }
    s
}
