//! llama.cpp's quantization mixes: the `llama_ftype` presets, `--tensor-type` overrides and the
//! per-tensor type choice of `llama_tensor_get_type` with its shape fallback.

use crate::quant::ggml::GgmlType;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// `export.gguf_type`: llama.cpp's `llama_ftype` presets we write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileType {
    /// Everything in f32 (`LLAMA_FTYPE_ALL_F32`): lossless, the input llama-quantize takes.
    #[serde(rename = "f32")]
    F32,
    #[serde(rename = "f16")]
    F16,
    #[serde(rename = "bf16")]
    BF16,
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "q4_0")]
    Q4_0,
    #[serde(rename = "q4_1")]
    Q4_1,
    #[serde(rename = "q5_0")]
    Q5_0,
    #[serde(rename = "q5_1")]
    Q5_1,
    #[serde(rename = "q4_k_s")]
    Q4KS,
    #[serde(rename = "q4_k_m")]
    Q4KM,
    #[serde(rename = "q5_k_s")]
    Q5KS,
    #[serde(rename = "q5_k_m")]
    Q5KM,
    #[serde(rename = "q6_k")]
    Q6K,
}

impl FileType {
    /// `enum llama_ftype` (`general.file_type`).
    pub fn id(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q4_1 => 3,
            FileType::Q8_0 => 7,
            FileType::Q5_0 => 8,
            FileType::Q5_1 => 9,
            FileType::Q4KS => 14,
            FileType::Q4KM => 15,
            FileType::Q5KS => 16,
            FileType::Q5KM => 17,
            FileType::Q6K => 18,
            FileType::BF16 => 32,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FileType::F32 => "f32",
            FileType::F16 => "f16",
            FileType::BF16 => "bf16",
            FileType::Q8_0 => "q8_0",
            FileType::Q4_0 => "q4_0",
            FileType::Q4_1 => "q4_1",
            FileType::Q5_0 => "q5_0",
            FileType::Q5_1 => "q5_1",
            FileType::Q4KS => "q4_k_s",
            FileType::Q4KM => "q4_k_m",
            FileType::Q5KS => "q5_k_s",
            FileType::Q5KM => "q5_k_m",
            FileType::Q6K => "q6_k",
        }
    }

    /// The default type of the mix (`llama_model_quantize_impl`'s `default_type`).
    pub fn base(self) -> GgmlType {
        match self {
            FileType::F32 => GgmlType::F32,
            FileType::F16 => GgmlType::F16,
            FileType::BF16 => GgmlType::BF16,
            FileType::Q8_0 => GgmlType::Q8_0,
            FileType::Q4_0 => GgmlType::Q4_0,
            FileType::Q4_1 => GgmlType::Q4_1,
            FileType::Q5_0 => GgmlType::Q5_0,
            FileType::Q5_1 => GgmlType::Q5_1,
            FileType::Q4KS | FileType::Q4KM => GgmlType::Q4K,
            FileType::Q5KS | FileType::Q5KM => GgmlType::Q5K,
            FileType::Q6K => GgmlType::Q6K,
        }
    }
}

/// A `--tensor-type`-style override: the first pattern that matches (regex search in the GGUF
/// tensor name) decides the type of a quantizable tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypeOverride {
    pub pattern: String,
    #[serde(rename = "type")]
    pub ty: String,
}

/// Compiled overrides.
pub struct Overrides(Vec<(regex::Regex, GgmlType)>);

impl Overrides {
    pub fn new(o: &[TypeOverride]) -> Result<Self> {
        let mut v = Vec::new();
        for (i, t) in o.iter().enumerate() {
            let re = regex::Regex::new(&t.pattern).with_context(|| {
                format!("tensor_types[{i}]: `{}` is not a valid regex", t.pattern)
            })?;
            let ty = GgmlType::parse(&t.ty)
                .with_context(|| {
                    format!(
                        "tensor_types[{i}]: unknown type `{}` (q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k, f16, bf16, f32)",
                        t.ty
                    )
                })?;
            v.push((re, ty));
        }
        Ok(Overrides(v))
    }

    fn find(&self, name: &str) -> Option<GgmlType> {
        self.0
            .iter()
            .find(|(re, _)| re.is_match(name))
            .map(|(_, t)| *t)
    }
}

/// llama-quant.cpp `use_more_bits`.
fn use_more_bits(i: i64, n: i64) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// What of the model llama-quantize's mix reads: its layer count, whether the embedding is
/// tied to the output, its expert count (0 for a dense model).
#[derive(Clone, Copy, Debug)]
pub struct MixModel {
    pub layers: usize,
    pub tied: bool,
    pub experts: usize,
}

impl MixModel {
    pub fn of(cfg: &crate::config::ModelConfig) -> Self {
        MixModel {
            layers: cfg.num_layers,
            tied: cfg.tie_word_embeddings,
            experts: cfg.moe.map_or(0, |m| m.experts),
        }
    }
}

