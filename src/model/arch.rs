//! The decoder block of each supported family, described as data: its linears with their
//! shapes in terms of config.json, its norms, the input *sites* (one distinct input each, read
//! by one or more linears, whose statistics those linears share) and, for every site, the module
//! that produces it. From the producers follow the *mappings* (producer → consumers) that
//! scale-folding methods (AWQ, SmoothQuant) use: `x·diag(s)⁻¹` folded into the producer and
//! `diag(s)·W` into every consumer leaves the block's function unchanged.
//!
//! Shape checks, the statistics sites, bit counting and the per-linear report read these
//! tables; adding a Llama-family architecture is one [`Block`] entry plus its test.

use super::config::{Arch, ModelConfig};

/// A dimension of a block tensor, in config.json's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dim {
    /// `hidden_size`
    Hidden,
    /// `intermediate_size`
    Intermediate,
    /// `num_attention_heads × head_dim`
    QHeads,
    /// `num_key_value_heads × head_dim`
    KvHeads,
    /// `head_dim`
    HeadDim,
}

/// A distinct linear input inside a decoder layer.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
pub enum Site {
    /// input_layernorm(x): read by q/k/v.
    AttnIn,
    /// the attention's per-head outputs, concatenated: read by o_proj.
    OIn,
    /// post_attention_layernorm(h): read by gate/up.
    MlpIn,
    /// silu(gate) ⊙ up: read by down_proj.
    DownIn,
}

/// What produces a site's values, and so where a per-channel scale can be folded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Producer {
    /// An RMSNorm weight (`input_layernorm`, …): scale its weight.
    Norm(&'static str),
    /// A linear's output rows reach the site unchanged up to a per-channel map (v_proj's rows
    /// through attention's weighted sums, up_proj's rows through the elementwise product with
    /// silu(gate)): scale those rows.
    Linear(&'static str),
}

#[derive(Clone, Copy, Debug)]
pub struct LinearDesc {
    /// Name inside the layer (`self_attn.q_proj`).
    pub name: &'static str,
    pub site: Site,
    /// `[out, in]` of the weight.
    pub out: Dim,
    pub inp: Dim,
    /// Whether the weight has a bias for this architecture (given `attention_bias`).
    pub bias: BiasRule,
    /// Whether a clipping search may shrink its range: not for q and k, whose outputs meet
    /// only inside the attention scores (AutoAWQ and llm-compressor skip them).
    pub clip: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BiasRule {
    Never,
    /// When config.json's `attention_bias` is true (Qwen2: always).
    AttentionBias,
}

#[derive(Clone, Copy, Debug)]
pub struct SiteDesc {
    pub site: Site,
    pub name: &'static str,
    pub producer: Producer,
    /// Its width (columns of the rows the readers see).
    pub width: Dim,
    /// The part it is inside: sites after the first part also carry the residual stream.
    pub part: Part,
    /// The module whose output a scale search at this site compares (AWQ's loss, the
    /// mapping's *parent* in llm-compressor's terms): the whole sub-block when the site feeds
    /// several linears through a nonlinearity, the one reader otherwise.
    pub parent: Parent,
}

/// A sub-block of the decoder layer, from its normed input to its output before the residual.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The attention's norm → q/k/v → attention → o.
    Attention,
    /// The MLP's norm → gate/up → SwiGLU → down.
    Mlp,
}

/// Where a mapping's effect is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parent {
    Part(Part),
    Linear(&'static str),
}

/// Self-attention with RoPE and grouped-query heads: the module names it reads.
#[derive(Clone, Copy, Debug)]
pub struct Attention {
    /// The RMSNorm before it.
    pub norm: &'static str,
    pub q: &'static str,
    pub k: &'static str,
    pub v: &'static str,
    pub o: &'static str,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3), when the family has it.
    pub qk_norm: Option<(&'static str, &'static str)>,
}

/// The SwiGLU MLP, `down(silu(gate(x)) ⊙ up(x))`: the module names it reads.
#[derive(Clone, Copy, Debug)]
pub struct Mlp {
    /// The RMSNorm before it.
    pub norm: &'static str,
    pub gate: &'static str,
    pub up: &'static str,
    pub down: &'static str,
}

/// One family's decoder block.
#[derive(Debug)]
pub struct Block {
    /// Linears in execution order.
    pub linears: &'static [LinearDesc],
    /// RMSNorm weights and their length.
    pub norms: &'static [(&'static str, Dim)],
    pub sites: &'static [SiteDesc],
    /// The parts, in order (each: norm, sub-block, residual add).
    pub attention: Attention,
    pub mlp: Mlp,
}

