//! Compression passes: one file per method, each reading like its paper. This module holds
//! the pipeline syntax of each pass (`- gptq: {bits: 4, ...}`) and builds the pass objects.

pub mod awq;
pub mod budget;
pub mod eora;
pub mod gptq;
pub mod gptq_ggml;
pub mod harness;
pub mod imatrix;
pub mod kd;
pub mod magnitude;
pub mod owl;
pub mod prune;
pub mod rtn;
pub mod select;
pub mod smoothquant;
pub mod sparsegpt;
pub mod svd;
pub mod svd_llm;
pub mod sweep;
pub mod wanda;

use crate::engine::Pass;
use crate::quant::{Observer, QuantArgs, Strategy};
use anyhow::{bail, ensure, Context, Result};
pub(crate) use harness::{hessian_or_identity, input_site, linear_hessian};
use serde::{Deserialize, Serialize};

/// Every method once: its YAML key, its spec (the pass's own file defines the fields and their
/// `validate`), whether it reads calibration data, and the pass it builds. Adding a method is
/// one line here and its file.
macro_rules! methods {
    ($(
        $(#[$doc:meta])*
        $variant:ident($spec:ty) = $key:literal, calibration: $cal:expr, build: $build:expr;
    )*) => {
        /// One entry of `passes:` in the pipeline YAML.
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub enum PassSpec {
            $( $(#[$doc])* #[serde(rename = $key)] $variant($spec), )*
        }

        impl PassSpec {
            pub fn name(&self) -> &'static str {
                match self {
                    $( PassSpec::$variant(_) => $key, )*
                }
            }

            /// The spec's own field checks.
            pub fn validate(&self) -> Result<()> {
                match self {
                    $( PassSpec::$variant(s) => s.validate(), )*
                }
            }

            /// Whether the pass needs the calibration set (statistics, or a whole-model scan).
            pub fn needs_calibration(&self) -> bool {
                match self {
                    $( PassSpec::$variant(s) => {
                        let f: fn(&$spec) -> bool = $cal;
                        f(s)
                    } )*
                }
            }

            pub fn build(&self) -> Result<Box<dyn Pass>> {
                Ok(match self {
                    $( PassSpec::$variant(s) => {
                        let f: fn(&$spec) -> Result<Box<dyn Pass>> = $build;
                        f(s)?
                    } )*
                })
            }
        }
    };
}

/// `calibration:` of a method that always reads calibration statistics.
fn always<T>(_: &T) -> bool {
    true
}

/// `calibration:` of a data-free method.
fn never<T>(_: &T) -> bool {
    false
}

/// `build:` of a pass constructed from its spec by `new`.
macro_rules! boxed {
    ($new:path) => {
        |s| Ok(Box::new($new(s)?))
    };
}

methods! {
    /// Round-to-nearest weight quantization (no calibration).
    Rtn(rtn::RtnSpec) = "rtn", calibration: never, build: boxed!(rtn::Rtn::new);
    /// Importance matrix (mean x² per input column) for the GGUF exporter's weighted rounding.
    Imatrix(imatrix::ImatrixSpec) = "imatrix", calibration: always,
        build: |_| Ok(Box::new(imatrix::Imatrix));
    /// GPTQ (Frantar et al. 2022).
    Gptq(gptq::GptqSpec) = "gptq", calibration: always, build: boxed!(gptq::Gptq::new);
    /// GPTQ onto the ggml block types of a GGUF export (llama.cpp's grids).
    GptqGgml(gptq_ggml::GptqGgmlSpec) = "gptq_ggml", calibration: always,
        build: boxed!(gptq_ggml::GptqGgml::new);
    /// AWQ scale (and clip) search (Lin et al. 2024); a quantizer follows it.
    Awq(awq::AwqSpec) = "awq", calibration: always, build: boxed!(awq::Awq::new);
    /// SmoothQuant scale migration (Xiao et al. 2023); a W8A8 quantizer follows it.
    SmoothQuant(smoothquant::SmoothQuantSpec) = "smoothquant", calibration: always,
        build: boxed!(smoothquant::SmoothQuant::new);
    /// Magnitude pruning (calibration only for OWL's outlier scan).
    Magnitude(prune::PruneSpec) = "magnitude",
        calibration: |s| s.allocation == prune::Allocation::Owl,
        build: boxed!(magnitude::Magnitude::new);
    /// Wanda pruning (Sun et al. 2024).
    Wanda(prune::PruneSpec) = "wanda", calibration: always, build: boxed!(wanda::Wanda::new);
    /// SparseGPT pruning, optionally joint with quantization (Frantar & Alistarh 2023).
    SparseGpt(sparsegpt::SparseGptSpec) = "sparsegpt", calibration: always,
        build: boxed!(sparsegpt::SparseGpt::new);
    /// Truncated SVD into two factors (no calibration).
    Svd(svd::SvdSpec) = "svd", calibration: never, build: boxed!(svd::Svd::new);
    /// SVD-LLM, truncation-aware whitened SVD (Wang et al. 2025).
    SvdLlm(svd_llm::SvdLlmSpec) = "svd_llm", calibration: always,
        build: boxed!(svd_llm::SvdLlm::new);
    /// Block-wise distillation of the compressed layer onto the dense one (after the
    /// compressing passes): tunes norms, scales, zero points, factors, biases with Adam.
    Kd(kd::KdSpec) = "kd", calibration: always, build: boxed!(kd::Kd::new);
    /// One size budget: per linear, the candidate grid that buys the most for its bytes
    /// (a scan, a multiple-choice knapsack, then GPTQ onto the chosen grids).
    Budget(budget::BudgetSpec) = "budget", calibration: always, build: boxed!(budget::Budget::new);
    /// EoRA compensation adapter for the error of the pass before it (Liu et al. 2024).
    Eora(eora::EoraSpec) = "eora", calibration: always, build: boxed!(eora::Eora::new);
}

impl PassSpec {
    /// The whole-model phase, before the layer stream: a pass that must see every layer before
    /// the first one changes does it here (OWL's outlier scan sets a pruning pass's per-layer
    /// sparsities; a budget's scan and knapsack set each linear's treatment). `cached` is what
    /// a resumed run's state recorded; the result is what the resume state keeps. `cost`: the
    /// stored bytes of a linear under a grid in the export format.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        &mut self,
        at: &str,
        ckpt: &crate::model::Checkpoint,
        windows: &[Vec<u32>],
        opts: &crate::engine::StreamOptions,
        cached: Option<&serde_json::Value>,
        cost: budget::ByteCost,
    ) -> Result<Option<serde_json::Value>> {
        if let PassSpec::Budget(b) = self {
            let a = budget::prepare(b, at, ckpt, windows, opts, cached, cost)?;
            return Ok(Some(serde_json::to_value(a)?));
        }
        match self.prune_spec_mut() {
            Some(ps) if ps.allocation == prune::Allocation::Owl => {
                let cached: Option<Vec<(f64, f64)>> =
                    cached.and_then(|v| serde_json::from_value(v.clone()).ok());
                let a = owl::prepare(ps, at, ckpt, windows, opts, cached.as_ref())?;
                Ok(Some(serde_json::to_value(a)?))
            }
            _ => Ok(None),
        }
    }

    /// Bind the pass to the pipeline's GGUF exports (mix, overrides), before validation:
    /// `gptq_ggml` sweeps onto the grid the GGUF export writes.
    pub fn bind_gguf_exports(&mut self, exports: &[gptq_ggml::GgufExport]) -> Result<()> {
        match self {
            PassSpec::GptqGgml(g) => g.bind_exports(exports),
            _ => Ok(()),
        }
    }

    /// The pruning fields of a pruning pass (magnitude, Wanda, SparseGPT).
    pub fn prune_spec_mut(&mut self) -> Option<&mut prune::PruneSpec> {
        match self {
            PassSpec::Magnitude(s) | PassSpec::Wanda(s) => Some(s),
            PassSpec::SparseGpt(s) => Some(&mut s.prune),
            _ => None,
        }
    }
}

/// Checks across passes: AWQ only rescales, so a quantizer must follow it on the grid its search
/// assumed (`bits`, `group_size`, `sym`).
pub fn check_sequence(passes: &[PassSpec]) -> Result<()> {
    // EoRA compensates the error of the pass right before it, and nothing may change a linear
    // after its adapter is fitted
    for (i, p) in passes.iter().enumerate() {
        if !matches!(p, PassSpec::Eora(_)) {
            continue;
        }
        match i.checked_sub(1).map(|j| &passes[j]) {
            None | Some(PassSpec::Eora(_)) => bail!(
                "passes[{i}] eora: compensates the error of the pass before it; put it right after a quantizing or pruning pass"
            ),
            Some(PassSpec::Svd(_) | PassSpec::SvdLlm(_)) => bail!(
                "passes[{i}] eora: a factored linear takes no adapter (raise the svd rank instead)"
            ),
            _ => {}
        }
        if let Some(q) = passes[i + 1..]
            .iter()
            .find(|q| !matches!(q, PassSpec::Imatrix(_)))
        {
            bail!(
                "passes[{i}] eora: the adapter must come last, but `{}` follows it",
                q.name()
            );
        }
    }
    for (i, p) in passes.iter().enumerate() {
        let PassSpec::Awq(a) = p else { continue };
        let next = passes[i + 1..].iter().find_map(|q| match q {
            PassSpec::Rtn(r) => Some(r.scheme.args()),
            PassSpec::Gptq(g) => Some(g.scheme().args()),
            _ => None,
        });
        let Some(next) = next else {
            bail!(
                "passes[{i}] awq: only rescales weights; put `rtn` or `gptq` after it to quantize"
            );
        };
        let (n, want) = (next?, a.args()?);
        if (n.float.is_some() || want.float.is_some())
            && (n.num(), n.strategy, n.group_size, n.scale_type, n.block)
                != (
                    want.num(),
                    want.strategy,
                    want.group_size,
                    want.scale_type,
                    want.block,
                )
        {
            bail!(
                "passes[{i}] awq: searched for {:?} ({:?}), but the quantizer after it uses {:?} ({:?}): give both the same `scheme`",
                want.num(), want.strategy, n.num(), n.strategy
            );
        }
        if (n.bits, n.group_width(1 << 20), n.symmetric)
            != (want.bits, want.group_width(1 << 20), want.symmetric)
        {
            bail!(
                "passes[{i}] awq: searched for {} bits, group {}, sym {}, but the quantizer after it uses {} bits, group {}, sym {}",
                want.bits, want.group_size, want.symmetric, n.bits, n.group_size, n.symmetric
            );
        }
    }
    Ok(())
}

/// The weight quantization scheme shared by RTN and GPTQ (compressed-tensors vocabulary).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scheme {
    /// A named scheme (`FP8_DYNAMIC`, `NVFP4A16`, `MXFP4A16`, `W4A16`, … as compressed-tensors
    /// names them, see `quant/presets.rs`): its weight and activation quantizers replace the
    /// fields below, which must then keep their defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default = "default_bits")]
    pub bits: u32,
    /// `group` (default), `channel` or `tensor`.
    #[serde(default = "default_strategy")]
    pub strategy: Strategy,
    /// Input columns per group (strategy `group`); -1 means per channel.
    #[serde(default = "default_group")]
    pub group_size: i64,
    #[serde(default = "default_true")]
    pub sym: bool,
    /// `minmax` (default) or `mse` (clip search).
    #[serde(default = "default_observer")]
    pub observer: Observer,
    /// Which linears: `re:<regex>` matched against the module name, `Linear` for all, or a
    /// name suffix such as `mlp.down_proj`.
    #[serde(default = "default_targets")]
    pub targets: Vec<String>,
    /// Linears to leave alone (same syntax). `lm_head` is never inside a decoder layer.
    #[serde(default = "default_ignore")]
    pub ignore: Vec<String>,
    /// Quantize the inputs of the quantized linears too, dynamically per token (symmetric):
    /// `8` with 8-bit per-channel weights is W8A8 (compressed-tensors `int-quantized`). The
    /// calibration forward and evaluation run the quantized activations.
    #[serde(default)]
    pub act_bits: Option<u32>,
}

