//! Tensor names and layouts as llama.cpp's converter writes them: the architecture name, HF ↔
//! GGUF tensor names, and the Llama Q/K row permutation.

use crate::config::{Arch, ModelConfig};
use anyhow::{ensure, Result};

/// llama.cpp's architecture name for a config we can export.
pub fn arch_name(cfg: &ModelConfig) -> Result<&'static str> {
    match cfg.arch {
        // convert_hf_to_gguf maps LlamaForCausalLM and MistralForCausalLM to `llama`;
        // Qwen2ForCausalLM and Qwen3ForCausalLM keep their own architectures
        Arch::Llama | Arch::Mistral => Ok("llama"),
        Arch::Qwen2 => Ok("qwen2"),
        Arch::Qwen3 => Ok("qwen3"),
        Arch::Qwen3Moe | Arch::Mixtral | Arch::Qwen2Moe => anyhow::bail!(
            "GGUF export of mixture-of-experts checkpoints (`{}`) is not supported yet",
            cfg.arch.name()
        ),
    }
}

/// GGUF tensor name of an HF tensor name (`model.layers.3.self_attn.q_proj.weight` →
/// `blk.3.attn_q.weight`).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (n, rest) = rest.split_once('.')?;
    let _: usize = n.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{n}.{g}.{suffix}"))
}

/// Inverse of [`gguf_name`].
pub fn hf_name(g: &str) -> Option<String> {
    match g {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = g.strip_prefix("blk.")?;
    let (n, rest) = rest.split_once('.')?;
    let _: usize = n.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let h = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{n}.{h}.{suffix}"))
}

/// The head count the llama converter permutes a tensor's rows with, if it does:
/// q_proj with the attention heads, k_proj with the key/value heads (`LlamaModel.modify_tensors`;
/// the qwen2/qwen3 converters write Q and K as they are, their RoPE rotates halves).
pub fn permute_heads(hf: &str, cfg: &ModelConfig) -> Option<usize> {
    if !matches!(cfg.arch, Arch::Llama | Arch::Mistral) {
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
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.11.self_attn.k_proj.weight",
            "model.layers.3.mlp.down_proj.weight",
        ] {
            let g = gguf_name(hf).unwrap();
            assert_eq!(hf_name(&g).unwrap(), hf);
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