/// The ggml type llama-quantize gives tensor `name` (GGUF name, 2-d or a 3-d stack of experts,
/// `ncols` = ne[0]) of `model`, for mix `ft` (`llama_tensor_get_type`: manual overrides, then
/// the mix's rules, then the shape fallback). `calibrated`: the tensor's rounding is calibrated
/// (an importance matrix, or GPTQ onto the grid) — llama-quantize's `has_imatrix`, which gives
/// the first n_layer/8 `ffn_down` tensors of a Q4_0 / Q5_0 mix Q4_1 / Q5_1 ("guard against
/// craziness"). A mixture's routers (`ffn_gate_inp`, `ffn_gate_inp_shexp`) are never quantized
/// (the converter writes them F32 and llama-quantize leaves them); with exactly 8 experts
/// attn_k and attn_v take Q8_0 and a Q4_K mix's attn_output Q5_K, as llama-quantize does for
/// Mixtral-8x7B. 1-d tensors (norms) stay F32 and are not passed here.
pub fn tensor_type(
    ft: FileType,
    name: &str,
    ncols: usize,
    model: MixModel,
    calibrated: bool,
    overrides: &Overrides,
) -> GgmlType {
    let base = ft.base();
    let cat = name
        .strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .map(|(_, r)| r.trim_end_matches(".weight"))
        .unwrap_or(name.trim_end_matches(".weight"));
    if cat.starts_with("ffn_gate_inp") {
        return GgmlType::F32;
    }
    if !base.is_quantized() {
        // f16 / bf16 files: every 2-d weight in that type (the converter's --outtype)
        return overrides.find(name).unwrap_or(base);
    }
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(n, _)| n.parse::<i64>().ok());
    let nl = model.layers as i64;
    let eight = model.experts == 8;
    let mut t = base;
    if let Some(o) = overrides.find(name) {
        t = o;
    } else if name == "output.weight" || (model.tied && name == "token_embd.weight") {
        // output (and a tied embedding): Q6_K unless the mix is Q8_0 or the row does not fit
        if !ncols.is_multiple_of(base.block_size()) {
            t = GgmlType::Q8_0;
        } else if base != GgmlType::Q8_0 {
            t = GgmlType::Q6K;
        }
    } else if name == "token_embd.weight" {
        // the base type
    } else if let Some(i) = layer {
        match cat {
            "attn_v" => {
                if matches!(ft, FileType::Q4KM | FileType::Q5KM) && use_more_bits(i, nl) {
                    t = GgmlType::Q6K;
                } else if ft == FileType::Q4KS && i < 4 {
                    t = GgmlType::Q5K;
                }
                if eight {
                    t = GgmlType::Q8_0;
                }
            }
            "attn_k" if eight => t = GgmlType::Q8_0,
            "attn_output" if eight && matches!(ft, FileType::Q4KS | FileType::Q4KM) => {
                t = GgmlType::Q5K
            }
            // `ffn_down`, and a mixture's `ffn_down_exps` / `ffn_down_shexp` (llama.cpp matches
            // the substring; a mixture's layer is read from the name)
            c if c.starts_with("ffn_down") => {
                if matches!(ft, FileType::Q4KM | FileType::Q5KM) && use_more_bits(i, nl) {
                    t = GgmlType::Q6K;
                } else if ft == FileType::Q4KS && i < nl / 8 {
                    t = GgmlType::Q5K;
                } else if matches!(ft, FileType::Q4_0 | FileType::Q5_0) && calibrated && i < nl / 8
                {
                    t = if ft == FileType::Q4_0 {
                        GgmlType::Q4_1
                    } else {
                        GgmlType::Q5_1
                    };
                }
            }
            _ => {}
        }
    }
    fallback(t, ncols)
}