pub(crate) fn default_bits() -> u32 {
    4
}
pub(crate) fn default_strategy() -> Strategy {
    Strategy::Group
}
pub(crate) fn default_group() -> i64 {
    128
}
pub(crate) fn default_true() -> bool {
    true
}
pub(crate) fn default_observer() -> Observer {
    Observer::MinMax
}
pub(crate) fn default_targets() -> Vec<String> {
    vec!["Linear".into()]
}
pub(crate) fn default_ignore() -> Vec<String> {
    vec!["lm_head".into()]
}

/// NVFP4's global scales of `linears`: one per input site, from the largest magnitude of all
/// the linears reading it, because serving engines fuse those (q/k/v, gate/up) into one matmul
/// with one global scale (llm-compressor's fused observers do the same).
pub(crate) fn fused_global_scales(
    ctx: &crate::engine::LayerCtx,
    linears: &[&str],
) -> Result<std::collections::BTreeMap<String, f32>> {
    let mut by_site: std::collections::BTreeMap<
        crate::model::layer::Site,
        (f32, crate::safetensors_file::DType),
    > = Default::default();
    let mut site_of = Vec::new();
    for &name in linears {
        let site = input_site(ctx, name)?;
        let lin = &ctx.layer.linears[name];
        let a = crate::quant::float::amax(lin.weight().iter().copied());
        let e = by_site
            .entry(site)
            .or_insert((0.0, crate::quant::scale_dtype_for(lin.dtype)));
        e.0 = e.0.max(a);
        site_of.push((name, site));
    }
    Ok(site_of
        .into_iter()
        .map(|(name, site)| {
            let (a, dtype) = by_site[&site];
            (
                name.to_string(),
                crate::quant::float::global_scale(a, dtype),
            )
        })
        .collect())
}

