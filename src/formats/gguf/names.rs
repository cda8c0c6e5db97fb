//! Tensor names and layouts as llama.cpp's converter writes them: the architecture name, HF ↔
//! GGUF tensor names, and the Llama Q/K row permutation.

use crate::config::{Arch, ModelConfig};
use anyhow::{ensure, Result};

/// llama.cpp's architecture name for a config we can export.
pub fn arch_name(cfg: &ModelConfig) -> Result<&'static str> {
    Ok(match cfg.arch {
        // convert_hf_to_gguf maps LlamaForCausalLM, MistralForCausalLM and MixtralForCausalLM
        // to `llama` (experts switch on with `expert_count`); the Qwen families keep their own
        Arch::Llama | Arch::Mistral | Arch::Mixtral => "llama",
        Arch::Qwen2 => "qwen2",
        Arch::Qwen3 => "qwen3",
        Arch::Qwen2Moe => "qwen2moe",
        Arch::Qwen3Moe => "qwen3moe",
    })
}

/// What llama.cpp's mixture runs, when it differs from the checkpoint's: its `qwen3moe` graph
/// always renormalises the top-k weights and its `qwen2moe` graph never does
/// (`src/models/qwen3moe.cpp`, `qwen2moe.cpp`), whatever `norm_topk_prob` says; a file of a
/// checkpoint that says otherwise would not compute what the checkpoint does.
pub fn check_mixture(cfg: &ModelConfig) -> Result<()> {
    let Some(moe) = cfg.moe else { return Ok(()) };
    let runs = matches!(cfg.arch, Arch::Qwen3Moe | Arch::Mixtral);
    ensure!(
        moe.norm_topk_prob == runs,
        "GGUF export: llama.cpp's `{}` graph {} the top-k expert weights, but config.json has `norm_topk_prob: {}`; the file would not compute this model",
        arch_name(cfg)?,
        if runs { "always renormalises" } else { "never renormalises" },
        moe.norm_topk_prob
    );
    Ok(())
}

/// HF module name inside a layer → GGUF tensor name (`blk.N.<this>.weight`).
const MODULES: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
    // a mixture's router (qwen2_moe/qwen3_moe, mixtral) and qwen2_moe's shared expert
    ("mlp.gate", "ffn_gate_inp"),
    ("block_sparse_moe.gate", "ffn_gate_inp"),
    ("mlp.shared_expert.gate_proj", "ffn_gate_shexp"),
    ("mlp.shared_expert.up_proj", "ffn_up_shexp"),
    ("mlp.shared_expert.down_proj", "ffn_down_shexp"),
    ("mlp.shared_expert_gate", "ffn_gate_inp_shexp"),
];

/// A mixture's experts: (prefix, the linear's name inside expert E, the stacked GGUF tensor,
/// `[experts, out, in]` with expert E at index E of the slowest dimension).
const EXPERTS: &[(&str, &str, &str)] = &[
    ("mlp.experts.", "gate_proj", "ffn_gate_exps"),
    ("mlp.experts.", "up_proj", "ffn_up_exps"),
    ("mlp.experts.", "down_proj", "ffn_down_exps"),
    ("block_sparse_moe.experts.", "w1", "ffn_gate_exps"),
    ("block_sparse_moe.experts.", "w3", "ffn_up_exps"),
    ("block_sparse_moe.experts.", "w2", "ffn_down_exps"),
];

