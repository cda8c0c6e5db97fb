//! Several runs side by side (columns = runs), the best value of each row in bold: as
//! Markdown ([`render_compare_markdown`]) and as an HTML page ([`render_compare_html`]), both
//! from the same rows.

use super::super::facts::{finite, McrSource};
use super::super::format::{esc, fmt_bytes, fmt_pct_signed, fmt_ppl, fmt_secs, fmt_sparsity};
use super::super::format::{is_lower_better_metric, md_cell};
use super::super::Report;
use super::page;
use std::fmt::Write as _;

#[derive(Clone, Copy, PartialEq)]
enum Better {
    Lower,
    Higher,
    None,
}

/// One comparison cell: shown text and the value compared for "best".
type Cell = Option<(String, Option<f64>)>;

struct CmpRow {
    label: String,
    better: Better,
    /// Per run: shown text and the value compared for "best".
    cells: Vec<Cell>,
    group: bool,
}

impl CmpRow {
    /// A row with one cell per run.
    fn new(
        label: &str,
        better: Better,
        runs: &[(String, Report)],
        f: impl Fn(&Report) -> Cell,
    ) -> Self {
        CmpRow {
            label: label.into(),
            better,
            cells: runs.iter().map(|(_, r)| f(r)).collect(),
            group: false,
        }
    }

    /// A group heading.
    fn group(label: &str) -> Self {
        CmpRow {
            label: label.into(),
            better: Better::None,
            cells: vec![],
            group: true,
        }
    }

    /// Indices of the best cells (ties all marked); none when fewer than two runs have a value.
    fn best(&self) -> Vec<usize> {
        if self.better == Better::None {
            return vec![];
        }
        let vals: Vec<(usize, f64)> = self
            .cells
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().and_then(|c| c.1).map(|v| (i, v)))
            .collect();
        if vals.len() < 2 {
            return vec![];
        }
        let best = vals
            .iter()
            .map(|x| x.1)
            .fold(None, |acc: Option<f64>, v| match acc {
                None => Some(v),
                Some(a) => Some(if (self.better == Better::Lower) == (v < a) {
                    v
                } else {
                    a
                }),
            })
            .unwrap();
        let all_same = vals.iter().all(|x| x.1 == best);
        if all_same {
            return vec![];
        }
        let tol = 1e-12 * best.abs().max(1e-300);
        vals.iter()
            .filter(|x| (x.1 - best).abs() <= tol)
            .map(|x| x.0)
            .collect()
    }
}

/// A number shown as `fmt` gives it and compared as it is.
fn shown(v: Option<f64>, fmt: impl Fn(f64) -> String) -> Cell {
    v.map(|v| (fmt(v), Some(v)))
}

fn artifact_rows(rows: &mut Vec<CmpRow>, runs: &[(String, Report)]) {
    rows.push(CmpRow::group("Artifact"));
    rows.push(CmpRow::new("format", Better::None, runs, |r| {
        Some((r.output.format.clone(), None))
    }));
    rows.push(CmpRow::new("bits per weight", Better::Lower, runs, |r| {
        shown(r.bits_per_weight(), |v| format!("{v:.3}"))
    }));
    rows.push(CmpRow::new("size on disk", Better::Lower, runs, |r| {
        shown(Some(r.size_comp()), fmt_bytes)
    }));
    rows.push(CmpRow::new(
        "compression ratio",
        Better::Higher,
        runs,
        |r| shown(r.compression_ratio(), |v| format!("{v:.3}×")),
    ));
    if runs.iter().any(|(_, r)| r.sparsity().is_some()) {
        rows.push(CmpRow::new("sparsity", Better::None, runs, |r| {
            shown(r.sparsity(), fmt_sparsity)
        }));
    }
    if runs.iter().any(|(_, r)| r.mcr().is_some()) {
        rows.push(CmpRow::new("MCR ¹", Better::Higher, runs, |r| {
            r.mcr().map(|(v, src)| {
                let mark = match src {
                    McrSource::Reported => "",
                    McrSource::Computed { .. } => " ²",
                };
                (format!("{v:.3}{mark}"), Some(v))
            })
        }));
    }
}

