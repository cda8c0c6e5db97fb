//! Tables of the single-run page: the base-vs-compressed summary and the per-linear table.

use super::super::facts::{finite, finite_opt, Dataset, McrSource, TaskMetric};
use super::super::format::{
    dash, dtype_bits, esc, fmt_bytes, fmt_int, fmt_pct_signed, fmt_ppl, fmt_sparsity,
    is_fraction_metric, is_lower_better_metric, value_text,
};
use super::super::Report;
use crate::engine::LinearRecord;
use std::fmt::Write as _;

/// Class of a change: good, bad, or none when unchanged.
fn cls_delta(delta: f64, lower_better: bool) -> &'static str {
    if delta == 0.0 {
        ""
    } else if (delta < 0.0) == lower_better {
        "good"
    } else {
        "bad"
    }
}

/// One summary row; every cell is HTML already.
fn row(b: &mut String, label: &str, base: String, comp: String, delta: String) {
    let _ = writeln!(
        b,
        "<tr><td>{label}</td><td class=\"n\">{base}</td><td class=\"n\">{comp}</td><td class=\"n\">{delta}</td></tr>"
    );
}

/// The summary table, base vs compressed: perplexity, zero-shot tasks, size.
pub(super) fn summary_table(b: &mut String, r: &Report, mcr: Option<&(f64, McrSource)>) {
    b.push_str("<h2 id=\"summary\">Summary: base vs compressed</h2>\n");
    b.push_str("<table>\n<thead><tr><th>metric</th><th class=\"n\">base</th><th class=\"n\">compressed</th><th class=\"n\">Δ</th></tr></thead>\n<tbody>\n");
    perplexity_rows(b, r.eval_seq_len, &r.datasets());
    task_rows(b, &r.task_metrics());
    size_rows(b, r, mcr);
    b.push_str("</tbody>\n</table>\n");
}

fn perplexity_rows(b: &mut String, seq_len: Option<usize>, ds: &[Dataset]) {
    if ds.is_empty() {
        return;
    }
    let _ = writeln!(
        b,
        "<tr class=\"group\"><td colspan=\"4\">Perplexity{} · lower is better · compressed measured on the artifact read back from disk</td></tr>",
        seq_len.map(|s| format!(" (seq_len {s})")).unwrap_or_default()
    );
    for d in ds {
        let mut label = format!("<code>{}</code>", esc(d.name));
        let mut extra = vec![];
        if let Some(w) = d.windows {
            extra.push(format!("{} windows", fmt_int(w as f64)));
        }
        if let Some(t) = d.tokens {
            extra.push(format!("{} tokens", fmt_int(t as f64)));
        }
        if !extra.is_empty() {
            let _ = write!(
                label,
                " <span class=\"muted\">{}</span>",
                esc(&extra.join(", "))
            );
        }
        let label = format!("<span title=\"{}\">{label}</span>", esc(d.file));
        let delta = d
            .delta_pct
            .map(|p| {
                format!(
                    "<span class=\"{}\">{}</span>",
                    cls_delta(p, true),
                    esc(&fmt_pct_signed(p))
                )
            })
            .unwrap_or_else(dash);
        row(
            b,
            &label,
            d.before.map(fmt_ppl).unwrap_or_else(dash),
            d.after.map(fmt_ppl).unwrap_or_else(dash),
            delta,
        );
    }
}

/// Change of a task metric: percentage points for accuracies, percent for the rest.
fn task_delta(t: &TaskMetric) -> String {
    let (Some(bf), Some(af)) = (&t.before, &t.after) else {
        return dash();
    };
    let lower = is_lower_better_metric(&t.metric);
    if is_fraction_metric(&t.metric) {
        let d = 100.0 * (af.value - bf.value);
        format!(
            "<span class=\"{}\">{:+.2} pp</span>",
            cls_delta(d, lower),
            d
        )
    } else if bf.value != 0.0 {
        let d = 100.0 * (af.value - bf.value) / bf.value;
        format!(
            "<span class=\"{}\">{}</span>",
            cls_delta(d, lower),
            esc(&fmt_pct_signed(d))
        )
    } else {
        dash()
    }
}