/// llama-quant.cpp `tensor_type_fallback`: a row that is not a whole number of blocks.
fn fallback(t: GgmlType, ncols: usize) -> GgmlType {
    if ncols.is_multiple_of(t.block_size()) {
        return t;
    }
    let r = match t {
        GgmlType::Q4K => GgmlType::Q5_0,
        GgmlType::Q5K => GgmlType::Q5_1,
        GgmlType::Q6K => GgmlType::Q8_0,
        other => other,
    };
    if ncols.is_multiple_of(r.block_size()) {
        r
    } else {
        GgmlType::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_mix_follows_llama_cpp() {
        let o = Overrides::new(&[]).unwrap();
        let m = |layers, tied, experts| MixModel {
            layers,
            tied,
            experts,
        };
        let t =
            |name: &str, ncols| tensor_type(FileType::Q4KM, name, ncols, m(8, false, 0), false, &o);
        // use_more_bits(i, 8): i < 1 || i >= 7 || (i - 1) % 3 == 2 → layers 0, 3, 6, 7
        let v: Vec<_> = (0..8)
            .map(|i| t(&format!("blk.{i}.attn_v.weight"), 256))
            .collect();
        use GgmlType::*;
        assert_eq!(v, vec![Q6K, Q4K, Q4K, Q6K, Q4K, Q4K, Q6K, Q6K]);
        assert_eq!(t("blk.3.ffn_down.weight", 768), Q6K);
        assert_eq!(t("blk.1.ffn_down.weight", 768), Q4K);
        assert_eq!(t("blk.1.attn_q.weight", 256), Q4K);
        assert_eq!(t("output.weight", 256), Q6K);
        assert_eq!(t("token_embd.weight", 256), Q4K);
        // rows that are not whole super-blocks fall back (SmolLM2's 576)
        assert_eq!(t("blk.1.attn_q.weight", 576), Q5_0);
        assert_eq!(t("blk.0.attn_v.weight", 576), Q8_0);
        assert_eq!(t("output.weight", 576), Q8_0);
        // tied embeddings take the output's type
        assert_eq!(
            tensor_type(
                FileType::Q4KM,
                "token_embd.weight",
                256,
                m(8, true, 0),
                false,
                &o
            ),
            Q6K
        );
        // Q4_0: output Q6_K, everything else Q4_0
        assert_eq!(
            tensor_type(
                FileType::Q4_0,
                "output.weight",
                256,
                m(8, false, 0),
                false,
                &o
            ),
            Q6K
        );
        assert_eq!(
            tensor_type(
                FileType::Q4_0,
                "blk.0.ffn_down.weight",
                768,
                m(8, false, 0),
                false,
                &o
            ),
            Q4_0
        );
        // calibrated (llama-quantize --imatrix): the first n_layer/8 ffn_down of Q4_0 / Q5_0
        // mixes take Q4_1 / Q5_1; nothing else moves
        let c = |ft, name: &str| tensor_type(ft, name, 768, m(30, false, 0), true, &o);
        for i in 0..30 {
            let want = if i < 3 { Q4_1 } else { Q4_0 };
            assert_eq!(
                c(FileType::Q4_0, &format!("blk.{i}.ffn_down.weight")),
                want,
                "{i}"
            );
            assert_eq!(c(FileType::Q4_0, &format!("blk.{i}.ffn_up.weight")), Q4_0);
        }
        assert_eq!(c(FileType::Q5_0, "blk.2.ffn_down.weight"), Q5_1);
        assert_eq!(c(FileType::Q4KM, "blk.4.ffn_down.weight"), Q4K);
        let o = Overrides::new(&[TypeOverride {
            pattern: "attn_v".into(),
            ty: "q8_0".into(),
        }])
        .unwrap();
        assert_eq!(
            tensor_type(
                FileType::Q4KM,
                "blk.1.attn_v.weight",
                256,
                m(8, false, 0),
                false,
                &o
            ),
            Q8_0
        );
        // a mixture of 8 experts (llama-quantize's Mixtral rules): attn_k / attn_v Q8_0,
        // attn_output Q5_K, the stacked down experts by layer as ffn_down, routers F32
        let o = Overrides::new(&[]).unwrap();
        let x = |name: &str| tensor_type(FileType::Q4KM, name, 256, m(6, false, 8), false, &o);
        assert_eq!(x("blk.1.attn_v.weight"), Q8_0);
        assert_eq!(x("blk.1.attn_k.weight"), Q8_0);
        assert_eq!(x("blk.1.attn_q.weight"), Q4K);
        assert_eq!(x("blk.1.attn_output.weight"), Q5K);
        // use_more_bits(i, 6): i < 0 || i >= 5 || (i - 0) % 3 == 2 → layers 2, 5
        let down: Vec<_> = (0..6)
            .map(|i| x(&format!("blk.{i}.ffn_down_exps.weight")))
            .collect();
        assert_eq!(down, vec![Q4K, Q4K, Q6K, Q4K, Q4K, Q6K]);
        assert_eq!(x("blk.2.ffn_gate_exps.weight"), Q4K);
        assert_eq!(x("blk.2.ffn_gate_inp.weight"), F32);
        assert_eq!(
            tensor_type(
                FileType::F16,
                "blk.0.ffn_gate_inp.weight",
                256,
                m(6, false, 8),
                false,
                &o
            ),
            F32
        );
        // 4 experts: the dense rules
        let y = |name: &str| tensor_type(FileType::Q4KM, name, 256, m(6, false, 4), false, &o);
        assert_eq!(y("blk.1.attn_k.weight"), Q4K);
        assert_eq!(y("blk.1.attn_output.weight"), Q4K);
        assert!(Overrides::new(&[TypeOverride {
            pattern: "(".into(),
            ty: "q8_0".into()
        }])
        .is_err());
    }
}
