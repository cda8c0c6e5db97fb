//! The evaluation report (`report.json`, schema `compress.report/2`, and `report.md`).
//! The JSON schema is documented in README.md; fields are only ever added.

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
    /// Fraction of exactly-zero weights in the decoder-layer linears.
    pub sparsity: Option<f64>,
    /// Weight bytes of the decoder-layer linears as their representations count them
    /// (dense, packed codes with their parameters, or both factors).
    #[serde(default)]
    pub linear_bytes: Option<usize>,
    pub files: Vec<String>,
    /// For a pipeline without passes: whether every tensor is byte-identical to the input.
    pub identical_to_input: Option<bool>,
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

/// Zero-shot scores before and after compression.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskEval {
    pub before: Option<TaskResult>,
    pub after: Option<TaskResult>,
}

/// Headline figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub summary: Summary,
    pub layers: Vec<LinearRecord>,
    pub warnings: Vec<String>,
    /// Calibration windows left out because their activations overflowed
    /// (`calibration.on_nonfinite: drop_sample`), by index.
    #[serde(default)]
    pub dropped_calibration_samples: Vec<usize>,
    pub timing: Timing,
    pub peak_rss_bytes: Option<u64>,
}

fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / (1024.0 * 1024.0))
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
        let json = serde_json::to_value(self)?;
        for (name, bytes) in [
            ("report.json", serde_json::to_vec_pretty(&json)?),
            ("report.md", self.to_markdown().into_bytes()),
            (
                "report.html",
                crate::report_html::render_html(&json).into_bytes(),
            ),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, bytes)
                .with_context(|| format!("cannot write {} (disk full?)", p.display()))?;
        }
        Ok(())
    }

    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("# compress report — {}\n\n", self.model.path));
        s.push_str(&format!(
            "- model: `{}` ({}, {} layers, {} parameters, {})\n",
            self.model.path,
            self.model.architecture,
            self.model.num_layers,
            self.model.parameters,
            self.model.dtype
        ));
        s.push_str(&format!(
            "- output: `{}` (format {}, {} files)\n",
            self.output.path,
            self.output.format,
            self.output.files.len()
        ));
        s.push_str(&format!(
            "- size on disk: {} → {} (ratio {:.3}×)\n",
            mib(self.model.size_bytes),
            mib(self.output.size_bytes),
            self.output.compression_ratio
        ));
        if let Some(m) = self.summary.mcr {
            s.push_str(&format!(
                "- model compression rate (MCR): {m:.3} (perf = {})\n",
                self.summary.mcr_basis.as_deref().unwrap_or("?")
            ));
        }
        if let Some(sp) = self.output.sparsity {
            s.push_str(&format!(
                "- sparsity (decoder linears): {:.2}%\n",
                100.0 * sp
            ));
        }
        if let Some(b) = self.output.bits_per_weight {
            s.push_str(&format!("- bits per weight (decoder linears): {b:.3}\n"));
        }
        if let Some(b) = self.output.linear_bytes {
            s.push_str(&format!("- decoder linear weights: {}\n", mib(b as u64)));
        }
        if let Some(same) = self.output.identical_to_input {
            s.push_str(&format!(
                "- identity pipeline: output tensors {} byte-identical to the input\n",
                if same { "are" } else { "are NOT" }
            ));
        }
        s.push_str(&format!(
            "- wall time: {:.2} s (calibration {:.2} s, compression {:.2} s, eval {:.2} s + {:.2} s)\n",
            self.timing.total_seconds,
            self.timing.calibration_seconds,
            self.timing.compress_seconds,
            self.timing.eval_before_seconds,
            self.timing.eval_after_seconds
        ));
        if let Some(p) = self.peak_rss_bytes {
            s.push_str(&format!("- peak memory (RSS): {}\n", mib(p)));
        }
        if !self.eval.is_empty() {
            s.push_str(&format!(
                "\n## Perplexity (seq_len {}, artifact read back from disk)\n\n| dataset | before | after | Δ % | windows |\n|---|---:|---:|---:|---:|\n",
                self.eval_seq_len.unwrap_or(0)
            ));
            for (k, d) in &self.eval {
                let f = |p: &Option<PplResult>| {
                    p.as_ref()
                        .map(|r| format!("{:.4}", r.perplexity))
                        .unwrap_or("—".into())
                };
                let w = d
                    .after
                    .as_ref()
                    .or(d.before.as_ref())
                    .map(|r| r.windows)
                    .unwrap_or(0);
                s.push_str(&format!(
                    "| {k} | {} | {} | {} | {w} |\n",
                    f(&d.before),
                    f(&d.after),
                    d.delta_pct
                        .map(|x| format!("{x:+.3}"))
                        .unwrap_or("—".into())
                ));
            }
        }
        if !self.tasks.is_empty() {
            s.push_str("\n## Zero-shot tasks (lm-evaluation-harness scoring)\n\n| task | metric | before | after | n |\n|---|---|---:|---:|---:|\n");
            for (k, t) in &self.tasks {
                let any = t.after.as_ref().or(t.before.as_ref());
                let metrics: Vec<String> = any
                    .map(|r| r.metrics.keys().cloned().collect())
                    .unwrap_or_default();
                for m in metrics {
                    let f = |r: &Option<TaskResult>| {
                        r.as_ref()
                            .and_then(|r| {
                                r.metrics.get(&m).map(|v| match r.stderr.get(&m) {
                                    Some(e) if e.is_finite() => format!("{v:.4} ± {e:.4}"),
                                    _ => format!("{v:.4}"),
                                })
                            })
                            .unwrap_or("—".into())
                    };
                    s.push_str(&format!(
                        "| {k} | {m} | {} | {} | {} |\n",
                        f(&t.before),
                        f(&t.after),
                        any.map(|r| r.n).unwrap_or(0)
                    ));
                }
            }
        }
        if !self.layers.is_empty() {
            s.push_str("\n## Per-linear results\n\n| layer | linear | pass | rel. output error | loss | seconds |\n|---:|---|---|---:|---:|---:|\n");
            for r in &self.layers {
                s.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {:.3} |\n",
                    r.layer,
                    r.linear,
                    r.pass,
                    r.rel_output_error
                        .map(|x| format!("{x:.3e}"))
                        .unwrap_or("—".into()),
                    r.loss.map(|x| format!("{x:.4e}")).unwrap_or("—".into()),
                    r.seconds
                ));
            }
        }
        s.push_str("\n## Warnings\n\n");
        if self.warnings.is_empty() {
            s.push_str("none\n");
        } else {
            for w in &self.warnings {
                s.push_str(&format!("- {w}\n"));
            }
        }
        if !self.dropped_calibration_samples.is_empty() {
            s.push_str(&format!(
                "\nCalibration windows left out (non-finite activations): {} — {:?}\n",
                self.dropped_calibration_samples.len(),
                self.dropped_calibration_samples
            ));
        }
        s.push_str(&format!(
            "\n## Pipeline as run\n\n```json\n{}\n```\n\n_compress {} · report schema {}_\n",
            serde_json::to_string_pretty(&self.pipeline).unwrap_or_default(),
            self.tool_version,
            self.schema
        ));
        s
    }
}
