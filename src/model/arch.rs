//! The decoder block of each supported family, described as data and built from config.json:
//! its linears with their shapes in terms of config.json, its norms, the input *sites* (one
//! distinct input each, read by one or more linears, whose statistics those linears share) and,
//! for every site, the module that produces it. From the producers follow the *mappings*
//! (producer → consumers) that scale-folding methods (AWQ, SmoothQuant) use: `x·diag(s)⁻¹`
//! folded into the producer and `diag(s)·W` into every consumer leaves the block's function
//! unchanged.
//!
//! A block is a list of parts — attention, then an MLP that is either one SwiGLU or a
//! mixture of SwiGLU experts behind a router — and a [`Site`] is an index into the block's own
//! site table, in forward order. Shape checks, the statistics sites, bit counting, every
//! forward and the per-linear report read these tables; adding a Llama-family architecture is
//! one entry in [`Block::build`] plus its test.

use super::config::{Arch, ModelConfig};
use std::collections::BTreeSet;
use std::sync::{LazyLock, Mutex, RwLock};

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
    /// `moe_intermediate_size`: one expert's width
    ExpertIntermediate,
    /// `num_experts`: the router's outputs
    Experts,
    /// `shared_expert_intermediate_size`: the shared expert's width (qwen2_moe)
    SharedIntermediate,
    /// 1: the shared expert's gate, one logit per token
    One,
}

/// A distinct linear input inside a decoder layer: an index into [`Block::sites`], in the
/// order the forward reaches them (so `a < b` means `a` is computed first).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
pub struct Site(pub u16);

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
    /// A router: it decides which experts run, so it stays dense unless a pass names it in
    /// its `targets` (llm-compressor's recipes ignore `mlp.gate` for the same reason).
    pub router: bool,
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
    /// Inside expert `e` of a mixture: its rows are the tokens the router sent there, not
    /// every token of the batch.
    pub expert: Option<usize>,
}

/// A sub-block of the decoder layer, from its normed input to its output before the residual.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The attention's norm → q/k/v → attention → o.
    Attention,
    /// The MLP's norm → gate/up → SwiGLU → down (or the router and its experts).
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
    /// The normed input (read by q/k/v) and o_proj's input.
    pub input: Site,
    pub o_in: Site,
}

/// One SwiGLU, `down(silu(gate(x)) ⊙ up(x))`: the dense MLP, or one expert of a mixture.
#[derive(Clone, Copy, Debug)]
pub struct Swiglu {
    pub gate: &'static str,
    pub up: &'static str,
    pub down: &'static str,
    /// gate/up's input site and down's.
    pub input: Site,
    pub down_in: Site,
}

/// The MLP part: its norm, then one SwiGLU or a routed mixture of them.
#[derive(Clone, Debug)]
pub struct Mlp {
    /// The RMSNorm before it.
    pub norm: &'static str,
    /// The normed input: the dense SwiGLU's gate/up read it, or the router.
    pub input: Site,
    pub ffn: Ffn,
}

#[derive(Clone, Debug)]
pub enum Ffn {
    Dense(Swiglu),
    /// A router (`[experts, hidden]`, softmax, top-k) and its experts, each reading the rows
    /// routed to it (Qwen3-MoE; the top-k weights renormalised when `norm_topk_prob`).
    Moe {
        router: &'static str,
        experts: Vec<Swiglu>,
        /// A shared expert every token runs through, scaled by sigmoid of its gate's one logit
        /// and added to the routed experts' sum (Qwen2-MoE).
        shared: Option<SharedExpert>,
    },
}

/// Qwen2-MoE's shared expert: `sigmoid(gate(x)) · swiglu(x)`.
#[derive(Clone, Copy, Debug)]
pub struct SharedExpert {
    pub swiglu: Swiglu,
    /// `[1, hidden]`: a router-like linear, dense unless a pass names it.
    pub gate: &'static str,
}

