//! The Llama-family forward pass, f32 compute whatever the storage dtype. Matches
//! transformers' `LlamaForCausalLM` (and the Mistral / Qwen2 / Qwen3 variants):
//! RMSNorm → attention with RoPE (rotate-half) and GQA → residual → RMSNorm → SwiGLU MLP →
//! residual. Kernels are in `ops` (faer GEMM, rayon) and `attention`.

use super::arch::{Ffn, SharedExpert, Swiglu};
use super::attention::causal_attention;
use super::checkpoint::{read_checked, Checkpoint};
use super::config::{ExpertCalibration, ModelConfig};
use super::layer::{LayerWeights, Site};
use super::ops;
use anyhow::{ensure, Context, Result};
use rayon::prelude::*;

/// Hidden states [b, t, hidden], row-major.
#[derive(Clone, Debug)]
pub struct Act {
    pub data: Vec<f32>,
    pub b: usize,
    pub t: usize,
}

impl Act {
    pub fn rows(&self) -> usize {
        self.b * self.t
    }
}

/// Sees each distinct linear input as rows × cols (this is where statistics are collected).
pub type Hook<'a> = dyn FnMut(Site, &[f32], usize, usize) -> Result<()> + 'a;

/// A statistics hook: as [`Hook`], plus the rows' XᵀX when a device computed it already.
pub type StatsHook<'a> = dyn FnMut(Site, &[f32], usize, usize, Option<&[f32]>) -> Result<()> + 'a;

/// Sees a site's rows inside the forward (site, rows, row count) and says whether to stop there.
type SiteVisit<'a> = dyn FnMut(Site, &[f32], usize) -> Result<bool> + 'a;

/// Precomputed RoPE tables (cos and sin of position × inverse frequency, [max_t, head_dim/2]).
pub struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    max_t: usize,
}

impl Rope {
    pub fn new(cfg: &ModelConfig, max_t: usize) -> Result<Self> {
        let inv = cfg.rope_inv_freq();
        let mut cos = Vec::with_capacity(max_t * inv.len());
        let mut sin = Vec::with_capacity(max_t * inv.len());
        for t in 0..max_t {
            for f in &inv {
                // transformers: freqs = inv_freq (f32) × position (f32), then cos/sin in f32.
                let a = *f * t as f32;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(Rope { cos, sin, max_t })
    }

    /// (cos, sin, max_t): the tables, [max_t, head_dim/2] each (for the block's backward).
    pub fn tables(&self) -> (&[f32], &[f32], usize) {
        (&self.cos, &self.sin, self.max_t)
    }
}

/// A decoder layer ready to run (borrowing the host weights).
pub struct DecoderLayer<'a> {
    w: &'a LayerWeights,
    cfg: &'a ModelConfig,
    /// A mixture's hooks see every token at every expert (`calibration.experts: all`); the
    /// output is the routed one either way.
    all_experts: bool,
}

impl<'a> DecoderLayer<'a> {
    pub fn new(w: &'a LayerWeights, cfg: &'a ModelConfig) -> Self {
        DecoderLayer {
            w,
            cfg,
            all_experts: cfg
                .moe
                .is_some_and(|m| m.calibrate == ExpertCalibration::All),
        }
    }

    /// The same layer for a forward whose hooks read nothing (the output only): a mixture's
    /// experts run on their routed rows alone, without the every-token pass for statistics.
    pub fn routed_only(mut self) -> Self {
        self.all_experts = false;
        self
    }

    fn attn(&self) -> &'static super::arch::Attention {
        &self.cfg.block().attention
    }

