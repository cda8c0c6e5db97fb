//! The Llama-family forward pass on candle tensors, f32 compute whatever the storage dtype.
//! Matches transformers' `LlamaForCausalLM` (and Mistral / Qwen2 / Qwen3 variants):
//! RMSNorm → attention with RoPE (rotate-half convention) and GQA → residual → RMSNorm →
//! SwiGLU MLP → residual.

use super::checkpoint::Checkpoint;
use super::config::ModelConfig;
use super::layer::{read_checked, LayerWeights, Site};
use anyhow::{Context, Result};
use candle_core::{DType as CDType, Device, Tensor};

pub fn device() -> Device {
    Device::Cpu
}

/// Precomputed RoPE tables (cos and sin of position × inverse frequency, [max_t, head_dim/2]).
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    max_t: usize,
}

impl Rope {
    pub fn new(cfg: &ModelConfig, max_t: usize) -> Result<Self> {
        let inv = cfg.rope_inv_freq();
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_t * half);
        let mut sin = Vec::with_capacity(max_t * half);
        for t in 0..max_t {
            for f in &inv {
                // transformers: freqs = inv_freq (f32) × position (f32), then cos/sin in f32.
                let a = *f * t as f32;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let dev = device();
        let mut mask = vec![0f32; max_t * max_t];
        for i in 0..max_t {
            for j in i + 1..max_t {
                mask[i * max_t + j] = f32::NEG_INFINITY;
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (max_t, half), &dev)?,
            sin: Tensor::from_vec(sin, (max_t, half), &dev)?,
            mask: Tensor::from_vec(mask, (max_t, max_t), &dev)?,
            max_t,
        })
    }
}

fn tensor2(v: &[f32], r: usize, c: usize) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, (r, c), &device())?)
}

fn tensor1(v: &[f32]) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, v.len(), &device())?)
}

/// x [n, in] · Wᵀ [in, out] (+ b)
fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// A decoder layer ready to run: its weights as candle tensors.
pub struct CandleLayer {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    bq: Option<Tensor>,
    bk: Option<Tensor>,
    bv: Option<Tensor>,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    input_norm: Tensor,
    post_norm: Tensor,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    eps: f32,
}