/// One family's decoder block, built from its config (see [`Block::build`]).
#[derive(Debug)]
pub struct Block {
    /// Linears in execution order.
    pub linears: Vec<LinearDesc>,
    /// RMSNorm weights and their length.
    pub norms: Vec<(&'static str, Dim)>,
    /// Sites in forward order: `sites[i].site == Site(i)`.
    pub sites: Vec<SiteDesc>,
    /// The parts, in order (each: norm, sub-block, residual add).
    pub attention: Attention,
    pub mlp: Mlp,
}

/// The module names of a block are built once and kept for the process (so they can be
/// `&'static str` like the literal ones): one copy per distinct name.
fn intern(s: String) -> &'static str {
    static NAMES: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = names.get(s.as_str()) {
        return n;
    }
    let n: &'static str = Box::leak(s.into_boxed_str());
    names.insert(n);
    n
}

use BiasRule::*;
use Dim::*;

/// The shape of a block's table: the family and, for a mixture, its shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlockKey {
    pub qk_norm: bool,
    pub moe: Option<MoeKey>,
}

/// A mixture's table shape: expert count, the checkpoint's names, a shared expert or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MoeKey {
    pub experts: usize,
    pub names: MoeNames,
    pub shared: bool,
}

/// How a family names its mixture's modules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum MoeNames {
    /// `mlp.gate`, `mlp.experts.E.{gate,up,down}_proj` (qwen2_moe, qwen3_moe).
    Qwen,
    /// `block_sparse_moe.gate`, `block_sparse_moe.experts.E.{w1,w3,w2}` (mixtral: w1 is the
    /// gate, w3 the up projection, w2 the down projection).
    Mixtral,
}

impl MoeNames {
    /// (the mixture's module prefix, names of gate, up, down inside an expert).
    fn parts(self) -> (&'static str, [&'static str; 3]) {
        match self {
            MoeNames::Qwen => ("mlp.", ["gate_proj", "up_proj", "down_proj"]),
            MoeNames::Mixtral => ("block_sparse_moe.", ["w1", "w3", "w2"]),
        }
    }
}

/// Builds a block's tables entry by entry, keeping sites and linears in forward order.
struct Builder {
    linears: Vec<LinearDesc>,
    sites: Vec<SiteDesc>,
}

impl Builder {
    fn site(
        &mut self,
        name: &str,
        producer: Producer,
        width: Dim,
        part: Part,
        parent: Parent,
        expert: Option<usize>,
    ) -> Site {
        let site = Site(self.sites.len() as u16);
        self.sites.push(SiteDesc {
            site,
            name: intern(name.to_string()),
            producer,
            width,
            part,
            parent,
            expert,
        });
        site
    }

    fn linear(&mut self, name: &'static str, site: Site, out: Dim, inp: Dim) -> &mut LinearDesc {
        self.linears.push(LinearDesc {
            name,
            site,
            out,
            inp,
            bias: Never,
            clip: true,
            router: false,
        });
        self.linears.last_mut().expect("just pushed")
    }

    /// A SwiGLU reading `input` (made by the caller), named under `prefix` (`mlp.` or
    /// `mlp.experts.3.`) with its linears called `names` (gate, up, down), `width` wide inside.
    fn swiglu(
        &mut self,
        prefix: &str,
        names: [&str; 3],
        input: Site,
        width: Dim,
        down_site: &str,
        expert: Option<usize>,
    ) -> Swiglu {
        let n = |l: &str| intern(format!("{prefix}{l}"));
        let (gate, up, down) = (n(names[0]), n(names[1]), n(names[2]));
        self.linear(gate, input, width, Hidden);
        self.linear(up, input, width, Hidden);
        let down_in = self.site(
            down_site,
            Producer::Linear(up),
            width,
            Part::Mlp,
            Parent::Linear(down),
            expert,
        );
        self.linear(down, down_in, Hidden, width);
        Swiglu {
            gate,
            up,
            down,
            input,
            down_in,
        }
    }
}