    fn mlp(&self) -> &'static super::arch::Mlp {
        &self.cfg.block().mlp
    }

    fn lin(&self, name: &str, x: &[f32], n: usize) -> Result<Vec<f32>> {
        self.w.linears[name].forward(x, n)
    }

    fn norm(&self, name: &str) -> Result<&[f32]> {
        self.w
            .norms
            .get(name)
            .map(|(v, _)| v.as_slice())
            .with_context(|| format!("layer {}: missing `{name}`", self.w.index))
    }

    pub fn forward(&self, x: &Act, rope: &Rope, hook: &mut Hook) -> Result<Act> {
        self.forward_until(x, rope, hook, None)?
            .context("forward stopped early")
    }

    /// As `forward`, but return `None` right after the hook has seen `stop` (statistics of an
    /// early site need only the start of the layer).
    pub fn forward_until(
        &self,
        x: &Act,
        rope: &Rope,
        hook: &mut Hook,
        stop: Option<Site>,
    ) -> Result<Option<Act>> {
        Ok(match self.forward_from(x, None, rope, hook, stop)? {
            Step::Done(y) => Some(y),
            Step::Stopped(_) => None,
        })
    }

    /// The forward from the layer input `x`, or from `from` (activations of the same batch
    /// inside this layer, kept by an earlier call that stopped there: the forward continues
    /// after that site, whose hook is not called again). Stopping at `stop` returns the
    /// activations there. Bit for bit the same as running from `x`, as long as the weights
    /// `from` went through are the same (the caller's responsibility).
    pub fn forward_from(
        &self,
        x: &Act,
        from: Option<&Inner>,
        rope: &Rope,
        hook: &mut Hook,
        stop: Option<Site>,
    ) -> Result<Step> {
        let cfg = self.cfg;
        let (b, t) = (x.b, x.t);
        let n = b * t;
        let d = cfg.hidden_size;
        let eps = cfg.rms_norm_eps as f32;
        ensure!(
            t <= rope.max_t,
            "sequence of {t} tokens exceeds the RoPE table ({})",
            rope.max_t
        );
        ensure!(x.data.len() == n * d, "hidden state has the wrong size");
        let block = cfg.block();
        // hooks run for the sites after `pos` (every site when running from the input)
        let pos = from.map(|i| i.site);
        if let Some(i) = from {
            ensure!(
                i.v.len() == n * cfg.dim(block.kept_width(i.site)),
                "kept activations have the wrong size"
            );
        }
        let mut visit = |s: Site, v: &[f32], rows: usize| -> Result<bool> {
            if pos.is_some_and(|p| s <= p) {
                return Ok(false);
            }
            hook(s, v, rows, cfg.dim(block.site(s).width))?;
            Ok(stop == Some(s))
        };
        let (att, mlp) = (self.attn(), self.mlp());
        // --- attention --- (q/k/v, RoPE, causal attention: o_proj's input)
        let attn_out = match from {
            Some(i) if i.site >= mlp.input => None,
            Some(i) if i.site == att.o_in => Some(i.v.clone()),
            _ => {
                let h = match from {
                    Some(i) => i.v.clone(),
                    None => ops::rms_norm(&x.data, d, self.norm(att.norm)?, eps),
                };
                if visit(att.input, &h, n)? {
                    return Ok(Step::Stopped(Inner {
                        site: att.input,
                        r: None,
                        v: h,
                    }));
                }
                let a = self.attention_core(&h, b, t, rope)?;
                if visit(att.o_in, &a, n)? {
                    return Ok(Step::Stopped(Inner {
                        site: att.o_in,
                        r: None,
                        v: a,
                    }));
                }
                Some(a)
            }
        };
        // --- MLP --- (the residual add fused with the norm)
        let (mut r, h) = match attn_out {
            Some(a) => {
                let o = self.lin(att.o, &a, n)?;
                let (r1, h) = ops::add_rms_norm(&x.data, &o, d, self.norm(mlp.norm)?, eps);
                if visit(mlp.input, &h, n)? {
                    return Ok(Step::Stopped(Inner {
                        site: mlp.input,
                        r: Some(r1),
                        v: h,
                    }));
                }
                (r1, h)
            }
            None => {
                let i = from.context("internal: no attention output and nothing kept")?;
                let r = i.r.clone().context("no residual stream at the MLP input")?;
                (r, i.v.clone())
            }
        };
        let out = match &mlp.ffn {
            Ffn::Dense(s) => {
                // kept at down_proj's input: `h` is silu(gate) ⊙ up already
                let a = match pos {
                    Some(p) if p == s.down_in => h,
                    _ => {
                        let a = self.swiglu(s, &h, n)?;
                        if visit(s.down_in, &a, n)? {
                            return Ok(Step::Stopped(Inner {
                                site: s.down_in,
                                r: Some(r),
                                v: a,
                            }));
                        }
                        a
                    }
                };
                self.lin(s.down, &a, n)?
            }
            Ffn::Moe {
                router,
                experts,
                shared,
            } => {
                let mut stopped = None;
                let out = self.moe(
                    router,
                    experts,
                    shared.as_ref(),
                    &h,
                    n,
                    &mut |s, v, rows| {
                        let stop = visit(s, v, rows)?;
                        if stop {
                            stopped = Some(s);
                        }
                        Ok(stop)
                    },
                )?;
                if let Some(site) = stopped {
                    return Ok(Step::Stopped(Inner {
                        site,
                        r: Some(r),
                        v: h,
                    }));
                }
                out.context("internal: the mixture stopped without a site")?
            }
        };
        ops::add_assign(&mut r, &out);
        Ok(Step::Done(Act { data: r, b, t }))
    }
}