/// Perplexity after, per data set (union over runs, in first-seen order).
fn perplexity_rows(rows: &mut Vec<CmpRow>, runs: &[(String, Report)]) {
    let mut names: Vec<String> = vec![];
    for (_, r) in runs {
        for d in r.datasets() {
            if !names.iter().any(|n| n == d.name) {
                names.push(d.name.to_string());
            }
        }
    }
    if !names.is_empty() {
        rows.push(CmpRow::group(
            "Perplexity after (Δ % vs before) · lower is better",
        ));
    }
    for name in &names {
        rows.push(CmpRow::new(name, Better::Lower, runs, |r| {
            let d = r.datasets().into_iter().find(|d| d.name == name)?;
            let a = d.after?;
            let s = match d.delta_pct {
                Some(p) => format!("{} ({})", fmt_ppl(a), fmt_pct_signed(p)),
                None => fmt_ppl(a),
            };
            Some((s, Some(a)))
        }));
    }
}

/// Zero-shot scores after, per task and metric (union over runs, in first-seen order).
fn task_rows(rows: &mut Vec<CmpRow>, runs: &[(String, Report)]) {
    let mut keys: Vec<(String, String)> = vec![];
    for (_, r) in runs {
        for t in r.task_metrics() {
            let k = (t.task.to_string(), t.metric);
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    if !keys.is_empty() {
        rows.push(CmpRow::group("Zero-shot tasks after · accuracy ± stderr"));
    }
    for (task, metric) in &keys {
        let better = if is_lower_better_metric(metric) {
            Better::Lower
        } else {
            Better::Higher
        };
        let label = format!("{task} · {metric}");
        rows.push(CmpRow::new(&label, better, runs, |r| {
            let t = r
                .task_metrics()
                .into_iter()
                .find(|t| t.task == task && &t.metric == metric)?;
            let a = t.after.as_ref()?;
            Some((t.fmt_side(a), Some(a.value)))
        }));
    }
}

fn cost_rows(rows: &mut Vec<CmpRow>, runs: &[(String, Report)]) {
    rows.push(CmpRow::group("Cost"));
    rows.push(CmpRow::new("compress seconds", Better::Lower, runs, |r| {
        shown(finite(r.timing.compress_seconds), fmt_secs)
    }));
    rows.push(CmpRow::new("peak RSS", Better::Lower, runs, |r| {
        shown(r.peak_rss_bytes.map(|p| p as f64), fmt_bytes)
    }));
    rows.push(CmpRow::new("warnings", Better::Lower, runs, |r| {
        let n = r.warnings.len();
        Some((n.to_string(), Some(n as f64)))
    }));
}

fn compare_rows(runs: &[(String, Report)]) -> Vec<CmpRow> {
    let mut rows = vec![];
    artifact_rows(&mut rows, runs);
    perplexity_rows(&mut rows, runs);
    task_rows(&mut rows, runs);
    cost_rows(&mut rows, runs);
    rows
}

fn compare_footnotes(runs: &[(String, Report)]) -> Vec<String> {
    let mut notes = vec!["Bold: best value of the row (ties all bold; rows with a single value or all equal are not marked).".to_string()];
    if runs.iter().any(|(_, r)| r.mcr().is_some()) {
        notes.push(
            "¹ MCR (model compression rate) = (size_orig / size_comp) × (perf_comp / perf_orig)."
                .into(),
        );
        if runs
            .iter()
            .any(|(_, r)| matches!(r.mcr(), Some((_, McrSource::Computed { .. }))))
        {
            notes.push("² computed here (the report has no summary.mcr) with perf = 1 / perplexity on the report's first data set.".into());
        }
    }
    notes
}

/// Several runs side by side as a Markdown table (columns = runs), best value per row in bold.
pub fn render_compare_markdown(runs: &[(String, Report)]) -> String {
    let rows = compare_rows(runs);
    let mut s = String::from("# compress: runs compared\n\n");
    s.push_str("| |");
    for (name, _) in runs {
        let _ = write!(s, " {} |", md_cell(name));
    }
    s.push_str("\n|---|");
    for _ in runs {
        s.push_str("---:|");
    }
    s.push('\n');
    for row in &rows {
        if row.group {
            let _ = write!(s, "| *{}* |", md_cell(&row.label));
            for _ in runs {
                s.push_str(" |");
            }
            s.push('\n');
            continue;
        }
        let best = row.best();
        let _ = write!(s, "| {} |", md_cell(&row.label));
        for (i, c) in row.cells.iter().enumerate() {
            match c {
                Some((t, _)) if best.contains(&i) => {
                    let _ = write!(s, " **{}** |", md_cell(t));
                }
                Some((t, _)) => {
                    let _ = write!(s, " {} |", md_cell(t));
                }
                None => s.push_str(" — |"),
            }
        }
        s.push('\n');
    }
    s.push('\n');
    for n in compare_footnotes(runs) {
        let _ = writeln!(s, "{n}  ");
    }
    s
}

/// The HTML table of the comparison: one column per run, best cells highlighted.
fn html_table(b: &mut String, runs: &[(String, Report)], rows: &[CmpRow]) {
    b.push_str("<table>\n<thead><tr><th></th>");
    for (name, r) in runs {
        let _ = write!(
            b,
            "<th class=\"n\" title=\"{}\">{}</th>",
            esc(&r.output.path),
            esc(name)
        );
    }
    b.push_str("</tr></thead>\n<tbody>\n");
    for row in rows {
        if row.group {
            let _ = writeln!(
                b,
                "<tr class=\"group\"><td colspan=\"{}\">{}</td></tr>",
                runs.len() + 1,
                esc(&row.label)
            );
            continue;
        }
        let best = row.best();
        let hint = match row.better {
            Better::Lower => " <span class=\"muted\" title=\"lower is better\">↓</span>",
            Better::Higher => " <span class=\"muted\" title=\"higher is better\">↑</span>",
            Better::None => "",
        };
        let _ = write!(b, "<tr><td>{}{hint}</td>", esc(&row.label));
        for (i, c) in row.cells.iter().enumerate() {
            match c {
                Some((t, _)) if best.contains(&i) => {
                    let _ = write!(b, "<td class=\"n best\"><strong>{}</strong></td>", esc(t));
                }
                Some((t, _)) => {
                    let _ = write!(b, "<td class=\"n\">{}</td>", esc(t));
                }
                None => b.push_str("<td class=\"n muted\">—</td>"),
            }
        }
        b.push_str("</tr>\n");
    }
    b.push_str("</tbody>\n</table>\n");
}

/// Several runs side by side as a self-contained HTML page, best value per row in bold.
pub fn render_compare_html(runs: &[(String, Report)]) -> String {
    let rows = compare_rows(runs);
    let mut b = String::from("<header>\n<h1>Runs compared</h1>\n");
    let mut models: Vec<&str> = vec![];
    for (_, r) in runs {
        if !models.contains(&r.model.path.as_str()) {
            models.push(&r.model.path);
        }
    }
    let _ = writeln!(
        b,
        "<p class=\"sub\">{} run{} · model{} <span class=\"mono\">{}</span></p>\n</header>",
        runs.len(),
        if runs.len() == 1 { "" } else { "s" },
        if models.len() == 1 { "" } else { "s" },
        esc(&if models.is_empty() {
            "—".to_string()
        } else {
            models.join(", ")
        })
    );
    html_table(&mut b, runs, &rows);
    if runs.iter().any(|(_, r)| !r.warnings.is_empty()) {
        b.push_str("<h2>Warnings</h2>\n");
        for (name, r) in runs.iter().filter(|(_, r)| !r.warnings.is_empty()) {
            let _ = writeln!(b, "<h3>{}</h3>\n<ul class=\"warnings\">", esc(name));
            for x in &r.warnings {
                let _ = writeln!(b, "<li>{}</li>", esc(x));
            }
            b.push_str("</ul>\n");
        }
    }
    b.push_str("<footer>\n");
    for n in compare_footnotes(runs) {
        let _ = writeln!(b, "<p>{}</p>", esc(&n));
    }
    b.push_str("</footer>\n");
    page("compress — runs compared", &b)
}
