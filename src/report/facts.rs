//! Figures derived from a [`Report`] that more than one view shows: perplexity rows,
//! zero-shot metric rows, compression ratio, sparsity and MCR.
//!
//! Non-finite numbers count as missing: report.json writes them as `null`, so a report read
//! back from disk has none, and a fresh one renders the same.

use super::Report;
use crate::eval::tasks::TaskResult;

/// `x` when it is finite.
pub(crate) fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// `x` when it is there and finite.
pub(crate) fn finite_opt(x: Option<f64>) -> Option<f64> {
    x.filter(|x| x.is_finite())
}

/// One perplexity data set, before and after.
pub(crate) struct Dataset<'a> {
    pub name: &'a str,
    pub file: &'a str,
    pub before: Option<f64>,
    pub after: Option<f64>,
    pub delta_pct: Option<f64>,
    pub windows: Option<usize>,
    pub tokens: Option<usize>,
}

/// One score of a zero-shot task on one side (before or after).
pub(crate) struct TaskSide {
    pub value: f64,
    pub stderr: Option<f64>,
}

/// One metric of a zero-shot task, before and after.
pub(crate) struct TaskMetric<'a> {
    pub task: &'a str,
    pub metric: String,
    pub n: Option<usize>,
    pub before: Option<TaskSide>,
    pub after: Option<TaskSide>,
}

impl TaskMetric<'_> {
    pub(crate) fn fmt_side(&self, side: &TaskSide) -> String {
        super::format::fmt_task_value(&self.metric, side.value, side.stderr)
    }
}

/// Where an MCR figure comes from.
pub(crate) enum McrSource {
    /// `summary.mcr` of the report.
    Reported,
    /// Computed here from the compression ratio and the perplexity of `dataset`.
    Computed { dataset: String },
}

/// Metric names of a task: `acc`, `acc_norm` first, then the rest in report order.
fn metric_names(sides: [&Option<TaskResult>; 2]) -> Vec<String> {
    let mut names: Vec<String> = vec![];
    for r in sides.into_iter().flatten() {
        for k in r.metrics.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    let rank = |n: &str| match n {
        "acc" => 0,
        "acc_norm" => 1,
        _ => 2,
    };
    names.sort_by_key(|n| rank(n));
    names
}

fn task_side(r: &Option<TaskResult>, metric: &str) -> Option<TaskSide> {
    let r = r.as_ref()?;
    let value = finite_opt(r.metrics.get(metric).copied())?;
    Some(TaskSide {
        value,
        stderr: finite_opt(r.stderr.get(metric).copied()),
    })
}

impl Report {
    /// Perplexity data sets in report order; Δ % computed when the report lacks it.
    pub(crate) fn datasets(&self) -> Vec<Dataset<'_>> {
        self.eval
            .iter()
            .map(|(name, d)| {
                let before = d.before.as_ref().and_then(|p| finite(p.perplexity));
                let after = d.after.as_ref().and_then(|p| finite(p.perplexity));
                let delta_pct = finite_opt(d.delta_pct).or(match (before, after) {
                    (Some(b), Some(a)) if b != 0.0 => Some(100.0 * (a - b) / b),
                    _ => None,
                });
                let measured = d.measured();
                Dataset {
                    name,
                    file: &d.file,
                    before,
                    after,
                    delta_pct,
                    windows: measured.map(|p| p.windows),
                    tokens: measured.map(|p| p.tokens),
                }
            })
            .collect()
    }

    /// Zero-shot metrics, one row per task and metric.
    pub(crate) fn task_metrics(&self) -> Vec<TaskMetric<'_>> {
        let mut out = vec![];
        for (task, t) in &self.tasks {
            let n = t.after.as_ref().or(t.before.as_ref()).map(|r| r.n);
            for metric in metric_names([&t.before, &t.after]) {
                out.push(TaskMetric {
                    task,
                    n,
                    before: task_side(&t.before, &metric),
                    after: task_side(&t.after, &metric),
                    metric,
                });
            }
        }
        out
    }

    pub(crate) fn size_orig(&self) -> f64 {
        self.model.size_bytes as f64
    }

    pub(crate) fn size_comp(&self) -> f64 {
        self.output.size_bytes as f64
    }

    /// `output.compression_ratio`, or the size ratio when that is not a number.
    pub(crate) fn compression_ratio(&self) -> Option<f64> {
        finite(self.output.compression_ratio).or_else(|| {
            let (a, b) = (self.size_orig(), self.size_comp());
            (b > 0.0).then(|| a / b)
        })
    }

    pub(crate) fn sparsity(&self) -> Option<f64> {
        finite_opt(self.output.sparsity)
    }

    pub(crate) fn bits_per_weight(&self) -> Option<f64> {
        finite_opt(self.output.bits_per_weight)
    }

    /// Model compression rate (size_orig/size_comp) × (perf_comp/perf_orig): `summary.mcr`
    /// when the report has it, else computed with perf = 1/perplexity of the first data set.
    pub(crate) fn mcr(&self) -> Option<(f64, McrSource)> {
        if let Some(m) = finite_opt(self.summary.mcr) {
            return Some((m, McrSource::Reported));
        }
        let ratio = self.compression_ratio()?;
        let d = self
            .datasets()
            .into_iter()
            .find(|d| d.before.is_some() && d.after.is_some())?;
        let (b, a) = (d.before?, d.after?);
        if a <= 0.0 || b <= 0.0 {
            return None;
        }
        Some((
            ratio * (b / a),
            McrSource::Computed {
                dataset: d.name.to_string(),
            },
        ))
    }
}