/// A batch's activations inside a decoder layer at a site's input: where
/// [`DecoderLayer::forward_from`] continues.
#[derive(Clone, Debug)]
pub struct Inner {
    pub site: Site,
    /// The residual stream after the attention block (`None` before o_proj: the layer input).
    pub r: Option<Vec<f32>>,
    /// The site's input, [rows, width].
    pub v: Vec<f32>,
}

impl Inner {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * (self.v.len() + self.r.as_ref().map_or(0, |r| r.len()))
    }
}

/// Where [`DecoderLayer::forward_from`] ended: the layer's output, or the activations at `stop`.
pub enum Step {
    Done(Act),
    Stopped(Inner),
}

impl DecoderLayer<'_> {
    /// q/k/v, RoPE and causal attention on the normed input `h` [b·t, hidden]: o_proj's
    /// input [b·t, heads·head_dim].
    fn attention_core(&self, h: &[f32], b: usize, t: usize, rope: &Rope) -> Result<Vec<f32>> {
        let cfg = self.cfg;
        let n = b * t;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps as f32;
        let a = self.attn();
        let mut q = self.lin(a.q, h, n)?;
        let mut k = self.lin(a.k, h, n)?;
        let v = self.lin(a.v, h, n)?;
        if let Some((qn, kn)) = a.qk_norm {
            q = ops::rms_norm(&q, hd, self.norm(qn)?, eps);
            k = ops::rms_norm(&k, hd, self.norm(kn)?, eps);
        }
        let q = ops::rope_transpose(&q, b, t, nh, hd, &rope.cos, &rope.sin);
        let k = ops::rope_transpose(&k, b, t, nkv, hd, &rope.cos, &rope.sin);
        let v = ops::heads_transpose(&v, b, t, nkv, hd);
        Ok(causal_attention(&q, &k, &v, b, nh, nkv, t, hd))
    }

    /// gate/up and SwiGLU on the normed input `h` [n, hidden]: down_proj's input.
    fn swiglu(&self, s: &Swiglu, h: &[f32], n: usize) -> Result<Vec<f32>> {
        let g = self.lin(s.gate, h, n)?;
        let u = self.lin(s.up, h, n)?;
        Ok(ops::silu_mul(&g, &u))
    }

    /// The mixture of experts on the normed input `h` [n, hidden] (transformers'
    /// `Qwen3MoeSparseMoeBlock`): router logits, softmax in f32, the top-k experts per token
    /// (ties to the lower index, as `torch.topk`), their weights renormalised to sum to one when
    /// `norm_topk_prob`; each expert runs on the rows routed to it, and its outputs, scaled by
    /// the token's weight, are added in expert order. `visit` sees each expert's input and
    /// down_proj input (zero rows for an expert no token reached; every token's, when the
    /// config says to calibrate all experts); when it returns true the mixture stops there and
    /// returns `None`. A shared expert (Qwen2-MoE's `Qwen2MoeSparseMoeBlock`) runs first on
    /// every token; its output times sigmoid of its gate is added to the experts' sum.
    fn moe(
        &self,
        router: &str,
        experts: &[Swiglu],
        shared: Option<&SharedExpert>,
        h: &[f32],
        n: usize,
        visit: &mut SiteVisit,
    ) -> Result<Option<Vec<f32>>> {
        let cfg = self.cfg;
        let d = cfg.hidden_size;
        let moe = cfg
            .moe
            .context("internal: a mixture block without a MoE config")?;
        let shared_out = match shared {
            Some(sh) => {
                let a = self.swiglu(&sh.swiglu, h, n)?;
                if visit(sh.swiglu.down_in, &a, n)? {
                    return Ok(None);
                }
                let mut y = self.lin(sh.swiglu.down, &a, n)?;
                let g = self.lin(sh.gate, h, n)?;
                for (row, g) in y.chunks_exact_mut(d).zip(&g) {
                    let s = 1.0 / (1.0 + (-g).exp());
                    row.iter_mut().for_each(|v| *v *= s);
                }
                Some(y)
            }
            None => None,
        };
        let logits = self.lin(router, h, n)?;
        let routes = ops::route_top_k(&logits, n, experts.len(), moe.top_k, moe.norm_topk_prob);
        let mut out = vec![0f32; n * d];
        let all = self.all_experts;
        for (e, s) in experts.iter().enumerate() {
            let (rows, weights): (Vec<usize>, Vec<f32>) = routes[e].iter().copied().unzip();
            let m = rows.len();
            if all {
                // every token through this expert for its statistics (the output below still
                // takes only the routed rows)
                if visit(s.input, h, n)? {
                    return Ok(None);
                }
                let a = self.swiglu(s, h, n)?;
                if visit(s.down_in, &a, n)? {
                    return Ok(None);
                }
            }
            let mut x = Vec::with_capacity(m * d);
            for &r in &rows {
                x.extend_from_slice(&h[r * d..(r + 1) * d]);
            }
            if !all && visit(s.input, &x, m)? {
                return Ok(None);
            }
            let a = if m == 0 {
                Vec::new()
            } else {
                self.swiglu(s, &x, m)?
            };
            if !all && visit(s.down_in, &a, m)? {
                return Ok(None);
            }
            if m == 0 {
                continue;
            }
            let y = self.lin(s.down, &a, m)?;
            for ((&r, w), yr) in rows.iter().zip(&weights).zip(y.chunks_exact(d)) {
                for (o, v) in out[r * d..(r + 1) * d].iter_mut().zip(yr) {
                    *o += v * w;
                }
            }
        }
        if let Some(y) = shared_out {
            ops::add_assign(&mut out, &y);
        }
        Ok(Some(out))
    }

    /// The output of one sub-block on its own (normed) input `h` ([b, t, hidden] as an `Act`):
    /// what AWQ's search compares between candidate scales.
    pub fn part(&self, part: Part, h: &Act, rope: &Rope) -> Result<Vec<f32>> {
        ensure!(
            h.data.len() == h.rows() * self.cfg.hidden_size,
            "sub-block input has the wrong size"
        );
        ensure!(
            h.t <= rope.max_t,
            "sequence of {} tokens exceeds the RoPE table ({})",
            h.t,
            rope.max_t
        );
        let n = h.rows();
        match part {
            Part::Attention => {
                let a = self.attention_core(&h.data, h.b, h.t, rope)?;
                self.lin(self.attn().o, &a, n)
            }
            Part::Mlp => match &self.mlp().ffn {
                Ffn::Dense(s) => {
                    let a = self.swiglu(s, &h.data, n)?;
                    self.lin(s.down, &a, n)
                }
                Ffn::Moe {
                    router,
                    experts,
                    shared,
                } => self
                    .moe(
                        router,
                        experts,
                        shared.as_ref(),
                        &h.data,
                        n,
                        &mut |_, _, _| Ok(false),
                    )?
                    .context("internal: the mixture stopped"),
            },
        }
    }
}