/// Where an HF tensor goes in a GGUF file: its GGUF name and, for one expert of a mixture, its
/// index in the stacked tensor of that name.
pub fn gguf_slot(hf: &str) -> Option<(String, Option<usize>)> {
    match hf {
        "model.embed_tokens.weight" => return Some(("token_embd.weight".into(), None)),
        "model.norm.weight" => return Some(("output_norm.weight".into(), None)),
        "lm_head.weight" => return Some(("output.weight".into(), None)),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (n, rest) = rest.split_once('.')?;
    let _: usize = n.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if let Some((_, g)) = MODULES.iter().find(|(m, _)| *m == module) {
        return Some((format!("blk.{n}.{g}.{suffix}"), None));
    }
    EXPERTS.iter().find_map(|(prefix, linear, g)| {
        let (e, l) = module.strip_prefix(prefix)?.split_once('.')?;
        (l == *linear).then_some(())?;
        Some((format!("blk.{n}.{g}.{suffix}"), Some(e.parse().ok()?)))
    })
}

/// GGUF tensor name of an HF tensor name (`model.layers.3.self_attn.q_proj.weight` →
/// `blk.3.attn_q.weight`); for an expert, the name of the stacked tensor it is part of.
pub fn gguf_name(hf: &str) -> Option<String> {
    gguf_slot(hf).map(|(g, _)| g)
}

/// The HF tensors GGUF tensor `g` holds, for a model of `cfg`'s layout: one, or a stacked
/// tensor's experts in index order.
pub fn hf_names(g: &str, cfg: &ModelConfig) -> Option<Vec<String>> {
    match g {
        "token_embd.weight" => return Some(vec!["model.embed_tokens.weight".into()]),
        "output_norm.weight" => return Some(vec!["model.norm.weight".into()]),
        "output.weight" => return Some(vec!["lm_head.weight".into()]),
        _ => {}
    }
    let rest = g.strip_prefix("blk.")?;
    let (n, rest) = rest.split_once('.')?;
    let _: usize = n.parse().ok()?;
    let (_, suffix) = rest.rsplit_once('.')?;
    let block = cfg.block();
    let modules = block
        .norms
        .iter()
        .map(|(m, _)| *m)
        .chain(block.linear_names());
    let mut found: Vec<(Option<usize>, String)> = modules
        .map(|m| format!("model.layers.{n}.{m}.{suffix}"))
        .filter_map(|hf| {
            let (name, e) = gguf_slot(&hf)?;
            (name == g).then_some((e, hf))
        })
        .collect();
    found.sort();
    (!found.is_empty()).then(|| found.into_iter().map(|(_, hf)| hf).collect())
}

/// Whether the converter writes `hf` ([1, hidden] in the checkpoint) as a 1-d tensor: Qwen2-MoE's
/// shared-expert gate (`ffn_gate_inp_shexp`, `{n_embd}` in llama.cpp's loader).
pub fn squeezed(hf: &str) -> bool {
    gguf_name(hf).is_some_and(|g| g.ends_with(".ffn_gate_inp_shexp.weight"))
}

/// The head count the llama converter permutes a tensor's rows with, if it does:
/// q_proj with the attention heads, k_proj with the key/value heads (`LlamaModel.modify_tensors`;
/// the qwen2/qwen3 converters write Q and K as they are, their RoPE rotates halves).
pub fn permute_heads(hf: &str, cfg: &ModelConfig) -> Option<usize> {
    if !matches!(cfg.arch, Arch::Llama | Arch::Mistral | Arch::Mixtral) {
        return None;
    }
    if hf.ends_with("self_attn.q_proj.weight") || hf.ends_with("self_attn.q_proj.bias") {
        Some(cfg.num_heads)
    } else if hf.ends_with("self_attn.k_proj.weight") || hf.ends_with("self_attn.k_proj.bias") {
        Some(cfg.num_kv_heads)
    } else {
        None
    }
}

/// `LlamaModel.permute`: `w` is [rows, cols] row-major with rows = n_head · head_dim; within each
/// head, row `i·(hd/2) + j` (i ∈ {0,1}) moves to `2j + i`. `inverse` undoes it.
pub fn permute_rows(
    w: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
    inverse: bool,
) -> Result<Vec<f32>> {
    ensure!(
        n_head > 0 && rows.is_multiple_of(2 * n_head) && w.len() == rows * cols,
        "cannot permute {rows} rows into {n_head} heads of even size"
    );
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                let hf = h * hd + i * half + j;
                let gg = h * hd + 2 * j + i;
                let (src, dst) = if inverse { (gg, hf) } else { (hf, gg) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let cfg = crate::config::ModelConfig::from_value(
            serde_json::json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
                "num_hidden_layers": 12, "num_attention_heads": 4, "vocab_size": 128}),
            std::path::Path::new("config.json"),
        )
        .unwrap();
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.11.self_attn.k_proj.weight",
            "model.layers.3.mlp.down_proj.weight",
        ] {
            let g = gguf_name(hf).unwrap();
            assert_eq!(hf_names(&g, &cfg).unwrap(), [hf]);
        }
        assert_eq!(
            gguf_name("model.layers.2.self_attn.o_proj.weight").unwrap(),
            "blk.2.attn_output.weight"
        );
        assert!(gguf_name("model.layers.x.mlp.up_proj.weight").is_none());
    }

    #[test]
    fn permutation_matches_the_converter_and_inverts() {
        // one head of 4 rows, 1 column: HF rows [a0 a1 | b0 b1] → GGML [a0 b0 a1 b1]
        let w = [0.0, 1.0, 2.0, 3.0];
        assert_eq!(
            permute_rows(&w, 4, 1, 1, false).unwrap(),
            vec![0.0, 2.0, 1.0, 3.0]
        );
        let w: Vec<f32> = (0..48).map(|x| x as f32).collect();
        let p = permute_rows(&w, 8, 6, 2, false).unwrap();
        assert_ne!(p, w);
        assert_eq!(permute_rows(&p, 8, 6, 2, true).unwrap(), w);
    }
}
