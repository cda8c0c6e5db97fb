//! One size budget for the decoder linears: each linear gets the treatment, among a list of
//! candidates, that spends the bytes where they buy the most (issue #40).
//!
//! A uniform scheme spends the same bits on every linear, but linears differ in how much a
//! coarser grid costs the model. Given candidates c (grids with their exact stored bytes
//! B_i(c) in the export format, scales and zero points included) and a target of B bytes for
//! the decoder linears, the budget
//!
//! 1. **measures** each linear's damage under each candidate on the dense model's calibration
//!    inputs (a scan, before anything changes): GPTQ onto the candidate's grid and its output
//!    error summed over the calibration tokens,
//!
//!    ```text
//!      D_i(c) = Σ_t ‖(W_i − Ŵ_i(c)) x_t‖² = (n/2) · tr(ΔW H ΔWᵀ),   H = 2/n · XᵀX
//!    ```
//!
//!    (the quantity GPTQ minimises, eq. 1 of Frantar et al.; summing over tokens counts an
//!    expert of a mixture by the tokens routed to it);
//!    and its relative form ‖ΔW X‖² / ‖W X‖² (every linear weighing alike), which the
//!    knapsack minimises by default (`sensitivity:`; measured better, BENCHMARKS.md);
//! 2. **allocates** by the multiple-choice knapsack min Σ_i D_i(c_i) s.t. Σ_i B_i(c_i) ≤ B
//!    ([`knapsack`], exact dynamic programming over bytes);
//! 3. **applies** the chosen treatment per linear in the ordinary streaming run (GPTQ onto the
//!    chosen grid, on the inputs of the already-compressed layers before it).
//!
//! Linears the budget does not select (`ignore`, routers) count at their stored dense size;
//! the target in bits per weight is over all the decoder linears, as the report counts them.

mod kl;
pub mod knapsack;

use super::gptq::{Gptq, GptqSpec};
use super::harness::{Done, PerLinear, Schedule};
use super::select::Selector;
use crate::engine::stats::StatsRequest;
use crate::engine::{LayerCtx, Pass};
use crate::formats::Order;
use crate::quant::{Observer, QuantArgs, Strategy};
use crate::safetensors_file::DType;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSpec {
    /// Target size of the decoder linears in stored bits per weight (codes, scales, zero
    /// points: what the report's `bits_per_weight` counts).
    #[serde(default)]
    pub bits_per_weight: Option<f64>,
    /// Or the target in bytes.
    #[serde(default)]
    pub bytes: Option<u64>,
    /// The treatments each linear may get: weight grids as `gptq`'s fields spell them
    /// (`{bits: 3, group_size: 128}`, `{bits: 8, strategy: channel}`, `{scheme: W4A16}`).
    pub candidates: Vec<Candidate>,
    /// Which linears the budget allocates (the others stay dense and count at their size).
    #[serde(default = "super::default_targets")]
    pub targets: Vec<String>,
    #[serde(default = "super::default_ignore")]
    pub ignore: Vec<String>,
    /// GPTQ's dampening for every candidate.
    #[serde(default = "d_damp")]
    pub damp: f64,
    /// The damage the knapsack minimises: `relative` (‖ΔW X‖² / ‖W X‖², every linear
    /// weighing alike; default) or `output_error` (Σ_t ‖ΔW x_t‖²).
    #[serde(default)]
    pub sensitivity: Sensitivity,
    /// With `sensitivity: kl`: calibration tokens the end-to-end KL is measured on (the first
    /// windows holding at least this many).
    #[serde(default = "d_kl_tokens")]
    pub kl_tokens: usize,
    /// The allocation, once the scan has run (see [`prepare`]).
    #[serde(skip)]
    pub allocation: Option<Allocation>,
}