impl Scheme {
    /// The named scheme, refusing a name we do not implement and fields that would be ignored.
    fn preset(&self) -> Result<Option<crate::quant::presets::Preset>> {
        let Some(name) = &self.scheme else {
            return Ok(None);
        };
        let p = crate::quant::presets::preset(name).with_context(|| {
            format!(
                "field `scheme`: unknown scheme `{name}` (known: {}; FP8 and NVFP4 need calibrated static activation scales and are not implemented)",
                crate::quant::presets::names().join(", ")
            )
        })?;
        let defaults = self.bits == default_bits()
            && self.strategy == default_strategy()
            && self.group_size == default_group()
            && self.sym
            && self.observer == default_observer()
            && self.act_bits.is_none();
        ensure!(
            defaults,
            "field `scheme: {name}` sets the quantization; remove `bits`, `strategy`, `group_size`, `sym`, `observer` and `act_bits` (or spell the scheme out with them instead)"
        );
        Ok(Some(p))
    }

    pub fn args(&self) -> Result<QuantArgs> {
        if let Some(p) = self.preset()? {
            p.weights.validate()?;
            return Ok(p.weights);
        }
        let strategy = if self.group_size == -1 && self.strategy == Strategy::Group {
            Strategy::Channel
        } else {
            self.strategy
        };
        if strategy == Strategy::Group && self.group_size <= 0 {
            bail!(
                "field `group_size` must be positive (or -1 for per channel), found {}",
                self.group_size
            );
        }
        if !(2..=8).contains(&self.bits) {
            bail!("field `bits` must be between 2 and 8, found {}", self.bits);
        }
        Ok(QuantArgs::int(
            self.bits,
            self.sym,
            strategy,
            self.group_size.max(0) as usize,
            self.observer,
        ))
    }

    /// The activation quantizer, if any (only 8-bit per-token is supported).
    pub fn act_quant(&self) -> Result<Option<crate::model::layer::ActQuant>> {
        if let Some(p) = self.preset()? {
            return p
                .input
                .as_ref()
                .map(crate::model::layer::ActQuant::from_args)
                .transpose();
        }
        match self.act_bits {
            None => Ok(None),
            Some(8) => Ok(Some(crate::model::layer::ActQuant::per_token(8))),
            Some(b) => bail!("field `act_bits` must be 8 (dynamic per-token int8), found {b}"),
        }
    }

    pub fn selector(&self) -> Result<select::Selector> {
        select::Selector::new(&self.targets, &self.ignore)
    }
}