pub use super::arch::Part;

/// Embedding table, final norm and LM head: the parts outside the decoder layers.
pub struct Outer {
    embed: Vec<f32>,
    norm: Vec<f32>,
    /// `None` when tied to the embedding.
    head: Option<Vec<f32>>,
    /// The LM head packed for bf16 compute (`precision: bf16`).
    head_bf16: Option<crate::model::bf16::PackedBf16>,
    /// llama.cpp's conversion of the head's input (`Checkpoint::llama_cpp_activations`).
    head_input: Option<crate::quant::ggml::VecDot>,
    hidden: usize,
    vocab: usize,
    eps: f32,
}

impl Outer {
    /// `llama_cpp_activations`: the LM head's input quantized as llama.cpp's CPU backend does.
    pub fn load(ckpt: &Checkpoint, llama_cpp_activations: bool) -> Result<Self> {
        let cfg = &ckpt.config;
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed = read_checked(ckpt, "model.embed_tokens.weight", &[v, h])?;
        let tied = cfg.tie_word_embeddings && !ckpt.has("lm_head.weight");
        let head = if tied {
            None
        } else {
            Some(crate::model::dequant::dense_weight(ckpt, "lm_head", &[v, h])?.0)
        };
        let head_input = ckpt.llama_cpp_input(
            if tied {
                "model.embed_tokens.weight"
            } else {
                "lm_head.weight"
            },
            llama_cpp_activations,
        )?;
        let norm = read_checked(ckpt, "model.norm.weight", &[h])?;
        Ok(Outer {
            embed,
            norm,
            head,
            head_bf16: None,
            head_input,
            hidden: h,
            vocab: v,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    /// Compute the LM head in bf16 from now on.
    pub fn pack_bf16(&mut self) {
        let head = self.head.as_deref().unwrap_or(&self.embed);
        self.head_bf16 = Some(crate::model::bf16::PackedBf16::pack(
            head,
            self.vocab,
            self.hidden,
        ));
    }

    /// n [rows, hidden] (after the final norm) · headᵀ.
    fn head_product(&self, n: &[f32], rows: usize) -> Vec<f32> {
        let converted;
        let n = match self.head_input {
            Some(v) => {
                let mut c = n.to_vec();
                c.par_chunks_mut(self.hidden).for_each(|r| v.round_trip(r));
                converted = c;
                &converted[..]
            }
            None => n,
        };
        match &self.head_bf16 {
            Some(p) => p.matmul(n, rows, None),
            None => {
                let head = self.head.as_deref().unwrap_or(&self.embed);
                ops::linear(n, rows, self.hidden, head, self.vocab, None)
            }
        }
    }

    /// Token ids [b, t] → hidden states [b, t, hidden].
    pub fn embed(&self, ids: &[u32], b: usize, t: usize) -> Result<Act> {
        ensure!(
            ids.len() == b * t,
            "expected {} ids, got {}",
            b * t,
            ids.len()
        );
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.vocab) {
            anyhow::bail!("token id {bad} is outside the vocabulary ({})", self.vocab);
        }
        Ok(Act {
            data: ops::embed(&self.embed, self.hidden, ids),
            b,
            t,
        })
    }

    /// Final RMSNorm (transformers' last hidden state).
    pub fn final_norm(&self, x: &Act) -> Vec<f32> {
        ops::rms_norm(&x.data, self.hidden, &self.norm, self.eps)
    }

    /// Logits of selected rows only (row r = sequence r / t, position r % t): [rows, vocab].
    pub fn logits_rows(&self, x: &Act, rows: &[usize]) -> Vec<f32> {
        let h = self.hidden;
        let mut sel = Vec::with_capacity(rows.len() * h);
        for &r in rows {
            sel.extend_from_slice(&x.data[r * h..(r + 1) * h]);
        }
        let n = ops::rms_norm(&sel, h, &self.norm, self.eps);
        self.head_product(&n, rows.len())
    }

    /// Logits [r1 − r0, vocab] of rows r0..r1 of the hidden states [b·t, hidden] (before the
    /// final norm): the same bits as those rows of [`Outer::logits`], for callers that consume
    /// the logits a block of rows at a time instead of materializing [b·t, vocab].
    pub fn logits_range(&self, x: &Act, r0: usize, r1: usize) -> Vec<f32> {
        let h = self.hidden;
        let n = ops::rms_norm(&x.data[r0 * h..r1 * h], h, &self.norm, self.eps);
        self.head_product(&n, r1 - r0)
    }

    /// Hidden [b, t, hidden] (before the final norm) → logits [b·t, vocab].
    pub fn logits(&self, x: &Act) -> Vec<f32> {
        let n = self.final_norm(x);
        self.head_product(&n, x.rows())
    }
}

/// The model for evaluation. Decoder layers are either resident (converted to f32 once) or
/// streamed: loaded from the (memory-mapped) checkpoint for each forward and dropped after
/// it, so memory stays at one layer plus activations whatever the model size. Converting a
/// layer costs a pass over its weights; the forward over a batch costs thousands of flops per
/// weight, so streaming is nearly free for batches of real size. The embedding, final norm
/// and LM head stay resident.
pub struct Model<'a> {
    pub outer: Outer,
    layers: Layers<'a>,
    pub rope: Rope,
    pub config: ModelConfig,
    opts: crate::model::EvalOptions,
}

enum Layers<'a> {
    Resident(Vec<LayerWeights>),
    Streamed(&'a Checkpoint),
}

impl<'a> Model<'a> {
    /// Every layer resident in f32.
    pub fn load(ckpt: &Checkpoint, max_t: usize) -> Result<Model<'static>> {
        Self::load_in(ckpt, max_t, &crate::model::EvalOptions::default())
    }