/// How a candidate's damage to a linear is measured on the calibration inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sensitivity {
    /// D_i(c) = Σ_t ‖(W_i − Ŵ_i(c)) x_t‖²: the output error in the model's own units, so a
    /// linear whose outputs are large (or that sees many tokens) weighs more. Measured worse
    /// than `relative` (BENCHMARKS.md, "Size budget"): on SmolLM2-135M at 3.0 bits per weight
    /// it put 111 of 210 linears on W2 and the model fell apart (wikitext2 5318).
    OutputError,
    /// ‖ΔW X‖² / ‖W X‖²: scale-free, every linear weighing alike (better than `output_error`
    /// on both models and both sets where both were measured, but far behind `kl` on
    /// SmolLM2-135M: 353.90 against 107.53 at uniform W3's size).
    Relative,
    /// End to end: KL(dense ‖ model with one layer's linears on the candidate) of the next-token
    /// distribution on a calibration subset (`kl_tokens`), one measure per (layer, candidate),
    /// shared among the layer's linears by their relative errors (`budget/kl.rs`). The
    /// default: on SmolLM2-135M at uniform W3's size it scores 107.53 / 114.58 (wikitext2 /
    /// c4 heads) against uniform W3's 150.67 / 135.61 and `relative`'s 353.90 / 336.94
    /// (BENCHMARKS.md, "Size budget"); its scan costs about twice the local ones'.
    #[default]
    Kl,
}

impl Sensitivity {
    fn note(self) -> &'static str {
        match self {
            Sensitivity::OutputError => "damage",
            Sensitivity::Relative | Sensitivity::Kl => "relative",
        }
    }
}

/// One treatment a linear may get: a weight grid, applied by GPTQ.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default = "super::default_bits")]
    pub bits: u32,
    #[serde(default = "super::default_strategy")]
    pub strategy: Strategy,
    #[serde(default = "super::default_group")]
    pub group_size: i64,
    #[serde(default = "super::default_true")]
    pub sym: bool,
    #[serde(default = "super::default_observer")]
    pub observer: Observer,
    /// GPTQ's activation order (default by width, as `gptq`'s).
    #[serde(default)]
    pub act_order: Option<bool>,
}

fn d_kl_tokens() -> usize {
    1024
}
fn d_damp() -> f64 {
    0.01
}

impl Candidate {
    /// The GPTQ pass this candidate runs, on the budget's linears.
    pub fn gptq_spec(&self, b: &BudgetSpec) -> Result<GptqSpec> {
        let mut s: GptqSpec = serde_json::from_value(json!({}))?;
        s.scheme = self.scheme.clone();
        s.bits = self.bits;
        s.strategy = self.strategy;
        s.group_size = self.group_size;
        s.sym = self.sym;
        s.observer = self.observer;
        s.act_order = self.act_order;
        s.targets = b.targets.clone();
        s.ignore = b.ignore.clone();
        s.damp = b.damp;
        Ok(s)
    }

    /// A short name for logs and reports (`W3 g128`, `W8 ch asym`, `NVFP4A16`).
    pub fn label(&self) -> String {
        if let Some(s) = &self.scheme {
            return s.clone();
        }
        let shape = match (self.strategy, self.group_size) {
            (Strategy::Group, g) if g > 0 => format!("g{g}"),
            (Strategy::Tensor, _) => "tensor".into(),
            _ => "ch".into(),
        };
        let mut l = format!("W{} {shape}", self.bits);
        if !self.sym {
            l.push_str(" asym");
        }
        if self.observer == Observer::Mse {
            l.push_str(" mse");
        }
        l
    }
}