impl Block {
    /// The block for a table shape: the Llama layer (llama, mistral, qwen2: biases follow
    /// `attention_bias`), with q/k norms (qwen3), with a mixture of experts (qwen3_moe).
    pub fn build(key: BlockKey) -> Block {
        let mut b = Builder {
            linears: Vec::new(),
            sites: Vec::new(),
        };
        let (q, k, v, o) = (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
        );
        let input = b.site(
            "attn_in",
            Producer::Norm("input_layernorm"),
            Hidden,
            Part::Attention,
            Parent::Part(Part::Attention),
            None,
        );
        for (name, out) in [(q, QHeads), (k, KvHeads), (v, KvHeads)] {
            let l = b.linear(name, input, out, Hidden);
            l.bias = AttentionBias;
            l.clip = name == v;
        }
        let o_in = b.site(
            "o_in",
            Producer::Linear(v),
            QHeads,
            Part::Attention,
            Parent::Linear(o),
            None,
        );
        b.linear(o, o_in, Hidden, QHeads);
        let mlp_in = b.site(
            "mlp_in",
            Producer::Norm("post_attention_layernorm"),
            Hidden,
            Part::Mlp,
            Parent::Part(Part::Mlp),
            None,
        );
        const SWIGLU: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
        let ffn = match key.moe {
            None => Ffn::Dense(b.swiglu("mlp.", SWIGLU, mlp_in, Intermediate, "down_in", None)),
            Some(moe) => {
                let (prefix, names) = moe.names.parts();
                let router = intern(format!("{prefix}gate"));
                b.linear(router, mlp_in, Experts, Hidden).router = true;
                // the shared expert runs first (transformers' order), on every token
                let shared = moe.shared.then(|| {
                    let swiglu = b.swiglu(
                        &format!("{prefix}shared_expert."),
                        SWIGLU,
                        mlp_in,
                        SharedIntermediate,
                        "shared_down_in",
                        None,
                    );
                    let gate = intern(format!("{prefix}shared_expert_gate"));
                    b.linear(gate, mlp_in, One, Hidden).router = true;
                    SharedExpert { swiglu, gate }
                });
                let experts = (0..moe.experts)
                    .map(|e| {
                        let x = b.site(
                            &format!("expert{e}_in"),
                            Producer::Norm("post_attention_layernorm"),
                            Hidden,
                            Part::Mlp,
                            Parent::Part(Part::Mlp),
                            Some(e),
                        );
                        b.swiglu(
                            &format!("{prefix}experts.{e}."),
                            names,
                            x,
                            ExpertIntermediate,
                            &format!("expert{e}_down_in"),
                            Some(e),
                        )
                    })
                    .collect();
                Ffn::Moe {
                    router,
                    experts,
                    shared,
                }
            }
        };
        let mut norms = vec![
            ("input_layernorm", Hidden),
            ("post_attention_layernorm", Hidden),
        ];
        let qk_norm = key
            .qk_norm
            .then_some(("self_attn.q_norm", "self_attn.k_norm"));
        if let Some((qn, kn)) = qk_norm {
            norms.extend([(qn, HeadDim), (kn, HeadDim)]);
        }
        Block {
            linears: b.linears,
            norms,
            sites: b.sites,
            attention: Attention {
                norm: "input_layernorm",
                q,
                k,
                v,
                o,
                qk_norm,
                input,
                o_in,
            },
            mlp: Mlp {
                norm: "post_attention_layernorm",
                input: mlp_in,
                ffn,
            },
        }
    }

    /// The block of `key`, built once per process (blocks are small and few).
    pub fn of(key: BlockKey) -> &'static Block {
        static BLOCKS: RwLock<Vec<(BlockKey, &'static Block)>> = RwLock::new(Vec::new());
        let found = |blocks: &[(BlockKey, &'static Block)]| {
            blocks.iter().find(|(k, _)| *k == key).map(|(_, b)| *b)
        };
        if let Some(b) = found(&BLOCKS.read().unwrap_or_else(|e| e.into_inner())) {
            return b;
        }
        let mut blocks = BLOCKS.write().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = found(&blocks) {
            return b;
        }
        let b: &'static Block = Box::leak(Box::new(Block::build(key)));
        blocks.push((key, b));
        b
    }

    /// The dense SwiGLU, when the MLP is not a mixture.
    pub fn dense_mlp(&self) -> Option<&Swiglu> {
        match &self.mlp.ffn {
            Ffn::Dense(s) => Some(s),
            Ffn::Moe { .. } => None,
        }
    }

    pub fn is_moe(&self) -> bool {
        matches!(self.mlp.ffn, Ffn::Moe { .. })
    }
}

/// llama, mistral and qwen2 (mistral's sliding window is not used by the checkpoints we
/// accept; qwen2's q/k/v biases follow `attention_bias`, which config.rs turns on).
pub static LLAMA: LazyLock<&'static Block> = LazyLock::new(|| {
    Block::of(BlockKey {
        qk_norm: false,
        moe: None,
    })
});

