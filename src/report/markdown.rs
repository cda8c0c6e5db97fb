//! `report.md`: the report for people, as Markdown.

use super::format::{dash, mib};
use super::Report;
use crate::eval::ppl::PplResult;
use crate::eval::tasks::TaskResult;

impl Report {
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("# compress report — {}\n\n", self.model.path));
        self.md_facts(&mut s);
        self.md_perplexity(&mut s);
        self.md_tasks(&mut s);
        self.md_also(&mut s);
        self.md_budget(&mut s);
        self.md_layers(&mut s);
        self.md_warnings(&mut s);
        s.push_str(&format!(
            "\n## Pipeline as run\n\n```json\n{}\n```\n\n_compress {} · report schema {}_\n",
            serde_json::to_string_pretty(&self.pipeline).unwrap_or_default(),
            self.tool_version,
            self.schema
        ));
        s
    }

    /// The bullet list under the title: model, output, sizes, headline figures, cost.
    fn md_facts(&self, s: &mut String) {
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
                "- sparsity (decoder linears, pruned by masks): {:.2}%\n",
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
        if let Some(b) = &self.baseline {
            let count = |s: &str| b.items.values().filter(|i| i.source == s).count();
            let line = match (b.source.as_str(), &b.cache_dir) {
                ("computed", Some(d)) => {
                    format!("computed in this run, stored in the eval cache {d}")
                }
                ("computed", None) => "computed in this run (eval cache off)".to_string(),
                ("resumed", _) => {
                    "scored by the interrupted run this one resumed".to_string()
                }
                (_, d) => format!(
                    "{} of {} item(s) read from the eval cache {}, {} scored by the interrupted run this one resumed, the rest computed in this run",
                    count("cache"),
                    b.items.len(),
                    d.as_deref().unwrap_or("?"),
                    count("resumed")
                ),
            };
            s.push_str(&format!("- baseline (input model scores): {line}\n"));
        }
    }

    fn md_perplexity(&self, s: &mut String) {
        if self.eval.is_empty() {
            return;
        }
        s.push_str(&format!(
            "\n## Perplexity (seq_len {}, artifact read back from disk)\n\n| dataset | before | after | Δ % | windows |\n|---|---:|---:|---:|---:|\n",
            self.eval_seq_len.unwrap_or(0)
        ));
        for (k, d) in &self.eval {
            let f = |p: &Option<PplResult>| {
                p.as_ref()
                    .map(|r| format!("{:.4}", r.perplexity))
                    .unwrap_or_else(dash)
            };
            let w = d.measured().map(|r| r.windows).unwrap_or(0);
            s.push_str(&format!(
                "| {k} | {} | {} | {} | {w} |\n",
                f(&d.before),
                f(&d.after),
                d.delta_pct.map(|x| format!("{x:+.3}")).unwrap_or_else(dash)
            ));
        }
    }

    /// The further exports of a list: size and perplexity of each, read back from its folder.
    fn md_also(&self, s: &mut String) {
        if self.output.also.is_empty() {
            return;
        }
        let sets: Vec<&String> = self.eval.keys().collect();
        s.push_str("\n## Further exports (same run, each read back from its folder)\n\n| folder | format | size | bits/weight |");
        for k in &sets {
            s.push_str(&format!(" {k} | Δ % |"));
        }
        s.push_str("\n|---|---|---:|---:|");
        for _ in &sets {
            s.push_str("---:|---:|");
        }
        s.push('\n');
        for a in &self.output.also {
            s.push_str(&format!(
                "| `{}/` | {} | {} | {} |",
                a.dir,
                a.format,
                mib(a.size_bytes),
                a.bits_per_weight
                    .map(|b| format!("{b:.3}"))
                    .unwrap_or_else(dash)
            ));
            for k in &sets {
                let d = a.eval.get(*k);
                let ppl = d
                    .and_then(|d| d.after.as_ref())
                    .map(|r| format!("{:.4}", r.perplexity))
                    .unwrap_or_else(dash);
                let delta = d
                    .and_then(|d| d.delta_pct)
                    .map(|x| format!("{x:+.3}"))
                    .unwrap_or_else(dash);
                s.push_str(&format!(" {ppl} | {delta} |"));
            }
            s.push('\n');
        }
        for a in self.output.also.iter().filter(|a| !a.tasks.is_empty()) {
            s.push_str(&format!("\n`{}/` tasks:", a.dir));
            for (k, t) in &a.tasks {
                if let Some(r) = &t.after {
                    s.push_str(&format!(" {k} {:?};", r.metrics));
                }
            }
            s.push('\n');
        }
    }

    fn md_tasks(&self, s: &mut String) {
        if self.tasks.is_empty() {
            return;
        }
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
                        .unwrap_or_else(dash)
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

    /// A size budget's allocation: the grid each linear got, per layer, with the layer's
    /// stored bits per weight, and the bytes each grid takes in all.
    fn md_budget(&self, s: &mut String) {
        let recs: Vec<_> = self
            .layers
            .iter()
            .filter(|r| r.notes.contains_key("candidate"))
            .collect();
        if recs.is_empty() {
            return;
        }
        let mut linears: Vec<&str> = Vec::new();
        for r in &recs {
            if !linears.contains(&r.linear.as_str()) {
                linears.push(&r.linear);
            }
        }
        let num = |r: &crate::engine::LinearRecord, k: &str| {
            r.notes.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0)
        };
        let label = |r: &crate::engine::LinearRecord| {
            r.notes
                .get("candidate")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        s.push_str("\n## Size budget: the grid of each linear\n\n| layer | ");
        s.push_str(&linears.join(" | "));
        s.push_str(" | bits per weight | bytes |\n|---:|");
        s.push_str(&"---|".repeat(linears.len()));
        s.push_str("---:|---:|\n");
        let mut layers: Vec<usize> = recs.iter().map(|r| r.layer).collect();
        layers.dedup();
        let mut per_grid: Vec<(String, usize, f64)> = Vec::new();
        for l in layers {
            let row: Vec<_> = recs.iter().filter(|r| r.layer == l).collect();
            let bytes: f64 = row.iter().map(|r| num(r, "bytes")).sum();
            let weights: f64 = row
                .iter()
                .map(|r| 8.0 * num(r, "bytes") / num(r, "bits_per_weight").max(1e-30))
                .sum();
            let cells: Vec<String> = linears
                .iter()
                .map(|n| {
                    row.iter()
                        .find(|r| r.linear == *n)
                        .map(|r| label(r))
                        .unwrap_or_else(dash)
                })
                .collect();
            s.push_str(&format!(
                "| {l} | {} | {:.3} | {bytes:.0} |\n",
                cells.join(" | "),
                8.0 * bytes / weights.max(1.0)
            ));
            for r in row {
                let g = label(r);
                match per_grid.iter_mut().find(|(n, _, _)| *n == g) {
                    Some(e) => {
                        e.1 += 1;
                        e.2 += num(r, "bytes");
                    }
                    None => per_grid.push((g, 1, num(r, "bytes"))),
                }
            }
        }
        s.push_str("\n| grid | linears | bytes |\n|---|---:|---:|\n");
        for (g, n, b) in per_grid {
            s.push_str(&format!("| {g} | {n} | {b:.0} |\n"));
        }
    }

    fn md_layers(&self, s: &mut String) {
        if self.layers.is_empty() {
            return;
        }
        s.push_str("\n## Per-linear results\n\n| layer | linear | pass | rel. output error | loss | seconds |\n|---:|---|---|---:|---:|---:|\n");
        for r in &self.layers {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {:.3} |\n",
                r.layer,
                r.linear,
                r.pass,
                r.rel_output_error
                    .map(|x| format!("{x:.3e}"))
                    .unwrap_or_else(dash),
                r.loss.map(|x| format!("{x:.4e}")).unwrap_or_else(dash),
                r.seconds
            ));
        }
    }

    fn md_warnings(&self, s: &mut String) {
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
    }
}