const fn lin(name: &'static str, site: Site, out: Dim, inp: Dim, bias: BiasRule) -> LinearDesc {
    LinearDesc {
        name,
        site,
        out,
        inp,
        bias,
        clip: true,
    }
}

const fn no_clip(l: LinearDesc) -> LinearDesc {
    LinearDesc { clip: false, ..l }
}

use BiasRule::*;
use Dim::*;

/// The seven linears shared by every Llama-family block.
const LLAMA_LINEARS: [LinearDesc; 7] = [
    no_clip(lin(
        "self_attn.q_proj",
        Site::AttnIn,
        QHeads,
        Hidden,
        AttentionBias,
    )),
    no_clip(lin(
        "self_attn.k_proj",
        Site::AttnIn,
        KvHeads,
        Hidden,
        AttentionBias,
    )),
    lin(
        "self_attn.v_proj",
        Site::AttnIn,
        KvHeads,
        Hidden,
        AttentionBias,
    ),
    lin("self_attn.o_proj", Site::OIn, Hidden, QHeads, Never),
    lin("mlp.gate_proj", Site::MlpIn, Intermediate, Hidden, Never),
    lin("mlp.up_proj", Site::MlpIn, Intermediate, Hidden, Never),
    lin("mlp.down_proj", Site::DownIn, Hidden, Intermediate, Never),
];

const LLAMA_SITES: [SiteDesc; 4] = [
    SiteDesc {
        site: Site::AttnIn,
        name: "attn_in",
        producer: Producer::Norm("input_layernorm"),
        width: Hidden,
        part: Part::Attention,
        parent: Parent::Part(Part::Attention),
    },
    SiteDesc {
        site: Site::OIn,
        name: "o_in",
        producer: Producer::Linear("self_attn.v_proj"),
        width: QHeads,
        part: Part::Attention,
        parent: Parent::Linear("self_attn.o_proj"),
    },
    SiteDesc {
        site: Site::MlpIn,
        name: "mlp_in",
        producer: Producer::Norm("post_attention_layernorm"),
        width: Hidden,
        part: Part::Mlp,
        parent: Parent::Part(Part::Mlp),
    },
    SiteDesc {
        site: Site::DownIn,
        name: "down_in",
        producer: Producer::Linear("mlp.up_proj"),
        width: Intermediate,
        part: Part::Mlp,
        parent: Parent::Linear("mlp.down_proj"),
    },
];

/// llama and mistral (mistral's sliding window is not used by the checkpoints we accept).
pub static LLAMA: Block = Block {
    linears: &LLAMA_LINEARS,
    norms: &[
        ("input_layernorm", Hidden),
        ("post_attention_layernorm", Hidden),
    ],
    sites: &LLAMA_SITES,
    attention: LLAMA_ATTENTION,
    mlp: LLAMA_MLP,
};

const LLAMA_ATTENTION: Attention = Attention {
    norm: "input_layernorm",
    q: "self_attn.q_proj",
    k: "self_attn.k_proj",
    v: "self_attn.v_proj",
    o: "self_attn.o_proj",
    qk_norm: None,
};

const LLAMA_MLP: Mlp = Mlp {
    norm: "post_attention_layernorm",
    gate: "mlp.gate_proj",
    up: "mlp.up_proj",
    down: "mlp.down_proj",
};

