//! The evaluation report: [`Report`] is the schema of `report.json` (`compress.report/2`,
//! documented in docs/evaluation.md; fields are only ever added, and fields that `compress.report/1`
//! lacks default when read). Every view renders from it: `report.md` ([`Report::to_markdown`]),
//! `report.html` ([`html::render_html`]) and the comparison of several runs
//! ([`html::render_compare_markdown`], [`html::render_compare_html`]).

mod facts;
mod format;
pub mod html;
mod markdown;

use crate::engine::LinearRecord;
use crate::eval::ppl::PplResult;
use crate::eval::tasks::TaskResult;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const SCHEMA: &str = "compress.report/2";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    pub path: String,
    pub architecture: String,
    pub num_layers: usize,
    pub parameters: usize,
    pub dtype: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutputInfo {
    pub path: String,
    pub format: String,
    /// Bytes of the weight files written.
    pub size_bytes: u64,
    /// Original weight bytes / written weight bytes.
    pub compression_ratio: f64,
    /// Average stored bits per parameter of the decoder-layer linears.
    pub bits_per_weight: Option<f64>,
    /// Fraction of the decoder-layer linears' weights pruned by a pass (masks); absent when no
    /// pass pruned (zeros that rounding made are not sparsity).
    pub sparsity: Option<f64>,
    /// Weight bytes of the decoder-layer linears as their representations count them
    /// (dense, packed codes with their parameters, or both factors).
    #[serde(default)]
    pub linear_bytes: Option<usize>,
    pub files: Vec<String>,
    /// For a pipeline without passes: whether every tensor is byte-identical to the input.
    pub identical_to_input: Option<bool>,
    /// The further exports of a list (`export: [...]`), each read back and evaluated on its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<AlsoExport>,
}

/// One further export of a list: written to `output/<dir>` from the same run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AlsoExport {
    pub dir: String,
    pub format: String,
    /// Bytes of its weight files.
    pub size_bytes: u64,
    /// Original weight bytes / its weight bytes.
    pub compression_ratio: f64,
    pub bits_per_weight: Option<f64>,
    /// Its files, relative to `output`.
    pub files: Vec<String>,
    /// Perplexity of this artifact, read back from disk (`before` as in the report's `eval`).
    pub eval: BTreeMap<String, DatasetEval>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tasks: BTreeMap<String, TaskEval>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetEval {
    pub file: String,
    pub before: Option<PplResult>,
    /// Measured on the written artifact, read back from disk.
    pub after: Option<PplResult>,
    /// 100 · (after − before) / before.
    pub delta_pct: Option<f64>,
}

impl DatasetEval {
    /// The measurement whose window and token counts the report shows: after, else before.
    pub fn measured(&self) -> Option<&PplResult> {
        self.after.as_ref().or(self.before.as_ref())
    }
}

/// Zero-shot scores before and after compression.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskEval {
    pub before: Option<TaskResult>,
    pub after: Option<TaskResult>,
}

/// Headline figures (absent from `compress.report/1`).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Summary {
    /// Model compression rate: (size_orig / size_comp) × (perf_comp / perf_orig).
    pub mcr: Option<f64>,
    /// What "perf" is in `mcr` (e.g. `1/perplexity on wiki.test.raw`).
    pub mcr_basis: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Timing {
    pub total_seconds: f64,
    pub calibration_seconds: f64,
    pub compress_seconds: f64,
    pub eval_before_seconds: f64,
    pub eval_after_seconds: f64,
    #[serde(default)]
    pub tasks_before_seconds: f64,
    #[serde(default)]
    pub tasks_after_seconds: f64,
}

impl Timing {
    /// Wall time of each stage as (name, seconds), in report order; the total is not a stage.
    pub fn stages(&self) -> [(&'static str, f64); 6] {
        [
            ("calibration", self.calibration_seconds),
            ("compress", self.compress_seconds),
            ("eval before", self.eval_before_seconds),
            ("eval after", self.eval_after_seconds),
            ("tasks before", self.tasks_before_seconds),
            ("tasks after", self.tasks_after_seconds),
        ]
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub tool_version: String,
    pub model: ModelInfo,
    pub pipeline: serde_json::Value,
    pub output: OutputInfo,
    pub eval_seq_len: Option<usize>,
    pub eval: BTreeMap<String, DatasetEval>,
    #[serde(default)]
    pub tasks: BTreeMap<String, TaskEval>,
    #[serde(default)]
    pub summary: Summary,
    pub layers: Vec<LinearRecord>,
    pub warnings: Vec<String>,
    /// Calibration windows left out because their activations overflowed
    /// (`calibration.on_nonfinite: drop_sample`), by index.
    #[serde(default)]
    pub dropped_calibration_samples: Vec<usize>,
    pub timing: Timing,
    pub peak_rss_bytes: Option<u64>,
    /// Where the input model's scores came from (absent when the input was not evaluated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Baseline>,
}

/// Origin of the input model's scores (the baseline): computed in this run or read from the
/// eval cache (`crate::eval::cache`).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Baseline {
    /// `computed`, `cache` (every item read from the cache) or `mixed`.
    pub source: String,
    /// The eval cache folder; `None` when the cache was off (`--no-cache`).
    pub cache_dir: Option<String>,
    /// Each data set and task: where its scores came from.
    pub items: BTreeMap<String, BaselineItem>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaselineItem {
    /// `computed` (in this run), `cache` (the eval cache) or `resumed` (scored by the
    /// interrupted run this one resumed).
    pub source: String,
    /// The cache entry read or written, if any.
    pub entry: Option<String>,
}

impl Report {
    /// Read a report.json back (for `compress report` / `compress compare`).
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Report> {
        use anyhow::Context;
        let b = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_slice(&b)
            .with_context(|| format!("{}: not a compress report", path.display()))
    }

    /// Write report.json, report.md and report.html into `dir`.
    pub fn write(&self, dir: &std::path::Path) -> anyhow::Result<()> {
        use anyhow::Context;
        for (name, bytes) in [
            ("report.json", serde_json::to_vec_pretty(self)?),
            ("report.md", self.to_markdown().into_bytes()),
            ("report.html", html::render_html(self).into_bytes()),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, bytes)
                .with_context(|| format!("cannot write {} (disk full?)", p.display()))?;
        }
        Ok(())
    }
}