impl CandleLayer {
    pub fn new(lw: &LayerWeights, cfg: &ModelConfig) -> Result<Self> {
        let t = |name: &str| -> Result<Tensor> {
            let w = &lw.linears[name].weight;
            let s = w.as_slice().context("weight not contiguous")?;
            tensor2(s, w.nrows(), w.ncols())
        };
        let b = |name: &str| -> Result<Option<Tensor>> {
            lw.linears[name].bias.as_deref().map(tensor1).transpose()
        };
        let n = |name: &str| -> Result<Option<Tensor>> {
            lw.norms.get(name).map(|(v, _)| tensor1(v)).transpose()
        };
        Ok(CandleLayer {
            q: t("self_attn.q_proj")?,
            k: t("self_attn.k_proj")?,
            v: t("self_attn.v_proj")?,
            o: t("self_attn.o_proj")?,
            bq: b("self_attn.q_proj")?,
            bk: b("self_attn.k_proj")?,
            bv: b("self_attn.v_proj")?,
            gate: t("mlp.gate_proj")?,
            up: t("mlp.up_proj")?,
            down: t("mlp.down_proj")?,
            input_norm: n("input_layernorm")?.context("missing input_layernorm")?,
            post_norm: n("post_attention_layernorm")?
                .context("missing post_attention_layernorm")?,
            q_norm: n("self_attn.q_norm")?,
            k_norm: n("self_attn.k_norm")?,
            n_heads: cfg.num_heads,
            n_kv: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    /// Run the layer on hidden states x [b, t, hidden]. `hook` sees each distinct linear input
    /// as a 2-D tensor [b·t, in_features] (this is where statistics are collected).
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        hook: &mut dyn FnMut(Site, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let (b, t, hidden) = x.dims3()?;
        anyhow::ensure!(
            t <= rope.max_t,
            "sequence of {t} tokens exceeds the RoPE table"
        );
        let (nh, nkv, hd) = (self.n_heads, self.n_kv, self.head_dim);
        let x2 = x.reshape((b * t, hidden))?;
        // --- attention ---
        let h = candle_nn::ops::rms_norm(&x2, &self.input_norm, self.eps)?;
        hook(Site::AttnIn, &h)?;
        let q = linear(&h, &self.q, self.bq.as_ref())?;
        let k = linear(&h, &self.k, self.bk.as_ref())?;
        let v = linear(&h, &self.v, self.bv.as_ref())?;
        let mut q = q.reshape((b, t, nh, hd))?;
        let mut k = k.reshape((b, t, nkv, hd))?;
        if let Some(qn) = &self.q_norm {
            q = candle_nn::ops::rms_norm(&q, qn, self.eps)?;
        }
        if let Some(kn) = &self.k_norm {
            k = candle_nn::ops::rms_norm(&k, kn, self.eps)?;
        }
        let q = q.transpose(1, 2)?.contiguous()?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let cos = rope.cos.narrow(0, 0, t)?;
        let sin = rope.sin.narrow(0, 0, t)?;
        let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;
        // GQA: each KV head serves n_heads / n_kv query heads.
        let rep = nh / nkv;
        let (k, v) = if rep > 1 {
            let k = k
                .unsqueeze(2)?
                .expand((b, nkv, rep, t, hd))?
                .reshape((b, nh, t, hd))?;
            let v = v
                .unsqueeze(2)?
                .expand((b, nkv, rep, t, hd))?
                .reshape((b, nh, t, hd))?;
            (k, v)
        } else {
            (k, v)
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let mask = rope.mask.narrow(0, 0, t)?.narrow(1, 0, t)?;
        let scores = scores.broadcast_add(&mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let attn = probs.matmul(&v)?; // [b, nh, t, hd]
        let attn = attn.transpose(1, 2)?.reshape((b * t, nh * hd))?;
        hook(Site::OIn, &attn)?;
        let o = linear(&attn, &self.o, None)?;
        let x2 = (x2 + o)?;
        // --- MLP (SwiGLU) ---
        let h = candle_nn::ops::rms_norm(&x2, &self.post_norm, self.eps)?;
        hook(Site::MlpIn, &h)?;
        let g = linear(&h, &self.gate, None)?;
        let u = linear(&h, &self.up, None)?;
        let act = (candle_nn::ops::silu(&g)? * u)?;
        hook(Site::DownIn, &act)?;
        let d = linear(&act, &self.down, None)?;
        let out = (x2 + d)?;
        Ok(out.reshape((b, t, hidden))?)
    }
}

/// Embedding table, final norm and LM head: the parts outside the decoder layers.
pub struct Outer {
    embed: Tensor,
    norm: Tensor,
    head: Tensor,
    eps: f32,
}

impl Outer {
    pub fn load(ckpt: &Checkpoint) -> Result<Self> {
        let cfg = &ckpt.config;
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_v = read_checked(ckpt, "model.embed_tokens.weight", &[v, h])?;
        let embed = tensor2(&embed_v, v, h)?;
        let head = if cfg.tie_word_embeddings && !ckpt.has("lm_head.weight") {
            embed.clone()
        } else {
            let (w, _) = crate::model::dequant::dense_weight(ckpt, "lm_head", &[v, h])?;
            tensor2(&w, v, h)?
        };
        let norm = tensor1(&read_checked(ckpt, "model.norm.weight", &[h])?)?;
        Ok(Outer {
            embed,
            norm,
            head,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    /// Token ids [b, t] → hidden states [b, t, hidden].
    pub fn embed(&self, ids: &[u32], b: usize, t: usize) -> Result<Tensor> {
        let idx = Tensor::from_slice(ids, b * t, &device())?;
        let e = self.embed.index_select(&idx, 0)?;
        Ok(e.reshape((b, t, ()))?)
    }

    /// Final RMSNorm (as transformers' last hidden state).
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let x2 = x.reshape((b * t, h))?;
        Ok(candle_nn::ops::rms_norm(&x2, &self.norm, self.eps)?.reshape((b, t, h))?)
    }

    /// Hidden [b, t, hidden] (before the final norm) → logits [b·t, vocab].
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let n = self.final_norm(x)?.reshape((b * t, h))?;
        Ok(n.matmul(&self.head.t()?)?)
    }
}

/// The whole model resident in memory (evaluation).
pub struct Model {
    pub outer: Outer,
    pub layers: Vec<CandleLayer>,
    pub rope: Rope,
    pub config: ModelConfig,
}

impl Model {
    pub fn load(ckpt: &Checkpoint, max_t: usize) -> Result<Self> {
        let cfg = ckpt.config.clone();
        let outer = Outer::load(ckpt)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let lw = LayerWeights::load(ckpt, l)?;
            layers.push(CandleLayer::new(&lw, &cfg)?);
        }
        Ok(Model {
            outer,
            layers,
            rope: Rope::new(&cfg, max_t)?,
            config: cfg,
        })
    }

    /// Hidden states after every layer (before the final norm), [b, t, hidden].
    pub fn hidden(&self, ids: &[u32], b: usize, t: usize) -> Result<Tensor> {
        let mut x = self.outer.embed(ids, b, t)?;
        let mut no_hook = |_: Site, _: &Tensor| Ok(());
        for l in &self.layers {
            x = l.forward(&x, &self.rope, &mut no_hook)?;
        }
        Ok(x)
    }

    /// Logits [b·t, vocab] as a flat f32 vector.
    pub fn logits(&self, ids: &[u32], b: usize, t: usize) -> Result<Vec<f32>> {
        let x = self.hidden(ids, b, t)?;
        let l = self.outer.logits(&x)?;
        Ok(l.to_dtype(CDType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }
}