/// qwen3: the Llama block with per-head RMSNorm on queries and keys (before RoPE).
pub static QWEN3: Block = Block {
    linears: &LLAMA_LINEARS,
    norms: &[
        ("input_layernorm", Hidden),
        ("post_attention_layernorm", Hidden),
        ("self_attn.q_norm", HeadDim),
        ("self_attn.k_norm", HeadDim),
    ],
    sites: &LLAMA_SITES,
    attention: Attention {
        qk_norm: Some(("self_attn.q_norm", "self_attn.k_norm")),
        ..LLAMA_ATTENTION
    },
    mlp: LLAMA_MLP,
};

impl Arch {
    /// This family's block description.
    pub fn block(&self) -> &'static Block {
        match self {
            // qwen2 is the Llama block with q/k/v biases, which config.rs turns on
            // (`attention_bias`, hard-coded in transformers' Qwen2Attention)
            Arch::Llama | Arch::Mistral | Arch::Qwen2 => &LLAMA,
            Arch::Qwen3 => &QWEN3,
        }
    }
}

/// A producer and the linears that consume its output: where a scale can be folded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub site: Site,
    pub producer: Producer,
    /// Where the mapping's effect is measured.
    pub parent: Parent,
    pub consumers: Vec<&'static str>,
    /// Whether folding is exact for this model's shapes: v_proj → o_proj only when v's
    /// outputs are o_proj's inputs one to one (no grouped-query sharing), as AutoAWQ and
    /// llm-compressor require.
    pub foldable: bool,
}

impl Block {
    pub fn linear(&self, name: &str) -> Option<&LinearDesc> {
        self.linears.iter().find(|l| l.name == name)
    }

    /// The linears that read `site`, in execution order.
    pub fn readers(&self, site: Site) -> impl Iterator<Item = &'static str> + '_ {
        self.linears
            .iter()
            .filter(move |l| l.site == site)
            .map(|l| l.name)
    }

    /// The linears' names, in execution order.
    pub fn linear_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.linears.iter().map(|l| l.name)
    }

    /// The input site `linear` reads (None for a name outside this block).
    pub fn site_of(&self, linear: &str) -> Option<Site> {
        self.linear(linear).map(|l| l.site)
    }

    /// The site a part reads: the output of its norm.
    pub fn part_input(&self, part: Part) -> Site {
        self.sites
            .iter()
            .find(|s| s.parent == Parent::Part(part))
            .map(|s| s.site)
            .expect("every part of a block has an input site")
    }

    pub fn site(&self, site: Site) -> &SiteDesc {
        self.sites
            .iter()
            .find(|s| s.site == site)
            .expect("every site of a block has a description")
    }

    /// Producer → consumers of every site, with whether folding is exact for `cfg`.
    pub fn mappings(&self, cfg: &ModelConfig) -> Vec<Mapping> {
        self.sites
            .iter()
            .map(|s| {
                let consumers: Vec<&'static str> = self.readers(s.site).collect();
                let foldable = match s.producer {
                    Producer::Norm(_) => true,
                    Producer::Linear(p) => {
                        let out = self.linear(p).map(|l| cfg.dim(l.out));
                        consumers
                            .iter()
                            .filter_map(|c| self.linear(c))
                            .all(|c| Some(cfg.dim(c.inp)) == out)
                    }
                };
                Mapping {
                    site: s.site,
                    producer: s.producer,
                    parent: s.parent,
                    consumers,
                    foldable,
                }
            })
            .collect()
    }
}

impl ModelConfig {
    /// The size of `d` for this model.
    pub fn dim(&self, d: Dim) -> usize {
        match d {
            Hidden => self.hidden_size,
            Intermediate => self.intermediate_size,
            QHeads => self.num_heads * self.head_dim,
            KvHeads => self.num_kv_heads * self.head_dim,
            HeadDim => self.head_dim,
        }
    }

    pub fn block(&self) -> &'static Block {
        self.arch.block()
    }

    /// Whether `l` carries a bias in this model.
    pub fn has_bias(&self, l: &LinearDesc) -> bool {
        match l.bias {
            BiasRule::Never => false,
            BiasRule::AttentionBias => self.attention_bias,
        }
    }
}