impl BudgetSpec {
    pub fn validate(&self) -> Result<()> {
        match (self.bits_per_weight, self.bytes) {
            (Some(b), None) => ensure!(
                b.is_finite() && b > 0.0,
                "field `bits_per_weight` must be positive, found {b}"
            ),
            (None, Some(b)) => ensure!(b > 0, "field `bytes` must be positive"),
            _ => bail!("give the target as one of `bits_per_weight` or `bytes`"),
        }
        ensure!(self.kl_tokens > 0, "field `kl_tokens` must be at least 1");
        ensure!(
            !self.candidates.is_empty() && self.candidates.len() <= 255,
            "field `candidates` needs 1 to 255 entries, found {}",
            self.candidates.len()
        );
        for (i, c) in self.candidates.iter().enumerate() {
            let g = c
                .gptq_spec(self)
                .and_then(|s| {
                    s.validate()?;
                    Ok(s)
                })
                .with_context(|| format!("field `candidates[{i}]`"))?;
            ensure!(
                g.scheme().act_quant()?.is_none(),
                "field `candidates[{i}]`: `{}` quantizes activations; budget candidates are weight-only grids",
                c.label()
            );
        }
        Selector::new(&self.targets, &self.ignore)?;
        Ok(())
    }

    fn passes(&self) -> Result<Vec<Gptq>> {
        self.candidates
            .iter()
            .map(|c| Gptq::new(&c.gptq_spec(self)?))
            .collect()
    }

    fn labels(&self) -> Vec<String> {
        self.candidates.iter().map(Candidate::label).collect()
    }
}

/// What the allocation chose, kept in the resume state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Allocation {
    /// The candidates' labels, in order, and the damage measure (a resumed run checks they
    /// are the same).
    pub candidates: Vec<String>,
    pub sensitivity: Sensitivity,
    /// Bytes of all the decoder linears allowed and used (the unselected ones included).
    pub target_bytes: u64,
    pub bytes: u64,
    /// Weights of all the decoder linears.
    pub numel: u64,
    /// Module → (candidate index, its stored bytes, its measured damage).
    pub choice: BTreeMap<String, (usize, u64, f64)>,
}

impl Allocation {
    pub fn bits_per_weight(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.numel.max(1) as f64
    }
}

/// One decoder linear the budget sees: module name, [out, in], stored dtype, selected.
struct LinearInfo {
    module: String,
    shape: (usize, usize),
    dtype: DType,
    selected: bool,
}

fn linears(ckpt: &crate::model::Checkpoint, select: &Selector) -> Result<Vec<LinearInfo>> {
    let cfg = &ckpt.config;
    let block = cfg.block();
    let mut v = Vec::new();
    for l in 0..cfg.num_layers {
        let prefix = crate::model::layer::LayerWeights::prefix(l);
        for lin in &block.linears {
            let module = format!("{prefix}{}", lin.name);
            let selected = select.selects(&module, lin.router);
            // routers are not counted by the report's bits per weight unless compressed
            if lin.router && !selected {
                continue;
            }
            let w = format!("{module}.weight");
            let dtype = ckpt
                .info(&w)
                .map(|(i, _)| i.dtype)
                .with_context(|| format!("budget: `{w}`"))?;
            v.push(LinearInfo {
                shape: (cfg.dim(lin.out), cfg.dim(lin.inp)),
                module,
                dtype,
                selected,
            });
        }
    }
    Ok(v)
}

/// The stored bytes of one linear under a grid: (grid, column order, [out, in], weight dtype).
/// The runner gives it from the export format (`export::quantized_bytes`).
pub type ByteCost<'a> = &'a dyn Fn(&QuantArgs, Order, (usize, usize), DType) -> Result<u64>;