/// qwen3: the Llama block with per-head RMSNorm on queries and keys (before RoPE).
pub static QWEN3: LazyLock<&'static Block> = LazyLock::new(|| {
    Block::of(BlockKey {
        qk_norm: true,
        moe: None,
    })
});

impl Arch {
    /// Whether the family has per-head q/k norms.
    pub fn qk_norm(&self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Qwen3Moe)
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
        match part {
            Part::Attention => self.attention.input,
            Part::Mlp => self.mlp.input,
        }
    }

    pub fn site(&self, site: Site) -> &SiteDesc {
        &self.sites[site.0 as usize]
    }

    /// The width of what a forward keeps to continue from `site` (see `model::llama::Inner`):
    /// the site's own input, except inside a mixture (its experts, its shared expert), where it
    /// is the MLP's normed input (every expert after the site still needs its rows).
    pub fn kept_width(&self, site: Site) -> Dim {
        let d = self.site(site);
        match d.part {
            Part::Mlp if self.is_moe() => Hidden,
            _ => d.width,
        }
    }

    /// Producer → consumers of every site, with whether folding is exact for `cfg`. In a
    /// mixture the MLP's norm feeds the router and every expert: one mapping, whose
    /// consumers are all of them.
    pub fn mappings(&self, cfg: &ModelConfig) -> Vec<Mapping> {
        self.sites
            .iter()
            .filter(|s| !(s.expert.is_some() && matches!(s.producer, Producer::Norm(_))))
            .map(|s| {
                let consumers: Vec<&'static str> = match (&self.mlp.ffn, s.site) {
                    (
                        Ffn::Moe {
                            router,
                            experts,
                            shared,
                        },
                        site,
                    ) if site == self.mlp.input => std::iter::once(*router)
                        .chain(
                            shared
                                .iter()
                                .flat_map(|s| [s.swiglu.gate, s.swiglu.up, s.gate]),
                        )
                        .chain(experts.iter().flat_map(|e| [e.gate, e.up]))
                        .collect(),
                    _ => self.readers(s.site).collect(),
                };
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
            ExpertIntermediate => self.moe.map_or(0, |m| m.intermediate),
            Experts => self.moe.map_or(0, |m| m.experts),
            SharedIntermediate => self.moe.and_then(|m| m.shared).unwrap_or(0),
            One => 1,
        }
    }

    /// This model's block table.
    pub fn block(&self) -> &'static Block {
        Block::of(BlockKey {
            qk_norm: self.qk_norm,
            moe: self.moe.map(|m| MoeKey {
                experts: m.experts,
                names: match self.arch {
                    Arch::Mixtral => MoeNames::Mixtral,
                    _ => MoeNames::Qwen,
                },
                shared: m.shared.is_some(),
            }),
        })
    }

    /// The dense SwiGLU of this model's block, or an error saying that `who` (a part of the
    /// tool that runs dense MLPs only) cannot run this model's mixture of experts.
    pub fn dense_mlp(&self, who: &str) -> anyhow::Result<&'static Swiglu> {
        self.block().dense_mlp().ok_or_else(|| {
            anyhow::anyhow!(
                "{who} runs dense MLPs only, not the mixture of experts of `{}`",
                self.arch.name()
            )
        })
    }

    /// Whether `l` carries a bias in this model.
    pub fn has_bias(&self, l: &LinearDesc) -> bool {
        match l.bias {
            BiasRule::Never => false,
            BiasRule::AttentionBias => self.attention_bias,
        }
    }
}