fn task_rows(b: &mut String, tms: &[TaskMetric]) {
    if tms.is_empty() {
        return;
    }
    b.push_str("<tr class=\"group\"><td colspan=\"4\">Zero-shot tasks · accuracy ± standard error · higher is better</td></tr>\n");
    for t in tms {
        let label = format!(
            "{} · <code>{}</code>{}",
            esc(t.task),
            esc(&t.metric),
            t.n.map(|n| format!(" <span class=\"muted\">n={}</span>", fmt_int(n as f64)))
                .unwrap_or_default()
        );
        let side = |s: &Option<_>| s.as_ref().map(|s| esc(&t.fmt_side(s))).unwrap_or_else(dash);
        row(b, &label, side(&t.before), side(&t.after), task_delta(t));
    }
}

fn size_rows(b: &mut String, r: &Report, mcr: Option<&(f64, McrSource)>) {
    b.push_str("<tr class=\"group\"><td colspan=\"4\">Size</td></tr>\n");
    let (so, sc) = (r.size_orig(), r.size_comp());
    let delta = if so > 0.0 {
        esc(&format!("{:+.1} %", 100.0 * (sc - so) / so))
    } else {
        dash()
    };
    let fb = |v: f64| {
        format!(
            "<span title=\"{} bytes\">{}</span>",
            fmt_int(v),
            esc(&fmt_bytes(v))
        )
    };
    row(b, "size on disk", fb(so), fb(sc), delta);
    let base_bits = dtype_bits(&r.model.dtype);
    let bpw = r.bits_per_weight();
    if base_bits.is_some() || bpw.is_some() {
        let delta = match (base_bits, bpw) {
            (Some(bb), Some(c)) => esc(&format!("{:+.3}", c - bb)),
            _ => dash(),
        };
        row(
            b,
            "bits per weight <span class=\"muted\">(decoder linears)</span>",
            base_bits
                .map(|bb| esc(&format!("{bb:.0} ({})", r.model.dtype)))
                .unwrap_or_else(dash),
            bpw.map(|x| format!("{x:.3}")).unwrap_or_else(dash),
            delta,
        );
    }
    if let Some(sp) = r.sparsity() {
        row(
            b,
            "sparsity (pruned)",
            "0.00 %".into(),
            esc(&fmt_sparsity(sp)),
            dash(),
        );
    }
    if let Some(cr) = r.compression_ratio() {
        row(
            b,
            "compression ratio",
            "1.000×".into(),
            format!("{cr:.3}×"),
            dash(),
        );
    }
    if let Some((m, _)) = mcr {
        row(
            b,
            "MCR <sup>1</sup>",
            "1.000".into(),
            format!("<strong>{m:.3}</strong>"),
            dash(),
        );
    }
}

/// Every layer record, folded away under the charts.
pub(super) fn layer_table(b: &mut String, layers: &[LinearRecord]) {
    b.push_str("<details><summary>Per-linear table</summary>\n<table>\n<thead><tr><th class=\"n\">layer</th><th>linear</th><th>pass</th><th class=\"n\">rel. output error</th><th class=\"n\">loss</th><th class=\"n\">seconds</th><th>notes</th></tr></thead>\n<tbody>\n");
    for l in layers {
        let notes = l
            .notes
            .iter()
            .map(|(k, v)| format!("{k}={}", value_text(v)))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            b,
            "<tr><td class=\"n\">{}</td><td><code>{}</code></td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"mono\">{}</td></tr>",
            l.layer,
            esc(&l.linear),
            esc(&l.pass),
            finite_opt(l.rel_output_error).map(|x| format!("{x:.3e}")).unwrap_or_else(dash),
            finite_opt(l.loss).map(|x| format!("{x:.4e}")).unwrap_or_else(dash),
            finite(l.seconds).map(|x| format!("{x:.3}")).unwrap_or_else(dash),
            esc(&notes)
        );
    }
    b.push_str("</tbody>\n</table>\n</details>\n");
}