/// The budget's whole-model phase: the scan of the dense model (each linear under each
/// candidate), the knapsack, and the allocation set on `spec`. A resumed run passes the
/// allocation its state recorded (`cached`) instead of scanning again.
pub fn prepare(
    spec: &mut BudgetSpec,
    at: &str,
    ckpt: &crate::model::Checkpoint,
    windows: &[Vec<u32>],
    opts: &crate::engine::StreamOptions,
    cached: Option<&serde_json::Value>,
    cost: ByteCost,
) -> Result<Allocation> {
    if windows.is_empty() {
        bail!("{at}: a budget needs a `calibration:` block (its scan measures each candidate)");
    }
    let labels = spec.labels();
    if let Some(a) = cached
        .and_then(|v| serde_json::from_value::<Allocation>(v.clone()).ok())
        .filter(|a| a.candidates == labels && a.sensitivity == spec.sensitivity)
    {
        crate::info!("{at}: budget allocation from the resume state");
        spec.allocation = Some(a.clone());
        return Ok(a);
    }
    let select = Selector::new(&spec.targets, &spec.ignore)?;
    let lins = linears(ckpt, &select)?;
    let passes = spec.passes()?;
    let numel: u64 = lins.iter().map(|l| (l.shape.0 * l.shape.1) as u64).sum();
    let fixed: u64 = lins
        .iter()
        .filter(|l| !l.selected)
        .map(|l| (l.shape.0 * l.shape.1 * l.dtype.size()) as u64)
        .sum();
    let target = match (spec.bits_per_weight, spec.bytes) {
        (Some(b), _) => (b * numel as f64 / 8.0).floor() as u64,
        (_, Some(b)) => b,
        _ => bail!("{at}: no target"),
    };
    // exact bytes of each (candidate, shape, dtype)
    let mut sizes: std::collections::HashMap<(usize, (usize, usize), DType), u64> =
        Default::default();
    for l in lins.iter().filter(|l| l.selected) {
        for (c, p) in passes.iter().enumerate() {
            if let std::collections::hash_map::Entry::Vacant(e) = sizes.entry((c, l.shape, l.dtype))
            {
                e.insert(cost(p.args(), p.order(), l.shape, l.dtype)?);
            }
        }
    }
    crate::info!(
        "{at}: budget scan of the dense model ({} candidates × {} linears)",
        passes.len(),
        lins.iter().filter(|l| l.selected).count()
    );
    let kl = match spec.sensitivity {
        Sensitivity::Kl => {
            let p = kl::Probe::new(ckpt, windows, spec.kl_tokens)
                .with_context(|| format!("{at}: the KL subset"))?;
            crate::info!(
                "{at}: KL sensitivity on {} calibration tokens (one forward of the layers after each layer, per candidate)",
                p.tokens()
            );
            Some(p)
        }
        _ => None,
    };
    let scan: Vec<Box<dyn Pass>> = vec![Box::new(Scan {
        passes,
        select: Selector::new(&spec.targets, &spec.ignore)?,
        kl,
    })];
    let r = crate::engine::run(
        ckpt,
        &scan,
        windows,
        opts,
        &mut crate::engine::NullSink,
        None,
    )?;
    let mut damage: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    // per layer: (module, its local damage per candidate), and the layer's KL when measured
    type Layer = (Vec<(String, Vec<f64>)>, Option<Vec<f64>>);
    let mut by_layer: BTreeMap<usize, Layer> = BTreeMap::new();
    let note = |rec: &crate::engine::LinearRecord, key: &str| -> Option<Vec<f64>> {
        rec.notes
            .get(key)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    };
    for rec in r.records.iter().filter(|r| r.pass == SCAN) {
        let d = note(rec, spec.sensitivity.note()).context("budget scan record without damage")?;
        let module = format!(
            "{}{}",
            crate::model::layer::LayerWeights::prefix(rec.layer),
            rec.linear
        );
        let e = by_layer.entry(rec.layer).or_default();
        e.0.push((module, d));
        if spec.sensitivity == Sensitivity::Kl {
            e.1 = Some(note(rec, "layer_kl").context("budget scan record without layer_kl")?);
        }
    }
    for (linears, layer_kl) in by_layer.into_values() {
        let local: Vec<Vec<f64>> = linears.iter().map(|(_, d)| d.clone()).collect();
        let d = match layer_kl {
            Some(k) => kl::shares(&k, &local),
            None => local,
        };
        damage.extend(linears.into_iter().map(|(m, _)| m).zip(d));
    }
    let selected: Vec<&LinearInfo> = lins.iter().filter(|l| l.selected).collect();
    let mut items = Vec::new();
    for l in &selected {
        let d = damage
            .get(&l.module)
            .with_context(|| format!("{at}: the scan measured nothing for `{}`", l.module))?;
        items.push(
            (0..labels.len())
                .map(|c| knapsack::Choice {
                    bytes: sizes[&(c, l.shape, l.dtype)],
                    cost: d[c],
                })
                .collect::<Vec<_>>(),
        );
    }
    let room = target.checked_sub(fixed).with_context(|| {
        format!("{at}: the target of {target} bytes is below the {fixed} bytes of the linears left dense")
    })?;
    let pick = knapsack::solve(&items, room).with_context(|| {
        format!(
            "{at}: the target ({:.3} bits per weight) is below what the smallest candidate takes",
            target as f64 * 8.0 / numel.max(1) as f64
        )
    })?;
    let choice: BTreeMap<String, (usize, u64, f64)> = selected
        .iter()
        .zip(&pick)
        .zip(&items)
        .map(|((l, &c), it)| (l.module.clone(), (c, it[c].bytes, it[c].cost)))
        .collect();
    let bytes = fixed + choice.values().map(|v| v.1).sum::<u64>();
    let a = Allocation {
        candidates: labels.clone(),
        sensitivity: spec.sensitivity,
        target_bytes: target,
        bytes,
        numel,
        choice,
    };
    let mut count = vec![0usize; labels.len()];
    for (c, _, _) in a.choice.values() {
        count[*c] += 1;
    }
    crate::info!(
        "{at}: budget {:.3} bits per weight ({} of {} bytes): {}",
        a.bits_per_weight(),
        a.bytes,
        a.target_bytes,
        labels
            .iter()
            .zip(&count)
            .map(|(l, n)| format!("{l} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    spec.allocation = Some(a.clone());
    Ok(a)
}

/// The records' pass name of the scan.
const SCAN: &str = "budget-scan";

/// The scan: on the dense model, each selected linear under each candidate (GPTQ onto its
/// grid), its damage D_i(c) recorded (note `damage`, one value per candidate); no weight
/// changes.
struct Scan {
    passes: Vec<Gptq>,
    select: Selector,
    /// With `sensitivity: kl`: the dense model and its outputs on the KL subset.
    kl: Option<kl::Probe>,
}

impl Pass for Scan {
    fn name(&self) -> String {
        SCAN.into()
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest {
            hessian: true,
            ..Default::default()
        }
    }

    fn apply(&self, ctx: &mut LayerCtx) -> Result<()> {
        let harness = self.harness(SCAN);
        let globals = self.globals(ctx, &harness.selected(ctx))?;
        // with `sensitivity: kl`: every candidate's weights of each linear, for the layer's KL
        let mut swept: Vec<Vec<(&'static str, ndarray::Array2<f32>)>> =
            vec![Vec::new(); self.passes.len()];
        harness.each(ctx, |ctx, lin| {
            let site = super::input_site(ctx, lin.name)?;
            let n = ctx.stats(site)?.n as f64;
            let h = super::linear_hessian(ctx, lin.name, "its damage counts as zero")?;
            let l = &ctx.layer.linears[lin.name];
            let keep = l.mask().map(|m| m.keep.as_slice());
            let mut damage = Vec::with_capacity(self.passes.len());
            let mut relative = Vec::with_capacity(self.passes.len());
            for (c, p) in self.passes.iter().enumerate() {
                let Some(h) = &h else {
                    damage.push(0.0);
                    relative.push(0.0);
                    continue;
                };
                let global = globals[c].get(lin.name).copied();
                let r = p.sweep(l.weight(), h, l.dtype, p.damp(), keep, global)?;
                let d = l.weight() - &r.dequant;
                let e = crate::linalg::quad_trace(&d, h);
                damage.push(n / 2.0 * e);
                relative.push(e / crate::linalg::quad_trace(l.weight(), h).max(1e-300));
                if self.kl.is_some() {
                    swept[c].push((lin.name, r.dequant));
                }
            }
            Ok(Done::default()
                .note("damage", damage)
                .note("relative", relative))
        })?;
        let Some(probe) = &self.kl else {
            return Ok(());
        };
        // the layer's KL under each candidate: every selected linear on it at once
        let mut layer_kl = Vec::with_capacity(swept.len());
        for weights in swept {
            let mut layer = ctx.layer.clone();
            for (name, w) in weights {
                layer
                    .linears
                    .get_mut(name)
                    .context("linear present")?
                    .set_weight(w)?;
            }
            layer_kl.push(probe.kl(ctx.index(), &layer)?);
        }
        let here = ctx.index();
        for rec in ctx
            .records
            .iter_mut()
            .filter(|r| r.pass == SCAN && r.layer == here)
        {
            rec.notes.insert("layer_kl".into(), json!(layer_kl));
        }
        Ok(())
    }
}

impl Scan {
    /// The harness of the scan and of the budget pass: every linear from the layer's inputs.
    fn harness(&self, pass: &'static str) -> PerLinear<'_> {
        PerLinear {
            pass,
            select: &self.select,
            schedule: Schedule::OneForward,
        }
    }

    /// NVFP4's fused global scales, per candidate that has one.
    fn globals(&self, ctx: &LayerCtx, selected: &[&str]) -> Result<Vec<BTreeMap<String, f32>>> {
        self.passes
            .iter()
            .map(|p| {
                if p.args().global_scale {
                    super::fused_global_scales(ctx, selected)
                } else {
                    Ok(BTreeMap::new())
                }
            })
            .collect()
    }
}

/// The streaming pass: each selected linear gets the candidate the allocation chose (GPTQ
/// onto its grid, on the current inputs); its record says which (`candidate`, `bytes`).
pub struct Budget {
    scan: Scan,
    labels: Vec<String>,
    choice: BTreeMap<String, (usize, u64, f64)>,
}

impl Budget {
    pub fn new(spec: &BudgetSpec) -> Result<Self> {
        spec.validate()?;
        // without the runner's prepare phase the pass builds (pipeline checks) but has no
        // allocation: `apply` refuses every linear
        let empty = Allocation {
            candidates: spec.labels(),
            sensitivity: spec.sensitivity,
            target_bytes: 0,
            bytes: 0,
            numel: 0,
            choice: BTreeMap::new(),
        };
        let a = spec.allocation.as_ref().unwrap_or(&empty);
        Ok(Budget {
            scan: Scan {
                passes: spec.passes()?,
                select: Selector::new(&spec.targets, &spec.ignore)?,
                kl: None,
            },
            labels: spec.labels(),
            choice: a.choice.clone(),
        })
    }
}

impl Pass for Budget {
    fn name(&self) -> String {
        "budget".into()
    }

    fn stats(&self) -> StatsRequest {
        self.scan.stats()
    }

    fn apply(&self, ctx: &mut LayerCtx) -> Result<()> {
        let harness = self.scan.harness("budget");
        let globals = self.scan.globals(ctx, &harness.selected(ctx))?;
        harness.each(ctx, |ctx, lin| {
            let &(c, bytes, damage) = self.choice.get(&lin.module).context(
                "budget: the allocation has no entry for this linear (did the runner's prepare phase run?)",
            )?;
            let p = &self.scan.passes[c];
            let global = globals[c].get(lin.name).copied();
            let done = match super::linear_hessian(ctx, lin.name, super::gptq::STARVED)? {
                Some(h) => p.quantize_linear(ctx, lin.name, &h, None, global)?,
                None => p.round_starved_expert(ctx, lin.name, global)?,
            };
            let (rows, cols) = ctx.layer.linears[lin.name].shape();
            Ok(done
                .note("bits_per_weight", bytes as f64 * 8.0 / (rows * cols).max(1) as f64)
                .note("candidate", self.labels[c].as_str())
                .note("bytes", bytes)
                .note("scan_damage", damage))
        })
    }
}