    /// Every layer resident, computing in `precision`: in bf16 each layer is packed as it is
    /// read and its f32 values released ([`LayerWeights::load_eval`]), so the f32 copy of the
    /// whole model never exists.
    pub fn load_in(
        ckpt: &Checkpoint,
        max_t: usize,
        opts: &crate::model::EvalOptions,
    ) -> Result<Model<'static>> {
        let cfg = ckpt.config.clone();
        let mut outer = Outer::load(ckpt, opts.llama_cpp_activations)?;
        if opts.precision == crate::model::Precision::Bf16 {
            outer.pack_bf16();
        }
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            layers.push(LayerWeights::load_eval(ckpt, l, opts)?);
            // the f32 copy is what is used: drop the mapped pages from the resident set
            ckpt.release_prefix(&LayerWeights::prefix(l));
        }
        Ok(Model {
            outer,
            layers: Layers::Resident(layers),
            rope: Rope::new(&cfg, max_t)?,
            config: cfg,
            opts: *opts,
        })
    }

    /// Layers loaded from `ckpt` on every forward (every layer is validated once here).
    pub fn streamed(ckpt: &'a Checkpoint, max_t: usize) -> Result<Self> {
        Self::streamed_with(ckpt, max_t, &crate::model::EvalOptions::default())
    }

    /// [`Model::streamed`] evaluated as `opts` says.
    pub fn streamed_with(
        ckpt: &'a Checkpoint,
        max_t: usize,
        opts: &crate::model::EvalOptions,
    ) -> Result<Self> {
        let cfg = ckpt.config.clone();
        let outer = Outer::load(ckpt, opts.llama_cpp_activations)?;
        for l in 0..cfg.num_layers {
            drop(LayerWeights::load(ckpt, l)?);
            ckpt.release_prefix(&LayerWeights::prefix(l));
        }
        Ok(Model {
            outer,
            layers: Layers::Streamed(ckpt),
            rope: Rope::new(&cfg, max_t)?,
            config: cfg,
            opts: crate::model::EvalOptions {
                precision: crate::model::Precision::F32,
                ..*opts
            },
        })
    }

    /// Resident when the decoder layers in the checkpoint's evaluation precision (4 bytes a
    /// weight in f32, at most 2 in bf16) take at most `resident_limit` bytes, else streamed.
    pub fn open(
        ckpt: &'a Checkpoint,
        opts: &crate::model::EvalOptions,
        max_t: usize,
        resident_limit: u64,
    ) -> Result<Self> {
        let c = &ckpt.config;
        let p = opts.precision;
        let layer_params: usize = (0..c.num_layers)
            .flat_map(|l| c.layer_tensors(l))
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum();
        let per = match p {
            crate::model::Precision::F32 => 4.0,
            crate::model::Precision::Bf16 => 2.0,
        };
        let bytes = layer_params as f64 * per;
        if bytes <= resident_limit as f64 {
            Model::load_in(ckpt, max_t, opts)
        } else {
            crate::info!(
                "evaluation streams the decoder layers ({:.1} GiB in {} > {:.1} GiB resident limit)",
                bytes / (1u64 << 30) as f64,
                p.name(),
                resident_limit as f64 / (1u64 << 30) as f64
            );
            Ok(Model::streamed_with(ckpt, max_t, opts)?.with_precision(p))
        }
    }

    /// Compute the linears (decoder layers and LM head) in `p` from now on; attention,
    /// norms and the rest stay f32.
    pub fn with_precision(mut self, p: crate::model::Precision) -> Self {
        self.opts.precision = p;
        if p == crate::model::Precision::Bf16 {
            self.outer.pack_bf16();
            if let Layers::Resident(v) = &mut self.layers {
                v.iter_mut().for_each(|l| l.pack_bf16());
            }
        }
        self
    }

    pub fn precision(&self) -> crate::model::Precision {
        self.opts.precision
    }

    /// Bytes of weight data the resident decoder layers' linears hold (None when streamed):
    /// f32 values, codes and packed forms ([`crate::model::linear::Linear::resident_bytes`]).
    pub fn resident_linear_bytes(&self) -> Option<usize> {
        match &self.layers {
            Layers::Resident(v) => Some(
                v.iter()
                    .flat_map(|l| l.linears.values())
                    .map(|l| l.resident_bytes())
                    .sum(),
            ),
            Layers::Streamed(_) => None,
        }
    }

    pub fn is_streamed(&self) -> bool {
        matches!(self.layers, Layers::Streamed(_))
    }

    /// Run decoder layer `l` on `x`.
    pub fn forward_layer(&self, l: usize, x: &Act) -> Result<Act> {
        let mut no_hook = |_: Site, _: &[f32], _: usize, _: usize| Ok(());
        match &self.layers {
            Layers::Resident(v) => {
                DecoderLayer::new(&v[l], &self.config).forward(x, &self.rope, &mut no_hook)
            }
            Layers::Streamed(ckpt) => {
                let w = LayerWeights::load_eval(ckpt, l, &self.opts)?;
                let y = DecoderLayer::new(&w, &self.config).forward(x, &self.rope, &mut no_hook);
                drop(w);
                ckpt.release_prefix(&LayerWeights::prefix(l));
                y
            }
        }
    }

    /// Hidden states after every layer (before the final norm), [b, t, hidden].
    pub fn hidden(&self, ids: &[u32], b: usize, t: usize) -> Result<Act> {
        let mut x = self.outer.embed(ids, b, t)?;
        for l in 0..self.config.num_layers {
            x = self.forward_layer(l, &x)?;
        }
        Ok(x)
    }

    /// Logits [b·t, vocab], row-major.
    pub fn logits(&self, ids: &[u32], b: usize, t: usize) -> Result<Vec<f32>> {
        let x = self.hidden(ids, b, t)?;
        Ok(self.outer.logits(&x))
    }
}
